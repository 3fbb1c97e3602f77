"""The screening page (/admin/ui) as an operator uses it: in Debian's headless chromium,
driven through chromium-driver (selenium), against a real gateway whose traffic makes one
reseller flagged; and its headers, served without the token and holding no data."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.support.cli import send
from tests.support.gateway import ADMIN_TOKEN, DEFAULT_POLICY, RunningGateway, running_gateway
from tests.support.upstream import FakeUpstream

WAIT_S = 30.0  # a generous deadline for the page to load and draw on a loaded machine
RELAY_CLIENT = "192.0.2.5"  # an allowed US datacenter address the relay connects from
RESTRICTED_CUSTOMERS = ["198.51.100.49", "198.51.100.1", "198.51.100.33"]  # KP, CN, IR
HONEST_CLIENT = "192.0.2.20"  # GB
HONEST_CUSTOMERS = ["192.0.2.17", "192.0.2.18", "192.0.2.19"]  # GB


def _chromium() -> tuple[str, str]:
    """The chromium binary and its driver, or a failure saying how to install them."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("the screening page is tested in a real browser: install Debian's "
                    "`chromium` and `chromium-driver` (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)", pytrace=False)
    return binary, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A headless chromium of this test alone, with its own profile, quit afterwards."""
    binary, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--window-size=1280,1600",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield chrome
    finally:
        chrome.quit()


def _policy() -> dict[str, Any]:
    """The default policy with two attesting resellers: `relay` and `honest`."""
    policy = dict(DEFAULT_POLICY)
    reseller = {"status": "active", "countries": ["US", "GB", "DE", "JP", "FR", "NL"],
                "require_customer": True, "limits": {"rpm": 6000}}
    policy["resellers"] = {**DEFAULT_POLICY["resellers"], "relay": dict(reseller),
                           "honest": dict(reseller)}
    return policy


async def _traffic(gw: RunningGateway) -> None:
    """`relay` forwards restricted-region customers from an allowed datacenter (all refused);
    `honest` serves customers from an allowed country."""
    _, relay_key = await gw.issue_key("relay")
    _, honest_key = await gw.issue_key("honest")
    for i in range(12):
        status, body, _ = await send(gw.url, relay_key, ip=RELAY_CLIENT, headers={
            "X-Customer-Id": f"relay-cust-{i % 4}",
            "X-Customer-IP": RESTRICTED_CUSTOMERS[i % len(RESTRICTED_CUSTOMERS)]})
        assert status == 403, body
        status, body, _ = await send(gw.url, honest_key, ip=HONEST_CLIENT, headers={
            "X-Customer-Id": f"honest-cust-{i % 4}",
            "X-Customer-IP": HONEST_CUSTOMERS[i % len(HONEST_CUSTOMERS)]})
        assert status == 200, body


async def _flagged_in_report(gw: RunningGateway) -> dict[str, Any]:
    """Poll GET /admin/report until `relay` is flagged (the flush is once a second)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        status, body = await gw.admin("GET", "/admin/report")
        assert status == 200, body
        by_name = {r["reseller"]: r for r in body["resellers"]}
        if by_name["relay"]["flagged"]:
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.1)


# --- what the browser does, each step run off the event loop (the gateway serves on it) ------

def _open(chrome: WebDriver, url: str) -> None:
    chrome.get(url)
    WebDriverWait(chrome, WAIT_S).until(
        lambda d: d.execute_script("return document.readyState") == "complete")


def _give_token(chrome: WebDriver, token: str) -> None:
    field = chrome.find_element(By.CSS_SELECTOR, "form#login input[type=password]")
    field.clear()
    field.send_keys(token)
    chrome.find_element(By.CSS_SELECTOR, "form#login button[type=submit]").click()


def _rows(chrome: WebDriver, css: str) -> list[list[str]]:
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in chrome.find_elements(By.CSS_SELECTOR, css)]


def _wait_for(chrome: WebDriver, what: str, check: Any) -> Any:
    try:
        return WebDriverWait(chrome, WAIT_S).until(check)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}:\n"
                             f"{chrome.find_element(By.TAG_NAME, 'body').text}") from None


def _severe_console(chrome: WebDriver) -> list[str]:
    """Console errors of the page (a CSP violation of its own files would be one)."""
    return [str(e.get("message")) for e in chrome.get_log("browser")
            if e.get("level") == "SEVERE" and "/admin/report" not in str(e.get("message"))]


async def test_the_page_shows_the_flagged_reseller_and_its_reasons(
        tmp_path: Path, upstream: FakeUpstream, browser: WebDriver) -> None:
    """In chromium, /admin/ui with the admin token typed into its password field shows every
    reseller in a table with `relay` flagged for restricted_customer_share and `honest` not,
    relay's signals with value, threshold, state and meaning, and its breakdowns as SVG
    charts; the token never reaches the address bar."""
    async with running_gateway(tmp_path, upstream.url, _policy()) as gw:
        await _traffic(gw)
        await _flagged_in_report(gw)
        url = gw.admin_url + "/admin/ui"
        await asyncio.to_thread(_open, browser, url)
        before = await asyncio.to_thread(_rows, browser, "table#resellers tbody tr")
        assert before == []  # nothing before the token
        await asyncio.to_thread(_give_token, browser, ADMIN_TOKEN)
        await asyncio.to_thread(_wait_for, browser, "the reseller table", lambda d: len(
            d.find_elements(By.CSS_SELECTOR, "table#resellers tbody tr")) >= 4)
        rows = {r[0]: r for r in await asyncio.to_thread(
            _rows, browser, "table#resellers tbody tr")}
        assert set(rows) >= {"relay", "honest", "acme", "direct"}
        # reseller, status, requests, denied, customers, state, flagged signals
        assert rows["relay"][1:6] == ["active", "12", "12", "4", "flag"], rows["relay"]
        assert "restricted_customer_share" in rows["relay"][6].split(", ")
        assert rows["honest"][5] != "flag" and rows["honest"][6] == "", rows["honest"]

        # The flagged reseller comes first and its details are shown at once.
        await asyncio.to_thread(_wait_for, browser, "relay's signals", lambda d: d.find_element(
            By.ID, "detail-title").text.startswith("Reseller relay"))
        signals = {r[0]: r for r in await asyncio.to_thread(
            _rows, browser, "table#signals tbody tr")}
        assert len(signals) == 8
        reason = signals["restricted_customer_share"]
        assert reason[1] == "1" and reason[4] == "flag", reason
        assert float(reason[2]) <= 1 and "restricted-region" in reason[5], reason
        charts = await asyncio.to_thread(lambda: {
            f.get_attribute("id"): f.find_elements(By.CSS_SELECTOR, "svg .bar text")
            for f in browser.find_elements(By.CSS_SELECTOR, "#detail figure")})
        countries = [t.text for t in charts["chart-countries"]]
        assert {"KP", "CN", "IR"} <= set(countries), countries
        assert any("AS64500" in t.text for t in charts["chart-asns"])
        assert await asyncio.to_thread(lambda: len(browser.find_elements(
            By.CSS_SELECTOR, "#chart-hours svg .bar rect")) == 24)

        # Clicking the honest reseller shows it unflagged.
        await asyncio.to_thread(lambda: browser.find_element(
            By.CSS_SELECTOR, "tr[data-reseller=honest] button").click())
        await asyncio.to_thread(_wait_for, browser, "honest's signals", lambda d: d.find_element(
            By.ID, "detail-title").text.startswith("Reseller honest"))
        states = [r[4] for r in await asyncio.to_thread(_rows, browser, "table#signals tbody tr")]
        assert len(states) == 8 and "flag" not in states, states

        assert await asyncio.to_thread(lambda: browser.current_url) == url
        assert await asyncio.to_thread(_severe_console, browser) == []


async def test_a_wrong_token_shows_an_error_and_no_data(
        tmp_path: Path, upstream: FakeUpstream, browser: WebDriver) -> None:
    """A wrong admin token typed into the page shows an error naming invalid_admin_token and
    leaves the reseller table empty (the page is not blank)."""
    async with running_gateway(tmp_path, upstream.url, _policy()) as gw:
        await asyncio.to_thread(_open, browser, gw.admin_url + "/admin/ui")
        await asyncio.to_thread(_give_token, browser, "not-the-admin-token")
        error = await asyncio.to_thread(_wait_for, browser, "an error", lambda d: (
            d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error")))
        text = await asyncio.to_thread(lambda: error.text)
        assert "refused" in text and "invalid_admin_token" in text, text
        assert await asyncio.to_thread(_rows, browser, "table#resellers tbody tr") == []
        assert not await asyncio.to_thread(lambda: browser.find_element(
            By.ID, "report").is_displayed())


async def test_the_page_is_served_without_the_token_under_strict_headers(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """/admin/ui and its script and stylesheet answer without a token, under a CSP of its own
    files only (no inline script), never framed, never cached; the page holds no reseller
    data; everything else under /admin/ (the report included) still needs the token, and the
    page takes no POST."""
    async with running_gateway(tmp_path, upstream.url, _policy()) as gw, \
            aiohttp.ClientSession() as s:
        for path, kind in (("/admin/ui", "text/html"), ("/admin/ui/app.js", "text/javascript"),
                           ("/admin/ui/app.css", "text/css")):
            async with s.get(gw.admin_url + path) as r:
                assert r.status == 200, path
                body = await r.text()
                assert r.headers["content-type"].startswith(kind)
                csp = r.headers["content-security-policy"]
                assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
                assert r.headers["x-frame-options"] == "DENY"
                assert r.headers["cache-control"] == "no-store"
                assert r.headers["x-content-type-options"] == "nosniff"
            if path == "/admin/ui":
                assert "<table id=\"resellers\">" in body and 'type="password"' in body
                assert "relay" not in body and "honest" not in body
                assert "<script>" not in body and " style=" not in body  # nothing inline
        async with s.get(gw.admin_url + "/admin/report") as r:
            assert r.status == 401
        async with s.post(gw.admin_url + "/admin/ui", data={"token": "x"}) as r:
            assert r.status == 405

"""Reseller screening (docs/architecture.md §15): per reseller, over a sliding window of UTC
hours, eight signals of whether it relays customers it should not; the `screening_alert`
line and the suspension they may trigger; and the report.

The hot path (`Screening.record`, every request with a known reseller, allowed or denied)
only touches dicts: one tally per (reseller, hour). The usage ledger's once-a-second flush
calls `Screening.flush`: one `Store.add_screening` for all tallies, then the resellers it
flushed are judged (the window's open hours read; its closed hours kept, screening_hours.py)
and their transitions acted on. The signal computations are pure functions of a
`ScreeningWindow` (`compute_signals`) or of its `Figures` (`values_of`).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import math
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway import metrics
from gateway.audit import store_policy
from gateway.errors import OperationError, StoreError
from gateway.log import logger
from gateway.policy import (
    COUNT_SIGNALS,
    MAX_SCREENING_HOURS,
    SCREENING_DEFAULTS,
    CompiledPolicy,
    Screening,
    parse_window,
    validate_policy,
)
from gateway.screening_hours import (
    CLOSE_GRACE_S,
    REBUILD_PAIRS,
    SEP,
    ClosedHours,
    Figures,
    OpenHours,
    closed_hours,
    figures,
    last_closed_hour,
    open_hours,
)
from gateway.store.base import PolicyConflict, ScreeningTally, ScreeningWindow, Store

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.snapshot import Snapshot

SIGNALS = tuple(SCREENING_DEFAULTS)

#: One sentence per signal (docs/architecture.md §15; the report repeats it).
MEANINGS = {
    "restricted_customer_share": "Share of attested-customer requests denied by a "
    "restricted-region rule: the reseller does not screen its customers.",
    "anonymizer_customer_share": "Share of attested-customer requests whose customer address "
    "is a VPN, Tor exit, proxy or hosting provider.",
    "invalid_customer_ip_share": "Share of attested-customer requests whose customer address "
    "is private, reserved, documentation, bogon, or the reseller's own egress address.",
    "customer_country_hopping": "The most countries one customer was attested from in the "
    "window.",
    "shared_customer_ip": "The most distinct customer ids attested on one customer address "
    "in the window.",
    "activity_hours_mismatch": "Share of attested-customer requests made outside 07:00-23:00 "
    "local time of the customer's country (0 until traffic is seen in 6 hours of the window).",
    "egress_spread": "The most connecting countries or ASNs one key was used from in the "
    "window.",
    "denial_spike": "Denials in the current hour as a multiple of the window's hourly mean "
    "(0 below 10 denials).",
}

#: Anonymizer flags that count for `anonymizer_customer_share`.
ANONYMIZER_FLAGS = frozenset({"vpn", "tor", "public_proxy", "residential_proxy", "hosting"})
#: Denials below this in the current hour never make a `denial_spike`.
SPIKE_MIN_DENIALS = 10
#: `activity_hours_mismatch` is 0 until the window has traffic in this many distinct hours (a
#: burst says nothing about a daily rhythm).
ACTIVITY_MIN_HOURS = 6
#: In-hours of `activity_hours_mismatch`, local time: [07:00, 23:00).
DAY_START, DAY_END = 7, 23
TOP_N = 10
#: A reseller whose judgement took t seconds of the event loop's time is judged again no
#: sooner than this times t later (at most about 2 % of the loop per reseller). A judgement
#: whose open hours are small takes well under 20 ms: judged on every flush, as before.
PACE_FACTOR = 50
#: ... and never more than this many seconds later.
PACE_MAX_S = 60.0
#: The loop time one flush spends judging (seconds of `cpu`): the resellers it did not reach
#: stay owed and go first at the next flush; the first one is always judged.
FLUSH_BUDGET_S = 0.05
#: The pairs of closed and open hours kept across all resellers (35-60 bytes each in
#: bench.screening: about 120 MiB at most, two full 7 d windows): past it the least recently
#: judged resellers' are dropped (built anew when next judged); the one just judged keeps its
#: own.
KEPT_PAIRS_MAX = 2_000_000

# Country -> standard UTC offset in hours (no daylight saving; one zone per country, for the
# largest countries the zone of the capital or of most people). An approximation: the report
# judges hours of activity, and an hour or two off does not turn day into night.
UTC_OFFSETS: dict[str, float] = {
    "US": -5, "CA": -5, "MX": -6, "BR": -3, "AR": -3, "CL": -4, "CO": -5, "PE": -5,
    "VE": -4, "EC": -5, "BO": -4, "UY": -3, "PY": -4, "CU": -5, "DO": -4, "GT": -6,
    "CR": -6, "PA": -5, "JM": -5, "GB": 0, "IE": 0, "PT": 0, "IS": 0, "ES": 1, "FR": 1,
    "DE": 1, "NL": 1, "BE": 1, "LU": 1, "CH": 1, "AT": 1, "IT": 1, "DK": 1, "NO": 1,
    "SE": 1, "PL": 1, "CZ": 1, "SK": 1, "HU": 1, "SI": 1, "HR": 1, "RS": 1, "BA": 1,
    "AL": 1, "MK": 1, "MT": 1, "FI": 2, "EE": 2, "LV": 2, "LT": 2, "UA": 2, "RO": 2,
    "BG": 2, "GR": 2, "CY": 2, "MD": 2, "IL": 2, "PS": 2, "LB": 2, "JO": 3, "SY": 3,
    "EG": 2, "LY": 2, "ZA": 2, "ZW": 2, "ZM": 2, "MZ": 2, "TR": 3, "RU": 3, "BY": 3,
    "SA": 3, "IQ": 3, "KW": 3, "QA": 3, "BH": 3, "YE": 3, "KE": 3, "ET": 3, "TZ": 3,
    "UG": 3, "SO": 3, "IR": 3.5, "AE": 4, "OM": 4, "AZ": 4, "GE": 4, "AM": 4, "AF": 4.5,
    "PK": 5, "UZ": 5, "TJ": 5, "TM": 5, "KZ": 5, "IN": 5.5, "LK": 5.5, "NP": 5.75,
    "BD": 6, "KG": 6, "MM": 6.5, "TH": 7, "VN": 7, "LA": 7, "KH": 7, "ID": 7, "CN": 8,
    "HK": 8, "MO": 8, "TW": 8, "SG": 8, "MY": 8, "PH": 8, "MN": 8, "BN": 8, "KP": 9,
    "KR": 9, "JP": 9, "AU": 10, "PG": 10, "NZ": 12, "FJ": 12, "MA": 1, "DZ": 1, "TN": 1,
    "NG": 1, "CM": 1, "AO": 1, "CD": 1, "GH": 0, "CI": 0, "SN": 0, "ML": 0, "SD": 2,
    "RW": 2, "NA": 2, "BW": 2, "MG": 3,
}

_DOCUMENTATION = tuple(ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32", "3fff::/20"))


def invalid_customer_ip(customer_ip: str, client_ip: str | None,
                        documentation_ok: bool = False) -> bool:
    """A customer address no real customer has: unparsable, the reseller's own egress (the
    connecting client) address, a documentation range (unless `documentation_ok`: the demo
    geo databases place countries there), or any other address that is not global unicast
    (private, loopback, link-local, shared, reserved, multicast, unspecified: bogons)."""
    kind = _address_kind(customer_ip)
    if kind == "unparsable" or customer_ip == client_ip:
        return True
    if kind == "documentation":
        return not documentation_ok
    return kind == "bogon"


@functools.lru_cache(maxsize=16384)
def _address_kind(address: str) -> str:
    """unparsable, documentation, bogon or global: what invalid_customer_ip needs of an
    address, cached (attested addresses repeat; ipaddress costs several µs a call)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unparsable"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in n for n in _DOCUMENTATION if n.version == ip.version):
        return "documentation"
    return "bogon" if not ip.is_global or ip.is_multicast else "global"


def local_hour(now: float, country: str | None) -> int | None:
    """The hour 0-23 at `now` in `country` per UTC_OFFSETS; None for a country not in it."""
    off = UTC_OFFSETS.get(country or "")
    if off is None:
        return None
    return int(((now / 3600.0) + off) % 24)


# --- recording -------------------------------------------------------------------------------

def tally_request(t: ScreeningTally, ctx: RequestContext, customer_flags: Collection[str],
                  restricted: Collection[str], now: float,
                  documentation_ok: bool = False) -> None:
    """Add one request (allowed or denied) of a known reseller to its hour's tally."""
    t.count("req")
    denied = ctx.decision == "deny"
    if denied:
        t.count("den")
    t.count(f"asn:{ctx.asn or 0}")
    if ctx.key_id is not None:
        t.pair("kc", f"{ctx.key_id}{SEP}{ctx.country or '??'}")
        t.pair("ka", f"{ctx.key_id}{SEP}{ctx.asn or 0}")
    hour_country = ctx.country
    if ctx.customer_ip is not None:
        t.count("att")
        cc = ctx.customer_country
        hour_country = cc or ctx.country
        t.count(f"cc:{cc or '??'}")
        who = ctx.customer_id or ctx.customer_ip
        t.customers.add(who)
        t.pair("cc", f"{who}{SEP}{cc or '??'}")
        if ctx.customer_id is not None:
            t.pair("ip", f"{ctx.customer_ip}{SEP}{ctx.customer_id}")
        if denied and (ctx.reason == "country_not_allowed" or ctx.rule in restricted):
            t.count("rst")
        if ANONYMIZER_FLAGS.intersection(customer_flags):
            t.count("anon")
        if invalid_customer_ip(ctx.customer_ip, ctx.client_ip, documentation_ok):
            t.count("inv")
        lh = local_hour(now, cc)
        if lh is not None:
            t.count("lt")
            if not DAY_START <= lh < DAY_END:
                t.count("off")
    h = local_hour(now, hour_country)
    t.count(f"h:{int(now // 3600) % 24 if h is None else h}")


# --- the signals (pure) -------------------------------------------------------------------

def _sum(w: ScreeningWindow, name: str) -> int:
    return sum(c.get(name, 0) for c in w.hours.values())


def _share(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole > 0 else 0.0


def signal_values(w: ScreeningWindow, current_hour: int, window_hours: int) -> dict[str, float]:
    """Each signal's value over window `w` (whose last hour is `current_hour`)."""
    return values_of(figures(w, current_hour), window_hours)


def values_of(f: Figures, window_hours: int) -> dict[str, float]:
    """Each signal's value from the figures of a window of `window_hours` hours."""
    sums, att, den = f.sums, f.sums["att"], f.sums["den"]
    spike = 0.0
    if f.last_den >= SPIKE_MIN_DENIALS and den > 0:
        spike = round(f.last_den / (den / max(1, window_hours)), 4)
    return {
        "restricted_customer_share": _share(sums["rst"], att),
        "anonymizer_customer_share": _share(sums["anon"], att),
        "invalid_customer_ip_share": _share(sums["inv"], att),
        "customer_country_hopping": f.groups["cc"],
        "shared_customer_ip": f.groups["ip"],
        "activity_hours_mismatch": _share(sums["off"], sums["lt"])
        if f.lt_hours >= ACTIVITY_MIN_HOURS else 0.0,
        "egress_spread": max(f.groups["kc"], f.groups["ka"]),
        "denial_spike": spike,
    }


def state_of(value: float, threshold: float, watch: float) -> str:
    """`flag` at value >= threshold, `watch` at value >= watch, else `ok`; 0 is always ok
    (no traffic never flags)."""
    if value <= 0:
        return "ok"
    if value >= threshold:
        return "flag"
    return "watch" if value >= watch else "ok"


def _num(signal: str, v: float) -> float | int:
    return int(v) if signal in COUNT_SIGNALS else v


def compute_signals(w: ScreeningWindow, current_hour: int, window_hours: int,
                    screening: Screening) -> list[dict[str, Any]]:
    """All eight signals of `w`, in report order: name, value, threshold, watch, state,
    meaning."""
    return signals_of(signal_values(w, current_hour, window_hours), screening)


def signals_of(values: Mapping[str, float], screening: Screening) -> list[dict[str, Any]]:
    """The eight signals of `values` (signal_values), as compute_signals lists them."""
    out = []
    for name in SIGNALS:
        threshold, watch = screening.limits(name)
        v = values[name]
        out.append({"name": name, "value": _num(name, v), "threshold": _num(name, threshold),
                    "watch": _num(name, watch), "state": state_of(v, threshold, watch),
                    "meaning": MEANINGS[name]})
    return out


def _top(w: ScreeningWindow, prefix: str) -> list[tuple[str, int]]:
    totals: dict[str, int] = {}
    for counts in w.hours.values():
        for k, n in counts.items():
            if k.startswith(prefix):
                totals[k[len(prefix):]] = totals.get(k[len(prefix):], 0) + n
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_N]


def reseller_report(reseller: str, status: str, w: ScreeningWindow, current_hour: int,
                    window_hours: int, screening: Screening) -> dict[str, Any]:
    """One reseller's entry of the report (docs/architecture.md §15, the binding shape)."""
    signals = compute_signals(w, current_hour, window_hours, screening)
    asns = []
    for asn, n in _top(w, "asn:"):
        number = int(asn) if asn.isdigit() else 0
        asns.append({"asn": number, "name": w.names.get(asn) or "unknown", "requests": n})
    hours = [0] * 24
    for counts in w.hours.values():
        for h in range(24):
            hours[h] += counts.get(f"h:{h}", 0)
    return {
        "reseller": reseller, "status": status,
        "requests": _sum(w, "req"), "denied": _sum(w, "den"), "customers": w.customers,
        "flagged": any(s["state"] == "flag" for s in signals),
        "signals": signals,
        "top_customer_countries": [{"country": c, "requests": n} for c, n in _top(w, "cc:")],
        "top_client_asns": asns,
        "activity_hours": hours,
    }


def since_hours(since: str | None, screening: Screening) -> int:
    """The hours a report covers: `since` (e.g. `24h`, `2d`, whole hours) or the window;
    ValueError for anything else."""
    if since is None:
        return screening.window_hours
    try:
        return parse_window(since)
    except ValueError:
        raise ValueError(f"since {since!r}: whole hours or days, 1h to 7d (e.g. 24h)"
                         ) from None


async def build_report(store: Store, policy: CompiledPolicy | None, since: str | None = None,
                       reseller: str | None = None,
                       now: float | None = None) -> dict[str, Any]:
    """The report of every reseller of `policy` (or of `reseller` alone). OperationError 404
    when the policy has no such reseller, 400 for a bad `since`."""
    now = time.time() if now is None else now
    screening = policy.doc.screening_or_default if policy is not None else Screening()
    try:
        hours = since_hours(since, screening)
    except ValueError as exc:
        raise OperationError(400, str(exc)) from None
    resellers = policy.doc.resellers if policy is not None else {}
    names = sorted(resellers)
    if reseller is not None:
        if reseller not in resellers:
            raise OperationError(404, f"no reseller {reseller[:64]!r} in the live policy")
        names = [reseller]
    current = int(now // 3600)
    windows = await store.screening_window(names, current - hours + 1, current)
    return {
        "since": f"{hours}h", "window_seconds": hours * 3600,
        "generated_at": datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "resellers": [reseller_report(r, resellers[r].status, windows[r], current, hours,
                                      screening) for r in names],
    }


def format_report(report: Mapping[str, Any]) -> str:
    """The report as tables for people: one line per reseller, then per reseller its
    signals that are not `ok`."""
    lines = [f"Reseller screening, last {report['since']} (generated {report['generated_at']})",
             f"{'RESELLER':<20} {'STATUS':<10} {'REQUESTS':>9} {'DENIED':>7} {'CUSTOMERS':>9}"
             "  FLAGGED"]
    for r in report["resellers"]:
        flagged = ", ".join(s["name"] for s in r["signals"] if s["state"] == "flag")
        lines.append(f"{r['reseller']:<20} {r['status']:<10} {r['requests']:>9} "
                     f"{r['denied']:>7} {r['customers']:>9}  {flagged or '-'}")
    for r in report["resellers"]:
        lines += ["", f"{r['reseller']}: signals"]
        for s in r["signals"]:
            lines.append(f"  {s['state'].upper():<5} {s['name']:<26} {s['value']:>8g} "
                         f"(threshold {s['threshold']:g}, watch {s['watch']:g})  "
                         f"{s['meaning'] if s['state'] != 'ok' else ''}".rstrip())
        countries = ", ".join(f"{c['country']} {c['requests']}"
                              for c in r["top_customer_countries"])
        asns = ", ".join(f"AS{a['asn']} {a['name']} {a['requests']}"
                         for a in r["top_client_asns"])
        lines.append(f"  customer countries: {countries or '-'}")
        lines.append(f"  client networks: {asns or '-'}")
    return "\n".join(lines)


# --- the in-process part ------------------------------------------------------------------

class ScreeningTallies:
    """This instance's screening tallies, added to the store by the ledger's flush, and the
    judgement of the resellers flushed (alerts, suspension, the gauge).

    A judgement reads from the store only the hours of the window still open; the closed ones
    are kept per reseller, aggregated (screening_hours.ClosedHours), and move on once an
    hour. A reseller whose judgement still costs much is paced (PACE_FACTOR) and judged by a
    later flush. `now` (wall time), `clock` (for pacing) and `cpu` (the loop's time spent)
    are the clocks, to be replaced in tests."""

    def __init__(self, store: Store, policy: Callable[[], CompiledPolicy | None],
                 actor: str = "screening", *, now: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] = time.thread_time) -> None:
        self.store = store
        self.policy = policy
        self.actor = actor
        self.now, self.clock, self.cpu = now, clock, cpu
        self._pending: dict[tuple[str, int], ScreeningTally] = {}
        # (reseller, signal) -> flagged when this instance last judged it
        self._flagged: dict[tuple[str, str], bool] = {}
        self._closed: dict[str, ClosedHours] = {}
        self._open: dict[str, OpenHours] = {}
        self._due: dict[str, float] = {}  # reseller -> clock() before which it waits
        # reseller -> now() of its last judgement, the least recent first
        self._judged: dict[str, float] = {}
        #: a build of a reseller's closed hours reads at most about this many pairs a
        #: judgement (screening_hours.closed_hours); until it is complete it is owed
        self.rebuild_pairs = REBUILD_PAIRS
        self.kept_pairs_max = KEPT_PAIRS_MAX
        self._kept: dict[str, int] = {}  # reseller -> the pairs of its closed and open hours
        self._suspend: set[str] = set()  # suspensions owed (refused so far), retried
        self._owed: set[str] = set()  # flushed, not judged since (not due yet, or failed)
        # the windows seen in force: (wall time from which, hours), oldest first; an hour's
        # buckets expire `window` hours after it with the window of the write that set it
        self._windows: list[tuple[float, int]] = []
        # the admin API's flush may run beside the loop's: one judgement at a time, as the
        # closed hours move on across awaits
        self._judging = asyncio.Lock()
        #: flushes the store refused (tallies dropped); for tests and diagnostics
        self.flush_errors = 0

    def record(self, ctx: RequestContext, snap: Snapshot) -> None:
        """The hot path: count one ended request of a known reseller (judged against the
        request's own snapshot)."""
        if ctx.reseller is None:
            return
        policy = snap.policy
        if policy is None:
            return
        now = time.time()
        key = (ctx.reseller, int(now // 3600))
        t = self._pending.get(key)
        if t is None:
            t = self._pending[key] = ScreeningTally()
        geo = snap.geo
        flags = geo.peek(ctx.customer_ip).anonymizer if ctx.customer_ip else ()
        if ctx.asn is not None and str(ctx.asn) not in t.names:
            org = geo.peek(ctx.client_ip).asn_org if ctx.client_ip else None
            if org:
                t.names[str(ctx.asn)] = org[:100]
        tally_request(t, ctx, flags, policy.restricted_ids, now,
                      snap.parts.config.settings.geo.allow_demo_databases)

    async def flush(self) -> None:
        """Add the pending tallies (one `add_screening`), then judge the resellers added and
        those owed a judgement."""
        if not self._pending and not self._owed:
            return
        batch, self._pending = self._pending, {}
        policy = self.policy()
        screening = policy.doc.screening_or_default if policy is not None else Screening()
        if batch:
            try:
                await self.store.add_screening(batch, screening.window_hours)
            except StoreError:
                self.flush_errors += 1  # best effort: screening tallies are not retried
                return
            except ValueError as exc:
                logger().error("screening_flush_failed", reason=str(exc)[:200])
                return
        if policy is not None:
            await self.judge(policy, self._owed | {r for r, _ in batch})

    async def judge(self, policy: CompiledPolicy, resellers: Collection[str]) -> None:
        """Compute the signals of `resellers` (those of the policy) that are due, set the
        gauge, and act on each transition to `flag` (one instance wins it:
        Store.screening_mark). Those not due are owed: a later flush judges them."""
        screening = policy.doc.screening_or_default
        async with self._judging:
            now = self.now()
            hours = screening.window_hours
            if self._windows and self._windows[-1][1] != hours:
                self._closed.clear()  # built for another window: built again
                self._open.clear()
                self._kept.clear()
            self._see_window(now, hours)
            self._forget(policy.doc.resellers, now - hours * 3600)
            start = self.clock()
            known = [r for r in sorted(resellers) if r in policy.doc.resellers]
            self._owed.update(known)  # _forget keeps it to the policy's resellers
            # the least recently judged first: those a flush's budget did not reach go first
            turn = {r: i for i, r in enumerate(self._judged)}
            due = sorted((r for r in known if self._due.get(r, start) <= start),
                         key=lambda r: turn.get(r, -1))
            begun: float | None = None
            for r in due:
                # The thread's CPU time across the awaits: the loop's, including other tasks'
                # meanwhile (under load this errs towards pacing more).
                spent = self.cpu()
                begun = spent if begun is None else begun
                values = None
                try:
                    values = await self._values(r, now, hours)
                except StoreError:
                    self.flush_errors += 1  # still owed; the kept hours as they were
                finally:
                    after = self.cpu()
                    self._due[r] = self.clock() + min(PACE_MAX_S,
                                                      PACE_FACTOR * (after - spent))
                if values is not None:
                    self._owed.discard(r)
                    try:
                        await self._act(r, signals_of(values, screening), screening)
                    except StoreError:
                        self.flush_errors += 1
                if after - begun >= FLUSH_BUDGET_S:
                    break
            await self._suspend_owed(policy)

    async def _values(self, r: str, now: float, hours: int) -> dict[str, float] | None:
        """Reseller `r`'s signal values over the window of `hours` hours ending at `now`: its
        closed hours moved on (kept only once every read succeeded), its open hours read;
        None while a build of its closed hours is under way (a step of it done)."""
        self._judged.pop(r, None)
        self._judged[r] = now
        current = int(now // 3600)
        first, last_closed = current - hours + 1, last_closed_hour(now)
        have = self._closed.get(r)
        if have is not None and have.expiry <= now:
            have = None  # an hour kept expired in the store: built again
        closed = await closed_hours(self.store, r, have, first, last_closed,
                                    functools.partial(self._expiry, now=now),
                                    self.rebuild_pairs)
        self._closed[r] = closed
        if closed.last < last_closed:
            self._open.pop(r, None)  # it holds the closed hours it was made next to
            self._keep(r, closed.kept())
            return None
        opened = max(first, last_closed + 1)
        read = await self.store.screening_window([r], opened, current, detail=False)
        kept = self._open[r] = open_hours(self._open.get(r), closed, opened, current)
        figures = kept.figures(read[r])
        self._keep(r, closed.kept() + kept.kept())
        return values_of(figures, hours)

    def _keep(self, r: str, pairs: int) -> None:
        """Note that `r` keeps `pairs` pairs; past kept_pairs_max in all, drop the kept hours
        of the least recently judged resellers but `r`."""
        self._kept[r] = pairs
        total = sum(self._kept.values())
        if total <= self.kept_pairs_max:
            return
        for other in list(self._judged):
            if total <= self.kept_pairs_max:
                break
            if other != r and other in self._kept:
                total -= self._kept.pop(other)
                self._closed.pop(other, None)
                self._open.pop(other, None)

    def _forget(self, resellers: Collection[str], idle: float) -> None:
        """Drop all state of the resellers not in `resellers`, and the kept hours and pace of
        those not judged since `idle` (wall time)."""
        per_reseller: list[dict[str, Any]] = [self._judged, self._kept, self._closed,
                                              self._open, self._due]
        for r in {r for d in per_reseller for r in d}:
            if r not in resellers or self._judged.get(r, idle) < idle:
                for d in per_reseller:
                    d.pop(r, None)
        self._flagged = {k: v for k, v in self._flagged.items() if k[0] in resellers}
        self._suspend.intersection_update(resellers)
        self._owed.intersection_update(resellers)

    def _see_window(self, now: float, hours: int) -> None:
        """Note the window in force at `now`; forget those no kept hour was written under."""
        if not self._windows or self._windows[-1][1] != hours:
            self._windows.append((now, hours))
        horizon = now - (MAX_SCREENING_HOURS + 2) * 3600
        while len(self._windows) > 1 and self._windows[1][0] <= horizon:
            del self._windows[0]

    def _expiry(self, hour: int, now: float) -> float:
        """When the store drops `hour`, read at `now`: its buckets expire `window` hours after
        the hour with the window of their last write, one of those in force while the hour
        could be written; of those, the earliest still ahead (it was read: not expired). An
        earlier guess than the truth only costs a rebuild."""
        start, end = hour * 3600.0, (hour + 1) * 3600.0 + CLOSE_GRACE_S
        ends = [since for since, _ in self._windows[1:]] + [math.inf]
        ahead = [(hour + 1 + w) * 3600.0
                 for i, ((since, w), until) in enumerate(zip(self._windows, ends, strict=True))
                 if (i == 0 or since < end) and until > start and (hour + 1 + w) * 3600.0 > now]
        # none: written under a window not seen here (another instance's); looked at in an hour
        return min(ahead, default=now + 3600.0)

    async def _act(self, r: str, signals: list[dict[str, Any]], screening: Screening) -> None:
        """Reseller `r`'s gauge, and the alert (and suspension) of each signal turned `flag`."""
        suspend, hours = False, screening.window_hours
        for s in signals:
            flagged = s["state"] == "flag"
            metrics.child(metrics.SCREENING_FLAGGED, r, s["name"]).set(1 if flagged else 0)
            # The store's mark only on a change seen here: no round trip per signal and flush
            # while nothing changes.
            if self._flagged.get((r, s["name"]), False) == flagged:
                continue
            won = await self.store.screening_mark(r, s["name"], flagged, hours * 3600)
            self._flagged[(r, s["name"])] = flagged
            if not won:
                continue
            logger().warning("screening_alert", reseller=r, signal=s["name"],
                             value=s["value"], threshold=s["threshold"],
                             action=screening.actions.flag, mode=screening.actions.mode)
            suspend = True
        if suspend and _suspends(screening):
            self._suspend.add(r)  # made by judge, after the judgements, until done

    async def _suspend_owed(self, policy: CompiledPolicy) -> None:
        """Make the suspensions owed (those the policy still asks for); one the store refuses
        stays owed for the next judgement."""
        asks = _suspends(policy.doc.screening_or_default)
        for r in sorted(self._suspend):
            if asks and r in policy.doc.resellers:
                try:
                    await suspend_reseller(self.store, r, self.actor)
                except StoreError:
                    self.flush_errors += 1
                    continue
                except PolicyConflict:
                    continue
            self._suspend.discard(r)


def _suspends(screening: Screening) -> bool:
    return screening.actions.flag == "suspend" and screening.actions.mode == "enforce"


async def suspend_reseller(store: Store, reseller: str, actor: str) -> bool:
    """Set `reseller`'s status to suspended in the stored policy (a new version, audited as
    `reseller_status_changed`); False when it is not there or already suspended;
    PolicyConflict when other writers moved the version on three times running."""
    for attempt in range(3):  # another writer moved the version on: read again
        stored = await store.get_policy()
        if stored is None:
            return False
        raw = json.loads(stored.doc)
        entry = raw.get("resellers", {}).get(reseller)
        if not isinstance(entry, dict) or entry.get("status") == "suspended":
            return False
        entry["status"] = "suspended"
        try:
            await store_policy(store, validate_policy(raw, "store"), actor, stored.version)
        except PolicyConflict:
            if attempt == 2:
                raise
            continue
        logger().warning("screening_suspended", reseller=reseller)
        return True
    return False  # not reached

"""Packaging: optional extras and what a command says without its extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import cli_env

REPO = Path(__file__).resolve().parents[1]


def _without(modules: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess[str]:
    """`gateway <argv>` in a fresh interpreter where `modules` cannot be imported, as when the
    extra that installs them is missing (a None entry in sys.modules blocks an import)."""
    code = ("import sys\n"
            f"for name in {modules!r}: sys.modules[name] = None\n"
            "from gateway.cli import main\n"
            f"sys.exit(main({list(argv)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    (("anthropic",), ("demo",), "demo"),
    (("mmdb_writer",), ("geo", "build"), "geo-build"),
    (("netaddr",), ("geo", "build"), "geo-build"),
])
def test_a_command_without_its_extra_names_the_extra_and_exits_2(
    blocked: tuple[str, ...], argv: tuple[str, ...], extra: str, tmp_path: Path
) -> None:
    """`gateway demo` / `gateway geo build` without their extra print one line naming the
    extra to install and exit 2, having started and written nothing."""
    out = tmp_path / "geo-out"
    args = (*argv, "--out", str(out)) if argv[0] == "geo" else argv
    done = _without(blocked, *args)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert f"[{extra}]" in lines[0] and blocked[0] in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_geo_build_with_its_extra_still_builds(tmp_path: Path) -> None:
    """With the geo-build extra installed, `gateway geo build` writes the three databases."""
    done = _without((), "geo", "build", "--src", str(REPO / "geo" / "demo" / "src"),
                    "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.mmdb")) == [
        "Demo-ASN.mmdb", "Demo-Anonymous-IP.mmdb", "Demo-Country.mmdb"]

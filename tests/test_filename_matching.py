"""Tests mirror the package: every module has its unit test file, every unit test file a module.

The convention (the idea is mitmproxy's test/filename_matching.py): the unit tests of
`gateway/X.py` live in `tests/test_X.py`, those of `gateway/store/X.py` in
`tests/store/test_X.py` and those of `gateway/store/redis/X.py` in `tests/store/redis/test_X.py`
(the test tree mirrors the package tree). A module with no units of
its own is named in `NO_UNITS` with the reason. Suites that are not about one module live in
their own folders and are exempt: tests/integration/ (real gateways and processes),
tests/contract/ (one store contract run on every backend), tests/support/ (the test
infrastructure and its own tests). Cross-cutting checks at the top of tests/ that match no
module are named in `NOT_A_MODULE` with the reason. The developer tools (tools/, not shipped)
follow the same rule into tests/tools/.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gateway"
TESTS = ROOT / "tests"

#: Folders of the package whose modules are mirrored (package folder → test folder).
MIRRORED = {"": "", "store": "store", "store/redis": "store/redis"}

#: Modules with no units to test; each is reached through the modules it re-exports or calls.
NO_UNITS = {
    "__init__.py",  # the package marker and __version__ (checked by `gateway --version` tests)
    "__main__.py",  # `python -m gateway`: calls cli.main (tests/integration/test_cli.py)
    "store/__init__.py",  # re-exports Store and picks a backend (tests/contract/)
    "store/redis/__init__.py",  # re-exports RedisStore (tests/store/redis/test_store.py)
}

#: Test files at the top of tests/ that check the repository as a whole, not one module.
NOT_A_MODULE = {
    "test_filename_matching.py",  # this check
    "test_deploy_kit.py",  # the Kubernetes kit under deploy/ renders and is consistent
    "test_layers.py",  # imports follow the layer table, across the package
    "test_packaging.py",  # extras, the Dockerfile and the lock files
    "test_properties.py",  # property tests across every pure parser (client_ip, paths, ...)
    "test_repository.py",  # the repository stands alone and cites only itself
    "test_security_doc.py",  # every test SECURITY.md names exists
    "test_zz_no_secrets.py",  # runs last: no secret in any output of the whole session
}


def _modules() -> set[str]:
    """Modules of the mirrored folders, as paths relative to gateway/."""
    out = set()
    for folder in MIRRORED:
        for path in (PACKAGE / folder).glob("*.py"):
            out.add(path.relative_to(PACKAGE).as_posix())
    return out


def _test_file(module: str) -> str:
    """tests/-relative path of the unit test file of a gateway/-relative module path."""
    folder, _, name = module.rpartition("/")
    prefix = MIRRORED[folder] + "/" if folder else ""
    return f"{prefix}test_{name}"


def _unit_test_files() -> set[str]:
    """Test files outside the exempt folders, as paths relative to tests/."""
    out = set()
    for folder in MIRRORED.values():
        for path in (TESTS / folder).glob("test_*.py"):
            out.add(path.relative_to(TESTS).as_posix())
    return out


def test_every_module_has_its_unit_test_file() -> None:
    """Each gateway module not in NO_UNITS has tests/test_X.py (tests/store/test_X.py,
    tests/store/redis/test_X.py)."""
    modules = _modules()
    assert "store/redis/store.py" in modules and "pipeline.py" in modules  # the scan works
    missing = sorted(f"gateway/{m} -> tests/{_test_file(m)}" for m in modules - NO_UNITS
                     if not (TESTS / _test_file(m)).is_file())
    assert not missing, "modules without a unit test file:\n" + "\n".join(missing)


def test_every_unit_test_file_matches_a_module() -> None:
    """Each test file outside integration/, contract/ and support/ names a module (or is
    listed in NOT_A_MODULE): a misnamed file fails here instead of hiding its module's gap."""
    expected = {_test_file(m) for m in _modules() - NO_UNITS}
    stray = sorted(f"tests/{t}" for t in _unit_test_files() - expected - NOT_A_MODULE)
    assert not stray, "test files that match no module:\n" + "\n".join(stray)


def test_the_lists_name_only_what_exists() -> None:
    """The allow-lists hold no stale entry: each names an existing module or test file, and
    no module with units is excused."""
    assert NO_UNITS <= _modules(), sorted(NO_UNITS - _modules())
    assert all((TESTS / t).is_file() for t in NOT_A_MODULE), sorted(
        t for t in NOT_A_MODULE if not (TESTS / t).is_file())
    excused_with_file = sorted(m for m in NO_UNITS if (TESTS / _test_file(m)).is_file())
    assert not excused_with_file, excused_with_file


def test_the_mirror_rule() -> None:
    """The path rule itself: top-level modules map to tests/, store modules to tests/store/,
    the Redis backend's to tests/store/redis/."""
    assert _test_file("limits.py") == "test_limits.py"
    assert _test_file("store/memory.py") == "store/test_memory.py"
    assert _test_file("store/redis/pooled.py") == "store/redis/test_pooled.py"


# --- the developer tools: tools/X.py -> tests/tools/test_X.py, both ways ----------------------

TOOLS = ROOT / "tools"

#: Tool modules with no units of their own.
TOOLS_NO_UNITS = {
    "__init__.py",  # the package marker and its docstring
    "__main__.py",  # `python -m tools`: dispatch and the missing-extra line (test_packaging.py)
}


def test_tools_and_their_unit_test_files_match() -> None:
    """Each tools/ module not in TOOLS_NO_UNITS has tests/tools/test_X.py, each file there
    names a tool module, and the allow-list names only existing modules without a test file."""
    modules = {p.name for p in TOOLS.glob("*.py")}
    assert {"demo.py", "geo_build.py"} <= modules  # the scan finds the tools
    tests = {p.name for p in (TESTS / "tools").glob("test_*.py")}
    expected = {f"test_{m}" for m in modules - TOOLS_NO_UNITS}
    assert sorted(expected - tests) == [], "tools without a unit test file"
    assert sorted(tests - expected) == [], "tests/tools/ files that match no tool"
    assert TOOLS_NO_UNITS <= modules, sorted(TOOLS_NO_UNITS - modules)
    assert not {f"test_{m}" for m in TOOLS_NO_UNITS} & tests

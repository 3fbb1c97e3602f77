"""SECURITY.md maps each guarantee to a test: every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REF = re.compile(r"`((?:[a-z_]+/)*test_[a-z0-9_]+\.py)(?:::(test_[A-Za-z0-9_]+))?")
_CONT = re.compile(r"`::(test_[A-Za-z0-9_]+)`")


def _references(text: str) -> list[tuple[str, str | None]]:
    """(file, test) pairs; a bare `::name` refers to the file named before it on its line."""
    refs: list[tuple[str, str | None]] = []
    for line in text.splitlines():
        current: str | None = None
        for m in re.finditer(r"`[^`]+`", line):
            token = m.group(0)
            full = _REF.match(token)
            cont = _CONT.match(token)
            if full:
                current = full.group(1)
                refs.append((current, full.group(2)))
            elif cont and current:
                refs.append((current, cont.group(1)))
    return refs


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")}


def test_every_test_security_md_names_exists() -> None:
    """Each `file.py::test` in SECURITY.md is a test function in tests/ (files alone exist)."""
    refs = _references((ROOT / "SECURITY.md").read_text())
    assert len(refs) > 30
    missing = []
    for file, test in refs:
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif test is not None and test not in _tests_in(path):
            missing.append(f"{file}::{test}")
    assert missing == []

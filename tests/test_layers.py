"""The gateway's imports point one way: the layer table of docs/architecture.md, checked by AST.

Every module under gateway/ belongs to exactly one group of the table below. A module may
import a module of its own group, or of a group on a lower layer that its group does not list
under `never`. Every import counts: module-level, function-local and TYPE_CHECKING-only ones
(a function-local import is still a dependency; the layers above may import everything below
anyway, so cli and app need no exception). Layer 0 imports the standard library only, and no
module below layer 3 imports aiohttp: HTTP belongs to the edge. No module imports tools/,
tests/ or bench/ (they are not in the wheel), and the tools import from tests/ only the
stand-in upstream. And no module reaches itself through the imports
that run (type-only imports excepted: they never execute).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"


@dataclass(frozen=True)
class Group:
    layer: int
    name: str
    modules: frozenset[str]
    never: frozenset[str] = frozenset()  # groups on lower layers this one must not import


def _group(layer: int, name: str, modules: str, never: str = "") -> Group:
    return Group(layer, name, frozenset(modules.split()), frozenset(never.split()))


# The layer table, as data (module names relative to the `gateway` package).
TABLE = (
    _group(0, "records", "errors context cancellation paths allocator lru hash_chain "
                         "proxy_protocol"),
    _group(1, "contract", "__init__ settings log jsonio store.base store.gcra store.ledger"),
    _group(2, "stores", "store.memory store.state_file store.redis store.redis.runner "
                        "store.redis.pooled store.redis.pipelined store.redis.store "
                        "store.redis.usage store.redis.screening"),
    _group(2, "stages", "client_ip geo identity policy limits usage ledger quotas "
                        "self_service attestation screening_hours"),
    _group(3, "store_factory", "store"),
    _group(3, "edge", "proxy request_body responses audit usage_report request_log metrics "
                      "listeners tracing tls", never="stores"),
    _group(4, "pipeline", "decision snapshot pipeline explain key_admin screening",
           never="stores"),
    _group(5, "composition", "app sync status loops admin operations workers", never="stores"),
    _group(6, "entry", "cli __main__"),
)
STDLIB_ONLY_LAYER = 0
NO_AIOHTTP_BELOW = 3
#: Top-level packages of the source tree that are not shipped: the gateway never imports them.
NOT_SHIPPED = frozenset({"tools", "tests", "bench"})
#: What the developer tools may take from tests/: the stand-in upstream the demo drives
#: (docs/architecture.md §2). Anything the two share otherwise lives in tools/ (the tests may
#: import tools, as tests/support/certs.py imports tools/pki.py), not the other way round.
TOOLS_FROM_TESTS = frozenset({"tests.support.standin"})
TOOLS = PACKAGE.parent / "tools"

GROUP_OF = {m: g for g in TABLE for m in g.modules}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _walk(tree: ast.AST, runtime_only: bool) -> list[ast.AST]:
    """Every node of `tree`; with `runtime_only`, not those under `if TYPE_CHECKING:`."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if runtime_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
            continue
        todo += ast.iter_child_nodes(node)
    return nodes


def _imports(name: str, path: Path, runtime_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the module, at any depth."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in _walk(ast.parse(path.read_text(), str(path)), runtime_only):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["gateway", *package][: len(package) + 2 - node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "__future__":
                continue
            found.append((node.lineno, mod))
            # `from gateway import metrics` / `from gateway.store import memory` import modules.
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names
                      if f"{mod}.{a.name}".removeprefix("gateway.") in GROUP_OF]
    return found


def _internal(target: str) -> str | None:
    """The table's name of a gateway module `target` imports, or None when it is external."""
    if target != "gateway" and not target.startswith("gateway."):
        return None
    rest = target.removeprefix("gateway").removeprefix(".") or "__init__"
    while rest not in GROUP_OF and "." in rest:
        rest = rest.rsplit(".", 1)[0]
    return rest


def _violations() -> list[str]:
    bad: list[str] = []
    for name, path in _modules().items():
        src = GROUP_OF.get(name)
        if src is None:
            bad.append(f"gateway/{path.relative_to(PACKAGE)}: module {name} has no layer")
            continue
        for line, target in _imports(name, path):
            where = f"gateway/{path.relative_to(PACKAGE)}:{line}"
            inner = _internal(target)
            if inner is None:
                top = target.split(".")[0]
                if top in NOT_SHIPPED:
                    bad.append(f"{where}: {name} imports {target}, which is not shipped")
                elif src.layer == STDLIB_ONLY_LAYER and top not in sys.stdlib_module_names:
                    bad.append(f"{where}: {name} (layer 0) imports {target}, not stdlib")
                elif src.layer < NO_AIOHTTP_BELOW and top == "aiohttp":
                    bad.append(f"{where}: {name} (layer {src.layer}) imports {target}")
                continue
            dst = GROUP_OF.get(inner)
            if dst is None:
                bad.append(f"{where}: {name} imports {target}, which has no layer")
            elif dst is not src and (dst.layer >= src.layer or dst.name in src.never):
                bad.append(f"{where}: {name} ({src.name}, layer {src.layer}) imports "
                           f"{inner} ({dst.name}, layer {dst.layer})")
    return bad


def test_every_module_has_one_layer() -> None:
    """Each module under gateway/ is named in the table exactly once."""
    listed = [m for g in TABLE for m in g.modules]
    assert len(listed) == len(set(listed))
    assert sorted(set(listed) - set(_modules())) == []


def test_imports_follow_the_layer_table() -> None:
    """No module imports a module above its layer, a forbidden group, or a forbidden package."""
    assert _violations() == []


def test_tools_import_from_tests_only_the_stand_in() -> None:
    """A tool imports no test module but the stand-in upstream: shared code lives in tools/."""
    found = {(f"tools/{p.name}:{line}", target) for p in sorted(TOOLS.glob("*.py"))
             for line, target in _imports(f"tools.{p.stem}", p)
             if target.split(".")[0] == "tests"}
    assert {t for _, t in found} <= TOOLS_FROM_TESTS, sorted(found)


def _cycles() -> list[list[str]]:
    """Import cycles among the modules, counting the imports that run (not type-only ones)."""
    graph = {name: {m for _, t in _imports(name, path, runtime_only=True)
                    if (m := _internal(t)) is not None and m != name and m != "__init__"}
             for name, path in _modules().items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return cycles


def test_no_import_cycle() -> None:
    """No module reaches itself through the imports that run."""
    assert _cycles() == []


def test_a_cycle_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two modules of one group importing each other are reported as a cycle; a type-only
    import is not."""
    fake = tmp_path / "gateway"
    fake.mkdir()
    (fake / "app.py").write_text("from gateway import admin, workers\n")
    (fake / "admin.py").write_text("def f():\n    from gateway.app import X\n")
    (fake / "workers.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     "    from gateway import app\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _cycles() == [["admin", "app", "admin"]]


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("limits", "from gateway.store.memory import MemoryStore\n", "stages, layer 2) imports "
         "store.memory (stores, layer 2)"),
        ("geo", "def f():\n    from gateway.audit import logger\n", "imports audit (edge"),
        ("errors", "from aiohttp import web\n", "imports aiohttp, not stdlib"),
        ("policy", "from aiohttp import web\n", "(layer 2) imports aiohttp"),
        ("errors", "import yaml\n", "not stdlib"),
        ("app", "from gateway.store.redis import RedisStore\n", "imports store.redis (stores"),
        ("pipeline", "from gateway import app\n", "imports app (composition, layer 5)"),
        ("cli", "def f():\n    from tools.demo import run_demo\n", "imports tools.demo, which"
         " is not shipped"),
        ("app", "from tests.support.standin import FakeUpstream\n", "imports tests.support."
         "standin, which is not shipped"),
        ("geo", "import bench.run\n", "imports bench.run, which is not shipped"),
    ],
)
def test_a_wrong_import_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str,
                                 source: str, expected: str) -> None:
    """An import against the table is reported with its file, line and both layers."""
    fake = tmp_path / "gateway"
    fake.mkdir()
    (fake / f"{module}.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    bad = _violations()
    assert len(bad) == 1 and expected in bad[0] and f"gateway/{module}.py:" in bad[0], bad

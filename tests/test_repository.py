"""The repository stands alone: a fresh clone needs nothing beside it, and it cites only itself."""

from __future__ import annotations

import re
from pathlib import Path

import maxminddb

from tests.support.cli import TEST_GEO

REPO = Path(__file__).resolve().parents[1]
#: Build products and local caches, never part of a clone.
_NOT_IN_A_CLONE = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                   ".hypothesis", "build", "results"}
#: Strings that point outside the repository: documents that are not in it, a folder beside it.
_OUTSIDE = ("DESIGN" + ".md", "DESIGN" + " §", "STYLE" + ".md", "shared" + "/", '"shared"',
            "REPO" + ".parent", "geoip-test" + "-data", "/" + "work/")


def _repository_text_files() -> list[Path]:
    out = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in _NOT_IN_A_CLONE or part.endswith(".egg-info") for part in rel.parts):
            continue
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a database or another binary file
        if "\0" not in text:
            out.append(path)
    return out


def test_maxmind_test_databases_are_inside_the_repository() -> None:
    """The MaxMind test databases the geo tests read are repository files, with their licence."""
    assert TEST_GEO.resolve().is_relative_to(REPO)
    expected = {"GeoIP2-Country-Test.mmdb": "GeoIP2-Country",
                "GeoLite2-ASN-Test.mmdb": "GeoLite2-ASN",
                "GeoIP2-Anonymous-IP-Test.mmdb": "GeoIP2-Anonymous-IP"}
    for name, database_type in expected.items():
        with maxminddb.open_database(str(TEST_GEO / name)) as reader:
            assert reader.metadata().database_type == database_type
    for name in ("LICENSE-APACHE", "LICENSE-MIT", "README.md"):
        assert (TEST_GEO / name).stat().st_size > 0


def test_no_file_reads_or_cites_a_path_outside_the_repository() -> None:
    """No text file of the repository names a document or folder outside it (docs/architecture.md
    is the design document it cites)."""
    files = _repository_text_files()
    assert len(files) > 50
    me = Path(__file__).resolve()
    found = [f"{p.relative_to(REPO)}:{n}: {word}"
             for p in files if p.resolve() != me
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             for word in _OUTSIDE if word in line]
    assert not found, "\n".join(found)
    assert (REPO / "docs" / "architecture.md").is_file()


def test_links_into_the_architecture_document_resolve() -> None:
    """Every `architecture.md#anchor` link in the repository names a heading of that document."""
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    anchors = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
               for line in doc.splitlines() if line.startswith("#")}
    links = [(p, m.group(1)) for p in _repository_text_files() if p.suffix == ".md"
             for m in re.finditer(r"architecture\.md#([a-z0-9-]+)", p.read_text(encoding="utf-8"))]
    own = REPO / "docs" / "architecture.md"
    links += [(own, a) for a in re.findall(r"\]\(#([a-z0-9-]+)\)", doc)]
    assert len(links) > 20
    broken = [f"{p.relative_to(REPO)}: #{a}" for p, a in links if a not in anchors]
    assert not broken, broken

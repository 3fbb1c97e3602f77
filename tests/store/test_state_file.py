"""The embedded store's state file: parsing, the audit and usage files' cut-short lines and
compaction, the ledger across a restart, and an addition that cannot be written."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.store.base import MODELS_PER_DAY, OTHER_MODEL, Tally, UsageKey, UsageNotAdded
from gateway.store.memory import MemoryStore
from gateway.store.state_file import StateFile, StateFileError, dump_state, parse_state


def test_parse_state_names_what_is_wrong() -> None:
    """A document that is not JSON, not a state file or malformed is a ValueError saying so."""
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_state("{")
    with pytest.raises(ValueError, match="not a gateway state file"):
        parse_state('{"keys": {}}')
    good = json.loads(dump_state({}, {}, 3, None))
    assert parse_state(json.dumps(good)).keys_epoch == 3
    good["keys"] = {"k": {"key_id": "k", "colour": "red"}}
    with pytest.raises(ValueError, match="malformed"):
        parse_state(json.dumps(good))


def test_audit_line_cut_short_by_a_crash_is_dropped_and_repaired(tmp_path: Path) -> None:
    """An audit file whose last line was cut short loads the whole lines, and is rewritten
    without the fragment so the next append starts on a line of its own."""
    path = tmp_path / "state.json"
    audit = tmp_path / "state.json.audit"
    audit.write_text('{"time": 1, "action": "a"}\n{"time": 2, "act')
    f = StateFile(str(path))
    state = f.open(100)
    f.close()
    assert state.audit == [{"time": 1, "action": "a"}]
    assert audit.read_text() == '{"time": 1, "action": "a"}\n'


def test_corrupt_audit_line_is_a_startup_error(tmp_path: Path) -> None:
    """A line that is not JSON in the middle of the audit file is a StateFileError naming it."""
    (tmp_path / "state.json.audit").write_text('{"time": 1}\nnot json\n{"time": 2}\n')
    with pytest.raises(StateFileError, match="line 2"):
        StateFile(str(tmp_path / "state.json")).open(100)


async def test_audit_file_is_compacted_to_the_bound(tmp_path: Path) -> None:
    """The audit file is rewritten with the kept events once it holds more than twice the
    bound, and a restart loads the newest `audit_maxlen` events."""
    path = str(tmp_path / "state.json")
    store = MemoryStore(path)
    store.audit_maxlen = 3
    for i in range(8):
        await store.append_audit({"time": float(i), "actor": "t", "action": "a", "target": "x"})
    await store.close()
    lines = (tmp_path / "state.json.audit").read_text().splitlines()
    assert len(lines) <= 2 * 3 + 1
    again = MemoryStore(path)
    events = await again.list_audit(None, 100)
    await again.close()
    assert [e["time"] for e in events][-3:] == [5.0, 6.0, 7.0]


# --- the usage file ---------------------------------------------------------------------------


TODAY = datetime.now(UTC).date().isoformat()  # one day for the module, across midnight too


def _today() -> str:
    return TODAY


def _cell(key_id: str = "k1", model: str = "m") -> UsageKey:
    return UsageKey(_today(), "acme", key_id, None, model)


async def test_the_ledger_survives_a_restart(tmp_path: Path) -> None:
    """Additions to the ledger are in the usage file: a store opened on it afterwards answers
    the same cells and totals, and keeps the models-per-day bound."""
    path = str(tmp_path / "state.json")
    store = MemoryStore(path)
    await store.add_usage({_cell(model=f"m{i}"): Tally(1, 2, 3)
                           for i in range(MODELS_PER_DAY)}, 400)
    await store.add_usage({_cell("k2"): Tally(4, 5, 6)}, 400)
    rows = await store.query_usage(_today(), _today())
    use = await store.period_use({"acme": ["reseller:acme", "key:k1", "key:k2"]}, _today())
    await store.close()
    again = MemoryStore(path)
    assert await again.query_usage(_today(), _today()) == rows
    assert await again.period_use({"acme": ["reseller:acme", "key:k1", "key:k2"]}, _today()) == use
    await again.add_usage({_cell(model="late"): Tally(1)}, 400)
    late = await again.query_usage(_today(), _today(), key_id="k1")
    assert {r.model for r in late} == {f"m{i}" for i in range(MODELS_PER_DAY)} | {OTHER_MODEL}
    await again.close()


async def test_the_usage_file_is_compacted_to_a_snapshot(tmp_path: Path) -> None:
    """Past `usage_compact_lines` additions the usage file is rewritten as one snapshot line,
    from which a restart loads the same ledger."""
    path = str(tmp_path / "state.json")
    store = MemoryStore(path)
    store.usage_compact_lines = 3
    for i in range(10):
        await store.add_usage({_cell(f"k{i % 4}"): Tally(1, i, 0)}, 400)
    rows = await store.query_usage(_today(), _today())
    await store.close()
    lines = (tmp_path / "state.json.usage").read_text().splitlines()
    assert len(lines) <= 4 and any("snapshot" in json.loads(line) for line in lines)
    again = MemoryStore(path)
    assert await again.query_usage(_today(), _today()) == rows
    assert sum(r.requests for r in rows) == 10
    await again.close()


def test_usage_line_cut_short_by_a_crash_is_dropped(tmp_path: Path) -> None:
    """A usage file whose last line was cut short loads the whole lines and is rewritten as
    their snapshot, so the next addition starts on a line of its own."""
    usage = tmp_path / "state.json.usage"
    whole = json.dumps({"t": 1e9, "retention_days": 400, "cells": [
        [_today(), "acme", "k1", None, "m", 1, 2, 3]]})
    usage.write_text(whole + "\n" + whole[:20])
    f = StateFile(str(tmp_path / "state.json"))
    state = f.open(100)
    f.close()
    assert [r.requests for r in state.ledger.query(_today(), _today(), None, None, None,
                                                   1e9)] == [1]
    text = usage.read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 1


def test_malformed_usage_line_is_a_startup_error(tmp_path: Path) -> None:
    """A usage line that is not an addition or a snapshot is a StateFileError naming it."""
    (tmp_path / "state.json.usage").write_text('{"t": 1, "cells": []}\n{"t": 1}\n')
    with pytest.raises(StateFileError, match=r"usage file .* line 1"):
        StateFile(str(tmp_path / "state.json")).open(100)


async def test_an_addition_that_cannot_be_written_is_not_kept(tmp_path: Path) -> None:
    """When the usage file cannot be written, add_usage raises UsageNotAdded naming the
    resellers and the ledger holds none of the addition."""
    folder = tmp_path / "state"
    folder.mkdir()
    store = MemoryStore(str(folder / "state.json"))
    for p in folder.iterdir():
        p.unlink()
    os.rmdir(folder)
    beta = UsageKey(_today(), "beta", "k9", None, "m")
    with pytest.raises(UsageNotAdded, match="usage file") as caught:
        await store.add_usage({_cell(): Tally(1), beta: Tally(1)}, 400)
    assert caught.value.resellers == {"acme", "beta"}
    assert await store.query_usage(_today(), _today()) == []
    use = await store.period_use({"acme": ["reseller:acme"]}, _today())
    assert use["reseller:acme"].month == Tally()
    await store.close()

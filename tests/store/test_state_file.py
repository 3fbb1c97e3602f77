"""The embedded store's state file: parsing, the audit file's cut-short line and compaction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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

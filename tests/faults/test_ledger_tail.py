"""The oracle's own reader: ``LedgerTail`` follows ledger files as they grow (partial last lines, new
files, running counts) and agrees with a full read. A bug here would hide the failures the fault
suites look for."""

from __future__ import annotations

import json
from pathlib import Path

from _faultlib import Ledger, LedgerTail


def _line(phase: str, message_id: str) -> bytes:
    return (json.dumps({"phase": phase, "id": message_id, "pid": 1, "t": 0.0}) + "\n").encode()


def test_a_partial_last_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "ledger-1.jsonl"
    whole = _line("effect", "a")
    path.write_bytes(_line("start", "a") + whole[:10])
    tail = LedgerTail(tmp_path)
    assert [r["phase"] for r in tail.read_new()] == ["start"]
    assert tail.effects["a"] == 0
    with path.open("ab") as out:
        out.write(whole[10:])
    assert [r["phase"] for r in tail.read_new()] == ["effect"]
    assert tail.read_new() == []  # nothing new: nothing returned, nothing counted twice
    assert tail.effects["a"] == 1


def test_new_files_and_running_counts_match_a_full_read(tmp_path: Path) -> None:
    tail = LedgerTail(tmp_path)
    (tmp_path / "ledger-1.jsonl").write_bytes(_line("effect", "a") + _line("effect", "b"))
    tail.read_new()
    (tmp_path / "ledger-2.jsonl").write_bytes(_line("takeover", "a") + _line("effect", "a"))
    with (tmp_path / "ledger-1.jsonl").open("ab") as out:
        out.write(_line("effect", "b"))
    tail.read_new()
    assert tail.effects == {"a": 2, "b": 2}
    assert tail.takeovers == {"a": 1}
    assert tail.duplicate_executions() == 2
    assert tail.uncounted_duplicates() == {"b": (2, 0)}  # b ran twice without a takeover: caught
    full = Ledger.read(tmp_path)
    assert full.effect_counts() == tail.effects
    assert full.takeovers() == sum(tail.takeovers.values())


def test_files_that_are_not_ledgers_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not json\n")
    (tmp_path / "ledger-9.jsonl").write_bytes(_line("effect", "z"))
    tail = LedgerTail(tmp_path)
    assert [r["id"] for r in tail.read_new()] == ["z"]

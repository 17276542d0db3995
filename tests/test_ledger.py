"""The ledger contract: one writer per file, readers that survive what live shared files do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kit.ledger import EVENTS, SCHEMA_VERSION, LedgerReader, LedgerWriter, read_all


def test_writer_emits_versioned_events_and_checks_schema(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path, "train-r0", seg="42_0") as w:
        e = w.emit("step", step=1, loss=2.5, lr=1e-3)
        with pytest.raises(ValueError, match="missing"):
            w.emit("step", step=2)
        with pytest.raises(ValueError, match="unknown ledger event kind"):
            w.emit("stepp", step=2, loss=1.0)
    line = json.loads((tmp_path / "ledger" / "train-r0.jsonl").read_text())
    assert line == e
    assert line["v"] == SCHEMA_VERSION and line["src"] == "train-r0" and line["seg"] == "42_0"


def test_reader_follows_torn_lines_and_new_files(tmp_path: Path) -> None:
    (tmp_path / "ledger").mkdir()
    f = tmp_path / "ledger" / "a.jsonl"
    r = LedgerReader(tmp_path)
    assert r.poll() == []
    f.write_bytes(b'{"v":1,"t":1.0,"kind":"step","step":1,"loss":1.0}\n{"v":1,"t":2.0,"ki')
    assert [e["step"] for e in r.poll()] == [1]
    with open(f, "ab") as fh:  # the writer completes the line later
        fh.write(b'nd":"step","step":2,"loss":0.5}\n')
    assert [e["step"] for e in r.poll()] == [2]
    (tmp_path / "ledger" / "b.jsonl").write_text('{"v":1,"t":1.5,"kind":"alert","severity":"info","message":"x"}\n')
    assert [e["kind"] for e in r.poll()] == ["alert"]
    assert r.poll() == []


def test_reader_counts_garbage_unknown_and_future_events(tmp_path: Path) -> None:
    (tmp_path / "ledger").mkdir()
    lines = [
        b'{"v":1,"t":1,"kind":"step","step":1,"loss":1}',
        b"\x00\xff\xfebinary junk",
        b"not json at all",
        b'["a list"]',
        b'{"v":1,"t":2,"kind":"quantum_flux","x":1}',
        b'{"v":99,"t":3,"kind":"step","step":2,"loss":1,"new_field":true}',
        b"{" + b'"x":' * 10 + b"1",
        b"",
    ]
    (tmp_path / "ledger" / "w.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    r = LedgerReader(tmp_path)
    events = r.poll()
    assert [e["kind"] for e in events] == ["step", "quantum_flux", "step"]
    assert r.stats.bad_lines == 4
    assert r.stats.unknown_kinds == 1
    assert r.stats.future_version == 1


def test_reader_survives_truncation_deletion_and_huge_lines(tmp_path: Path) -> None:
    (tmp_path / "ledger").mkdir()
    f = tmp_path / "ledger" / "w.jsonl"
    f.write_text('{"v":1,"t":1,"kind":"step","step":1,"loss":1}\n' * 3)
    r = LedgerReader(tmp_path)
    assert len(r.poll()) == 3
    f.write_text('{"v":1,"t":5,"kind":"step","step":9,"loss":1}\n')  # rotated: smaller, new content
    assert [e["step"] for e in r.poll()] == [9]
    f.unlink()
    assert r.poll() == []
    assert r.stats.vanished_files == 1
    f.write_bytes(b"x" * (3 << 20) + b"\n" + b'{"v":1,"t":6,"kind":"step","step":10,"loss":1}\n')
    assert [e["step"] for e in r.poll()] == [10]
    assert r.stats.bad_lines == 1


def test_new_writer_repairs_a_torn_tail(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path, "train-r0") as w:
        w.emit("step", step=1, loss=1.0)
    p = tmp_path / "ledger" / "train-r0.jsonl"
    with open(p, "ab") as fh:  # a writer SIGKILLed in the middle of a line
        fh.write(b'{"v":1,"t":2,"kind":"st')
    with LedgerWriter(tmp_path, "train-r0") as w:
        w.emit("step", step=2, loss=0.5)
    events = read_all(tmp_path)
    assert [e["step"] for e in events] == [1, 2]


def test_events_are_merged_across_writers_by_time(tmp_path: Path) -> None:
    a = LedgerWriter(tmp_path, "train-r0")
    b = LedgerWriter(tmp_path, "health-node1")
    a.emit("step", step=1, loss=1.0)
    b.emit("health", node="node1")
    a.emit("step", step=2, loss=1.0)
    a.close()
    b.close()
    assert [e["kind"] for e in read_all(tmp_path)] == ["step", "health", "step"]
    assert sorted(p.name for p in (tmp_path / "ledger").glob("*.jsonl")) == ["health-node1.jsonl", "train-r0.jsonl"]


def test_schema_has_required_fields_for_every_kind() -> None:
    assert all(isinstance(v, tuple) for v in EVENTS.values())
    assert {"step", "ckpt_saved", "segment_started", "segment_ended", "alert", "control_ack"} <= set(EVENTS)

"""The run contract: the typed schema, the one reader, the index beside each file.

Property-based (hypothesis): any line, any bytes, any JSON value in any field never raises; what the
reader hands out always conforms to the schema; good lines around bad ones are all read; reading a
run through the writer's index gives exactly what parsing every line gives, whatever happened to the
files (killed writers, torn index records, a rewritten file, an index from another kit).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit.ledger import KINDS, SCHEMA_VERSION, LedgerWriter, ReadStats, parse_line, read_all, tail
from kit.ledger import index as ix
from kit.ledger.reader import nonconforming
from kit.ledger.scan import latest_wins, scan, surviving
from kit.ledger.schema import END_REASONS, KIND_CODES, MAX_STR, STEP_METRICS

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.integers(min_value=10**300, max_value=10**400),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=20)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def conforms(e: dict[str, Any]) -> bool:
    """What the contract promises about an event a reader hands out."""
    if not isinstance(e["t"], float) or not math.isfinite(e["t"]) or not isinstance(e["kind"], str):
        return False
    spec = KINDS.get(e["kind"])
    if spec is None:
        return True
    return all(f.name in e for f in spec.fields if f.required) and not nonconforming(e)


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_never_raise(raw: bytes) -> None:
    stats = ReadStats()
    e = parse_line(raw, stats)
    assert e is None or conforms(e)


@SETTINGS
@given(st.sampled_from(sorted(KINDS)), st.dictionaries(st.text(max_size=12), json_values, max_size=6),
       st.sampled_from(["", "step", "loss", "t", "tag", "node", "severity", "gpus", "seg", "v"]), json_values)
def test_any_json_value_in_any_field_never_raises_and_what_is_read_conforms(
        kind: str, extra: dict[str, Any], name: str, value: Any) -> None:
    event: dict[str, Any] = {"v": 2, "t": 5.0, "kind": kind, **extra}
    if name:
        event[name] = value
    try:
        raw = json.dumps(event, allow_nan=True).encode()
    except (ValueError, RecursionError):
        return
    e = parse_line(raw, ReadStats())
    assert e is None or conforms(e)


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=60), st.just(b"good")), max_size=30))
def test_good_lines_around_bad_ones_are_all_read(tmp_path_factory: Any, lines: list[bytes]) -> None:
    run = tmp_path_factory.mktemp("r")
    (run / "ledger").mkdir()
    good = 0
    out = []
    for raw in lines:
        if raw == b"good":
            good += 1
            out.append(json.dumps({"v": 2, "t": float(good), "kind": "step", "step": good, "loss": 1.0}).encode())
        else:
            out.append(raw.replace(b"\n", b" ").replace(b'"kind"', b"kind"))  # junk that is never an event
    (run / "ledger" / "w.jsonl").write_bytes(b"\n".join(out) + b"\n")
    assert [e["step"] for e in read_all(run)] == list(range(1, good + 1))
    assert [int(s) for s in scan(run).steps["step"]] == list(range(1, good + 1))


def test_the_damaged_values_the_operators_met() -> None:
    """400-digit integers, null or string timestamps, Infinity step times, lists for strings, deep
    nesting: made missing (or the event dropped), counted, never raised."""
    stats = ReadStats()
    big = "9" * 400
    lines = [
        f'{{"v":1,"t":1.0,"kind":"step","step":1,"loss":1.0,"tokens_per_s":{big}}}',
        '{"v":1,"t":null,"kind":"step","step":2,"loss":1.0}',
        '{"v":1,"t":"yesterday","kind":"step","step":3,"loss":1.0}',
        '{"v":1,"t":4.0,"kind":"step","step":4,"loss":1.0,"step_time":Infinity}',
        '{"v":1,"t":5.0,"kind":"segment_ended","reason":["done"],"step":5}',
        '{"v":1,"t":6.0,"kind":"alert","severity":"info","message":"x","node":' + "[" * 40 + "]" * 40 + "}",
        '{"v":1,"t":7.0,"kind":"step","step":null,"loss":1.0}',
        '{"v":1,"t":8.0,"kind":"step","step":' + big + ',"loss":1.0}',
        '{"v":1,"t":9.0,"kind":"step","step":9,"loss":NaN}',
        '[' * 100000 + ']' * 100000,
    ]
    got = [parse_line(x.encode(), stats) for x in lines]
    assert got[0] is not None and "tokens_per_s" not in got[0]
    assert got[1] is None and got[2] is None  # no usable time: dropped
    assert got[3] is not None and "step_time" not in got[3]
    assert got[4] is None  # a list where the reason belongs: the required field is unusable
    assert got[5] is not None and "node" not in got[5]
    assert got[6] is None and got[7] is None
    assert got[8] is not None and math.isnan(got[8]["loss"])  # a NaN loss is a fact worth keeping
    assert got[9] is None
    assert stats.invalid_events == 5 and stats.coerced >= 4 and stats.bad_lines == 1


def test_writer_checks_types_loudly_in_tests_and_writes_null_in_production(tmp_path: Path,
                                                                          monkeypatch: Any) -> None:
    from kit.ledger import writer

    monkeypatch.setattr(writer, "STRICT", True)
    with LedgerWriter(tmp_path, "w") as w:
        try:
            w.emit("step", step=1, loss=1.0, tokens_per_s="fast")
        except ValueError as e:
            assert "tokens_per_s" in str(e)
        else:
            raise AssertionError("a nonconforming field must raise in strict mode")
        monkeypatch.setattr(writer, "STRICT", False)
        e = w.emit("step", step=1, loss=1.0, tokens_per_s="fast", mfu=float("inf"))
        assert e["tokens_per_s"] is None and e["mfu"] is None
    assert read_all(tmp_path)[0]["step"] == 1


def test_kind_codes_only_grow() -> None:
    """The index stores kinds as codes: a code must never change meaning (append new kinds at the end)."""
    first = ("run_created", "chain_submitted", "segment_started", "segment_signalled", "segment_ended",
             "chain_requeued", "chain_ended", "allocation_started", "allocation_ended", "node_excluded", "step",
             "data_ready", "data_skipped", "ckpt_saved", "ckpt_loaded", "ckpt_deleted", "ckpt_verified",
             "ckpt_converted", "ckpt_uploaded", "ckpt_reshaped", "health", "nvml_absent", "hang", "straggler",
             "rank_timings", "spike", "rollback", "alert", "alert_ack", "control_ack", "doctor")
    assert KIND_CODES[:len(first)] == first
    assert SCHEMA_VERSION >= 2 and MAX_STR >= 4096


def test_one_vocabulary_of_end_reasons() -> None:
    from kit import exitcodes
    from kit.jobs import chain

    for r in END_REASONS:
        assert exitcodes.REASONS[r.name] == r.exit_code
        assert chain.classify(r.name, r.exit_code) == r.outcome
    assert chain.classify("something new", 1) == chain.CRASH


# ------------------------------------------------------------------------------------------ index


def write_run(run: Path, rng: random.Random, steps: int = 300) -> None:
    """Events of every common kind through the writer, over a few segments (new writers reopen files)."""
    step = 0
    for seg in range(3):
        with LedgerWriter(run, "train-r0", seg=f"s{seg}") as w, LedgerWriter(run, "health-n1") as h:
            w.emit("segment_started", world_size=2, step=step, max_steps=10_000)
            for _ in range(steps):
                step += 1
                w.emit("step", step=step, loss=rng.random(), grad_norm=rng.choice([rng.random(), None]),
                       tokens_per_s=1000.0 * rng.random(), step_time=0.1, consumed=step * 8, samples=8,
                       nonfinite=False, spike=rng.choice([None, None, "loss"]))
                if step % 50 == 0:
                    w.emit("ckpt_saved", step=step, tag=f"step_{step:07d}", bytes=100, seconds=1.5)
                    h.emit("health", node="n1", gpus=[{"index": 0, "temp_c": 50}], host={"mem_pct": 3.0})
                if step % 97 == 0:
                    w.alert("warning", f"alert {step}")
            if seg == 1:
                step -= 40  # a rollback replays steps
                w.emit("rollback", from_step=step + 40, to_step=step)


def same_scan(run: Path) -> None:
    fast, slow = scan(run), scan(run, use_index=False)
    assert fast.indexed_bytes > 0 and slow.indexed_bytes == 0
    for name in fast.steps.dtype.names or ():
        a, b = fast.steps[name], slow.steps[name]
        assert np.array_equal(a, b, equal_nan=True), name
    assert [e["t"] for e in fast.events] == [e["t"] for e in slow.events]
    assert fast.events == slow.events
    assert np.array_equal(fast.bulk, slow.bulk)
    assert fast.latest == slow.latest and fast.cursors == slow.cursors
    assert (fast.stats.events, fast.stats.bad_lines) == (slow.stats.events, slow.stats.bad_lines)
    everything = read_all(run)
    assert len(fast.steps) == sum(e["kind"] == "step" for e in everything)


def test_scan_through_the_index_equals_parsing_every_line(tmp_path: Path) -> None:
    write_run(tmp_path, random.Random(1))
    same_scan(tmp_path)
    s = scan(tmp_path)
    assert s.parsed_bytes == 0  # everything came from the index
    assert len(s.fetch({"health"})) == len(read_all(tmp_path, {"health"}))
    rows = np.arange(len(s.steps))[-3:]
    assert [e["step"] for e in s.step_detail(rows)] == s.steps["step"][rows].astype(int).tolist()


def test_the_index_survives_what_happens_to_files(tmp_path: Path) -> None:
    rng = random.Random(2)
    write_run(tmp_path, rng, steps=120)
    led = tmp_path / "ledger" / "train-r0.jsonl"
    steps_idx, _events_idx = ix.index_paths(led.parent, led.name)
    # a writer killed between its line and its index record, and mid-line afterwards
    with LedgerWriter(tmp_path, "train-r0", seg="k", index=False) as w:
        w.emit("step", step=999, loss=1.0)
    with open(led, "ab") as f:
        f.write(b'{"v":2,"t":1e10,"kind":"st')
    same_scan(tmp_path)
    # a torn index record
    with open(steps_idx, "ab") as f:
        f.write(b"\x01\x02\x03")
    same_scan(tmp_path)
    # a new writer repairs the torn line, indexes what was missing, and appends
    with LedgerWriter(tmp_path, "train-r0", seg="again") as w:
        w.emit("step", step=1000, loss=0.5)
    s = scan(tmp_path)
    assert s.parsed_bytes == 0 and int(s.steps["step"][-1]) == 1000
    same_scan(tmp_path)
    # the file rewritten in place under the index (same inode, other offsets): the index is not trusted
    lines = led.read_bytes().split(b"\n")
    lines.insert(5, b'{"v":2,"t":3.5,"kind":"alert","severity":"info","message":"inserted by hand"}')
    led.write_bytes(b"\n".join(lines))
    s = scan(tmp_path)
    assert s.indexed_bytes < os.path.getsize(led) and any(e.get("message") == "inserted by hand" for e in s.events)
    same_scan(tmp_path)
    # an index written by a kit with other columns: ignored, and a new writer starts a new one
    raw = bytearray(steps_idx.read_bytes())
    raw[ix.HEADER - 50: ix.HEADER - 40] = b'"x":1     '[:10]
    steps_idx.write_bytes(bytes(raw))
    same_scan(tmp_path)


def test_old_ledgers_without_an_index_are_read_and_continued(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path, "train-r0", index=False) as w:
        for s in range(1, 51):
            w.emit("step", step=s, loss=1.0 / s)
    with LedgerWriter(tmp_path, "train-r0") as w:  # a newer kit: its index starts where the file was
        for s in range(51, 101):
            w.emit("step", step=s, loss=1.0 / s)
    s = scan(tmp_path)
    assert s.indexed_bytes > 0 and s.parsed_bytes > 0
    assert s.steps["step"].astype(int).tolist() == list(range(1, 101))
    same_scan(tmp_path)


def test_replay_rules() -> None:
    timeline = np.array([1, 2, 3, 4, 5, 3, 4, 5, 6, 2, 3], dtype=float)
    assert timeline[surviving(timeline)].tolist() == [1, 2, 3]
    assert timeline[latest_wins(timeline)].tolist() == [1, 2, 3, 4, 5, 6]
    assert latest_wins(timeline).tolist() == [0, 9, 10, 6, 7, 8]


def test_tail_reads_only_the_end(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path, "train-r0") as w:
        for s in range(1, 5001):
            w.emit("step", step=s, loss=1.0)
        w.emit("ckpt_saved", step=5000, tag="step_0005000", bytes=1, seconds=1.0)
    got = tail(tmp_path, {"step", "ckpt_saved"}, max_bytes=20_000)
    assert 50 < len(got) < 400 and got[-1]["kind"] == "ckpt_saved" and got[-2]["step"] == 5000


def test_step_metrics_are_one_table() -> None:
    from kit.metrics import TB_TAGS
    from kit.run.model import PLOTTED

    assert set(PLOTTED) <= {m.name for m in STEP_METRICS} and TB_TAGS["loss"] == "train/loss"
    assert set(ix.COLUMNS[3:]) <= {m.name for m in STEP_METRICS}


def test_the_ledger_tables_in_the_docs_are_generated_and_current() -> None:
    from kit.docgen import BEGIN, END, render_ledger

    text = (Path(__file__).resolve().parent.parent / "docs" / "run-directory.md").read_text()
    current = text[text.index(BEGIN): text.index(END) + len(END)]
    assert current == render_ledger(), "regenerate with: python -m kit.docgen --ledger"

"""The monitor on ledgers that live shared filesystems and buggy writers produce.

Garbage and binary junk, torn and huge lines, unknown kinds, a future schema version, fields of the
wrong type, files truncated, rotated or deleted while followed: the follower counts and skips, the
model turns junk into N/A, the app keeps running and says what it skipped. Files are written with
the ledger's own writer where the event is valid, and raw bytes where it is not.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import test_monitor_support as support
from test_monitor_support import append, event, wait_for

from kit.ledger import Follower, LedgerWriter, ReadStats, merged, read_all
from kit.monitor.app import loaded, make_app
from kit.monitor.feed import Feed
from kit.monitor.widgets import HealthTable
from kit.run.gpus import parse_health
from kit.run.model import RunModel
from kit.run.series import Curves

fixed_run = support.fixed_run


def junk_run(tmp_path: Path) -> Path:
    run = tmp_path / "junk"
    (run / "ledger").mkdir(parents=True)
    with LedgerWriter(run, "train-r0", seg="s1") as w:
        w.emit("segment_started", world_size=1, step=0, max_steps=100)
        w.emit("step", step=1, loss=3.0, tokens_per_s=100.0)
    append(run, "train-r0", b"this is not json\n{\"kind\": 5}\n[1,2,3]\n")
    append(run, "train-r0", bytes(random.Random(0).randrange(256) for _ in range(20000)) + b"\n")
    append(run, "train-r0", b"{" + b"x" * (2 << 20) + b"}\n")  # a 2 MiB line
    append(run, "train-r0", event("quantum_flux", t=1.0, level=3))  # a kind from a newer kit
    append(run, "train-r0", event("step", v=99, step=2, loss=2.5, new_field={"a": 1}))  # future version
    append(run, "train-r0", event("step", step="three", loss="abc"))  # wrong types
    append(run, "health-n1", event("health", node="n1", gpus="zzz"))
    append(run, "health-n2", event("health", node="n2", gpus=[1, None, {"temp_c": "hot", "util_pct": 50}]))
    append(run, "health-n3", event("alert", severity=5, message=None))
    append(run, "health-n3", event("ckpt_saved", step=None, tag=None, bytes="big", seconds=[]))
    append(run, "train-r0", '{"v":1,"t":')  # a torn last line: the writer is mid-write
    return run


def test_follower_counts_and_skips_junk_and_completes_torn_lines(tmp_path: Path) -> None:
    run = junk_run(tmp_path)
    f = Follower(run / "ledger")
    events, more = f.poll()
    kinds = [e["kind"] for e in events]
    assert not more and kinds.count("step") == 2 and "quantum_flux" in kinds  # step "three" is dropped
    st = f.stats
    assert st.bad_lines >= 5 and st.unknown_kinds == 1 and st.future_version == 1 and st.invalid_events == 3
    assert st.torn_tail == 1  # the writer is mid-line
    append(run, "train-r0", '1.0,"kind":"step","src":"x","step":4,"loss":1.0}\n')  # the torn line completes
    events, _ = f.poll()
    assert [(e["kind"], e["step"]) for e in events] == [("step", 4)]
    (run / "ledger" / "health-n1.jsonl").unlink()
    os.truncate(run / "ledger" / "train-r0.jsonl", 0)  # rotated/truncated under the reader
    with LedgerWriter(run, "train-r0") as w:
        w.emit("step", step=5, loss=0.5)
    events, _ = f.poll()
    assert st.vanished_files == 1 and st.truncated_files == 1 and [e["step"] for e in events] == [5]


def test_model_turns_wrong_fields_into_na(tmp_path: Path) -> None:
    """The reader drops events whose required fields are junk (step "three", an alert with severity
    5, a checkpoint with no tag) and makes optional junk fields missing (gpus "zzz"): counted, shown."""
    run = junk_run(tmp_path)
    feed = Feed(run, use_slurm=False)
    feed.open()
    feed.work()
    snap = feed.snapshot()
    m = feed.model
    assert m.step == 2  # "three" is no step; the future-version step 2 is shown
    assert snap.summary["loss"] == 2.5 and snap.summary["reader"]["unknown"] == {"quantum_flux": 1}
    assert snap.summary["reader"]["invalid_events"] == 3 and snap.summary["reader"]["coerced"] >= 3
    assert [g.temp for _, g, _ in snap.health] == [None] and snap.health[0][1].util == 50.0
    assert snap.alerts == [] and not m.ckpts
    assert parse_health("n", 1.0, {"gpus": [{"xid": [79], "lost": True}]}).gpus[0].problems() == ["lost", "xid"]


async def test_app_keeps_running_and_says_what_it_skipped(fixed_run: Path) -> None:
    app = make_app([fixed_run], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        append(fixed_run, "train-r0", b"\x00\xff garbage\n" + os.urandom(5000) + b"\n")
        append(fixed_run, "stream", event("from_the_future", v=7))
        (fixed_run / "ledger" / "health-node02.jsonl").unlink()
        with LedgerWriter(fixed_run, "train-r0", seg="seg3") as w:
            w.emit("step", step=9, loss=1.5)
        await wait_for(pilot, lambda: app.snaps[0].summary["step"] == 9, timeout=15, what="step after junk")
        status = str(app.query_one("#statusline").render())
        assert "skipped:" in status and "bad lines" in status and "unknown kinds" in status
        assert "vanished files" in status
        await pilot.press("2")
        assert app.query_one(HealthTable).row_count >= 1  # the health shown stays (last sample seen)


def test_series_stay_bounded_and_replayed_steps_win() -> None:
    s = Curves(["a", "b"], capacity=64, recent=100)
    for step in range(1, 100_001):
        s.add(step, float(step), [1.0, None if step % 2 else 3.0])
    assert len(s) <= 64 and sum(c[0] for c in s.counts) == 100_000 and s.stride >= 100_000 // 64
    assert sum(c[1] for c in s.counts) == 50_000 and set(s.whole("b")[1]) == {3.0} and len(s.recent) == 100
    m = Curves(["loss"], capacity=64, recent=100)
    for step in range(1, 201):
        m.add(step, float(step), [5.0])
    for step in range(150, 171):  # a rollback to 150 replays 150..170 with other values
        m.add(step, 1000.0 + step, [1.0])
    xs, ys = m.raw("loss")
    assert xs[-1] == 170 and ys[-21:] == [1.0] * 21 and ys[-22] == 5.0 and xs[0] == 101
    wx, _, lows = m.whole("loss")
    assert wx[-1] == 170 and lows[-1] == 1.0 and m.last_step == 170
    assert m.window("loss", since_t=1000.0)[0] == list(range(150, 171))  # the hour after the rollback


def test_model_memory_is_bounded() -> None:
    m = RunModel("big")
    for step in range(1, 50_001):
        m.fold({"v": 1, "t": float(step), "kind": "step", "step": step, "loss": 1.0, "tokens_per_s": 5.0})
        if step % 10 == 0:
            m.fold({"v": 1, "t": float(step), "kind": "alert", "severity": "info", "message": "x"})
            m.fold({"v": 1, "t": float(step), "kind": "ckpt_saved", "step": step, "tag": f"s{step}", "bytes": 1,
                    "seconds": 1})
    assert len(m.curves) <= 2048 and len(m.curves.recent) <= 4096
    assert len(m.alerts) <= 500 and len(m.ckpts) <= 200


def synthetic(run: Path, steps: int) -> None:
    """A run with a rollback, scattered checkpoints and alerts, and health files, via the writer."""
    (run / "ledger").mkdir(parents=True)
    with LedgerWriter(run, "train-r0", seg="a") as w:
        w.emit("segment_started", world_size=8, step=0, max_steps=steps + 1000)
        for step in range(1, steps + 1):
            w.emit("step", step=step, loss=10.0 / step, tokens_per_s=1000.0 + step % 7, step_time=0.5)
            if step % 500 == 0:
                w.emit("ckpt_saved", step=step, tag=f"step_{step:07d}", bytes=10, seconds=1.0)
            if step % 777 == 0:
                w.alert("warning", f"alert at {step}")
            if step == steps - 300:
                w.emit("rollback", from_step=step, to_step=step - 200)
        for step in range(steps - 500, steps + 1):  # replayed after the rollback: these win
            w.emit("step", step=step, loss=1.0 + step, tokens_per_s=2000.0, step_time=0.5)
    for n in range(3):
        with LedgerWriter(run, f"health-n{n}") as w:
            for i in range(200):
                w.emit("health", node=f"n{n}", gpus=[{"index": 0, "temp_c": 40 + i % 30, "util_pct": 99}])


def test_cold_start_through_the_index_is_the_whole_history(tmp_path: Path) -> None:
    """The feed's first frame is the complete history (kit.ledger.scan through the writer's index):
    the same curves, checkpoints, alerts and counts as folding every event one by one."""
    run = tmp_path / "syn"
    synthetic(run, 6000)
    feed = Feed(run, use_slurm=False)
    feed.open()
    snap = feed.snapshot()
    events = read_all(run)
    assert snap.summary["step"] == 6000 and len(snap.health) == 3
    slow = RunModel("slow")
    slow.fold_all(events)
    for name in ("loss", "tokens_per_s"):  # bucket means: the same up to the order of the additions
        fast_x, fast_mean, fast_low = feed.model.curves.whole(name)
        slow_x, slow_mean, slow_low = slow.curves.whole(name)
        assert fast_x == slow_x and fast_low == slow_low and fast_mean == pytest.approx(slow_mean, rel=1e-12)
        assert feed.model.curves.raw(name) == slow.curves.raw(name)
    assert len(snap.ckpts) == len({e["tag"] for e in events if e["kind"] == "ckpt_saved"}) > 0
    assert len(snap.alerts) == sum(e["kind"] == "alert" for e in events) > 0
    assert snap.summary["reader"]["events"] == len(events) and snap.summary["reader"]["bad_lines"] == 0
    assert feed.model.kinds == slow.kinds
    with LedgerWriter(run, "train-r0", seg="b") as w:  # and it follows live from where the scan ended
        w.emit("step", step=6001, loss=0.1)
    feed.work()
    assert feed.snapshot().summary["step"] == 6001


def test_replay_merges_files_in_time_order(tmp_path: Path) -> None:
    run = tmp_path / "r"
    (run / "ledger").mkdir(parents=True)
    for name, ts in (("a", [1.0, 4.0, 6.0]), ("b", [2.0, 3.0, 5.0])):
        append(run, name, "".join(event("step", t=t, step=int(t), loss=1.0) for t in ts))
    append(run, "b", b"junk\n")
    assert [e["t"] for e in merged(run, ReadStats())] == [1, 2, 3, 4, 5, 6]
    assert json.loads(event("x", t=1.0))["t"] == 1.0


async def test_replay_in_the_app_is_read_only_and_reaches_the_end(fixed_run: Path) -> None:
    app = make_app([fixed_run], replay_speed=1000.0, use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: 0 in app.snaps and "(end)" in app.snaps[0].replay, what="end of replay")
        await wait_for(pilot, lambda: app.shown.get(0, (None, 0.0))[0] == 8, what="last step drawn")
        assert "replay x1000 (end)" in str(app.query_one("#statusline").render())
        await pilot.press("s")
        assert not (fixed_run / "control" / "save-now").exists() and app.read_only


def test_rollbacks_and_preflight_are_summarized(fixed_run: Path) -> None:
    append(fixed_run, "spikes", event("rollback", t=support.fixed_now() - 30, from_step=7, to_step=4))
    append(fixed_run, "doctor-node01", event("doctor", t=support.fixed_now() - 20, ok=False, checks=[]))
    feed = Feed(fixed_run, use_slurm=False, clock=support.fixed_now)
    feed.open()
    feed.work()
    s = feed.snapshot().summary
    assert s["rollbacks"]["count"] == 1 and (s["rollbacks"]["from_step"], s["rollbacks"]["to_step"]) == (7, 4)
    assert s["doctor"]["ok"] is False


def test_chain_events_of_kit_jobs(fixed_run: Path) -> None:
    """The chain driver's events (kit.jobs): allocations add job ids, excluded nodes are flagged, and
    how the chain ended sets the verdict."""
    now = support.fixed_now()
    append(fixed_run, "chain", event("allocation_started", t=now - 50, job_id="4242", nodes=["node01"]) +
           event("node_excluded", t=now - 40, node="node01", reason="crash in segment 4242_0") +
           event("chain_ended", t=now - 30, reason="crash_loop", job_id="4242"))
    feed = Feed(fixed_run, use_slurm=False, clock=support.fixed_now)
    feed.open()
    feed.work()
    snap = feed.snapshot()
    assert "4242" in feed.model.chain_jobs and snap.summary["excluded_nodes"] == ["node01"]
    assert snap.summary["status"] == "down" and "crash_loop" in snap.summary["reasons"][0]
    assert all(flagged for node, _, flagged in snap.health if node == "node01")
    append(fixed_run, "chain", event("chain_ended", t=now - 10, reason="max_segments"))
    feed.work()
    assert feed.snapshot().summary["status"] == "degraded"


def test_a_spike_reported_twice_is_one_spike(tmp_path: Path) -> None:
    """The trainer writes a `spike` event and flags the step event too: the monitor shows one."""
    with LedgerWriter(tmp_path, "train-r0") as w:
        w.emit("step", step=1, loss=2.0)
        w.emit("spike", step=2, loss=9.0, score=12.0)
        w.emit("step", step=2, loss=9.0, spike="loss")
        w.emit("spike", step=5, loss=8.0, score=10.0)
    feed = Feed(tmp_path, use_slurm=False)
    feed.open()
    feed.work()
    assert [s[0] for s in feed.model.spikes] == [2, 5]

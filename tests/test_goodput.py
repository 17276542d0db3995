"""The goodput account on ledgers written to the schema by kit's own writer with explicit times:
one test per category and per way an allocation is known, the exact sums, generated ledgers, the
live tracker, the CLI and the run summary. The real chain (crash, boundary, rollback) is in
tests/test_goodput_chain.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_monitor_support as support
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit.ledger import LedgerWriter, read_all
from kit.ledger.scan import scan
from kit.run.chainstate import ChainState, SegmentRecord
from kit.run.goodput import CATEGORIES, DAY_US, KINDS, US, Account, Inputs, Tracker, account, of_run
from kit.run.queue import AcctRecord

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
fixed_run = support.fixed_run  # a copy of the committed tiny run's ledger (tests/snapshots/monitor_run)


class Ledger:
    """A run's ledger written the way kit's writers write it, at chosen times (one writer per file)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writers: dict[str, LedgerWriter] = {}

    def emit(self, src: str, seg: str, kind: str, t: float, **fields: Any) -> None:
        w = self.writers.get(src) or self.writers.setdefault(src, LedgerWriter(self.root, src))
        w.emit(kind, t=T0 + t, seg=seg, **fields)

    def steps(self, seg: str, steps: range, t0: float, dt: float = 1.0, src: str = "train-r0") -> float:
        """Step events every dt seconds from t0 + dt; returns the last one's time."""
        t = t0
        for s in steps:
            t += dt
            self.emit(src, seg, "step", t, step=s, loss=2.0, step_time=dt)
        return t

    def raw(self, name: str, t: float, **event: Any) -> None:
        """An event of a kind this kit may not know yet (the eval engineer's), as a raw line."""
        with open(self.root / "ledger" / f"{name}.jsonl", "a") as f:
            f.write(json.dumps({"v": 2, "t": T0 + t, "src": name, **event}) + "\n")

    def account(self, chain: ChainState | None = None, history: tuple[AcctRecord, ...] = (),
                interval: int | None = 10, limit: float | None = 3600.0) -> Account:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
        acc = account(Inputs.from_scan(scan(self.root)), chain, history, interval_steps=interval,
                      time_limit_s=limit)
        assert_adds_up(acc)
        return acc


def assert_adds_up(acc: Account) -> None:
    """Per segment, per day and for the run: the parts are the allocated time, to the microsecond."""
    assert sum(acc.parts_us.values()) == acc.allocated_us
    assert all(v >= 0 for v in acc.parts_us.values()) and acc.queue_us >= 0
    assert sum(s.allocated_us for s in acc.segments) == acc.allocated_us
    for s in acc.segments:
        assert sum(s.parts_us.values()) == s.allocated_us == round(s.end * US) - round(s.start * US), s
        assert all(v >= 0 for v in s.parts_us.values())
    for d in acc.days:
        assert sum(d.parts_us.values()) == d.allocated_us
    if len(acc.days) < 1000:
        assert sum(d.allocated_us for d in acc.days) == acc.allocated_us
        assert sum(d.queue_us for d in acc.days) == acc.queue_us
        for c in CATEGORIES:
            assert sum(d.parts_us[c] for d in acc.days) == acc.parts_us[c]


def secs(acc: Account | Any, cat: str) -> float:
    return acc.parts_us[cat] / US


@pytest.fixture
def led(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "run")


def allocation(led: Ledger, seg: str, start: float, job: str = "100") -> None:
    led.emit("chain", seg, "allocation_started", start, job_id=job, nodes=["n1"])


# ------------------------------------------------------------------------------------ categories


def test_start_up_ends_at_the_first_completed_step_then_productive_then_other(led: Ledger) -> None:
    allocation(led, "100_0", 0)
    led.emit("train-r0", "100_0", "segment_started", 10, world_size=2, step=0)
    last = led.steps("100_0", range(1, 51), 20)  # steps at 21..70
    led.emit("train-r0", "100_0", "segment_ended", 75, reason="segment_limit", step=50)
    led.emit("chain", "100_0", "allocation_ended", 80, job_id="100", outcome="clean")
    acc = led.account()
    assert last == 70 and acc.allocated_us == 80 * US
    (s,) = acc.segments
    assert (s.outcome, s.bounds, s.start_step, s.end_step) == ("clean", "ledger", 0, 50)
    # start-up 0 -> 21 (the first step's own time is start-up: "to the first completed step"),
    # productive 21 -> 75 (the tail up to a clean end kept its work), other 75 -> 80 (teardown)
    assert (secs(acc, "startup"), secs(acc, "productive"), secs(acc, "other")) == (21, 54, 5)
    assert acc.ettr == pytest.approx(54 / 80) and acc.restarts == []


def test_preflight_and_checkpoint_load_are_split_out_of_start_up(led: Ledger) -> None:
    allocation(led, "1_0", 0)
    led.emit("doctor-r0", "1_0", "doctor", 9, ok=True, checks=[], seconds=4.0)  # 5 -> 9
    led.emit("train-r0", "1_0", "ckpt_loaded", 16, step=10, tag="step_0000010", seconds=3.0)  # 13 -> 16
    led.emit("train-r0", "1_0", "segment_started", 17, world_size=2, step=10)
    led.steps("1_0", range(11, 21), 19)  # 20..29
    led.emit("train-r0", "1_0", "segment_ended", 29, reason="done", step=20)
    acc = led.account()
    assert (secs(acc, "preflight"), secs(acc, "ckpt_load"), secs(acc, "startup")) == (4, 3, 13)
    assert secs(acc, "productive") == 9 and acc.segments[0].startup_us == 20 * US


def test_a_preflight_without_its_duration_counts_from_the_allocations_start(led: Ledger) -> None:
    allocation(led, "1_0", 0)
    led.emit("doctor-r0", "1_0", "doctor", 6, ok=False, checks=[], failed_nodes=["n1"])
    led.emit("chain", "1_0", "allocation_ended", 8, job_id="1", outcome="preflight")
    acc = led.account()
    assert (secs(acc, "preflight"), secs(acc, "other"), acc.segments[0].outcome) == (6, 2, "preflight")


def test_checkpoint_stall_is_the_save_when_synchronous_and_the_snapshot_when_asynchronous(led: Ledger) -> None:
    allocation(led, "1_0", 0)
    led.emit("train-r0", "1_0", "segment_started", 0, world_size=2, step=0)
    led.emit("train-r0", "1_0", "step", 1, step=1, loss=2.0, step_time=1.0)
    led.emit("train-r0", "1_0", "ckpt_saved", 6, step=1, tag="step_0000001", bytes=1, seconds=5.0)  # 1 -> 6
    led.emit("train-r0", "1_0", "step", 7, step=2, loss=2.0, step_time=1.0)
    # async: the loop paused 0.5 s at 7 -> 7.5; the writer committed at 37 (seconds 30 from the save's start)
    led.emit("train-r0", "1_0", "step", 8.5, step=3, loss=2.0, step_time=1.0)
    led.steps("1_0", range(4, 40), 8.5)
    led.emit("train-r0", "1_0", "ckpt_saved", 37, step=2, tag="step_0000002", bytes=1, seconds=30.0,
             stall_s=0.5, **{"async": True})
    led.emit("train-r0", "1_0", "segment_ended", 44.5, reason="done", step=39)
    acc = led.account()
    assert secs(acc, "ckpt_stall") == 5.5
    assert secs(acc, "productive") == pytest.approx(44.5 - 1 - 5.5)
    assert acc.stats["stall_per_save_s"] == pytest.approx(2.75)  # median of the interval saves' stalls


def test_live_evaluation_is_counted_and_a_streams_is_not(led: Ledger) -> None:
    allocation(led, "1_0", 0)
    led.emit("train-r0", "1_0", "segment_started", 0, world_size=2, step=0)
    led.steps("1_0", range(1, 11), 0)  # 1..10
    led.raw("train-eval", 13, kind="eval", seg="1_0", step=10, sources={}, seconds=3.0, by="live")
    led.raw("stream", 12, kind="eval", step=10, sources={}, seconds=50.0, by="stream")
    led.raw("junk", 12.5, kind="eval", seg="1_0", step=10, sources={}, seconds="soon")  # read defensively
    led.steps("1_0", range(11, 21), 13)  # 14..23
    led.emit("train-r0", "1_0", "segment_ended", 23, reason="done", step=20)
    acc = led.account()
    assert secs(acc, "eval") == 3 and secs(acc, "productive") == 23 - 1 - 3


def test_a_crash_loses_the_work_since_the_last_checkpoint_and_the_restart_is_measured(led: Ledger) -> None:
    led.emit("submit", "", "chain_submitted", -50, job_id="1")
    allocation(led, "1_0", 0, job="1")
    led.emit("train-r0", "1_0", "segment_started", 5, world_size=2, step=0)
    led.steps("1_0", range(1, 11), 5)  # 6..15
    led.emit("train-r0", "1_0", "ckpt_saved", 17, step=10, tag="step_0000010", bytes=1, seconds=2.0)
    led.steps("1_0", range(11, 16), 17)  # 18..22, then rank 1 dies
    led.emit("chain", "1_0", "allocation_ended", 30, job_id="1", outcome="crash", ckpt_step=10)
    allocation(led, "2_0", 100, job="2")
    led.emit("train-r0", "2_0", "ckpt_loaded", 108, step=10, tag="step_0000010", seconds=1.0)
    led.emit("train-r0", "2_0", "segment_started", 110, world_size=2, step=10)
    led.steps("2_0", range(11, 21), 110)  # 111..120
    led.emit("train-r0", "2_0", "segment_ended", 121, reason="done", step=20)
    led.emit("chain", "2_0", "allocation_ended", 122, job_id="2", outcome="finished")
    acc = led.account()
    crashed = acc.segments[0]
    assert crashed.outcome == "crash" and crashed.failure_t == T0 + 22
    # redone: steps 11..15 (17 -> 22); after the failure: other 22 -> 30
    assert crashed.parts_us["redone"] == 5 * US and crashed.parts_us["other"] == 8 * US
    assert acc.redone_by == {"failure": 5 * US, "rollback": 0}
    assert acc.queue_us == (50 + 70) * US  # before the first allocation, and between the two
    (r,) = acc.restarts
    assert (r["seg"], r["next_seg"], r["cost_s"]) == ("1_0", "2_0", 111 - 22)
    assert (r["detect_s"], r["queue_s"], r["startup_s"], r["failed_starts_s"]) == (8, 70, 11, 0)
    assert acc.block()["restart_cost_s"] == 89  # type: ignore[index]


def test_work_not_yet_replayed_after_a_crash_is_already_redone(led: Ledger) -> None:
    allocation(led, "1_0", 0, job="1")
    led.emit("train-r0", "1_0", "segment_started", 0, world_size=2, step=0)
    led.steps("1_0", range(1, 5), 0)
    led.emit("train-r0", "1_0", "ckpt_saved", 4, step=4, tag="step_0000004", bytes=1, seconds=0.0)
    led.steps("1_0", range(5, 9), 4)  # 5..8: lost with the crash, no replay yet
    led.emit("chain", "1_0", "allocation_ended", 9, job_id="1", outcome="crash")
    acc = led.account()
    assert secs(acc, "redone") == 4 and acc.restarts[0]["cost_s"] is None


def test_a_hang_is_detection_from_the_last_step_to_the_watchdogs_end(led: Ledger) -> None:
    allocation(led, "1_0", 0, job="1")
    led.emit("train-r0", "1_0", "segment_started", 0, world_size=2, step=0)
    led.steps("1_0", range(1, 21), 0)  # 1..20
    led.emit("watchdog-r1", "1_0", "hang", 80, bound_s=60.0, stalled_s=60.0, step=20, phase="step")
    led.emit("watchdog-r1", "1_0", "segment_ended", 84, reason="hang", step=20)
    led.emit("chain", "1_0", "allocation_ended", 90, job_id="1", outcome="hang")
    acc = led.account()
    assert (secs(acc, "hang"), secs(acc, "other"), acc.segments[0].outcome) == (64, 6, "hang")
    assert acc.restarts[0]["outcome"] == "hang"


def test_a_rollback_redoes_the_steps_since_its_checkpoint_and_reloads(led: Ledger) -> None:
    allocation(led, "1_0", 0, job="1")
    led.emit("train-r0", "1_0", "segment_started", 0, world_size=2, step=0)
    led.steps("1_0", range(1, 21), 0)  # 1..20
    led.emit("train-r0", "1_0", "ckpt_saved", 20, step=20, tag="step_0000020", bytes=1, seconds=0.0)
    led.steps("1_0", range(21, 27), 20)  # 21..26, 26 spikes
    led.emit("train-r0", "1_0", "rollback", 30, from_step=26, to_step=20, spike_step=26)  # reload 26 -> 30
    led.steps("1_0", range(21, 31), 30)  # 31..40
    led.emit("train-r0", "1_0", "segment_ended", 40, reason="done", step=30)
    acc = led.account()
    assert (secs(acc, "redone"), secs(acc, "ckpt_load")) == (6, 4)
    assert acc.redone_by == {"failure": 0, "rollback": 6 * US} and acc.restarts == []
    assert acc.stats["rollback_load_s"] == 4


def test_steps_logged_every_n_estimate_the_first_completed_step(led: Ledger) -> None:
    allocation(led, "1_0", 0)
    led.emit("train-r0", "1_0", "segment_started", 5, world_size=2, step=100)
    for i, s in enumerate(range(110, 160, 10)):  # trainer.log_interval = 10: steps 110, 120, ...
        led.emit("train-r0", "1_0", "step", 25 + 20 * i, step=s, loss=2.0, step_time=2.0)
    led.emit("train-r0", "1_0", "segment_ended", 105, reason="done", step=150)
    acc = led.account()
    # step 110 at 25 after 10 steps of 2 s: step 101 completed at 25 - 9 x 2 = 7
    assert acc.segments[0].first_step_t == T0 + 7 and secs(acc, "startup") == 7


def test_a_lost_allocation_ends_at_its_last_event(led: Ledger) -> None:
    allocation(led, "1_0", 0, job="1")
    led.emit("train-r0", "1_0", "segment_started", 2, world_size=2, step=0)
    led.steps("1_0", range(1, 11), 2)  # ...12, then the node dies with the driver
    allocation(led, "2_0", 500, job="2")  # the next one finds it lost
    led.emit("chain", "2_0", "allocation_ended", 500.5, job_id="1", outcome="lost", seg_ended="1_0", ckpt_step=0)
    led.emit("train-r0", "2_0", "segment_started", 510, world_size=2, step=0)
    led.steps("2_0", range(1, 3), 510)
    acc = led.account()
    lost, nxt = acc.segments
    assert (lost.outcome, lost.end, lost.allocated_us) == ("lost", T0 + 12, 12 * US)
    assert secs(lost, "redone") == 9  # steps 2..10 (no checkpoint): step 1 completed at 3, ending start-up
    assert acc.queue_us == 488 * US and nxt.outcome == "running"
    assert acc.restarts[0]["cost_s"] == 511 - 12


def test_slurms_accounting_widens_the_allocation_to_the_jobs_own_start_and_end(led: Ledger) -> None:
    allocation(led, "7_0", 10, job="7")
    led.emit("train-r0", "7_0", "segment_started", 20, world_size=2, step=0)
    led.steps("7_0", range(1, 6), 20)
    led.emit("train-r0", "7_0", "segment_ended", 26, reason="signal", step=5)
    led.emit("chain", "7_0", "allocation_ended", 27, job_id="7", outcome="clean")
    rec = AcctRecord("7", "COMPLETED", T0 - 100, T0 - 100, T0 + 2, T0 + 31, 29.0, "n1", "0:0")
    other = AcctRecord("8", "COMPLETED", T0, T0, T0 + 2, T0 + 31, 29.0, "n1", "0:0")  # another job
    acc = led.account(history=(rec, other))
    (s,) = acc.segments
    assert (s.bounds, s.start, s.end) == ("sacct", T0 + 2, T0 + 31)
    assert secs(acc, "startup") == 19 and secs(acc, "other") == 5


def test_a_local_run_is_accounted_from_its_trainers_own_events(led: Ledger) -> None:
    led.emit("train-r0", "local-1", "data_ready", 0, sources=["fr"], tokens=10)
    led.emit("train-r0", "local-1", "segment_started", 8, world_size=2, step=0)
    led.steps("local-1", range(1, 5), 8)
    led.emit("train-r0", "local-1", "segment_ended", 12, reason="done", step=4)
    acc = led.account()
    (s,) = acc.segments
    assert (s.bounds, s.outcome, s.allocated_us, secs(acc, "startup")) == ("ledger", "finished", 12 * US, 9)


def test_chain_json_alone_is_enough_for_an_allocation_that_wrote_nothing(led: Ledger) -> None:
    led.emit("cli", "", "run_created", 0, name="x", config_digest="d")
    chain = ChainState(state="ended", executor="slurm", segments=[
        SegmentRecord("9_0", "9", start=T0 + 100, end=T0 + 160, outcome="crash", reason="exit status 1")])
    acc = led.account(chain)
    (s,) = acc.segments
    assert (s.bounds, s.allocated_us, secs(acc, "startup"), s.outcome) == ("chain.json", 60 * US, 60, "crash")


def test_steps_outside_every_known_allocation_are_accounted_too(led: Ledger) -> None:
    led.steps("", range(1, 11), 0, dt=2.0)  # no segment events at all (a hand-made or damaged ledger)
    acc = led.account()
    (s,) = acc.segments
    assert (s.seg, s.start, s.end, secs(acc, "startup"), secs(acc, "productive")) == ("?1", T0, T0 + 20, 2, 18)


def test_days_split_at_utc_midnight(led: Ledger) -> None:
    allocation(led, "1_0", 86_400 - 100)
    led.emit("train-r0", "1_0", "segment_started", 86_400 - 90, world_size=2, step=0)
    led.steps("1_0", range(1, 201), 86_400 - 90)  # 80 s before midnight, 120 after
    led.emit("train-r0", "1_0", "segment_ended", 86_400 + 110, reason="done", step=200)
    acc = led.account()
    assert [d.day for d in acc.days] == ["2026-01-01", "2026-01-02"]
    assert [d.allocated_us for d in acc.days] == [100 * US, 110 * US]
    assert acc.days[0].parts_us["productive"] == 89 * US and acc.days[1].parts_us["productive"] == 110 * US
    assert acc.days[1].ettr == 1.0 and acc.block()["ettr_day"] == 1.0  # type: ignore[index]


# ----------------------------------------------------------------------------------------- projection


def test_the_projection_uses_the_measured_costs(led: Ledger) -> None:
    """Two clean 100-step segments (start-up 10 s, step 1 s, a 2 s stall every 10 steps), one crash."""
    t = 0.0
    for n, outcome in enumerate(("clean", "crash", "clean")):
        seg = f"{n}_0"
        allocation(led, seg, t, job=str(n))
        led.emit("train-r0", seg, "segment_started", t + 9, world_size=2, step=1000 * n)
        end = t + 9
        for s in range(1, 101):
            end += 1
            led.emit("train-r0", seg, "step", end, step=1000 * n + s, loss=2.0, step_time=1.0)
            if s % 10 == 0:
                end += 2
                led.emit("train-r0", seg, "ckpt_saved", end, step=1000 * n + s, tag=f"t{n}{s}", bytes=1,
                         seconds=2.0, reason="interval")
        if outcome == "clean":
            led.emit("train-r0", seg, "segment_ended", end + 1, reason="signal", step=1000 * n + 100)
        led.emit("chain", seg, "allocation_ended", end + 5, job_id=str(n), outcome=outcome)
        t = end + 100
    acc = led.account(interval=10, limit=7200.0)
    p = acc.projection
    assert p is not None and p["ettr"] is not None
    m = p["inputs"]
    assert (m["startup_s"], m["step_time_s"], m["stall_per_save_s"], m["failures"]) == (10, 1, 2, 1)
    assert m["teardown_s"] == 4
    lam = 1 / (acc.allocated_us / US)
    w = m["lost_per_failure_s"]
    expect = (1 - 14 / 7200 - lam * (w + 14) - 0) * (10 / 12)
    assert p["ettr"] == pytest.approx(expect)
    assert p["young_daly_interval_steps"] == round((2 * 2 / lam) ** 0.5)


def test_no_projection_without_an_allocation_length_or_a_step(led: Ledger) -> None:
    allocation(led, "1_0", 0)
    acc = led.account(limit=None)
    assert acc.projection is not None and acc.projection["ettr"] is None
    assert "slurm.time_limit" in acc.projection["notes"][0]


# ------------------------------------------------------------------------------------- robustness

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(-1e3, 1e6), st.text(max_size=6),
                   st.floats(allow_nan=True, allow_infinity=True))
EVENT = st.tuples(st.sampled_from(sorted(KINDS | {"step"})), st.floats(-1e4, 4e5),
                  st.sampled_from(["", "1_0", "1_1", "2_0", "?"]),
                  st.dictionaries(st.sampled_from(["step", "seconds", "stall_s", "reason", "outcome", "job_id",
                                                   "seg_ended", "stalled_s", "by", "ckpt_step", "step_time",
                                                   "from_step", "to_step"]), VALUES, max_size=6))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(EVENT, max_size=60), st.lists(st.tuples(st.sampled_from(["1_0", "2_0", "9_0"]),
                                                        st.floats(-10, 4e5), st.floats(-10, 4e5),
                                                        st.sampled_from(["clean", "crash", "lost", "running", ""])),
                                              max_size=3))
def test_any_ledger_gives_an_account_that_adds_up(tmp_path: Path, events: list[tuple[str, float, str, dict[str, Any]]],
                                                  records: list[tuple[str, float, float, str]]) -> None:
    """Whatever the lines hold (wrong types, NaN, overlapping or backwards segments, junk times), the
    account never raises and every sum holds exactly."""
    run = tmp_path / "gen"
    (run / "ledger").mkdir(parents=True, exist_ok=True)
    lines = []
    for kind, t, seg, fields in events:
        try:
            lines.append(json.dumps({"v": 2, "t": T0 + t, "kind": kind, "seg": seg, **fields}, allow_nan=True))
        except ValueError:
            continue
    (run / "ledger" / "w.jsonl").write_text("\n".join(lines) + "\n")
    chain = ChainState(segments=[SegmentRecord(s, "1", start=T0 + a, end=T0 + b if b > 0 else 0.0, outcome=o)
                                 for s, a, b, o in records])
    acc = account(Inputs.from_scan(scan(run)), chain, interval_steps=10, time_limit_s=600.0)
    assert_adds_up(acc)
    json.dumps(acc.to_dict(), allow_nan=False)
    assert acc.block() is None or 0 <= acc.block()["ettr"] <= 1  # type: ignore[index]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e5), st.integers(0, 50), st.floats(0, 10)), max_size=200))
def test_any_step_columns_add_up(rows: list[tuple[float, int, float]]) -> None:
    t = np.array([r[0] for r in rows])
    acc = account(Inputs(T0 + t, np.array([r[1] for r in rows], dtype=float), np.array([r[2] for r in rows])))
    assert_adds_up(acc)
    if rows:
        assert acc.allocated_us >= round((t.max() - t.min()) * US) - 1


def test_the_live_tracker_gives_the_account_of_the_scan(led: Ledger) -> None:
    test_a_crash_loses_the_work_since_the_last_checkpoint_and_the_restart_is_measured(led)
    from_scan = led.account().to_dict()
    tr = Tracker()
    events = read_all(led.root)
    tr.add(events[: len(events) // 2])
    tr.inputs()  # a chunk boundary, as a live follower makes
    tr.add(events[len(events) // 2:])
    assert account(tr.inputs(), interval_steps=10, time_limit_s=3600.0).to_dict() == from_scan


def test_a_long_run_spans_days_without_losing_a_microsecond(led: Ledger) -> None:
    allocation(led, "1_0", 0)
    led.emit("train-r0", "1_0", "segment_started", 0, world_size=2, step=0)
    led.steps("1_0", range(1, 2001), 0, dt=259.2001)  # six days
    acc = led.account()
    assert len(acc.days) == 7 and acc.days[0].allocated_us == DAY_US


# ------------------------------------------------------------------------------------ CLI, summary


def kit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kit.tools.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_dir(tmp_path: Path, tiny_cfg: Any) -> Path:
    from kit.rundir import RunDir

    cfg = tiny_cfg("gp")
    rd = RunDir(cfg.run_dir)
    rd.create(cfg)
    led = Ledger(rd.path)
    test_a_crash_loses_the_work_since_the_last_checkpoint_and_the_restart_is_measured(led)
    for w in led.writers.values():
        w.close()
    return rd.path


def test_kit_goodput_text_json_and_plot(run_dir: Path, tmp_path: Path) -> None:
    out = kit("goodput", str(run_dir), "--no-slurm")
    assert out.returncode == 0, out.stderr
    assert "ETTR" in out.stdout and "training redone (lost)" in out.stdout and "restarts: 1" in out.stdout
    assert "projection for 10.0m allocations" in out.stdout  # the tiny recipe's slurm.time_limit
    js = kit("goodput", str(run_dir), "--json", "--no-slurm", "--plot", str(tmp_path / "p" / "days.png"))
    assert js.returncode == 0, js.stderr
    a = json.loads(js.stdout)
    assert a["allocated_s"] == 52 and a["parts"]["redone"] == 5 and len(a["segments"]) == 2
    assert a["restarts"][0]["cost_s"] == 89 and a["projection"]["time_limit_s"] == 600
    png = (tmp_path / "p" / "days.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_kit_goodput_errors_are_one_line(run_dir: Path, tmp_path: Path) -> None:
    for args, says in ((["goodput", str(tmp_path / "nope")], "no run directory"),
                       (["goodput", str(run_dir), "--plot", str(tmp_path / "x.jpg")], "PNG"),
                       (["goodput", str(run_dir), "--plot", "/proc/x/y.png", "--no-slurm"], "cannot write")):
        out = kit(*args)
        assert out.returncode == 1 and "Traceback" not in out.stderr and says in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_the_run_summary_carries_the_goodput_block(run_dir: Path) -> None:
    from kit.run.summary import collect

    s, _ = collect(run_dir, use_slurm=False)
    d = s.to_dict()
    assert d["goodput"] == of_run(run_dir, use_slurm=False).block()
    assert d["goodput"]["ettr"] == pytest.approx(19 / 52) and d["goodput"]["restarts"] == 1
    assert d["goodput"]["biggest_loss"]["category"] == "startup"
    out = kit("status", str(run_dir))
    assert "goodput    ETTR 36.5% of 52s" in out.stdout, out.stdout
    once = kit("monitor", str(run_dir), "--once", "--no-slurm")
    assert "goodput ETTR 36.5%" in once.stdout, once.stdout


async def test_the_monitor_shows_the_account_and_follows_the_run(fixed_run: Path) -> None:
    """The overview line and the goodput tab (the tab's layout is a snapshot test); a segment appended
    to the ledger reaches the tab's account (the account is redone every goodput_period_s)."""
    from test_monitor_support import fixed_now, last_t, wait_for

    from kit.monitor.app import loaded, make_app
    from kit.monitor.widgets import ChainPanel, GoodputPanel

    app = make_app([fixed_run], use_slurm=False, clock=fixed_now)
    app.feeds[0].goodput_period_s = 0.0
    async with app.run_test(size=(130, 36)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        assert "goodput ETTR 3.0% of 14s" in str(app.query_one(ChainPanel).render())
        await pilot.press("6")
        assert app.query_one("TabbedContent").active == "goodput"  # type: ignore[attr-defined]
        before = app.snaps[0].goodput
        assert before is not None and before["segment_count"] == 2
        t = last_t(fixed_run) + 100
        with LedgerWriter(fixed_run, "train-r0", seg="seg3") as w:
            w.emit("segment_started", world_size=2, step=8, t=t)
            for s in range(9, 13):
                w.emit("step", step=s, loss=6.0, step_time=1.0, t=t + s - 8)
            w.emit("segment_ended", reason="done", step=12, t=t + 5)
        await wait_for(pilot, lambda: (app.snaps[0].goodput or {}).get("segment_count") == 3, what="3 segments")
        await wait_for(pilot, lambda: app.query_one(GoodputPanel)._key[1][0] == t + 5, what="the tab redrawn")
        after = app.snaps[0].goodput
        assert after is not None and after["parts"]["productive"] == pytest.approx(before["parts"]["productive"] + 4)
        assert after["queue_s"] == pytest.approx(before["queue_s"] + t - before["as_of"])  # the gap before seg3

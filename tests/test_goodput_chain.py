"""The goodput account of a real chain: submitit's local executor runs the per-rank drivers and real
DeepSpeed ranks (gloo, CPU) through three segments of the poisoned spike run (tests/spikes_fixtures.py):

1. steps 1-28: the data-made loss spike at step 26 makes the policy roll back to step 20 (steps 21-26
   are trained again) and the segment ends at trainer.stop_after_steps, a simulated allocation
   boundary (the trainer saves and the chain requeues, as at a time limit);
2. resumes at 28; rank 1 is SIGKILLed after step 31 (KIT_FAULTS), a step after the checkpoint at 30
   (an async save: it may not have been committed yet);
3. resumes at the newest committed checkpoint (30, or 28) and finishes at 34.

The account must add up to the allocated time exactly, per segment, per day and for the run, hold the
rollback's and the crash's lost work where the ledger says it was, and measure the restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chainwait import wait_chain
from spikes_fixtures import SPIKE_STEP, recipe
from test_goodput import assert_adds_up

from kit.ledger import read_all
from kit.run.goodput import US, of_run

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]
KILL_STEP = 31


def _stalls_within(events: list[dict[str, Any]], t0: float, t1: float) -> float:
    """Seconds in [t0, t1] that were not training: checkpoint stalls (a synchronous save's whole time, an
    async save's stall_s) and live evaluations (the account books them as evaluation, not as redone work),
    each by its overlap with [t0, t1]: a save begins right after its step's event, and its start, recorded
    as t - seconds with seconds rounded to the millisecond, can fall just before t0 (a CI run: the save at
    step 20 started 0.1 ms before step 20's event by that arithmetic, and its 12 ms stall is inside)."""
    def overlap(start: float, end: float) -> float:
        return max(0.0, min(end, t1) - max(start, t0))

    out = 0.0
    for e in events:
        if e["kind"] == "ckpt_saved":
            # the stall is the save's first stall_s seconds; an async save's event comes when its writer
            # commits, possibly after t1, while its stall lies within [t0, t1]
            start = e["t"] - e["seconds"]
            out += overlap(start, start + e.get("stall_s", e["seconds"]))
        elif e["kind"] == "eval" and e.get("by", "live") == "live" and e.get("seconds") is not None:
            out += overlap(e["t"] - e["seconds"], e["t"])
    return out


def test_the_account_of_a_chain_with_a_rollback_a_boundary_and_a_crash(tmp_path: Path, deepspeed_ok: None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from kit.config import load_recipe
    from kit.jobs.submit import submit

    monkeypatch.setenv("KIT_EXECUTOR", "local")
    monkeypatch.setenv("KIT_FAULTS", f"step.after@{KILL_STEP}:rank1")
    monkeypatch.setenv("KIT_FAULTS_SEGMENTS", "2")  # the second segment only
    cfg = load_recipe(recipe(tmp_path, "gpc", "rollback"), [
        "trainer.stop_after_steps=28", "chain.backoff_s=0", "doctor.enabled=false", 'slurm.time_limit="00:10:00"'])
    sub = submit(cfg, log=lambda m: None)
    wait_chain(sub.run_dir, timeout=600)  # per sign of progress: a start-up on a loaded 2-core machine
    sub.job.wait()
    check(sub.run_dir)


def check(run: Path) -> None:
    """What the chain did, then the account of it (a function: it can be run on a kept run directory)."""
    state = json.loads((run / "slurm" / "chain.json").read_text())
    assert state["end_reason"] == "done", state
    segs = state["segments"]
    assert [s["outcome"] for s in segs] == ["clean", "crash", "finished"], segs
    events = read_all(run)
    (rb,) = [e for e in events if e["kind"] == "rollback"]
    assert (rb["from_step"], rb["to_step"]) == (SPIKE_STEP, 20)

    acc = of_run(run, use_slurm=False)
    assert_adds_up(acc)
    a, b, c = acc.segments
    assert [s.seg for s in acc.segments] == [s["seg"] for s in segs]
    assert [s.outcome for s in acc.segments] == ["clean", "crash", "finished"]
    assert all(s.bounds == "ledger" for s in acc.segments)
    # async saves: step 30's checkpoint may still be in its writer when rank 1 is killed after step 31, so
    # the third segment resumes from the newest checkpoint the second one committed (30), or else from 28
    resumed = max([e["step"] for e in events if e["kind"] == "ckpt_saved" and e.get("seg") == b.seg], default=28)
    assert resumed in (28, 30)
    assert (a.start_step, a.end_step, b.start_step, b.end_step, c.start_step, c.end_step) == (0, 28, 28, KILL_STEP,
                                                                                              resumed, 34)
    by_seg = {s.seg: [e for e in events if e.get("seg") == s.seg] for s in acc.segments}
    for s in acc.segments:  # the chain driver's allocation: from allocation_started to its last word
        mine = by_seg[s.seg]
        started = next(e["t"] for e in mine if e["kind"] == "allocation_started")
        ended = next(e["t"] for e in mine if e["kind"] == "allocation_ended")
        last = max(e["t"] for e in mine)  # after allocation_ended: the driver's alerts about the segment
        assert s.allocated_us == round(last * US) - round(started * US) and last - ended < 60
        assert s.parts_us["ckpt_load"] > 0 or s is a  # b and c resumed from a checkpoint
    steps = [e for e in events if e["kind"] == "step"]

    def t_of(step: int, seg: Any, first: bool = True) -> float:
        ts = [e["t"] for e in steps if e["step"] == step and seg.start <= e["t"] <= seg.end]
        return ts[0] if first else ts[-1]

    # the rollback: steps 21..26 of the first pass were trained again (less the saves among them)
    t20, t26 = t_of(20, a), t_of(SPIKE_STEP, a)
    assert acc.redone_by["rollback"] == pytest.approx((t26 - t20 - _stalls_within(events, t20, t26)) * US, abs=2)
    assert a.parts_us["redone"] == acc.redone_by["rollback"] and a.parts_us["ckpt_load"] > 0  # the reload
    # the boundary: the first segment kept its work up to its end; then the driver's teardown
    seg_end = next(e["t"] for e in by_seg[a.seg] if e["kind"] == "segment_ended")
    assert seg_end == a.trainer_end_t and a.parts_us["other"] == round(a.end * US) - round(seg_end * US)
    # the crash: step 31 was trained after the checkpoint at 30 and again in the third segment
    assert b.failure_t == t_of(KILL_STEP, b) and b.parts_us["redone"] > 0 and c.parts_us["redone"] == 0
    assert acc.redone_by["failure"] == b.parts_us["redone"]
    assert acc.parts_us["redone"] == acc.redone_by["rollback"] + acc.redone_by["failure"]
    # the restart: failure -> the third segment's first completed step, and its parts
    (r,) = acc.restarts
    assert (r["seg"], r["outcome"], r["next_seg"]) == (b.seg, "crash", c.seg)
    assert r["cost_s"] == pytest.approx(c.first_step_t - b.failure_t)  # type: ignore[operator]
    assert r["detect_s"] + r["queue_s"] + r["failed_starts_s"] + r["startup_s"] == pytest.approx(r["cost_s"])
    assert c.first_step_t == t_of(resumed + 1, c)  # its first completed step is the one after the resume
    assert 0 < acc.parts_us["productive"] < acc.allocated_us and acc.queue_us > 0
    p = acc.projection
    assert p is not None and p["time_limit_s"] == 600 and p["inputs"]["failures"] == 1 and 0 <= p["ettr"] <= 1

"""Chained allocations on the REAL local Slurm (bash .ci/slurm/start.sh), through submitit.

Real parts: slurmctld/slurmd/slurmdbd, sbatch/srun/scontrol requeue, submitit's sbatch script, real
DeepSpeed ranks (gloo) started by the chain's per-rank drivers. Faults are injected with KIT_FAULTS
(kit.faults: a real SIGKILL of a real rank), limited to chosen segments with KIT_FAULTS_SEGMENTS.
Segment lengths depend on slurmctld's 30 s limit checks: assertions say "at least".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kit.config import RunConfig
from tests.chainwait import ended, wait_chain, wait_ledger
from tests.conftest import ROOT, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.deepspeed]


def _cfg(tmp: Path, name: str, **extra: Any) -> RunConfig:
    from kit.config import load_recipe

    base = {"slurm.time_limit": "00:01:00", "trainer.stop_margin_s": 5.0, "chain.signal_lead_s": 10,
            "chain.backoff_s": 1.0, "doctor.enabled": False}
    base.update(extra)
    return load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp / "runs", name, **base))


def _wait_ended(run_dir: Path, timeout: float = 300, max_segments: int = 12) -> dict[str, Any]:
    """The chain ended and its last Slurm job left the queue (tests/chainwait: bounded per sign of progress)."""
    from kit.jobs import slurmctl

    return wait_chain(run_dir, lambda s: ended(s) and not slurmctl.is_active(s.get("job_id", "")), timeout,
                      max_segments)


def _wait_for(run_dir: Path, pred: Any, timeout: float = 300) -> list[dict[str, Any]]:
    return wait_ledger(run_dir, pred, "the awaited events", timeout)


def _kinds(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == kind]


def _final_tensors(ckpt: Path) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for f in sorted(ckpt.glob("*.pt")):
        if f.name.startswith("kit_rank"):
            continue
        state = torch.load(f, map_location="cpu", weights_only=False)

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, torch.Tensor):
                out[prefix] = obj
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}", v)
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(f"{prefix}[{i}]", v)

        walk(f.name, state)
    return out


def test_three_segment_chain_is_bit_identical_to_one_run(tmp_path: Path, slurm: None, deepspeed_ok: None) -> None:
    """Short allocations (1 min, a segment boundary every 4 steps): >= 3 segments chained by requeue
    train to the end, and the final checkpoint equals an uninterrupted run's, tensor for tensor."""
    import torch

    from kit.jobs.submit import submit
    from kit.launch import create_run, run_local_segment
    from kit.ledger import read_all

    cfg = _cfg(tmp_path, "chain3", **{"trainer.max_steps": 12, "trainer.stop_after_steps": 4})
    sub = submit(cfg, log=lambda m: None)
    assert not sub.attached and sub.executor == "slurm"

    ref_cfg = _cfg(tmp_path, "ref", **{"trainer.max_steps": 12})  # meanwhile: the same recipe in one go
    ref = create_run(ref_cfg, log=lambda m: None)
    assert run_local_segment(ref, ref_cfg, seg="ref", quiet=True).reason == "done"

    state = _wait_ended(sub.run_dir)
    assert state["end_reason"] == "done", state
    segs = state["segments"]
    assert len(segs) >= 3 and all(s["outcome"] == "clean" for s in segs[:-1]), segs
    assert segs[-1]["outcome"] == "finished" and segs[-1]["ckpt_after"] == 12
    assert {s["job_id"] for s in segs} == {sub.job_id}, "requeues keep the job id"
    assert [s["restarts"] for s in segs] == list(range(len(segs)))

    events = read_all(sub.run_dir)
    # Every requeue leads to exactly one new allocation. Under load an allocation can reach its 1-min
    # limit before its trainer records a segment (the requeue then says "signal"): count allocations.
    allocations = _kinds(events, "allocation_started")
    requeued = _kinds(events, "chain_requeued")
    assert len(requeued) == len(allocations) - 1 and len(allocations) >= len(segs), (
        [(e.get("reason"), e.get("how")) for e in requeued], len(allocations), len(segs))
    started = _kinds(events, "segment_started")
    assert [e["restarts"] for e in started] == list(range(len(segs)))
    assert all(e["job_id"] == sub.job_id and e["versions"]["torch"] for e in started)
    for e in _kinds(events, "allocation_started"):
        # the job's end (KIT_DEADLINE) is within its 1-min limit of the start (how far in depends on load)
        assert e["nodes"] and 0 < e["job_end"] - e["t"] < 70, "the trainer is given the job's end"

    mine = _final_tensors(sub.run_dir / "checkpoints" / "step_0000012")
    theirs = _final_tensors(ref.path / "checkpoints" / "step_0000012")
    assert mine.keys() == theirs.keys() and len(mine) > 4
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not differ, f"tensors differ from the uninterrupted run: {differ[:5]}"


def test_killed_rank_resubmits_from_last_checkpoint(tmp_path: Path, slurm: None, deepspeed_ok: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL of rank 1 after step 5 (checkpoints every 2): the driver sees the crash, the chain
    resubmits (new job, backoff), resumes from step 4 and finishes; the ledger tells the story."""
    from kit.jobs.submit import submit
    from kit.ledger import read_all

    monkeypatch.setenv("KIT_FAULTS", "step.after@5:rank1")
    monkeypatch.setenv("KIT_FAULTS_SEGMENTS", "1")  # the first segment only
    cfg = _cfg(tmp_path, "kill", **{"trainer.max_steps": 8, "slurm.time_limit": "00:05:00"})
    sub = submit(cfg, log=lambda m: None)
    state = _wait_ended(sub.run_dir)
    assert state["end_reason"] == "done", state
    first, *rest = state["segments"]
    events = read_all(sub.run_dir)
    # checkpoint.async_save: step 4's files may still be in flight when rank 1 dies after step 5, so the
    # last complete checkpoint is the newest one the ledger says was committed (2 or 4), not a fixed step
    saved = [e["step"] for e in _kinds(events, "ckpt_saved") if e.get("seg") == first["seg"]]
    assert first["outcome"] == "crash" and saved and first["ckpt_after"] == max(saved) in (2, 4), (first, saved)
    assert first["exit_codes"]["1"] == -9, "rank 1 died of SIGKILL"
    assert first["implicated"] == [first["nodes"][0]]
    assert len(state["job_ids"]) == 2, "a crash resubmits under a new job id"
    assert rest[-1]["outcome"] == "finished"

    ended = _kinds(events, "allocation_ended")
    assert ended[0]["outcome"] == "crash" and ended[0]["decision"] == "resubmit"
    requeued = _kinds(events, "chain_requeued")
    assert requeued[0]["how"] == "resubmit" and requeued[0]["reason"].startswith("crash")
    loaded = [e for e in _kinds(events, "ckpt_loaded") if e["seg"] == rest[0]["seg"]]
    assert loaded and loaded[0]["step"] == first["ckpt_after"], "resumed from the last complete checkpoint"
    alerts = [e["message"] for e in _kinds(events, "alert")]
    assert any("crash" in m and "resubmitting" in m for m in alerts), alerts
    # A one-node cluster cannot lose its only node: the node is a suspect, not excluded.
    assert state["excluded_nodes"] == [] and state["suspect_nodes"] == first["implicated"]


def test_signal_requeue_attach_and_stop(tmp_path: Path, slurm: None, deepspeed_ok: None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Preemption signal (USR2 to every task, as Slurm sends it) -> collective save and requeue;
    a second submit attaches instead of starting a second chain; `kit stop` ends it cleanly."""
    from kit.jobs import slurmctl
    from kit.jobs.cli import stop
    from kit.jobs.submit import submit
    from kit.rundir import RunDir

    monkeypatch.setenv("KIT_FAULTS", "step.after=sleep0.4")  # slow steps: time to act mid-segment
    cfg = _cfg(tmp_path, "sig", **{"trainer.max_steps": 400, "slurm.time_limit": "00:05:00",
                                   "chain.signal_lead_s": 60})
    sub = submit(cfg, log=lambda m: None)
    _wait_for(sub.run_dir, lambda ev: any(e["kind"] == "step" for e in ev))

    again = submit(cfg, log=lambda m: None)
    assert again.attached and again.job_id == sub.job_id
    assert len(slurmctl.squeue(name=f"kit-{cfg.run.name}")) == 1, "never two chains"

    slurmctl.cancel(sub.job_id, signal="USR2")
    events = _wait_for(sub.run_dir, lambda ev: any(e["kind"] == "step" and e.get("seg") == f"{sub.job_id}_1"
                                                   for e in ev))
    first_end = [e for e in _kinds(events, "segment_ended") if e["seg"] == f"{sub.job_id}_0"]
    assert first_end and first_end[0]["reason"] == "signal" and first_end[0]["signal"] == "SIGUSR2"
    assert _kinds(events, "segment_signalled")
    assert [e["how"] for e in _kinds(events, "chain_requeued")] == ["requeue"]

    stop(RunDir(sub.run_dir), "test says stop")
    state = _wait_ended(sub.run_dir)
    assert state["end_reason"] == "stop"
    assert [s["outcome"] for s in state["segments"]] == ["clean", "finished"]
    from kit.ledger import read_all

    events = read_all(sub.run_dir)
    assert [e["switch"] for e in _kinds(events, "control_ack")] == ["stop"]
    assert _kinds(events, "chain_ended")[-1]["reason"] == "stop"
    assert not (sub.run_dir / "control" / "stop").exists()


def test_crash_loop_stops_with_alert(tmp_path: Path, slurm: None, deepspeed_ok: None,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every segment dies at step 1 (before any checkpoint): after chain.crash_loop_limit segments
    without progress the chain stops and raises a critical alert instead of resubmitting forever."""
    from kit.jobs.submit import submit
    from kit.ledger import read_all

    monkeypatch.setenv("KIT_FAULTS", "step.after@1:rank1")
    cfg = _cfg(tmp_path, "loop", **{"chain.crash_loop_limit": 2, "slurm.time_limit": "00:05:00"})
    sub = submit(cfg, log=lambda m: None)
    state = _wait_ended(sub.run_dir)
    assert state["end_reason"] == "crash_loop"
    assert [s["outcome"] for s in state["segments"]] == ["crash", "crash"]
    events = read_all(sub.run_dir)
    critical = [e for e in _kinds(events, "alert") if e["severity"] == "critical"]
    assert critical and "crash loop" in critical[-1]["message"]
    assert _kinds(events, "chain_ended")[-1]["reason"] == "crash_loop"
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "status", str(sub.run_dir)], capture_output=True,
                         text=True, check=True).stdout
    assert "ended (crash_loop)" in out and "crash" in out


def test_frozen_rank_is_stopped_and_the_slurm_chain_resumes(no_leftovers: Path, slurm: None, deepspeed_ok: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's trainer frozen (SIGSTOP) on the real Slurm: rank 0's watchdog ends the segment (HANG),
    rank 1's driver stops its frozen trainer after health.exit_grace_s, so the job ends (it does not
    hold the allocation to its time limit) and the resubmitted job resumes and finishes; nothing of the
    test is left running. (Before: the driver waited on the frozen trainer until the time limit.)"""
    from kit.jobs import slurmctl
    from kit.jobs.submit import submit
    from kit.ledger import read_all
    from tests.test_chain_local import FROZEN, newest_saved, rank_pid, wait_committed, wait_steps

    monkeypatch.setenv("KIT_FAULTS", "step.after=sleep0.3")
    cfg = _cfg(no_leftovers, "frozen", **{**FROZEN, "slurm.time_limit": "00:10:00"})
    sub = submit(cfg, log=lambda m: None)
    assert sub.executor == "slurm", "Slurm went away: submit fell back to the local executor"
    wait_steps(sub.run_dir, sub.job_id, 5, timeout=300)
    wait_committed(sub.run_dir, 4)  # asynchronous: a rank frozen mid-save leaves it uncommitted
    os.kill(rank_pid(sub.run_dir, 1), signal.SIGSTOP)
    state = _wait_ended(sub.run_dir, timeout=400)
    assert state["end_reason"] == "done", state
    # The frozen job ended on its own long before its 10-minute limit (from the ledger, not a stopwatch).
    alloc = read_all(sub.run_dir, {"allocation_started", "allocation_ended"})
    held = next(e["t"] for e in alloc if e["kind"] == "allocation_ended") - alloc[0]["t"]
    assert alloc[0]["kind"] == "allocation_started" and held < 450, f"the frozen job held its allocation {held:.0f} s"
    first, *rest = state["segments"]
    assert first["outcome"] == "hang" and rest and rest[-1]["outcome"] == "finished", state["segments"]
    assert first["job_id"] == sub.job_id and len(state["job_ids"]) == 2, "a hang resubmits under a new job"
    assert not slurmctl.is_active(sub.job_id)
    stopped = [a for a in read_all(sub.run_dir, {"alert"}) if "the driver terminated it" in a["message"]]
    assert stopped and stopped[0]["rank"] == 1
    loaded = [e for e in read_all(sub.run_dir, {"ckpt_loaded"}) if e["seg"] == rest[0]["seg"]]
    assert loaded and loaded[0]["step"] == newest_saved(sub.run_dir, first["seg"]) >= 4


def test_chain_at_a_pipeline_layout_resumes_bit_exactly(tmp_path: Path, slurm: None, deepspeed_ok: None) -> None:
    """The seed's kind of layout on the real Slurm: 2 pipeline stages (DeepSpeed's PipelineModule, ZeRO-1),
    a segment boundary every 4 steps, chained by requeue; the final checkpoint equals an uninterrupted
    local run's at the same layout, tensor for tensor, and every segment records the layout."""
    from kit.jobs.submit import submit
    from kit.launch import create_run, run_local_segment
    from kit.ledger import read_all

    layout = {"parallel.pipeline": 2, "trainer.nproc": 2, "slurm.tasks_per_node": 2, "deepspeed.zero_stage": 1,
              "batch.micro_batch_size": 2, "batch.grad_accum": 4, "model.hidden_dropout": 0.0,
              "checkpoint.interval_steps": 4}
    cfg = _cfg(tmp_path, "pp-chain", **layout, **{"trainer.max_steps": 8, "trainer.stop_after_steps": 4,
                                                  "slurm.time_limit": "00:05:00"})
    sub = submit(cfg, log=lambda m: None)
    ref_cfg = _cfg(tmp_path, "pp-ref", **layout, **{"trainer.max_steps": 8})
    ref = create_run(ref_cfg, log=lambda m: None)
    assert run_local_segment(ref, ref_cfg, seg="ref", quiet=True).reason == "done"

    state = _wait_ended(sub.run_dir)
    assert state["end_reason"] == "done", state
    segs = state["segments"]
    assert len(segs) >= 2 and segs[-1]["outcome"] == "finished" and segs[-1]["ckpt_after"] == 8, segs
    started = _kinds(read_all(sub.run_dir), "segment_started")
    assert len(started) >= 2 and all(e.get("layout") and e["layout"].get("pipeline") == 2 for e in started), started
    mine = _final_tensors(sub.run_dir / "checkpoints" / "step_0000008")
    theirs = _final_tensors(ref.path / "checkpoints" / "step_0000008")
    assert mine.keys() == theirs.keys() and len(mine) > 4
    import torch

    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not differ, f"tensors differ from the uninterrupted run: {differ[:5]}"

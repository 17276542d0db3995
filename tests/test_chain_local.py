"""The chain without Slurm: submitit's local executor runs the same per-rank drivers, and the chain
loops segments inside one local job (real DeepSpeed ranks, real submitit LocalExecutor)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.chainwait import wait_chain, wait_ledger
from tests.conftest import ROOT, processes_of, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def test_local_executor_chain(tmp_path: Path, deepspeed_ok: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from kit.config import load_recipe
    from kit.jobs.submit import SubmitError, submit
    from kit.ledger import read_all

    monkeypatch.setenv("KIT_EXECUTOR", "local")
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(
        tmp_path / "runs", "loc", **{"trainer.max_steps": 6, "trainer.stop_after_steps": 4, "doctor.enabled": False,
                                     "slurm.time_limit": "00:05:00"}))
    sub = submit(cfg, log=lambda m: None)
    assert sub.executor == "local" and not sub.attached
    with pytest.raises(SubmitError, match="local chain in progress"):
        submit(cfg, log=lambda m: None)  # never two chains on one run
    state = wait_chain(sub.run_dir, timeout=400)  # per sign of progress: a start-up took 120 s on a loaded machine
    sub.job.wait()
    assert state["end_reason"] == "done", state
    segs: list[dict[str, object]] = state["segments"]  # type: ignore[assignment]
    assert [s["outcome"] for s in segs] == ["clean", "finished"] and segs[-1]["ckpt_after"] == 6
    assert {s["job_id"] for s in segs} == {sub.job_id}, "one local job loops the segments"
    resumed = [e["step"] for e in read_all(sub.run_dir, {"ckpt_loaded"})]
    assert resumed == [4], "the second segment resumed from the first one's checkpoint"


def rank_pid(run_dir: Path, rank: int, timeout: float = 120) -> int:
    """The pid of a rank's trainer process of this run (its command line and RANK in its environment)."""
    end = time.time() + timeout
    while time.time() < end:
        for pid, cmd in processes_of(str(run_dir)):
            if "segment_entry" not in cmd and "kit.segment" not in cmd:
                continue
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.5)
    raise AssertionError(f"no trainer process of rank {rank} found for {run_dir}")


def wait_steps(run_dir: Path, seg_prefix: str, n: int, timeout: float = 240) -> None:
    wait_ledger(run_dir, lambda ev: sum(str(e.get("seg", "")).startswith(seg_prefix) for e in ev) >= n,
                f"{n} steps", timeout, {"step"})


def wait_committed(run_dir: Path, step: int, timeout: float = 240) -> None:
    """Until the checkpoint of ``step`` is committed (its ``ckpt_saved``). Saves are asynchronous: a rank
    frozen before its part of a save is on disk leaves that save uncommitted (a stress run froze rank 1
    one step after the step-4 save began: the chain then rightly resumed from step 0)."""
    wait_ledger(run_dir, lambda ev: any(e["step"] == step for e in ev), f"the commit of step {step}'s checkpoint",
                timeout, {"ckpt_saved"})


def newest_saved(run_dir: Path, seg: str) -> int:
    from kit.ledger import read_all

    return max(e["step"] for e in read_all(run_dir, {"ckpt_saved"}) if e.get("seg") == seg)


# The ceiling bounds the save phase (a freeze can land as a save begins: the test accepts that outcome) and
# each segment's first step; 30 s is ample for the tiny model on a loaded machine, and keeps that case short.
FROZEN = {"trainer.max_steps": 10, "checkpoint.interval_steps": 4, "doctor.enabled": False,
          "slurm.time_limit": "00:05:00", "health.hang_floor_s": 3.0, "health.hang_ceiling_s": 30.0,
          "health.hang_factor": 5.0, "health.hang_grace_s": 5.0, "health.exit_grace_s": 5.0,
          "chain.backoff_s": 1.0, "trainer.log_interval": 1}


def test_frozen_rank_is_stopped_and_the_local_chain_resumes(no_leftovers: Path, deepspeed_ok: None,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's trainer is frozen (SIGSTOP) mid-segment. Rank 0's watchdog ends the segment (HANG);
    rank 1's driver sees rank 0's exit and, health.exit_grace_s later, terminates then kills its frozen
    trainer, so the next segment starts with both ranks, resumes and finishes; nothing is left behind.
    (Before: the driver waited on the frozen child forever; the chain never went on.)"""
    from kit.config import load_recipe
    from kit.jobs.submit import submit
    from kit.ledger import read_all

    monkeypatch.setenv("KIT_EXECUTOR", "local")
    monkeypatch.setenv("KIT_FAULTS", "step.after=sleep0.3")  # slow steps: time to freeze a rank mid-segment
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(no_leftovers / "runs", "frozen", **FROZEN))
    sub = submit(cfg, log=lambda m: None)
    wait_steps(sub.run_dir, "", 5)  # past the first save: the watchdog's bound comes from step times (~3 s)
    wait_committed(sub.run_dir, 4)
    frozen = rank_pid(sub.run_dir, 1)
    os.kill(frozen, signal.SIGSTOP)
    state = wait_chain(sub.run_dir, timeout=400)
    sub.job.wait()
    assert state["end_reason"] == "done", state
    first, *rest = state["segments"]
    assert first["outcome"] == "hang" and rest and rest[-1]["outcome"] == "finished", state["segments"]
    # rank 1: killed, or (woken by the driver's SIGTERM + SIGCONT) its own watchdog's HANG
    assert first["exit_codes"]["0"] == 77 and first["exit_codes"]["1"] in (77, -9, -15, 1), first["exit_codes"]
    assert frozen not in [pid for pid, _ in processes_of(str(sub.run_dir))], "the frozen trainer was ended"
    stopped = [a for a in read_all(sub.run_dir, {"alert"}) if "the driver terminated it" in a["message"]]
    assert stopped and stopped[0]["rank"] == 1 and stopped[0]["seg"] == first["seg"]
    loaded = [e for e in read_all(sub.run_dir, {"ckpt_loaded"}) if e["seg"] == rest[0]["seg"]]
    assert loaded and loaded[0]["step"] == newest_saved(sub.run_dir, first["seg"]) >= 4, \
        "the next segment resumed from the first one's newest committed checkpoint"
    [hang] = [e for e in read_all(sub.run_dir, {"hang"}) if e["seg"] == first["seg"]]
    assert hang["suspect_ranks"] == [1]
    if hang["phase"] == "step":  # frozen between saves: the bound comes from the step times (~3 s here)
        assert hang["bound_s"] < 60, hang
    else:  # frozen as rank 0 began the step-8 save (a stress run): a save may take long, the ceiling applies
        assert (hang["phase"], hang["bound_s"]) == ("save", FROZEN["health.hang_ceiling_s"]), hang


def test_disk_full_ends_the_chain_named_keeps_the_checkpoint_and_blames_no_node(
        no_leftovers: Path, deepspeed_ok: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint folder is a real tmpfs with room for two and a half checkpoints: the saves at steps
    2 and 4 fit, the one at step 6 hits ENOSPC. Every rank ends the save together (no rank left in
    DeepSpeed's barrier until the hang ceiling), the segment ends with disk_full (exit 79) and a
    critical alert that says "disk full", step 4 stays the newest checkpoint, the chain ends named and
    no node is excluded. (Before: `basic_ios::clear: iostream error`, a crash, the node excluded.)
    The first checkpoint also checks the preflight's size estimate (kit.model.sizing) against reality."""
    from kit import checkpoint as ck
    from kit import exitcodes
    from kit.config import load_recipe
    from kit.jobs.submit import submit
    from kit.ledger import read_all
    from kit.model import sizing
    from tests.conftest import mount_tmpfs

    monkeypatch.setenv("KIT_EXECUTOR", "local")
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(no_leftovers / "runs", "full", **{
        "trainer.max_steps": 12, "checkpoint.interval_steps": 2, "checkpoint.keep_last": 10, "doctor.enabled": False,
        "slurm.time_limit": "00:05:00", "health.hang_ceiling_s": 900.0, "health.exit_grace_s": 5.0}))
    need = sizing(cfg)["checkpoint_bytes"]
    ckpts = cfg.run_dir / "checkpoints"
    mount_tmpfs(ckpts, f"{int(2.5 * need) // 1024}k")
    try:
        sub = submit(cfg, log=lambda m: None)
        state = wait_chain(sub.run_dir, timeout=400)
        sub.job.wait()
        assert state["end_reason"] == "disk_full", state
        [seg] = state["segments"]
        assert seg["outcome"] == "disk_full" and seg["ckpt_after"] == 4 and seg["implicated"] == []
        assert state["excluded_nodes"] == [] and state["suspect_nodes"] == []
        assert set(seg["exit_codes"].values()) == {exitcodes.DISK_FULL}, seg["exit_codes"]
        assert (ckpts / "latest").read_text() == "step_0000004" and not (ckpts / "step_0000006").exists()
        found, _ = ck.find_resume(ckpts, hashes=True)
        assert found is not None and found.step == 4
        events = read_all(sub.run_dir)
        [ended] = [e for e in events if e["kind"] == "segment_ended"]
        # step 6's save is written in the background (checkpoint.async_save): the failure stops every rank
        # at the next step boundary, or at the save of step 8 at the latest
        assert ended["reason"] == "disk_full" and ended["exit_code"] == 79 and ended["step"] in (7, 8), ended
        assert not [e for e in events if e["kind"] == "hang"], "no rank was left waiting for the hang watchdog"
        critical = [e["message"] for e in events if e["kind"] == "alert" and e["severity"] == "critical"]
        assert any(m.startswith("disk full: the checkpoint save of step 6 failed") and "step_0000004" in m
                   and "no node is to blame" in m for m in critical), critical
        assert not [e for e in events if e["kind"] == "node_excluded"]
        real = ck.load(ckpts, "step_0000002").bytes
        assert abs(need / real - 1) < 0.05, f"sizing says {need:.0f} bytes, a real checkpoint has {real}"
    finally:
        import subprocess

        subprocess.run(["umount", "-l", str(ckpts)], check=False)

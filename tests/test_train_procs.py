"""`kit train` and its processes: a killed torchrun leaves no rank; a hang is not an exit 0.

Real parts: the `kit` command in a subprocess, torchrun, two real DeepSpeed ranks on gloo, /proc. The
environment these tests give `kit train` has no TORCH_EXTENSIONS_DIR: the kit must set its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kit import exitcodes
from kit.ledger import read_all
from tests.conftest import processes_of, tiny_overrides, wait_no_processes
from tests.test_chain_local import rank_pid

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def _kit_train(runs: Path, name: str, faults: str, **extra: Any) -> tuple[subprocess.Popen[str], Path]:
    sets = [a for o in tiny_overrides(runs, name, **{"trainer.log_interval": 1, "doctor.enabled": False, **extra})
            for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(KIT_FAULTS=faults, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "kit.tools.cli", "train", "tiny.toml", *sets], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, runs / name


def _wait_steps(run_dir: Path, proc: subprocess.Popen[str], n: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if len(read_all(run_dir, {"step"})) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"kit train ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{n} steps not reached in {timeout} s")



def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """`kit train`'s output once it exits (within ``timeout``); killed, never left behind, if it does not."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_kill_9_of_torchrun_leaves_no_rank(no_leftovers: Path, deepspeed_ok: None) -> None:
    """kill -9 of the launcher (torchrun under `kit train`): both ranks die with it (their parent-death
    signal), instead of training on as orphans of pid 1; `kit train` says the segment failed. The ranks
    built DeepSpeed's op in this install's cache, set by the kit (kit.opcache)."""
    proc, run_dir = _kit_train(no_leftovers / "runs", "kill9", "step.after=sleep0.2", **{"trainer.max_steps": 2000})
    try:
        _wait_steps(run_dir, proc, 2)
        mine = processes_of(str(run_dir))
        [launcher] = [pid for pid, cmd in mine if "torch.distributed.run" in cmd]
        ranks = [rank_pid(run_dir, r) for r in (0, 1)]
        environ = Path(f"/proc/{ranks[0]}/environ").read_bytes().split(b"\0")
        assert f"TORCH_EXTENSIONS_DIR={Path(sys.prefix) / 'torch_extensions'}".encode() in environ
        os.kill(launcher, signal.SIGKILL)
        left = wait_no_processes(f"kit.segment {run_dir}", 60)
        assert not left, f"ranks outlived their killed launcher: {left}"
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "the segment failed" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_kit_train_exits_with_hang_after_a_frozen_rank(no_leftovers: Path, deepspeed_ok: None) -> None:
    """Rank 1 frozen (SIGSTOP): the watchdog ends the segment, every process ends, and `kit train` exits
    with HANG (77) and says so; before, it printed "segment ended: hang" and exited 0. (The ceiling bounds a
    save, every 2 steps here: a freeze that lands in one is detected after it, 30 s, not the step bound.)"""
    proc, run_dir = _kit_train(no_leftovers / "runs", "hang", "step.after=sleep0.2", **{
        "trainer.max_steps": 2000, "health.hang_floor_s": 2.0, "health.hang_ceiling_s": 30.0,
        "health.hang_factor": 5.0, "health.hang_grace_s": 3.0, "health.exit_grace_s": 5.0})
    try:
        _wait_steps(run_dir, proc, 3)
        os.kill(rank_pid(run_dir, 1), signal.SIGSTOP)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    out, err = _finish(proc, 240)
    assert proc.returncode == exitcodes.HANG == 77, err[-3000:]
    assert "segment ended: hang: the hang watchdog ended it" in out and "exit 77" in out, out
    [hang] = read_all(run_dir, {"hang"})
    assert hang["suspect_ranks"] == [1]
    assert not wait_no_processes(str(run_dir), 60), "a rank outlived the segment"


def test_a_rank_stuck_after_the_segment_ended_is_stopped(no_leftovers: Path, deepspeed_ok: None) -> None:
    """The segment ends (done, saved, `segment_ended` written) but rank 1 never leaves its teardown
    (kit.faults: segment.teardown hangs it). torchrun waits on it forever (rank 0 exited 0: no failure
    to act on); `kit train` sees the end in the ledger and, health.exit_grace_s later, stops torchrun and
    with it the rank. The run is done: exit 0."""
    proc, run_dir = _kit_train(no_leftovers / "runs", "teardown", "segment.teardown:rank1=hang", **{
        "trainer.max_steps": 4, "health.exit_grace_s": 5.0})
    out, err = _finish(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    assert "segment ended: done at step 4" in out and "is still running after health.exit_grace_s = 5 s" in err
    assert not wait_no_processes(str(run_dir), 60), "the stuck rank outlived the segment"


def test_a_full_disk_on_one_rank_ends_the_save_on_every_rank(no_leftovers: Path, deepspeed_ok: None) -> None:
    """Rank 1's own disk is full when it writes its part of step 4's checkpoint (kit.faults raises ENOSPC
    in its write: one machine cannot give one rank a full disk of its own); rank 0's writes succeed.
    Rank 1 goes on through DeepSpeed's barriers and both agree on the failure: rank 0 is not left
    waiting for the hang watchdog's ceiling (600 s here), the segment ends with disk_full, `kit train`
    exits 79 and says so, and step 2 stays the newest checkpoint (step 4's partial folder removed)."""
    from kit import checkpoint as ck

    proc, run_dir = _kit_train(no_leftovers / "runs", "rank1full", "ckpt.write@4:rank1=enospc", **{
        "trainer.max_steps": 8, "health.hang_ceiling_s": 600.0, "health.hang_floor_s": 300.0})
    out, err = _finish(proc, 400)
    assert proc.returncode == exitcodes.DISK_FULL == 79, err[-3000:]
    assert "segment ended: disk_full" in out and "exit 79" in out, out
    [ended] = read_all(run_dir, {"segment_ended"})
    # step 4's save is written in the background (checkpoint.async_save): the failure stops every rank at
    # the next step boundary (the step's all-reduce carries it), or at the save of step 6 at the latest
    assert (ended["reason"], ended["src"]) == ("disk_full", "train-r0") and ended["step"] in (5, 6), ended
    assert not read_all(run_dir, {"hang"})
    [alert] = [a for a in read_all(run_dir, {"alert"}) if a["severity"] == "critical"]
    assert "disk full: the checkpoint save of step 4 failed" in alert["message"] and "on 1 rank(s)" in alert["message"]
    assert "rank 1 (" in alert["message"] and "rank 0 (" not in alert["message"]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000002" and not (ckpts / "step_0000004").exists()
    assert [c.step for c in ck.scan(ckpts)[0]] == [2]

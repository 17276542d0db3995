"""The trainer on real DeepSpeed ranks (2 ranks, gloo, CPU): resume, atomic saves, control, deadlines.

Each launch is a real `torchrun` of kit.segment, as `kit train` does.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kit import checkpoint as ck
from kit.config import RunConfig
from kit.launch import create_run, run_local_segment, torchrun_cmd
from kit.ledger import read_all
from kit.rundir import SAVE_NOW, STOP, RunDir

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]


def segment(cfg: RunConfig, stop_after: int = 0, seg: str = "s", faults: str = "", env: dict | None = None):  # type: ignore[no-untyped-def]
    rd = create_run(cfg, log=lambda m: None)
    extra = {"KIT_FAULTS": faults} if faults else {}
    extra.update(env or {})
    return rd, run_local_segment(rd, cfg, stop_after_steps=stop_after, seg=seg, extra_env=extra, quiet=True)


def losses(rd: RunDir) -> dict[int, float]:
    """Loss per step; for a step replayed after a resume, the latest event wins (the ledger rule)."""
    return {e["step"]: e["loss"] for e in read_all(rd.path, {"step"})}


def final_weights(rd: RunDir) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(rd.checkpoints), tag=(rd.checkpoints / "latest").read_text())


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_resume_is_bit_exact(tiny_cfg: Any, zero: int) -> None:
    """N steps in one go == N/2 steps, a new process, N/2 more: same losses, same final tensors."""
    full, out = segment(tiny_cfg("full", **{"deepspeed.zero_stage": zero}))
    assert out.reason == "done" and out.step == 8
    cfg = tiny_cfg("split", **{"deepspeed.zero_stage": zero})
    split, out = segment(cfg, stop_after=3, seg="a")  # stops at step 3: not a checkpoint interval
    assert out.reason == "segment_limit" and out.step == 3
    split, out = segment(cfg, seg="b")
    assert out.reason == "done" and out.step == 8
    loaded = read_all(split.path, {"ckpt_loaded"})
    assert [e["tag"] for e in loaded] == ["step_0000003"]
    assert losses(full) == losses(split)
    assert len(losses(full)) == 8
    assert_same_weights(final_weights(full), final_weights(split))


def test_sigkill_during_save_resumes_from_previous_complete(tiny_cfg: Any) -> None:
    """Rank 0 is SIGKILLed after DeepSpeed wrote step 6 but before the manifest: step 6 must not count."""
    ref, _ = segment(tiny_cfg("ref"))
    cfg = tiny_cfg("killed")
    rd, out = segment(cfg, faults="ckpt.before_manifest@6:rank0", seg="a")
    assert out.reason == "crashed"
    assert (rd.checkpoints / "step_0000006").is_dir()  # DeepSpeed's files are there...
    assert not (rd.checkpoints / "step_0000006" / ck.MANIFEST).exists()  # ...but it never completed
    assert (rd.checkpoints / "latest").read_text() == "step_0000004"
    rd, out = segment(cfg, seg="b")
    assert out.reason == "done" and out.step == 8
    loaded = read_all(rd.path, {"ckpt_loaded"})[-1]
    assert loaded["tag"] == "step_0000004"
    assert "step_0000006: incomplete (no MANIFEST.json), ignored" in loaded["skipped"]
    assert losses(ref) == losses(rd)
    assert_same_weights(final_weights(ref), final_weights(rd))


def test_control_switches_are_collective_and_acknowledged(tiny_cfg: Any) -> None:
    cfg = tiny_cfg("ctl", **{"trainer.max_steps": 20, "checkpoint.interval_steps": 100})
    rd = create_run(cfg, log=lambda m: None)
    rd.request(SAVE_NOW, "before maintenance")
    _, out = segment(cfg, stop_after=3, seg="a")
    assert out.reason == "segment_limit"
    saved = read_all(rd.path, {"ckpt_saved"})
    assert [(e["step"], e["reason"]) for e in saved] == [(1, "save-now"), (3, "segment_limit")]
    acks = read_all(rd.path, {"control_ack"})
    assert [(a["switch"], a["step"], a["note"]) for a in acks] == [("save-now", 1, "before maintenance")]
    assert not rd.pending(SAVE_NOW)
    rd.request(STOP)
    _, out = segment(cfg, seg="b")
    assert out.reason == "stop" and out.step == 4
    assert read_all(rd.path, {"control_ack"})[-1]["switch"] == "stop"
    assert (rd.checkpoints / "step_0000004" / ck.MANIFEST).exists()
    assert not rd.pending(STOP)


def test_deadline_saves_and_exits_before_it(tiny_cfg: Any) -> None:
    """KIT_DEADLINE 45 s away: the run saves and ends (reason deadline) before it. What the run can do
    depends on how much of the 45 s its startup left, so the assertion follows what the ledger saw:
    when the first step found time left (more than trainer.stop_margin_s), the trainer went on and must
    have saved and ended before the deadline; when startup ate the time, it must have stopped at its
    first step, and only because the deadline was within the margin there (a busy machine)."""
    margin = 5.0
    cfg = tiny_cfg("deadline", **{"trainer.max_steps": 100000, "optim.warmup_steps": 10,
                                  "checkpoint.interval_steps": 100000, "trainer.stop_margin_s": margin})
    deadline = time.time() + 45
    rd, out = segment(cfg, env={"KIT_DEADLINE": str(deadline)})
    assert out.reason == "deadline", out
    assert (rd.checkpoints / ck.tag_for(out.step) / ck.MANIFEST).exists()
    ended = read_all(rd.path, {"segment_ended"})[-1]
    assert (ended["reason"], ended["step"]) == ("deadline", out.step)
    first = read_all(rd.path, {"step"})[0]
    # the step-1 decision is taken before its step event, with no step or save time known yet
    if out.step == 1:
        assert first["t"] + margin >= deadline, f"stopped at step 1 with {deadline - first['t']:.1f} s left"
    else:
        assert ended["t"] < deadline, f"ended {ended['t'] - deadline:.1f} s after the deadline at step {out.step}"


def test_wrong_world_size_is_refused_with_advice(tiny_cfg: Any) -> None:
    cfg = tiny_cfg("ws")
    rd, out = segment(cfg, stop_after=2)
    assert out.step == 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(torchrun_cmd(rd.path, 1), env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert ("written at layout DP2 (2 ranks: parallel.tensor = 1, parallel.pipeline = 1), this segment runs DP1"
            in proc.stderr)
    assert "Traceback" not in proc.stderr.split("kit: error:")[0][-300:]
    assert (rd.checkpoints / "latest").read_text() == "step_0000002"  # nothing lost


def test_tensorboard_files_match_the_ledger(tiny_cfg: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("tb")
    rd, out = segment(cfg, stop_after=5, seg="a")
    assert out.reason == "segment_limit"
    rd, out = segment(cfg, seg="b")
    assert out.reason == "done"
    acc = EventAccumulator(str(rd.tensorboard))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    led = losses(rd)
    assert sorted(tb) == list(range(1, 9))
    assert all(abs(tb[s] - led[s]) < 1e-6 for s in led)
    assert {"perf/tokens_per_s", "perf/tflops_per_device", "train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """The demo end to end, with its live step lines, and (timings gathered every 2 steps, 3 gathers a
    segment, on this shared 2-core machine) no straggler alert and no alert at all."""
    proc = subprocess.run(["kit", "demo", "--runs-dir", str(tmp_path), "--name", "d", "--steps", "12",
                           "--set", "checkpoint.interval_steps=4", "--set", "health.straggler_interval=2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from step_0000006" in proc.stdout
    lines = [x.strip() for x in proc.stdout.splitlines() if x.strip().startswith("[kit] step ")]
    assert lines[0].startswith("[kit] step 1/12 | loss ") and lines[-1].startswith("[kit] step 12/12 | loss ")
    assert any(x.startswith("[kit] step 7/12 ") for x in lines)  # the resumed segment's first step
    rd = RunDir(tmp_path / "d")
    ended = read_all(rd.path, {"segment_ended"})
    assert [e["reason"] for e in ended] == ["segment_limit", "done"]
    assert len(read_all(rd.path, {"rank_timings"})) == 6
    assert not read_all(rd.path, {"straggler"}) and not read_all(rd.path, {"alert"})
    first = read_all(rd.path, {"segment_first_step"})
    assert [e["step"] for e in first] == [1, 7] and all(e["startup_s"] > e["setup_s"] > 0 for e in first)
    started = read_all(rd.path, {"segment_started"})
    assert all(set(e["startup"]) == {"process", "trainer", "data", "engine", "resumed"} for e in started)
    again = subprocess.run(["kit", "demo", "--runs-dir", str(tmp_path), "--name", "d"], capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_switches_made_mid_segment_are_honoured(tiny_cfg: Any) -> None:
    """A save-now and a stop made while the segment runs (rank 0 looks every trainer.control_check_s,
    not every step): both act, at a step after they were made, and are acknowledged."""
    import threading

    cfg = tiny_cfg("mid", **{"trainer.max_steps": 3000, "checkpoint.interval_steps": 100000,
                             "trainer.control_check_s": 0.5})
    rd = create_run(cfg, log=lambda m: None)
    result: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.update(out=run_local_segment(rd, cfg, seg="m", quiet=True)))
    runner.start()

    def wait_for(what: Any, bound: float = 300.0) -> Any:
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline and runner.is_alive():
            got = what()
            if got:
                return got
            time.sleep(0.1)
        return what()

    try:
        assert wait_for(lambda: len(read_all(rd.path, {"step"})) >= 3)
        made_at = max(e["step"] for e in read_all(rd.path, {"step"}))
        rd.request(SAVE_NOW, "mid-run")
        ack = wait_for(lambda: read_all(rd.path, {"control_ack"}))
        assert ack and ack[0]["switch"] == SAVE_NOW and ack[0]["step"] >= made_at and ack[0]["note"] == "mid-run"
        rd.request(STOP)
        runner.join(timeout=300)
    finally:
        if runner.is_alive():  # never leave the segment behind
            rd.request(STOP)
            runner.join(timeout=300)
    assert result["out"].reason == "stop"
    acks = [(a["switch"], a["step"]) for a in read_all(rd.path, {"control_ack"})]
    assert [s for s, _ in acks] == [SAVE_NOW, STOP] and acks[1][1] > acks[0][1]
    saved = [(e["step"], e["reason"]) for e in read_all(rd.path, {"ckpt_saved"})]
    assert saved == [(acks[0][1], "save-now"), (acks[1][1], "stop")]
    assert not rd.pending(SAVE_NOW) and not rd.pending(STOP)

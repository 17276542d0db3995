"""Asynchronous checkpoints on real DeepSpeed (CPU, gloo): the files are DeepSpeed's own, a crash in the
background write loses nothing but that save, resume stays bit-exact, a save in flight is never dropped.

Each training launch is a real `torchrun` of kit.segment, as `kit train` does (tests/test_trainer.py's
helpers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kit import checkpoint as ck
from kit.ledger import read_all
from tests.test_trainer import assert_same_weights, final_weights, losses, segment

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]


@pytest.mark.parametrize(("zero", "precision"), [(1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_captured_files_are_deepspeeds_own_and_load_back(tmp_path: Path, zero: int, precision: str) -> None:
    """Byte-identical to DeepSpeed's synchronous save although training moved on before the write, and
    engine.load_checkpoint restores the state at the save bit for bit."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "asyncsave_worker.py"), str(zero), precision,
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(line[0][7:])
    assert res["files"]["kit"] == res["files"]["ds"] and len(res["files"]["ds"]) >= 2
    assert res["moved"] and res["restored"] and res["copied"] > 0


def ds_files(rd: Any, tag: str) -> dict[str, str]:
    """sha256 of a checkpoint's files from its manifest."""
    return {f: v.sha256 for f, v in ck.load(rd.checkpoints, tag).manifest.files.items()}


def test_async_saves_match_sync_ones_and_resume_bit_exact(tiny_cfg: Any) -> None:
    """The same 8 steps saved synchronously in one segment, and asynchronously across two segments: the
    same losses, the same files at every common step, the same final tensors."""
    sync, out = segment(tiny_cfg("sync", **{"checkpoint.async_save": False}))
    assert (out.reason, out.step) == ("done", 8)
    cfg = tiny_cfg("async")
    rd, out = segment(cfg, stop_after=3, seg="a")
    assert (out.reason, out.step) == ("segment_limit", 3)
    rd, out = segment(cfg, seg="b")
    assert (out.reason, out.step) == ("done", 8)
    assert losses(sync) == losses(rd) and len(losses(rd)) == 8
    for step in (2, 4, 6, 8):
        assert ds_files(sync, ck.tag_for(step)) == ds_files(rd, ck.tag_for(step)), step
    assert_same_weights(final_weights(sync), final_weights(rd))
    saved = {e["step"]: e for e in read_all(rd.path, {"ckpt_saved"})}
    assert sorted(saved) == [2, 3, 4, 6, 8]
    assert all(saved[s]["async"] is True and 0 <= saved[s]["stall_s"] <= saved[s]["seconds"] for s in (2, 4, 6))
    # a segment's last save (3: the boundary, 8: the end) is written in the loop, which waits for it anyway
    assert all(saved[s]["async"] is False and saved[s]["stall_s"] >= saved[s]["seconds"] - 0.01 for s in (3, 8))
    assert all(e["async"] is False and e["stall_s"] == e["seconds"] for e in read_all(sync.path, {"ckpt_saved"}))
    assert not list(rd.checkpoints.glob(f"*/{ck.WRITTEN_PREFIX}*"))  # the ranks' records are cleared


def test_sigkill_in_the_background_write_keeps_the_previous_checkpoint(tiny_cfg: Any) -> None:
    """Rank 1 is SIGKILLed by kit.faults inside its writer thread, after writing its first file of step 6,
    while training goes on: step 6 never completes, step 4 stays latest, resume from it is bit-exact."""
    ref, _ = segment(tiny_cfg("ref"))
    cfg = tiny_cfg("killed")
    rd, out = segment(cfg, faults="ckpt.async_write@6:rank1", seg="a")
    assert out.reason == "crashed"
    partial = rd.checkpoints / ck.tag_for(6)
    assert partial.is_dir() and not (partial / ck.MANIFEST).exists()
    assert not (partial / ck.WRITTEN.format(rank=1)).exists()
    assert (rd.checkpoints / ck.LATEST).read_text() == ck.tag_for(4)
    assert [e["step"] for e in read_all(rd.path, {"ckpt_saved"})] == [2, 4]
    rd, out = segment(cfg, seg="b")
    assert (out.reason, out.step) == ("done", 8)
    loaded = read_all(rd.path, {"ckpt_loaded"})[-1]
    assert loaded["tag"] == ck.tag_for(4)
    assert f"{ck.tag_for(6)}: incomplete (no MANIFEST.json), ignored" in loaded["skipped"]
    assert losses(ref) == losses(rd)
    assert_same_weights(final_weights(ref), final_weights(rd))


def test_saves_in_flight_complete_before_the_next_save_and_the_segment_end(tiny_cfg: Any) -> None:
    """Every rank's writer sleeps 3 s inside the writes of steps 2 and 4 (kit.faults): the save of step
    4 waits for step 2's, the segment's end (step 5) waits for step 4's, and all three are complete,
    committed in order, before the segment's end is written."""
    cfg = tiny_cfg("inflight")
    rd, out = segment(cfg, stop_after=5, faults="ckpt.async_write@2=sleep3,ckpt.async_write@4=sleep3")
    assert (out.reason, out.step) == ("segment_limit", 5)
    saved = read_all(rd.path, {"ckpt_saved"})
    ended = read_all(rd.path, {"segment_ended"})[-1]
    assert [e["step"] for e in saved] == [2, 4, 5]
    assert all(e["t"] < ended["t"] for e in saved)
    assert saved[0]["seconds"] >= 3 and saved[1]["seconds"] >= 3  # the sleeps were inside these saves
    assert saved[1]["wait_s"] > 0 and saved[2]["wait_s"] > 0  # ...and the next one waited for each
    for step in (2, 4, 5):
        assert not ck.verify(ck.load(rd.checkpoints, ck.tag_for(step)), hashes=True)
    assert (rd.checkpoints / ck.LATEST).read_text() == ck.tag_for(5)


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 2), (2, 1)])
def test_async_files_equal_sync_ones_at_tensor_and_pipeline_layouts(tmp_path: Path, tensor: int, pipeline: int) -> None:
    """4 ranks at PP2xDP2 (DeepSpeed's per-layer files) and TP2xDP2 (per tensor-rank files), ZeRO-1: the
    asynchronous save captures whatever DeepSpeed writes at the layout, and writes the same bytes."""
    from kit.config import load_recipe
    from kit.data import prepare
    from kit.launch import create_run, run_local_segment
    from tests.conftest import tiny_overrides

    files = {}
    for mode in ("sync", "async"):
        o = tiny_overrides(tmp_path / "runs", mode, **{
            "parallel.tensor": tensor, "parallel.pipeline": pipeline, "trainer.nproc": 4, "slurm.tasks_per_node": 4,
            "batch.grad_accum": 4 // (4 // (tensor * pipeline)), "deepspeed.zero_stage": 1,
            "model.hidden_dropout": 0.0, "checkpoint.interval_steps": 4, "checkpoint.async_save": mode == "async",
            "data.prepared": str(tmp_path / "data")})
        cfg = load_recipe(ROOT / "jobs" / "tiny.toml", o)
        prepare(cfg, tmp_path / "data", log=lambda m: None)
        rd = create_run(cfg, log=lambda m: None)
        out = run_local_segment(rd, cfg, seg="a", quiet=True)
        assert (out.reason, out.step) == ("done", 8), (mode, out)
        files[mode] = {s: ds_files(rd, ck.tag_for(s)) for s in (4, 8)}
        if mode == "async":
            assert [(e["step"], e["async"]) for e in read_all(rd.path, {"ckpt_saved"})] == [(4, True), (8, False)]
    assert files["async"] == files["sync"]
    if pipeline > 1:
        assert any(f.startswith("layer_") for f in files["async"][4])  # the pipeline's per-layer files

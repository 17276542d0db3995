"""Live validation at tensor and pipeline layouts (kit.evaluation.Placement), on real DeepSpeed ranks (gloo, CPU).

- tensor 2: both tensor ranks of the one replica run every batch (their collectives need both), the
  first one's result counts; `kit eval` of the checkpoint (shards merged, a plain model) gives the
  same numbers to rounding (split matrix products round differently, as training does at TP).
- pipeline 2 (x DP 2): each stage runs its own layers and sends the activation on; the live numbers
  equal `kit eval`'s of the checkpoint exactly, and training with and without live eval is
  bit-identical (losses and weights). TP 2 x PP 2: to rounding, and the eval.max_fraction stretch works.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kit.config import RunConfig, load_recipe
from kit.launch import create_run, run_local_segment
from kit.ledger import read_all
from kit.rundir import RunDir
from tests.conftest import ROOT, tiny_overrides

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]

TOL = 1e-4  # |live - kit eval| per source at TP 2; training at TP agrees with a plain model to ~4e-7 (docs/parallel.md)


def layout_run(base: Path, name: str, tensor: int, pipeline: int, **extra: object) -> RunConfig:
    o = tiny_overrides(base, name, **{
        "parallel.tensor": tensor, "parallel.pipeline": pipeline, "trainer.nproc": 2, "slurm.tasks_per_node": 2,
        "batch.micro_batch_size": 2, "batch.grad_accum": 4, "deepspeed.zero_stage": 1, "model.hidden_dropout": 0.0,
        "trainer.max_steps": 4, "eval.interval_steps": 2, "eval.sequences": 4, "eval.max_fraction": 0.0, **extra})
    return load_recipe(ROOT / "jobs" / "tiny.toml", o)


def kit_eval(rd: RunDir, step: int) -> dict[str, Any]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run(["kit", "eval", str(rd.path), "--step", str(step), "--samples", "0", "--json"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout)


def test_live_eval_at_tensor_2_agrees_with_kit_eval(tmp_path: Path) -> None:
    cfg = layout_run(tmp_path, "tp2", tensor=2, pipeline=1)
    rd = create_run(cfg, log=lambda m: None)
    assert run_local_segment(rd, cfg, seg="s0", quiet=True).reason == "done"
    live = {e["step"]: e for e in read_all(rd.path, {"eval"}) if e.get("by") == "live"}
    assert sorted(live) == [2, 4]
    assert all(e["dp"] == 1 and all(v["sequences"] == 4 for v in e["sources"].values()) for e in live.values())
    assert live[2]["loss"] != live[4]["loss"]  # two models: the comparison below has teeth
    got = kit_eval(rd, 4)
    assert got["step"] == 4 and set(got["sources"]) == set(live[4]["sources"])
    for name, v in got["sources"].items():
        assert abs(v["loss"] - live[4]["sources"][name]["loss"]) < TOL, name
    assert got["live"]["max_abs_diff"] < TOL


def live_evals(rd: RunDir) -> dict[int, dict[str, Any]]:
    return {e["step"]: e for e in read_all(rd.path, {"eval"}) if e.get("by") == "live"}


def pipe_weights(rd: RunDir, tag: str) -> dict[str, Any]:
    """Every layer file of a pipeline checkpoint (DeepSpeed's layer_XX-model_YY-model_states.pt)."""
    import torch

    files = sorted((rd.checkpoints / tag).glob("layer_*-model_states.pt"))
    assert files, tag
    return {f"{f.name}:{k}": v for f in files for k, v in torch.load(f, map_location="cpu").items()}


@pytest.fixture(scope="module")
def pp2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunDir]:
    """PP 2 x DP 2 (4 ranks), 4 steps, evaluated at steps 2 and 4; and the same run without evaluation.
    Dropout is on, so an evaluation that moved the RNG would change the training that follows it."""
    base = tmp_path_factory.mktemp("pp2")
    out = {}
    for name, on in (("on", True), ("off", False)):
        cfg = layout_run(base, name, tensor=1, pipeline=2, **{"trainer.nproc": 4, "slurm.tasks_per_node": 4,
                                                              "eval.enabled": on,
                                                              "model.hidden_dropout": 0.1})
        rd = create_run(cfg, log=lambda m: None)
        assert run_local_segment(rd, cfg, seg="s0", quiet=True).reason == "done"
        out[name] = rd
    return out


def test_live_eval_at_pipeline_2_equals_kit_eval_exactly(pp2: dict[str, RunDir]) -> None:
    live = live_evals(pp2["on"])
    assert sorted(live) == [2, 4]
    assert all(e["dp"] == 2 and all(v["sequences"] == 4 for v in e["sources"].values()) for e in live.values())
    assert live[2]["loss"] != live[4]["loss"]  # two models: the comparison has teeth
    for step in (2, 4):
        got = kit_eval(pp2["on"], step)
        want = {k: v["loss"] for k, v in live[step]["sources"].items()}
        assert {k: v["loss"] for k, v in got["sources"].items()} == want, step
        assert got["live"]["identical"] and got["live"]["max_abs_diff"] == 0.0


def test_live_eval_at_pipeline_2_leaves_training_bit_identical(pp2: dict[str, RunDir]) -> None:
    on, off = pp2["on"], pp2["off"]
    assert not live_evals(off) and len(live_evals(on)) == 2
    losses = [{e["step"]: e["loss"] for e in read_all(rd.path, {"step"})} for rd in (on, off)]
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4]
    a, b = pipe_weights(on, "step_0000004"), pipe_weights(off, "step_0000004")
    assert a.keys() == b.keys() and len(a) > 4 and all(a[k].equal(b[k]) for k in a)


def test_live_eval_at_tensor_2_pipeline_2_and_its_cost_bound(tmp_path: Path) -> None:
    """TP 2 x PP 2 (4 ranks): evaluated at step 1, where an evaluation far over eval.max_fraction
    stretches the interval (no evaluation at steps 2-4); the numbers agree with `kit eval` to rounding.
    Evaluation batches of 3 and 2 sequences (training's are 2): the stages' send shapes are the
    evaluation's own, not the training schedule's."""
    cfg = layout_run(tmp_path, "tp2pp2", tensor=2, pipeline=2, **{
        "trainer.nproc": 4, "slurm.tasks_per_node": 4, "eval.interval_steps": 1, "eval.max_fraction": 1e-9,
        "checkpoint.interval_steps": 1, "eval.sequences": 5, "eval.micro_batch_size": 3})
    rd = create_run(cfg, log=lambda m: None)
    assert run_local_segment(rd, cfg, seg="s0", quiet=True).reason == "done"
    live = live_evals(rd)
    assert sorted(live) == [1]
    assert live[1]["stretch"] == 1024 and "interval now 1024 steps" in live[1]["note"] and live[1]["fraction"] > 1e-9
    got = kit_eval(rd, 1)
    assert set(got["sources"]) == set(live[1]["sources"])
    assert all(v["sequences"] == 5 for v in live[1]["sources"].values())
    for name, v in got["sources"].items():
        assert abs(v["loss"] - live[1]["sources"][name]["loss"]) < TOL, name
    assert got["live"]["max_abs_diff"] < TOL

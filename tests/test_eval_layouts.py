"""Live validation at tensor and pipeline layouts (kit.evaluation.Placement), on real DeepSpeed ranks (gloo, CPU).

- tensor 2: both tensor ranks of the one replica run every batch (their collectives need both), the
  first one's result counts; `kit eval` of the checkpoint (shards merged, a plain model) gives the
  same numbers to rounding (split matrix products round differently, as training does at TP).
- pipeline 2: no live validation yet; the trainer says so and trains as usual (no eval event), and
  `kit eval` still scores its checkpoints.
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


def layout_run(base: Path, name: str, tensor: int, pipeline: int) -> RunConfig:
    o = tiny_overrides(base, name, **{
        "parallel.tensor": tensor, "parallel.pipeline": pipeline, "trainer.nproc": 2, "slurm.tasks_per_node": 2,
        "batch.micro_batch_size": 2, "batch.grad_accum": 4, "deepspeed.zero_stage": 1, "model.hidden_dropout": 0.0,
        "trainer.max_steps": 4, "eval.interval_steps": 2, "eval.sequences": 4, "eval.max_fraction": 0.0})
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


def test_a_pipeline_layout_trains_without_live_eval_and_says_so(tmp_path: Path, capfd: Any) -> None:
    cfg = layout_run(tmp_path, "pp2", tensor=1, pipeline=2)
    rd = create_run(cfg, log=lambda m: None)
    assert run_local_segment(rd, cfg, seg="s0").reason == "done"
    assert "no live validation with parallel.pipeline > 1" in capfd.readouterr().out
    assert not read_all(rd.path, {"eval"})
    assert [e["step"] for e in read_all(rd.path, {"step"})][-1] == 4
    got = kit_eval(rd, 4)  # its checkpoints are still scored offline
    assert got["step"] == 4 and got["live"] is None and 0 < got["loss"] < 20

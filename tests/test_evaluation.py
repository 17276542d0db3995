"""Live validation on real DeepSpeed ranks (gloo, CPU), `kit eval` and `kit convert` as the CLI runs them.

Runs shared by the tests of this module (module-scoped, each a real torchrun of kit.segment):
- ``evaluated``: eval every 2 steps, 8 steps in three segments that end at steps 3 and 6 (6 is an
  evaluation step): the schedule, the TensorBoard scalars, `kit eval` of a checkpoint and its export;
- ``plain``: the same recipe with evaluation off, in one segment: training must be bit-identical.
tests/eval_worker.py checks DP 1 against DP 2, ZeRO 1-3 and bf16, and a plain model (what `kit eval`
computes) against the engines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kit.config import RunConfig, load_recipe
from kit.data import HELDOUT, MixtureDataset
from kit.launch import create_run, run_local_segment
from kit.ledger import read_all
from kit.rundir import RunDir
from tests.conftest import ROOT, tiny_overrides

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]

WORKER = Path(__file__).with_name("eval_worker.py")
EVAL = {"eval.interval_steps": 2, "eval.sequences": 4, "eval.max_fraction": 0.0}


def config(runs: Path, name: str, **extra: object) -> RunConfig:
    return load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(runs, name, **{**EVAL, **extra}))


def segments(cfg: RunConfig, stops: list[int]) -> RunDir:
    """Segments that each end after ``stops[i]`` steps (0: run to the end); each must end as planned."""
    rd = create_run(cfg, log=lambda m: None)
    for i, stop in enumerate(stops):
        out = run_local_segment(rd, cfg, stop_after_steps=stop, seg=f"s{i}", quiet=True)
        assert out.reason == ("segment_limit" if stop else "done"), (out, i)
    return rd


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunDir]:
    base = tmp_path_factory.mktemp("eval-runs")
    return {"evaluated": segments(config(base, "evaluated"), [3, 3, 0]),
            "plain": segments(config(base, "plain", **{"eval.enabled": False}), [0])}


def evals(rd: RunDir) -> list[dict[str, Any]]:
    return [e for e in read_all(rd.path, {"eval"}) if e.get("by") == "live"]


def losses(rd: RunDir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_all(rd.path, {"step"})}


def weights(rd: RunDir) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(rd.checkpoints), tag=(rd.checkpoints / "latest").read_text())


def kit(*args: str) -> dict[str, Any]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run(["kit", *args, "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return json.loads(out.stdout)


def test_evaluation_leaves_training_bit_identical(runs: dict[str, RunDir]) -> None:
    """Evaluating every 2 steps (across two segment boundaries) changes no loss and no weight."""
    assert not evals(runs["plain"]) and len(evals(runs["evaluated"])) == 4
    assert losses(runs["evaluated"]) == losses(runs["plain"])
    assert len(losses(runs["plain"])) == 8
    a, b = weights(runs["evaluated"]), weights(runs["plain"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_survives_segment_boundaries(runs: dict[str, RunDir]) -> None:
    """Segments end at steps 3 (between evaluations) and 6 (an evaluation step): every multiple of
    eval.interval_steps is evaluated exactly once, in the segment that trained it."""
    rd = runs["evaluated"]
    ev = evals(rd)
    assert [(e["step"], e["seg"]) for e in ev] == [(2, "s0"), (4, "s1"), (6, "s1"), (8, "s2")]
    for e in ev:
        assert set(e["sources"]) == {"fr", "de", "ru", "ja", "zh", "ar-hi"}
        assert all(v["sequences"] == 4 and v["tokens"] == 4 * 31 for v in e["sources"].values())
        assert e["interval_steps"] == 2 and e["stretch"] == 1 and e["seconds"] > 0
    assert ev[0]["loss"] > ev[-1]["loss"]  # the model learns: the numbers mean something
    from kit import checkpoint as ck

    kept = ck.load(rd.checkpoints, "step_0000006").manifest.kit.extra["eval"]
    assert kept["stretch"] == 1 and [s for s, _ in kept["history"]["fr"]] == [2, 4, 6]


def test_tensorboard_has_the_eval_scalars(runs: dict[str, RunDir]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rd = runs["evaluated"]
    acc = EventAccumulator(str(rd.tensorboard))
    acc.Reload()
    led = {e["step"]: e["sources"]["ja"]["loss"] for e in evals(rd)}
    tb = {e.step: e.value for e in acc.Scalars("eval/ja/loss")}
    assert sorted(tb) == [2, 4, 6, 8]
    assert all(abs(tb[s] - led[s]) < 1e-5 for s in led)
    assert {"eval/all/loss", "eval/fr/ppl", "perf/eval_seconds"} <= set(acc.Tags()["scalars"])


def test_heldout_documents_never_reach_a_training_batch(runs: dict[str, RunDir]) -> None:
    """Every sample id of every step the run trained (the step events' consumed/samples) maps, through
    the run's own sampler, to training documents only."""
    rd = runs["evaluated"]
    cfg = rd.load_config()
    ds = MixtureDataset(rd.data, cfg.run.seed, cfg.model.seq_length)
    held = {s["name"]: set(json.loads((rd.data / f"{s['name']}.{HELDOUT}.origins.json").read_text()))
            for s in ds.sources}
    assert all(held.values())  # every source has held-out documents: the check has something to find
    seen: set[str] = set()
    for e in read_all(rd.path, {"step"}):
        for i in range(e["consumed"], e["consumed"] + e["samples"]):
            ref = ds.ref(i)
            origins = ds.origins(ref.source)
            used = {origins[d] for d in ref.docs}
            assert not used & held[ref.source], (i, ref)
            seen |= used
    assert len(seen) > 20


def test_live_eval_equals_kit_eval_of_the_checkpoint_and_its_export(runs: dict[str, RunDir], tmp_path: Path) -> None:
    rd = runs["evaluated"]
    live = {k: v["loss"] for k, v in next(e for e in evals(rd) if e["step"] == 4)["sources"].items()}
    png = tmp_path / "val.png"
    got = kit("eval", str(rd.path), "--step", "4", "--samples", "1", "--new-tokens", "8", "--plot", str(png),
              "--record")
    assert {k: v["loss"] for k, v in got["sources"].items()} == live
    assert got["live"]["identical"] and got["live"]["max_abs_diff"] == 0.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(len(rows) == 1 and rows[0]["prompt"] and rows[0]["continuation"] for rows in got["samples"].values())
    recorded = [e for e in read_all(rd.path, {"eval"}) if e.get("by") == "checkpoint"]
    assert recorded[-1]["step"] == 4 and recorded[-1]["live_max_abs_diff"] == 0.0
    exp = kit("convert", str(rd.path), "--step", "4")  # into <run>/exports: kit eval finds the run above it
    hf = kit("eval", exp["out"], "--samples", "0")
    assert hf["kind"] == "export" and hf["step"] == 4 and hf["live"]["identical"]
    assert {k: v["loss"] for k, v in hf["sources"].items()} == live
    moved = tmp_path / "elsewhere"
    shutil.copytree(exp["out"], moved)  # an export shipped away from its run: name the run
    lost = subprocess.run(["kit", "eval", str(moved)], capture_output=True, text=True, timeout=600)
    assert lost.returncode == 1 and "give its run with --run RUN" in lost.stderr and "Traceback" not in lost.stderr
    again = kit("eval", str(moved), "--run", str(rd.path), "--samples", "0")
    assert {k: v["loss"] for k, v in again["sources"].items()} == live
    later = kit("eval", str(rd.path), "--samples", "0")  # the newest checkpoint: step 8, another model
    assert later["step"] == 8 and later["live"]["identical"] and later["loss"] != got["loss"]


def run_worker(rd: RunDir, nproc: int, stages: str, precision: str) -> list[dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          str(WORKER), str(rd.path), stages, precision], env=env, capture_output=True, text=True,
                         timeout=600)
    results = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and results, out.stdout[-3000:] + out.stderr[-3000:]
    return results


def test_same_numbers_at_any_data_parallel_size_and_zero_stage(runs: dict[str, RunDir]) -> None:
    rd = runs["evaluated"]
    one, two = run_worker(rd, 1, "1,2,3", "fp32"), run_worker(rd, 2, "1,2,3", "fp32")
    bf16 = run_worker(rd, 2, "2", "bf16")
    for r1, r2 in zip(one, two, strict=True):
        assert r1["stage"] == r2["stage"] and (r1["dp"], r2["dp"]) == (1, 2)
        assert r1["first"] == r2["first"], r1["stage"]  # DP 1 == DP 2, exactly
    for r in [*one, *two, *bf16]:
        assert all(r["plain_equal"].values()), r  # a plain model (kit eval's path) agrees exactly
        assert r["train_losses_equal"] and r["last_eval_equal"], r  # evaluating did not change training
        assert r["evals_moved"], r  # ...and training did change the model: the comparison has teeth
    assert bf16[0]["first"] != two[1]["first"]  # bf16 is really another arithmetic


def test_a_stretched_interval_is_kept_across_a_resume(tmp_path: Path) -> None:
    """An evaluation far over eval.max_fraction stretches the interval (said in the event); the
    stretch lives in the checkpoint, so the next segment keeps the schedule instead of evaluating."""
    cfg = config(tmp_path, "stretch", **{"eval.interval_steps": 1, "eval.max_fraction": 1e-9,
                                         "trainer.max_steps": 4})
    rd = segments(cfg, [2, 0])
    ev = evals(rd)
    assert [e["step"] for e in ev] == [1]
    assert ev[0]["stretch"] == 1024 and ev[0]["interval_steps"] == 1024 and "interval now 1024 steps" in ev[0]["note"]
    assert ev[0]["fraction"] > 1e-9
    from kit import checkpoint as ck

    assert ck.load(rd.checkpoints, "step_0000002").manifest.kit.extra["eval"]["stretch"] == 1024
    assert [e["step"] for e in read_all(rd.path, {"segment_ended"})] == [2, 4]


def test_stream_scores_each_checkpoint_it_ships(runs: dict[str, RunDir], tmp_path: Path) -> None:
    """`kit stream --eval` records an eval event (by: stream) per checkpoint shipped, equal to the live
    evaluation of that step where there is one (steps 2, 4, 6, 8; step 3 is a segment's last save)."""
    rd = runs["evaluated"]
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "stream", str(rd.path), "--to",
                          f"file://{tmp_path / 'remote'}", "--once", "--eval"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    streamed = {e["step"]: e for e in read_all(rd.path, {"eval"}) if e.get("by") == "stream"}
    assert sorted(streamed) == [2, 3, 4, 6, 8]
    live = {e["step"]: e for e in evals(rd)}
    for step, e in streamed.items():
        assert e["src"] == "stream" and e["tag"] == f"step_{step:07d}"
        if step in live:
            assert e["live_max_abs_diff"] == 0.0 and e["sources"] == live[step]["sources"]
        else:
            assert e.get("live_max_abs_diff") is None  # null: no live evaluation of a segment-end save


def test_kit_eval_of_a_given_file(runs: dict[str, RunDir], tmp_path: Path) -> None:
    rd = runs["evaluated"]
    data = tmp_path / "probe.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Le chat {i} dort sur le tapis. " * 20}) for i in range(30)))
    got = kit("eval", str(rd.path), "--data", str(data), "--sequences", "3", "--samples", "0")
    assert list(got["sources"]) == ["probe"] and got["sources"]["probe"]["sequences"] == 3
    assert got["data"] == str(data) and got["live"] is None and 0 < got["loss"] < 20
    bad = subprocess.run(["kit", "eval", str(rd.path), "--data", str(tmp_path / "nope.txt")], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 1 and "--data" in bad.stderr and "no such file" in bad.stderr

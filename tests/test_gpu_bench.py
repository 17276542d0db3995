"""bench/gpu_1b7.sh, the prepared GPU script, checked on this CPU machine (no GPU exists here).

What can be checked without a GPU is checked for real: the shell script parses (bash -n) and its
--dry-run runs end to end, printing the plan of a lent 8- or 1-GPU machine; the training recipe it
writes validates with kit's own loader at the chosen layout; the layout choice follows kit's
performance model; the summary reads a real ledger (kit's writer, strict types) and leaves the warm-up
steps out; the matmul part runs (on CPU, small). Not checked: NCCL, NVML and the run on a GPU itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_1b7  # noqa: E402

from kit.ledger import LedgerWriter  # noqa: E402
from kit.recipe import load_recipe  # noqa: E402


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_1b7.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OUT": str(tmp_path / "out"), **env})


def test_the_script_parses() -> None:
    out = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_1b7.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("gpus", "label"), [("8", "TP2 PP1 DP4 ZeRO-1 mb4x4"), ("1", "TP1 PP1 DP1 ZeRO-1 mb4x2"),
                                             ("16", "TP2 PP1 DP4 ZeRO-1 mb4x4")])
def test_dry_run_prints_the_plan_for_8_or_1_gpus(tmp_path: Path, gpus: str, label: str) -> None:
    """8 GPUs: the fastest layout with tensor or pipeline > 1 by kit's model; 1 GPU: the only one;
    more than 8 GPUs (two boards listed) is planned as one node of 8."""
    out = dry_run(tmp_path, GPUS=gpus)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["layout"]["label"] == label and plan["parameters"] > 1.7e9
    assert plan["predicted"]["fits"] and plan["predicted"]["mfu"] > 0
    assert any("kit.tools.cli train" in c for c in plan["commands"])
    assert not (tmp_path / "out" / "plan.json").exists()  # a dry run writes no result


def test_a_forced_layout_is_used_and_an_impossible_one_is_one_line(tmp_path: Path) -> None:
    plan = json.loads(dry_run(tmp_path, GPUS="8", LAYOUT="1,2").stdout)
    assert (plan["layout"]["tensor"], plan["layout"]["pipeline"]) == (1, 2)
    bad = dry_run(tmp_path, GPUS="8", LAYOUT="3,1")
    assert bad.returncode == 2 and "no fitting layout of 8 GPUs has tensor 3" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_written_recipe_validates_at_the_chosen_layout(tmp_path: Path) -> None:
    """What `kit train` will load on the GPU machine: the 1b7 shape, the layout, the bench's settings."""
    assert gpu_1b7.main(["plan", "--gpus", "8", "--steps", "12", "--write", str(tmp_path)]) == 0
    cfg = load_recipe(tmp_path / "recipe.toml")
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.trainer.nproc) == (2, 1, 8)
    assert (cfg.model.hidden_size, cfg.model.n_layer, cfg.data.vocab_size) == (2048, 24, 250880)
    assert cfg.trainer.max_steps == 12 and cfg.deepspeed.precision == "bf16" and cfg.trainer.peak_tflops == 0
    assert cfg.run_dir == tmp_path / "runs" / "gpu-1b7"
    cfg.check_layout(8, "trainer.nproc")


def write_ledger(run: Path, rows: list[tuple[float, float, float]]) -> None:
    with LedgerWriter(run, "rank0", seg="s1") as led:
        led.emit("segment_started", world_size=8, step=0, layout={"tensor": 2, "pipeline": 1, "data": 4})
        for i, (tps, tfl, mfu) in enumerate(rows, start=1):
            led.emit("step", step=i, loss=5.0, tokens_per_s=tps, tflops=tfl, mfu=mfu, step_time=1.0)


def test_summary_leaves_out_the_warm_up_steps(tmp_path: Path, capsys: Any) -> None:
    run = tmp_path / "run"
    (run / "ledger").mkdir(parents=True)
    write_ledger(run, [(1.0, 1.0, 0.01)] * 3 + [(100.0, 400.0, 0.4), (120.0, 420.0, 0.42), (110.0, 410.0, 0.41)])
    assert gpu_1b7.main(["summary", str(run)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["steps"] == 6 and s["steady_steps"] == 3 and s["layout"] == {"tensor": 2, "pipeline": 1, "data": 4}
    assert (s["tokens_per_s"], s["tflops"], s["mfu"]) == (110.0, 410.0, 0.41)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(*[st.floats(0.001, 1e6, allow_nan=False)] * 3), min_size=1, max_size=12))
def test_summary_of_any_ledger_is_a_median_of_its_steps(tmp_path_factory: Any, rows: list[Any]) -> None:
    run = tmp_path_factory.mktemp("r")
    (run / "ledger").mkdir()
    write_ledger(run, rows)
    s = gpu_1b7.cmd_summary(gpu_1b7.argparse.Namespace(run_dir=str(run)))
    steady = rows[gpu_1b7.WARMUP_STEPS:] or rows
    assert min(r[0] for r in steady) - 1e-3 <= s["tokens_per_s"] <= max(r[0] for r in steady) + 1e-3


def test_combine_names_missing_parts(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "matmul.json").write_text(json.dumps({"tflops": 700.0}))
    (tmp_path / "doctor.json").write_text("not json")
    assert gpu_1b7.main(["combine", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["matmul"] == {"tflops": 700.0} and "missing" in out["doctor"] and "missing" in out["train"]


def test_matmul_runs_on_cpu(capsys: Any) -> None:
    """The same code times the GPU's matmul; on CPU it is small and reports no peak (no MFU ceiling here)."""
    assert gpu_1b7.main(["matmul", "--size", "64", "--iters", "2"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 64 and m["tflops"] >= 0 and m["fraction_of_peak"] is None


@pytest.mark.slow
def test_allreduce_part_on_two_gloo_ranks() -> None:
    """The all-reduce part under torchrun, as on the GPU machine but with gloo: rank 0 prints one JSON."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(ROOT / "bench" / "gpu_1b7.py"), "allreduce", "--sizes", "1", "2", "--iters", "2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["ranks"] == 2 and r["backend"] == "gloo" and [x["mib"] for x in r["sizes"]] == [1.0, 2.0]
    assert all(x["busbw_gbps"] > 0 for x in r["sizes"])


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.timeout(600)
def test_the_whole_script_runs_on_cpu_at_the_tiny_shape(deepspeed_ok: None, tmp_path: Path) -> None:
    """Every step of the script's real path (not the dry run), on 2 CPU ranks at the tiny recipe's shape
    (ALLOW_CPU=1, BENCH_RECIPE): the doctor on every rank (it fails here: the recipe expects 2 GPUs and
    there is no NVML, which the script records and goes on), matmul, the all-reduce on gloo, a short
    `kit train` at the layout the script chose, and one combined JSON. What differs on the GPU machine:
    NCCL, NVML and the bloom-1b7 shape."""
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_1b7.sh")], capture_output=True, text=True, timeout=580,
                         env={**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
                              "GPUS": "2", "ALLOW_CPU": "1", "BENCH_RECIPE": str(ROOT / "jobs" / "tiny.toml"),
                              "STEPS": "6", "KIT_IMAGE_TARGET": "", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "gpu_1b7.json").read_text())
    lay = r["plan"]["layout"]
    assert lay["tensor"] * lay["pipeline"] > 1 and lay["tensor"] * lay["pipeline"] * lay["data"] == 2
    assert r["doctor"]["ok"] is False and r["doctor"]["world_size"] == 2  # rank 0's report, read back whole
    assert {c["name"]: c["status"] for c in r["doctor"]["checks"]}["gpu.nvml"] == "fail"
    assert r["matmul"]["tflops"] > 0 and r["allreduce"]["ranks"] == 2
    t = r["train"]
    assert t["steps"] == 6 and t["steady_steps"] == 3 and t["tokens_per_s"] > 0 and t["tflops"] > 0
    assert t["layout"] == {"tensor": lay["tensor"], "pipeline": lay["pipeline"], "data": lay["data"]}
    rcs = dict(line.removeprefix("rc ").split("=") for line in (tmp_path / "out" / "rc.txt").read_text().splitlines())
    assert rcs["doctor_run"] != "0" and rcs["train"] == rcs["matmul"] == rcs["allreduce"] == "0"  # recorded, went on

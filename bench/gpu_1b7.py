"""The Python parts of bench/gpu_1b7.sh: what a lent GPU machine measures for the bloom-1b7 shape.

Why one prepared script: a GPU machine is lent for minutes, with no network; everything it runs
must be decided and checked beforehand, here on CPU (``plan --dry-run`` prints the whole plan, the
tests import every part). Sub-commands:

    python bench/gpu_1b7.py plan --gpus 8 --dry-run     # the layout, the recipe overrides, the commands
    python bench/gpu_1b7.py plan --gpus 1 --write DIR   # writes DIR/recipe.toml (the training run's)
    python bench/gpu_1b7.py matmul                      # bf16 matmul TFLOP/s of this GPU
    torchrun --nproc-per-node 8 bench/gpu_1b7.py allreduce   # NCCL all-reduce busbw (nccl-tests' formula)
    python bench/gpu_1b7.py summary RUN_DIR             # tokens/s, TFLOP/s, MFU of the run's steady steps
    python bench/gpu_1b7.py combine OUT                 # OUT/*.json into one OUT/gpu_1b7.json

The layout: on one GPU the only one (TP1 PP1, the issue's "best single-GPU layout"); on several, the
fastest layout with tensor or pipeline > 1 that fits by kit's performance model (``kit plan
--compare``, H100 preset), unless ``--layout T,P`` says otherwise. Data: the repository's own docs as
text (no download), with BLOOM's 250,880-token vocabulary, so the model has the 1b7 shape exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "jobs" / "bloom-1b7.toml"
WARMUP_STEPS = 3  # steps left out of the medians (allocator warm-up, first NCCL communicators)


def base_overrides(gpus: int) -> list[str]:
    return [f'data.sources=[{{name="docs", path="{ROOT}/docs/*.md", format="text", language="en"}}]',
            "slurm.nodes=1", f"slurm.gpus_per_node={gpus}", f"trainer.nproc={gpus}", 'cluster.preset="h100"']


def choose(gpus: int, layout: str = "", recipe: Path = RECIPE) -> tuple[Any, Any, Any]:
    """(config, chosen plan, fastest plan overall) by kit.perfmodel for ``gpus`` GPUs of one node."""
    from kit import perfmodel
    from kit.errors import ConfigError
    from kit.recipe import load_recipe

    cfg = load_recipe(recipe, base_overrides(gpus))
    plans, _ = perfmodel.compare(cfg, perfmodel.resolve_cluster(cfg))
    fits = [p for p in plans if p.fits] or plans
    if layout:
        t, p = (int(x) for x in layout.split(","))
        pick = [x for x in fits if (x.layout.tensor, x.layout.pipeline) == (t, p)]
        if not pick:
            raise ConfigError(f"--layout {layout}: no fitting layout of {gpus} GPUs has tensor {t} x pipeline {p}; "
                              f"try one of {sorted({(x.layout.tensor, x.layout.pipeline) for x in fits})}")
    else:
        pick = [x for x in fits if x.layout.tensor * x.layout.pipeline > 1] if gpus > 1 else fits
    return cfg, (pick or fits)[0], fits[0]


def train_overrides(gpus: int, plan: Any, steps: int, runs_dir: str) -> list[str]:
    lay = plan.layout
    return [*base_overrides(gpus), f"parallel.tensor={lay.tensor}", f"parallel.pipeline={lay.pipeline}",
            f"deepspeed.zero_stage={lay.zero}", f"batch.micro_batch_size={lay.micro_batch}",
            f"batch.grad_accum={lay.grad_accum}", f"trainer.max_steps={steps}",
            f"optim.warmup_steps={max(1, steps // 4)}", "trainer.peak_tflops=0",
            "checkpoint.interval_steps=1000000", "checkpoint.keep_last=1", "spikes.policy=\"log\"",
            f'run.runs_dir="{runs_dir}"', 'run.name="gpu-1b7"', "doctor.min_free_checkpoints=1",
            "doctor.allreduce_mib=256", "doctor.allreduce_iters=20"]


def cmd_plan(a: argparse.Namespace) -> dict[str, Any]:
    from kit.recipe import load_recipe

    recipe = Path(a.recipe)
    _, plan, best = choose(a.gpus, a.layout, recipe)
    work = Path(a.write or "/tmp/kit-gpu-1b7")
    overrides = train_overrides(a.gpus, plan, a.steps, str(work / "runs"))
    cfg = load_recipe(recipe, overrides)  # validated here, on CPU, before any GPU time is spent
    cfg.check_layout(a.gpus, "trainer.nproc")
    if a.write:
        work.mkdir(parents=True, exist_ok=True)
        (work / "recipe.toml").write_text(cfg.to_toml())
    lay = plan.layout
    return {"gpus": a.gpus, "gpu_name": a.gpu_name, "steps": a.steps,
            "layout": {"tensor": lay.tensor, "pipeline": lay.pipeline, "data": lay.data, "zero": lay.zero,
                       "micro_batch": lay.micro_batch, "grad_accum": lay.grad_accum, "label": lay.label()},
            "global_batch": plan.global_batch, "tokens_per_step": plan.tokens_per_step,
            "parameters": plan.parameters, "run_dir": str(cfg.run_dir), "recipe": str(work / "recipe.toml"),
            "predicted": _predicted(plan), "predicted_best": {"label": best.layout.label(), **_predicted(best)},
            "overrides": overrides,
            "commands": [f"torchrun --standalone --nproc-per-node {a.gpus} -m kit.tools.cli doctor {work}/recipe.toml",
                         "python bench/gpu_1b7.py matmul",
                         f"torchrun --standalone --nproc-per-node {a.gpus} bench/gpu_1b7.py allreduce",
                         f"python -m kit.tools.cli train {work}/recipe.toml",
                         f"python bench/gpu_1b7.py summary {cfg.run_dir}"]}


def _predicted(p: Any) -> dict[str, Any]:
    return {"tflops_per_gpu": round(p.tflops_per_gpu, 1), "mfu": round(p.mfu, 4),
            "tokens_per_s": round(p.tokens_per_s, 1), "memory_gib": round(p.memory.total / 2**30, 1),
            "fits": p.fits}


def cmd_matmul(a: argparse.Namespace) -> dict[str, Any]:
    """Dense bf16 matmul throughput (the ceiling MFU is measured against, in practice)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = a.size if dev == "cuda" else min(a.size, 512)
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(a.iters):
        x @ y
    _sync(dev)
    dt = (time.perf_counter() - t0) / a.iters
    from kit.model import peak_tflops

    tflops, peak = 2 * n**3 / dt / 1e12, peak_tflops(0)
    return {"device": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu",
            "n": n, "dtype": "bf16", "seconds": dt, "tflops": round(tflops, 2), "peak_tflops": peak,
            "fraction_of_peak": round(tflops / peak, 4) if peak else None}


def _sync(dev: str) -> None:
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()


def cmd_allreduce(a: argparse.Namespace) -> dict[str, Any] | None:
    """All-reduce busbw over every rank (NCCL on GPUs), per buffer size; rank 0 returns the result."""
    import torch
    import torch.distributed as dist

    from kit.tools.doctor_net import _max_over, _timed_allreduce, busbw

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    rows = []
    for mib in a.sizes:
        buf = torch.ones(int(mib * 2**20) // 4, dtype=torch.float32, device="cuda" if cuda else "cpu")
        t = _max_over(_timed_allreduce(buf, a.iters, None, rank))
        algbw, bus = busbw(buf.numel() * 4, t, n)
        rows.append({"mib": mib, "time_ms": round(t * 1e3, 4), "algbw_gbps": round(algbw, 2),
                     "busbw_gbps": round(bus, 2)})
    dist.destroy_process_group()
    return {"ranks": n, "backend": "nccl" if cuda else "gloo", "sizes": rows} if rank == 0 else None


def cmd_summary(a: argparse.Namespace) -> dict[str, Any]:
    """Medians over the run's steps after the warm-up, as the ledger recorded them."""
    from kit.ledger import read_all

    steps = sorted(read_all(a.run_dir, {"step"}), key=lambda e: e["step"])
    started = [e for e in read_all(a.run_dir, {"segment_started"})]
    steady = steps[WARMUP_STEPS:] or steps
    out: dict[str, Any] = {"run_dir": str(a.run_dir), "steps": len(steps), "steady_steps": len(steady),
                           "layout": started[-1].get("layout") if started else None}
    for k in ("tokens_per_s", "tflops", "mfu", "step_time", "loss"):
        vals = [float(e[k]) for e in steady if e.get(k) is not None]
        out[k] = round(statistics.median(vals), 4) if vals else None
    return out


def cmd_combine(a: argparse.Namespace) -> dict[str, Any]:
    """Every part's JSON (absent or unreadable parts are named as such) into one result."""
    out: dict[str, Any] = {"bench": "gpu_1b7", "host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                              time.gmtime())}
    for part in ("plan", "doctor", "matmul", "allreduce", "train"):
        f = Path(a.out) / f"{part}.json"
        try:
            out[part] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            out[part] = {"missing": f"{f.name}: {e}"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("plan")
    s.add_argument("--gpus", type=int, default=1)
    s.add_argument("--gpu-name", default="")
    s.add_argument("--layout", default=os.environ.get("LAYOUT", ""), help="T,P: force this tensor, pipeline")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--write", default="", help="write the training recipe here")
    s.add_argument("--recipe", default=str(RECIPE), help="the shape (default bloom-1b7; tests: tiny)")
    s.add_argument("--dry-run", action="store_true", help="only print the plan (the default without --write)")
    s = sub.add_parser("matmul")
    s.add_argument("--size", type=int, default=8192)
    s.add_argument("--iters", type=int, default=50)
    s = sub.add_parser("allreduce")
    s.add_argument("--sizes", type=float, nargs="+", default=[64.0, 256.0, 1024.0])
    s.add_argument("--iters", type=int, default=20)
    s = sub.add_parser("summary")
    s.add_argument("run_dir")
    s = sub.add_parser("combine")
    s.add_argument("out")
    a = p.parse_args(argv)
    from kit.errors import KitError

    try:
        result = {"plan": cmd_plan, "matmul": cmd_matmul, "allreduce": cmd_allreduce, "summary": cmd_summary,
                  "combine": cmd_combine}[a.cmd](a)
    except KitError as e:  # a bad plan: one line that says what to change, no traceback
        print(f"gpu_1b7 {a.cmd}: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

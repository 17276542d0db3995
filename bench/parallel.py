"""bench/parallel: tokens/s of each tensor x pipeline x data layout against plain data parallel, one run.

Every layout trains the same model at the same global batch (micro 2 x grad_accum x data = 16
samples) on the same 4 CPU ranks (gloo), through kit's engine and step path (kit.engine.build_engine,
kit.parallel.stepper, with the trainer's one all-reduce per step). Launches alternate between the
layouts for several rounds; each launch times its steps after a warm-up, and the median step time
over all rounds gives tokens/s. Printed and saved (bench/results/parallel.json) as a ratio to DP4.

    python bench/parallel.py [--hidden 256] [--layers 4] [--seq 128] [--steps 6] [--rounds 2]

What the ratios mean on this machine: 4 ranks on 2 shared cores, gloo over loopback. Tensor
parallelism adds two all-reduces of activations per block per micro-batch, pipeline parallelism a
bubble of (stages - 1) / (micro-batches + stages - 1) and point-to-point sends; on CPUs with no fast
interconnect and oversubscribed cores both cost more than on a GPU node. The ratios show those costs,
not what the layouts buy on a cluster (memory per rank, which kit plan models).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]  # (tensor, pipeline) on 4 ranks
RANKS, MICRO, GLOBAL = 4, 2, 16


def launch(tensor: int, pipeline: int, args: argparse.Namespace) -> list[float]:
    data = RANKS // (tensor * pipeline)
    overrides = [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}", f"trainer.nproc={RANKS}",
                 f"slurm.tasks_per_node={RANKS}", f"batch.micro_batch_size={MICRO}",
                 f"batch.grad_accum={GLOBAL // (MICRO * data)}", "deepspeed.zero_stage=1",
                 f"model.hidden_size={args.hidden}", f"model.n_layer={args.layers}", "model.n_head=8",
                 f"model.seq_length={args.seq}", "model.hidden_dropout=0.0", "data.vocab_size=4096"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           str(ROOT / "bench" / "_parallel_worker.py"), str(ROOT / "jobs" / "tiny.toml"), "2", str(args.steps),
           *overrides]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((x for x in out.stdout.splitlines() if x.startswith("TIMES ")), None)
    if line is None:
        raise SystemExit(f"TP{tensor} PP{pipeline} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    times: list[float] = json.loads(line[6:])
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    times: dict[str, list[float]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for t, p in LAYOUTS:
            name = str(_layout(t, p))
            times.setdefault(name, []).extend(launch(t, p, args))
            load.append(os.getloadavg()[0])
    tokens = GLOBAL * args.seq
    base = statistics.median(times["DP4"])
    results = []
    for name, ts in times.items():
        step = statistics.median(ts)
        r = {"layout": name, "median_step_s": round(step, 4), "tokens_per_s": round(tokens / step, 1),
             "ratio_vs_dp4": round(base / step, 3), "steps": len(ts)}
        results.append(r)
        print(f"{name:>10}: {r['median_step_s']:.3f} s/step, {r['tokens_per_s']:8.1f} tokens/s, "
              f"{r['ratio_vs_dp4']:.2f}x DP4", flush=True)
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{os.cpu_count()} CPUs, {RANKS} ranks, gloo",
           "load_avg_1m": [round(x, 2) for x in load], "model": {"hidden": args.hidden, "layers": args.layers,
                                                                 "heads": 8, "seq": args.seq, "vocab": 4096},
           "global_batch": GLOBAL, "micro_batch": MICRO, "results": results}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "parallel.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def _layout(tensor: int, pipeline: int) -> object:
    sys.path.insert(0, str(ROOT))
    from kit.parallel.layout import Layout

    return Layout.of(tensor, pipeline, RANKS)


if __name__ == "__main__":
    sys.exit(main())

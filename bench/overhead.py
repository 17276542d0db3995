"""bench/overhead: the kit's per-step overhead against a bare DeepSpeed loop, side by side in one run.

One process per rank builds the kit's trainer (ledger, TensorBoard, health sampler and watchdog,
spike guard, control checks) and steps the SAME engine on the same data in two ways, in alternating
ABBA blocks: bare DeepSpeed steps (forward, backward, step) and kit steps (Trainer.step_once). The
figure is the ratio of the median block time per step. Checkpoints are out of the window.

    python bench/overhead.py [--hidden 64] [--layers 2] [--block 20] [--rounds 10]
Target (issue 2): overhead <= 2% of step time (aim for 1%). The tiny default model (~20 ms steps on
2 CPU ranks) is the worst case for a fixed per-step cost; real GPU steps take seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(hidden: int, layers: int, block: int, rounds: int) -> dict:
    from kit.config import load_recipe
    from kit.launch import create_run

    tmp = Path(tempfile.mkdtemp(prefix="kit-bench-overhead-"))
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [
        f'run.name="h{hidden}"', f'run.runs_dir="{tmp}"', "trainer.max_steps=1000000",
        "checkpoint.interval_steps=1000000", f"model.hidden_size={hidden}", f"model.n_layer={layers}",
    ])
    rd = create_run(cfg, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "bench" / "_overhead_worker.py"), str(rd.path), str(block), str(rounds)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("TIMES ")), None)
    if line is None:
        raise SystemExit(f"worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    times = json.loads(line[6:])
    bare, kit = statistics.median(times["bare"]), statistics.median(times["kit"])
    bcpu, kcpu = statistics.median(times["bare_cpu"]), statistics.median(times["kit_cpu"])
    return {"hidden": hidden, "layers": layers, "block": block, "rounds": rounds,
            "bare_ms_per_step": round(bare * 1e3, 3), "kit_ms_per_step": round(kit * 1e3, 3),
            "overhead_pct": round((kit / bare - 1) * 100, 2), "overhead_ms": round((kit - bare) * 1e3, 3),
            "bare_cpu_ms_per_step": round(bcpu * 1e3, 3), "kit_cpu_ms_per_step": round(kcpu * 1e3, 3),
            "cpu_overhead_pct": round((kcpu / bcpu - 1) * 100, 2),
            "block_ms": {k: [round(v * 1e3, 2) for v in vs] for k, vs in times.items()}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--shapes", default="64x2,256x4", help="comma-separated HIDDENxLAYERS models")
    args = ap.parse_args()
    results = []
    for shape in args.shapes.split(","):
        h, n = (int(x) for x in shape.split("x"))
        r = run(h, n, args.block, args.rounds)
        results.append(r)
        print(f"hidden {h} x {n} layers: wall bare {r['bare_ms_per_step']:.2f} / "
              f"kit {r['kit_ms_per_step']:.2f} ms/step "
              f"= {r['overhead_pct']:+.2f}%; CPU (rank 0 process) bare {r['bare_cpu_ms_per_step']:.2f} / kit "
              f"{r['kit_cpu_ms_per_step']:.2f} ms/step = {r['cpu_overhead_pct']:+.2f}% "
              f"[target <= 2%: wall {'MET' if r['overhead_pct'] <= 2 else 'NOT MET'}, "
              f"CPU {'MET' if r['cpu_overhead_pct'] <= 2 else 'NOT MET'}]", flush=True)
    load = os.getloadavg()[0]
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{os.cpu_count()} CPUs, 2 ranks, gloo",
           "load_avg_1m": round(load, 2), "target_pct": 2.0, "results": results}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "overhead.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

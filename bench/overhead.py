"""bench/overhead: the kit's per-step overhead against a bare DeepSpeed loop, side by side.

Same model, data, DeepSpeed config and batches, 2 ranks on this machine. The kit side is a real
`kit` segment (ledger, TensorBoard, control checks, the per-step flag all-reduce, deadline check,
and whatever hooks the trainer runs each step); the bare side is bench/_bare_loop.py. Rounds
alternate bare/kit to spread machine noise over both; the figure is the ratio of median wall time
between consecutive steps (warm-up steps dropped). Checkpoints are out of the measured window.

    python bench/overhead.py [--steps 200] [--rounds 3] [--hidden 64]
Target (issue 2): overhead <= 2% of step time (aim for 1%).
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


def intervals(stamps: list[float], warm: int) -> list[float]:
    return [b - a for a, b in zip(stamps[warm:], stamps[warm + 1 :], strict=False)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=64, help="model width (64 = the embedded default)")
    args = ap.parse_args()

    from kit.config import load_recipe
    from kit.launch import create_run, run_local_segment
    from kit.ledger import read_all

    tmp = Path(tempfile.mkdtemp(prefix="kit-bench-overhead-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    bare_med, kit_med = [], []
    for r in range(args.rounds):
        cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [
            f'run.name="r{r}"', f'run.runs_dir="{tmp}"', f"trainer.max_steps={args.steps}",
            f"checkpoint.interval_steps={args.steps * 10}", f"model.hidden_size={args.hidden}",
        ])
        rd = create_run(cfg, log=lambda m: None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "bench" / "_bare_loop.py"), str(rd.path), str(args.steps)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        stamps = json.loads(next(line for line in out.splitlines() if line.startswith("BARE "))[5:])
        bare_med.append(statistics.median(intervals(stamps, args.warm)))
        outcome = run_local_segment(rd, cfg, seg="bench", quiet=True)
        assert outcome.reason == "done", outcome
        steps = read_all(rd.path, {"step"})
        kit_med.append(statistics.median(intervals([e["t"] for e in steps], args.warm)))
        print(f"round {r}: bare {bare_med[-1] * 1e3:.2f} ms/step, kit {kit_med[-1] * 1e3:.2f} ms/step, "
              f"overhead {(kit_med[-1] / bare_med[-1] - 1) * 100:+.2f}%", flush=True)
    bare, kit = statistics.median(bare_med), statistics.median(kit_med)
    overhead = kit / bare - 1
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{os.cpu_count()} CPUs, 2 ranks, gloo",
              "hidden": args.hidden, "steps": args.steps, "rounds": args.rounds,
              "bare_ms_per_step": round(bare * 1e3, 3), "kit_ms_per_step": round(kit * 1e3, 3),
              "overhead_pct": round(overhead * 100, 2), "target_pct": 2.0, "met": overhead <= 0.02,
              "per_round_overhead_pct": [round((k / b - 1) * 100, 2) for b, k in zip(bare_med, kit_med, strict=True)]}
    print(f"overhead: kit {kit * 1e3:.2f} ms vs bare {bare * 1e3:.2f} ms per step = {overhead * 100:+.2f}% "
          f"(target <= 2%): {'MET' if result['met'] else 'NOT MET'}")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / f"overhead-h{args.hidden}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

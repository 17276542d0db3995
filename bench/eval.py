"""bench/eval: validation throughput against training, and the cost of live evaluation, in one run.

Per model shape, one torchrun of bench/_eval_worker.py (2 CPU ranks, gloo) on the shipped tiny recipe
with that shape and its default [eval] section (16 sequences per source, every eval.interval_steps):

- tokens/s of the live evaluation (kit.evaluation.Evaluator.evaluate) against a training step
  (forward + backward + step) and against the training forward pass alone, in ABBA rounds;
- the overhead of live evaluation at the default interval: blocks of exactly interval kit steps with the
  evaluator on (one evaluation each) and off, ABBA, median block time on/off - 1.

    python bench/eval.py [--shapes 64x2,256x4] [--rounds 6] [--blocks 2]
Targets (issue 12): evaluation >= 2x the training step's tokens/s (no backward); overhead <= 5%.
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


def run(hidden: int, layers: int, rounds: int, blocks: int) -> dict:
    from kit.config import EvalSection, load_recipe
    from kit.launch import create_run

    tmp = Path(tempfile.mkdtemp(prefix="kit-bench-eval-"))
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [
        f'run.name="h{hidden}"', f'run.runs_dir="{tmp}"', "trainer.max_steps=1000000", "optim.warmup_steps=10",
        "checkpoint.interval_steps=1000000", f"model.hidden_size={hidden}", f"model.n_layer={layers}",
        f"eval.interval_steps={EvalSection().interval_steps}",  # the default interval, not the tiny demo's
    ])
    rd = create_run(cfg, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "bench" / "_eval_worker.py"), str(rd.path), str(rounds), str(blocks)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    r = json.loads(line[7:])
    tps = {k: statistics.median(v) for k, v in r["tokens_per_s"].items()}
    tpc = {k: statistics.median(v) for k, v in r["tokens_per_cpu_s"].items()}
    med = {k: statistics.median(v) for k, v in r["block_s"].items()}
    on, off = med["on"], med["off"]
    evals = [e for e in _read_evals(rd.path) if e.get("by") == "live"]
    fractions = [e["fraction"] for e in evals if isinstance(e.get("fraction"), float)]
    return {"hidden": hidden, "layers": layers, "seq_length": cfg.model.seq_length,
            "global_batch": r["global_batch"], "eval_sequences": r["eval_sequences"], "interval": r["interval"],
            "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "eval_vs_train_step": round(tps["eval"] / tps["train"], 2),
            "eval_vs_train_forward": round(tps["eval"] / tps["fwd"], 2),
            "tokens_per_cpu_s": {k: round(v, 1) for k, v in tpc.items()},
            "cpu_eval_vs_train_step": round(tpc["eval"] / tpc["train"], 2),
            "cpu_eval_vs_train_forward": round(tpc["eval"] / tpc["fwd"], 2),
            "block_s": {k: round(v, 3) for k, v in med.items()},
            "overhead_pct": round((on / off - 1) * 100, 2),
            "cpu_overhead_pct": round((med["on_cpu"] / med["off_cpu"] - 1) * 100, 2),
            "measured_fraction_pct": round(100 * statistics.median(fractions), 3) if fractions else None,
            "stretch": r["stretch"], "rounds": rounds, "blocks": blocks,
            "samples": {k: [round(x, 1) for x in v] for k, v in r["tokens_per_s"].items()},
            "block_samples_s": {k: [round(x, 3) for x in v] for k, v in r["block_s"].items()}}


def _read_evals(run: Path) -> list[dict]:
    from kit.ledger import read_all

    return read_all(run, {"eval"})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="64x2,256x4", help="comma-separated HIDDENxLAYERS models")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--blocks", type=int, default=2, help="ABBA groups of on/off blocks of `interval` steps")
    args = ap.parse_args()
    results = []
    load0 = os.getloadavg()[0]
    for shape in args.shapes.split(","):
        h, n = (int(x) for x in shape.split("x"))
        r = run(h, n, args.rounds, args.blocks)
        results.append(r)
        t = r["tokens_per_s"]
        print(f"hidden {h} x {n}: eval {t['eval']:,.0f} tok/s, train step {t['train']:,.0f}, train forward "
              f"{t['fwd']:,.0f} -> eval/train step {r['eval_vs_train_step']:.2f}x "
              f"[target >= 2x: {'MET' if r['eval_vs_train_step'] >= 2 else 'NOT MET'}], eval/forward "
              f"{r['eval_vs_train_forward']:.2f}x (CPU time: {r['cpu_eval_vs_train_step']:.2f}x, "
              f"{r['cpu_eval_vs_train_forward']:.2f}x); live eval every {r['interval']} steps: blocks on "
              f"{r['block_s']['on']:.2f}s / off {r['block_s']['off']:.2f}s = {r['overhead_pct']:+.2f}% wall, "
              f"{r['cpu_overhead_pct']:+.2f}% CPU (the evaluations' own measure: {r['measured_fraction_pct']}%) "
              f"[target <= 5%: {'MET' if max(r['overhead_pct'], r['cpu_overhead_pct']) <= 5 else 'NOT MET'}]",
              flush=True)
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{os.cpu_count()} CPUs, 2 ranks, gloo",
           "load_avg_1m": {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)},
           "targets": {"eval_vs_train_step": 2.0, "overhead_pct": 5.0}, "results": results}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "eval.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

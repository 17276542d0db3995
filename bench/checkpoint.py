"""bench/checkpoint: the training loop's stall per save, asynchronous vs synchronous, on the same model
in one run (issue 15), and how much slower steps are while a save is being written.

    python bench/checkpoint.py [--hidden 768] [--layers 12] [--ranks 1] [--rounds 4] [--idle-steps 3]

Goals: the asynchronous stall <= 10% of the synchronous save's, and steps taken while the writer
runs no more than 5% slower than steps without a save in flight. One rank by default: on this 2-core
machine a rank's training thread and its writer thread then each have a core, as a GPU node's
training (on the GPU) and writer (on the host CPUs) do; with 2 ranks the two writers compete with
two training threads for 2 cores, which says nothing about a GPU node (``--ranks 2`` measures it).
Results in bench/results/checkpoint.json, with the machine's load.
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


def run(hidden: int, layers: int, ranks: int, rounds: int, idle_steps: int) -> dict:
    from kit.config import load_recipe
    from kit.launch import create_run

    tmp = Path(tempfile.mkdtemp(prefix="kit-bench-ckpt-", dir=os.environ.get("KIT_BENCH_DIR")))
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [
        f'run.name="h{hidden}"', f'run.runs_dir="{tmp}"', "trainer.max_steps=1000000",
        "checkpoint.interval_steps=1000000", "checkpoint.keep_last=2", f"model.hidden_size={hidden}",
        f"model.n_layer={layers}", "model.n_head=16", "model.seq_length=64", "batch.micro_batch_size=2",
        "batch.grad_accum=1", f"trainer.nproc={ranks}", "health.straggler_interval=0",
    ])
    rd = create_run(cfg, log=lambda m: None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "bench" / "_checkpoint_worker.py"), str(rd.path), str(rounds), str(idle_steps)]
    load0 = os.getloadavg()[0]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    r = json.loads(line[7:])
    med = statistics.median
    sync_stall, async_stall = med(r["sync_stall"]), med(r["async_stall"])
    idle, writing = med(r["idle_step"]), (med(r["writing_step"]) if r["writing_step"] else None)
    return {
        "hidden": hidden, "layers": layers, "ranks": ranks, "rounds": rounds, "params_M": round(r["params"] / 1e6, 1),
        "checkpoint_bytes": r["bytes"], "snapshot_bytes_per_rank": max(r["async_snapshot_bytes"], default=0),
        "sync_stall_s": round(sync_stall, 3), "async_stall_s": round(async_stall, 3),
        "stall_ratio": round(async_stall / sync_stall, 4),
        "snapshot_gb_per_s": round(max(r["async_snapshot_bytes"], default=0) / async_stall / 1e9, 2),
        "sync_total_s": round(med(r["totals"]["sync"]), 3), "async_total_s": round(med(r["totals"]["async"]), 3),
        "idle_step_s": round(idle, 4), "writing_step_s": None if writing is None else round(writing, 4),
        "writing_slowdown_pct": None if writing is None else round((writing / idle - 1) * 100, 2),
        "steps_per_async_save": r["writing_steps_per_save"],
        "sync_save_cpu_s": round(med(r["sync_cpu"]), 3), "async_writer_cpu_s": round(med(r["async_writer_cpu"]), 3),
        "idle_step_cpu_s": round(med(r["idle_step_cpu"]), 4),
        "writing_step_cpu_s": round(med(r["writing_step_cpu"]), 4) if r["writing_step_cpu"] else None,
        "writing_cpu_slowdown_pct": round((med(r["writing_step_cpu"]) / med(r["idle_step_cpu"]) - 1) * 100, 2)
        if r["writing_step_cpu"] else None,
        "raw": {k: [round(x, 4) for x in r[k]] for k in ("sync_stall", "async_stall", "idle_step", "writing_step",
                                                          "idle_step_cpu", "writing_step_cpu")},
        "ledger_stall_s": r["ledger_stall"], "load_avg_1m_before": round(load0, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--note", default="", help="a remark stored with the result")
    ap.add_argument("--idle-steps", type=int, default=3)
    a = ap.parse_args()
    res = run(a.hidden, a.layers, a.ranks, a.rounds, a.idle_steps)
    res["note"] = a.note
    stall_ok = res["stall_ratio"] <= 0.10
    slow = res["writing_slowdown_pct"]
    print(f"{res['params_M']}M params, {res['checkpoint_bytes'] / 1e9:.2f} GB checkpoint, {a.ranks} rank(s): "
          f"stall sync {res['sync_stall_s']:.3f} s / async {res['async_stall_s']:.3f} s = {res['stall_ratio']:.1%} "
          f"[goal <= 10%: {'MET' if stall_ok else 'NOT MET'}]; async save total {res['async_total_s']:.2f} s "
          f"(sync {res['sync_total_s']:.2f} s); steps {res['idle_step_s']:.3f} s idle / "
          f"{res['writing_step_s'] if res['writing_step_s'] is not None else 'n/a'} s while writing = "
          f"{slow if slow is not None else 'n/a'}% [goal <= 5%: "
          f"{'MET' if slow is not None and slow <= 5 else 'NOT MET'}]; training thread CPU per step "
          f"{res['writing_cpu_slowdown_pct']}% more while writing; load {res['load_avg_1m_before']}-"
          f"{res['load_avg_1m_after']}", flush=True)
    doc = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{os.cpu_count()} CPUs, gloo, ext4",
           "goals": {"stall_ratio_max": 0.10, "writing_slowdown_pct_max": 5.0}, "results": [res]}
    path = ROOT / "bench" / "results" / "checkpoint.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    keep = [x for x in old.get("results", []) if (x.get("hidden"), x.get("layers"), x.get("ranks")) !=
            (a.hidden, a.layers, a.ranks)]
    doc["results"] = [*keep, res]
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

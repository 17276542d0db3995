"""bench/spikes: the postmortem of a 1,000,000-step ledger, and the live detector's cost per step.

1. Postmortem: a synthetic ledger of 1,000,000 step events (the trainer's field layout, ~300 MB,
   30 planted spikes, one live spike + rollback) in a real run directory; `kit spikes --json`'s
   analysis (tools.postmortem.analyse, no batch analysis: that is per spike, not per step) timed
   end to end, best of N; the Markdown+PNG report timed apart. Side by side: kit.ledger.read_all
   (one dict per event) on the first 100,000 events against the columnar reader on the same file.
2. Detector: real 2-rank `kit` segments of the tiny recipe. The figure: inside a normal run
   (bench/_spikes_timed.py clocks Trainer._check_spikes), the guard's median time per step against
   that run's median step. Beside it, side by side, whole runs with the guard on and off
   (bench/_spikes_off.py), alternating rounds: on a shared machine this one is mostly noise.
   And SpikeGuard.check alone, in microseconds.

    python bench/spikes.py [--steps 1000000] [--rounds 2] [--train-steps 150]
Targets (issue 8): postmortem <= 2 s; detector cost negligible against a step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LINE = ('{"v":1,"t":%.6f,"kind":"step","src":"train-r0","seg":"1","step":%d,"loss":%r,"grad_norm":%r,"lr":%r,'
        '"consumed":%d,"samples":1024,"tokens":2097152,"step_time":0.5,"tokens_per_s":4194304.0,'
        '"samples_per_s":2048.0,"tflops":150.0,"mfu":0.45,"nonfinite":false}\n')


def write_ledger(run: Path, n: int, planted: list[int]) -> None:
    """The trainer's step events, written as text (json.dumps would take longer than the bench)."""
    rng = random.Random(0)
    spikes = set(planted)
    with open(run / "ledger" / "train-r0.jsonl", "w") as f:
        buf = []
        for s in range(1, n + 1):
            loss = (2.0 + 4.0 * math.exp(-s / 20000)) * math.exp(rng.gauss(0, 0.01)) * (1.6 if s in spikes else 1.0)
            buf.append(LINE % (1.7e9 + s * 0.5, s, loss, 0.3 * math.exp(rng.gauss(0, 0.05)), 1e-4, (s - 1) * 1024))
            if len(buf) == 20000:
                f.write("".join(buf))
                buf = []
        f.write("".join(buf))
    from kit.ledger import LedgerWriter

    with LedgerWriter(run, "train-r0") as led:  # a live spike and its rollback, as the trainer writes them
        led.emit("spike", step=n - 500, loss=9.9, metric="loss", value=9.9, median=2.0, size=3.9, score=50.0,
                 nonfinite=False, action="rollback", consumed=(n - 501) * 1024, samples=1024)
        led.emit("rollback", from_step=n - 500, to_step=n - 600, spike_step=n - 500, tag=f"step_{n - 600:07d}",
                 skip_start=(n - 501) * 1024, skip_end=(n - 301) * 1024, skip_batches=200, rollbacks=1)


def bench_postmortem(steps: int, reps: int) -> dict[str, object]:
    from kit.config import load_recipe
    from kit.ledger import read_all
    from kit.rundir import RunDir
    from kit.tools.postmortem import analyse
    from kit.tools.spike_ledger import read_ledger
    from kit.tools.spike_report import write_report

    tmp = Path(tempfile.mkdtemp(prefix="kit-bench-spikes-"))
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", ['run.name="big"', f'run.runs_dir="{tmp}"'])
    rd = RunDir(cfg.run_dir)
    rd.create(cfg)
    planted = sorted(random.Random(1).sample(range(1000, steps - 1000), 30))
    t0 = time.perf_counter()
    write_ledger(rd.path, steps, planted)
    print(f"ledger: {steps:,} step events, {(rd.ledger / 'train-r0.jsonl').stat().st_size / 1e6:.0f} MB "
          f"written in {time.perf_counter() - t0:.1f}s", flush=True)
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        res = analyse(rd.path, data=False)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    found = {s["start"] for s in res["spikes"]}
    t0 = time.perf_counter()
    write_report(res, tmp / "report")
    report_s = time.perf_counter() - t0
    # side by side on the first 100,000 events: one dict per event vs columns
    sub = Path(tempfile.mkdtemp(prefix="kit-bench-spikes-sub-"))
    (sub / "ledger").mkdir()
    with open(rd.ledger / "train-r0.jsonl", "rb") as src, open(sub / "ledger" / "train-r0.jsonl", "wb") as dst:
        for _ in range(100_000):
            dst.write(src.readline())
    t0 = time.perf_counter()
    n_dicts = len(read_all(sub, {"step"}))
    dict_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_cols = len(read_ledger(sub).timeline)
    col_s = time.perf_counter() - t0
    assert n_dicts == n_cols == 100_000
    best = min(times)
    walls = ", ".join(f"{t:.2f}" for t in times)
    print(f"postmortem of {steps:,} steps: best {best:.2f}s wall of {reps} (all: {walls}; "
          f"CPU time of the process, all threads: {min(cpu):.2f}s; load {os.getloadavg()[0]:.1f}), "
          f"target <= 2 s: {'MET' if best <= 2 else 'NOT MET'}; found {len(found & set(planted))}/{len(planted)} "
          f"planted + {len(found - set(planted))} other; report with PNGs {report_s:.2f}s more")
    print(f"reader, 100,000 events: kit.ledger.read_all {dict_s:.2f}s vs columnar {col_s:.2f}s "
          f"= {dict_s / col_s:.1f}x faster", flush=True)
    return {"steps": steps, "seconds_best": round(best, 3), "seconds_all": [round(t, 3) for t in times],
            "cpu_seconds_best": round(min(cpu), 3), "load_after": round(os.getloadavg()[0], 1),
            "target_s": 2.0, "met": best <= 2.0, "planted": len(planted), "planted_found": len(found & set(planted)),
            "other_found": len(found - set(planted)), "report_with_pngs_s": round(report_s, 3),
            "read_all_100k_s": round(dict_s, 3), "columnar_100k_s": round(col_s, 3),
            "reader_speedup": round(dict_s / col_s, 1)}


def guard_us_per_step(n: int = 20000) -> float:
    from kit.config import SpikesSection
    from kit.ledger import NullLedger
    from kit.spikes import SpikeGuard

    g = SpikeGuard(SpikesSection(), NullLedger())
    rng = random.Random(2)
    vals = [3.0 * math.exp(rng.gauss(0, 0.01)) for _ in range(n)]
    ctx = {"consumed": 0, "samples": 8, "lr": 1e-3, "loss": 3.0}
    t0 = time.perf_counter()
    for i, v in enumerate(vals, start=1):
        g.check(i, v, i - 1, 0.5 * v, True, ctx)
    return (time.perf_counter() - t0) / n * 1e6


def bench_detector(train_steps: int, rounds: int, warm: int) -> dict[str, object]:
    from kit.config import load_recipe
    from kit.launch import create_run
    from kit.ledger import read_all

    tmp = Path(tempfile.mkdtemp(prefix="kit-bench-spikes-run-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "KIT_SEGMENT": "bench"}
    on: list[float] = []
    off: list[float] = []
    inrun: list[float] = []  # share of each step spent in the guard, measured inside the "on" runs
    inrun_us: list[float] = []
    for r in range(rounds):
        for variant in ("off", "on"):
            cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [
                f'run.name="{variant}{r}"', f'run.runs_dir="{tmp}"', f"trainer.max_steps={train_steps}",
                f"checkpoint.interval_steps={train_steps * 10}", "health.enabled=false"])
            rd = create_run(cfg, log=lambda m: None)
            entry = [str(ROOT / "bench" / ("_spikes_off.py" if variant == "off" else "_spikes_timed.py"))]
            env["KIT_BENCH_GUARD_OUT"] = str(tmp / f"guard{r}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry,
                   str(rd.path), "--boundary-exit-code", "0"]
            subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            stamps = [e["t"] for e in read_all(rd.path, {"step"})]
            gaps = [b - a for a, b in zip(stamps[warm:], stamps[warm + 1:], strict=False)]
            (on if variant == "on" else off).append(statistics.median(gaps))
            if variant == "on":
                spent = json.loads((tmp / f"guard{r}.json").read_text())[warm:]
                inrun.append(statistics.median(spent) / on[-1])
                inrun_us.append(statistics.median(spent) * 1e6)
        print(f"round {r}: guard off {off[-1] * 1e3:.2f} ms/step, on {on[-1] * 1e3:.2f} ms/step "
              f"({(on[-1] / off[-1] - 1) * 100:+.2f}%); inside the 'on' run the guard took {inrun_us[-1]:.1f} us "
              f"= {inrun[-1] * 100:.3f}% of its median step", flush=True)
    us = guard_us_per_step()
    a, b = statistics.median(off), statistics.median(on)
    share = statistics.median(inrun)
    print(f"detector: guard inside real 2-rank steps {statistics.median(inrun_us):.1f} us = {share * 100:.3f}% of a "
          f"step (the figure); run vs run without it {(b / a - 1) * 100:+.2f}% (whole-run noise of a shared "
          f"machine); SpikeGuard.check alone {us:.1f} us")
    return {"train_steps": train_steps, "rounds": rounds,
            "guard_in_run_us_per_step": round(statistics.median(inrun_us), 2),
            "guard_in_run_share_pct": round(share * 100, 4), "off_ms_per_step": round(a * 1e3, 3),
            "on_ms_per_step": round(b * 1e3, 3), "run_vs_run_difference_pct": round((b / a - 1) * 100, 2),
            "per_round_pct": [round((y / x - 1) * 100, 2) for x, y in zip(off, on, strict=True)],
            "guard_check_alone_us": round(us, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--warm", type=int, default=20)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": f"{os.cpu_count()} CPUs, load {load:.1f} "
              "at start (shared machine)", "postmortem": bench_postmortem(args.steps, args.reps),
              "detector": bench_detector(args.train_steps, args.rounds, args.warm)}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "spikes.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

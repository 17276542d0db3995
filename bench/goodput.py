"""bench/goodput: the goodput account (`kit goodput`, kit.run.goodput) on a million-step run.

The run: bench/genrun.py's realistic run (issue 16: 1,000,000 steps in 28 segments of the BLOOM-1b7
recipe with 8 nodes x 8 GPUs, every event kit's writers write, health samples and per-rank timings,
checkpoints every 500 steps, a crash, a hang, spikes with rollbacks) when that generator is in this
checkout; otherwise a smaller stand-in generated here with the same step count and chain shape (steps,
segments, saves, one crash, one hang, rollbacks; no health or timing lines), and the results say which.

Measured, in this process after the imports (each the best of ``--repeat``, wall and CPU time, with
the machine's load: this machine is shared, wall time moves with it, CPU time much less):

- scan: the ledger's cold read through its index (kit.ledger.scan), what every reader pays first;
- account: kit.run.goodput.account on the scanned columns (the work this module adds);
- of_run: scan + chain.json + recipe + account (what `kit goodput` does);
- collect: the whole run summary (`kit status`), which now includes the account: the account's share
  of it says what the summary pays for its goodput block;
- monitor refresh: 1,000 new step events into the monitor's Tracker, then the account again;
- `kit goodput RUN --json` as a user runs it (a new process: imports included; CPU time from the
  child's rusage).

Target (issue 15): `kit goodput` on the million-step run well under a few seconds, judged on CPU time
(under 3 s): on this shared 2-core machine the wall time is mostly the other engineers' load.
Run: python bench/goodput.py [--repeat N] [--run DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "goodput.json"
CACHE = Path(os.environ.get("KIT_BENCH_CACHE", "/tmp/kit-bench-runs"))


def the_run(steps: int) -> tuple[Path, str]:
    """bench/genrun.py's realistic run when it is here, else the stand-in below."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import genrun

        path, _ = genrun.cached(genrun.Shape(steps=steps))
        return Path(path), "bench/genrun.py"
    except (ImportError, AttributeError, TypeError):
        return standin(steps), "bench/goodput.py stand-in (bench/genrun.py not in this checkout)"


def standin(steps: int, segments: int = 28, step_s: float = 2.0) -> Path:
    """A chain of ``segments`` allocations training ``steps`` steps, written by kit's LedgerWriter."""
    from kit.config import load_recipe
    from kit.ledger import LedgerWriter
    from kit.rundir import RunDir

    run = CACHE / f"goodput-standin-{steps}-{segments}" / "run"
    if (run.parent / "done").exists():
        return run
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [f'run.runs_dir="{run.parent}"', 'run.name="run"',
                                                    f"trainer.max_steps={steps}", "checkpoint.interval_steps=500",
                                                    'slurm.time_limit="20:00:00"'])
    RunDir(run).create(cfg)
    t, step, per = 1_767_225_600.0, 0, steps // segments + 1
    tr, ch, doc = (LedgerWriter(run, n) for n in ("train-r0", "chain", "doctor-r0"))
    ch.emit("chain_submitted", job_id="1", t=t)
    for n in range(segments):
        seg, t = f"1_{n}", t + 900.0
        ch.emit("allocation_started", job_id="1", nodes=["n1"], seg=seg, t=t)
        doc.emit("doctor", ok=True, checks=[], seconds=30.0, seg=seg, t=t + 40)
        if step:
            tr.emit("ckpt_loaded", step=step, tag=f"step_{step:07d}", seconds=60.0, seg=seg, t=t + 200)
        tr.emit("segment_started", world_size=64, step=step, seg=seg, t=t + 230)
        t += 230
        last_ckpt, end = step, min(steps, step + per)
        crash, hang, spike = n == 5, n == 9, n in (3, 14, 20)
        while step < end:
            step += 1
            t += step_s
            tr.emit("step", step=step, loss=2.0, step_time=step_s, tokens_per_s=1e5, seg=seg, t=t)
            if spike and step == last_ckpt + 300:
                t += 90.0
                tr.emit("rollback", from_step=step, to_step=last_ckpt, seg=seg, t=t)
                step, spike = last_ckpt, False
            if step % 500 == 0:
                t += 35.0
                tr.emit("ckpt_saved", step=step, tag=f"step_{step:07d}", bytes=1, seconds=35.0, reason="interval",
                        seg=seg, t=t)
                last_ckpt = step
            if (crash or hang) and step == end - per // 2 + 137:
                break
        if hang:
            tr.emit("hang", stalled_s=1800.0, step=step, seg=seg, t=t + 1800)
            tr.emit("segment_ended", reason="hang", step=step, seg=seg, t=t + 1830)
            ch.emit("allocation_ended", job_id="1", outcome="hang", seg=seg, t=t + 1850)
            t, step = t + 1850, last_ckpt
        elif crash:
            ch.emit("allocation_ended", job_id="1", outcome="crash", seg=seg, t=t + 25)
            t, step = t + 25, last_ckpt
        else:
            t += 35.0
            tr.emit("ckpt_saved", step=step, tag=f"step_{step:07d}", bytes=1, seconds=35.0, reason="signal", seg=seg,
                    t=t)
            tr.emit("segment_ended", reason="signal" if step < steps else "done", step=step, seg=seg, t=t + 1)
            ch.emit("allocation_ended", job_id="1", outcome="clean" if step < steps else "finished", seg=seg,
                    t=t + 20)
            t += 20
        if step >= steps:
            break
    for w in (tr, ch, doc):
        w.close()
    (run.parent / "done").write_text("")
    return run


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """(best wall s, best CPU s, the last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--run", type=Path, default=None, help="an existing run directory instead of a generated one "
                   "(e.g. a run bench/genrun.py left in $KIT_BENCH_CACHE)")
    a = p.parse_args(argv)
    load_before = os.getloadavg()
    run, source = (a.run, f"--run {a.run}") if a.run else the_run(a.steps)
    from kit.ledger.scan import scan
    from kit.run.goodput import Inputs, Tracker, account, of_run
    from kit.run.summary import collect

    r: dict[str, Any] = {}
    r["scan"] = best(lambda: scan(run), a.repeat)[:2]
    history = scan(run)
    inp = Inputs.from_scan(history)
    r["account"] = best(lambda: account(inp), a.repeat)[:2]
    r["of_run"] = best(lambda: of_run(run, use_slurm=False), a.repeat)[:2]
    r["collect"] = best(lambda: collect(run, use_slurm=False), a.repeat)[:2]
    tracker = Tracker(inp)
    rows = range(max(0, len(history.steps) - 1000), len(history.steps))
    new = history.step_detail(list(rows))  # the newest step events, parsed from their lines

    def refresh() -> Any:
        tracker.add(new)
        return account(tracker.inputs())

    r["monitor_refresh"] = best(refresh, a.repeat)[:2]
    w, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cli = subprocess.run([sys.executable, "-m", "kit.tools.cli", "goodput", str(run), "--json", "--no-slurm"],
                         capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    r["kit_goodput_cli"] = (time.perf_counter() - w, cpu)
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    steps = len(history.steps)
    share = r["account"][0] / r["collect"][0]
    print(f"run: {run} ({source}), {steps:,} step events, {len(out['segments'])} segments, "
          f"ETTR {100 * (out['ettr'] or 0):.1f}%")
    for k, (wall, cpu) in r.items():
        print(f"  {k:<18} wall {wall:6.3f} s   cpu {cpu:6.3f} s")
    print(f"  the account is {100 * share:.0f}% of the run summary's wall time (kit status, kit monitor --once); "
          f"load before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    # Judged on CPU time: on this shared 2-core machine wall time is mostly other engineers' load.
    ok = r["kit_goodput_cli"][1] < 3.0
    print(f"  target `kit goodput` (imports, scan, account) under 3 s of CPU: {'met' if ok else 'NOT met'} "
          f"({r['kit_goodput_cli'][1]:.2f} s CPU, {r['kit_goodput_cli'][0]:.2f} s wall at this load)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": os.uname().nodename,
        "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
        "run": {"source": source, "step_events": steps, "segments": len(out["segments"]), "ettr": out["ettr"],
                "allocated_s": out["allocated_s"], "parts": out["parts"]},
        "seconds": {k: {"wall": v[0], "cpu": v[1]} for k, v in r.items()},
        "ratios": {"account_share_of_summary": share,
                   "account_per_million_steps_cpu_s": r["account"][1] / max(1, steps) * 1e6},
        "target_met": ok, "repeat": a.repeat}, indent=1))
    print(f"saved {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

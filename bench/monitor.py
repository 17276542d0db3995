"""bench/monitor: the monitor on a long run, side by side with TensorBoard's own loader.

The run: bench/genrun.py's realistic run (default: issue 16's shape, 1,000,000 steps of ~2 s over 28
segments, 8 nodes x 8 GPUs, per-rank timings every 50 steps, a health sample per node per minute for
the whole run, checkpoints with retention, spikes rolled back, a crash and a hang), generated once and
cached; and the same run's step scalars (read from its ledger) in a TensorBoard event file written with
tensorboard's own writer. To favour TensorBoard, the event file holds one event per step carrying the 8
scalars (the trainer writes 8 events per step), so the loader has 8x fewer records to read.

Measured, each in its own process:
- ``kit monitor --once --json`` (the command as cron runs it, cold, imports included);
- monitor (headless Textual app, Pilot): app start to the first full frame (every panel drawn from
  the cold start), to the whole history read (backfill), event-to-screen latency of appended steps;
- monitor in a real terminal (tmux running `kit monitor`): idle CPU and resident memory after the
  history is read;
- TensorBoard: EventAccumulator(...).Reload() on the event file (the loader TensorBoard itself uses).
Imports are timed apart and not counted on either side (except for --once, a whole command).

Targets (issues 6, 13, 16): --once <= 1 s; first frame <= 1 s and >= 10x faster than EventAccumulator;
latency <= 1 s; idle CPU <= 2% of a core; memory <= 300 MB. The results and the machine's load go to
bench/results/monitor.json. Run: python bench/monitor.py [genrun's shape options, e.g. --steps 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import genrun  # bench/genrun.py: the run every benchmark measures

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "monitor.json"
TAGS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr", "tokens_per_s": "perf/tokens_per_s",
        "samples_per_s": "perf/samples_per_s", "step_time": "perf/step_time_s", "tflops": "perf/tflops_per_device",
        "mfu": "perf/mfu"}


# ------------------------------------------------------------------------------------------ the run
def gen_tb(run: Path, tb_dir: Path) -> None:
    """The run's own step scalars (read from its ledger) in a TensorBoard event file, one event per step."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    cols = [("kind", pa.string()), ("t", pa.float64()), ("step", pa.int64())] + [(k, pa.float64()) for k in TAGS]
    opts = pj.ParseOptions(explicit_schema=pa.schema(cols), unexpected_field_behavior="ignore")
    table = pj.read_json(run / "ledger" / "train-r0.jsonl", parse_options=opts)
    table = table.filter(pc.equal(table.column("kind"), "step"))
    data = {k: table.column(k).to_pylist() for k in ("t", "step", *TAGS)}
    w = EventFileWriter(str(tb_dir), max_queue_size=10_000, flush_secs=600)
    for i, step in enumerate(data["step"]):
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=data[k][i]) for k, tag in TAGS.items()
                  if data[k][i] is not None]
        w.add_event(event_pb2.Event(wall_time=data["t"][i], step=step, summary=summary_pb2.Summary(value=values)))
    w.close()


# ----------------------------------------------------------------------------------- measurements
async def child_monitor(run: Path) -> dict[str, Any]:
    import asyncio
    import resource

    import psutil

    t = time.perf_counter()
    from kit.ledger import LedgerWriter
    from kit.monitor.app import loaded, make_app

    imports = time.perf_counter() - t
    app = make_app([run], use_slurm=False)
    out: dict[str, Any] = {"imports_s": imports}
    async with app.run_test(size=(160, 48)) as pilot:
        while app.first_frame is None:
            await asyncio.sleep(0.002)
        out["first_frame_s"] = app.first_frame - app.started
        s = app.snaps[0].summary
        out["first_frame_step"] = s["step"]
        snap = app.snaps[0]
        out["first_frame_panels"] = {"chain": s["step"] is not None, "loss_points": len(snap.curves["run"]["loss"][0]),
                                     "gpus": len(snap.health), "checkpoints": len(snap.ckpts),
                                     "alerts": len(snap.alerts)}
        while not loaded(app):
            await asyncio.sleep(0.02)
        out["history_s"] = time.perf_counter() - app.started
        out["events"] = app.snaps[0].summary["reader"]["events"]
        base = int(app.snaps[0].summary["step"] or 0)
        lat = []
        with LedgerWriter(run, "bench", seg="bench") as w:
            for i in range(10):
                step = base + 1 + i
                t_write = time.perf_counter()
                w.emit("step", step=step, loss=1.0, tokens_per_s=1.0, step_time=10.0)
                while app.shown.get(0, (None, 0.0))[0] != step:
                    await asyncio.sleep(0.002)
                lat.append(app.shown[0][1] - t_write)
                await asyncio.sleep(0.5)
        out["latency_s"] = {"max": max(lat), "median": sorted(lat)[len(lat) // 2]}
        await pilot.pause(1.0)
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        await asyncio.sleep(10.0)
        r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out["idle_cpu_headless_pct"] = 100 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (w1 - w0)
        out["rss_mb_headless"] = psutil.Process().memory_info().rss / 2**20
        out["peak_rss_mb_headless"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def child_tb(tb_dir: Path) -> dict[str, Any]:
    import psutil

    t = time.perf_counter()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    imports = time.perf_counter() - t
    t = time.perf_counter()
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    load = time.perf_counter() - t
    loss = acc.Scalars("train/loss")
    return {"imports_s": imports, "load_s": load, "loss_points_kept": len(loss), "last_step": loss[-1].step,
            "rss_mb": psutil.Process().memory_info().rss / 2**20}


def in_tmux(run: Path, seconds: float = 10.0) -> dict[str, Any]:
    """`kit monitor` in a real terminal: CPU and memory once the history is read and nothing happens."""
    import psutil

    if not shutil.which("tmux"):
        return {"skipped": "no tmux"}
    session, pidfile = f"benchmon{os.getpid()}", run.parent / "monitor.pid"
    cmd = f"echo $$ > {pidfile}; exec {sys.executable} -m kit.tools.cli monitor {run} --no-slurm"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "48", cmd], check=True)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                    text=True).stdout
            if " events" in screen and "reading history" not in screen:
                break
            time.sleep(0.2)
        ready = time.monotonic() - t0
        proc = psutil.Process(int(pidfile.read_text()))
        time.sleep(2.0)
        c0, w0 = proc.cpu_times(), time.monotonic()
        time.sleep(seconds)
        c1, w1 = proc.cpu_times(), time.monotonic()
        cpu = 100 * (c1.user + c1.system - c0.user - c0.system) / (w1 - w0)
        return {"history_read_s": ready, "idle_cpu_pct": cpu, "rss_mb": proc.memory_info().rss / 2**20}
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def child(kind: str, path: Path) -> dict[str, Any]:
    p = subprocess.run([sys.executable, __file__, f"--child-{kind}", str(path)], capture_output=True, text=True,
                       check=False)
    if p.returncode != 0:
        raise SystemExit(f"{kind} measurement failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def once(run: Path) -> dict[str, Any]:
    """``kit monitor --once --json`` as an operator's cron runs it: the whole command, cold, timed."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "kit.tools.cli", "monitor", str(run), "--once", "--json", "--no-slurm"],
                       capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    try:
        summary = json.loads(p.stdout)[0]
    except (ValueError, IndexError):
        return {"seconds": seconds, "exit": p.returncode, "error": p.stderr[-500:]}
    return {"seconds": seconds, "exit": p.returncode, "step": summary.get("step"), "status": summary.get("status")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    genrun.add_shape_arguments(ap)
    ap.add_argument("--child-monitor", type=Path)
    ap.add_argument("--child-tb", type=Path)
    a = ap.parse_args()
    if a.child_monitor:
        import asyncio

        print(json.dumps(asyncio.run(child_monitor(a.child_monitor))))
        return
    if a.child_tb:
        print(json.dumps(child_tb(a.child_tb)))
        return
    shape = genrun.shape_from(a)
    t = time.perf_counter()
    run, record = genrun.cached(shape)
    tb = run.parent.parent / "tb"
    if not (tb / "ready").exists():
        shutil.rmtree(tb, ignore_errors=True)
        tb.mkdir(parents=True)
        gen_tb(run, tb)
        (tb / "ready").write_text("")
    print(f"run ready in {time.perf_counter() - t:.0f} s (generated once in {record['counts']['seconds']} s, cached)")
    (run / "ledger" / "bench.jsonl").unlink(missing_ok=True)
    ledger_mb = sum(f.stat().st_size for f in (run / "ledger").iterdir()) / 2**20
    tb_mb = sum(f.stat().st_size for f in tb.iterdir()) / 2**20
    load_before = os.getloadavg()
    cli = once(run)
    mon = child("monitor", run)
    tbr = child("tb", tb)
    term = in_tmux(run)
    ratio = tbr["load_s"] / mon["first_frame_s"]
    ratio_history = tbr["load_s"] / mon["history_s"]
    ratio_once = tbr["load_s"] / cli["seconds"]
    print(f"run: {shape.steps:,} steps over {shape.segments} segments, {shape.nodes} nodes x {shape.gpus} GPUs, "
          f"health every {shape.health_period:g} s, timings every {shape.timing_interval} steps (bench/genrun.py); "
          f"ledger {ledger_mb:,.0f} MB ({mon['events']:,} events), TensorBoard file {tb_mb:,.0f} MB")
    print(f"kit monitor --once  {cli['seconds']:.1f} s (exit {cli['exit']}, step {cli.get('step')})  -> "
          f"{ratio_once:.2f}x EventAccumulator.Reload (target <= 1 s)")
    print(f"first full frame   monitor {mon['first_frame_s']:.3f} s  vs  EventAccumulator.Reload {tbr['load_s']:.1f} s"
          f"  -> {ratio:,.0f}x faster (target >= 10x, <= 1 s)")
    print(f"whole history read monitor {mon['history_s']:.1f} s  -> {ratio_history:.1f}x faster than "
          "TensorBoard's loader")
    print(f"event-to-screen    max {mon['latency_s']['max']:.3f} s, median {mon['latency_s']['median']:.3f} s"
          " (target <= 1 s)")
    if "idle_cpu_pct" in term:
        print(f"real terminal      idle CPU {term['idle_cpu_pct']:.2f}% of a core (target <= 2%), "
              f"RSS {term['rss_mb']:.0f} MB (target <= 300 MB); TensorBoard's loader RSS {tbr['rss_mb']:.0f} MB")
    print(f"headless           idle CPU {mon['idle_cpu_headless_pct']:.2f}%, RSS {mon['rss_mb_headless']:.0f} MB, "
          f"peak {mon['peak_rss_mb_headless']:.0f} MB; imports: monitor {mon['imports_s']:.2f} s, "
          f"tensorboard {tbr['imports_s']:.2f} s (not counted)")
    ok = {"once_le_1s": cli["seconds"] <= 1.0, "first_frame_le_1s": mon["first_frame_s"] <= 1.0,
          "ratio_ge_10x": ratio >= 10, "latency_le_1s": mon["latency_s"]["max"] <= 1.0,
          "idle_cpu_le_2pct": term.get("idle_cpu_pct", mon["idle_cpu_headless_pct"]) <= 2.0,
          "memory_le_300mb": max(term.get("rss_mb", 0.0), mon["peak_rss_mb_headless"]) <= 300.0}
    print("targets: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in ok.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **genrun.machine(load_before),
        "run": {**record["shape"], "events": record["counts"]["events"], "ledger_mb": ledger_mb, "tb_mb": tb_mb},
        "once": cli, "monitor": mon, "tensorboard": tbr, "terminal": term,
        "ratios": {"first_frame_vs_tb_load": ratio, "history_vs_tb_load": ratio_history,
                   "once_vs_tb_load": ratio_once}, "targets_met": ok,
    }, indent=1) + "\n")
    print(f"saved {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""bench/monitor: the monitor on a long run, side by side with TensorBoard's own loader.

The run: a synthetic ledger of 1,000,000 steps (the trainer's exact step fields, checkpoints every
1,000 steps, a segment every 20,000, a few alerts and spikes) plus health samples for 64 nodes x 8
GPUs (kit.health's fields), and the same run's scalars in a TensorBoard event file written with
tensorboard's own writer. To favour TensorBoard, the event file holds one event per step carrying the
8 scalars (the trainer writes 8 events per step), so the loader has 8x fewer records to read.

Measured, each in its own process:
- monitor (headless Textual app, Pilot): app start to the first full frame (every panel drawn from
  the cold start), to the whole history read (backfill), event-to-screen latency of appended steps;
- monitor in a real terminal (tmux running `kit monitor`): idle CPU and resident memory after the
  history is read;
- TensorBoard: EventAccumulator(...).Reload() on the event file (the loader TensorBoard itself uses).
Imports are timed apart and not counted on either side.

Targets (issue 6): first frame <= 1 s and >= 10x faster than EventAccumulator; latency <= 1 s; idle
CPU <= 2% of a core; memory <= 300 MB. Run: python bench/monitor.py [--steps N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "monitor.json"
TAGS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr", "tokens_per_s": "perf/tokens_per_s",
        "samples_per_s": "perf/samples_per_s", "step_time": "perf/step_time_s", "tflops": "perf/tflops_per_device",
        "mfu": "perf/mfu"}


# ------------------------------------------------------------------------------------------ the run
def metrics(step: int, rng: random.Random) -> dict[str, float]:
    dt = 10.0 * (1.25 if 400_000 <= step < 410_000 else 1.0) * (1 + 0.02 * rng.random())  # a slow stretch
    loss = 2.0 + 8.0 / math.sqrt(step) + 0.02 * rng.random() + (3.0 if step % 97_001 == 0 else 0.0)
    return {"loss": loss, "grad_norm": 0.3 + 0.1 * rng.random(), "lr": 6e-5 * min(1.0, step / 2000),
            "tokens_per_s": 2048 * 2048 / dt, "samples_per_s": 2048 / dt, "step_time": dt,
            "tflops": 150.0 * 10.0 / dt, "mfu": 0.48 * 10.0 / dt}


def gen_ledger(run: Path, steps: int, nodes: int, gpus: int, samples: int) -> None:
    from kit.config import load_recipe
    from kit.rundir import RunDir

    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [f'run.runs_dir="{run.parent}"', f'run.name="{run.name}"',
                                                    f"trainer.max_steps={steps + 100_000}"])
    RunDir(run).create(cfg)
    rng = random.Random(0)
    t_end = time.time()
    t0 = t_end - steps * 10.0
    seg = 0
    with open(run / "ledger" / "train-r0.jsonl", "w") as f:
        buf: list[str] = []
        for step in range(1, steps + 1):
            t = t0 + step * 10.0
            if step % 20_000 == 1:
                seg += 1
                buf.append(json.dumps({"v": 1, "t": t - 5, "kind": "segment_started", "src": "train-r0",
                                       "seg": f"{1000 + seg}_0", "world_size": nodes * gpus, "step": step - 1,
                                       "max_steps": steps + 100_000, "job_id": str(1000 + seg), "host": "node000"}))
            m = metrics(step, rng)
            buf.append(
                f'{{"v":1,"t":{t:.6f},"kind":"step","src":"train-r0","seg":"{1000 + seg}_0","step":{step},'
                f'"loss":{m["loss"]!r},"grad_norm":{m["grad_norm"]!r},"lr":{m["lr"]!r},"consumed":{(step - 1) * 2048},'
                f'"samples":2048,"tokens":4194304,"step_time":{m["step_time"]:.6f},'
                f'"tokens_per_s":{m["tokens_per_s"]!r},"samples_per_s":{m["samples_per_s"]!r},'
                f'"tflops":{m["tflops"]!r},"mfu":{m["mfu"]!r},"nonfinite":false}}')
            if step % 97_001 == 0:
                buf.append(json.dumps({"v": 1, "t": t + 0.1, "kind": "spike", "src": "train-r0", "step": step,
                                       "loss": m["loss"]}))
                buf.append(json.dumps({"v": 1, "t": t + 0.2, "kind": "alert", "src": "train-r0", "severity": "warning",
                                       "message": f"loss spike at step {step}"}))
            if step % 1000 == 0:
                buf.append(json.dumps({"v": 1, "t": t + 1, "kind": "ckpt_saved", "src": "train-r0",
                                       "seg": f"{1000 + seg}_0", "step": step, "tag": f"step_{step:07d}",
                                       "bytes": 2_300_000_000_000, "seconds": 41.5}))
            if step % 20_000 == 0 or step == steps:
                buf.append(json.dumps({"v": 1, "t": t + 2, "kind": "segment_ended", "src": "train-r0",
                                       "seg": f"{1000 + seg}_0", "reason": "deadline", "step": step}))
            if len(buf) >= 20_000:
                f.write("\n".join(buf) + "\n")
                buf = []
        f.write("\n".join(buf) + "\n")
    for n in range(nodes):
        node = f"node{n:03d}"
        with open(run / "ledger" / f"health-{node}.jsonl", "w") as f:
            for i in range(samples):
                t = t_end - (samples - i) * 60.0
                g = [{"index": k, "uuid": f"GPU-{n:03d}-{k}", "name": "NVIDIA A100-SXM4-80GB", "util_pct": 98,
                      "mem_util_pct": 41, "mem_used_gib": 71.3, "mem_total_gib": 80.0,
                      "temp_c": 55 + rng.randrange(25), "power_w": 300.0 + rng.randrange(90), "sm_clock_mhz": 1410,
                      "throttle": 0, "throttle_reasons": [], "ecc_vol_unc": 0, "ecc_vol_cor": 0, "ecc_agg_unc": 0,
                      "ecc_agg_cor": 0, "retired_pages": 0, "remapped_rows_cor": 0, "remapped_rows_unc": 0,
                      "remap_pending": False, "remap_failed": False, "nvlink_errors": 0, "xid": [], "lost": False}
                     for k in range(gpus)]
                host = {"cpu_pct": 35.0, "mem_pct": 40.0, "mem_used_gib": 400.0, "mem_avail_gib": 600.0,
                        "load1": 12.0, "fs_free_gib": 9000.0, "net_rx_mbps": 900.0, "net_tx_mbps": 880.0}
                f.write(json.dumps({"v": 1, "t": t, "kind": "health", "src": f"health-{node}", "node": node,
                                    "gpus": g, "host": host, "driver": "550.54.15"}, separators=(",", ":")) + "\n")


def gen_tb(tb_dir: Path, steps: int) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    rng = random.Random(0)
    w = EventFileWriter(str(tb_dir), max_queue_size=10_000, flush_secs=600)
    t0 = time.time() - steps * 10.0
    for step in range(1, steps + 1):
        m = metrics(step, rng)
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=m[k]) for k, tag in TAGS.items()]
        w.add_event(event_pb2.Event(wall_time=t0 + step * 10.0, step=step, summary=summary_pb2.Summary(value=values)))
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
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--health-samples", type=int, default=240, help="samples per node (one a minute: 4 hours)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kit-bench-monitor"))
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
    key = f"s{a.steps}-n{a.nodes}-g{a.gpus}-h{a.health_samples}"
    base = a.dir / key
    run, tb = base / "runs" / "bench", base / "tb"
    if not (base / "ready").exists():
        shutil.rmtree(base, ignore_errors=True)
        tb.mkdir(parents=True)
        t = time.perf_counter()
        code = (f"import sys, pathlib; sys.path.insert(0, {str(ROOT / 'bench')!r}); import monitor; "
                f"monitor.gen_tb(pathlib.Path({str(tb)!r}), {a.steps})")
        writer = subprocess.Popen([sys.executable, "-c", code])
        gen_ledger(run, a.steps, a.nodes, a.gpus, a.health_samples)
        if writer.wait() != 0:
            raise SystemExit("writing the TensorBoard event file failed")
        (base / "ready").write_text("")
        print(f"generated the run in {time.perf_counter() - t:.0f} s")
    (run / "ledger" / "bench.jsonl").unlink(missing_ok=True)
    ledger_mb = sum(f.stat().st_size for f in (run / "ledger").iterdir()) / 2**20
    tb_mb = sum(f.stat().st_size for f in tb.iterdir()) / 2**20
    mon = child("monitor", run)
    tbr = child("tb", tb)
    term = in_tmux(run)
    ratio = tbr["load_s"] / mon["first_frame_s"]
    ratio_history = tbr["load_s"] / mon["history_s"]
    print(f"run: {a.steps:,} steps, {a.nodes} nodes x {a.gpus} GPUs x {a.health_samples} health samples; "
          f"ledger {ledger_mb:,.0f} MB ({mon['events']:,} events), TensorBoard file {tb_mb:,.0f} MB")
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
    ok = {"first_frame_le_1s": mon["first_frame_s"] <= 1.0, "ratio_ge_10x": ratio >= 10,
          "latency_le_1s": mon["latency_s"]["max"] <= 1.0,
          "idle_cpu_le_2pct": term.get("idle_cpu_pct", mon["idle_cpu_headless_pct"]) <= 2.0,
          "memory_le_300mb": max(term.get("rss_mb", 0.0), mon["peak_rss_mb_headless"]) <= 300.0}
    print("targets: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in ok.items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": os.uname().nodename,
        "cpus": os.cpu_count(), "run": {"steps": a.steps, "nodes": a.nodes, "gpus": a.gpus,
                                        "health_samples": a.health_samples, "ledger_mb": ledger_mb, "tb_mb": tb_mb},
        "monitor": mon, "tensorboard": tbr, "terminal": term,
        "ratios": {"first_frame_vs_tb_load": ratio, "history_vs_tb_load": ratio_history}, "targets_met": ok,
    }, indent=1) + "\n")
    print(f"saved {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

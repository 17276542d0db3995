"""bench/health: what the node sampler, the hang watchdog and the straggler timer cost a training step.

One process, one real DeepSpeed engine (the tiny recipe, ZeRO-2, world size 1: the smallest step is
the worst case for a fixed per-step cost), measured in ONE run, side by side:

- A/B: blocks of steps with the health parts on (sampler at a period much shorter than the default,
  watchdog, straggler timer with a gather every few steps) alternate with blocks without them, in
  ABBA order (a plain ABAB order showed a +5-15% "cost" that reversed with the order: drift, not cost);
  ratios of the median step wall times and of the training thread's CPU time per step. On a shared
  CPU machine the wall-clock noise is larger than the target, so also:
- direct accounting: the time the training thread spends inside the hooks per step (heartbeat and
  gathers measured around ``after_step``; the timer's spans inside the step measured apart, times the
  spans per step), and the sampler thread's time per sample scaled by steps per period (an upper
  bound on what it can take from the step: NVML calls release the GIL).

Target (issue 5): at most 0.5% of step time. Writes bench/results/health.json.

    python bench/health.py [--blocks 20] [--steps 12] [--period 1.0]
    python bench/health.py --gpu 60   # GPU machines: real NVML under a bf16 matmul load, compared with
                                      # tests/fake_nvml.py; writes bench/results/health_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "health.json"
RANGED = ("util_pct", "temp_c", "power_w", "power_limit_w", "sm_clock_mhz", "mem_used_gib", "mem_total_gib")


def build(runs: Path, period: float, interval: int) -> Any:
    from kit import dist
    from kit.config import load_recipe
    from kit.launch import create_run
    from kit.trainer import Trainer

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    over = [f'run.runs_dir="{runs}"', 'run.name="bench-health"', "trainer.max_steps=100000",
            "checkpoint.interval_steps=100000", "optim.warmup_steps=2", "trainer.log_interval=100000",
            f"health.period_s={period}", f"health.straggler_interval={interval}", "trainer.nproc=1",
            "spikes.policy=\"log\""]
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", over)
    rd = create_run(cfg, log=lambda *a: None)
    env = dist.from_environ()
    dist.init(env)
    tr = Trainer(cfg, rd, env, seg="bench")
    tr.setup()
    assert tr.health is not None
    tr.health.stop()  # the bench switches the parts on and off itself
    tr.health = None
    return tr


def run_block(tr: Any, steps: int, on: bool) -> tuple[list[float], list[float], float, int]:
    """Steps of the trainer's own step function; returns step wall times, the training thread's CPU
    times, time inside hooks, samples taken."""
    from kit.health import JobHealth
    from kit.trainer import NONFINITE

    st = tr.state
    health = JobHealth.start(tr.cfg, tr.rd, tr.env, tr.seg, tr.engine, tr.ledger) if on else None
    samples0 = 0
    times, cpu, hook = [], [], 0.0
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        vec = tr._train_step()
        st.step += 1
        st.consumed += tr.global_batch
        dt = time.perf_counter() - t0
        if health is not None:
            h0 = time.perf_counter()
            health.after_step(st.step, dt, vec[NONFINITE])
            hook += time.perf_counter() - h0
        times.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    samples = 0
    if health is not None:
        samples = health.sampler.samples - samples0 if health.sampler else 0
        health.stop()
    return times, cpu, hook, samples


def span_cost(tr: Any, n: int = 20000) -> float:
    """Seconds of one timed span (the timer's wrappers and hooks run inside the step, not in after_step)."""
    from kit.stragglers import StepTimer

    t = StepTimer(tr.engine, 0, [], 0, 0.05, tr.ledger)
    t0 = time.perf_counter()
    for _ in range(n):
        t._start("bwd_s")
        t._end("bwd_s")
    cost = (time.perf_counter() - t0) / n
    t.detach()
    return cost


def sampler_cost(run_dir: Path, n: int = 20, fake_gpus: int = 0) -> float:
    """Seconds of one sample, measured directly: host only (NVML is absent on CPU machines), or with
    tests/fake_nvml.py's GPUs (8 GPUs x 18 NVLinks: the Python side of a real node's sample; the real
    NVML calls add driver time, during which ctypes releases the GIL)."""
    from kit.config import HealthSection
    from kit.health import HealthSampler

    nvml = None
    if fake_gpus:
        sys.path.insert(0, str(ROOT / "tests"))
        import fake_nvml

        fake_nvml.install(fake_gpus)
        nvml = fake_nvml
    s = HealthSampler(run_dir, HealthSection(record_every=1), seg="bench-sampler", node=f"bench{fake_gpus}",
                      nvml=nvml)  # every sample written: the worst case
    s.sample_once()
    t0 = time.perf_counter()
    for _ in range(n):
        s.sample_once()
    cost = (time.perf_counter() - t0) / n
    s.stop()
    return cost


def gpu_check(seconds: float) -> int:
    """On a GPU machine: the sampler with the real NVML for ``seconds`` under a bf16 matmul load; keeps
    the samples (bench/results/health_gpu.json) and compares their fields and units with the fake NVML's."""
    import threading

    import torch

    from kit.config import HealthSection
    from kit.health import HealthSampler
    from kit.ledger import read_all

    if not torch.cuda.is_available():
        print("bench/health --gpu: no CUDA device here", file=sys.stderr)
        return 1
    stop = threading.Event()
    matmuls = [0]

    def load() -> None:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        while not stop.is_set():
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
            matmuls[0] += 20

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    with tempfile.TemporaryDirectory(prefix="kit-bench-health-gpu-") as tmp:
        s = HealthSampler(tmp, HealthSection(period_s=1.0, record_every=1), seg="gpu-check").start()
        time.sleep(seconds)
        stop.set()
        worker.join()
        s.stop()
        events = read_all(tmp)
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_nvml

    fake_nvml.install(1)
    with tempfile.TemporaryDirectory() as tmp:
        fake = HealthSampler(tmp, HealthSection(record_every=1), seg="fake", nvml=fake_nvml).sample_once() or {}
    health = [e for e in events if e["kind"] == "health"]
    real_keys = sorted(health[-1]["gpus"][0]) if health and health[-1]["gpus"] else []
    fake_keys = sorted(fake["gpus"][0])
    g = [e["gpus"][0] for e in health if e["gpus"]]
    res = {
        "device": torch.cuda.get_device_name(0), "seconds": seconds, "samples": len(health),
        "matmuls_8192_bf16": matmuls[0], "other_events": [e for e in events if e["kind"] != "health"],
        "keys_equal_to_fake": real_keys == fake_keys,
        "keys_only_real": sorted(set(real_keys) - set(fake_keys)),
        "keys_only_fake": sorted(set(fake_keys) - set(real_keys)),
        "types_equal_to_fake": {k: type(g[-1][k]).__name__ == type(fake["gpus"][0][k]).__name__
                                for k in fake_keys if g and k in g[-1] and g[-1][k] is not None},
        "ranges": {k: [min(x[k] for x in g), max(x[k] for x in g)] for k in RANGED
                   if g and all(x[k] is not None for x in g)},
        "health_events": health,
    }
    out = ROOT / "bench" / "results" / "health_gpu.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("health_events", "other_events")}, indent=1))
    return 0 if res["keys_equal_to_fake"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=20, help="blocks per mode (alternating on/off)")
    p.add_argument("--steps", type=int, default=12, help="steps per block")
    p.add_argument("--period", type=float, default=1.0, help="sampler period in the 'on' blocks (s)")
    p.add_argument("--interval", type=int, default=10, help="straggler gather every N steps in 'on' blocks")
    p.add_argument("--gpu", type=float, default=0.0, metavar="SECONDS",
                   help="instead: run the sampler with the real NVML under a bf16 matmul load (GPU machines)")
    args = p.parse_args(argv)
    if args.gpu:
        return gpu_check(args.gpu)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="kit-bench-health-") as tmp:
        tr = build(Path(tmp) / "runs", args.period, args.interval)
        run_block(tr, args.steps, False)  # warm-up
        on_t: list[float] = []
        off_t: list[float] = []
        on_blocks: list[float] = []
        off_blocks: list[float] = []
        hook_s, samples = 0.0, 0
        on_cpu: list[float] = []
        off_cpu: list[float] = []
        # ABBA order: an on block first in every other pair, so drifts and order effects cancel
        for b in range(args.blocks):
            for on in ((False, True) if b % 2 == 0 else (True, False)):
                times, cpu, hook, n = run_block(tr, args.steps, on)
                (on_t if on else off_t).extend(times)
                (on_blocks if on else off_blocks).append(statistics.median(times))
                (on_cpu if on else off_cpu).extend(cpu)
                hook_s += hook
                samples += n
        per_sample = sampler_cost(Path(tmp) / "runs" / "bench-health")
        per_sample_8 = sampler_cost(Path(tmp) / "runs" / "bench-health", fake_gpus=8)
        spans = 3 * tr.cfg.batch.grad_accum  # forward, backward, step per micro-batch
        per_span = span_cost(tr)
    step = statistics.median(off_t)
    paired = statistics.median(on_blocks[i] / off_blocks[i] for i in range(len(on_blocks)))  # same pair
    cpu_ratio = statistics.median(on_cpu) / statistics.median(off_cpu)
    hook_per_step = hook_s / len(on_t) + spans * per_span
    sampler_per_step = per_sample * step / args.period  # sampler time that falls within one step, at most
    default_period = 10.0
    res = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus (shared), "
                   f"python {sys.version.split()[0]}",
        "device": "cpu (NVML absent: the sampler reads the host only)",
        "step_s_median_off": round(step, 6),
        "step_s_median_on": round(statistics.median(on_t), 6),
        "ab_ratio_on_over_off": round(statistics.median(on_t) / step, 4),
        "ab_paired_ratio_median": round(paired, 4),
        "ab_thread_cpu_ratio": round(cpu_ratio, 4),
        "thread_cpu_s_median_off": round(statistics.median(off_cpu), 6),
        "thread_cpu_s_median_on": round(statistics.median(on_cpu), 6),
        "ab_block_medians_off": [round(x, 6) for x in off_blocks],
        "ab_block_medians_on": [round(x, 6) for x in on_blocks],
        "hook_s_per_step": round(hook_per_step, 8),
        "span_s": round(per_span, 9),
        "spans_per_step": spans,
        "hook_fraction": round(hook_per_step / step, 6),
        "sampler_s_per_sample": round(per_sample, 6),
        "sampler_period_s": args.period,
        "samples_taken_on": samples,
        "sampler_fraction_at_bench_period": round(sampler_per_step / step, 6),
        "sampler_fraction_at_default_period": round(per_sample / default_period, 6),
        "sampler_s_per_sample_fake_8gpu": round(per_sample_8, 6),
        "sampler_fraction_fake_8gpu_at_default_period": round(per_sample_8 / default_period, 6),
        "direct_overhead_fraction": round((hook_per_step + sampler_per_step) / step, 6),
        "target_fraction": 0.005,
        "blocks": args.blocks, "steps_per_block": args.steps, "straggler_interval": args.interval,
    }
    res["meets_target"] = res["direct_overhead_fraction"] <= res["target_fraction"]
    res["cpus"], res["load_before"], res["load_after"] = os.cpu_count(), load_before, list(os.getloadavg())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(f"step (off) {step * 1e3:.2f} ms, (on) {res['step_s_median_on'] * 1e3:.2f} ms: "
          f"A/B ratio {res['ab_ratio_on_over_off']:.4f}, paired-block ratio {paired:.4f}, training-thread CPU "
          f"ratio {cpu_ratio:.4f} (wall-clock noise on a shared CPU machine is larger than 0.5%)")
    print(f"hooks {hook_per_step * 1e6:.1f} us/step = {res['hook_fraction']:.4%} of a step; "
          f"sampler {per_sample * 1e3:.2f} ms/sample = {res['sampler_fraction_at_bench_period']:.4%} at "
          f"{args.period} s, {res['sampler_fraction_at_default_period']:.4%} at the default {default_period} s")
    print(f"sampler with 8 fake GPUs (Python side of a GPU node): {per_sample_8 * 1e3:.2f} ms/sample = "
          f"{res['sampler_fraction_fake_8gpu_at_default_period']:.4%} of the time at the default period")
    print(f"direct overhead {res['direct_overhead_fraction']:.4%} of step time (target <= 0.5%): "
          f"{'OK' if res['meets_target'] else 'OVER'}; wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

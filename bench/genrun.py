"""bench/genrun: realistic run directories, written the way kit's own writers write them (issue 16).

Why: a benchmark is only as honest as its input. Ledgers of step events alone made the postmortem and
``kit monitor --once`` look several times faster than they are on a real run, where per-rank timing
lines of 7-8 KB and a node's health history are most of the bytes. Every benchmark that needs a run
takes it from here, so none measures a kinder shape than production.

Every event goes through :class:`kit.ledger.LedgerWriter.emit` (an explicit ``t=`` sets its time), so
the lines follow the writer's schema and whatever the writer maintains beside them (an index). One file
per writer, as in production (docs/run-directory.md):

- ``cli`` run_created; ``submit`` chain_submitted; ``monitor-<host>`` an operator's alert_ack;
- ``chain``: allocation_started/ended, chain_requeued, node_excluded and the driver's alerts per segment;
  ``chain-signals``: segment_signalled before each time-limit boundary;
- ``doctor-r<R>`` (each node's first rank): the preflight of every segment;
- ``train-r0``: data_ready, ckpt_loaded, segment_started; a step event per step with every field the
  trainer writes; rank_timings every ``timing_interval`` steps with every rank's row (kit.stragglers),
  straggler events and their alert; loss spikes with the policy's rollback, data_skipped, alert and the
  replayed steps; ckpt_saved at the recipe's interval and ckpt_deleted by its retention; a save-now's
  control_ack; segment_ended;
- ``health-<node>``: one sample per node every ``health_period`` seconds while a segment runs, one entry
  per GPU with kit.health's NVML fields, the host's; temperature and Xid alerts with their samples;
- ``watchdog-r<R>``: the hang that ends one segment (when there are >= 8 segments; another one crashes
  on a GPU's Xid 79 and its node is excluded and replaced).
- ``slurm/chain.json``: the chain's state as the driver leaves it.

The numbers come from the BLOOM-1b7 recipe (8 nodes x 8 GPUs, ZeRO-1, checkpoints every 500 steps,
keep 3 + every 1000th, spikes policy rollback) with the shape's overrides; the same shape and seed give
the same bytes. ``python bench/genrun.py --help`` writes one; :func:`cached` reuses one per shape.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from kit import exitcodes
from kit.checkpoint import tag_for
from kit.ledger import LedgerWriter

ROOT = Path(__file__).resolve().parent.parent

GEN_VERSION = 3  # bump when the output changes: cached runs of another version are not reused
CACHE = Path(os.environ.get("KIT_BENCH_CACHE", "/tmp/kit-bench-runs"))
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z: the first submission (fixed: same shape, same bytes)
SETUP_S = 240.0  # allocation start to first step: preflight, data, engine, resume
QUEUE_S = 900.0  # between two allocations of the chain
LEAD_S = 900.0  # SIGUSR2 this long before the time limit (chain.signal_lead_s)
SAVE_S = 35.0  # one checkpoint save
RECIPE = ROOT / "jobs" / "bloom-1b7.toml"
GPU_NAME = "NVIDIA A100-SXM4-80GB"
DRIVER = "535.161.08"
VERSIONS = {"torch": "2.13.0+cu126", "deepspeed": "0.19.8", "transformers": "5.24.0", "cuda": "12.6",
            "nccl": "2.26.5"}


@dataclass(frozen=True, slots=True)
class Shape:
    """What a generated run looks like. The defaults are issue 16's shape."""

    steps: int = 1_000_000
    step_time: float = 2.0
    segments: int = 28
    nodes: int = 8
    gpus: int = 8  # per node
    health_period: float = 60.0  # seconds between recorded samples of a node (period_s x record_every)
    timing_interval: int = 50  # health.straggler_interval
    ckpt_interval: int = 500  # checkpoint.interval_steps (the recipe's)
    keep_last: int = 3
    keep_every: int = 1000
    spikes: int = 3  # loss spikes, each rolled back (the recipe's policy)
    live: bool = True  # the last segment is still running (no end events), as when an operator looks
    seed: int = 0

    def key(self) -> str:
        return f"g{GEN_VERSION}-" + "-".join(f"{f.name}{getattr(self, f.name)}" for f in fields(self))

    @property
    def world(self) -> int:
        return self.nodes * self.gpus


@dataclass(slots=True)
class Segment:
    """One allocation of the planned chain."""

    index: int
    job_id: str
    restarts: int
    nodes: list[str]
    target: int  # the step it would reach at its time limit
    end: str = "signal"  # signal | crash | hang | live | done
    seg: str = ""
    resume: int = 0  # step of the checkpoint it starts from
    last: int = 0  # the last step it completed
    t_start: float = 0.0
    t_end: float = 0.0
    spikes: list[int] = field(default_factory=list)
    save_now: int = 0
    slow_rank: int = -1  # a straggler in this segment (forward 8% slower)
    crash_node: str = ""
    ckpt_after: int = 0  # the newest complete checkpoint when it ended


@dataclass(slots=True)
class Counts:
    """What was written (the generator's own account; tests compare readers with it)."""

    events: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    step_events: int = 0
    seconds: float = 0.0

    def add(self, kind: str, n: int = 1) -> None:
        self.events[kind] = self.events.get(kind, 0) + n


# --------------------------------------------------------------------------------------------- plan


def plan(sh: Shape) -> list[Segment]:
    """Segments, their nodes, their incidents: cheap and deterministic (numpy's seeded generator)."""
    rng = np.random.default_rng(sh.seed)
    nodes = [f"node{i:03d}" for i in range(sh.nodes)]
    spare = sh.nodes
    bounds = np.linspace(0, sh.steps, sh.segments + 1)[1:]
    jitter = (bounds[1] - bounds[0] if sh.segments > 1 else sh.steps) * 0.1
    targets = [int(b + (rng.uniform(-jitter, jitter) if i < sh.segments - 1 else 0)) for i, b in enumerate(bounds)]
    segs: list[Segment] = []
    job, restarts = 41_000, 0
    crash_at, hang_at = (max(1, sh.segments // 5), sh.segments // 2 + 1) if sh.segments >= 6 else (-1, -1)
    for i, target in enumerate(targets):
        s = Segment(i, str(job), restarts, list(nodes), target)
        s.seg = f"{job}_{restarts}"
        s.end = "crash" if i == crash_at else "hang" if i == hang_at else "signal"
        if i == sh.segments - 1:
            s.end = "live" if sh.live else "done"
        if i == crash_at:
            s.crash_node = nodes[int(rng.integers(sh.nodes))]
            nodes[nodes.index(s.crash_node)] = f"node{spare:03d}"  # excluded; Slurm gives another node
            spare += 1
        if i == 1 and sh.segments > 3:
            s.save_now = 1
        if i in (3, 17) and sh.world > 2:
            s.slow_rank = int(rng.integers(sh.world))
        segs.append(s)
        if s.end == "signal":
            restarts += 1
        else:
            job, restarts = job + 1 + int(rng.integers(5)), 0
    # spikes: in segments that end normally, well inside them (a rollback needs a checkpoint before)
    quiet = [s for s in segs if s.end in ("signal", "live", "done") and s.index > 0]
    for j in range(min(sh.spikes, len(quiet))):
        s = quiet[(j * 7 + 3) % len(quiet)]
        s.spikes.append(-1)  # placed once the segment's step range is known
    return segs


# --------------------------------------------------------------------------------------------- model


def recipe(sh: Shape, runs_dir: Path, name: str) -> Any:
    from kit.config import load_recipe

    return load_recipe(RECIPE, [
        f'run.name="{name}"', f'run.runs_dir="{runs_dir}"',
        f"trainer.max_steps={sh.steps if not sh.live else 2 * sh.steps}",
        f"slurm.nodes={sh.nodes}", f"slurm.gpus_per_node={sh.gpus}", f"checkpoint.interval_steps={sh.ckpt_interval}",
        f"checkpoint.keep_last={sh.keep_last}", f"checkpoint.keep_every={sh.keep_every}",
        f"health.straggler_interval={sh.timing_interval}", f"health.period_s={sh.health_period / 6}",
        "health.record_every=6", f"optim.decay_steps={max(sh.steps, 2)}"])


class Curves:
    """The loss, grad norm and lr of every step (numpy, once): a decaying power law with noise."""

    def __init__(self, cfg: Any, steps: int, seed: int) -> None:
        rng = np.random.default_rng(seed + 1)
        s = np.arange(1, steps + 1, dtype=np.float64)
        self.loss = (1.9 + 8.5 / np.sqrt(1 + s / 300)) * np.exp(0.012 * rng.standard_normal(steps))
        self.grad_norm = (0.18 + 1.2 / np.sqrt(1 + s / 200)) * np.exp(0.08 * rng.standard_normal(steps))
        o = cfg.optim
        warm = np.minimum(1.0, s / max(1, o.warmup_steps))
        progress = np.clip((s - o.warmup_steps) / max(1, o.decay_steps), 0, 1)
        floor = o.min_lr / o.lr
        cos = floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))
        self.lr = o.lr * np.where(s <= o.warmup_steps, warm, cos)


# --------------------------------------------------------------------------------------------- train-r0


class Train:
    """Rank 0's ledger: the trainer's events, in the trainer's order within a step (kit/trainer.py
    step_once: spike, timings and stragglers, the step, a rollback, a save and its deletions)."""

    def __init__(self, run: Path, sh: Shape, cfg: Any, counts: Counts) -> None:
        from kit.model import step_flops

        self.run, self.sh, self.cfg, self.counts = run, sh, cfg, counts
        self.gb = cfg.batch.micro_batch_size * cfg.batch.grad_accum * sh.world
        self.seq = cfg.model.seq_length
        self.flops = step_flops(cfg.model, cfg.data.vocab_size, self.gb)
        self.model_flops = step_flops(cfg.model, cfg.data.vocab_size, self.gb, recompute=False)
        self.peak = cfg.trainer.peak_tflops
        self.curves = Curves(cfg, sh.steps, sh.seed)
        self.rng = np.random.default_rng(sh.seed + 2)
        self.saved: list[int] = []  # complete checkpoints on disk (retention's view)
        self.extra = 0  # samples skipped so far (skip ranges)
        self.rollbacks = 0
        self._alerted: set[tuple[int, int]] = set()  # (segment, rank): the first lag of a rank alerts
        self.led: LedgerWriter | None = None

    def emit(self, kind: str, t: float, **fields: Any) -> None:
        assert self.led is not None
        self.led.emit(kind, t=round(t, 6), **fields)
        self.counts.add(kind)

    def segment(self, s: Segment, t: float) -> float:
        """Write one segment from allocation time ``t``; returns the time of its last event."""
        sh, cfg = self.sh, self.cfg
        s.t_start = t
        self.led = LedgerWriter(self.run, "train-r0", seg=s.seg)
        try:
            t += SETUP_S * 0.6
            self.emit("data_ready", t, sources=[x.name for x in cfg.data.sources], tokens=41_553_921_024)
            s.resume = self.saved[-1] if self.saved else 0
            if s.resume:
                t += 60.0
                self.emit("ckpt_loaded", t, step=s.resume, tag=tag_for(s.resume), skipped=[], seconds=58.412)
            t += SETUP_S * 0.4 - (60.0 if s.resume else 0.0)
            self.emit("segment_started", t, world_size=sh.world, step=s.resume, resumed_from=tag_for(s.resume) if
                      s.resume else "", host=s.nodes[0], pid=181_000 + s.index, max_steps=cfg.trainer.max_steps,
                      global_batch=self.gb, job_id=s.job_id, restarts=s.restarts, versions=VERSIONS)
            last = self._crash_step(s)
            if s.spikes:
                lo, hi = s.resume + 2 * sh.ckpt_interval, last - 2 * sh.ckpt_interval
                s.spikes = [int(self.rng.integers(lo, hi))] if hi > lo else []
            t = self._steps(s, s.resume + 1, last, t)
            s.last = last
            t = self._end(s, t)
            s.ckpt_after = self.saved[-1] if self.saved else 0
        finally:
            self.led.close()
        s.t_end = t
        return t

    def _crash_step(self, s: Segment) -> int:
        if s.end in ("crash", "hang"):
            span = s.target - (self.saved[-1] if self.saved else 0)
            return s.target - span // 3 - int(self.rng.integers(1, self.sh.ckpt_interval))
        return s.target

    def _steps(self, s: Segment, first: int, last: int, t: float) -> float:
        """Steps first..last (and the replay after a rollback)."""
        sh = self.sh
        step = first
        spikes = set(s.spikes)
        save_now = first + (last - first) // 3 if s.save_now else -1
        slow = (first + (last - first) // 2, first + (last - first) // 2 + 40 * sh.timing_interval) \
            if s.slow_rank >= 0 else (0, -1)
        n = last - first + 1 + 2 * sh.ckpt_interval * len(spikes)  # enough step times for the replays
        dts = (sh.step_time * (1 + 0.015 * self.rng.standard_normal(n))).tolist()
        k = 0
        skip_at = -1
        while step <= last:
            dt = dts[k]
            k += 1
            if step == skip_at:  # the skip range is reached: the trainer jumps over it
                self.extra += self.cfg.spikes.skip_batches * self.gb
                self.emit("data_skipped", t + 0.001, step=step, start=(step - 1) * self.gb + self.extra -
                          self.cfg.spikes.skip_batches * self.gb, end=(step - 1) * self.gb + self.extra)
                skip_at = -1
            if slow[0] <= step <= slow[1]:
                dt *= 1.06  # synchronous data parallelism: everyone waits for the straggler
            t += dt
            note: dict[str, Any] = {}
            if step in spikes:
                spikes.discard(step)
                note = {"spike": "loss", "action": "rollback"}
                self._spike(step, t - 0.01)
            if step % sh.timing_interval == 0:
                self._timings(s, step, t - 0.005, slow[0] <= step <= slow[1])
            self._step(step, t, dt, note)
            if note:
                back = self._rollback(s, step, t)
                t += 75.0
                skip_at, step = step, back + 1
                continue
            if step == save_now:
                save_now = -1  # the switch is consumed: a replay of this step does not save again
                t = self._save(step, t, "save-now")
                self.emit("control_ack", t, switch="save-now", step=step, note="before the maintenance window")
            elif step % sh.ckpt_interval == 0 and step != last:
                t = self._save(step, t, "interval")
            step += 1
        return t

    def _step(self, step: int, t: float, dt: float, note: dict[str, Any]) -> None:
        c, i, gb = self.curves, step - 1, self.gb
        loss = float(c.loss[i]) * (2.4 if note else 1.0)
        self.emit("step", t, step=step, loss=loss, grad_norm=float(c.grad_norm[i]) * (6.0 if note else 1.0),
                  lr=float(c.lr[i]), consumed=i * gb + self.extra, samples=gb, tokens=gb * self.seq,
                  step_time=round(dt, 6), tokens_per_s=gb * self.seq / dt, samples_per_s=gb / dt,
                  tflops=self.flops / (dt * self.sh.world * 1e12),
                  mfu=(self.model_flops / (dt * self.sh.world * 1e12)) / self.peak, nonfinite=False, **note)
        self.counts.step_events += 1

    def _spike(self, step: int, t: float) -> None:
        sp = self.cfg.spikes
        value = float(self.curves.loss[step - 1]) * 2.4
        median = float(self.curves.loss[step - 1])
        self.emit("spike", t, step=step, loss=value, metric="loss", value=value, median=median,
                  size=value / median - 1, score=41.7, nonfinite=False, action="rollback", why=f"policy {sp.policy}",
                  policy=sp.policy, threshold=sp.threshold, window=sp.window,
                  consumed=(step - 1) * self.gb + self.extra, samples=self.gb, lr=float(self.curves.lr[step - 1]))

    def _rollback(self, s: Segment, spike: int, t: float) -> int:
        sp = self.cfg.spikes
        to = max(x for x in self.saved if x <= spike - sp.rollback_steps)
        aside = [x for x in self.saved if to < x < spike]
        self.saved = [x for x in self.saved if x <= to]
        self.rollbacks += 1
        start = (spike - 1) * self.gb + self.extra
        self.emit("rollback", t + 70.0, from_step=spike, to_step=to, spike_step=spike, tag=tag_for(to),
                  skip_start=start, skip_end=start + sp.skip_batches * self.gb, skip_batches=sp.skip_batches,
                  rollbacks=self.rollbacks, why=f"policy {sp.policy}", note="",
                  deleted=[tag_for(x) for x in aside], set_aside=[])
        end = start + sp.skip_batches * self.gb - 1
        self.emit("alert", t + 70.01, severity="warning", message=f"loss spike at step {spike}: rolled back to "
                  f"{tag_for(to)}, skipping {sp.skip_batches} batches (samples {start}-{end})", step=spike)
        return to

    def _timings(self, s: Segment, step: int, t: float, slow: bool) -> None:
        """kit.stragglers' rank_timings: every rank's means per step over the interval."""
        sh = self.sh
        w = sh.world
        noise = 1 + 0.01 * (self.rng.random((w, 3)) - 0.5)
        step_s = sh.step_time
        fwd = 0.27 * step_s * noise[:, 0]
        if slow:
            fwd[s.slow_rank] *= 1.08
        bwd = 0.55 * step_s * noise[:, 1]
        opt = 0.06 * step_s * noise[:, 2]
        from kit.stragglers import slowdowns

        slow_by = slowdowns([{"fwd_s": f} for f in fwd.tolist()])  # each rank's, as kit.stragglers reports it
        rows = []
        for r, (f, b, o) in enumerate(zip(fwd.tolist(), bwd.tolist(), opt.tolist(), strict=True)):
            rows.append({"rank": r, "host": s.nodes[r // sh.gpus], "gpu": r % sh.gpus,
                         "slowdown": round(slow_by[r], 4), "step_s": round(step_s, 6),
                         "fwd_s": round(f, 6), "bwd_s": round(b, 6), "opt_s": round(o, 6),
                         "other_s": round(max(0.0, step_s - f - b - o), 6)})
        self.emit("rank_timings", t, step=step, ranks=rows)
        if slow:
            from kit.stragglers import find_stragglers, median

            for r, slowdown in find_stragglers(rows, self.cfg.health.straggler_threshold):
                others = median([x["fwd_s"] for i, x in enumerate(rows) if i != r])
                node = s.nodes[r // sh.gpus]
                self.emit("straggler", t + 0.001, rank=r, slowdown=slowdown, step=step, node=node, gpu=r % sh.gpus,
                          local_rank=r % sh.gpus, fwd_s=rows[r]["fwd_s"], median_fwd_s=round(others, 6))
                self._straggler_alert(s, r, slowdown, step, t)

    def _straggler_alert(self, s: Segment, r: int, slowdown: float, step: int, t: float) -> None:
        key = (s.index, r)
        if key in self._alerted:
            return
        self._alerted.add(key)
        node = s.nodes[r // self.sh.gpus]
        gpu = r % self.sh.gpus
        self.emit("alert", t + 0.002, severity="warning", message=f"straggler: rank {r} ({node}, GPU {gpu}) is "
                  f"{slowdown:.1%} slower than the other ranks' median in forward (step {step})", rank=r, node=node,
                  gpu=gpu)

    def _save(self, step: int, t: float, why: str) -> float:
        t += SAVE_S * (1 + 0.1 * float(self.rng.random()))
        self.emit("ckpt_saved", t, step=step, tag=tag_for(step), seconds=round(SAVE_S, 3), reason=why,
                  bytes=20_436_985_856 + 104_857_600 * self.sh.world, consumed=step * self.gb + self.extra)
        self.saved.append(step)
        keep = set(self.saved[-self.sh.keep_last:])
        keep |= {x for x in self.saved if self.sh.keep_every and x % self.sh.keep_every == 0}
        for x in [x for x in self.saved if x not in keep]:
            t += 0.05
            self.emit("ckpt_deleted", t, tag=tag_for(x))
        self.saved = [x for x in self.saved if x in keep]
        return t

    def _end(self, s: Segment, t: float) -> float:
        if s.end in ("signal", "done"):
            t = self._save(s.last, t, s.end)
            self.emit("segment_ended", t + 1.0, reason=s.end, step=s.last, exit_code=exitcodes.REASONS[s.end],
                      signal="SIGUSR2" if s.end == "signal" else "")
            return t + 1.0
        if s.end == "hang":
            return t + 1800.0  # the watchdog's bound passes: its own file says so (:func:`_hang`)
        return t  # a crash or a live segment: nothing more from rank 0


# --------------------------------------------------------------------------------------------- health


GPU_TEMPLATE: dict[str, Any] = {  # kit.health._NvmlGpus.sample's keys, in its order
    "index": 0, "uuid": "", "name": GPU_NAME, "util_pct": 0, "mem_util_pct": 0, "mem_used_gib": 0.0,
    "mem_total_gib": 79.647, "temp_c": 0, "power_w": 0.0, "power_limit_w": 400.0, "sm_clock_mhz": 1410,
    "throttle": 0, "throttle_reasons": [], "ecc_vol_unc": 0, "ecc_vol_cor": 0, "ecc_agg_unc": 0, "ecc_agg_cor": 0,
    "retired_pages": 0, "remapped_rows_cor": 0, "remapped_rows_unc": 0, "remap_pending": False,
    "remap_failed": False, "nvlink_errors": 0, "xid": [], "lost": False,
}
HOT_GPU = 5  # the GPU that runs hot in segment 7
XID_GPU = 3  # the GPU that falls off the bus in the crashing segment


@dataclass(frozen=True, slots=True)
class Span:
    """A segment as one node's sampler saw it."""

    seg: str
    index: int
    t_from: float
    t_to: float
    hot: bool  # this node has a GPU over health.gpu_temp_max_c for a while
    xid_at: float  # this node's GPU falls off the bus at this time (0: never)


def health_file(run: str, node: str, node_index: int, spans: list[Span], sh: Shape, temp_max: float) -> dict[str, int]:
    """One node's health ledger (a process of its own: the files are independent)."""
    rng = np.random.default_rng([sh.seed, node_index])
    counts: dict[str, int] = {}
    hot_gpu, xid_gpu = min(HOT_GPU, sh.gpus - 1), min(XID_GPU, sh.gpus - 1)
    uuids = [f"GPU-{node_index:04x}{g:04x}-5e1d-4c7a-9f3b-{node_index * 8 + g:012x}" for g in range(sh.gpus)]
    templates = [{**GPU_TEMPLATE, "index": g, "uuid": uuids[g]} for g in range(sh.gpus)]
    for sp in spans:
        times = np.arange(sp.t_from, sp.t_to, sh.health_period).tolist()
        if sp.xid_at:  # the sample that finds the GPU gone is the node's last of the segment
            times = [x for x in times if x < sp.xid_at] + [sp.xid_at]
        n = len(times)
        util = rng.integers(93, 101, (n, sh.gpus)).tolist()
        memu = rng.integers(35, 48, (n, sh.gpus)).tolist()
        temp = rng.integers(54, 74, (n, sh.gpus)).tolist()
        power = np.round(rng.uniform(285, 395, (n, sh.gpus)), 1).tolist()
        used = np.round(rng.uniform(71.0, 74.5, (n, sh.gpus)), 3).tolist()
        host = rng.random((n, 4)).tolist()
        capped = rng.random((n, sh.gpus)) < 0.02  # a short sw_power_cap now and then, as on real nodes
        hot_from = n // 3 if sp.hot else n + 1
        with LedgerWriter(run, f"health-{node}", seg=sp.seg) as led:
            for i, t in enumerate(times):
                if sp.xid_at and t >= sp.xid_at:
                    gpus = [dict(x) for x in templates]
                    lost = gpus[xid_gpu]
                    for k in ("util_pct", "mem_util_pct", "mem_used_gib", "temp_c", "power_w", "sm_clock_mhz",
                              "throttle", "ecc_vol_unc", "ecc_vol_cor", "ecc_agg_unc", "ecc_agg_cor",
                              "retired_pages", "remapped_rows_cor", "remapped_rows_unc", "remap_pending",
                              "remap_failed", "nvlink_errors"):
                        lost[k] = None
                    lost.update(throttle_reasons=[], xid=[79], lost=True)
                    where = f"GPU {xid_gpu} ({uuids[xid_gpu]}) on {node}"
                    led.alert("critical", f"{where} does not answer NVML (lost?)", node=node, condition="gpu_lost",
                              t=round(t, 6), gpu=xid_gpu, uuid=uuids[xid_gpu])
                    led.alert("critical", f"{where}: Xid 79", node=node, condition="xid", t=round(t, 6), xid=[79],
                              gpu=xid_gpu, uuid=uuids[xid_gpu])
                    counts["alert"] = counts.get("alert", 0) + 2
                    _health(led, t, node, gpus, host[i], counts)
                    break
                gpus = []
                for g, tpl in enumerate(templates):
                    d = dict(tpl)
                    d["util_pct"], d["mem_util_pct"], d["mem_used_gib"] = util[i][g], memu[i][g], used[i][g]
                    d["temp_c"], d["power_w"] = temp[i][g], power[i][g]
                    if capped[i, g]:
                        d["throttle"], d["throttle_reasons"], d["sm_clock_mhz"] = 4, ["sw_power_cap"], 1275
                    gpus.append(d)
                if hot_from <= i < hot_from + 20:
                    gpus[hot_gpu].update(temp_c=88 + i % 3, throttle=0x40, throttle_reasons=["hw_thermal"],
                                         sm_clock_mhz=1155)
                    if i == hot_from:  # the alert's own sample is recorded (kit.health: record on alert)
                        where = f"GPU {hot_gpu} ({uuids[hot_gpu]}) on {node}"
                        led.alert("warning", f"{where} at 88 C (> health.gpu_temp_max_c = {temp_max})", node=node,
                                  condition="temp", t=round(t - 20.0, 6), temp_c=88, gpu=hot_gpu, uuid=uuids[hot_gpu])
                        led.alert("warning", f"{where} slowed down by hw_thermal", node=node, condition="throttle",
                                  t=round(t - 20.0, 6), gpu=hot_gpu, uuid=uuids[hot_gpu])
                        counts["alert"] = counts.get("alert", 0) + 2
                        _health(led, t - 20.0, node, gpus, host[i], counts)
                _health(led, t, node, gpus, host[i], counts)
    return counts


def _health(led: LedgerWriter, t: float, node: str, gpus: list[dict[str, Any]], h: list[float],
            counts: dict[str, int]) -> None:
    host = {"cpu_pct": round(30 + 20 * h[0], 1), "mem_pct": round(38 + 6 * h[1], 1),
            "mem_used_gib": round(190 + 30 * h[1], 3), "mem_avail_gib": round(810 - 30 * h[1], 3),
            "load1": round(10 + 6 * h[2], 2), "fs_free_gib": round(412_000 - 900 * h[3], 3),
            "net_rx_mbps": round(9_000 + 4_000 * h[2], 3), "net_tx_mbps": round(9_000 + 4_000 * h[3], 3)}
    led.emit("health", t=round(t, 6), node=node, gpus=gpus, host=host, driver=DRIVER)
    counts["health"] = counts.get("health", 0) + 1


# --------------------------------------------------------------------------------------------- the chain


def chain_files(run: Path, sh: Shape, cfg: Any, segs: list[Segment], counts: Counts) -> None:
    """The writers around the trainer: cli, submit, chain, chain-signals, doctor, watchdog, monitor."""
    from kit.jobs import chain as ch

    def emit(led: LedgerWriter, kind: str, t: float, **f: Any) -> None:
        led.emit(kind, t=round(t, 6), **f)
        counts.add(kind)

    with LedgerWriter(run, "cli") as led:
        emit(led, "run_created", START - 60.0, name=cfg.run.name, config_digest=cfg.digest())
    with LedgerWriter(run, "submit") as led:
        emit(led, "chain_submitted", START, job_id=segs[0].job_id, executor="slurm", signal_lead_s=int(LEAD_S),
             time_limit=cfg.slurm.time_limit, nodes=sh.nodes, excluded=[])
    state = ch.ChainState(job_id=segs[-1].job_id, state=ch.RUNNING if sh.live else ch.ENDED, executor="slurm",
                          submitted=START, job_ids=list(dict.fromkeys(s.job_id for s in segs)))
    if not sh.live:
        state.end_reason = "done"
    excluded: list[str] = []
    for s in segs:
        with LedgerWriter(run, "chain", seg=s.seg) as led:
            emit(led, "allocation_started", s.t_start + 5.0, job_id=s.job_id, restarts=s.restarts, nodes=s.nodes,
                 world_size=sh.world, gpus=[GPU_NAME] * sh.gpus, driver=DRIVER, image="/scratch/images/kit-a100.sif",
                 executor="slurm", excluded=list(excluded), ckpt_step=s.resume, job_end=s.t_start + 72_000.0)
        _doctor(run, sh, s, counts)
        rec = ch.SegmentRecord(seg=s.seg, job_id=s.job_id, restarts=s.restarts, nodes=s.nodes, start=s.t_start,
                               ckpt_before=s.resume)
        state.segments.append(rec)
        if s.end == "live":
            continue
        if s.end == "signal":
            with LedgerWriter(run, "chain-signals") as led:
                emit(led, "segment_signalled", s.t_end - 60.0, signal="SIGUSR2", job_id=s.job_id)
        if s.end == "hang":
            _hang(run, sh, s, counts)
        outcome = {"signal": ch.CLEAN, "done": ch.FINISHED, "crash": ch.CRASH, "hang": ch.HANG}[s.end]
        reason = {"signal": "signal", "done": "done", "crash": "exit status 1", "hang": "hang"}[s.end]
        rc = {"signal": exitcodes.REQUEUE, "done": 0, "crash": 1, "hang": exitcodes.HANG}[s.end]
        implicated = [s.crash_node] if s.end == "crash" else [s.nodes[1]] if s.end == "hang" else []
        rec.end, rec.outcome, rec.reason, rec.step = s.t_end + 20.0, outcome, reason, s.last
        rec.ckpt_after = s.ckpt_after
        rec.exit_codes = {str(r): (rc if s.end != "crash" or r // sh.gpus != s.nodes.index(s.crash_node) else -9)
                          for r in range(sh.world)}
        rec.implicated = implicated
        decision = {"signal": "requeue", "done": "end"}.get(s.end, "resubmit")
        with LedgerWriter(run, "chain", seg=s.seg) as led:
            t = s.t_end + 20.0
            emit(led, "allocation_ended", t, job_id=s.job_id, outcome=outcome, reason=reason, step=s.last,
                 ckpt_step=rec.ckpt_after, exit_codes=rec.exit_codes, implicated=implicated, decision=decision)
            for node in implicated:
                excluded.append(node)
                emit(led, "node_excluded", t + 0.01, node=node, reason=f"{outcome} in segment {s.seg}")
            if implicated:
                led.alert("warning", f"segment {s.seg} {outcome}ed ({reason}); resubmitting in 60 s from checkpoint "
                          f"step {rec.ckpt_after}", t=round(t + 0.02, 6), seg_ended=s.seg)
                counts.add("alert")
            if decision == "end":
                emit(led, "chain_ended", t + 0.03, reason="done", job_id=s.job_id, step=s.last)
        if decision == "requeue":
            with LedgerWriter(run, "chain", seg=s.seg) as led:
                emit(led, "chain_requeued", s.t_end + 21.0, job_id=s.job_id, reason=reason, how="requeue")
        elif decision == "resubmit":
            nxt = segs[s.index + 1]
            with LedgerWriter(run, "chain", seg=s.seg) as led:
                emit(led, "chain_requeued", s.t_end + 21.0, job_id=nxt.job_id, reason=f"{outcome}: {reason}"
                     if outcome == ch.CRASH else outcome, how="resubmit", delay_s=60.0, previous_job_id=s.job_id)
    state.excluded_nodes = excluded
    state.suspect_nodes = list(excluded)
    ch.save_state(_rundir(run), state)


def _rundir(run: Path) -> Any:
    from kit.rundir import RunDir

    return RunDir(run)


def _doctor(run: Path, sh: Shape, s: Segment, counts: Counts) -> None:
    """Each node's preflight (tools/doctor.py: the node's first rank writes ``doctor-r<rank>``)."""
    scores = {n: round(1.0 - 0.01 * (i % 3), 3) for i, n in enumerate(s.nodes)}
    measures = {n: {"copy_gbps": round(1500.0 - 3 * i, 4), "intra_busbw_gbps": round(230.0 - i, 4),
                    "pair_busbw_gbps": round(88.0 - 0.5 * i, 4)} for i, n in enumerate(s.nodes)}
    slowest = min(scores, key=lambda n: scores[n])
    for i, node in enumerate(s.nodes):
        rank = i * sh.gpus
        checks = [
            {"name": "versions", "status": "ok", "detail": "torch, deepspeed, transformers, nccl as pinned (a100)",
             "node": node},
            {"name": "gpu.nvml", "status": "ok", "detail": f"driver {DRIVER}", "node": node},
            {"name": "gpu.count", "status": "ok", "detail": f"{sh.gpus} GPUs visible", "node": node,
             "value": sh.gpus},
            {"name": "gpu.uuids", "status": "ok", "detail": "no GPU of a previous failure", "node": node},
            {"name": "fs.space", "status": "ok", "detail": "411.9 TiB free for 2 checkpoints", "node": node,
             "value": 411_900.0},
            {"name": "fs.inodes", "status": "ok", "detail": "enough inodes", "node": node},
            {"name": "fs.write", "status": "ok", "detail": "2140 MB/s", "node": node, "value": 2140.0},
            {"name": "net.busbw", "status": "ok", "detail": "all-reduce bus bandwidth 84.2 GB/s", "node": node,
             "value": 84.2},
            {"name": "net.slowest_node", "status": "ok", "detail": f"{slowest}", "node": node, "value": slowest},
        ]
        with LedgerWriter(run, f"doctor-r{rank}", seg=s.seg) as led:
            led.emit("doctor", t=round(s.t_start + 40.0 + 0.01 * i, 6), ok=True, node=node, rank=rank,
                     world_size=sh.world, failed_nodes=[], shared_failures=[], slowest_node=slowest, busbw_gbps=84.2,
                     algbw_gbps=42.4, node_scores=scores, node_measures=measures, checks=checks)
        counts.add("doctor")


def _hang(run: Path, sh: Shape, s: Segment, counts: Counts) -> None:
    """kit.watchdog's report of a hang (the reporting rank's own file)."""
    suspect = s.nodes[1]
    rank = sh.gpus + 2
    t = s.t_end - 5.0
    with LedgerWriter(run, f"watchdog-r{rank}", seg=s.seg) as led:
        led.emit("hang", t=round(t, 6), bound_s=1800.0, stalled_s=1805.2, step=s.last, phase="step",
                 suspect_ranks=[rank], suspect_nodes=[suspect], missing_ranks=[], groups=[[rank], [0]],
                 stacks=f"stacks/{s.seg}")
        led.alert("critical", f"hang: no step completed for 1805.2 s (bound 1800.0 s) after step {s.last}; "
                  f"suspect ranks {rank} ({suspect}): stuck in a collective the others left; stacks in "
                  f"stacks/{s.seg}; exiting with HANG ({exitcodes.HANG}) so the chain resubmits without {suspect}",
                  t=round(t + 0.01, 6), suspect_nodes=[suspect], suspect_ranks=[rank])
        led.emit("segment_ended", t=round(t + 0.02, 6), reason="hang", step=s.last, exit_code=exitcodes.HANG,
                 suspect_nodes=[suspect])
    for k in ("hang", "alert", "segment_ended"):
        counts.add(k)


# --------------------------------------------------------------------------------------------- generate


def generate(sh: Shape, runs_dir: Path, name: str = "gen", workers: int = 0) -> tuple[Path, Counts]:
    """Write a run directory ``runs_dir/name`` of shape ``sh``; returns its path and what was written."""
    from kit.rundir import RunDir

    t0 = time.perf_counter()
    cfg = recipe(sh, runs_dir, name)
    rd = RunDir(cfg.run_dir)
    if rd.path.exists():
        shutil.rmtree(rd.path)
    rd.create(cfg)
    counts = Counts()
    segs = plan(sh)
    train = Train(rd.path, sh, cfg, counts)
    t = START + QUEUE_S
    for s in segs:
        t = train.segment(s, t) + QUEUE_S
    chain_files(rd.path, sh, cfg, segs, counts)
    jobs = _health_jobs(rd.path, sh, segs)
    temp_max = cfg.health.gpu_temp_max_c
    with ProcessPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(health_file, str(rd.path), node, i, spans, sh, temp_max)
                   for i, (node, spans) in enumerate(jobs.items())]
        for f in futures:
            for k, v in f.result().items():
                counts.add(k, v)
    with LedgerWriter(rd.path, "monitor-login1-4242") as led:  # an operator acknowledged the hot GPU
        hot = [s for s in segs if s.index == 7]
        if hot:
            led.emit("alert_ack", t=round(hot[0].t_start + 7200.0, 6), alert_t=round(hot[0].t_start + 3600.0, 6),
                     by="operator", message="hot GPU: facility informed")
            counts.add("alert_ack")
    files = list(rd.ledger.glob("*.jsonl"))
    counts.files = len(files)
    counts.bytes = sum(f.stat().st_size for f in files)
    counts.seconds = round(time.perf_counter() - t0, 1)
    return rd.path, counts


def _health_jobs(run: Path, sh: Shape, segs: list[Segment]) -> dict[str, list[Span]]:
    jobs: dict[str, list[Span]] = {}
    for s in segs:
        t_to = s.t_end  # a hang's sampler goes on until the watchdog ends the segment
        for j, node in enumerate(s.nodes):
            xid = s.t_end - 30.0 if s.end == "crash" and node == s.crash_node else 0.0
            jobs.setdefault(node, []).append(Span(s.seg, s.index, s.t_start + 120.0, t_to, s.index == 7 and j == 1,
                                                  xid))
    return jobs


def cached(sh: Shape, root: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The run of shape ``sh`` under the cache (``$KIT_BENCH_CACHE``, default /tmp/kit-bench-runs),
    generated on first use; returns its path and its record (counts, sizes, generation time)."""
    base = (root or CACHE) / sh.key()
    record = base / "generated.json"
    if record.exists():
        return base / "runs" / "gen", json.loads(record.read_text())
    shutil.rmtree(base, ignore_errors=True)
    path, counts = generate(sh, base / "runs")
    meta = {"shape": asdict(sh), "counts": asdict(counts), "generator": GEN_VERSION}
    record.write_text(json.dumps(meta, indent=1))
    return path, meta


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """``--steps``, ``--nodes``... (every :class:`Shape` field) for a benchmark's command line."""
    for f in fields(Shape):
        default = f.default
        name = f"--{f.name.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(name, type=lambda v: v.lower() in ("1", "true", "yes"), default=default,
                           help=f"generated run: {f.name} (default {default})")
        else:
            p.add_argument(name, type=type(default), default=default,
                           help=f"generated run: {f.name} (default {default})")


def shape_from(args: argparse.Namespace) -> Shape:
    return Shape(**{f.name: getattr(args, f.name) for f in fields(Shape)})


def evict(root: Path) -> int:
    """Drop ``root``'s files from the page cache (posix_fadvise DONTNEED: this run's files only), so the
    next read comes from the disk: a cold start as after a reboot or on another login node."""
    n = 0
    for d, _, names in os.walk(root):
        for name in names:
            try:
                fd = os.open(os.path.join(d, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return n


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (VmHWM). Why not getrusage's ru_maxrss: a
    child's starts at its parent's resident size at fork, so a benchmark forked from a large parent
    would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(load_before: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """What every result file records about the machine: its name, CPUs and load (before and after)."""
    return {"machine": os.uname().nodename, "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before] if load_before else None,
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p)
    p.add_argument("--out", type=Path, default=None, help="runs directory to write into (default: the cache)")
    a = p.parse_args(argv)
    sh = shape_from(a)
    if a.out:
        path, counts = generate(sh, a.out)
        meta = {"counts": asdict(counts)}
    else:
        path, meta = cached(sh)
    c = meta["counts"]
    print(f"{path}: {c['files']} ledger files, {c['bytes'] / 1e6:,.0f} MB, {sum(c['events'].values()):,} events "
          f"({c['step_events']:,} steps) in {c['seconds']} s")
    print(json.dumps(c["events"], sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

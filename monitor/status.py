"""What a run's state means: the verdict (healthy / degraded / down) and the summary behind it.

One function, :func:`summarize`, serves the chain panel, the run list and ``kit monitor --once``, so the
screen and the cron job never disagree. Exit statuses of ``--once`` (docs/monitor.md): 0 healthy,
1 degraded, 2 down; with several runs, the worst.
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

from kit.monitor.health import worst_first
from kit.monitor.model import REQUEUE_REASONS, RunModel
from kit.monitor.slurm import QueueInfo

HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"
EXIT = {HEALTHY: 0, DEGRADED: 1, DOWN: 2}
STALL_FLOOR_S = 600.0  # no step for this long (or 20 step times, whichever is longer) = stalled
STARTUP_S = 1800.0  # from segment start to the first step: data, model build, checkpoint load
IDLE_CHAIN_S = 86400.0  # a requeued run with no new segment for a day is degraded
RECENT_S = 3600.0  # spikes within the last hour degrade the run (stragglers: while their incident is open)
DROP = 0.8  # recent throughput under 80% of the run's median is a drop
HOST_KEYS = ("mem_pct", "mem_avail_gib", "cpu_pct", "load1", "fs_free_gib", "net_rx_mbps", "net_tx_mbps")


def worst(levels: list[str]) -> str:
    return max(levels, key=lambda lv: EXIT[lv], default=HEALTHY)


def _phase(m: RunModel, now: float, q: QueueInfo | None) -> tuple[str, str, list[str]]:
    """(phase, level, reasons) from the chain and segment events (and Slurm when known)."""
    seg = m.current_segment()
    if m.last_t is None:
        return "empty", DOWN, ["no ledger events yet"]
    if m.chain_ended and (seg is None or seg.started_t is None or (m.chain_ended_t or 0) >= seg.started_t):
        if m.chain_ended in ("done", "stop", "stopped", "cancelled"):
            return ("finished" if m.chain_ended == "done" else "stopped"), HEALTHY, []
        if m.chain_ended in ("max_segments", "chain_deadline"):  # the recipe's limits: resubmit to go on
            return "ended", DEGRADED, [f"the chain ended at its limit: {m.chain_ended}"]
        return "ended", DOWN, [f"the chain ended: {m.chain_ended}"]
    if seg is None or seg.started_t is None:
        return "starting", HEALTHY, []
    pending = q.pending() if q and q.available else None
    running = q.running() if q and q.available else None
    if seg.ended_t is None:
        st = m.step_time() or 0.0
        if m.step_t is not None and m.step_t >= seg.started_t:
            bound, since, what = max(STALL_FLOOR_S, 20 * st), m.step_t, "no step"
        else:
            bound, since, what = STARTUP_S, seg.started_t, "no first step"
        age = now - since
        if age > bound:
            if q and q.available and seg.job_id and seg.job_id in q.jobs and running is None:
                return "crashed", DOWN, [f"job {seg.job_id} is {q.jobs[seg.job_id].state} without a segment end"]
            return "stalled", DOWN, [f"{what} for {dur(age)} (bound {dur(bound)})"]
        return "running", HEALTHY, []
    reason = seg.reason
    if reason == "done" or (m.max_steps and m.step is not None and m.step >= m.max_steps):
        return "finished", HEALTHY, []
    if reason == "stop":
        return "stopped", HEALTHY, []
    if reason in REQUEUE_REASONS:
        if pending or running:
            return "queued", HEALTHY, []
        idle = now - (seg.ended_t or now)
        if idle > IDLE_CHAIN_S:
            return "waiting", DEGRADED, [f"no new segment for {dur(idle)} since {reason}"]
        return "waiting", HEALTHY, []
    if pending or running:
        return "queued", DEGRADED, [f"segment {seg.seg} ended: {reason or '?'}; the chain resubmitted"]
    return "ended", DOWN, [f"segment {seg.seg} ended: {reason or '?'}"]


def _degradations(m: RunModel, now: float, phase: str) -> list[str]:
    out: list[str] = []
    unacked = m.unacked("warning")
    if unacked:
        sev = max(unacked, key=lambda a: ("warning", "error", "critical").index(a.severity)).severity
        out.append(f"{len(unacked)} unacknowledged alert(s), worst {sev}")
    if m.last.get("nonfinite") is True:
        out.append(f"non-finite loss at step {m.step}")
    spikes = [s for s in m.spikes if now - s[2] <= RECENT_S]
    if spikes:
        out.append(f"{len(spikes)} loss spike(s) in the last hour (step {spikes[-1][0]})")
    slow = [a for a in m.open_incidents("straggler") if not a.acked]  # kit.stragglers clears them on recovery
    if slow:
        out.append(f"{len(slow)} straggler incident(s) open: {slow[-1].message[:100]}")
    if phase == "running":
        drop = throughput_drop(m)
        if drop is not None and drop < DROP:
            out.append(f"throughput at {drop:.0%} of the run's median")
    bad = [(n.node, g) for n, g in worst_first(m.health) if g.problems()]
    if bad:
        node, g = bad[0]
        out.append(f"{len(bad)} GPU(s) with problems, worst {node}/gpu{g.index}: {','.join(g.problems())}")
    return out


def throughput_drop(m: RunModel) -> float | None:
    """Recent tokens/s (median of the last 20 points) over the run's median, or None."""
    recent = m.curves.recent_values("tokens_per_s", 20)
    _, means, _ = m.curves.whole("tokens_per_s")
    if len(recent) < 5 or len(means) < 10:
        return None
    base = statistics.median(means)
    return statistics.median(recent) / base if base > 0 else None


def eta(m: RunModel) -> float | None:
    """Seconds to the end: steps to go x recent step time, plus the queue waits seen so far."""
    st = m.step_time()
    if st is None or m.max_steps is None or m.step is None:
        return None
    train = max(0, m.max_steps - m.step) * st
    segs = [s for s in m.segments.values() if s.started_t is not None]
    gaps, lengths = [], []
    for a, b in itertools.pairwise(segs):
        if a.ended_t is not None and b.started_t is not None:
            gaps.append(max(0.0, b.started_t - a.ended_t))
            lengths.append(max(1.0, a.ended_t - (a.started_t or a.ended_t)))
    if gaps and lengths:
        train += math.ceil(train / statistics.mean(lengths)) * statistics.mean(gaps)
    return train


def dur(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "N/A"
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def summarize(m: RunModel, now: float, q: QueueInfo | None = None) -> dict[str, Any]:
    phase, level, reasons = _phase(m, now, q)
    more = _degradations(m, now, phase)
    if more and level == HEALTHY:
        level = DEGRADED
    seg = m.current_segment()
    last = m.last
    ck = next((c for c in reversed(m.ckpts.values()) if c.t is not None and not c.deleted), None)
    job = (q.jobs.get(seg.job_id) if q and seg and seg.job_id else None)
    nxt = q.pending() if q and q.available else None
    left = eta(m) if phase not in ("finished", "stopped") else 0.0
    gpus = [g for n in m.health.values() for g in n.gpus]
    return {
        "run": m.name, "path": m.path, "status": level, "exit": EXIT[level], "phase": phase,
        "reasons": reasons + more,
        "step": m.step, "max_steps": m.max_steps,
        "to_go": (m.max_steps - m.step) if m.max_steps is not None and m.step is not None else None,
        "last_event_age_s": (now - m.last_t) if m.last_t else None,
        "step_age_s": (now - m.step_t) if m.step_t else None,
        **{k: _f(last.get(k)) for k in ("loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s", "tflops",
                                        "mfu", "step_time")},
        "eta_s": left, "finish_t": (now + left) if left is not None else None,
        "segment": None if seg is None else {
            "seg": seg.seg, "job_id": seg.job_id, "state": job.state if job else (
                "ended" if seg.ended_t else "running"), "reason": seg.reason, "started_t": seg.started_t,
            "elapsed_s": ((seg.ended_t or now) - seg.started_t) if seg.started_t else None,
            "time_left": job.time_left if job else "", "host": seg.host, "world_size": seg.world_size,
            "start_step": seg.start_step, "end_step": seg.end_step},
        "segments": len(m.segments),
        "next": None if nxt is None else {"job_id": nxt.job_id, "state": nxt.state, "reason": nxt.reason,
                                          "start": nxt.start},
        "slurm": None if q is None else {"available": q.available, "error": q.error},
        "last_ckpt": None if ck is None else {
            "tag": ck.tag, "step": ck.step, "age_s": now - (ck.t or now), "bytes": ck.bytes, "seconds": ck.seconds,
            "verified": ck.verified, "converted": bool(ck.converted), "uploaded": bool(ck.uploaded)},
        "alerts_unacked": len(m.unacked("info")), "alerts": len(m.alerts),
        "rollbacks": None if not m.rollbacks else {"count": len(m.rollbacks), "t": m.rollbacks[-1][0],
                                                   "from_step": m.rollbacks[-1][1], "to_step": m.rollbacks[-1][2]},
        "doctor": None if not m.doctor else {"ok": m.doctor["ok"], "t": m.doctor["t"]},
        "excluded_nodes": sorted(m.excluded),
        "health": {"nodes": len(m.health), "gpus": len(gpus), "problems": sum(bool(g.problems()) for g in gpus),
                   "nvml_absent": sorted(m.nvml_absent),
                   # host readings of each node's latest sample (kit.health): memory, load, disk, network
                   "hosts": {n.node: {"t": n.t, **{k: n.host.get(k) for k in HOST_KEYS}}
                             for n in sorted(m.health.values(), key=lambda n: n.node)[:64]}},
        "reader": {"events": m.reader.events, "bad_lines": m.reader.bad_lines,
                   "unknown_kinds": m.reader.unknown_kinds, "future_version": m.reader.future_version,
                   "vanished_files": m.reader.vanished_files, "truncated_files": m.reader.truncated_files,
                   "junk_events": m.junk_events, "last_error": m.reader.last_error,
                   "unknown": dict(sorted(m.unknown_kinds.items())[:10])},
    }


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None

"""The one run summary: what a run's state means, built in one place, shown by every tool.

``kit status``, ``kit monitor --once`` and the TUI all show :class:`RunSummary`, built by
:func:`summarize` from the run's folded ledger (kit.run.model), the chain's record (``slurm/chain.json``,
kit.run.chainstate) and one Slurm query (kit.run.queue), so they never disagree: the verdict
(healthy / degraded / down) and why, progress, the finish estimate, the segments, the last
checkpoint, the alerts, health. :func:`collect` reads all three for a run directory. Exit statuses of
``--once`` (docs/monitor.md): 0 healthy, 1 degraded, 2 down; with several runs, the worst.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from kit.ledger import REQUEUE_REASONS, ReadStats
from kit.run import queue as slurm
from kit.run.chainstate import ChainState, load_state
from kit.run.gpus import worst_first
from kit.run.model import RunModel
from kit.run.queue import JobInfo, QueueInfo

HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"
EXIT = {HEALTHY: 0, DEGRADED: 1, DOWN: 2}
INCOMPLETE = 3  # the exit status when part of the answer could not be read (RunSummary.incomplete): never silent
STALL_FLOOR_S = 600.0  # no step for this long (or 20 step times, whichever is longer) = stalled
STARTUP_S = 1800.0  # from segment start to the first step: data, model build, checkpoint load
IDLE_CHAIN_S = 86400.0  # a requeued run with no new segment for a day is degraded
HOST_KEYS = ("mem_pct", "mem_avail_gib", "cpu_pct", "load1", "fs_free_gib", "net_rx_mbps", "net_tx_mbps")
RECENT_S = 3600.0  # spikes within the last hour degrade the run (stragglers: while their incident is open)
DROP = 0.8  # recent throughput under 80% of the run's median is a drop
STARTUP_S_DEFAULT = 60.0  # a segment's start-up before anything is measured (imports, rendezvous, resume)
METRICS = ("loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s", "tflops", "mfu", "step_time")


def worst(levels: list[str]) -> str:
    return max(levels, key=lambda lv: EXIT[lv], default=HEALTHY)


def _phase(m: RunModel, now: float, q: QueueInfo | None, chain: ChainState) -> tuple[str, str, list[str]]:
    """(phase, level, reasons) from the chain and segment events (and Slurm when known)."""
    seg = m.current_segment()
    if m.last_t is None:
        if chain.state in ("queued", "running") and q and q.pending():
            return "queued", HEALTHY, []
        return "empty", DOWN, ["no ledger events yet"]
    # How the chain ended: its ledger event, or its record (kit cancel on a login node writes both)
    ended = m.chain_ended or (chain.end_reason if chain.state == "ended" else "")
    ended_t = m.chain_ended_t if m.chain_ended else (chain.segments[-1].end if chain.segments else None)
    if ended and (seg is None or seg.started_t is None or (ended_t or math.inf) >= seg.started_t):
        if ended in ("done", "stop", "stopped", "cancelled"):
            return ("finished" if ended == "done" else "stopped"), HEALTHY, []
        if ended in ("max_segments", "chain_deadline"):  # the recipe's limits: resubmit to go on
            return "ended", DEGRADED, [f"the chain ended at its limit: {ended}"]
        return "ended", DOWN, [f"the chain ended: {ended}"]
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




# ------------------------------------------------------------------------------------------ the summary


@dataclass(slots=True)
class SegmentView:
    """One segment (allocation) of the run: the trainer's events, the chain's record, Slurm's view."""

    seg: str
    job_id: str = ""
    state: str = ""  # Slurm's (RUNNING, PENDING...) for the current one, else running/ended
    reason: str = ""  # the trainer's segment-end reason
    outcome: str = ""  # the chain's outcome (clean, finished, crash, hang, preflight, disk_full, lost) when it has one
    started_t: float | None = None
    ended_t: float | None = None
    elapsed_s: float | None = None
    time_left_s: float | None = None
    time_left: str = ""
    host: str = ""
    world_size: int | None = None
    layout: dict[str, int] | None = None
    start_step: int | None = None
    end_step: int | None = None
    restarts: int = 0
    nodes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class CkptView:
    tag: str
    step: int | None
    age_s: float | None
    bytes: float | None
    seconds: float | None
    verified: bool | None
    converted: bool
    uploaded: bool


@dataclass(slots=True)
class AlertView:
    t: float
    severity: str
    message: str
    src: str
    acked: bool
    incident: str = ""


@dataclass(slots=True)
class Finish:
    """When the run will end: compute left plus the allocations still needed and their waits."""

    eta_s: float | None = None
    finish_t: float | None = None
    compute_s: float | None = None
    queue_and_startup_s: float = 0.0
    allocations_to_go: int = 0
    startup_s: float | None = None  # measured: a segment's start to its first step (median)
    queue_wait_s: float | None = None  # measured: a job's eligibility (or the previous end) to its start
    note: str = ""


@dataclass(slots=True)
class RunSummary:
    """Everything ``kit status``, ``kit monitor --once`` and the TUI's chain panel say about a run."""

    run: str
    path: str
    status: str
    exit: int
    phase: str
    reasons: list[str]
    step: int | None
    max_steps: int | None
    to_go: int | None
    last_event_age_s: float | None
    step_age_s: float | None
    metrics: dict[str, float | None]
    finish: Finish
    segment: SegmentView | None
    segments: list[SegmentView]
    chain: dict[str, Any]
    next: dict[str, Any] | None
    slurm: dict[str, Any] | None
    last_ckpt: CkptView | None
    alerts: list[AlertView]
    alerts_unacked: int
    alerts_total: int
    rollbacks: dict[str, Any] | None
    doctor: dict[str, Any] | None
    excluded_nodes: list[str]
    health: dict[str, Any]
    reader: dict[str, Any]
    goodput: dict[str, Any] | None = None  # kit.run.goodput.Account.block(): ETTR, last day, biggest loss
    incomplete: list[str] = field(default_factory=list)  # what could not be read: the verdict lacks it (exit 3)
    layout: dict[str, Any] | None = None  # the newest segment's: tensor, pipeline, data, world, label (layout_view)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``--json``): the fields, with the metrics and the finish estimate also at the top
        level, and ``segments`` the count (the list is ``segment_list``)."""
        d = asdict(self)
        d.update(d.pop("metrics"))
        d["eta_s"], d["finish_t"] = self.finish.eta_s, self.finish.finish_t
        d["segment_list"] = d.pop("segments")
        d["segments"] = len(self.segments)
        return d


def summarize(m: RunModel, now: float, q: QueueInfo | None = None, chain: ChainState | None = None,
              time_limit_s: float | None = None, goodput: dict[str, Any] | None = None) -> RunSummary:
    """The summary of a run from its model, its chain record and Slurm's view (None: not asked), with
    the goodput account's compact block when the caller made one (kit.run.goodput: it needs every step
    event, which the model does not keep)."""
    chain = chain or ChainState()
    phase, level, reasons = _phase(m, now, q, chain)
    more = _degradations(m, now, phase)
    if more and level == HEALTHY:
        level = DEGRADED
    missing = incomplete(m.reader, q)
    segments = _segments(m, now, q, chain)
    ck = next((c for c in reversed(m.ckpts.values()) if c.t is not None and not c.deleted), None)
    nxt = q.pending() if q and q.available else None
    gpus = [g for n in m.health.values() for g in n.gpus]
    finish = estimate_finish(m, now, q, chain, segments, time_limit_s, done=phase in ("finished", "stopped"))
    alerts = [AlertView(a.t, a.severity, a.message, a.src, a.acked, a.incident)
              for a in m.alerts_newest() if not a.acked and a.open][:20]
    return RunSummary(
        run=m.name, path=m.path, status=level, exit=INCOMPLETE if missing else EXIT[level], phase=phase,
        reasons=reasons + more + [f"incomplete: {why}" for why in missing],
        step=m.step, max_steps=m.max_steps,
        to_go=(m.max_steps - m.step) if m.max_steps is not None and m.step is not None else None,
        last_event_age_s=(now - m.last_t) if m.last_t else None, step_age_s=(now - m.step_t) if m.step_t else None,
        metrics={k: _f(m.last.get(k)) for k in METRICS}, finish=finish,
        segment=segments[-1] if segments else None, segments=segments,
        chain={"state": chain.state or ("local" if m.segments else "never submitted"), "end_reason": chain.end_reason,
               "executor": chain.executor, "job_id": chain.job_id, "job_ids": chain.job_ids[-10:],
               "consecutive_crashes": chain.consecutive_crashes, "suspect_nodes": chain.suspect_nodes},
        next=None if nxt is None else {"job_id": nxt.job_id, "state": nxt.state, "reason": nxt.reason,
                                       "start": nxt.start},
        slurm=None if q is None else {"available": q.available, "error": q.error, "history": [
            {"job_id": r.job_id, "state": r.state, "start": r.start, "end": r.end, "elapsed_s": r.elapsed_s,
             "nodes": r.nodes, "exit_code": r.exit_code} for r in q.history[-10:]]},
        last_ckpt=None if ck is None else CkptView(ck.tag, ck.step, now - (ck.t or now), ck.bytes, ck.seconds,
                                                    ck.verified, bool(ck.converted), bool(ck.uploaded)),
        alerts=alerts, alerts_unacked=len(m.unacked("info")), alerts_total=len(m.alerts),
        rollbacks=None if not m.rollbacks else {"count": len(m.rollbacks), "t": m.rollbacks[-1][0],
                                                "from_step": m.rollbacks[-1][1], "to_step": m.rollbacks[-1][2]},
        doctor=None if not m.doctor else {"ok": m.doctor["ok"], "t": m.doctor["t"]},
        excluded_nodes=sorted(set(m.excluded) | set(chain.excluded_nodes)),
        health={"nodes": len(m.health), "gpus": len(gpus), "problems": sum(bool(g.problems()) for g in gpus),
                "nvml_absent": sorted(m.nvml_absent),
                # each node's latest host readings (kit.health): memory, load, disk, network
                "hosts": {n.node: {"t": n.t, **{k: n.host.get(k) for k in HOST_KEYS}}
                          for n in sorted(m.health.values(), key=lambda n: n.node)[:64]}},
        reader=_reader(m.reader, m), goodput=goodput, incomplete=missing,
        layout=layout_view(next((s.layout for s in reversed(segments) if s.layout), None)),
    )


def incomplete(r: ReadStats, q: QueueInfo | None) -> list[str]:
    """What this summary could not read, in words: ledger files (or parts) the reader had to leave out, a
    Slurm query that timed out. Nothing else gives up (there is no time limit on reading the ledger)."""
    out = []
    if r.unreadable:
        out.append(f"{r.unreadable} ledger file(s) or part(s) could not be read ({r.last_error}); "
                   "their events are left out: check the run directory's permissions and filesystem")
    if q is not None and q.gave_up:
        out.append(f"Slurm did not answer ({q.gave_up}); the chain's state is from the ledger alone")
    return out


def layout_view(layout: dict[str, int] | None) -> dict[str, Any] | None:
    """``{tensor, pipeline, data, world, label}`` (label ``TP2 x PP2 x DP2``) from a segment_started's
    layout; what ``kit status`` and the monitor's Overview and GPUs tabs show."""
    if not layout:
        return None
    t, p, d = (int(layout.get(k, 1)) for k in ("tensor", "pipeline", "data"))
    return {"tensor": t, "pipeline": p, "data": d, "world": t * p * d, "label": f"TP{t} x PP{p} x DP{d}"}


def _reader(r: ReadStats, m: RunModel) -> dict[str, Any]:
    return {"events": r.events, "bad_lines": r.bad_lines, "invalid_events": r.invalid_events, "coerced": r.coerced,
            "unknown_kinds": r.unknown_kinds, "future_version": r.future_version, "vanished_files": r.vanished_files,
            "truncated_files": r.truncated_files, "torn_tail": r.torn_tail, "junk_events": m.junk_events,
            "unreadable": r.unreadable,
            "last_error": r.last_error, "unknown": dict(sorted(m.unknown_kinds.items())[:10])}


def _segments(m: RunModel, now: float, q: QueueInfo | None, chain: ChainState) -> list[SegmentView]:
    """The ledger's segments, with the chain's outcome and Slurm's state where they know them."""
    records = {r.seg: r for r in chain.segments}
    out = []
    for s in m.segments.values():
        rec = records.get(s.seg)
        job = q.jobs.get(s.job_id) if q and s.job_id else None
        state = job.state if job and s.ended_t is None else ("ended" if s.ended_t else "running")
        out.append(SegmentView(
            seg=s.seg, job_id=s.job_id, state=state, reason=s.reason, outcome=rec.outcome if rec else "",
            started_t=s.started_t, ended_t=s.ended_t,
            elapsed_s=((s.ended_t or now) - s.started_t) if s.started_t else None,
            time_left_s=job.time_left_s if job else None, time_left=_clock(job.time_left_s) if job else "",
            host=s.host, world_size=s.world_size, layout=s.layout, start_step=s.start_step, end_step=s.end_step,
            restarts=s.restarts, nodes=list(rec.nodes) if rec else []))
    seen = {s.seg for s in out}
    for rec in chain.segments:  # allocations that never started a trainer (preflight, crash in set-up)
        if rec.seg not in seen:
            out.append(SegmentView(seg=rec.seg, job_id=rec.job_id, state="ended" if rec.end else "running",
                                   reason=rec.reason, outcome=rec.outcome, started_t=rec.start or None,
                                   ended_t=rec.end or None, restarts=rec.restarts, nodes=list(rec.nodes)))
    out.sort(key=lambda v: v.started_t or 0.0)
    return out[-MAX_SEGMENT_VIEWS:]


MAX_SEGMENT_VIEWS = 200


def estimate_finish(m: RunModel, now: float, q: QueueInfo | None, chain: ChainState, segments: list[SegmentView],
                    time_limit_s: float | None, done: bool = False) -> Finish:
    """Finish = now + compute left + (allocations still needed) x (queue wait + start-up).

    Compute left: steps to go x the median recent step time. Allocations (chains, when the allocation
    length is known): compute left, minus what the running one has left, over the useful part
    of one allocation (its length minus start-up and the signal lead). Start-up and queue wait are
    measured on this run (median start -> first step; median gap from an allocation's end, or a job's
    eligibility, to the next start), with defaults until they are; a pending job's expected start from
    Slurm replaces the mean wait for that one."""
    if done:
        return Finish(eta_s=0.0, finish_t=now, compute_s=0.0, note="done")
    st = m.step_time()
    if st is None or m.max_steps is None or m.step is None:
        return Finish(note="no step measured yet")
    compute = max(0, m.max_steps - m.step) * st
    starts = [s.first_step_t - s.started_t for s in m.segments.values()
              if s.first_step_t is not None and s.started_t is not None]
    allocs = [(a, b) for a, b in m.allocations.values()]
    startup_from_alloc = [seg.first_step_t - m.allocations[seg.seg][0] for seg in m.segments.values()
                          if seg.first_step_t is not None and seg.seg in m.allocations]
    startup = statistics.median(startup_from_alloc or starts) if (startup_from_alloc or starts) else None
    waits = _queue_waits(q, allocs)
    wait = statistics.median(waits) if waits else None
    out = Finish(compute_s=compute, startup_s=startup, queue_wait_s=wait)
    if not chain.executor or not time_limit_s:  # kit train / kit demo: one segment, no queue
        out.eta_s, out.finish_t = compute, now + compute
        out.note = "a local run: no allocations" if not chain.executor else "allocation length unknown"
        return out
    assert time_limit_s is not None
    lead = m.signal_lead_s or 0.0
    su = startup if startup is not None else STARTUP_S_DEFAULT
    useful = max(1.0, time_limit_s - su - lead)
    running = q.running() if q and q.available else None
    left_in_current = max(0.0, (running.time_left_s or 0.0) - lead) if running else 0.0
    more = max(0, math.ceil((compute - left_in_current) / useful)) if compute > left_in_current else 0
    per = (wait or 0.0) + su
    extra = more * per
    pending = q.pending() if q and q.available else None
    if pending is not None and pending.start:  # Slurm's own estimate of the next start
        extra += max(0.0, pending.start - now) - (wait or 0.0)
    out.queue_and_startup_s = max(0.0, extra)
    out.allocations_to_go = more
    out.eta_s = compute + out.queue_and_startup_s
    out.finish_t = now + out.eta_s
    return out


def _queue_waits(q: QueueInfo | None, allocs: list[tuple[float, float | None]]) -> list[float]:
    """Measured waits: Slurm's history (eligible -> start) when known, else the ledger's gaps between
    one allocation's end and the next one's start."""
    hist = [r.start - (r.eligible or r.submit or r.start) for r in (q.history if q else ())
            if r.start and (r.eligible or r.submit)]
    if hist:
        return [max(0.0, w) for w in hist]
    out = []
    for (_, end), (start, _) in itertools.pairwise(allocs):
        if end is not None:
            out.append(max(0.0, start - end))
    return out


def _clock(s: float | None) -> str:
    if s is None:
        return ""
    s = int(s)
    d, rem = divmod(s, 86400)
    return (f"{d}-" if d else "") + f"{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ collecting


def collect(run_dir: Any, now: float | None = None, use_slurm: bool = True) -> tuple[RunSummary, RunModel]:
    """Read a run directory (its ledger through the index, chain.json, its recipe) and Slurm, and
    summarize it. Never raises for what is in the run directory: an unreadable one is a summary that
    says "down" and why."""
    from kit.ledger.scan import bulk_read, scan
    from kit.run.goodput import Inputs, of_run
    from kit.rundir import RunDir

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    now = time.time() if now is None else now
    model = RunModel(rd.path.name, str(rd.path))
    limit = recipe_facts(rd, model)
    with bulk_read():  # the whole history in a few big arrays, once (kit.ledger.scan.bulk_read)
        history = scan(rd.path, model.reader)
        model.load_scan(history)
        inputs = Inputs.from_scan(history)
        del history  # its step records (120 MB a million steps) are not needed by the account
        chain = load_state(rd)
        q = query_for(model, chain) if use_slurm else None
        acc = of_run(rd, inputs=inputs, acct=q.history if q else ())
    return summarize(model, now, q, chain, limit, goodput=acc.block()), model


def recipe_facts(rd: Any, m: RunModel) -> float | None:
    """What the summary takes from the frozen recipe: max_steps and the configured signal lead (into the
    model) and the allocation length (returned). A missing or damaged run.toml is said in the reader's
    last error, not raised."""
    from kit.errors import KitError

    try:
        cfg = rd.load_config()
    except (KitError, ValueError, TypeError, KeyError) as e:
        m.reader.last_error = f"run.toml: {e}"[:200]
        return None
    m.max_steps = cfg.trainer.max_steps
    m.signal_lead_s = m.signal_lead_s or (float(cfg.chain.signal_lead_s) or None)
    return slurm.parse_duration(cfg.slurm.time_limit)


def query_for(m: RunModel, chain: ChainState, history: bool = True) -> QueueInfo | None:
    """One Slurm query for a run's jobs (None when the run never went through Slurm)."""
    import shutil

    if not shutil.which("squeue"):
        return slurm.NO_SLURM  # said in the summary: the chain comes from the ledger alone
    jobs = [*chain.job_ids, *m.chain_jobs, *(s.job_id for s in list(m.segments.values())[-5:])]
    if not any(jobs):
        return None
    return slurm.query(jobs, history=history)


def unreadable(name: str, path: str, why: str) -> dict[str, Any]:
    """The --json form of a run that could not be read at all (no run directory): down."""
    return {"run": name, "path": path, "status": DOWN, "exit": EXIT[DOWN], "phase": "unreadable", "reasons": [why]}


__all__ = ["DEGRADED", "DOWN", "EXIT", "HEALTHY", "INCOMPLETE", "JobInfo", "RunSummary", "collect", "dur", "incomplete",
           "summarize", "worst"]

"""``kit status RUN``: where the chain is, what it did, and when it will finish.

Everything comes from the run directory (chain.json, the ledger, checkpoints) plus Slurm's own view
(squeue for the live job: state, pending reason, expected start, time left; sacct for the history of
every job and requeued run). Missing data is a value ("N/A"), never an exception: status must work
from a login node while the job is starting, crashing or gone.
"""

from __future__ import annotations

import math
import statistics
import time
from datetime import datetime
from typing import Any

from kit.jobs import chain as ch
from kit.jobs import slurmctl
from kit.rundir import RunDir

STARTUP_S_DEFAULT = 60.0  # per-segment start-up (imports, rendezvous, resume) before anything is measured


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t).isoformat(timespec="seconds") if t else None


def gather(rd: RunDir, now: float | None = None) -> dict[str, Any]:
    """The status of a run as one JSON-able dict (what ``kit status --json`` prints)."""
    now = time.time() if now is None else now
    cfg = rd.load_config()
    state = ch.load_state(rd)
    events = ch.tail_events(rd, {"step", "segment_started", "allocation_started"})
    steps = [e for e in events if e["kind"] == "step"]
    step = int(steps[-1]["step"]) if steps else ch.latest_step(rd)
    max_steps = cfg.trainer.max_steps
    recent = [e["step_time"] for e in steps[-50:] if "step_time" in e]  # the reader: finite floats only
    step_time = statistics.median(recent) if recent else None

    live: dict[str, Any] = {}
    slurm = state.executor == "slurm" and slurmctl.available()
    if slurm and state.job_id:
        rows = slurmctl.squeue(state.job_id)
        if rows:
            q = rows[0]
            live = {"job_id": q.job_id, "state": q.state, "reason": q.reason if q.reason != "None" else "",
                    "start": _iso(q.start), "end": _iso(q.end), "time_left_s": q.time_left_s, "nodes": q.nodes}
            if q.state == "PENDING":
                live["expected_start"] = _iso(q.start)
    history = slurmctl.sacct(state.job_ids) if slurm else []
    waits = [r.start - (r.eligible or r.submit or r.start) for r in history if r.start and (r.eligible or r.submit)]
    queue_wait = statistics.mean(waits) if waits else 0.0

    segments = [{"seg": s.seg, "job_id": s.job_id, "restarts": s.restarts, "nodes": s.nodes, "start": _iso(s.start),
                 "end": _iso(s.end) if s.end else None, "outcome": s.outcome, "reason": s.reason,
                 "ckpt_before": s.ckpt_before, "ckpt_after": s.ckpt_after} for s in state.segments]
    current = next((s for s in reversed(segments) if s["outcome"] == "running"), None)
    out: dict[str, Any] = {
        "run": cfg.run.name, "run_dir": str(rd.path), "chain": state.state or "never submitted",
        "end_reason": state.end_reason, "executor": state.executor, "job_id": state.job_id,
        "step": step, "max_steps": max_steps, "steps_to_go": max(0, max_steps - step),
        "last_checkpoint": ch.latest_step(rd), "step_time_s": step_time, "current_segment": current,
        "queue": live, "segments": segments, "excluded_nodes": state.excluded_nodes,
        "suspect_nodes": state.suspect_nodes, "consecutive_crashes": state.consecutive_crashes,
        "sacct": [{"job_id": r.job_id, "state": r.state, "start": _iso(r.start), "end": _iso(r.end),
                   "elapsed_s": r.elapsed_s, "nodes": r.nodes, "exit_code": r.exit_code} for r in history],
        "mean_queue_wait_s": queue_wait,
    }
    began = {e.get("seg"): e["t"] for e in events if e["kind"] == "allocation_started"}
    startups = [e["t"] - began[e.get("seg")] for e in events
                if e["kind"] == "segment_started" and e.get("seg") in began]
    out["startup_s"] = statistics.median(startups) if startups else None
    out["finish_estimate"] = estimate_finish(cfg.slurm.time_limit, ch.signal_lead_s(cfg, rd), out, state, now)
    return out


def estimate_finish(time_limit: str, lead_s: int, st: dict[str, Any], state: ch.ChainState,
                    now: float) -> dict[str, Any]:
    """Finish date = now + compute left + (allocations still needed) x (queue wait + start-up).

    Allocations needed: compute left divided by the useful part of one allocation (time limit minus
    start-up and the signal lead). Start-up is measured (median gap between an allocation's start and
    its trainer's first event, from the ledger) when known, else a default of one minute.
    """
    if st["chain"] == ch.ENDED or not st["steps_to_go"]:
        return {"finish": None, "note": "chain ended" if st["chain"] == ch.ENDED else "done"}
    if not st["step_time_s"]:
        return {"finish": None, "note": "no step measured yet"}
    compute = st["steps_to_go"] * st["step_time_s"]
    startup = st.get("startup_s") or STARTUP_S_DEFAULT
    limit = ch.limit_seconds(time_limit)
    useful = max(1.0, limit - startup - lead_s)
    left_in_current = 0.0
    q = st["queue"]
    if q.get("state") == "RUNNING" and q.get("time_left_s"):
        left_in_current = max(0.0, q["time_left_s"] - lead_s)
    more = max(0, math.ceil((compute - left_in_current) / useful))
    waits = more * (st["mean_queue_wait_s"] + startup)
    if q.get("state") == "PENDING" and q.get("expected_start"):
        # Slurm's own estimate for the next start replaces the mean wait for that one allocation.
        start_t = datetime.fromisoformat(q["expected_start"]).timestamp()
        waits += max(0.0, start_t - now) - st["mean_queue_wait_s"]
    finish = now + compute + max(0.0, waits)
    return {"finish": _iso(finish), "compute_s": round(compute), "queue_and_startup_s": round(max(0.0, waits)),
            "allocations_to_go": more}


def _dur(s: float | None) -> str:
    if s is None:
        return "N/A"
    s = int(s)
    d, rem = divmod(s, 86400)
    return (f"{d}d " if d else "") + f"{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"


def render(st: dict[str, Any]) -> str:
    """Human text for ``kit status``."""
    q = st["queue"]
    lines = [f"run {st['run']}  ({st['run_dir']})",
             f"  chain      {st['chain']}" + (f" ({st['end_reason']})" if st["end_reason"] else "")
             + (f", {st['executor']} job {st['job_id']}" if st["job_id"] else "")]
    if q:
        what = f"{q['state'].lower()}"
        if q["state"] == "PENDING":
            what += f", reason {q['reason'] or 'N/A'}, expected start {q.get('expected_start') or 'N/A'}"
        else:
            what += f" on {q['nodes']}, time left {_dur(q['time_left_s'])}"
        lines.append(f"  job        {what}")
    cur = st["current_segment"]
    if cur:
        lines.append(f"  segment    {cur['seg']} started {cur['start']} on {','.join(cur['nodes'])}")
    pct = 100.0 * st["step"] / st["max_steps"] if st["max_steps"] else 0.0
    lines.append(f"  progress   step {st['step']}/{st['max_steps']} ({pct:.1f}%), {st['steps_to_go']} to go; "
                 f"last checkpoint step {st['last_checkpoint']}; step time "
                 + (f"{st['step_time_s']:.3f} s" if st["step_time_s"] else "N/A"))
    fe = st["finish_estimate"]
    if fe.get("finish"):
        lines.append(f"  finish     ~{fe['finish']} (compute {_dur(fe['compute_s'])}, queue+start-up "
                     f"{_dur(fe['queue_and_startup_s'])}, {fe['allocations_to_go']} more allocation(s))")
    else:
        lines.append(f"  finish     N/A ({fe.get('note', '')})")
    if st["excluded_nodes"] or st["suspect_nodes"]:
        lines.append(f"  nodes      excluded: {', '.join(st['excluded_nodes']) or '-'}; "
                     f"suspect: {', '.join(st['suspect_nodes']) or '-'}")
    if st["segments"]:
        lines.append(f"  segments   {len(st['segments'])}")
        for s in st["segments"][-10:]:
            lines.append(f"    {s['seg']:<12} {s['start'] or '':<19}  {s['outcome']:<9} {s['reason']:<22} "
                         f"ckpt {s['ckpt_before']}->{s['ckpt_after']}")
    if st["sacct"]:
        lines.append("  slurm      " + "; ".join(f"{r['job_id']} {r['state']} {_dur(r['elapsed_s'])}"
                                               for r in st["sacct"][-6:]))
    return "\n".join(lines)

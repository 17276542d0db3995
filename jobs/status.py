"""``kit status RUN``: where the run is, what it did, and when it will finish.

It shows the one run summary (kit.run.summary: built from the ledger, ``slurm/chain.json`` and one
Slurm query), the same one ``kit monitor --once`` prints and the TUI's chain panel draws, so they never
disagree. It works for Slurm chains and for local runs (``kit train``, ``kit demo``) alike, from a
login node, while the job is starting, crashing or gone: missing data is "N/A", never a traceback.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from kit.rundir import RunDir


def gather(rd: RunDir, now: float | None = None, use_slurm: bool = True) -> dict[str, Any]:
    """The status of a run as one JSON-able dict (what ``kit status --json`` prints)."""
    from kit.run.summary import collect

    summary, _ = collect(rd, now, use_slurm=use_slurm)
    return summary.to_dict()


def _iso(t: float | None) -> str:
    return datetime.fromtimestamp(t).isoformat(timespec="seconds") if t else "N/A"


def _dur(s: float | None) -> str:
    if s is None:
        return "N/A"
    s = int(s)
    d, rem = divmod(s, 86400)
    return (f"{d}d " if d else "") + f"{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}"


def _num(v: Any, spec: str = ".4g") -> str:
    return "N/A" if v is None else format(v, spec)


def render(s: dict[str, Any]) -> str:
    """Human text for ``kit status``."""
    lines = [f"run {s['run']}  ({s['path']})", f"  status     {s['status'].upper()} ({s['phase']})"]
    lines += [f"    ! {r}" for r in s.get("reasons", [])]
    if "chain" not in s:  # unreadable: the reasons say why
        return "\n".join(lines)
    ch = s["chain"]
    lines.append(f"  chain      {ch['state']}" + (f" ({ch['end_reason']})" if ch["end_reason"] else "")
                 + (f", {ch['executor']} job {ch['job_id']}" if ch["job_id"] else ""))
    seg = s.get("segment")
    if seg:
        left = f", time left {seg['time_left']}" if seg.get("time_left") else ""
        lines.append(f"  segment    {seg['seg']} {seg['state']} since {_iso(seg['started_t'])}"
                     f"{' on ' + ','.join(seg['nodes']) if seg['nodes'] else ''}{left}")
    lay = s.get("layout")
    if lay:
        lines.append(f"  layout     {lay['label']} ({lay['world']} ranks: tensor x pipeline x data)")
    nxt = s.get("next")
    if nxt:
        lines.append(f"  next       job {nxt['job_id']} {nxt['state'].lower()}, reason {nxt['reason'] or 'N/A'}, "
                     f"expected start {_iso(nxt['start'])}")
    pct = f" ({100.0 * s['step'] / s['max_steps']:.1f}%)" if s["step"] is not None and s["max_steps"] else ""
    ck = s.get("last_ckpt")
    lines.append(f"  progress   step {_num(s['step'], 'd')}/{_num(s['max_steps'], 'd')}{pct}, "
                 f"{_num(s['to_go'], ',d')} to go; last checkpoint {ck['tag'] if ck else 'N/A'}; "
                 f"step time {_num(s['step_time'], '.3g')} s; loss {_num(s['loss'])}; "
                 f"tokens/s {_num(s['tokens_per_s'], ',.0f')}")
    f = s["finish"]
    if f["finish_t"] is not None:
        more = (f", {f['allocations_to_go']} more allocation(s), queue+start-up {_dur(f['queue_and_startup_s'])}"
                if f["allocations_to_go"] else "")
        lines.append(f"  finish     ~{_iso(f['finish_t'])} (compute {_dur(f['compute_s'])}{more})"
                     + (f"; {f['note']}" if f["note"] else ""))
    else:
        lines.append(f"  finish     N/A ({f['note']})")
    if "goodput" in s:
        from kit.run.goodput import line

        lines.append(f"  goodput    {line(s['goodput'])} (kit goodput {s['path']})")
    if s["excluded_nodes"] or ch["suspect_nodes"]:
        lines.append(f"  nodes      excluded: {', '.join(s['excluded_nodes']) or '-'}; "
                     f"suspect: {', '.join(ch['suspect_nodes']) or '-'}")
    if s["alerts"]:
        lines.append(f"  alerts     {s['alerts_unacked']} unacknowledged of {s['alerts_total']}")
        for a in s["alerts"][:5]:
            lines.append(f"    {_iso(a['t'])} {a['severity']:<8} {a['message'][:110]}")
    segs = s.get("segment_list") or []
    if segs:
        lines.append(f"  segments   {len(segs)}")
        for v in segs[-10:]:
            steps = f"{_num(v['start_step'], 'd')}->{_num(v['end_step'], 'd')}"
            why = v["outcome"] or v["reason"] or v["state"]
            lines.append(f"    {v['seg']:<14} {_iso(v['started_t']):<19}  {why:<10} {v['reason']:<14} steps {steps}")
    hist = (s.get("slurm") or {}).get("history") or []
    if hist:
        runs = "; ".join(f"{r['job_id']} {r['state']} {_dur(r['elapsed_s'])}" for r in hist[-6:])
        lines.append(f"  slurm      {runs}")
    return "\n".join(lines)

"""``kit goodput RUN [--json] [--plot out.png]``: how much of what the run was given became training.

The effective-training-time account (kit.run.goodput, docs/goodput.md): every allocated second of
every segment in one category, for the run, the last day and each segment; the time between
allocations apart; what each failure cost until training went on; and the ETTR the run should expect
going on with the recipe's allocation length. Reads only the run directory (and sacct when Slurm is
there), so it runs on a login node while the job trains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kit.errors import KitError, RunDirError
from kit.run.goodput import CATEGORIES, LABELS

ORDER = ("productive", "preflight", "ckpt_load", "startup", "ckpt_stall", "eval", "redone", "hang", "other")
STARTUP = ("preflight", "ckpt_load", "startup")  # together: allocation start to the first completed step
SEGMENTS_SHOWN = 12


def add_arguments(p: argparse.ArgumentParser, verb: str = "goodput") -> None:
    p.add_argument("run", help="run directory (or a run name under --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where to look up a run given by name (default: runs)")
    p.add_argument("--json", action="store_true", help="print the whole account as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="write stacked bars of each day's allocated time by category (matplotlib PNG)")
    p.add_argument("--no-slurm", action="store_true", help="do not ask sacct (the ledger and chain.json only)")


def run(args: argparse.Namespace, verb: str = "goodput") -> int:
    from kit.run.goodput import of_run
    from kit.rundir import resolve_run

    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise KitError(f"--plot writes a PNG: give a file name ending in .png, not {args.plot}")
    rd = resolve_run(args.run, args.runs_dir)
    if not rd.ledger.is_dir():
        raise RunDirError(f"{rd.path} has no ledger/ folder: nothing to account for (has the run started?)")
    acc = of_run(rd, use_slurm=not args.no_slurm).to_dict()
    if args.plot is not None:
        plot(acc, args.plot, rd.path.name)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(acc, indent=1))
    else:
        print(render(acc, rd.path.name))
    return 0


# -------------------------------------------------------------------------------------------- text


def hours(s: float | None) -> str:
    if s is None:
        return "N/A"
    if abs(s) < 10:
        return f"{s:.3g}s"
    if abs(s) < 120:
        return f"{s:.1f}s"
    if abs(s) < 7200:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.2f}h"


def pct(x: float | None) -> str:
    return "N/A" if x is None else f"{100 * x:.1f}%"


def utc(t: float | None) -> str:
    return "N/A" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def render(a: dict[str, Any], name: str) -> str:
    """The account as text: the table, restarts, segments, projection."""
    alloc = a["allocated_s"]
    if not alloc:
        return f"run {name}: no allocated time in the ledger yet (no segment has started)"
    lines = [f"run {name}: ETTR {pct(a['ettr'])} of {hours(alloc)} allocated in {len(a['segments'])} segment(s), "
             f"as of {utc(a['as_of'])} UTC; queue wait {hours(a['queue_s'])} apart (not allocated)"]
    day = a["days"][-1] if a["days"] else None
    head = f"  {'':<28}{'run':>10}{'share':>8}"
    if day:
        head += f"{'day ' + day['day']:>18}{'share':>8}"
    lines.append(head)
    for c in ORDER:
        lines.append(_row(c, a["parts"][c], alloc, day))
    startup = sum(a["parts"][c] for c in STARTUP)
    lines.append(f"    start-up to the first completed step, all three: {hours(startup)} ({pct(startup / alloc)})")
    rb = a["redone_by"]
    if rb["failure"] or rb["rollback"]:
        lines.append(f"    redone after failures {hours(rb['failure'])}, after rollbacks {hours(rb['rollback'])}")
    lines.append(f"  {'allocated':<28}{hours(alloc):>10}{'100.0%':>8}"
                 + (f"{hours(day['allocated_s']):>18}{'100.0%':>8}" if day else ""))
    lines.append(f"  {LABELS['queue']:<28}{hours(a['queue_s']):>10}"
                 + (f"{'':>8}{hours(day['queue_s']):>18}" if day else ""))
    loss = a["biggest_loss"]
    if loss:
        lines.append(f"  biggest loss: {LABELS[loss['category']]}, {hours(loss['seconds'])} ({pct(loss['share'])})")
    lines += _restarts(a["restarts"])
    lines += _segments(a["segments"])
    lines += _projection(a["projection"])
    return "\n".join(lines)


def _row(c: str, s: float, alloc: float, day: dict[str, Any] | None) -> str:
    out = f"  {LABELS[c]:<28}{hours(s):>10}{pct(s / alloc):>8}"
    if day:
        d, da = day["parts"][c], day["allocated_s"]
        out += f"{hours(d):>18}{pct(d / da) if da else 'N/A':>8}"
    return out


def _restarts(rs: list[dict[str, Any]]) -> list[str]:
    if not rs:
        return ["restarts: none (no crash, hang, lost allocation or failed preflight)"]
    costs = sorted(r["cost_s"] for r in rs if r["cost_s"] is not None)
    med = costs[len(costs) // 2] if costs else None
    out = [f"restarts: {len(rs)}, failure -> first completed step of the next segment: median {hours(med)}"]
    out.append(f"  {'segment':<16}{'outcome':<10}{'failed at (UTC)':<21}{'cost':>9}{'detect':>9}{'queue':>9}"
               f"{'failed starts':>15}{'start-up':>10}")
    for r in rs[-SEGMENTS_SHOWN:]:
        out.append(f"  {r['seg']:<16}{r['outcome']:<10}{utc(r['failure_t']):<21}{hours(r['cost_s']):>9}"
                   f"{hours(r.get('detect_s')):>9}{hours(r.get('queue_s')):>9}{hours(r.get('failed_starts_s')):>15}"
                   f"{hours(r.get('startup_s')):>10}" + ("" if r["cost_s"] is not None else "  (not trained since)"))
    return out


def _segments(segs: list[dict[str, Any]]) -> list[str]:
    out = [f"segments (last {min(len(segs), SEGMENTS_SHOWN)} of {len(segs)}):",
           f"  {'segment':<16}{'outcome':<10}{'started (UTC)':<21}{'allocated':>10}{'ETTR':>8}{'start-up':>10}"
           f"  biggest loss"]
    for s in segs[-SEGMENTS_SHOWN:]:
        losses = {c: v for c, v in s["parts"].items() if c != "productive" and v > 0}
        big = max(losses, key=lambda c: losses[c]) if losses else None
        out.append(f"  {s['seg']:<16}{s['outcome']:<10}{utc(s['start']):<21}{hours(s['allocated_s']):>10}"
                   f"{pct(s['ettr']):>8}{hours(s['startup_s']):>10}  "
                   + (f"{LABELS[big]} {hours(losses[big])}" if big else "-"))
    return out


def _projection(p: dict[str, Any] | None) -> list[str]:
    if not p:
        return []
    if p["ettr"] is None:
        return [f"projection: N/A ({'; '.join(p['notes'])})"]
    m = p["inputs"]
    out = [f"projection for {hours(p['time_limit_s'])} allocations: ETTR {pct(p['ettr'])} "
           f"(lost to start-up and teardown {pct(p['startup_share'])}, failures {pct(p['failure_share'])}, "
           f"saves {pct(p['save_share'])}, evaluation {pct(p['eval_share'])}, rollbacks {pct(p['rollback_share'])})",
           f"  measured: start-up {hours(m['startup_s'])} (median of {m['startups']}), step {hours(m['step_time_s'])}, "
           f"save stall {hours(m['stall_per_save_s'])} every {m['interval_steps'] or 'N/A'} steps, "
           f"{m['failures']} failure(s) ({(m['failures_per_day'] or 0):.2f}/day of allocation), "
           f"{hours(m['lost_per_failure_s'])} lost per failure"]
    if p.get("young_daly_interval_steps"):
        out.append(f"  Young/Daly: a save every ~{p['young_daly_interval_steps']} steps minimises save stalls plus "
                   "work lost to failures at this failure rate (checkpoint.interval_steps)")
    out += [f"  note: {n}" for n in p["notes"]]
    return out


# -------------------------------------------------------------------------------------------- plot

COLORS = {"productive": "#2e7d32", "startup": "#1565c0", "preflight": "#64b5f6", "ckpt_load": "#90caf9",
          "ckpt_stall": "#f9a825", "eval": "#8e24aa", "redone": "#c62828", "hang": "#6d4c41", "other": "#9e9e9e"}


def plot(a: dict[str, Any], out: Path, name: str) -> None:
    """Stacked bars: each UTC day's allocated hours by category, queue wait hatched on top, ETTR above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = a["days"]
    if not days:
        raise KitError("nothing to plot: no allocated or queued time in the ledger yet")
    x = list(range(len(days)))
    tallest = max(d["allocated_s"] + d["queue_s"] for d in days)
    unit, per = ("hours", 3600.0) if tallest >= 7200 else ("minutes", 60.0) if tallest >= 120 else ("seconds", 1.0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(days) + 3), 4.5), dpi=110)
    bottom = [0.0] * len(days)
    for c in CATEGORIES:
        h = [d["parts"][c] / per for d in days]
        if any(h):
            ax.bar(x, h, bottom=bottom, color=COLORS[c], label=LABELS[c], width=0.8)
            bottom = [b + v for b, v in zip(bottom, h, strict=True)]
    q = [d["queue_s"] / per for d in days]
    if any(q):
        ax.bar(x, q, bottom=bottom, color="none", edgecolor="#757575", hatch="//", label=LABELS["queue"], width=0.8)
    for i, d in enumerate(days):
        if d["ettr"] is not None:
            ax.annotate(f"{100 * d['ettr']:.0f}%", (i, bottom[i] + q[i]), ha="center", va="bottom", fontsize=7)
    step = max(1, len(days) // 20)
    ax.set_xticks(x[::step], [d["day"][5:] for d in days][::step], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(f"{name}: ETTR {pct(a['ettr'])} of {hours(a['allocated_s'])} allocated (per UTC day)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except OSError as e:
        raise KitError(f"cannot write {out}: {e.strerror}; choose another --plot path") from None
    finally:
        plt.close(fig)

"""``kit monitor RUN [RUN ...]``: the terminal UI, or ``--once [--json]`` for scripts and cron.

``--once`` exit status (docs/monitor.md): 0 healthy, 1 degraded, 2 down; with several runs, the worst;
3 when part of a run could not be read (an unreadable ledger file, Slurm timing out): the summary says what.
A run that cannot be found or read is down. Textual is imported only for the UI, so ``--once`` stays
quick on a busy login node.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kit.errors import KitError, RunDirError
from kit.run.summary import EXIT, INCOMPLETE, dur, worst
from kit.rundir import RunDir, resolve_run


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    from kit.tools.cli import seconds

    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or names under --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: runs)")
    p.add_argument("--once", action="store_true", help="print one summary and exit: 0 healthy, 1 degraded, 2 down")
    p.add_argument("--json", action="store_true", help="with --once: one JSON object per run, in a list")
    p.add_argument("--replay", action="store_true", help="play a run back from its first event (postmortems)")
    p.add_argument("--speed", type=seconds(0.0, strict=True), default=60.0,
                   help="with --replay: how many times real time (default 60)")
    p.add_argument("--read-only", action="store_true", help="no actions that change the run (stop, save-now, ack)")
    p.add_argument("--no-slurm", action="store_true", help="do not ask squeue/sacct (the ledger only)")


def run(args: argparse.Namespace, verb: str) -> int:
    if args.speed <= 0:
        raise KitError(f"--speed must be positive, not {args.speed}")
    if args.once:
        return once(args.runs, args.runs_dir, as_json=args.json, use_slurm=not args.no_slurm)
    runs = [resolve_run(r, args.runs_dir) for r in args.runs]
    from kit.monitor.app import make_app

    app = make_app(runs, read_only=args.read_only, use_slurm=not args.no_slurm,
                   replay_speed=args.speed if args.replay else None)
    app.run()
    return app.return_code or 0


def summary_of(run_dir: RunDir, use_slurm: bool = True) -> dict[str, Any]:
    """The run summary (kit.run.summary: the same one `kit status` and the TUI show), as JSON."""
    from kit.run.summary import collect

    summary, _ = collect(run_dir, use_slurm=use_slurm)
    return summary.to_dict()


def once(names: list[str], runs_dir: str, as_json: bool = False, use_slurm: bool = True) -> int:
    """One summary per run; a run that cannot be found or read is "down" (never a traceback)."""
    from kit.run.summary import unreadable

    out: list[dict[str, Any]] = []
    for name in names:
        try:
            out.append(summary_of(resolve_run(name, runs_dir), use_slurm))
        except RunDirError as e:
            out.append(unreadable(name, str(Path(name)), str(e)))
        except OSError as e:  # a run directory we may not read (permissions, a dead mount)
            out.append(unreadable(name, str(Path(name)), f"cannot read {name}: {e.strerror}"))
    if as_json:
        json.dump(out, sys.stdout, indent=1, default=str)
        print()
    else:
        for s in out:
            print(render_text(s))
    if any(s.get("incomplete") for s in out):
        return INCOMPLETE  # part of some run could not be read: said in its summary, never a silent partial answer
    return EXIT[worst([s["status"] for s in out])]


def render_text(s: dict[str, Any]) -> str:
    """The --once summary as a few lines of plain text."""
    lines = [f"{s['run']}: {s['status'].upper()} ({s['phase']})" + (" INCOMPLETE" if s.get("incomplete") else "")]
    lines += [f"  ! {r}" for r in s.get("reasons", [])]
    if "step" not in s:
        return "\n".join(lines)

    def f(v: Any, spec: str = ".4g") -> str:
        return "N/A" if v is None else format(v, spec)

    seg = s.get("segment") or {}
    lines.append(f"  step {f(s['step'], 'd')}/{f(s['max_steps'], 'd')}  loss {f(s['loss'])}  "
                 f"tokens/s {f(s['tokens_per_s'], ',.0f')}  TFLOP/s/GPU {f(s['tflops'], '.3g')}  "
                 f"MFU {f(s['mfu'], '.1%')}")
    lines.append(f"  segment {seg.get('seg', 'N/A')} job {seg.get('job_id') or 'N/A'} {seg.get('state', '')}  "
                 f"last step {dur(s['step_age_s'])} ago  finish in {dur(s['eta_s'])}")
    ck = s.get("last_ckpt")
    if ck:
        lines.append(f"  last checkpoint {ck['tag']} {dur(ck['age_s'])} ago")
    if s.get("goodput"):
        from kit.run.goodput import line

        lines.append(f"  goodput {line(s['goodput'])}")
    r = s["reader"]
    skipped = {k: r[k] for k in ("bad_lines", "invalid_events", "coerced", "unknown_kinds", "future_version",
                                 "vanished_files", "unreadable", "torn_tail", "junk_events")
               if r[k]}
    if skipped:
        lines.append("  skipped: " + ", ".join(f"{k}={v}" for k, v in skipped.items()))
    return "\n".join(lines)

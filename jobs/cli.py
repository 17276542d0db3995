"""Operator verbs of the chain: ``kit submit``, ``kit status``, ``kit stop``, ``kit cancel``.

Login-node cheap: nothing here imports torch or DeepSpeed (``kit submit`` prepares the data, which
needs only tokenizers and numpy).
"""

from __future__ import annotations

import argparse
import json
import time

from kit.config import load_recipe
from kit.errors import RunDirError
from kit.jobs import chain as ch
from kit.jobs import slurmctl
from kit.ledger import LedgerWriter
from kit.rundir import STOP, resolve_run
from kit.tools.cli import add_amend_arg, add_recipe_args


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    if verb == "submit":
        add_recipe_args(p)
        add_amend_arg(p)
        return
    p.add_argument("run", help="run directory, or run name under --runs-dir")
    p.add_argument("--runs-dir", default="runs", help="where to look up a run given by name (default: ./runs)")
    if verb == "status":
        p.add_argument("--json", action="store_true", help="machine-readable output (the same summary as "
                       "`kit monitor --once --json`)")
        p.add_argument("--exit-status", action="store_true",
                       help="exit 0 healthy, 1 degraded, 2 down (as `kit monitor --once`), for scripts")
    if verb in ("stop", "cancel"):
        p.add_argument("--reason", default="", help="why (recorded in the ledger)")


def run(args: argparse.Namespace, verb: str) -> int:
    if verb == "submit":
        from kit.jobs.submit import submit

        submit(load_recipe(args.recipe, args.overrides), amend=args.amend)
        return 0
    if verb == "status":
        from kit.jobs.status import gather, render
        from kit.run.summary import EXIT, unreadable

        try:
            st = gather(resolve_run(args.run, args.runs_dir))
        except (RunDirError, OSError) as e:  # no run there, or one we may not read: "down", said plainly
            st = unreadable(args.run, args.run, str(e) if isinstance(e, RunDirError) else f"cannot read: {e}")
        print(json.dumps(st, indent=1, default=str) if args.json else render(st))
        return int(st.get("exit", EXIT["down"])) if args.exit_status else 0
    rd = resolve_run(args.run, args.runs_dir)
    if verb == "stop":
        return stop(rd, args.reason)
    return cancel(rd, args.reason)


def stop(rd: ch.RunDir, reason: str = "") -> int:
    """Graceful: the trainer saves at its next step and the chain ends; a queued job is withdrawn."""
    state = ch.load_state(rd, repair=True)
    rd.request(STOP, reason or "kit stop")
    live = state.job_id if state.executor == "slurm" and slurmctl.is_active(state.job_id) else ""
    if live and slurmctl.job_state(live) == "PENDING":
        _end(rd, state, "stop", f"job {live} was pending: cancelled, nothing to save")
        slurmctl.cancel(live)
        rd.consume(STOP)
        print(f"chain of {rd.path.name} stopped: pending job {live} cancelled")
        return 0
    print(f"stop requested: the running segment saves at its next step and the chain ends "
          f"({rd.control / STOP}); follow it with `kit status {rd.path}`")
    return 0


def cancel(rd: ch.RunDir, reason: str = "") -> int:
    """Now: the chain is marked ended first (so the driver does not requeue), then scancel."""
    state = ch.load_state(rd, repair=True)
    if not state.job_id:
        print(f"run {rd.path.name} has no chain to cancel")
        return 0
    _end(rd, state, "cancelled", reason or "kit cancel")
    if state.executor == "slurm":
        slurmctl.cancel(state.job_id)
        print(f"cancelled job {state.job_id} of {rd.path.name}; resume later with `kit submit`")
    else:
        print(f"local chain of {rd.path.name} marked cancelled; it ends after its current segment")
    return 0


def _end(rd: ch.RunDir, state: ch.ChainState, why: str, note: str) -> None:
    state.state, state.end_reason = ch.ENDED, why
    if state.segments and state.segments[-1].outcome == "running":
        state.segments[-1].outcome, state.segments[-1].end = why, time.time()
    ch.save_state(rd, state)
    with LedgerWriter(rd.path, "cli") as led:
        led.emit("chain_ended", reason=why, job_id=state.job_id, note=note)

"""``kit amend RUN --set KEY=VALUE``: change a frozen run's settings, recorded in its ledger (kit.amend).

For keys that do not change the arithmetic: ``trainer.max_steps`` (extend a run), ``slurm.*`` (other
resources for the next allocations), ``chain.*``, ``checkpoint.*``, ``health.*``, ``spikes.*``... The
running segment keeps its settings; the next one reads the amended run.toml.
"""

from __future__ import annotations

import argparse

from kit.amend import amend_overrides
from kit.rundir import resolve_run


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("run", help="run directory, or run name under --runs-dir")
    p.add_argument("--runs-dir", default="runs", help="where to look up a run given by name (default: ./runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the new value of a key, e.g. --set trainer.max_steps=20000 (repeatable)")
    p.add_argument("--reason", default="", help="why (recorded in the ledger)")


def run(args: argparse.Namespace, verb: str) -> int:
    rd = resolve_run(args.run, args.runs_dir)
    amend_overrides(rd, args.overrides, who="kit amend", reason=args.reason)
    return 0

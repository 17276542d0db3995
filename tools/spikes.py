"""``kit spikes RUN [--step N] [--report DIR] [--json]``: list and explain a run's loss spikes.

Reads only the run directory (ledger, run.toml, prepared data, tokenizer), so it runs on a login
node while the job trains. Without options it prints one line per spike; ``--step`` narrows to the
spike at (or nearest) a step; ``--report`` writes report.md + PNGs + spikes.json; ``--json``
prints the analysis as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from kit.errors import RunDirError


def add_arguments(parser: argparse.ArgumentParser, verb: str = "spikes") -> None:
    from kit.tools.cli import NONNEGATIVE, POSITIVE, out_dir

    parser.add_argument("run", help="run directory (or a run name under --runs-dir)")
    parser.add_argument("--runs-dir", default="runs", help="where to look up a run given by name (default: runs)")
    parser.add_argument("--step", type=NONNEGATIVE, default=None, help="explain the spike at (or nearest) this step")
    parser.add_argument("--report", type=out_dir, default=None, metavar="DIR",
                        help="write report.md, PNG plots and spikes.json into DIR")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON on stdout")
    parser.add_argument("--span", type=POSITIVE, default=20,
                        help="steps of context on each side of a spike (default 20)")
    parser.add_argument("--no-data", action="store_true",
                        help="skip the batch analysis (documents, sources, anomalies)")


def run(args: argparse.Namespace, verb: str = "spikes") -> int:
    from kit.rundir import resolve_run
    from kit.tools.postmortem import analyse
    from kit.tools.spike_report import SUMMARY_HEAD, summary_rows, write_report

    rd = resolve_run(args.run, args.runs_dir)
    if not rd.ledger.is_dir():
        raise RunDirError(f"{rd.path} has no ledger/ folder: nothing to analyse (has the run started?)")
    res = analyse(rd.path, step=args.step, span=args.span, data=not args.no_data)
    if args.report is not None:
        files = write_report(res, args.report)
        print(f"wrote {len(files)} files to {args.report} (report.md, spikes.json, plots)", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
        return 0
    if not res["spikes"]:
        print(f"no loss spikes in {res['steps_logged']} logged steps of {rd.path}")
        return 0
    rows = summary_rows(res)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(SUMMARY_HEAD)]
    print("  ".join(h.ljust(w) for h, w in zip(SUMMARY_HEAD, widths, strict=True)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for sp in res["spikes"]:
        b = sp.get("batches") or {}
        odd = [d for d in b.get("documents", []) if d["flags"]]
        if odd:
            names = ", ".join(f"{d['source']}#{d['doc']} ({'/'.join(d['flags'])})" for d in odd[:5])
            print(f"step {sp['start']}: {len(odd)} unusual document(s): {names}")
    return 0

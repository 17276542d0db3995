"""Entry point of a chain segment's trainer process: ``python -m kit.jobs.segment_entry RUN_DIR --seg SEG``.

It is kit.segment plus the preflight: when ``doctor.enabled``, every rank first runs
``kit.tools.doctor.preflight`` (collective: it initialises the process group, which DeepSpeed then
reuses). A failed preflight exits with :data:`kit.exitcodes.PREFLIGHT` before any training; the
doctor's ledger event names the nodes, and the chain excludes them and resubmits (not a training
failure). Without kit.tools.doctor installed, this is exactly kit.segment.
"""

from __future__ import annotations

import sys

from kit import exitcodes


def preflight(run_dir: str, seg: str) -> int:
    """0, or PREFLIGHT when this segment must not train on these nodes."""
    from kit.rundir import RunDir

    cfg = RunDir(run_dir).load_config()
    if not cfg.doctor.enabled:
        return 0
    try:
        from kit.tools import doctor
    except ModuleNotFoundError:  # HOOK: issue 4's kit.tools.doctor; without it there is no preflight
        return 0
    from kit import dist

    report = doctor.preflight(cfg, run_dir, dist.from_environ(), seg=seg)
    if not report.ok:
        print(f"[kit chain] preflight failed on {report.node}: exclude {', '.join(report.failed_nodes) or '?'}",
              file=sys.stderr, flush=True)
        return exitcodes.PREFLIGHT
    return 0


def main(argv: list[str] | None = None) -> int:
    from kit import segment

    args = list(sys.argv[1:] if argv is None else argv)
    seg = args[args.index("--seg") + 1] if "--seg" in args else ""
    code = preflight(args[0], seg)
    if code:
        segment._destroy()
        return code
    return segment.main(args)


if __name__ == "__main__":
    from kit.segment import exit_now, start_process

    start_process()
    exit_now(main())

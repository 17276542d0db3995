"""Stress mode of the test suite: the concurrency-sensitive tests, several times each, on saturated CPUs.

    bash dev.sh test --stress [RUNS]         (default 3 runs; or: python tests/stress.py --runs 3)

A test that synchronises on how fast something happens instead of on events passes on a quiet machine
and fails on CI's busy one. This runs every test marked ``concurrency`` (stream vs trainer, monitor vs
writer, chain vs Slurm, watchdog, signals: see CONCURRENCY in tests/conftest.py) RUNS times while a
load generator keeps every core busy (one spinning process per core, at normal priority), and prints
runs, failures and each failing test. Run it before landing a change that touches them, and record
its result in the issue notes. The result is also written to .stress/last.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPIN = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\nwhile True:\n    pass\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="times to run the concurrency tests (default 3)")
    p.add_argument("--load", type=int, default=os.cpu_count() or 2, help="spinning processes (default: one per core)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k stream)")
    args, unknown = p.parse_known_args(argv)  # pytest's own options (-k, -x, ...) go to pytest
    args.pytest_args = [*unknown, *args.pytest_args]
    if args.runs < 1 or args.load < 0:
        p.error("--runs must be at least 1 and --load at least 0")
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.load)]
    results: list[dict[str, object]] = []
    t0 = time.time()
    try:
        for i in range(args.runs):
            start = time.time()
            out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "concurrency",
                                  "-q", "-rfE", *args.pytest_args], cwd=ROOT, capture_output=True, text=True)
            failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, re.M)))
            summary = (out.stdout.strip().splitlines() or [""])[-1]
            results.append({"run": i + 1, "exit": out.returncode, "failed": failed, "summary": summary,
                            "seconds": round(time.time() - start, 1)})
            print(f"[stress] run {i + 1}/{args.runs}: {summary}", flush=True)
            for f in failed:
                print(f"[stress]   failed: {f}", flush=True)
            if failed or out.returncode not in (0, 1):  # what failed, or a broken suite (collection, usage)
                print(out.stdout[-3000:] + out.stderr[-3000:], flush=True)
    finally:
        for sp in spinners:
            sp.terminate()
        for sp in spinners:
            sp.wait(timeout=30)
    failures = sum(bool(r["failed"]) or r["exit"] != 0 for r in results)
    report = {"runs": args.runs, "load_processes": args.load, "cpus": os.cpu_count(), "failed_runs": failures,
              "failed_tests": sorted({f for r in results for f in r["failed"]}),  # type: ignore[attr-defined]
              "seconds": round(time.time() - t0, 1), "results": results}
    out_dir = ROOT / ".stress"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "last.json").write_text(json.dumps(report, indent=1))
    print(f"[stress] {args.runs} run(s) under {args.load} spinning process(es): {failures} with failures"
          + (f" ({', '.join(report['failed_tests'])})" if report["failed_tests"] else ""))  # type: ignore[arg-type]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

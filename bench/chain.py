"""bench/chain: how much of a chain's allocated time trains, and how many steps a boundary loses.

On the local Slurm (as root: ``bash .ci/slurm/start.sh``), two chains of the tiny recipe run one
after the other, measured the same way:

- A, time-limit boundaries: 1-minute allocations; each segment ends on Slurm's USR2 or the job's
  end time (KIT_DEADLINE), saves, and is requeued. Expected loss per boundary: 0 steps.
- B, a crash: rank 1 is SIGKILLed after step 7 of the first segment (checkpoints every 4 steps,
  5-minute allocations so no time limit interferes); the chain resubmits and resumes. Expected
  loss: at most one checkpoint interval (here 3 steps).

Per chain it prints: allocated time (sacct's Elapsed of every run of every job), training time (from
each segment's first step to its last, from the ledger), their ratio, the overhead per boundary
(allocated minus training, per segment), the fraction a 20-hour allocation would train with that
overhead, and the steps lost at each boundary (last step reached in a segment minus the step the
next one resumed from). Steps are slowed to ~0.5 s (KIT_FAULTS sleep): a 1-minute allocation
holds a few dozen of them.

    python bench/chain.py            # ~4-5 minutes; writes bench/results/chain.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cfg(runs: Path, name: str, **extra: Any) -> Any:
    from kit.config import load_recipe
    from tests.conftest import tiny_overrides

    base: dict[str, Any] = {"slurm.time_limit": "00:01:00", "trainer.stop_margin_s": 5.0, "chain.signal_lead_s": 15,
                            "chain.backoff_s": 1.0, "doctor.enabled": False, "checkpoint.interval_steps": 4}
    base.update(extra)
    return load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(runs, name, **base))


def _run_chain(cfg: Any, env: dict[str, str], timeout: float) -> dict[str, Any]:
    from kit.jobs import chain as ch
    from kit.jobs import slurmctl
    from kit.jobs.submit import submit
    from kit.ledger import read_all
    from kit.rundir import RunDir

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        t0 = time.time()
        sub = submit(cfg, log=lambda m: None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rd = RunDir(sub.run_dir)
    while time.time() - t0 < timeout:
        st = ch.load_state(rd)
        if st.state == ch.ENDED and not slurmctl.is_active(st.job_id):
            break
        time.sleep(2)
    wall = time.time() - t0
    time.sleep(3)  # sacct lags by 1-2 s
    st = ch.load_state(rd)
    acct = slurmctl.sacct(st.job_ids)
    allocated = sum(r.elapsed_s or 0 for r in acct)
    events = read_all(rd.path)
    steps = [e for e in events if e["kind"] == "step"]
    # Time inside the training loop, per segment: first step's start to last step's end (this counts
    # the slowed steps; the ledger's step_time measures the arithmetic only).
    training = 0.0
    for seg in {e.get("seg") for e in steps}:
        mine = [e for e in steps if e.get("seg") == seg]
        training += mine[-1]["t"] - mine[0]["t"] + float(mine[0]["step_time"])
    lost = []
    segs = st.segments
    for a, b in itertools.pairwise(segs):
        reached = max((int(e["step"]) for e in steps if e.get("seg") == a.seg), default=0)
        resumed = next((int(e["step"]) for e in events if e["kind"] == "segment_started" and e.get("seg") == b.seg),
                       0)
        lost.append({"after": a.seg, "outcome": a.outcome, "reason": a.reason, "reached": reached,
                     "resumed": resumed, "lost": reached - resumed})
    overhead = (allocated - training) / max(1, len(segs))
    return {"end_reason": st.end_reason, "segments": len(segs), "jobs": len(st.job_ids), "wall_s": round(wall, 1),
            "allocated_s": round(allocated, 1), "training_s": round(training, 1),
            "training_fraction": round(training / allocated, 4) if allocated else None,
            "overhead_per_segment_s": round(overhead, 1),
            "projected_fraction_20h": round(1 - overhead / 72000, 5),
            "boundaries": lost, "steps_lost": [b["lost"] for b in lost]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="steps of chain A (default 150: >= 3 segments)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "chain.json"))
    args = p.parse_args()
    from kit.jobs import slurmctl

    if not slurmctl.available():
        print("bench/chain needs the local Slurm: sudo bash .ci/slurm/start.sh", file=sys.stderr)
        return 1
    load_before = list(os.getloadavg())
    runs = Path(tempfile.mkdtemp(prefix="kit-bench-chain-"))
    slow = {"KIT_FAULTS": "step.after=sleep0.5"}
    a = _run_chain(_cfg(runs, "bench-a", **{"trainer.max_steps": args.steps}), slow, timeout=900)
    b = _run_chain(_cfg(runs, "bench-b", **{"trainer.max_steps": 12, "slurm.time_limit": "00:05:00"}),
                   {"KIT_FAULTS": "step.after=sleep0.5,step.after@7:rank1", "KIT_FAULTS_SEGMENTS": "1"}, timeout=600)
    rows = [("A time-limit boundaries", a), ("B crash at step 7", b)]
    print(f"{'chain':<26}{'segs':>5}{'alloc s':>9}{'train s':>9}{'train/alloc':>12}{'ovh/seg s':>10}"
          f"{'20h frac':>10}  steps lost per boundary")
    for name, r in rows:
        print(f"{name:<26}{r['segments']:>5}{r['allocated_s']:>9}{r['training_s']:>9}"
              f"{r['training_fraction'] or 0:>12.3f}{r['overhead_per_segment_s']:>10}"
              f"{r['projected_fraction_20h']:>10.4f}  {r['steps_lost']} ({r['end_reason']})")
    ratio = (a["training_fraction"] or 0) / max(1e-9, b["training_fraction"] or 0)
    print(f"ratio of training fractions A/B: {ratio:.2f}")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "host_cpus": os.cpu_count(), "load_before": load_before,
           "load_after": list(os.getloadavg()), "A_time_limit": a,
           "B_crash": b, "note": "tiny model on CPU: start-up dominates a 1-minute allocation; the 20 h projection "
                                 "keeps the measured per-segment overhead"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Restart costs and the ETTR a run should expect going on, from what its account measured.

Why apart from kit.run.goodput: the account is bookkeeping (every second, exactly); this is a model
built on it, with assumptions an operator should be able to read in one place (docs/goodput.md):

- a restart costs, from the failure (the failed segment's last completed step; its allocation start
  if it never completed one) to the first completed step of the next segment that trains: the rest
  of the failed allocation (hang detection, teardown), the queue, failed starts in between, and the
  next start-up. The work lost since the last checkpoint is not in it (it is "redone" in the account).
- the projection for an allocation of ``T`` seconds (the recipe's ``slurm.time_limit``):

  ETTR = (1 - (S + X) / T - lambda * (W + S + X) - R) * f_save * (1 - e)

  S the median start-up (allocation start to first step), X the median teardown after a clean end,
  lambda the measured failures per allocated second, W the mean time lost per failure (redone work,
  hang detection, what ran after it), R the share lost to rollbacks (redone work and reloads),
  f_save = tau / (tau + delta) for a save every ``tau`` = interval_steps x step time that stalls
  ``delta``, e the share of training time spent evaluating. Every input is reported beside the result.
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kit.run.goodput import Account, SegmentAccount

FAILED = ("crash", "hang", "lost", "preflight")
DAY_S = 86_400.0


def restarts(segments: list[SegmentAccount]) -> list[dict[str, Any]]:
    """One record per failed segment: what failed, when, and what it cost to train again."""
    out: list[dict[str, Any]] = []
    for i, s in enumerate(segments):
        if s.outcome not in FAILED or s.failure_t is None:
            continue
        nxt = next((j for j in range(i + 1, len(segments)) if segments[j].first_step_t is not None), None)
        rec: dict[str, Any] = {"seg": s.seg, "outcome": s.outcome, "reason": s.reason, "failure_t": s.failure_t,
                               "next_seg": None, "first_step_t": None, "cost_s": None}
        if nxt is not None:
            n = segments[nxt]
            assert n.first_step_t is not None
            between = segments[i + 1:nxt]
            failed_starts = sum(b.allocated_us for b in between) / 1e6
            rec.update(next_seg=n.seg, first_step_t=n.first_step_t, cost_s=n.first_step_t - s.failure_t,
                       detect_s=s.end - s.failure_t, failed_starts_s=failed_starts,
                       queue_s=max(0.0, n.start - s.end - failed_starts), startup_s=n.first_step_t - n.start)
        out.append(rec)
    return out


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if math.isfinite(x)]
    return statistics.median(xs) if xs else None


def measured(acc: Account) -> dict[str, Any]:
    """The projection's inputs, measured on the run's account."""
    segs = acc.segments
    startups = [s.startup_us / 1e6 for s in segs if s.startup_us is not None]
    teardowns = [s.end - s.trainer_end_t for s in segs if s.trainer_end_t is not None and s.outcome == "clean"]
    failed = [s for s in segs if s.outcome in FAILED]
    alloc_s = acc.allocated_us / 1e6
    lost = acc.redone_by["failure"] + sum(s.parts_us["hang"] + s.parts_us["other"] for s in failed)
    p = acc.parts_us
    trained = p["productive"] + p["redone"]
    return {
        **acc.stats,
        "startup_s": _median(startups), "startups": len(startups),
        "teardown_s": _median(teardowns) or 0.0,
        "failures": len(failed),
        "failures_per_day": len(failed) / alloc_s * DAY_S if alloc_s > 0 else None,
        "lost_per_failure_s": lost / 1e6 / len(failed) if failed else None,
        "rollback_share": ((acc.redone_by["rollback"] / 1e6 + acc.stats.get("rollback_load_s", 0.0)) / alloc_s
                           if alloc_s > 0 else 0.0),
        "eval_share": p["eval"] / (trained + p["eval"]) if trained + p["eval"] > 0 else 0.0,
    }


def project(acc: Account, time_limit_s: float | None, interval_steps: int | None) -> dict[str, Any] | None:
    """The ETTR the run should expect with allocations of ``time_limit_s`` (None: nothing measured yet)."""
    m = measured(acc)
    out: dict[str, Any] = {"time_limit_s": time_limit_s, "inputs": m, "ettr": None, "notes": []}
    notes: list[str] = out["notes"]
    if not time_limit_s or time_limit_s <= 0:
        notes.append("allocation length unknown (slurm.time_limit)")
        return out
    st, su = m["step_time_s"], m["startup_s"]
    if st is None or su is None:
        notes.append("no completed step measured yet")
        return out
    teardown = m["teardown_s"]
    tau = (interval_steps or 0) * st
    delta = m["stall_per_save_s"] or 0.0
    f_save = tau / (tau + delta) if tau > 0 else 1.0
    lam = (m["failures_per_day"] or 0.0) / DAY_S
    w = m["lost_per_failure_s"]
    if w is None:
        w = tau / 2  # no failure yet: half a checkpoint interval of training is lost per failure
    if not m["failures"]:
        notes.append("no failure measured yet: none assumed (BLOOM-176B saw about one a week, Llama 3 "
                     "about eight a day at 16k GPUs)")
    overhead = (su + teardown) / time_limit_s + lam * (w + su + teardown) + m["rollback_share"]
    ettr = max(0.0, 1.0 - overhead) * f_save * (1.0 - m["eval_share"])
    out.update(ettr=ettr, startup_share=(su + teardown) / time_limit_s, failure_share=lam * (w + su + teardown),
               save_share=1.0 - f_save, eval_share=m["eval_share"], rollback_share=m["rollback_share"])
    if lam > 0 and delta > 0 and st > 0:
        # Young/Daly: the save interval that minimises stall plus expected lost work, sqrt(2 * delta * MTBF)
        best = math.sqrt(2 * delta / lam)
        out["young_daly_interval_steps"] = max(1, round(best / st))
    if time_limit_s <= su + teardown:
        notes.append(f"the allocation ({time_limit_s:.0f} s) is shorter than start-up and teardown "
                     f"({su + teardown:.0f} s): nothing trains")
    return out

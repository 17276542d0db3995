"""The chain's memory and its decisions: what happened to each segment, and what to do next.

A run is trained by a chain of Slurm allocations (segments). The chain's state lives in the run
directory (``slurm/chain.json``), not in submitit's pickles, because it must survive crashes,
resubmissions under a new job id, and operators reading it from a login node. Exactly one process
writes it at a time: ``kit submit``/``stop``/``cancel`` while no segment runs, and the rank-0 driver
of the running segment otherwise (DESIGN.md: one chain per run, never two writers).

:func:`decide` is a pure function of (recipe, state, how the segment ended): the whole policy —
requeue at a clean boundary, resubmit with backoff after a crash, exclude implicated nodes, stop on a
crash loop, max segments or the chain's deadline — is tested without a cluster.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kit import exitcodes
from kit.config import RunConfig
from kit.ledger import tail
from kit.ledger.schema import end_outcome
from kit.run.chainstate import (  # noqa: F401 (the chain's record, re-exported for the chain's code)
    CHAIN_JSON,
    CLEAN,
    CRASH,
    DISK_FULL,
    ENDED,
    FINISHED,
    HANG,
    LOST,
    PREFLIGHT,
    QUEUED,
    RANKS_DIR,
    RUNNING,
    SUBMITIT_DIR,
    ChainState,
    SegmentRecord,
    chain_path,
    latest_step,
    load_state,
    save_state,
)
from kit.rundir import RunDir

MAX_BACKOFF_S = 3600.0

# ------------------------------------------------------------------------------------------ timing


def limit_seconds(time_limit: str) -> float:
    """slurm.time_limit (sbatch --time forms: ``[D-]HH:MM:SS``, ``D-HH[:MM]``, ``MM:SS``, minutes) in seconds."""
    from kit.validation import check_time_limit

    return check_time_limit("slurm.time_limit", time_limit)


def tail_events(rd: RunDir, kinds: set[str], max_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """Events of the given kinds from the last ``max_bytes`` of every ledger file, by time (the one
    reader's tail: a months-long ledger holds millions of step events, the chain needs recent ones)."""
    return tail(rd.path, kinds, max_bytes)


def measured_times(rd: RunDir | None) -> tuple[float, float]:
    """Worst recent step time and checkpoint save time seen in this run's ledger (0 when unknown)."""
    if rd is None or not rd.ledger.is_dir():
        return 0.0, 0.0
    step_t = save_t = 0.0
    for e in tail_events(rd, {"step", "ckpt_saved"}):
        if e["kind"] == "step" and "step_time" in e:  # the reader hands out finite floats only
            step_t = max(step_t, e["step_time"])
        elif e["kind"] == "ckpt_saved":
            save_t = max(save_t, e["seconds"])  # whole save (an async one is waited for at the end)
    return step_t, save_t


def estimated_times(cfg: RunConfig, rd: RunDir | None = None) -> tuple[float, float]:
    """(step seconds, save seconds): measured when the run has history, else sized from the recipe
    (45% MFU of the accelerator's peak, checkpoints written at 1 GB/s per node)."""
    step_t, save_t = measured_times(rd)
    if step_t and save_t:
        return step_t, save_t
    from kit.model import sizing

    s = sizing(cfg)
    gpus = cfg.slurm.gpus_per_node > 0
    peak = (cfg.trainer.peak_tflops or 312.0) if gpus else 0.05  # a CPU core: ~50 GFLOP/s
    est_step = float(s["flops_per_step"]) / (int(s["world_size"]) * peak * 0.45e12)
    est_save = float(s["checkpoint_bytes"]) / (1e9 * cfg.slurm.nodes) + 1.0
    return step_t or est_step, save_t or est_save


def signal_lead_s(cfg: RunConfig, rd: RunDir | None = None) -> int:
    """How long before the time limit Slurm signals the job (``--signal=USR2@N``).

    It must leave time to finish the current step and save: 2 x the worst step + 2 x the worst save
    + the trainer's stop margin, plus 30 s because slurmctld checks limits only every 30 s.
    ``chain.signal_lead_s`` overrides it. The trainer also stops by itself before the job's end time
    (KIT_DEADLINE), so the signal is the safety net, and the one preemption uses.
    """
    if cfg.chain.signal_lead_s:
        return cfg.chain.signal_lead_s
    step_t, save_t = estimated_times(cfg, rd)
    return max(60, math.ceil(2 * step_t + 2 * save_t + cfg.trainer.stop_margin_s + 30))


def min_time_limit_s(cfg: RunConfig, rd: RunDir | None = None) -> float:
    """The shortest allocation that can do one step and one save before the trainer's deadline."""
    step_t, save_t = estimated_times(cfg, rd)
    return cfg.trainer.stop_margin_s + 2 * step_t + 1.5 * save_t + step_t + save_t


# ---------------------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class RankReport:
    """How one rank's trainer process ended (written by each rank's driver)."""

    rank: int
    host: str
    rc: int
    t_end: float
    stopped: bool = False  # the driver terminated it after the segment ended (it outlived its peers)


@dataclass(frozen=True, slots=True)
class Decision:
    action: str  # "end", "requeue" (same job id) or "resubmit" (a new job, after delay_s, with exclusions)
    reason: str
    delay_s: float = 0.0
    exclude: tuple[str, ...] = ()
    alert: str = ""
    severity: str = ""


def classify(reason: str, rc0: int) -> str:
    """Segment outcome from the trainer's segment_ended reason and rank 0's exit status."""
    outcome = end_outcome(reason)  # the one vocabulary: kit.ledger.schema.END_REASONS
    if outcome == FINISHED:
        return FINISHED
    if outcome == CLEAN:
        return CLEAN
    if rc0 == exitcodes.PREFLIGHT or reason == "preflight":
        return PREFLIGHT
    if rc0 == exitcodes.HANG or reason == "hang":
        return HANG
    if rc0 == exitcodes.DISK_FULL or reason == "disk_full":
        return DISK_FULL
    return CRASH


def implicated_nodes(reports: list[RankReport], world_size: int, nodes: list[str],
                     hang_suspects: list[str] | None = None) -> list[str]:
    """Nodes to blame for a crash: ranks killed by a signal (or whose report never came: their node
    died); failing that, the rank that failed first (the others failed because it did).

    For a hang, the watchdog's suspects win: it compared every rank's stacks and named the odd ones
    out, whereas "the first to fail" would blame whichever rank reported the hang (usually rank 0)."""
    if hang_suspects:
        return sorted({str(n) for n in hang_suspects})
    per_node = max(1, world_size // max(1, len(nodes)))
    seen = {r.rank for r in reports}
    # Killed by a signal, except the ones Slurm sends to end or preempt a job.
    # A rank its driver stopped (still running after the segment ended) was killed by kit, not by its node:
    # it waited on a dead peer; blaming it would exclude a healthy node (and keep the bad one).
    blamed = [r.host for r in reports
              if r.rc < 0 and not r.stopped and -r.rc not in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)]
    blamed += [nodes[min(rank // per_node, len(nodes) - 1)] for rank in range(world_size) if rank not in seen and nodes]
    if not blamed:
        failed = sorted((r for r in reports if r.rc not in (0, exitcodes.REQUEUE) and not r.stopped),
                        key=lambda r: r.t_end)
        blamed = [failed[0].host] if failed else []
    return sorted(set(blamed))


def decide(cfg: RunConfig, state: ChainState, rec: SegmentRecord, usable_nodes: int | None = None,
           now: float | None = None) -> Decision:
    """What the chain does after a segment. Updates the state's counters (crashes, progress,
    exclusions); the caller records the segment and acts on the decision."""
    now = time.time() if now is None else now
    progress = rec.ckpt_after > rec.ckpt_before
    state.no_progress = 0 if progress else state.no_progress + 1
    if rec.outcome == FINISHED:
        state.consecutive_crashes = 0
        if rec.reason == "give_up":
            return Decision("end", "give_up", alert="the trainer gave up (see its alerts); the chain ended",
                            severity="critical")
        return Decision("end", rec.reason)

    if rec.outcome in (CRASH, HANG, LOST):
        state.consecutive_crashes += 1
    elif rec.outcome == CLEAN:
        state.consecutive_crashes = 0
    exclude = _new_exclusions(cfg, state, rec, usable_nodes) if rec.outcome != CLEAN else []
    if rec.outcome == DISK_FULL and not exclude:
        # The shared checkpoint filesystem is full (or nothing shows it was a node's own disk): a new
        # allocation would fill it again at its first save. Only an operator can make room.
        return Decision("end", "disk_full", severity="critical",
                        alert=f"disk full: the chain ended at checkpoint step {rec.ckpt_after} (the newest complete "
                              "one; see the alert above for where). Free space on the checkpoint filesystem, "
                              "then `kit submit` again")

    if state.no_progress >= cfg.chain.crash_loop_limit:
        return Decision("end", "crash_loop", severity="critical",
                        alert=f"crash loop: {state.no_progress} segments in a row ended without a new checkpoint "
                              f"(last: {rec.outcome} {rec.reason}); the chain stopped. Look at the last segment's "
                              "log under slurm/submitit, fix, then `kit submit` again")
    if len(state.segments) >= cfg.chain.max_segments:
        return Decision("end", "max_segments", severity="warning",
                        alert=f"chain.max_segments ({cfg.chain.max_segments}) reached; the chain ended")
    if cfg.chain.deadline and now >= datetime.fromisoformat(cfg.chain.deadline).timestamp():
        return Decision("end", "chain_deadline", severity="warning",
                        alert=f"chain.deadline ({cfg.chain.deadline}) passed; the chain ended")
    if rec.outcome == CLEAN and not exclude:
        return Decision("requeue", rec.reason)
    delay = 0.0
    if rec.outcome in (CRASH, HANG, LOST):
        delay = min(MAX_BACKOFF_S, cfg.chain.backoff_s * 2 ** (state.consecutive_crashes - 1))
    elif rec.outcome == PREFLIGHT and not exclude:
        # Failed on every node alike (a full shared filesystem): an immediate retry would fail the
        # same way. Give the operator time, as after crashes, until the crash-loop limit ends it.
        delay = min(MAX_BACKOFF_S, cfg.chain.backoff_s * 2 ** (state.no_progress - 1))
    return Decision("resubmit", rec.outcome if rec.outcome != CRASH else f"crash: {rec.reason}", delay_s=delay,
                    exclude=tuple(exclude))


def _new_exclusions(cfg: RunConfig, state: ChainState, rec: SegmentRecord, usable_nodes: int | None) -> list[str]:
    """Exclude implicated nodes, unless that would leave too few nodes to run the job at all: then
    they are only remembered as suspects (and the ledger says so)."""
    new: list[str] = []
    for node in rec.implicated:
        if node in state.excluded_nodes:
            continue
        room = usable_nodes is None or usable_nodes - len(state.excluded_nodes) - len(new) - 1 >= cfg.slurm.nodes
        if room:
            new.append(node)
        elif node not in state.suspect_nodes:
            state.suspect_nodes.append(node)
    state.excluded_nodes.extend(new)
    return new

"""The effective-training-time account (ETTR): where every allocated second of a run went.

"How much of what we were given became training?" Every second of every allocation of the chain is
given exactly one category (docs/goodput.md says how, rule by rule); the time between allocations is
queue wait, reported apart because it was not allocated. ETTR is productive time over allocated time,
per segment, per UTC day and for the run, and the parts add up to the allocated time exactly: the
account works in integer microseconds (the ledger's own resolution), so a sum is a sum.

Pure: it takes what the ledger says (:class:`Inputs`, from kit.ledger.scan or kept live by
:class:`Tracker`), the chain's record (kit.run.chainstate) and, when known, Slurm's accounting
(kit.run.queue.AcctRecord), and never raises for what they hold. numpy does the per-step work, so a
million-step run is accounted in a fraction of a second. Restart costs and the projection for the
recipe's allocation length are in kit.run.projection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kit.ledger import BULK_KINDS, Event
from kit.ledger.scan import Scan
from kit.run.chainstate import ChainState
from kit.run.queue import AcctRecord

# Categories of allocated time (their order is their code); QUEUE is not allocated time.
CATEGORIES = ("productive", "startup", "preflight", "ckpt_load", "ckpt_stall", "eval", "redone", "hang", "other")
PRODUCTIVE, STARTUP, PREFLIGHT, CKPT_LOAD, CKPT_STALL, EVAL, REDONE, HANG, OTHER = range(len(CATEGORIES))
QUEUE = len(CATEGORIES)
NCAT = QUEUE + 1
LABELS = {"productive": "productive training", "startup": "start-up (the rest)", "preflight": "preflight (kit doctor)",
          "ckpt_load": "checkpoint load", "ckpt_stall": "checkpoint stall", "eval": "evaluation",
          "redone": "training redone (lost)", "hang": "hang detection", "other": "other / unaccounted",
          "queue": "queue wait (not allocated)"}
LOSSES = tuple(c for c in CATEGORIES if c != "productive")
# Paints over the base timeline; the first that covers a second wins.
PAINT_ORDER = (CKPT_STALL, EVAL, CKPT_LOAD, PREFLIGHT)

US = 1_000_000
DAY_US = 86_400 * US
T_MAX_S = 1e11  # times are clipped to [0, 1e11] s (year 5138): junk in a ledger cannot overflow int64 us
MAX_DAYS = 1000  # per-day rows kept (the newest)
SLACK_S = 120.0  # a Slurm job run matches a segment whose allocation starts within this of it

CHAIN_KINDS = frozenset({"chain_submitted", "chain_requeued", "chain_ended", "allocation_started",
                         "allocation_ended", "node_excluded", "segment_signalled"})
KINDS = frozenset({*CHAIN_KINDS, "segment_started", "segment_ended", "ckpt_saved", "ckpt_loaded", "doctor", "hang",
                   "rollback", "eval", "data_ready"})
FAILED = ("crash", "hang", "lost", "preflight")


def us(t: Any) -> int:
    """Seconds (a Unix time or a duration) as integer microseconds, clipped to [0, T_MAX_S]."""
    x = float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 0.0
    x = x if x == x else 0.0
    return round(min(max(x, 0.0), T_MAX_S) * US)


def num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if f - f == 0 else None


# --------------------------------------------------------------------------------------- the input


@dataclass
class Inputs:
    """What the account reads: every step event's time, step and step time (columns), and the events
    that are not bulk (those of :data:`KINDS` are read for what they say; any event tagged with a segment
    shows its allocation was alive then), all in time order."""

    t: np.ndarray
    step: np.ndarray
    step_time: np.ndarray
    events: list[Event] = field(default_factory=list)

    @classmethod
    def from_scan(cls, scan: Scan) -> Inputs:
        s = scan.steps  # columns copied out: a view would keep every column of the scan alive (the monitor)
        return cls(np.ascontiguousarray(s["t"], dtype=np.float64), np.ascontiguousarray(s["step"], dtype=np.float64),
                   np.ascontiguousarray(s["step_time"], dtype=np.float64), list(scan.events))

    @classmethod
    def from_events(cls, events: Iterable[Event]) -> Inputs:
        tr = Tracker()
        tr.add(events)
        return tr.inputs()


class Tracker:
    """Inputs kept up to date from a live follower's events (the monitor): step columns appended in
    chunks, the events that are not bulk kept whole (a few thousand on a million-step run). Memory: 24
    bytes per step event."""

    def __init__(self, base: Inputs | None = None) -> None:
        self._cols: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._t: list[float] = []
        self._s: list[float] = []
        self._st: list[float] = []
        self.events: list[Event] = []
        self._cache: Inputs | None = None
        self.added = 0  # events taken so far: a consumer redoes its account only when this moved
        if base is not None:
            self._cols.append((base.t, base.step, base.step_time))
            self.events = list(base.events)

    def add(self, events: Iterable[Event]) -> None:
        for e in events:
            kind = e.get("kind")
            if kind == "step":
                t, s = num(e.get("t")), num(e.get("step"))
                if t is None or s is None:
                    continue
                st = num(e.get("step_time"))
                self._t.append(t)
                self._s.append(s)
                self._st.append(np.nan if st is None else st)
                self._cache = None
                self.added += 1
            elif kind not in BULK_KINDS:
                self.events.append(e)
                self._cache = None
                self.added += 1

    def inputs(self) -> Inputs:
        if self._cache is None:
            if self._t:
                self._cols.append((np.array(self._t), np.array(self._s), np.array(self._st)))
                self._t, self._s, self._st = [], [], []
            if len(self._cols) > 1:
                self._cols = [tuple(np.concatenate(c) for c in zip(*self._cols, strict=True))]  # type: ignore[list-item]
            t, s, st = self._cols[0] if self._cols else (np.zeros(0), np.zeros(0), np.zeros(0))
            if len(t) > 1 and bool(np.any(np.diff(t) < 0)):
                order = np.argsort(t, kind="stable")
                t, s, st = t[order], s[order], st[order]
                self._cols = [(t, s, st)]
            self.events.sort(key=lambda e: num(e.get("t")) or 0.0)
            self._cache = Inputs(t, s, st, list(self.events))
        return self._cache


# ------------------------------------------------------------------------------------- the account


@dataclass(slots=True)
class SegmentAccount:
    """One allocation, second by second."""

    seg: str
    job_id: str
    start: float
    end: float
    outcome: str
    reason: str
    bounds: str
    allocated_us: int
    parts_us: dict[str, int]
    start_step: int | None = None
    end_step: int | None = None
    first_step_t: float | None = None  # start-up ends here (the first completed step)
    last_step_t: float | None = None
    trainer_end_t: float | None = None
    failure_t: float | None = None  # a failed segment's last progress (its last completed step)

    @property
    def ettr(self) -> float | None:
        return self.parts_us["productive"] / self.allocated_us if self.allocated_us else None

    @property
    def startup_us(self) -> int | None:
        """Allocation start to the first completed step (preflight and checkpoint load included)."""
        return None if self.first_step_t is None else us(self.first_step_t) - us(self.start)

    def to_dict(self) -> dict[str, Any]:
        return {"seg": self.seg, "job_id": self.job_id, "start": self.start, "end": self.end,
                "outcome": self.outcome, "reason": self.reason, "bounds": self.bounds,
                "allocated_s": self.allocated_us / US, "ettr": self.ettr, "parts": _secs(self.parts_us),
                "start_step": self.start_step, "end_step": self.end_step, "first_step_t": self.first_step_t,
                "startup_s": None if self.startup_us is None else self.startup_us / US,
                "last_step_t": self.last_step_t, "trainer_end_t": self.trainer_end_t, "failure_t": self.failure_t}


@dataclass(slots=True)
class DayAccount:
    day: str  # UTC date
    allocated_us: int
    queue_us: int
    parts_us: dict[str, int]

    @property
    def ettr(self) -> float | None:
        return self.parts_us["productive"] / self.allocated_us if self.allocated_us else None

    def to_dict(self) -> dict[str, Any]:
        return {"day": self.day, "allocated_s": self.allocated_us / US, "queue_s": self.queue_us / US,
                "ettr": self.ettr, "parts": _secs(self.parts_us)}


def _secs(parts: dict[str, int]) -> dict[str, float]:
    return {k: v / US for k, v in parts.items()}


@dataclass
class Account:
    """The run's account. Allocated time is the sum of its segments'; ``parts_us`` add up to it exactly."""

    allocated_us: int
    queue_us: int
    parts_us: dict[str, int]
    segments: list[SegmentAccount]
    days: list[DayAccount]
    redone_by: dict[str, int]  # redone time by what forced the replay: failure (restart) or rollback
    as_of: float | None  # the last second accounted (the ledger's last word on the newest segment)
    steps: int  # step events read
    stats: dict[str, Any] = field(default_factory=dict)  # measured inputs of the projection (kit.run.projection)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    projection: dict[str, Any] | None = None

    @property
    def ettr(self) -> float | None:
        return self.parts_us["productive"] / self.allocated_us if self.allocated_us else None

    def biggest_loss(self, parts: dict[str, int] | None = None) -> tuple[str, int] | None:
        """The largest non-productive category (None when nothing was lost)."""
        parts = self.parts_us if parts is None else parts
        cat = max(LOSSES, key=lambda c: parts[c])
        return (cat, parts[cat]) if parts[cat] > 0 else None

    def to_dict(self, newest: int | None = None) -> dict[str, Any]:
        """``kit goodput --json``: seconds everywhere (exact microseconds as floats). ``newest``: keep only
        that many of the newest segments, days and restarts (the monitor's snapshot)."""
        loss = self.biggest_loss()
        cut = slice(-newest, None) if newest else slice(None)
        return {"allocated_s": self.allocated_us / US, "queue_s": self.queue_us / US, "ettr": self.ettr,
                "parts": _secs(self.parts_us), "redone_by": _secs(self.redone_by), "as_of": self.as_of,
                "biggest_loss": None if loss is None else {"category": loss[0], "seconds": loss[1] / US,
                                                           "share": loss[1] / self.allocated_us},
                "steps": self.steps, "segment_count": len(self.segments),
                "segments": [s.to_dict() for s in self.segments[cut]], "days": [d.to_dict() for d in self.days[cut]],
                "restarts": self.restarts[cut], "projection": self.projection, "stats": self.stats}

    def block(self) -> dict[str, Any] | None:
        """The compact form in the run summary (``kit status``, ``kit monitor --once``, the overview line)."""
        if not self.allocated_us:
            return None
        loss = self.biggest_loss()
        day = self.days[-1] if self.days else None
        costs = [r["cost_s"] for r in self.restarts if r.get("cost_s") is not None]
        proj = self.projection or {}
        return {"ettr": self.ettr, "allocated_s": self.allocated_us / US,
                "productive_s": self.parts_us["productive"] / US, "queue_s": self.queue_us / US,
                "day": day.day if day else None, "ettr_day": day.ettr if day else None,
                "biggest_loss": None if loss is None else {"category": loss[0], "seconds": loss[1] / US,
                                                           "share": loss[1] / self.allocated_us},
                "restarts": len(self.restarts), "restart_cost_s": float(np.median(costs)) if costs else None,
                "projected_ettr": proj.get("ettr"), "time_limit_s": proj.get("time_limit_s")}


def line(block: dict[str, Any] | None) -> str:
    """The summary's block as one line (``kit status``, ``kit monitor --once``, the monitor's overview)."""
    if not block:
        return "N/A (no allocated time yet)"

    def p(x: Any) -> str:
        return "N/A" if x is None else f"{100 * x:.1f}%"

    def h(x: Any) -> str:
        return "N/A" if x is None else (f"{x / 3600:.1f}h" if x >= 7200 else f"{x / 60:.0f}m" if x >= 120
                                        else f"{x:.0f}s")

    out = f"ETTR {p(block['ettr'])} of {h(block['allocated_s'])}"
    if block.get("day"):
        out += f" (day {block['day']}: {p(block['ettr_day'])})"
    loss = block.get("biggest_loss")
    if loss:
        out += f"; biggest loss {LABELS[loss['category']]} {p(loss['share'])}"
    if block.get("restarts"):
        out += f"; {block['restarts']} restart(s), median {h(block['restart_cost_s'])} each"
    if block.get("projected_ettr") is not None:
        out += f"; expect {p(block['projected_ettr'])} at {h(block['time_limit_s'])} allocations"
    return out


def account(inp: Inputs, chain: ChainState | None = None, history: Sequence[AcctRecord] = (),
            interval_steps: int | None = None, time_limit_s: float | None = None) -> Account:
    """The account of a run (see the module docstring and docs/goodput.md)."""
    from kit.run.allocations import windows
    from kit.run.projection import project, restarts
    from kit.run.timeline import Timeline

    chain = chain or ChainState()
    t_s = np.asarray(inp.t, dtype=np.float64)
    step = np.asarray(inp.step, dtype=np.float64)
    ok = np.isfinite(t_s) & np.isfinite(step)
    t_s, step, st = t_s[ok], step[ok], np.asarray(inp.step_time, dtype=np.float64)[ok]
    if len(t_s) > 1 and bool(np.any(t_s[1:] < t_s[:-1])):  # a scan's columns are sorted already
        order = np.argsort(t_s, kind="stable")
        t_s, step, st = t_s[order], step[order], st[order]
    t_us = np.rint(np.clip(t_s, 0.0, T_MAX_S) * US).astype(np.int64)
    wins, submitted = windows(inp, t_us, chain, history)
    tl = Timeline(t_us, step, st, wins, inp.events)
    tl.build(submitted)
    acc = tl.aggregate()
    acc.stats = tl.stats(interval_steps)
    acc.restarts = restarts(acc.segments)
    acc.projection = project(acc, time_limit_s, interval_steps)
    return acc




# ------------------------------------------------------------------------------------- a run directory


def recipe_plan(rd: Any) -> tuple[float | None, int | None]:
    """(slurm.time_limit in seconds, checkpoint.interval_steps) from the frozen recipe; (None, None)
    when it cannot be read (the account is still made, without a projection)."""
    from kit.errors import KitError
    from kit.run.queue import parse_duration

    try:
        cfg = rd.load_config()
    except (KitError, ValueError, TypeError, KeyError, OSError):
        return None, None
    return parse_duration(cfg.slurm.time_limit), cfg.checkpoint.interval_steps


def slurm_history(inp: Inputs, chain: ChainState) -> tuple[AcctRecord, ...]:
    """Slurm's accounting of the chain's jobs (every requeued run): one sacct call; () off Slurm."""
    import shutil

    from kit.run.queue import query

    if chain.executor == "local" or not shutil.which("sacct"):
        return ()
    jobs = [*chain.job_ids, *(str(e.get("job_id")) for e in inp.events if e.get("kind") == "allocation_started")]
    if not any(jobs):
        return ()
    return query(jobs, history=True).history


def of_run(run_dir: Any, use_slurm: bool = True, history: Scan | None = None,
           acct: Sequence[AcctRecord] | None = None, inputs: Inputs | None = None) -> Account:
    """The account of a run directory: its ledger (through the index), chain.json, its recipe and, with
    ``use_slurm``, sacct. ``history`` (a scan) or ``inputs`` (taken from one) and ``acct`` reuse what was
    already read."""
    from kit.ledger.scan import scan
    from kit.run.chainstate import load_state
    from kit.rundir import RunDir

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    inp = inputs if inputs is not None else Inputs.from_scan(history if history is not None else scan(rd.path))
    chain = load_state(rd)
    if acct is None:
        acct = slurm_history(inp, chain) if use_slurm else ()
    limit, interval = recipe_plan(rd)
    return account(inp, chain, acct, interval_steps=interval, time_limit_s=limit)

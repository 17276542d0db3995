"""The allocations of a run, as the goodput account sees them (kit.run.goodput).

Each segment of the chain held an allocation from ``a`` to ``b``. Where those come from, best first:
Slurm's accounting (sacct: the job run's start and end, which include the job's launch before the
driver's first event and its exit after the last one), the chain driver's ``allocation_started`` and
``allocation_ended`` events, ``slurm/chain.json``'s record, and for a local run (``kit train``,
``kit demo``: no allocation record) the segment's own first and last events. An allocation nobody saw
end (lost with its node, or still running) ends at its last step or event. Allocations are made
disjoint (an overlap goes to the earlier one), and step events outside every known allocation get a
window of their own, so nothing the ledger says is left out of the account.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kit.ledger import Event
from kit.ledger.schema import end_outcome
from kit.run.chainstate import ChainState
from kit.run.goodput import CHAIN_KINDS, SLACK_S, Inputs, num, us
from kit.run.queue import AcctRecord


@dataclass(slots=True)
class Window:
    """One segment's allocation as the account sees it (times in integer microseconds)."""

    seg: str
    a: int = 0
    b: int = 0
    job_id: str = ""
    outcome: str = ""  # clean, finished, crash, hang, lost, preflight, running, unknown
    reason: str = ""
    bounds: str = "ledger"  # where a and b came from: sacct, ledger, chain.json, trainer, steps
    known_end: bool = False
    start_step: int | None = None
    trainer_start: int | None = None
    trainer_end: int | None = None
    hang_t: int | None = None
    hang_stalled: int | None = None
    last_trainer: int | None = None
    ckpt_after: int | None = None
    lost: bool = False


def _gather(events: Sequence[Event], chain: ChainState) -> tuple[dict[str, Window], int | None]:
    """Per segment what the ledger's events and chain.json say; and the chain's first submission."""
    wins: dict[str, Window] = {}
    submitted: int | None = None
    lo: dict[str, int] = {}
    hi: dict[str, int] = {}

    def win(seg: str) -> Window:
        w = wins.get(seg)
        if w is None:
            w = wins[seg] = Window(seg)
        return w

    for e in events:
        kind, t = e.get("kind"), us(e.get("t"))
        if kind == "chain_submitted":
            submitted = t if submitted is None else min(submitted, t)
        seg = e.get("seg")
        if kind == "allocation_ended" and isinstance(e.get("seg_ended"), str):
            w = win(e["seg_ended"])  # found lost by the next allocation: its t is not the end
            w.lost, w.outcome = True, "lost"
            w.reason = str(e.get("reason") or w.reason)
            w.ckpt_after = _int(e.get("ckpt_step"), w.ckpt_after)
            continue
        if not isinstance(seg, str) or not seg:
            continue
        w = win(seg)
        lo[seg], hi[seg] = min(lo.get(seg, t), t), max(hi.get(seg, t), t)
        src = str(e.get("src") or "")
        if kind not in CHAIN_KINDS and not src.startswith("chain"):
            w.last_trainer = t if w.last_trainer is None else max(w.last_trainer, t)
        if kind == "allocation_started":
            w.a, w.bounds = t, "ledger"
            w.job_id = str(e.get("job_id") or w.job_id)
        elif kind == "allocation_ended":
            w.b, w.known_end = max(w.b, t), True
            w.outcome = str(e.get("outcome") or w.outcome)
            w.reason = str(e.get("reason") or w.reason)
            w.ckpt_after = _int(e.get("ckpt_step"), w.ckpt_after)
        elif kind == "segment_started":
            w.trainer_start = t
            w.start_step = _int(e.get("step"), w.start_step)
            w.job_id = w.job_id or str(e.get("job_id") or "")
        elif kind == "segment_ended":
            w.trainer_end = t
            w.reason = str(e.get("reason") or w.reason)
        elif kind == "ckpt_loaded" and w.start_step is None:
            w.start_step = _int(e.get("step"), None)
        elif kind == "hang" and w.hang_t is None:
            w.hang_t = t
            stalled = num(e.get("stalled_s"))
            w.hang_stalled = us(stalled) if stalled is not None else None
    for seg, w in wins.items():
        if seg in lo:
            w.a = w.a or lo[seg]
            w.b = max(w.b, hi[seg])
    for rec in chain.segments:
        w = win(rec.seg)
        w.job_id = w.job_id or rec.job_id
        if rec.start > 0 and not w.a:
            w.a, w.bounds = us(rec.start), "chain.json"
        if rec.end > 0 and rec.outcome not in ("lost", "running"):
            w.b, w.known_end = max(w.b, us(rec.end)), True
        if rec.outcome not in ("", "running") and not w.outcome:
            w.outcome, w.reason = rec.outcome, w.reason or rec.reason
        if rec.outcome == "lost":
            w.lost = True
        if rec.end > 0 and w.ckpt_after is None:
            w.ckpt_after = rec.ckpt_after
    for w in wins.values():
        if w.trainer_end is not None:
            w.known_end = True
            w.b = max(w.b, w.trainer_end)
        if w.a == 0 and w.b:
            w.a = w.b
        if w.bounds == "ledger" and w.trainer_start is not None and w.a == w.trainer_start:
            w.bounds = "trainer"  # a local run: no allocation record, the trainer's own events
    return wins, submitted


def _int(v: Any, default: int | None) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else default


def _match_sacct(wins: list[Window], history: Sequence[AcctRecord]) -> None:
    """Slurm's start and end of each allocation where sacct knows them (they include the job's launch
    before the driver's first event and its exit after the last one)."""
    for w in wins:
        if not w.job_id:
            continue
        cands = [r for r in history if r.job_id == w.job_id and r.start is not None
                 and us(r.start) <= w.a + us(SLACK_S) and (r.end is None or us(r.end) + us(SLACK_S) >= w.a)]
        if not cands:
            continue
        r = max(cands, key=lambda r: r.start or 0.0)
        w.a, w.bounds = min(w.a, us(r.start)), "sacct"
        if r.end is not None and r.state not in ("RUNNING", "PENDING", "REQUEUED"):
            w.b, w.known_end = max(w.b, us(r.end)), True


def windows(inp: Inputs, t_us: np.ndarray, chain: ChainState, history: Sequence[AcctRecord]) -> tuple[
        list[Window], int | None]:
    """The run's allocations in time order, disjoint, every step event inside one (steps outside every
    known allocation get a window of their own, so nothing in the ledger is left out)."""
    by_seg, submitted = _gather(inp.events, chain)
    wins = sorted(by_seg.values(), key=lambda w: (w.a, w.b))
    _match_sacct(wins, history)
    for w in wins:
        w.b = max(w.b, w.a)  # an end before the start (clocks, hand edits) is no end
    wins.sort(key=lambda w: (w.a, w.b))
    # An allocation whose end nobody recorded (lost, running) ends at its last step or event.
    if len(t_us):
        for i, w in enumerate(wins):
            if not w.known_end:  # t_us is sorted: the window's last step is the last one before the next start
                nxt = wins[i + 1].a if i + 1 < len(wins) else np.iinfo(np.int64).max
                j = int(np.searchsorted(t_us, nxt, "left")) - 1
                if j >= 0 and t_us[j] >= w.a:
                    w.b = max(w.b, int(t_us[j]))
    for prev, w in itertools.pairwise(wins):  # disjoint: an overlap goes to the earlier one
        w.a = max(w.a, prev.b)
        w.b = max(w.b, w.a)
    wins = _orphans(wins, t_us, inp)
    last = len(wins) - 1
    for i, w in enumerate(wins):
        if not w.outcome or w.outcome == "running":
            if w.trainer_end is not None:
                w.outcome = end_outcome(w.reason)
            elif w.hang_t is not None:
                w.outcome = "hang"
            elif w.lost or i < last:
                w.outcome = "lost"
            else:
                w.outcome = "running" if chain.state in ("", "running") else "unknown"
    return wins, submitted


def _orphans(wins: list[Window], t_us: np.ndarray, inp: Inputs) -> list[Window]:
    """Step events outside every window: one window per run of them, from the first one's start
    (its time less its step time) to the last one."""
    if not len(t_us):
        return wins
    a = np.array([w.a for w in wins], dtype=np.int64)
    b = np.array([w.b for w in wins], dtype=np.int64)
    inside_n = np.searchsorted(t_us, b, "right") - np.searchsorted(t_us, a, "left")  # t_us is sorted
    if int(inside_n.sum()) == len(t_us):  # the common case: every step in an allocation (windows are disjoint)
        return wins
    idx = np.searchsorted(a, t_us, "right") - 1
    inside = (idx >= 0) & (t_us <= b[np.clip(idx, 0, None)]) if len(wins) else np.zeros(len(t_us), bool)
    out = np.flatnonzero(~inside)
    if not len(out):
        return wins
    gap = np.searchsorted(a, t_us[out], "right")  # rows of one gap between windows belong together
    new: list[Window] = []
    for g in np.unique(gap).tolist():
        rows = out[gap == g]
        first, lastt = int(t_us[rows[0]]), int(t_us[rows[-1]])
        st = num(float(inp.step_time[rows[0]]))
        lo = wins[g - 1].b if g > 0 else 0
        start = max(lo, first - (us(st) if st is not None else 0))
        new.append(Window(f"?{len(new) + 1}", start, lastt, outcome="unknown", bounds="steps", known_end=True))
    return sorted([*wins, *new], key=lambda w: (w.a, w.b))



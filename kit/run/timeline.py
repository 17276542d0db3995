"""The run as one partition of time, painted: the engine of the goodput account (kit.run.goodput).

Every second from the chain's first submission to the end of its newest allocation gets one label.
First a base label: queue between allocations; in an allocation, start-up up to the first completed
step, then each step event's interval (the time since the previous one) as productive or redone, then
the tail after the last step (productive up to a clean end, lost after a crash, hang detection up to
the watchdog's verdict, other after the trainer ended). Then paints where the ledger says something
else happened: checkpoint stalls, evaluations, checkpoint loads (at start-up and in a rollback),
preflights; the first paint in :data:`PAINT_ORDER` that covers a second wins. Everything is integer
microseconds in numpy arrays: the pieces are the distinct boundaries, so sums are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from kit.ledger import Event
from kit.ledger.scan import surviving
from kit.run.allocations import Window
from kit.run.goodput import (
    CATEGORIES,
    CKPT_LOAD,
    CKPT_STALL,
    DAY_US,
    EVAL,
    FAILED,
    HANG,
    MAX_DAYS,
    NCAT,
    OTHER,
    PAINT_ORDER,
    PREFLIGHT,
    PRODUCTIVE,
    QUEUE,
    REDONE,
    STARTUP,
    US,
    Account,
    DayAccount,
    SegmentAccount,
    num,
    us,
)


class Timeline:
    """The run as one partition of time: a base label for every second (start-up, each step event's
    interval, the tail after the last one, queue between allocations), then paints (checkpoint
    stalls, evaluations, checkpoint loads, preflights) where the ledger says they happened."""

    def __init__(self, t: np.ndarray, step: np.ndarray, st: np.ndarray, wins: list[Window],
                 events: Sequence[Event]) -> None:
        self.t, self.step, self.st, self.wins, self.events = t, step, st, wins, events
        self.a = np.array([w.a for w in wins], dtype=np.int64)
        self.b = np.array([w.b for w in wins], dtype=np.int64)
        self.starts: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.paints: list[tuple[int, int, int]] = []
        self.first: list[int | None] = []
        self.last: list[int | None] = []
        self.rollback_us = 0
        self.stall_s: list[float] = []
        self.by_win: dict[int, list[Event]] = {}

    # ------------------------------------------------------------------------------------ build
    def build(self, submitted: int | None) -> None:
        step, n = self.step, len(self.t)
        for e in self.events:
            i = self.window_of(us(e.get("t")))
            if i is not None:
                self.by_win.setdefault(i, []).append(e)
        spans, row_win = self._spans()
        self.spans = spans
        redone = ~surviving(step) if n else np.zeros(0, dtype=bool)
        for i, w in enumerate(self.wins):  # not yet replayed: what a failed segment trained after its last save
            r0, r1 = spans[i]
            kept = w.ckpt_after if w.ckpt_after is not None else self._ckpt_before(w.b)
            if w.outcome in ("crash", "hang", "lost") and r1 > r0 and kept is not None:
                redone[r0:r1] |= step[r0:r1] > kept
        self.redone = redone
        drops = np.flatnonzero(step[1:] <= step[:-1]) + 1 if n > 1 else np.zeros(0, dtype=np.int64)
        k = np.searchsorted(drops, np.arange(n), "right")
        same = np.zeros(n, dtype=bool)
        if len(drops):
            has = k < len(drops)
            same[has] = row_win[drops[k[has]]] == row_win[has]
        self.by_rollback = redone & same  # replayed by a rollback in the same segment (else a restart)
        if submitted is not None and self.wins and submitted < self.wins[0].a:
            self._add([submitted], [QUEUE], [-1])
        for i, w in enumerate(self.wins):
            self._window(i, w, *spans[i])

    def _spans(self) -> tuple[list[tuple[int, int]], np.ndarray]:
        t = self.t
        row_win = np.full(len(t), -1, dtype=np.int64)
        spans, cur = [], 0
        for i, w in enumerate(self.wins):
            r0 = max(cur, int(np.searchsorted(t, w.a, "left")))
            r1 = max(r0, int(np.searchsorted(t, w.b, "right")))
            row_win[r0:r1] = i
            spans.append((r0, r1))
            cur = r1
        return spans, row_win

    def window_of(self, x: int) -> int | None:
        i = int(np.searchsorted(self.a, x, "right")) - 1
        return i if i >= 0 and x <= self.b[i] else None

    def _ckpt_before(self, x: int) -> int | None:
        steps = [int(e["step"]) for e in self.events if e.get("kind") == "ckpt_saved" and us(e.get("t")) <= x
                 and isinstance(e.get("step"), int)]
        return max(steps) if steps else None

    def _add(self, starts: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
             rows: Sequence[int] | np.ndarray) -> None:
        self.starts.append(np.asarray(starts, dtype=np.int64))
        self.labels.append(np.asarray(labels, dtype=np.int8))
        self.rows.append(np.asarray(rows, dtype=np.int64))

    def _window(self, i: int, w: Window, r0: int, r1: int) -> None:
        a, b, t = w.a, w.b, self.t
        if r1 > r0:
            tt = t[r0:r1]
            fin = self.st[r0:r1]
            fin = fin[np.isfinite(fin) & (fin >= 0)]
            dt = us(float(np.median(fin))) if len(fin) else 0
            k = int(self.step[r0]) - w.start_step if w.start_step is not None else 1
            k = k if 1 <= k <= 1_000_000_000 else 1
            t0 = int(tt[0])
            first = min(max(t0 - (k - 1) * dt, a, min(w.trainer_start or a, t0)), t0)
            red = self.redone[r0:r1]
            labs = np.where(red, REDONE, PRODUCTIVE)
            # Each step's interval is a piece; a run of pieces with the same label (and, redone, the same
            # cause) is one piece: the same partition with a few pieces per segment, not a million.
            key = red.astype(np.int8) * 2 + (red & self.by_rollback[r0:r1])
            keep = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
            starts = np.concatenate([[first], tt[:-1]])[keep]
            self._add(np.concatenate([[a], starts]), np.concatenate([[STARTUP], labs[keep]]),
                      np.concatenate([[-1], r0 + keep]))
            progress, work, lost = int(tt[-1]), PRODUCTIVE, REDONE
            self.first.append(first)
            self.last.append(progress)
        else:
            self._add([a], [STARTUP], [-1])
            progress, work, lost = a, STARTUP, STARTUP
            self.first.append(None)
            self.last.append(None)

        def clip(x: int) -> int:
            return min(max(x, progress), b)

        tail: list[tuple[int, int]]
        if w.outcome == "hang" or w.reason == "hang" or w.hang_t is not None:
            end = w.trainer_end if w.trainer_end is not None and w.reason == "hang" else w.hang_t
            end = clip(end if end is not None else b)
            hs = progress
            if w.hang_t is not None and w.hang_stalled is not None:
                hs = min(clip(w.hang_t - w.hang_stalled), end)
            tail = [(progress, lost), (hs, HANG), (end, OTHER)]
        elif w.trainer_end is not None:
            tail = [(progress, work), (clip(w.trainer_end), OTHER)]
        elif w.outcome in ("running", "unknown", "clean", "finished"):
            tail = [(progress, work)]
        else:  # crash, lost, preflight: lost up to the trainer's last sign of life, other after it
            alive = w.last_trainer if w.last_trainer is not None else (progress if r1 > r0 else b)
            tail = [(progress, lost), (clip(max(progress, alive)), OTHER)]
        tail.append((b, QUEUE))
        self._add([p for p, _ in tail], [c for _, c in tail], [-1] * len(tail))
        self._paint(i, w, r0, r1)

    def _paint(self, i: int, w: Window, r0: int, r1: int) -> None:
        a, b = w.a, w.b

        def add(s: int, e: int, cat: int) -> int:
            s, e = max(s, a), min(e, b)
            if e > s:
                self.paints.append((s, e, cat))
                return e - s
            return 0

        for e in self.by_win.get(i, ()):
            kind, t = e.get("kind"), us(e.get("t"))
            sec = num(e.get("seconds"))
            d = us(sec) if sec is not None else None
            if kind == "ckpt_saved" and d is not None:
                stall = num(e.get("stall_s"))
                ds = d if stall is None else us(stall)
                add(t - d, t - d + ds, CKPT_STALL)
                if e.get("reason") in (None, "interval"):
                    self.stall_s.append(ds / US)
            elif kind == "eval" and d is not None and e.get("by", "live") == "live":
                add(t - d, t, EVAL)
            elif kind == "ckpt_loaded" and d is not None:
                add(t - d, t, CKPT_LOAD)
            elif kind == "doctor":
                add(t - d if d is not None else a, t, PREFLIGHT)
            elif kind == "rollback":
                j = int(np.searchsorted(self.t, t, "left")) - 1
                prev = int(self.t[j]) if r0 <= j < r1 else (self.first[i] or a)
                self.rollback_us += add(min(prev, t), t, CKPT_LOAD)

    # -------------------------------------------------------------------------------- aggregate
    def aggregate(self) -> Account:
        wins = self.wins
        empty = {c: 0 for c in CATEGORIES}
        if not wins:
            return Account(0, 0, dict(empty), [], [], {"failure": 0, "rollback": 0}, None, len(self.t))
        bs = np.maximum.accumulate(np.concatenate(self.starts))
        bl, br = np.concatenate(self.labels), np.concatenate(self.rows)
        lo, hi = int(bs[0]), int(wins[-1].b)
        p = np.array(self.paints, dtype=np.int64).reshape(-1, 3)
        d0, d1 = lo // DAY_US, hi // DAY_US
        days = np.arange(d0 + 1, d1 + 1, dtype=np.int64) * DAY_US if d1 - d0 <= 100_000 else np.zeros(0, np.int64)
        pts = _distinct(np.concatenate([bs, [hi], p[:, 0], p[:, 1], days]))
        pts = pts[(pts >= lo) & (pts <= hi)]
        starts, lens = pts[:-1], np.diff(pts)
        bi = np.searchsorted(bs, starts, "right") - 1
        lab, row = bl[bi].astype(np.int64), br[bi]
        painted = np.zeros(len(starts), dtype=bool)
        for cat in PAINT_ORDER:
            sel = p[p[:, 2] == cat]
            if not len(sel):
                continue
            us_, ue = _union(sel[:, 0], sel[:, 1])
            j = np.searchsorted(us_, starts, "right") - 1
            cov = (j >= 0) & (starts < ue[np.clip(j, 0, None)]) & ~painted & (lab != QUEUE)
            lab[cov] = cat
            painted |= cov
        w = lens.astype(np.float64)
        total = _ints(np.bincount(lab, weights=w, minlength=NCAT))
        k = np.searchsorted(self.a, starts, "right") - 1
        inwin = (lab != QUEUE) & (k >= 0)
        per_win = _ints(np.bincount(k[inwin] * NCAT + lab[inwin], weights=w[inwin],
                                    minlength=len(wins) * NCAT)).reshape(len(wins), NCAT)
        red = lab == REDONE
        rb = red & (row >= 0) & self.by_rollback[np.clip(row, 0, None)] if len(self.t) else red & False
        redone_by = {"rollback": int(lens[rb].sum()), "failure": int(lens[red & ~rb].sum())}
        day = starts // DAY_US  # sorted, like the pieces
        first = np.flatnonzero(np.concatenate([[True], day[1:] != day[:-1]])) if len(day) else np.zeros(0, np.int64)
        ud = day[first]
        inv = np.repeat(np.arange(len(first)), np.diff(np.append(first, len(day))))
        per_day = _ints(np.bincount(inv * NCAT + lab, weights=w, minlength=len(ud) * NCAT)).reshape(len(ud), NCAT)
        return Account(
            allocated_us=int(total[:QUEUE].sum()), queue_us=int(total[QUEUE]), parts_us=_parts(total),
            segments=[self._segment(i, win, per_win[i]) for i, win in enumerate(wins)],
            days=[DayAccount(_date(int(dd)), int(c[:QUEUE].sum()), int(c[QUEUE]), _parts(c))
                  for dd, c in zip(ud.tolist(), per_day, strict=True) if c.any()][-MAX_DAYS:],
            redone_by=redone_by, as_of=hi / US, steps=len(self.t))

    def _segment(self, i: int, w: Window, counts: np.ndarray) -> SegmentAccount:
        r0, r1 = self.spans[i]
        first, last = self.first[i], self.last[i]
        failed = w.outcome in FAILED
        return SegmentAccount(
            seg=w.seg, job_id=w.job_id, start=w.a / US, end=w.b / US, outcome=w.outcome, reason=w.reason,
            bounds=w.bounds, allocated_us=w.b - w.a, parts_us=_parts(counts), start_step=w.start_step,
            end_step=int(self.step[r1 - 1]) if r1 > r0 else None,
            first_step_t=None if first is None else first / US, last_step_t=None if last is None else last / US,
            trainer_end_t=None if w.trainer_end is None else w.trainer_end / US,
            failure_t=((last if last is not None else w.a) / US) if failed else None)

    def stats(self, interval_steps: int | None) -> dict[str, Any]:
        """What the projection needs, measured on this run (kit.run.projection)."""
        keep = ~self.redone if len(self.t) else np.zeros(0, dtype=bool)
        st = self.st[keep]
        st = st[np.isfinite(st) & (st > 0)]
        return {"step_time_s": float(np.median(st)) if len(st) else None,
                "stall_per_save_s": float(np.median(self.stall_s)) if self.stall_s else None,
                "saves": len(self.stall_s), "rollback_load_s": self.rollback_us / US,
                "interval_steps": interval_steps}


def _distinct(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique's hash path is slow on a million nearly sorted int64)."""
    x = np.sort(x, kind="stable")
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _union(s: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint cover of intervals [s, e)."""
    o = np.argsort(s, kind="stable")
    s, e = s[o], e[o]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    idx = np.flatnonzero(new)
    return s[idx], np.maximum.reduceat(e, idx)


def _ints(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int64)


def _parts(counts: np.ndarray) -> dict[str, int]:
    return {c: int(counts[i]) for i, c in enumerate(CATEGORIES)}


def _date(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d")

"""Bounded chart series: memory stays flat however long the run, and folding a step stays cheap.

A run of months logs millions of steps; the terminal shows a few hundred columns. :class:`Curves`
keeps every plotted metric of the step events in two bounded views:

- the whole run: buckets of ``stride`` steps holding, per metric, the sum, count and minimum (mean for
  the curve, minimum so a throughput drop inside a bucket still shows). When there are more than
  ``capacity`` buckets, neighbours merge and the stride doubles: a run of any length costs at most
  ``capacity`` buckets;
- the last ``recent`` raw steps (step, time, values), for the hour and day windows.

Columnar on purpose: one bucket lookup per step for all metrics, not one per metric, so reading the
history of a million steps costs seconds, not minutes. Steps replayed after a resume or rollback
replace the old ones (for a given step the latest event wins): a step at or below the last one first
truncates both views from that step on.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

INF = math.inf
Values = Sequence[float | None]


class Curves:
    def __init__(self, names: Sequence[str], capacity: int = 2048, recent: int = 4096) -> None:
        self.names = tuple(names)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.capacity = capacity
        self.stride = 1
        self.keys: list[int] = []  # step // stride of each bucket
        self.first: list[int] = []  # first and last step in each bucket
        self.last: list[int] = []
        self.t: list[float] = []  # time of each bucket's last point
        self.sums: list[list[float]] = []  # per bucket, per metric
        self.counts: list[list[int]] = []
        self.mins: list[list[float]] = []
        self.recent: deque[tuple[int, float, Values]] = deque(maxlen=recent)

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, steps: Any, t: Any, values: Any, keep: Any = None) -> None:
        """Replace everything with a whole history at once: what :meth:`add` would build step by step,
        in a fraction of the time (the cold start of a million-step run).

        numpy arrays with one row per step event (strided views of a scan's records are fine, and
        are not copied): ``steps``, ``t``, ``values`` (n x len(names) floats; non-finite = N/A) and
        ``keep``: the rows that count (kit.ledger.scan.surviving: a replayed step drops what came after
        it; None = every row), whose steps are strictly increasing. Two passes over the rows as they
        are, all metrics at once (the bucket sums and minimums); a bucket whose sum or minimum is not
        finite (an N/A inside), or that holds a dropped row, is redone alone from its rows; a metric
        with many such buckets (never measured: all N/A) is redone with masks."""
        import numpy as np

        values = values if isinstance(values, np.ndarray) else np.stack(list(values), axis=1)
        n_all = len(steps)
        rows = np.arange(n_all) if keep is None else np.flatnonzero(keep)
        kept = np.asarray(steps[rows], dtype=np.int64)
        n = len(kept)
        self.__init__(self.names, self.capacity, self.recent.maxlen or 4096)  # type: ignore[misc]
        if n == 0:
            return
        self.stride = stride = _stride(kept, self.capacity)
        keys = kept // stride
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # in kept rows
        ends = np.r_[starts[1:], n] - 1
        at = rows[starts]  # the buckets in all rows: [at[i], at[i + 1]), the last one to the end
        holes = np.zeros(len(starts), dtype=bool)  # buckets with a dropped row inside
        if keep is not None and n < n_all:
            gone = np.flatnonzero(~np.asarray(keep, dtype=bool))
            b = np.searchsorted(at, gone, "right") - 1
            holes[b[b >= 0]] = True
        sums, counts, mins = _buckets(values, at, holes, np.diff(np.r_[starts, n]), keep, rows, starts)
        k = self.recent.maxlen or 4096
        tail_rows = rows[-k:]
        tail = np.asarray(values[tail_rows], dtype=np.float64)
        self.keys = keys[starts].tolist()
        self.first = kept[starts].tolist()
        self.last = kept[ends].tolist()
        self.t = np.asarray(t[rows[ends]], dtype=np.float64).tolist()
        self.sums, self.counts, self.mins = sums.tolist(), counts.tolist(), mins.tolist()
        tail_vals = np.where(np.isfinite(tail), tail, np.nan).tolist()
        tail_t = np.asarray(t[tail_rows], dtype=np.float64).tolist()
        for step, tt, row in zip(kept[-k:].tolist(), tail_t, tail_vals, strict=True):
            self.recent.append((step, tt, [None if v != v else v for v in row]))

    @property
    def last_step(self) -> int:
        return self.last[-1] if self.last else -1

    def add(self, step: int, t: float, values: Values) -> None:
        """Fold one step; ``values`` are finite floats or None (N/A), in the order of ``names``."""
        if self.last and step <= self.last[-1]:
            self.truncate(step)
        key = step // self.stride
        if self.keys and self.keys[-1] == key:
            s, c, lo = self.sums[-1], self.counts[-1], self.mins[-1]
            for i, v in enumerate(values):
                if v is not None:
                    s[i] += v
                    c[i] += 1
                    if v < lo[i]:
                        lo[i] = v
            self.last[-1] = step
            self.t[-1] = t
        else:
            self.keys.append(key)
            self.first.append(step)
            self.last.append(step)
            self.t.append(t)
            self.sums.append([0.0 if v is None else v for v in values])
            self.counts.append([0 if v is None else 1 for v in values])
            self.mins.append([INF if v is None else v for v in values])
            if len(self.keys) > self.capacity:
                self._coarsen()
        self.recent.append((step, t, values))

    def truncate(self, step: int) -> None:
        """Forget what starts at or after ``step`` (a bucket that straddles it stays)."""
        i = bisect.bisect_left(self.keys, step // self.stride)
        if i < len(self.keys) and self.first[i] < step:
            i += 1
        for col in (self.keys, self.first, self.last, self.t, self.sums, self.counts, self.mins):
            del col[i:]
        while self.recent and self.recent[-1][0] >= step:
            self.recent.pop()

    def _coarsen(self) -> None:
        self.stride *= 2
        keys, first, last, t, sums, counts, mins = [], [], [], [], [], [], []  # type: ignore[var-annotated]
        for j in range(len(self.keys)):
            key = self.first[j] // self.stride
            if keys and keys[-1] == key:
                last[-1], t[-1] = self.last[j], self.t[j]
                sums[-1] = [a + b for a, b in zip(sums[-1], self.sums[j], strict=True)]
                counts[-1] = [a + b for a, b in zip(counts[-1], self.counts[j], strict=True)]
                mins[-1] = [min(a, b) for a, b in zip(mins[-1], self.mins[j], strict=True)]
            else:
                keys.append(key)
                first.append(self.first[j])
                last.append(self.last[j])
                t.append(self.t[j])
                sums.append(self.sums[j])
                counts.append(self.counts[j])
                mins.append(self.mins[j])
        self.keys, self.first, self.last, self.t = keys, first, last, t
        self.sums, self.counts, self.mins = sums, counts, mins

    # ------------------------------------------------------------------------------------ views
    def whole(self, name: str, since_t: float = -INF) -> tuple[list[int], list[float], list[float]]:
        """(last step, mean, minimum) of each bucket with data for ``name`` ending at or after ``since_t``."""
        i = self.index[name]
        xs, means, lows = [], [], []
        start = bisect.bisect_left(self.t, since_t) if since_t > -INF else 0
        for j in range(start, len(self.keys)):
            n = self.counts[j][i]
            if n:
                xs.append(self.last[j])
                means.append(self.sums[j][i] / n)
                lows.append(self.mins[j][i])
        return xs, means, lows

    def raw(self, name: str, since_t: float = -INF) -> tuple[list[int], list[float]]:
        i = self.index[name]
        xs, ys = [], []
        for step, t, vals in self.recent:
            v = vals[i]
            if v is not None and t >= since_t:
                xs.append(step)
                ys.append(v)
        return xs, ys

    def recent_values(self, name: str, n: int) -> list[float]:
        """The last ``n`` raw values of ``name`` (fewer when missing)."""
        i = self.index[name]
        out: list[float] = []
        for _, _, vals in reversed(self.recent):
            v = vals[i]
            if v is not None:
                out.append(v)
                if len(out) == n:
                    break
        return out[::-1]

    def window(self, name: str, since_t: float = -INF) -> tuple[list[int], list[float]]:
        """Points since ``since_t``: raw where the recent ring reaches, bucket means before that."""
        covered = bool(self.recent) and (self.recent[0][1] <= since_t or len(self.recent) < (self.recent.maxlen or 0))
        if since_t > -INF and covered:
            return self.raw(name, since_t)
        xs, ys, _ = self.whole(name, since_t)
        if since_t > -INF:
            rx, ry = self.raw(name, since_t)
            if rx:
                keep = bisect.bisect_left(xs, rx[0])
                xs, ys = xs[:keep] + rx, ys[:keep] + ry
        return xs, ys


def _buckets(values: Any, at: Any, holes: Any, size: Any, keep: Any, rows: Any,
             starts: Any) -> tuple[Any, Any, Any]:
    """(sums, counts, minimums), buckets x metrics, N/A and dropped rows left out (see Curves.load)."""
    import numpy as np

    with np.errstate(invalid="ignore", over="ignore"):
        sums = np.add.reduceat(values, at, axis=0).astype(np.float64)
        mins = np.minimum.reduceat(values, at, axis=0).astype(np.float64)
    counts = np.repeat(size.astype(np.int64)[:, None], values.shape[1], axis=1)
    bad = ~np.isfinite(sums) | ~np.isfinite(mins) | holes[:, None]
    masked = np.flatnonzero(bad.sum(axis=0) > 64)  # metrics with many N/A: masks over the kept rows
    for j in masked.tolist():
        c = np.asarray(values[rows, j], dtype=np.float64)
        ok = np.isfinite(c)
        sums[:, j] = np.add.reduceat(np.where(ok, c, 0.0), starts)
        counts[:, j] = np.add.reduceat(ok, starts, dtype=np.int64)
        mins[:, j] = np.minimum.reduceat(np.where(ok, c, INF), starts)
        bad[:, j] = False
    ends = np.r_[at[1:], len(values)]
    for i in np.flatnonzero(bad.any(axis=1)).tolist():  # the few others, bucket by bucket
        seg = np.asarray(values[at[i]:ends[i]], dtype=np.float64)
        if keep is not None:
            seg = seg[np.asarray(keep[at[i]:ends[i]], dtype=bool)]
        ok = np.isfinite(seg)
        redo = bad[i]
        sums[i, redo] = np.where(ok, seg, 0.0).sum(axis=0)[redo]
        counts[i, redo] = ok.sum(axis=0)[redo]
        mins[i, redo] = np.where(ok, seg, INF).min(axis=0, initial=INF)[redo]
    return sums, counts, mins


def _stride(steps: Any, capacity: int) -> int:
    """The smallest power of two that leaves at most ``capacity`` buckets of increasing ``steps`` (what
    doubling from 1 finds): start from the stride the span alone guarantees, halve while it still fits."""
    import numpy as np

    if len(steps) <= capacity:
        return 1
    first, last = int(steps[0]), int(steps[-1])
    stride = 1
    while last // stride - first // stride + 1 > capacity:  # keys first//s..last//s: at most that many
        stride *= 2
    while stride > 1 and np.count_nonzero(np.diff(steps // (stride // 2))) + 1 <= capacity:
        stride //= 2
    return stride


def clean(v: object) -> float | None:
    """A finite float, or None (N/A): junk in a field never reaches a curve."""
    if type(v) is float:
        return v if v - v == 0 else None  # False for inf and nan
    if type(v) is int:
        return float(v)
    return None

"""Bounded chart series: memory stays flat however long the run.

A run of months logs millions of steps; the terminal shows a few hundred columns. Each metric keeps
two views, both bounded:

- :class:`StepSeries`, the whole run: buckets of ``stride`` steps (mean, min, max, time of the last
  point). When it holds more than ``capacity`` buckets, neighbours merge and the stride doubles, so a
  run of any length costs at most ``capacity`` buckets.
- :class:`Recent`, the last ``capacity`` raw points (step, time, value), for the hour/day windows.

Steps replayed after a resume or rollback replace the old ones (for a given step the latest event
wins): adding a step at or below the last one first truncates both views from that step on.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class Bucket:
    key: int  # step // stride
    first: int  # first step in the bucket
    last: int  # last step in the bucket
    t: float  # time of the last point
    n: int
    total: float
    lo: float
    hi: float

    @property
    def mean(self) -> float:
        return self.total / self.n


class StepSeries:
    """The whole run at a resolution that coarsens as it grows (at most ``capacity`` buckets)."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self.stride = 1
        self.buckets: list[Bucket] = []
        self._keys: list[int] = []

    def __len__(self) -> int:
        return len(self.buckets)

    @property
    def last_step(self) -> int:
        return self.buckets[-1].last if self.buckets else -1

    def add(self, step: int, t: float, value: float) -> None:
        if step <= self.last_step:
            self.truncate(step)
        key = step // self.stride
        if self.buckets and self.buckets[-1].key == key:
            b = self.buckets[-1]
            b.last, b.t, b.n, b.total = step, t, b.n + 1, b.total + value
            b.lo, b.hi = min(b.lo, value), max(b.hi, value)
            return
        self.buckets.append(Bucket(key, step, step, t, 1, value, value, value))
        self._keys.append(key)
        if len(self.buckets) > self.capacity:
            self._coarsen()

    def truncate(self, step: int) -> None:
        """Forget buckets that start at or after ``step`` (a bucket that straddles it stays)."""
        i = bisect.bisect_left(self._keys, step // self.stride)
        if i < len(self.buckets) and self.buckets[i].first < step:
            i += 1
        del self.buckets[i:]
        del self._keys[i:]

    def _coarsen(self) -> None:
        self.stride *= 2
        merged: list[Bucket] = []
        for b in self.buckets:
            key = b.first // self.stride
            if merged and merged[-1].key == key:
                m = merged[-1]
                m.last, m.t, m.n, m.total = b.last, b.t, m.n + b.n, m.total + b.total
                m.lo, m.hi = min(m.lo, b.lo), max(m.hi, b.hi)
            else:
                b.key = key
                merged.append(b)
        self.buckets = merged
        self._keys = [b.key for b in merged]

    def points(self, since_t: float = -math.inf) -> tuple[list[int], list[float], list[float]]:
        """(steps, means, minima) of the buckets whose last point is at or after ``since_t``."""
        bs = [b for b in self.buckets if b.t >= since_t]
        return [b.last for b in bs], [b.mean for b in bs], [b.lo for b in bs]


class Recent:
    """The last ``capacity`` raw points of one metric."""

    def __init__(self, capacity: int = 4096) -> None:
        self.points: deque[tuple[int, float, float]] = deque(maxlen=capacity)

    def add(self, step: int, t: float, value: float) -> None:
        while self.points and self.points[-1][0] >= step:
            self.points.pop()
        self.points.append((step, t, value))

    def truncate(self, step: int) -> None:
        while self.points and self.points[-1][0] >= step:
            self.points.pop()

    def covers(self, since_t: float) -> bool:
        """True when the ring still holds everything from ``since_t`` on."""
        return bool(self.points) and (self.points[0][1] <= since_t or len(self.points) < (self.points.maxlen or 0))

    def window(self, since_t: float = -math.inf) -> tuple[list[int], list[float]]:
        pts = [p for p in self.points if p[1] >= since_t]
        return [p[0] for p in pts], [p[2] for p in pts]


class Metric:
    """Both views of one metric; values that are missing or not finite are skipped (shown as N/A)."""

    def __init__(self, capacity: int = 2048, recent: int = 4096) -> None:
        self.whole = StepSeries(capacity)
        self.recent = Recent(recent)

    def add(self, step: int, t: float, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return
        self.whole.add(step, t, float(value))
        self.recent.add(step, t, float(value))

    def truncate(self, step: int) -> None:
        self.whole.truncate(step)
        self.recent.truncate(step)

    def window(self, since_t: float) -> tuple[list[int], list[float]]:
        """Points since ``since_t``: raw when the ring reaches back that far, else the buckets' means."""
        if since_t == -math.inf or not self.recent.covers(since_t):
            xs, ys, _ = self.whole.points(since_t)
            if since_t != -math.inf:
                # the newest raw points are finer than the buckets: splice them on
                rx, ry = self.recent.window(since_t)
                if rx:
                    keep = bisect.bisect_left(xs, rx[0])
                    xs, ys = xs[:keep] + rx, ys[:keep] + ry
            return xs, ys
        return self.recent.window(since_t)

"""A run's validation picture (the monitor's Validation tab): per-source validation loss over steps,
from the ledger's ``eval`` events (kit.evaluation), and which sources move the wrong way.

No UI here: RunModel folds the events into an :class:`EvalHistory`; the panel is
kit.monitor.widgets.ValidationPanel. Bounded like the step curves: at most ``capacity`` evaluations
are kept; past it, every other one of the older half is dropped, so a long run keeps its whole shape
at a coarser grain. For a step evaluated twice the latest event wins; a live evaluation of a step at
or before the last live one (a rollback replayed it) first forgets the evaluations from that step on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WORST = 3  # sources highlighted as the worst-moving


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True, slots=True)
class SourceTrend:
    """One source's latest validation loss and how it moved."""

    name: str
    language: str
    last: float | None
    prev: float | None  # the evaluation before the last one
    best: float | None  # the lowest of the kept evaluations
    change: float | None  # relative change since the previous evaluation
    above_best: float | None  # relative distance above the best
    worst: bool  # among the WORST sources whose loss rose most since the previous evaluation
    incident: bool  # the trainer has an open validation-loss alert for it


@dataclass(frozen=True)
class Validation:
    """What the validation panel shows; ``series``: source -> losses aligned with ``steps``."""

    steps: list[int]
    series: dict[str, list[float | None]]
    trends: list[SourceTrend]  # worst-moving first
    last_t: float
    last_step: int
    seconds: float | None
    fraction: float | None
    interval: int | None
    note: str
    by: str


@dataclass
class EvalHistory:
    capacity: int = 2000
    points: dict[int, dict[str, float]] = field(default_factory=dict)
    languages: dict[str, str] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)  # the latest evaluation's own numbers
    incidents: list[str] = field(default_factory=list)
    version: int = 0
    _live_step: int = -1
    _view: tuple[int, Validation | None] = (-1, None)

    def fold(self, e: dict[str, Any], t: float) -> None:
        step, sources = e["step"], e["sources"]
        if isinstance(step, bool) or not isinstance(step, int) or not isinstance(sources, dict):
            raise TypeError("eval")
        by = e.get("by") if isinstance(e.get("by"), str) else "live"
        if by == "live":
            if step <= self._live_step:  # replayed after a rollback: the old timeline's evaluations go
                self.points = {s: v for s, v in self.points.items() if s < step}
            self._live_step = step
            inc = e.get("incidents")
            self.incidents = [str(x) for x in inc][:100] if isinstance(inc, list) else []
        losses = {}
        for name, v in list(sources.items())[:500]:
            if isinstance(v, dict):
                losses[str(name)[:60]] = _num(v.get("loss"))
                if isinstance(v.get("language"), str):
                    self.languages[str(name)[:60]] = v["language"][:20]
        clean = {k: v for k, v in losses.items() if v is not None}
        self.points[step] = clean if by == "live" else {**self.points.get(step, {}), **clean}
        if by == "live" or step >= self.last.get("step", -1):  # a live one after a rollback is the newest too
            self.last = {"t": t, "step": step, "by": by, "seconds": _num(e.get("seconds")),
                         "fraction": _num(e.get("fraction")), "interval": e.get("interval_steps"),
                         "note": e.get("note") if isinstance(e.get("note"), str) else ""}
        self.version += 1
        if len(self.points) > self.capacity:
            steps = sorted(self.points)
            half = steps[: len(steps) // 2]
            for s in half[1::2]:
                del self.points[s]

    def view(self) -> Validation | None:
        """The panel's picture (computed once per change: snapshots are taken several times a second)."""
        if self._view[0] != self.version:
            self._view = (self.version, self._compute())
        return self._view[1]

    def _compute(self) -> Validation | None:
        if not self.points or not self.last:
            return None
        steps = sorted(self.points)
        names = sorted({n for p in self.points.values() for n in p})
        series = {n: [self.points[s].get(n) for s in steps] for n in names}
        trends = [self._trend(n, series[n]) for n in names]
        rising = sorted((t for t in trends if t.change is not None and t.change > 0), key=lambda t: -(t.change or 0))
        worst = {t.name for t in rising[:WORST]}
        trends = [SourceTrend(t.name, t.language, t.last, t.prev, t.best, t.change, t.above_best, t.name in worst,
                              t.incident) for t in trends]
        trends.sort(key=lambda t: (not t.incident, not t.worst, -(t.change if t.change is not None else -math.inf)))
        last = self.last
        interval = last.get("interval")
        return Validation(steps, series, trends, last["t"], last["step"], last.get("seconds"), last.get("fraction"),
                          interval if isinstance(interval, int) and not isinstance(interval, bool) else None,
                          last.get("note", ""), last.get("by", "live"))

    def _trend(self, name: str, values: list[float | None]) -> SourceTrend:
        known = [v for v in values if v is not None]
        last = known[-1] if known else None
        prev = known[-2] if len(known) > 1 else None
        best = min(known) if known else None
        change = (last / prev - 1) if last is not None and prev else None
        above = (last / best - 1) if last is not None and best else None
        return SourceTrend(name, self.languages.get(name, ""), last, prev, best, change, above, False,
                           name in self.incidents)

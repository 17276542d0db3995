"""Visible progress for long work: the trainer's live step lines and rich progress bars for the CLI.

Why: minutes of silence look like a hang. ``kit train`` and ``kit demo`` print one line per interval
from rank 0 (:class:`StepLines`): step, loss, tokens/s, step time, ETA, with the rates measured over
the steps since the previous line (not one step's, not the whole run's). Data preparation, conversion
and upload show rich bars (:class:`Bars`) whose rates are of the work actually done (bytes written,
bytes read), never of skipped work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PREFIX = "[kit] step "  # what a launcher forwards from a rank's output (kit.launch)


def duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s // 60:.0f}m{s % 60:02.0f}s"
    return f"{s // 3600:.0f}h{s % 3600 // 60:02.0f}m"


class StepLines:
    """Rank 0's live lines: at the segment's first step, then every ``every_s`` seconds, and at its last.

    The ETA is the steps to go times the mean step time since the previous line."""

    def __init__(self, every_s: float, max_steps: int, tokens_per_step: int, out: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.max_steps = max_steps
        self.tokens_per_step = tokens_per_step
        self.out = out
        self.clock = clock
        self._last_t: float | None = None
        self._last_step = 0
        self.lines = 0

    def step(self, step: int, loss: float, last: bool = False) -> str | None:
        """Called after every step; prints (and returns) a line when one is due."""
        now = self.clock()
        if self.every_s <= 0:
            return None
        if self._last_t is None:  # the segment's first step: say that training has started
            self._last_t, self._last_step = now, step
            return self._say(step, loss, None)
        if not last and now - self._last_t < self.every_s:
            return None
        n = step - self._last_step
        per_step = (now - self._last_t) / n if n > 0 else None
        self._last_t, self._last_step = now, step
        return self._say(step, loss, per_step)

    def _say(self, step: int, loss: float, per_step: float | None) -> str:
        rate = f"{self.tokens_per_step / per_step:,.0f} tok/s" if per_step else "- tok/s"
        st = f"{per_step:.3g} s/step" if per_step else "- s/step"
        eta = duration((self.max_steps - step) * per_step) if per_step else "?"
        line = f"{PREFIX}{step}/{self.max_steps} | loss {loss:.4f} | {rate} | {st} | ETA {eta}"
        self.out(line)
        self.lines += 1
        return line


class _NoTask:
    def advance(self, n: float = 1) -> None:
        pass

    def total(self, total: float | None) -> None:
        pass


class _Task(_NoTask):
    def __init__(self, bar: Any, task_id: Any) -> None:
        self.bar = bar
        self.id = task_id

    def advance(self, n: float = 1) -> None:
        self.bar.advance(self.id, n)

    def total(self, total: float | None) -> None:
        self.bar.update(self.id, total=total)


class Bars:
    """rich progress bars, one task per phase of the work; a no-op when ``enabled`` is False (``--json``,
    tests, a log that is not a terminal is still fine: rich prints plain updates there).

    ``task(description, total, unit="bytes")`` shows a transfer speed and sizes; ``unit=""`` counts items
    and shows items/s; ``total=None`` is a phase of unknown length (a spinner and the time it has taken)."""

    def __init__(self, enabled: bool = True, console: Any = None) -> None:
        self.enabled = enabled
        self.console = console
        self._bar: Any = None

    def __enter__(self) -> Bars:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            class Amount(MofNCompleteColumn):
                """Sizes for byte tasks, counts for item tasks."""

                def render(self, task: Any) -> Any:
                    return DownloadColumn().render(task) if task.fields.get("unit") == "bytes" else super().render(task)

            class Rate(TransferSpeedColumn):
                def render(self, task: Any) -> Any:
                    from rich.text import Text

                    if task.fields.get("unit") == "bytes":
                        return super().render(task)
                    speed = task.finished_speed or task.speed
                    unit = task.fields.get("unit") or "it"
                    return Text(f"{speed:,.1f} {unit}/s" if speed else "", "progress.data.speed")

            self._bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 Amount(), Rate(), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def task(self, description: str, total: float | None, unit: str = "bytes") -> _NoTask:
        if self._bar is None:
            return _NoTask()
        return _Task(self._bar, self._bar.add_task(description, total=total, unit=unit))

    @contextmanager
    def phase(self, description: str) -> Iterator[None]:
        """A phase of unknown length (a tokenizer's training): a spinner, then marked done."""
        if self._bar is None:
            yield
            return
        tid = self._bar.add_task(description, total=None, unit="")
        try:
            yield
        finally:
            self._bar.update(tid, total=1, completed=1)


NO_BARS = Bars(enabled=False)

"""A run's ledger as the spike postmortem needs it, read through the one reader's index.

kit.ledger.scan gives the step events as numpy columns (from the writer's index: a million steps in
milliseconds) and parses only the events that are not bulk (spikes, rollbacks, alerts, checkpoints).
Health samples and per-rank timings, the bulk of a long run on many nodes, stay on disk: they are
fetched by time, around each spike (:meth:`Ledger.health`), and a bounded, evenly spaced sample of
them gives the run's baseline (:meth:`Ledger.health_sample`). Memory is bounded by the step columns,
whatever the size of the health history.

Two views of the steps: ``timeline`` (every step event in the order written, including steps later
abandoned by a rollback) and ``final`` (for each step the latest event wins, the ledger rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kit.ledger import ReadStats
from kit.ledger.scan import Scan, latest_wins, scan

STEP_FIELDS = ("t", "step", "loss", "grad_norm", "consumed")
"""Columns kept for every step; any other field of a step is read on demand (:meth:`Ledger.detail`)."""


class Steps:
    """Columns of step events (numpy arrays of equal length), oldest first; ``file`` and ``off`` say
    where each event's line is, for :meth:`Ledger.detail`.

    A selection of rows (:meth:`take`) gathers a column only when it is asked for: the postmortem's
    final curve of a million steps needs its step, loss and grad norm, not every column."""

    def __init__(self, cols: dict[str, np.ndarray], rows: np.ndarray | None = None) -> None:
        self._base = cols
        self._rows = rows
        self.cols: dict[str, np.ndarray] = {} if rows is not None else dict(cols)
        self._final: Steps | None = None

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._base["step"])

    def __getitem__(self, key: str) -> np.ndarray:
        col = self.cols.get(key)
        if col is None:
            col = self.cols[key] = self._base[key][self._rows]
        return col

    def take(self, idx: np.ndarray) -> Steps:
        if self._rows is None:
            return Steps(self._base, np.asarray(idx))
        return Steps(self._base, self._rows[idx])

    def final(self) -> Steps:
        """One row per step, the latest event winning, sorted by step (made once)."""
        if self._final is None:
            self._final = self.take(latest_wins(self["step"]))
        return self._final

    def around(self, lo: int, hi: int) -> Steps:
        s = self["step"]
        return self.take(np.flatnonzero((s >= lo) & (s <= hi)))


@dataclass
class Ledger:
    timeline: Steps
    events: list[dict[str, Any]]  # every event that is not bulk, sorted by time
    bad_lines: int = 0
    scan: Scan | None = None
    stats: ReadStats = field(default_factory=ReadStats)
    _samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _medians: dict[str, float | None] = field(default_factory=dict, repr=False)

    def kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] in kinds]

    def detail(self, rows: Steps) -> list[dict[str, Any]]:
        """The full step events of some rows (consumed, samples, lr, throughput...)."""
        if self.scan is None or not len(rows):
            return [{} for _ in range(len(rows))]
        recs = np.zeros(len(rows), dtype=[("file", "<u4"), ("off", "<f8")])
        recs["file"], recs["off"] = rows["file"], rows["off"]
        return self.scan.step_detail(recs)

    def health(self, t0: float, t1: float) -> list[dict[str, Any]]:
        """Health samples of every node written between t0 and t1."""
        return self.scan.fetch({"health"}, t0, t1) if self.scan is not None else []

    def health_sample(self, n: int = 500) -> list[dict[str, Any]]:
        """At most ``n`` health samples spread evenly over the run: the run's baseline (medians; 500
        samples of 8 GPUs are 4,000 values a metric). Read once: every spike compares with it."""
        if n not in self._samples:
            self._samples[n] = self._health_sample(n)
        return self._samples[n]

    def health_medians(self, keys: tuple[str, ...]) -> dict[str, float | None]:
        """The run's median of each GPU metric over :meth:`health_sample` (None: never measured)."""
        from kit.tools.postmortem import gpu_values

        out = self._medians
        for key in keys:
            if key not in out:
                v = gpu_values(self.health_sample(), key)
                out[key] = float(np.median(v)) if v else None
        return {k: out[k] for k in keys}

    def _health_sample(self, n: int) -> list[dict[str, Any]]:
        if self.scan is None or not len(self.scan.bulk):
            return []
        b = self.scan.bulk
        code = self.scan.kinds.index("health")
        where = np.flatnonzero(b["kind"] == code)
        if not len(where):
            return []
        pick = where[np.unique(np.linspace(0, len(where) - 1, min(n, len(where))).astype(np.int64))]
        out: list[dict[str, Any]] = []
        from kit.ledger import index as ix
        from kit.ledger.reader import ledger_dir

        for file_no in np.unique(b["file"][pick]).tolist():
            recs = b[pick][b["file"][pick] == file_no]
            out += ix.pread_events(ledger_dir(self.scan.run_dir) / self.scan.files[file_no], recs, self.stats)
        return out

    @property
    def has_health(self) -> bool:
        return self.scan is not None and "health" in self.scan.kinds and bool(
            len(self.scan.bulk) and np.any(self.scan.bulk["kind"] == self.scan.kinds.index("health")))


def read_ledger(run_dir: str | Path, use_index: bool = True) -> Ledger:
    """A run's ledger for the postmortem (torn tails left out, junk counted)."""
    stats = ReadStats()
    sc = scan(run_dir, stats, use_index=use_index)
    s = sc.steps  # columns as views of the scan's records (no copies); the step numbers as integers
    cols = {k: (s[k].astype(np.int64) if k == "step" else s[k]) for k in STEP_FIELDS}
    cols["file"] = sc.step_file
    cols["off"] = s["off"]
    return Ledger(Steps(cols), sc.events, stats.bad_lines + stats.invalid_events, sc, stats)

"""Read a run's ledger for the spike postmortem, fast: a million step events in about a second.

Why not kit.ledger.read_all: it builds a dict per event (seconds for a months-long run). Here the
step events, the bulk of a training ledger, go through pyarrow's JSON reader into columns; the
few other events (spikes, rollbacks, alerts, health, checkpoints) through json. The reader keeps
kit.ledger's tolerance: a torn last line is left out, a garbage line makes this file fall back to
the line-by-line path (counted), unknown kinds pass through.

Two views of the steps: ``timeline`` (every step event in the order written, including steps
later abandoned by a rollback) and ``final`` (for each step the latest event wins, the ledger rule).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kit.ledger import LEDGER_DIR, SUFFIX

STEP_FIELDS = {"t": "float64", "step": "int64", "loss": "float64", "grad_norm": "float64"}
"""Columns read for every step; any other field of a step is read on demand (:meth:`Ledger.detail`)."""
_STEP_MARK = b'"kind":"step"'
# json.dumps(allow_nan=True) writes these; pyarrow's reader does not accept them: read them as null.
_NONFINITE = (b":NaN", b":Infinity", b":-Infinity")


@dataclass
class Steps:
    """Columns of step events (numpy arrays of equal length), oldest first. ``file`` and ``line``
    say where each event is, for :meth:`Ledger.detail`."""

    cols: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.cols["step"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.cols[key]

    def take(self, idx: np.ndarray) -> Steps:
        return Steps({k: v[idx] for k, v in self.cols.items()})

    def final(self) -> Steps:
        """One row per step, the latest event winning, sorted by step."""
        step = self.cols["step"]
        if len(step) == 0:
            return self
        rev = step[::-1]
        _, first_in_rev = np.unique(rev, return_index=True)
        return self.take(len(step) - 1 - first_in_rev)

    def around(self, lo: int, hi: int) -> Steps:
        s = self.cols["step"]
        return self.take(np.flatnonzero((s >= lo) & (s <= hi)))


@dataclass
class Ledger:
    timeline: Steps
    events: list[dict[str, Any]]  # every non-step event, sorted by time
    bad_lines: int = 0
    files: list[str] = field(default_factory=list)
    raw: list[tuple[bytes, np.ndarray]] = field(default_factory=list)  # per file: bytes, line end offsets

    def kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") in kinds]

    def detail(self, rows: Steps) -> list[dict[str, Any]]:
        """The full step events of some rows (consumed, samples, lr, throughput...)."""
        out = []
        for f, ln in zip(rows["file"], rows["line"], strict=True):
            data, ends = self.raw[int(f)]
            start = int(ends[ln - 1]) + 1 if ln > 0 else 0
            try:
                e = json.loads(data[start:int(ends[ln])])
            except ValueError:
                e = {}
            out.append(e if isinstance(e, dict) else {})
        return out


def _columns(table: Any) -> dict[str, np.ndarray]:
    out = {}
    for k, t in STEP_FIELDS.items():
        col = table.column(k)
        out[k] = col.fill_null(-1).to_numpy() if t == "int64" else col.to_numpy(zero_copy_only=False).astype(np.float64)
    return out


def _arrow_file(data: bytes, ends: np.ndarray) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Parse a whole file with pyarrow (row i = line i), keep step rows as columns, and json-parse the
    lines of other kinds (found through the newline offsets: no Python loop over a million lines)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    fields = [("kind", pa.string())] + [(k, pa.float64() if t == "float64" else pa.int64())
                                        for k, t in STEP_FIELDS.items()]
    opts = pj.ParseOptions(explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore")
    try:
        table = pj.read_json(io.BytesIO(data), parse_options=opts)
    except pa.ArrowInvalid:
        # Most likely a NaN/Infinity (a healthy ledger has none: rewriting only then saves a pass).
        clean = data
        for token in _NONFINITE:
            clean = clean.replace(token, b":null")
        table = pj.read_json(io.BytesIO(clean), parse_options=opts)
    if len(ends) != table.num_rows:
        raise ValueError("blank lines: rows and lines do not align")
    is_step = pc.equal(table.column("kind"), "step").to_numpy(zero_copy_only=False)
    out = _columns(table.filter(pa.array(is_step)))
    out["line"] = np.flatnonzero(is_step)
    others = []
    for i in np.flatnonzero(~is_step):
        start = int(ends[i - 1]) + 1 if i > 0 else 0
        others.append(json.loads(data[start:int(ends[i])]))
    return out, others


def _python_file(data: bytes) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], int]:
    """The tolerant path: line by line (a garbage line is counted and skipped)."""
    rows: dict[str, list[Any]] = {k: [] for k in [*STEP_FIELDS, "line"]}
    others: list[dict[str, Any]] = []
    bad = 0
    for i, raw in enumerate(data.split(b"\n")[:-1]):
        if not raw.strip():
            continue
        try:
            e = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            bad += 1
            continue
        if not isinstance(e, dict) or not isinstance(e.get("kind"), str):
            bad += 1
        elif e["kind"] != "step":
            others.append(e)
        elif not isinstance(e.get("step"), int):
            bad += 1
        else:
            for k, t in STEP_FIELDS.items():
                v = e.get(k)
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                rows[k].append(v if ok else (-1 if t == "int64" else np.nan))
            rows["line"].append(i)
    cols = {k: np.asarray(v, dtype=STEP_FIELDS.get(k, "int64")) for k, v in rows.items()}
    return cols, others, bad


def read_ledger(run_dir: str | Path) -> Ledger:
    """Every ledger file of a run: step columns and the other events (torn tails left out)."""
    ledger_dir = Path(run_dir) / LEDGER_DIR
    try:
        names = sorted(p.name for p in os.scandir(ledger_dir) if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        names = []
    parts: list[dict[str, np.ndarray]] = []
    events: list[dict[str, Any]] = []
    raw: list[tuple[bytes, np.ndarray]] = []
    bad = 0
    for name in names:
        try:
            data = (ledger_dir / name).read_bytes()
        except OSError:
            continue
        data = data[: data.rfind(b"\n") + 1]  # a torn last line is still being written
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        if _STEP_MARK in data:
            try:
                cols, other = _arrow_file(data, ends)
            except Exception:  # pyarrow raises ArrowInvalid and others on any bad line: go line by line
                cols, other, b = _python_file(data)
                bad += b
        else:
            cols, other, b = _python_file(data)
            bad += b
        cols["file"] = np.full(len(cols["step"]), len(raw), dtype=np.int64)
        parts.append(cols)
        raw.append((data, ends))
        events += other
    keys = [*STEP_FIELDS, "line", "file"]
    cols = {k: np.concatenate([p[k] for p in parts]) if parts else
            np.empty(0, dtype=STEP_FIELDS.get(k, "int64")) for k in keys}
    order = np.argsort(cols["t"], kind="stable")
    events.sort(key=lambda e: e.get("t", 0.0) if isinstance(e.get("t"), (int, float)) else 0.0)
    return Ledger(Steps({k: v[order] for k, v in cols.items()}), events, bad, names, raw)

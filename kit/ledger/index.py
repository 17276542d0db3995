"""The ledger's index: what lets a reader start on a months-long run without parsing gigabytes.

Beside each ledger file ``ledger/<name>.jsonl`` its writer keeps, in ``ledger/.index/``:

- ``<name>.steps``: one fixed-width record per ``step`` event: t, step, the line's offset, and the
  indexed step metrics (schema.STEP_METRICS with ``index``) as float64 (NaN = missing; enums as
  1-based codes, bool as 0/1). A million steps read into numpy columns in milliseconds.
- ``<name>.events``: one 32-byte record per other event: its line's offset and length, kind code,
  t and step (-1 when it has none). Readers parse only the few events they need (chain, checkpoints,
  alerts...) and fetch bulk ones (health, per-rank timings) by time, around a spike, without reading
  the rest.

Each file starts with a 4096-byte header (``KITIDX1`` then JSON: format version, the JSONL offset
the index starts at, the JSONL file's inode, the kind and column names), so the records are
self-describing and a kit that knows more kinds or metrics later starts a new index instead of
misreading an old one.

**The JSONL stays the source of truth.** The writer appends a line, then its record, so an index
lags by at most one record after a crash; a new writer on the file indexes what is missing before
it appends. A reader (:func:`load`) trusts an index only if it agrees with the file: same inode,
covered part no longer than the file, and the first and last records of each kind landing on whole
lines of the right kind. Otherwise, and for the part of a file before an index starts (a run begun
by an older kit) or after it ends (the record not yet written), it parses lines (:func:`build`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from kit.ledger.reader import Event, ReadStats, parse_line
from kit.ledger.schema import BULK_KINDS, KIND_CODES, METRICS, STEP_METRICS

INDEX_DIR = ".index"
MAGIC = b"KITIDX1\n"
HEADER = 4096
FORMAT = 1
EVENT_DTYPE = np.dtype([("off", "<u8"), ("len", "<u4"), ("kind", "<u2"), ("pad", "<u2"), ("t", "<f8"),
                        ("step", "<i8")])
COLUMNS: tuple[str, ...] = ("t", "step", "off", *(m.name for m in STEP_METRICS if m.name not in ("samples", "tokens")))
STEP_DTYPE = np.dtype([(c, "<f8") for c in COLUMNS])
_CODES = {k: i for i, k in enumerate(KIND_CODES)}
_STEP_CODE = _CODES["step"]
JUNK = 0xFFFE  # an events record for a line that is not an event (a dead writer's torn line): counted
_CHOICES = {m.name: {c: i + 1 for i, c in enumerate(m.choices)} for m in STEP_METRICS if m.type == "enum"}
NAN = float("nan")


def index_paths(ledger_dir: Path, name: str) -> tuple[Path, Path]:
    stem = name[:-len(".jsonl")] if name.endswith(".jsonl") else name
    d = ledger_dir / INDEX_DIR
    return d / f"{stem}.steps", d / f"{stem}.events"


def header(start: int, inode: int, kind: str) -> bytes:
    meta = {"format": FORMAT, "file": kind, "start": start, "inode": inode, "kinds": list(KIND_CODES),
            "columns": list(COLUMNS)}
    body = MAGIC + json.dumps(meta).encode()
    if len(body) >= HEADER - 1:
        raise ValueError("ledger index header overflow: too many kinds for the fixed header")
    return body + b" " * (HEADER - 1 - len(body)) + b"\n"


def read_header(f: IO[bytes]) -> dict[str, Any] | None:
    f.seek(0)
    raw = f.read(HEADER)
    if len(raw) < HEADER or not raw.startswith(MAGIC):
        return None
    try:
        meta = json.loads(raw[len(MAGIC):].strip())
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _num(v: Any) -> float:
    if type(v) is float or type(v) is int:
        return float(v)
    if type(v) is bool:
        return 1.0 if v else 0.0
    return NAN


def step_record(e: Event, off: int) -> tuple[float, ...]:
    """The index row of a step event (the reader's coerced event, or the writer's own)."""
    row = [float(e["t"]), float(e["step"]), float(off)]
    for c in COLUMNS[3:]:
        v = e.get(c)
        if c in _CHOICES:
            row.append(float(_CHOICES[c].get(v, 0)) if isinstance(v, str) else 0.0)
        elif c == "nonfinite":
            row.append(NAN if v is None else (1.0 if v else 0.0))
        else:
            row.append(_num(v) if v is not None else NAN)
    return tuple(row)


def event_record(e: Event, off: int, length: int) -> tuple[int, int, int, int, float, int]:
    step = e.get("step")
    return (off, length, _CODES.get(e["kind"], 0xFFFF), 0, float(e["t"]),
            step if type(step) is int else -1)


def kind_of(code: int, kinds: list[str]) -> str:
    return kinds[code] if code < len(kinds) else ""


# ------------------------------------------------------------------------------------- reading


@dataclass
class FileIndex:
    """One ledger file's index: JSONL bytes [start, end) are covered by ``steps`` and ``events``."""

    name: str
    start: int
    end: int
    steps: np.ndarray  # STEP_DTYPE records
    events: np.ndarray  # EVENT_DTYPE records
    kinds: list[str] = field(default_factory=lambda: list(KIND_CODES))

    def kind_codes(self, kinds: Iterable[str]) -> np.ndarray:
        return np.array([i for i, k in enumerate(self.kinds) if k in set(kinds)], dtype=np.uint16)


def _records(path: Path, dtype: np.dtype, inode: int) -> tuple[dict[str, Any], np.ndarray] | None:
    try:
        with open(path, "rb") as f:
            meta = read_header(f)
            if meta is None or meta.get("format") != FORMAT or meta.get("inode") != inode:
                return None
            if meta.get("kinds") != list(KIND_CODES)[:len(meta.get("kinds") or [])]:
                return None  # written by a kit whose kind codes differ from ours
            if dtype is STEP_DTYPE and meta.get("columns") != list(COLUMNS):
                return None
            n = (os.fstat(f.fileno()).st_size - HEADER) // dtype.itemsize  # a torn last record is ignored
            f.seek(HEADER)
            recs = np.fromfile(f, dtype=dtype, count=max(0, n))  # straight into the array: no bytes copy
    except (OSError, ValueError):
        return None
    return meta, recs


def load(ledger_dir: Path, name: str, jsonl: IO[bytes], size: int, inode: int) -> FileIndex | None:
    """The writer's index of one file, if it agrees with the file (else None: parse instead)."""
    sp, ep = index_paths(ledger_dir, name)
    a, b = _records(sp, STEP_DTYPE, inode), _records(ep, EVENT_DTYPE, inode)
    if a is None or b is None or a[0].get("start") != b[0].get("start"):
        return None
    start = int(a[0]["start"])
    steps, events = a[1], b[1]
    ends = [start]
    if len(steps):
        ends.append(int(steps["off"][-1]) + _line_len(jsonl, int(steps["off"][-1]), size))
    if len(events):
        ends.append(int(events["off"][-1] + events["len"][-1]))
    end = max(ends)
    if end > size or start > size:
        return None
    for off, length, kind in _probes(steps, events, jsonl, size, list(a[0]["kinds"])):
        if not _agrees(jsonl, off, length, kind, start):
            return None
    return FileIndex(name, start, end, steps, events, list(a[0]["kinds"]))


def _line_len(f: IO[bytes], off: int, size: int) -> int:
    if off >= size:
        return 1 << 62  # the index points past the end of the file (truncated): it disagrees
    f.seek(off)
    buf = f.read(min(size - off, 1 << 20))
    n = buf.find(b"\n")
    return n + 1 if n >= 0 else 1 << 62  # no newline: the index points past a whole line


def _probes(steps: np.ndarray, events: np.ndarray, f: IO[bytes], size: int,
            kinds: list[str]) -> list[tuple[int, int, str]]:
    out = []
    for i in _spread(len(steps)):
        off = int(steps["off"][i])
        out.append((off, _line_len(f, off, size), "step"))
    real = events[events["kind"] != JUNK]
    for i in _spread(len(real)):
        out.append((int(real["off"][i]), int(real["len"][i]), kind_of(int(real["kind"][i]), kinds)))
    return out


def _spread(n: int, k: int = 9) -> list[int]:
    """``k`` record positions spread over ``n`` (first and last included): cheap spot checks."""
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if n else []


def _agrees(f: IO[bytes], off: int, length: int, kind: str, start: int) -> bool:
    if length <= 1 or length > (1 << 20):
        return False
    f.seek(max(0, off - 1))
    raw = f.read(length + (1 if off else 0))
    if off:
        if raw[:1] != b"\n":
            return False
        raw = raw[1:]
    return raw.endswith(b"\n") and raw.startswith(b"{") and (not kind or f'"kind":"{kind}"'.encode() in raw)


# ----------------------------------------------------------------------------------- building


@dataclass
class Built:
    """What :func:`build` found in a byte range of a file."""

    steps: list[tuple[float, ...]] = field(default_factory=list)
    events: list[tuple[int, int, int, int, float, int]] = field(default_factory=list)
    parsed: list[Event] = field(default_factory=list)  # the non-bulk events (and the last bulk of each kind)
    last_bulk: dict[str, Event] = field(default_factory=dict)
    end: int = 0  # offset after the last complete line


def build(f: IO[bytes], start: int, end: int, stats: ReadStats, keep: bool = True) -> Built:
    """Parse lines of [start, end) (``start`` at a line start) into index rows and events; the last
    incomplete line is left out. ``keep``: also return the parsed non-bulk events."""
    out = Built(end=start)
    f.seek(start)
    pos = start
    while pos < end:
        chunk = f.read(min(8 << 20, end - pos))
        if not chunk:
            break
        last_nl = chunk.rfind(b"\n")
        if last_nl < 0:
            if len(chunk) < end - pos:  # one line longer than the chunk: skip it as junk
                stats.bad_lines += 1
                nl = f.read(end - pos - len(chunk)).find(b"\n")
                if nl < 0:
                    break
                pos += len(chunk) + nl + 1
                f.seek(pos)
                continue
            break
        body = chunk[: last_nl + 1]
        i = 0
        while i < len(body):
            j = body.index(b"\n", i)
            before = stats.bad_lines
            e = parse_line(body[i:j], stats)
            if e is None and stats.bad_lines > before:
                out.events.append((pos + i, j - i + 1, JUNK, 0, NAN, -1))
            if e is not None:
                off = pos + i
                if e["kind"] == "step":
                    out.steps.append(step_record(e, off))
                    out.last_bulk["step"] = e
                else:
                    out.events.append(event_record(e, off, j - i + 1))
                    if e["kind"] in BULK_KINDS:
                        out.last_bulk[e["kind"]] = e
                    elif keep:
                        out.parsed.append(e)
            i = j + 1
        pos += len(body)
        out.end = pos
        f.seek(pos)
    return out


def steps_array(rows: list[tuple[float, ...]]) -> np.ndarray:
    if not rows:
        return np.zeros(0, dtype=STEP_DTYPE)
    return np.array(rows, dtype=np.float64).view(STEP_DTYPE).reshape(-1)


def events_array(rows: list[tuple[int, int, int, int, float, int]]) -> np.ndarray:
    return np.array(rows, dtype=EVENT_DTYPE) if rows else np.zeros(0, dtype=EVENT_DTYPE)


def decode_enum(name: str, code: float) -> str | None:
    """A step metric's enum code back to its text (None for 0/NaN)."""
    m = METRICS[name]
    i = int(code) - 1 if code == code else -1
    return m.choices[i] if 0 <= i < len(m.choices) else None


def read_line(f: IO[bytes], off: int, length: int = 0) -> bytes:
    """One line by offset (with its newline stripped)."""
    f.seek(off)
    raw = f.read(length) if length else f.readline(1 << 20)
    return raw.rstrip(b"\n")


def pread_events(path: Path, recs: np.ndarray, stats: ReadStats) -> list[Event]:
    """Parse the lines ``recs`` (EVENT_DTYPE records) point to."""
    out: list[Event] = []
    if not len(recs):
        return out
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:  # gone since it was indexed, or unreadable: what it held is left out, counted
        stats.unreadable += 1
        stats.last_error = f"{path.name}: {err.strerror}"
        return out
    try:
        for off, length in zip(recs["off"].tolist(), recs["len"].tolist(), strict=True):
            e = parse_line(os.pread(fd, length, off).rstrip(b"\n"), stats)
            if e is not None:
                out.append(e)
    except OSError as err:
        stats.unreadable += 1
        stats.last_error = f"{path.name}: {err.strerror}"
    finally:
        os.close(fd)
    return out

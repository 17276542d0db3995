"""Following a run's ledger files: fast cold start, bounded chunks, live tail, replay.

Why not just ``kit.ledger.LedgerReader.poll()``: it reads everything new in one go, which on a run of
a million steps (hundreds of MB of JSON) costs seconds and memory proportional to the file. The
monitor needs a first frame in well under a second and flat memory, so it reads in three ways, all
with LedgerReader's tolerance (torn last lines, files that appear, vanish or shrink, junk lines,
unknown kinds, future versions — counted in a :class:`kit.ledger.ReadStats`, never raised):

1. Cold start (:func:`cold_start`): the tail of every file (the recent steps, the latest health
   sample of each node, the recent alerts and checkpoints) plus evenly spaced probes through the
   large files (a downsampled whole-run curve). That is the first frame.
2. Backfill: a :class:`Follower` from offset 0 in chunks of ``CHUNK`` bytes folds the whole history
   into a fresh model; when it has caught up it replaces the cold-start model.
3. Live: the same :class:`Follower` then picks up whatever is appended, a few times a second.
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kit.ledger import EVENTS, MAX_LINE, SCHEMA_VERSION, SUFFIX, ReadStats

CHUNK = 4 << 20  # bytes per poll, all files together: bounds the memory of reading a long history
SMALL = 256 << 10  # files up to this size are read whole at cold start
TAIL = 16 << 10  # tail of every large file at cold start (a few health samples, the recent alerts)
STEP_TAIL = 512 << 10  # ...and of a large file whose tail holds step events (the last ~1,500 steps)
PROBES = 600  # evenly spaced probes through a large file for the whole-run curve (one per column)
STEP_MARK = b'"kind":"step"'


def parse_line(raw: bytes, stats: ReadStats) -> dict[str, Any] | None:
    """One ledger line to an event, or None (counted) for junk; the same rules as LedgerReader."""
    if not raw.strip():
        return None
    if len(raw) > MAX_LINE:
        stats.bad_lines += 1
        return None
    try:
        event = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        stats.bad_lines += 1
        return None
    if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
        stats.bad_lines += 1
        return None
    v = event.get("v")
    if not isinstance(v, int) or v > SCHEMA_VERSION:
        stats.future_version += 1
    if event["kind"] not in EVENTS:
        stats.unknown_kinds += 1
    stats.events += 1
    return event


@dataclass(slots=True)
class Cursor:
    offset: int = 0
    inode: int = 0
    partial: bytes = b""


@dataclass
class Follower:
    """Incremental, chunked reader of every ``*.jsonl`` file under a ledger directory."""

    ledger_dir: Path
    stats: ReadStats = field(default_factory=ReadStats)
    cursors: dict[str, Cursor] = field(default_factory=dict)

    def files(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.ledger_dir) if e.name.endswith(SUFFIX))
        except FileNotFoundError:
            return []
        except OSError as e:
            self.stats.last_error = f"{self.ledger_dir}: {e.strerror}"
            return []

    def poll(self, budget: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """New complete events (each file in order), and whether some file has more to read.

        At most ``budget`` bytes are read in all (files in name order; the rest waits for the next
        poll), so reading a long history never holds more than one chunk of events in memory.
        """
        left = budget or CHUNK
        names = self.files()
        for gone in set(self.cursors) - set(names):
            self.stats.vanished_files += 1
            del self.cursors[gone]
        self.stats.files = len(names)
        out: list[dict[str, Any]] = []
        more = False
        for name in names:
            if left <= 0:
                return out, True
            read, rest = self._read(name, left, out)
            left -= read
            more |= rest
        return out, more

    def _read(self, name: str, budget: int, out: list[dict[str, Any]]) -> tuple[int, bool]:
        """Read up to ``budget`` bytes of one file into ``out``: (bytes read, more left in the file)."""
        path = self.ledger_dir / name
        cur = self.cursors.setdefault(name, Cursor())
        try:
            st = os.stat(path)
            if st.st_ino == cur.inode and st.st_size == cur.offset:
                return 0, False  # the common case on a quiet run: one stat per file, nothing opened
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != cur.inode or st.st_size < cur.offset:
                    if cur.inode:
                        self.stats.truncated_files += 1  # rotated or truncated: read it again
                    cur.offset, cur.partial, cur.inode = 0, b"", st.st_ino
                f.seek(cur.offset)
                data = f.read(min(budget, st.st_size - cur.offset))
        except FileNotFoundError:
            if self.cursors.pop(name, None) is not None:
                self.stats.vanished_files += 1
            return 0, False
        except OSError as e:
            self.stats.last_error = f"{name}: {e.strerror}"
            return 0, False
        cur.offset += len(data)
        lines = (cur.partial + data).split(b"\n")
        cur.partial = lines.pop()
        if len(cur.partial) > MAX_LINE:
            self.stats.bad_lines += 1
            cur.partial = b""
        for raw in lines:
            ev = parse_line(raw, self.stats)
            if ev is not None:
                out.append(ev)
        return len(data), cur.offset < st.st_size


@dataclass
class ColdStart:
    events: list[dict[str, Any]]  # probes first (oldest first), then the tails, sorted by time
    cursors: dict[str, Cursor]  # where live following of the cold-start model begins
    partial: bool  # True when some file was only sampled: a backfill must follow


def cold_start(ledger_dir: Path, stats: ReadStats, probes: int = PROBES) -> ColdStart:
    """The first frame's events: small files whole, large ones by probes and tail."""
    sampled: list[dict[str, Any]] = []
    tails: list[dict[str, Any]] = []
    cursors: dict[str, Cursor] = {}
    partial = False
    follower = Follower(ledger_dir, stats)
    for name in follower.files():
        path = ledger_dir / name
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size <= SMALL:
                    data = f.read(st.st_size)
                    start = 0
                else:
                    partial = True
                    data, start = _tail(f, st.st_size, TAIL)
                    if STEP_MARK in data:
                        data, start = _tail(f, st.st_size, STEP_TAIL)
                        sampled.extend(_probe(f, start, probes))
        except FileNotFoundError:
            stats.vanished_files += 1
            continue
        except OSError as e:
            stats.last_error = f"{name}: {e.strerror}"
            continue
        end = data.rfind(b"\n") + 1  # a torn last line is read again, whole, by the live follower
        for raw in data[:end].split(b"\n"):
            ev = parse_line(raw, stats)
            if ev is not None:
                tails.append(ev)
        cursors[name] = Cursor(start + end, st.st_ino)
    tails.sort(key=_t)
    return ColdStart(sampled + tails, cursors, partial)


def _tail(f: IO[bytes], size: int, n: int) -> tuple[bytes, int]:
    start = max(0, size - n)
    f.seek(start)
    data = f.read(size - start)
    if start:
        cut = data.find(b"\n") + 1  # drop the line the tail starts inside
        data, start = data[cut:], start + cut
    return data, start


def _probe(f: IO[bytes], end: int, n: int) -> list[dict[str, Any]]:
    """Step events at ``n`` evenly spaced offsets before ``end``: a whole-run curve in milliseconds."""
    junk = ReadStats()  # probes land on lines the backfill will count properly: do not count twice
    out: list[dict[str, Any]] = []
    for i in range(n):
        f.seek(i * end // n)
        buf = f.read(8192)
        lines = buf.split(b"\n")[1:-1] if i else buf.split(b"\n")[:-1]
        for raw in lines[:4]:
            if STEP_MARK in raw:
                e = parse_line(raw, junk)
                if e is not None and e.get("kind") == "step":
                    out.append(e)
                    break
    return out


def _t(e: dict[str, Any]) -> float:
    t = e.get("t")
    return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 0.0


def merged_events(ledger_dir: Path, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Every event of a finished run in time order, one line of each file in memory at a time (replay)."""

    def one(name: str) -> Iterator[tuple[float, int, dict[str, Any]]]:
        try:
            with open(ledger_dir / name, "rb") as f:
                for n, raw in enumerate(f):
                    e = parse_line(raw.rstrip(b"\n"), stats)
                    if e is not None:
                        yield _t(e), n, e
        except OSError as err:
            stats.last_error = f"{name}: {err.strerror}"

    for _, _, e in heapq.merge(*(one(n) for n in Follower(ledger_dir, stats).files()), key=lambda x: (x[0], x[1])):
        yield e

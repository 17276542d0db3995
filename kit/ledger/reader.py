"""The one ledger reader: a line becomes an event (or is counted as junk) here and nowhere else.

Every tool reads the run through this module (the monitor, ``kit status``, the chain's driver,
``kit stream``, the postmortem, the goodput account), so they all see the same events:

- :func:`parse_line` parses, validates and coerces one line by kit.ledger.schema. What a reader
  hands out has every required field of its kind with its declared type; optional fields are absent
  or of their type. A value of the wrong type, size or finiteness becomes missing and is counted
  (``ReadStats.coerced``); an event missing a required field, garbage, a torn line, a line over
  ``MAX_LINE`` or nested too deep is dropped and counted. Nothing raises. Unknown kinds (a newer kit)
  pass through with their envelope checked; events of a future version are counted.
- :class:`Follower` reads every file of a ledger incrementally and in bounded chunks (live
  following, backfills), tolerating what live files on shared filesystems do: torn last lines (kept
  until completed), files that appear, vanish, shrink or are replaced (read again from the start).
- :func:`tail` reads only the end of each file (recent events of a months-long run, cheaply);
  :func:`read_all` everything; :func:`merged` everything in time order, one line at a time (replay).
"""

from __future__ import annotations

import heapq
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kit.ledger.schema import KINDS, MAX_DEPTH, MAX_STR, SCHEMA_VERSION, EventSpec

LEDGER_DIR = "ledger"
SUFFIX = ".jsonl"
MAX_LINE = 1 << 20  # a "line" longer than 1 MiB is garbage, not an event
CHUNK = 4 << 20  # bytes per Follower.poll, all files together
INT64 = 1 << 63

Event = dict[str, Any]


@dataclass(slots=True)
class ReadStats:
    """What a reader skipped or repaired, so the monitor can say it instead of hiding it."""

    events: int = 0
    bad_lines: int = 0  # not JSON, not an object, torn, too long, too deep
    invalid_events: int = 0  # a known kind without a usable required field: dropped
    coerced: int = 0  # fields of the wrong type, size or finiteness: made missing
    unknown_kinds: int = 0
    future_version: int = 0
    files: int = 0
    vanished_files: int = 0
    truncated_files: int = 0
    torn_tail: int = 0  # files whose last line is incomplete right now (being written, or a dead writer's)
    unreadable: int = 0  # files (or parts) that could not be read (permissions, I/O errors): the answer lacks them
    last_error: str = ""

    def add(self, other: ReadStats) -> None:
        for name in ("events", "bad_lines", "invalid_events", "coerced", "unknown_kinds", "future_version",
                     "vanished_files", "truncated_files", "unreadable"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.last_error = other.last_error or self.last_error


# ------------------------------------------------------------------------------------ field checks

_MISSING = object()


def _depth_ok(v: Any, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return False
    if isinstance(v, dict):
        return all(_depth_ok(x, depth + 1) for x in v.values())
    if isinstance(v, list):
        return all(_depth_ok(x, depth + 1) for x in v)
    if isinstance(v, str):
        return len(v) <= MAX_STR
    if isinstance(v, int) and not isinstance(v, bool):
        return -INT64 <= v < INT64
    return True


def _int(v: Any) -> Any:
    if type(v) is int:
        return v if -INT64 <= v < INT64 else _MISSING
    if type(v) is float and v.is_integer() and abs(v) < 2**53:
        return int(v)
    return _MISSING


def _float(v: Any) -> Any:
    if type(v) is float:
        return v if v - v == 0 else _MISSING  # False for inf and nan
    if type(v) is int:
        return float(v) if -INT64 <= v < INT64 else _MISSING
    return _MISSING


def _float_nonfinite(v: Any) -> Any:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v) if -INT64 <= v < INT64 else _MISSING
    return _MISSING


def _str(v: Any) -> Any:
    return v if type(v) is str and len(v) <= MAX_STR else _MISSING


def _bool(v: Any) -> Any:
    return v if type(v) is bool else _MISSING


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        if type(v) is not list or len(v) > 100_000:
            return _MISSING
        out = [item(x) for x in v]
        return _MISSING if any(x is _MISSING for x in out) else out

    return check


def _container(tp: type) -> Callable[[Any], Any]:
    def check(v: Any) -> Any:
        return v if type(v) is tp and _depth_ok(v) else _MISSING

    return check


def _json(v: Any) -> Any:
    return v if _depth_ok(v) else _MISSING


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "int": _int, "float": _float, "str": _str, "bool": _bool, "strs": _list_of(_str), "ints": _list_of(_int),
    "floats": _list_of(_float), "list": _container(list), "dict": _container(dict), "json": _json,
}


_NESTED = {"list": list, "dict": dict, "json": object}  # checked by _depth_ok unless the line is shallow


def _compile(spec: EventSpec) -> tuple[tuple[str, Callable[[Any], Any], bool, type | None], ...]:
    return tuple((f.name, _float_nonfinite if f.type == "float" and f.nonfinite else _CHECKS[f.type], f.required,
                  _NESTED.get(f.type)) for f in spec.fields)


_COMPILED = {kind: _compile(spec) for kind, spec in KINDS.items()}

_NOT_SHAPE = bytes(b for b in range(256) if b not in b'[]{}"\\')
_QUOTED = re.compile(rb'"[^"]*"')
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def shallow(raw: bytes) -> bool:
    """True when nothing nested in this line can fail :func:`_depth_ok`, judged from its bytes: no string
    longer than MAX_STR (the line is not), no integer of 19 digits or more, brackets at most MAX_DEPTH + 1
    deep (the event object is one level) outside strings. Conservative (False sends the event through
    the exact check); it saves walking every value of a health sample's GPUs in Python."""
    if len(raw) > MAX_STR or _LONG_DIGITS.search(raw):
        return False
    shape = raw.translate(None, _NOT_SHAPE)
    if b"\\" in shape:
        return False  # an escaped quote: strings cannot be told apart by their quotes alone
    shape = _QUOTED.sub(b"", shape)
    if shape.count(b"[") + shape.count(b"{") <= MAX_DEPTH + 1:
        return True
    depth = deepest = 0
    for c in shape:
        depth += 1 if c in (91, 123) else -1  # [ {
        deepest = max(deepest, depth)
    return deepest <= MAX_DEPTH + 1


def coerce(event: dict[str, Any], stats: ReadStats, raw: bytes | None = None) -> Event | None:
    """Check a decoded event against the schema, in place; None (counted) when it is unusable. ``raw``:
    the line it was decoded from, when there is one (nested fields are then checked from its bytes
    when they can be, see :func:`shallow`)."""
    t = event.get("t")
    kind = event.get("kind")
    if type(kind) is not str or len(kind) > 64:
        stats.bad_lines += 1
        return None
    t = _float(t)
    if t is _MISSING:
        stats.invalid_events += 1
        return None
    event["t"] = t
    v = event.get("v")
    if type(v) is not int or v > SCHEMA_VERSION:
        stats.future_version += 1
    for name in ("src", "seg"):
        if name in event and _str(event[name]) is _MISSING:
            del event[name]
            stats.coerced += 1
    checks = _COMPILED.get(kind)
    flat: bool | None = None  # whether the line is shallow: judged once, when a nested field asks
    if checks is None:
        stats.unknown_kinds += 1
        if raw is None or not shallow(raw):
            for k in [k for k, x in event.items() if not _depth_ok(x)]:
                del event[k]
                stats.coerced += 1
        stats.events += 1
        return event
    for name, check, required, nested in checks:
        value = event.get(name, _MISSING)
        if value is _MISSING:
            if required:
                stats.invalid_events += 1
                return None
            continue
        if value is None:
            del event[name]
            if required:
                stats.invalid_events += 1
                return None
            continue
        if nested is not None and flat is None:
            flat = raw is not None and shallow(raw)
        if nested is not None and flat:  # the line's bytes vouch for what is nested: the type is enough
            val = value if nested is object or type(value) is nested else _MISSING
        else:
            val = check(value)
        if val is _MISSING:
            del event[name]
            stats.coerced += 1
            if required:
                stats.invalid_events += 1
                return None
        elif val is not value:
            event[name] = val
    stats.events += 1
    return event


def nonconforming(event: dict[str, Any]) -> list[str]:
    """Fields of a writer's event (known kind) that the reader would make missing: a writer's bug."""
    checks = _COMPILED.get(event["kind"], ())
    bad = []
    for name, check, _, _ in checks:
        v = event.get(name)
        if v is not None and check(_plain(v)) is _MISSING:
            bad.append(name)
    return bad


def _plain(v: Any) -> Any:
    """numpy/torch scalars as the JSON writer will write them."""
    return v.item() if hasattr(v, "item") and not isinstance(v, list | dict | str) else v


def parse_line(raw: bytes, stats: ReadStats) -> Event | None:
    """One ledger line (without its newline) to an event, or None (counted) for junk."""
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
    if type(event) is not dict:
        stats.bad_lines += 1
        return None
    return coerce(event, stats, raw)


def event_time(e: Event) -> float:
    """``t`` of an event the reader handed out (always a finite float)."""
    return float(e["t"])


# ------------------------------------------------------------------------------------------ files


def ledger_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEDGER_DIR


def ledger_files(ldir: Path, stats: ReadStats | None = None) -> list[str]:
    """Names of the ledger files (sorted); [] when the folder is missing or unreadable."""
    try:
        return sorted(e.name for e in os.scandir(ldir) if e.name.endswith(SUFFIX) and e.is_file())
    except FileNotFoundError:
        return []
    except OSError as e:
        if stats is not None:
            stats.unreadable += 1
            stats.last_error = f"{ldir}: {e.strerror}"
        return []


@dataclass(slots=True)
class Cursor:
    offset: int = 0
    inode: int = 0
    partial: bytes = b""


@dataclass
class Follower:
    """Incremental, chunked reader of every ``*.jsonl`` file of a ledger directory.

    ``poll()`` returns the events completed since the last call (each file in order, files in name
    order) and whether more is waiting; ``poll_sorted()`` sorts them by time.
    """

    ledger_dir: Path
    stats: ReadStats = field(default_factory=ReadStats)
    cursors: dict[str, Cursor] = field(default_factory=dict)
    kinds: frozenset[str] | None = None  # only these kinds (others are skipped unparsed where possible)

    def files(self) -> list[str]:
        return ledger_files(self.ledger_dir, self.stats)

    def poll(self, budget: int | None = None) -> tuple[list[Event], bool]:
        left = budget or CHUNK
        names = self.files()
        for gone in set(self.cursors) - set(names):
            self.stats.vanished_files += 1
            del self.cursors[gone]
        self.stats.files = len(names)
        out: list[Event] = []
        more = False
        torn = 0
        for name in names:
            if left <= 0:
                return out, True
            read, rest = self._read(name, left, out)
            left -= read
            more |= rest
            torn += bool(self.cursors.get(name, Cursor()).partial)
        self.stats.torn_tail = torn
        return out, more

    def poll_all(self) -> list[Event]:
        """Everything new, however much (sorted by time)."""
        out: list[Event] = []
        while True:
            events, more = self.poll()
            out += events
            if not more:
                break
        out.sort(key=event_time)
        return out

    def _read(self, name: str, budget: int, out: list[Event]) -> tuple[int, bool]:
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
        except OSError as e:  # retried at the next poll (the first read of the run, a scan, counted it)
            self.stats.last_error = f"{name}: {e.strerror}"
            return 0, False
        cur.offset += len(data)
        lines = (cur.partial + data).split(b"\n")
        cur.partial = lines.pop()
        if len(cur.partial) > MAX_LINE:
            self.stats.bad_lines += 1
            cur.partial = b""
        out.extend(parse_lines(lines, self.stats, self.kinds))
        return len(data), cur.offset < st.st_size


_COMPACT = b'"kind":"'


def parse_lines(lines: Iterable[bytes], stats: ReadStats, kinds: frozenset[str] | None = None) -> Iterator[Event]:
    """Parse complete lines; with ``kinds``, lines that cannot be of those kinds are skipped unparsed
    (a substring test on the raw bytes first: most of a long ledger is step and health lines)."""
    marks = None if kinds is None else tuple(f'"kind":"{k}"'.encode() for k in kinds)
    for raw in lines:
        # The writer writes compact JSON: a line with another compact kind is skipped unparsed; anything
        # else (hand-written, spaced) is parsed and filtered after.
        if marks is not None and _COMPACT in raw and not any(m in raw for m in marks):
            continue
        e = parse_line(raw, stats)
        if e is not None and (kinds is None or e["kind"] in kinds):
            yield e


# ------------------------------------------------------------------------------------ one-shot reads


def read_all(run_dir: str | Path, kinds: set[str] | frozenset[str] | None = None,
             stats: ReadStats | None = None) -> list[Event]:
    """Every complete event of a run, sorted by time (optionally only some kinds)."""
    f = Follower(ledger_dir(run_dir), stats or ReadStats(), kinds=frozenset(kinds) if kinds is not None else None)
    return f.poll_all()


def tail(run_dir: str | Path, kinds: set[str] | frozenset[str] | None = None, max_bytes: int = 1 << 20,
         stats: ReadStats | None = None, names: Iterable[str] | None = None) -> list[Event]:
    """Events from the last ``max_bytes`` of every ledger file (or of ``names``), sorted by time.

    A months-long run's ledger holds millions of step events; the chain and ``kit status`` need only
    the recent ones, so they never read whole files. The line the tail starts inside is skipped, a
    torn last line is left for later."""
    stats = stats or ReadStats()
    ldir = ledger_dir(run_dir)
    want = frozenset(kinds) if kinds is not None else None
    out: list[Event] = []
    for name in names if names is not None else ledger_files(ldir, stats):
        try:
            with open(ldir / name, "rb") as fh:
                data, _ = read_tail(fh, max_bytes)
        except FileNotFoundError:
            continue
        except OSError as e:
            stats.unreadable += 1
            stats.last_error = f"{name}: {e.strerror}"
            continue
        out.extend(parse_lines(data.split(b"\n")[:-1], stats, want))
    out.sort(key=event_time)
    return out


def read_tail(fh: IO[bytes], n: int) -> tuple[bytes, int]:
    """The last ``n`` bytes of a file from the first line that starts in them, up to the last newline;
    and the offset where that data starts."""
    size = fh.seek(0, os.SEEK_END)
    start = max(0, size - n)
    fh.seek(start)
    data = fh.read(size - start)
    if start:
        cut = data.find(b"\n") + 1  # drop the line the tail starts inside
        data, start = (data[cut:], start + cut) if cut else (b"", size)
    end = data.rfind(b"\n") + 1
    return data[:end], start


def merged(run_dir: str | Path, stats: ReadStats | None = None) -> Iterator[Event]:
    """Every event of a run in time order, one line of each file in memory at a time (replay)."""
    stats = stats or ReadStats()
    ldir = ledger_dir(run_dir)

    def one(name: str) -> Iterator[tuple[float, int, Event]]:
        try:
            with open(ldir / name, "rb") as f:
                for n, raw in enumerate(f):
                    if not raw.endswith(b"\n"):
                        break  # a torn last line
                    e = parse_line(raw[:-1], stats)
                    if e is not None:
                        yield event_time(e), n, e
        except OSError as err:
            stats.unreadable += 1
            stats.last_error = f"{name}: {err.strerror}"

    for _, _, e in heapq.merge(*(one(n) for n in ledger_files(ldir, stats)), key=lambda x: (x[0], x[1])):
        yield e


class LedgerReader:
    """Compatibility face of :class:`Follower`: ``poll()`` returns everything new, sorted by time."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self._f = Follower(ledger_dir(self.run_dir))

    @property
    def stats(self) -> ReadStats:
        return self._f.stats

    def poll(self) -> list[Event]:
        return self._f.poll_all()

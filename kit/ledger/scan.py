"""A whole run's ledger at once, fast: step columns, the few events that matter, where the rest are.

:func:`scan` is the cold start of every tool that needs a run's history (the monitor's first frame and
its complete curves, ``kit monitor --once``, the postmortem, the goodput account). Per file it takes
the writer's index where it agrees with the file (kit.ledger.index) and parses lines where it does
not (before an index starts, after it ends, or all of a file without one), so the answer is the same
either way, only the time differs. What it returns:

- ``steps``: one numpy record per step event, all files merged in time order (kit.ledger.index
  COLUMNS: t, step, offset, the indexed metrics), with the file each came from;
- ``events``: every event that is not bulk (chain, segments, checkpoints, alerts, spikes...), parsed
  by the one reader, in time order;
- ``bulk``: the positions (file, offset, length, kind, t, step) of every bulk event (health samples,
  per-rank timings) so callers fetch the ones they need (:meth:`Scan.fetch`), and ``latest`` the last
  one of each bulk kind in each file (a node's current health);
- ``cursors``: where each file was read to, for a Follower to continue live from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from kit.ledger import index as ix
from kit.ledger.reader import Cursor, Event, ReadStats, event_time, ledger_dir, ledger_files, parse_line
from kit.ledger.schema import BULK_KINDS

BULK_DTYPE = np.dtype([("file", "<u4"), *ix.EVENT_DTYPE.descr])


@dataclass
class Scan:
    run_dir: Path
    files: list[str]
    steps: np.ndarray  # ix.STEP_DTYPE records, sorted by t (stable)
    events: list[Event]
    bulk: np.ndarray  # BULK_DTYPE, sorted by t
    latest: dict[tuple[str, str], Event]  # (file, bulk kind) -> its last event
    cursors: dict[str, Cursor]
    stats: ReadStats
    indexed_bytes: int = 0  # how much was taken from indexes...
    parsed_bytes: int = 0  # ...and how much had to be parsed
    kinds: list[str] = field(default_factory=lambda: list(ix.KIND_CODES))
    step_file: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint32))  # file of each step row

    def step_detail(self, rows: np.ndarray) -> list[Event]:
        """The full step events of some ``steps`` rows (every field, parsed from their lines): ``rows``
        are row numbers of ``steps``, or records with ``file`` (a number in ``files``) and ``off``."""
        rows = np.asarray(rows)
        if rows.dtype.names and "file" in rows.dtype.names:
            files, offs = rows["file"].tolist(), rows["off"].tolist()
        else:
            files, offs = self.step_file[rows].tolist(), self.steps["off"][rows].tolist()
        out: list[Event] = []
        handles: dict[int, IO[bytes]] = {}
        try:
            for file_no, off in zip(files, offs, strict=True):
                e = None
                try:
                    f = handles.get(int(file_no))
                    if f is None:  # closed below, with the others
                        path = ledger_dir(self.run_dir) / self.files[int(file_no)]
                        f = handles[int(file_no)] = open(path, "rb")  # noqa: SIM115
                    e = parse_line(ix.read_line(f, int(off)), self.stats)
                except OSError:
                    pass
                out.append(e or {})
        finally:
            for f in handles.values():
                f.close()
        return out

    def fetch(self, kinds: set[str], t0: float = -np.inf, t1: float = np.inf) -> list[Event]:
        """Bulk events of ``kinds`` written between t0 and t1, parsed (in time order)."""
        codes = [i for i, k in enumerate(self.kinds) if k in kinds]
        b = self.bulk
        lo, hi = np.searchsorted(b["t"], t0, "left"), np.searchsorted(b["t"], t1, "right")
        sel = b[lo:hi]
        sel = sel[np.isin(sel["kind"], codes)]
        out: list[Event] = []
        for file_no in np.unique(sel["file"]).tolist():
            recs = sel[sel["file"] == file_no]
            out += ix.pread_events(ledger_dir(self.run_dir) / self.files[file_no], recs, self.stats)
        out.sort(key=event_time)
        return out


@contextmanager
def bulk_read() -> Iterator[None]:
    """A whole-run read's settings: numpy arrays without transparent huge pages, and no cyclic garbage
    collection (both as before afterwards).

    Why: numpy asks for huge pages on every array over 4 MB; on a busy host with the kernel's default
    ``defrag=madvise`` each such page fault may compact memory first. Measured on the benchmark machine
    (load 5, million-step run): a cold read spent 0.3-0.8 s of system time in those faults, 0.1-0.2 s
    without. And parsing thousands of events makes thousands of dicts, none of them cyclic garbage,
    which trigger the collector again and again (~8% of a cold ``--once``). Both switches are
    process-wide: other threads meanwhile get small pages and no collection for a fraction of a second
    (harmless)."""
    import gc

    from numpy._core import multiarray

    switch: Callable[[bool], bool] = getattr(multiarray, "_set_madvise_hugepage", lambda on: on)  # numpy >= 1.20
    huge = switch(False)
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        switch(huge)
        if collecting:
            gc.enable()


def scan(run_dir: str | Path, stats: ReadStats | None = None, use_index: bool = True) -> Scan:
    """Read a run's ledger as described in the module docstring."""
    with bulk_read():
        return _scan(Path(run_dir), stats, use_index)


def _scan(run_dir: Path, stats: ReadStats | None, use_index: bool) -> Scan:
    stats = stats or ReadStats()
    ldir = ledger_dir(run_dir)
    names = ledger_files(ldir, stats)
    stats.files = len(names)
    steps: list[tuple[np.ndarray, int]] = []
    bulk: list[np.ndarray] = []
    events: list[Event] = []
    latest: dict[tuple[str, str], Event] = {}
    cursors: dict[str, Cursor] = {}
    indexed = parsed = 0
    for file_no, name in enumerate(names):
        path = ldir / name
        try:
            f = open(path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            stats.vanished_files += 1
            continue
        except OSError as err:
            stats.unreadable += 1
            stats.last_error = f"{name}: {err.strerror}"
            continue
        try:
            with f:
                got = _read_file(f, ldir, name, use_index, stats)
        except OSError as err:  # an I/O error mid-file (a dead mount, a bad disk): this file is left out, said
            stats.unreadable += 1
            stats.last_error = f"{name}: {err.strerror}"
            continue
        events += got.events
        latest.update(got.latest)
        indexed += got.indexed
        parsed += got.parsed
        cursors[name] = got.cursor
        for s_arr, e_arr in got.parts:
            if len(s_arr):
                steps.append((s_arr, file_no))
            if len(e_arr):
                b = e_arr[np.isin(e_arr["kind"], _bulk_codes(list(ix.KIND_CODES)))]
                if len(b):
                    bulk.append(_with_file(b, file_no, ix.EVENT_DTYPE))
    all_steps, step_file = _steps_by_time(steps)
    all_bulk = _by_time(bulk, BULK_DTYPE)
    events.sort(key=event_time)
    return Scan(run_dir, names, all_steps, events, all_bulk, latest, cursors, stats, indexed, parsed,
                step_file=step_file)


@dataclass
class _File:
    """What one ledger file gave a scan."""

    parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (step records, event records)
    events: list[Event] = field(default_factory=list)
    latest: dict[tuple[str, str], Event] = field(default_factory=dict)
    cursor: Cursor = field(default_factory=Cursor)
    indexed: int = 0
    parsed: int = 0


def _read_file(f: IO[bytes], ldir: Path, name: str, use_index: bool, stats: ReadStats) -> _File:
    """One file: through its index where it agrees with the file, parsing the rest (raises OSError)."""
    out = _File()
    st = os.fstat(f.fileno())
    idx = ix.load(ldir, name, f, st.st_size, st.st_ino) if use_index else None
    if idx is not None:
        head = ix.build(f, 0, idx.start, stats) if idx.start else None
        tail = ix.build(f, idx.end, st.st_size, stats)
        if head is not None:
            _take(head, out.parts, out.events, out.latest, name)
            out.parsed += idx.start
        out.parts.append((idx.steps, idx.events))
        junk = idx.events["kind"] == ix.JUNK
        wanted = idx.events[~np.isin(idx.events["kind"], _bulk_codes(idx.kinds)) & ~junk]
        out.events += ix.pread_events(ldir / name, wanted, stats)
        stats.events += len(idx.steps) + len(idx.events) - len(wanted) - int(junk.sum())
        stats.bad_lines += int(junk.sum())
        out.indexed += idx.end - idx.start
        _latest_from_index(f, idx, out.latest, name, ReadStats())  # counted above already
        _take(tail, out.parts, out.events, out.latest, name)
        out.parsed += tail.end - idx.end
        end = tail.end
    else:
        whole = ix.build(f, 0, st.st_size, stats)
        _take(whole, out.parts, out.events, out.latest, name)
        out.parsed += whole.end
        end = whole.end
    out.cursor = Cursor(end, st.st_ino)
    stats.torn_tail += end < st.st_size  # a last line still being written, or a dead writer's
    return out


def _bulk_codes(kinds: list[str]) -> list[int]:
    return [i for i, k in enumerate(kinds) if k in BULK_KINDS and k != "step"]


def _take(b: ix.Built, parts: list[tuple[np.ndarray, np.ndarray]], events: list[Event],
          latest: dict[tuple[str, str], Event], name: str) -> None:
    parts.append((ix.steps_array(b.steps), ix.events_array(b.events)))
    events += b.parsed
    for kind, e in b.last_bulk.items():
        latest[(name, kind)] = e


def _latest_from_index(f: IO[bytes], idx: ix.FileIndex, latest: dict[tuple[str, str], Event], name: str,
                       stats: ReadStats) -> None:
    """The last event of each bulk kind among the indexed records (a node's current health)."""
    ev = idx.events
    for code in _bulk_codes(idx.kinds):
        where = np.flatnonzero(ev["kind"] == code)
        if len(where):
            r = ev[where[-1]]
            e = parse_line(ix.read_line(f, int(r["off"]), int(r["len"])), stats)
            if e is not None:
                latest[(name, idx.kinds[code])] = e
    if len(idx.steps):
        e = parse_line(ix.read_line(f, int(idx.steps["off"][-1])), stats)
        if e is not None:
            latest[(name, "step")] = e


def _with_file_dtype(dt: np.dtype) -> np.dtype:
    return np.dtype([("file", "<u4"), *dt.descr])


def _with_file(a: np.ndarray, file_no: int, dt: np.dtype) -> np.ndarray:
    """``a``'s records with their file number in front: one strided copy of whole records (a copy per
    field walks a million 100-byte records thirteen times)."""
    out = np.empty(len(a), dtype=_with_file_dtype(dt))
    whole = np.dtype({"names": ["file", "rec"], "formats": ["<u4", f"V{dt.itemsize}"], "offsets": [0, 4],
                      "itemsize": out.itemsize})
    view = out.view(whole)
    view["rec"] = np.ascontiguousarray(a).view(f"V{dt.itemsize}")
    view["file"] = file_no
    return out


def _by_time(parts: list[np.ndarray], dt: np.dtype) -> np.ndarray:
    """Parts (in file order) concatenated and sorted by time, stable; the sort (a gather of every
    record) is skipped when the concatenation is in order already."""
    if not parts:
        return np.zeros(0, dtype=dt)
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    t = out["t"]
    if len(t) > 1 and not bool(np.all(t[1:] >= t[:-1])):
        out = out[np.argsort(t, kind="stable")]
    return out


def _steps_by_time(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Step records of every file, sorted by time (stable; files by their first step's time), and each
    row's file number.
    A run's steps are one file's (rank 0 writes them), already in time order: its records are taken as
    read, no copy (a million 120-byte records)."""
    if not parts:
        return np.zeros(0, dtype=ix.STEP_DTYPE), np.zeros(0, dtype=np.uint32)
    parts = sorted(parts, key=lambda p: float(p[0]["t"][0]))  # files one after the other: no sort below
    recs = parts[0][0] if len(parts) == 1 else np.concatenate([a for a, _ in parts])
    files = np.concatenate([np.full(len(a), no, dtype=np.uint32) for a, no in parts])
    t = recs["t"]
    if len(t) > 1 and not bool(np.all(t[1:] >= t[:-1])):
        order = np.argsort(t, kind="stable")
        recs, files = recs[order], files[order]
    return recs, files


def surviving(step: np.ndarray) -> np.ndarray:
    """Row mask of a timeline (rows in time order) where a replayed step truncates what came after
    it: row i survives iff every later row has a larger step. The monitor's curves follow this rule
    (a resume or rollback replays steps; what was trained after the replay point is abandoned)."""
    n = len(step)
    if n == 0:
        return np.zeros(0, dtype=bool)
    suffix_min = np.minimum.accumulate(step[::-1])[::-1]
    keep = np.ones(n, dtype=bool)
    keep[:-1] = step[:-1] < suffix_min[1:]
    return keep


def latest_wins(step: np.ndarray) -> np.ndarray:
    """Row indices, one per distinct step, of its latest event (the ledger rule), sorted by step.

    A stable sort by step keeps each step's events in the order written, so the last of each run of
    equal steps is the latest; a timeline is increasing runs (replays start new ones), which the
    stable sort merges in about linear time. Increasing already: every row."""
    n = len(step)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if bool(np.all(step[1:] > step[:-1])):
        return np.arange(n, dtype=np.int64)
    order = np.argsort(step, kind="stable")
    s = step[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = s[1:] != s[:-1]
    return order[last]

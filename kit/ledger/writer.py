"""Writing the ledger: one file per writer, whole lines, checked against the schema, indexed as written.

Why one file per writer: appends from several nodes to one file are not safe on Lustre, GPFS or NFS.
Each process that writes (a training rank, a node's health sampler, the chain driver, ``kit stream``)
owns ``<run>/ledger/<name>.jsonl``; readers merge files by time.

Each event is written with one ``write`` of a complete line and flushed, so a reader on another node
sees whole lines or a torn tail, never interleaving. A new writer on a file whose previous owner died
mid-line first ends that torn line, so the next event stays parseable. After the line, its index
record (kit.ledger.index) is appended: a struct pack and a buffered write, a few microseconds.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import IO, Any

from kit import envvars
from kit.errors import LedgerError
from kit.ledger import index as ix
from kit.ledger.reader import LEDGER_DIR, SUFFIX, ReadStats, nonconforming
from kit.ledger.schema import EVENTS, KINDS, SCHEMA_VERSION, SEVERITIES

STRICT = os.environ.get(envvars.LEDGER_STRICT) == "1"  # the test suite sets it: a nonconforming field raises

_EVENT = struct.Struct("<QIHHdq")
_STEP = struct.Struct(f"<{len(ix.COLUMNS)}d")


def writer_name(role: str, rank: int | None = None, host: str | None = None) -> str:
    """File stem for a writer: ``train-r0``, ``health-node12``, ``chain``, ``stream``."""
    if rank is not None:
        return f"{role}-r{rank}"
    if host is not None:
        return f"{role}-{host}"
    return role


def hostname() -> str:
    return socket.gethostname().split(".")[0]


class LedgerWriter:
    """Appends events to ``<run>/ledger/<name>.jsonl``. One writer per file, ever at once."""

    def __init__(self, run_dir: str | Path, name: str, seg: str = "", fsync: bool = False,
                 index: bool = True) -> None:
        self.path = Path(run_dir) / LEDGER_DIR / f"{name}{SUFFIX}"
        self.src = name
        self.seg = seg
        self.fsync = fsync
        self._lock = threading.Lock()  # a background checkpoint writer emits too (kit.asyncsave)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 (owned for the writer's life)
        except OSError as e:
            raise LedgerError(
                f"cannot write the ledger at {self.path}: {e.strerror}; check the run directory"
            ) from None
        self._size = self._fh.tell()
        if self._size > 0 and not self._ends_with_newline():
            self._fh.write(b"\n")
            self._fh.flush()
            self._size += 1
        self._steps: IO[bytes] | None = None
        self._events: IO[bytes] | None = None
        if index:
            try:
                self._open_index()
            except OSError:  # an index is an optimisation: a writer without one still writes the ledger
                self._close_index()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    # --------------------------------------------------------------------------------- the index
    def _open_index(self) -> None:
        sp, ep = ix.index_paths(self.path.parent, self.path.name)
        sp.parent.mkdir(exist_ok=True)
        inode = os.fstat(self._fh.fileno()).st_ino
        covered = self._covered(sp, ep, inode)
        if covered is None:  # none yet, or one that disagrees: a new index from here on
            for p, what in ((sp, "steps"), (ep, "events")):
                with open(p, "wb") as f:
                    f.write(ix.header(self._size, inode, what))
            covered = self._size
        self._steps = open(sp, "ab")  # noqa: SIM115
        self._events = open(ep, "ab")  # noqa: SIM115
        if covered < self._size:  # the previous writer died between a line and its record: catch up
            with open(self.path, "rb") as f:
                built = ix.build(f, covered, self._size, ReadStats(), keep=False)
            for row in built.steps:
                self._steps.write(_STEP.pack(*row))
            for rec in built.events:
                self._events.write(_EVENT.pack(*rec))
            self._steps.flush()
            self._events.flush()

    def _covered(self, sp: Path, ep: Path, inode: int) -> int | None:
        """Where an existing index ends in the JSONL (its records trimmed to whole ones), or None."""
        try:
            with open(self.path, "rb") as jf:
                idx = ix.load(self.path.parent, self.path.name, jf, self._size, inode)
        except OSError:
            return None
        if idx is None:
            return None
        os.truncate(sp, ix.HEADER + len(idx.steps) * ix.STEP_DTYPE.itemsize)  # drop a torn record
        os.truncate(ep, ix.HEADER + len(idx.events) * ix.EVENT_DTYPE.itemsize)
        return idx.end

    def _close_index(self) -> None:
        for f in (self._steps, self._events):
            if f is not None and not f.closed:
                f.close()
        self._steps = self._events = None

    # ------------------------------------------------------------------------------------ writing
    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Write one event; returns it. Unknown kinds and missing required fields are bugs: raise.

        An explicit ``t`` (generators, replays) overrides the time stamp."""
        required = EVENTS.get(kind)
        if required is None:
            raise ValueError(f"unknown ledger event kind {kind!r}; declare it in kit/ledger/schema.py")
        missing = [f for f in required if fields.get(f) is None]
        if missing:
            raise ValueError(f"ledger event {kind!r} is missing {missing}")
        event = {"v": SCHEMA_VERSION, "t": round(time.time(), 6), "kind": kind, "src": self.src}
        if self.seg:
            event["seg"] = self.seg
        event.update(fields)
        bad = nonconforming(event)
        if bad:  # a writer's bug: loud in tests, and in production the field is written as null
            if STRICT:
                raise ValueError(f"ledger event {kind!r}: {', '.join(bad)} not of the type kit/ledger/schema.py "
                                 "declares")
            for name in bad:
                event[name] = None
        data = (json.dumps(event, separators=(",", ":"), allow_nan=True, default=_json_default) + "\n").encode()
        with self._lock:  # the line, the size and the index record move together
            off = self._size
            self._fh.write(data)
            self._fh.flush()
            self._size += len(data)
            if self.fsync:
                os.fsync(self._fh.fileno())
            if self._events is not None and self._steps is not None:
                self._index(event, kind, off, len(data))
        return event

    def _index(self, event: dict[str, Any], kind: str, off: int, length: int) -> None:
        t = event["t"]
        if not isinstance(t, int | float) or not math.isfinite(t):
            return  # the reader will drop this line too: no record
        assert self._steps is not None and self._events is not None
        try:
            if kind == "step":
                self._steps.write(_STEP.pack(*ix.step_record(event, off)))
                self._steps.flush()
            else:
                step = event.get("step")
                self._events.write(_EVENT.pack(off, length, ix._CODES[kind], 0, float(t),
                                               step if type(step) is int and abs(step) < 2**63 else -1))
                self._events.flush()
        except (OSError, struct.error, TypeError, ValueError):
            self._close_index()  # readers fall back to parsing what is not indexed; the ledger goes on

    def alert(self, severity: str, message: str, **fields: Any) -> dict[str, Any]:
        """An alert; without an ``incident`` id (kit.alerts) it is an incident of its own."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}")
        fields.setdefault("incident", f"{self.src}/{self.seg or '-'}/{time.time_ns():x}")
        return self.emit("alert", severity=severity, message=message, **fields)

    def close(self) -> None:
        with self._lock:
            self._close_index()
            if not self._fh.closed:
                self._fh.close()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to the ledger")


class NullLedger:
    """A writer that writes nothing: ranks other than the ones that own a ledger file."""

    path = None
    src = ""
    seg = ""

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"unknown ledger event kind {kind!r}; declare it in kit/ledger/schema.py")
        return {"kind": kind, **fields}

    def alert(self, severity: str, message: str, **fields: Any) -> dict[str, Any]:
        return {"kind": "alert", "severity": severity, "message": message, **fields}

    def close(self) -> None:
        pass

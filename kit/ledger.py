"""The ledger: append-only JSON Lines events, one file per writer, one schema for everyone.

Why one file per writer: appends from several nodes to one file are not safe on Lustre, GPFS or NFS.
Each process that writes (a training rank, a node's health sampler, the chain driver, ``kit stream``)
owns its own file under ``<run>/ledger/``; readers merge them by time.

Every line is one JSON object::

    {"v": 1, "t": 1764300000.123, "kind": "step", "src": "train-r0", "seg": "1234_2", ...fields}

``v`` is :data:`SCHEMA_VERSION`; ``t`` is Unix time; ``kind`` names the event; ``src`` the writer;
``seg`` the chain segment (Slurm job id and requeue count, or a local id). :data:`EVENTS` lists every
kind and its required fields; writers check them, readers pass unknown kinds through (a newer kit may
write kinds this one does not know) and never fail on a torn or garbage line: they count it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kit.errors import LedgerError

SCHEMA_VERSION = 1
LEDGER_DIR = "ledger"
SUFFIX = ".jsonl"

# kind -> required fields (beyond v, t, kind, src). Optional fields are listed in docs/run-directory.md.
EVENTS: dict[str, tuple[str, ...]] = {
    # the run and its chain
    "run_created": ("name", "config_digest"),
    "chain_submitted": ("job_id",),
    "segment_started": ("world_size", "step"),  # + startup: {process, trainer, data, engine, resumed} Unix times
    "segment_first_step": ("step",),  # the segment's first completed step (startup_s since the process began)
    "segment_signalled": ("signal",),
    "segment_ended": ("reason", "step"),
    "chain_requeued": ("job_id", "reason"),
    "chain_ended": ("reason",),
    "allocation_started": ("job_id", "nodes"),  # kit.jobs.driver: rank 0's driver, before the trainer starts
    "allocation_ended": ("job_id", "outcome"),  # ...after it ended: clean/finished/crash/hang/preflight/lost
    "node_excluded": ("node", "reason"),  # kit.jobs: a node implicated in a failure, excluded from later segments
    # training
    "step": ("step", "loss"),
    "data_ready": ("sources", "tokens"),
    # checkpoints
    "ckpt_saved": ("step", "tag", "bytes", "seconds"),
    "ckpt_loaded": ("step", "tag"),
    "ckpt_deleted": ("tag",),
    "ckpt_verified": ("tag", "ok"),
    "ckpt_converted": ("tag", "out"),
    "ckpt_uploaded": ("tag", "url"),
    "ckpt_reshaped": ("tag", "world_size"),  # kit reshape: universal checkpoint for another world size
    # health and incidents
    "health": ("node",),
    "nvml_absent": ("node", "reason"),
    "hang": ("bound_s",),
    "straggler": ("rank", "slowdown"),
    "rank_timings": ("step", "ranks"),  # kit.stragglers: per-rank timings every health.straggler_interval
    "spike": ("step", "loss"),
    "rollback": ("from_step", "to_step"),
    "data_skipped": ("step", "start", "end"),  # kit.spikes: the trainer jumped over a skip range
    "alert": ("severity", "message"),  # + incident (kit.alerts): one incident, one row; escalations repeat its id
    "alert_cleared": ("incident",),  # kit.alerts: the condition behind an incident is over
    "alert_ack": ("alert_t",),  # + incident, severity: an ack covers the incident up to that severity
    "control_ack": ("switch", "step"),
    "doctor": ("ok", "checks"),
}

SEVERITIES = ("info", "warning", "error", "critical")


def writer_name(role: str, rank: int | None = None, host: str | None = None) -> str:
    """File stem for a writer: ``train-r0``, ``health-node12``, ``chain``, ``stream``."""
    if rank is not None:
        return f"{role}-r{rank}"
    if host is not None:
        return f"{role}-{host}"
    return role


class LedgerWriter:
    """Appends events to ``<run>/ledger/<name>.jsonl``. One writer per file, ever at once.

    Each event is written with a single ``write`` of a complete line and flushed, so a reader on
    another node sees whole lines or a torn tail, never interleaving. A new writer on a file whose
    previous owner died mid-line first ends that torn line, so the next event stays parseable.
    """

    def __init__(self, run_dir: str | Path, name: str, seg: str = "", fsync: bool = False) -> None:
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
        if self._fh.tell() > 0 and not self._ends_with_newline():
            self._fh.write(b"\n")

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Write one event; returns it. Unknown kinds and missing required fields are bugs: raise."""
        required = EVENTS.get(kind)
        if required is None:
            raise ValueError(f"unknown ledger event kind {kind!r}; add it to kit.ledger.EVENTS")
        missing = [f for f in required if f not in fields]
        if missing:
            raise ValueError(f"ledger event {kind!r} is missing {missing}")
        event = {"v": SCHEMA_VERSION, "t": round(time.time(), 6), "kind": kind, "src": self.src}
        if self.seg:
            event["seg"] = self.seg
        event.update(fields)
        line = json.dumps(event, separators=(",", ":"), allow_nan=True, default=_json_default) + "\n"
        with self._lock:
            self._fh.write(line.encode())
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        return event

    def alert(self, severity: str, message: str, **fields: Any) -> dict[str, Any]:
        """An alert; without an ``incident`` id (kit.alerts) it is an incident of its own."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}")
        fields.setdefault("incident", f"{self.src}/{self.seg or '-'}/{time.time_ns():x}")
        return self.emit("alert", severity=severity, message=message, **fields)

    def close(self) -> None:
        with self._lock:
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
        return {"kind": kind, **fields}

    def alert(self, severity: str, message: str, **fields: Any) -> dict[str, Any]:
        return {"kind": "alert", "severity": severity, "message": message, **fields}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------- reading


@dataclass(slots=True)
class ReadStats:
    """What a reader skipped, so the monitor can say it instead of hiding it."""

    events: int = 0
    bad_lines: int = 0
    unknown_kinds: int = 0
    future_version: int = 0
    files: int = 0
    vanished_files: int = 0
    truncated_files: int = 0
    last_error: str = ""


@dataclass(slots=True)
class _FileCursor:
    offset: int = 0
    partial: bytes = b""
    inode: int = 0


MAX_LINE = 1 << 20  # a "line" longer than 1 MiB is garbage, not an event


@dataclass
class LedgerReader:
    """Follows every ledger file of a run incrementally, tolerating what live files on shared
    filesystems do: torn last lines (kept until completed), files that appear, vanish, or shrink
    (rotation/truncation: read again from the start), garbage and huge lines (counted, skipped),
    events of unknown kinds or future versions (passed through, counted).

    ``poll()`` returns the events that completed since the last call, sorted by time.
    """

    run_dir: Path
    stats: ReadStats = field(default_factory=ReadStats)
    _cursors: dict[str, _FileCursor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @property
    def ledger_dir(self) -> Path:
        return self.run_dir / LEDGER_DIR

    def poll(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            names = sorted(p.name for p in os.scandir(self.ledger_dir) if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return out
        for gone in set(self._cursors) - set(names):
            self.stats.vanished_files += 1
            del self._cursors[gone]
        self.stats.files = len(names)
        for name in names:
            out.extend(self._read_file(name))
        out.sort(key=lambda e: e.get("t", 0.0))
        return out

    def _read_file(self, name: str) -> Iterator[dict[str, Any]]:
        path = self.ledger_dir / name
        cur = self._cursors.setdefault(name, _FileCursor())
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != cur.inode or st.st_size < cur.offset:
                    if cur.inode:
                        self.stats.truncated_files += 1
                    cur.offset, cur.partial, cur.inode = 0, b"", st.st_ino
                if st.st_size == cur.offset:
                    return
                f.seek(cur.offset)
                data = f.read(st.st_size - cur.offset)
        except FileNotFoundError:
            self._cursors.pop(name, None)
            self.stats.vanished_files += 1
            return
        except OSError as e:
            self.stats.last_error = f"{name}: {e.strerror}"
            return
        cur.offset += len(data)
        data = cur.partial + data
        lines = data.split(b"\n")
        cur.partial = lines.pop()
        if len(cur.partial) > MAX_LINE:
            self.stats.bad_lines += 1
            cur.partial = b""
        for raw in lines:
            event = self._parse(raw)
            if event is not None:
                yield event

    def _parse(self, raw: bytes) -> dict[str, Any] | None:
        if not raw.strip():
            return None
        if len(raw) > MAX_LINE:
            self.stats.bad_lines += 1
            return None
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            self.stats.bad_lines += 1
            return None
        if not isinstance(event, dict) or not isinstance(event.get("kind"), str):
            self.stats.bad_lines += 1
            return None
        v = event.get("v")
        if not isinstance(v, int) or v > SCHEMA_VERSION:
            self.stats.future_version += 1
        if event["kind"] not in EVENTS:
            self.stats.unknown_kinds += 1
        self.stats.events += 1
        return event


def read_all(run_dir: str | Path, kinds: set[str] | None = None) -> list[dict[str, Any]]:
    """Every complete event of a run, sorted by time (optionally only some kinds)."""
    events = LedgerReader(Path(run_dir)).poll()
    if kinds is not None:
        events = [e for e in events if e["kind"] in kinds]
    return events


def hostname() -> str:
    return socket.gethostname().split(".")[0]

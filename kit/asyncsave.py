"""Background writing of a captured checkpoint (kit.snapshot): files, fsync, hashes, then the commit.

One asynchronous save of tag T (docs/checkpoints.md):

1. At a step boundary, on every rank (the loop's only pause, kit.saver): wait for the previous save
   (step 4); rank 0 clears a stale T folder; barrier; DeepSpeed's ``save_checkpoint`` through the
   capture engine (a host copy of every file's state) and this rank's RNG state.
2. In the background, on every rank (:class:`RankWrite`): ``torch.save`` each captured file where
   DeepSpeed named it, fsync it, hash it; the RNG file; fsync the folders; then this rank's record
   ``.written_rNNNNN.json`` (its files, sizes, sha256 and CRC-32 -- or the error), written atomically and
   durably. A record means "this rank's part is on disk".
3. In the background, on rank 0, after its own part: wait until every rank's record is in the folder,
   then call the commit (kit.saver: MANIFEST.json from the records, the commit point; pins; ``latest``;
   ``ckpt_saved``; retention). A crash anywhere before the manifest leaves a folder without one, which
   resume ignores: the previous checkpoint stays latest.
4. At the next save, a rollback, or the segment's end (or at the step boundary after a rank's writer
   failed: the trainer's per-step all-reduce carries the flag), every rank waits for its own part,
   then agrees on every rank's failures (kit.diskfull's all-gather: a full disk is named as such), so
   every rank stops with the same error at the same point; with none, rank 0 finishes the commit.
   Nothing is dropped: a save still in flight is always waited for.

A segment's last save (nothing to overlap with) runs the same steps in the loop's own thread
(:meth:`RankWrite.run_here`), at normal priority, with DeepSpeed writing its files during the capture.

Why a file handshake for the commit, and not a flag in the loop's per-step all-reduce: the manifest
is written as soon as the last rank's files are durable, not when the loop next reaches a boundary
(a long step, or the end of the segment, would delay it); the step is untouched (its shape differs
per layout: a pipeline engine runs the whole step inside ``train_batch``); and no collective is ever
issued from a background thread (collectives from two threads of one rank are unordered and can
deadlock). Each rank hashes its own files, in parallel, where a synchronous save has rank 0 re-read
every rank's files. The cost: while a save is in flight, rank 0 lists one folder every <= 0.5 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit import checkpoint as ck
from kit import diskfull
from kit.faults import fault_point
from kit.fsio import atomic_write_json, fsync_path
from kit.snapshot import HostBuffers, Snapshot, write_file

Commit = Callable[[list[dict[str, Any]]], None]


@dataclass
class RankWrite:
    """This rank's background part of one save (and, on rank 0, the wait for the others and the commit)."""

    step: int
    path: Path  # the tag folder
    rank: int
    world: int
    snap: Snapshot
    rng: dict[str, Any]
    zipfile: bool
    buffers: HostBuffers
    buffers_lock: threading.Lock
    guard: diskfull.WriteGuard  # records this rank's failed write instead of raising it (kit.diskfull)
    commit: Commit | None = None  # rank 0 only
    started: float = field(default_factory=time.perf_counter)
    error: str = ""  # rank 0: the wait for the other ranks' records ended without a commit (not a write)
    local_done: threading.Event = field(default_factory=threading.Event)  # this rank's part is over
    write_s: float = 0.0
    cpu_s: float = 0.0  # this thread's CPU time (serializing, copying into the page cache, hashing)
    record: dict[str, Any] = field(default_factory=dict)
    _abort: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RankWrite:
        """In the background, at low priority (:func:`background_priority`)."""
        self._thread = threading.Thread(target=self._run, args=(True,), name=f"kit-ckpt-{self.path.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def run_here(self) -> RankWrite:
        """In the calling thread, at its priority: a save the loop waits for anyway (the segment's last)."""
        self._run(False)
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for this rank's part (and rank 0's commit); False if it is still running at ``timeout``."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def abort(self) -> None:
        """Stop waiting for the other ranks' records (rank 0, when the segment ends without them)."""
        self._abort.set()

    # ---------------------------------------------------------------------------------- the thread
    def _run(self, background: bool) -> None:
        if background:
            background_priority()
        cpu0 = time.thread_time()
        try:
            self.guard.run(self._write, self.path)  # a failure is recorded, and raised on every rank at the wait
            if self.guard.failure is not None:
                self._record({}, self.guard.failure.error)
        finally:
            self.write_s = time.perf_counter() - self.started
            self.cpu_s = time.thread_time() - cpu0
            with self.buffers_lock:
                self.buffers.give_back(self.snap.storages)
            self.snap.storages, self.snap.files = [], []
            self.local_done.set()
        if self.commit is None or self.guard.failure is not None:
            return
        try:
            records = self._gather()
        except TimeoutError as e:
            self.error = str(e)
            return
        bad = [r for r in records if r.get("error")]
        if bad:
            self.error = f"rank {bad[0]['rank']}: {bad[0]['error']}"
            return
        self.guard.run(self.commit, self.path, records)

    def _write(self) -> None:
        self.snap.wait_ready()
        files: dict[str, dict[str, Any]] = {}
        folders = {self.path}
        for i, (name, state) in enumerate(self.snap.files):
            p = Path(name)
            if state is not None:  # None: written during the capture (no memory for a copy)
                fault_point("ckpt.write", self.step, self.rank)  # tests: this rank's own disk is full
                write_file(name, state, self.zipfile)
            files[self._rel(p)] = self._durable(p)
            folders.add(p.parent)
            if i == 0:
                fault_point("ckpt.async_write", self.step, self.rank)  # tests: killed mid-write
        rng = ck.save_rank_state(self.path, self.rank, self.rng)
        files[self._rel(rng)] = self._durable(rng)
        for d in folders:
            fsync_path(d)
        self._record(files, "")

    def _rel(self, p: Path) -> str:
        return str(p.resolve().relative_to(self.path.resolve()))

    @staticmethod
    def _durable(p: Path) -> dict[str, Any]:
        fsync_path(p)
        sha, crc = ck.digests(p)
        return {"size": p.stat().st_size, "sha256": sha, "crc32": crc}

    def _record(self, files: dict[str, dict[str, Any]], error: str) -> None:
        """This rank's record; written in the guard's run on success (a failure to write it is a failed
        save), best effort after a failure (rank 0 stops waiting for it at the wait's agreement anyway)."""
        self.record = {"rank": self.rank, "step": self.step, "files": files, "error": error}
        path = self.path / ck.WRITTEN.format(rank=self.rank)
        if not error:
            atomic_write_json(path, self.record, fsync=True)
            return
        with contextlib.suppress(OSError):  # the folder is full or gone: the agreement reports the failure
            atomic_write_json(path, self.record, fsync=True)

    def _gather(self) -> list[dict[str, Any]]:
        """Rank 0: every rank's record, once all are in the folder (polling, backing off to 0.5 s)."""
        want = {ck.WRITTEN.format(rank=r) for r in range(self.world)}
        delay = 0.01
        while True:
            have = {n for n in os.listdir(self.path) if n.startswith(ck.WRITTEN_PREFIX)} & want
            if have == want:
                return [json.loads((self.path / n).read_text()) for n in sorted(want)]
            if self._abort.wait(delay):
                missing = sorted(int(n[len(ck.WRITTEN_PREFIX):-5]) for n in want - have)
                raise TimeoutError(f"ranks {missing[:8]} never reported their files written")
            delay = min(0.5, delay * 2)


WRITER_NICE = 19


def background_priority() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread): where training is CPU-bound and
    the cores are busy, the writer then takes what training leaves instead of half of it; on a GPU
    node, whose cores are idle during the step, it changes nothing. Best effort: elsewhere a no-op."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: keep the default
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


def known_files(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The files every rank reported, for kit.checkpoint.write_manifest(known=...)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out.update(r["files"])
    return out


def remove_records(path: Path, world: int) -> None:
    for r in range(world):
        (path / ck.WRITTEN.format(rank=r)).unlink(missing_ok=True)

"""Saving and resuming a segment's state: DeepSpeed's engine checkpoint, per-rank RNG, the manifest
written last, retention after it; and on start, the newest intact checkpoint loaded back.

Why its own unit: the save is the one collective protocol that must hold whatever else the loop does
(every rank writes its part, rank 0 commits with the manifest, then retention), and both the loop and
the rollback policy use it.
"""

from __future__ import annotations

import copy
import functools
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit import checkpoint as ck
from kit import diskfull
from kit.asyncsave import RankWrite, known_files, remove_records
from kit.config import RunConfig
from kit.dist import DistEnv
from kit.errors import CheckpointError
from kit.faults import fault_point
from kit.ledger import LedgerWriter, NullLedger, hostname
from kit.parallel.layout import Layout
from kit.rundir import RunDir
from kit.snapshot import HostBuffers, capture, snap_zipfile

HOST_FRACTION = 0.5  # of a node's free host memory that checkpoint snapshots may use


@dataclass(slots=True)
class Resumed:
    """Where a segment starts: the checkpoint's step and data position ("" tag: from scratch)."""

    tag: str = ""
    step: int = 0
    consumed: int = 0


@dataclass
class Saver:
    cfg: RunConfig
    rd: RunDir
    env: DistEnv
    ledger: LedgerWriter | NullLedger
    seg: str
    layout: Layout  # kit.parallel: tensor x pipeline x data; recorded in every manifest
    log: Callable[[str], None] = print
    engine: Any = None
    save_times: list[float] = field(default_factory=list)
    pin_next: str = ""  # reason to pin the next checkpoint saved (the spike policy asks for it)
    pending: RankWrite | None = None  # the asynchronous save in flight (kit.asyncsave)
    buffers: HostBuffers = field(default_factory=HostBuffers)
    _buffers_lock: threading.Lock = field(default_factory=threading.Lock)
    _warned_memory: bool = False

    @property
    def root(self) -> Path:
        return self.rd.checkpoints

    def saved_at(self, step: int) -> bool:
        """A checkpoint of ``step`` exists or is being written."""
        return (self.pending is not None and self.pending.step == step) or \
            (self.root / ck.tag_for(step) / ck.MANIFEST).exists()

    # ------------------------------------------------------------------------------------ resume
    def resume(self) -> Resumed:
        """Collectively pick (rank 0) and load (every rank) the newest complete, intact checkpoint."""
        import torch.distributed as dist

        choice: list[Any] = [None, []]
        if self.env.is_main:
            try:
                found, notes = ck.find_resume(self.root, hashes=self.cfg.checkpoint.verify_on_resume)
                choice = [found.tag if found else None, notes]
            except CheckpointError as e:
                choice = [f"!{e}", []]
        dist.broadcast_object_list(choice, src=0)
        tag, notes = choice
        if isinstance(tag, str) and tag.startswith("!"):
            raise CheckpointError(tag[1:])
        for note in notes:
            self.log(f"checkpoint {note}")
        if tag is None:
            self.log("no complete checkpoint: starting from step 0")
            return Resumed()
        ckpt = ck.load(self.root, tag)
        m = self.cfg.model
        ck.check_compatible(ckpt, self.layout, {"hidden_size": m.hidden_size, "n_layer": m.n_layer,
                                                       "n_head": m.n_head}, self.cfg.data.vocab_size)
        t0 = time.perf_counter()
        self.load(ckpt)
        self.log(f"resumed from {tag} (step {ckpt.step}, {ckpt.consumed} samples consumed)")
        self.ledger.emit("ckpt_loaded", step=ckpt.step, tag=tag, skipped=notes,
                         seconds=round(time.perf_counter() - t0, 3))
        return Resumed(tag, ckpt.step, ckpt.consumed)

    def load(self, ckpt: ck.Checkpoint) -> None:
        """Load one checkpoint into the engine and this rank's RNG (collective)."""
        # `kit reshape` (tools/reshape.py) writes DeepSpeed universal checkpoints for a new world size
        # (manifest kit.universal): load that one with DeepSpeed's load_universal switched on.
        universal = self.engine._config.load_universal_checkpoint
        self.engine._config.load_universal_checkpoint = universal or ckpt.manifest.kit.universal
        try:
            load_path, _ = self.engine.load_checkpoint(str(self.root), tag=ckpt.tag)
        finally:
            self.engine._config.load_universal_checkpoint = universal
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt.path}; its files may be damaged "
                                  "(run `kit verify` on it) or from another DeepSpeed setup")
        ck.load_rank_state(ckpt.path, self.env.rank)

    # -------------------------------------------------------------------------------------- save
    def save(self, step: int, consumed: int, why: str, kit_state: dict[str, Any], blocking: bool = False) -> None:
        """Collective save: every rank writes its part; rank 0 commits with the manifest, moves
        ``latest`` and applies retention. ``kit_state`` joins the manifest (the spike policy's state).

        With ``checkpoint.async_save`` the loop pauses only for a host copy of the state (kit.snapshot);
        the files are written in the background (kit.asyncsave) and the save before it, if still in
        flight, is waited for first. ``blocking``: the loop waits for this save anyway (the segment's
        last): DeepSpeed's files are written during the capture, without a copy, and the rest of the
        save runs in this thread at its priority, not in a low-priority writer.

        A write that fails on any rank (a full disk) fails the save on every rank together
        (kit.diskfull): DiskFullError or CheckpointError, raised where every rank waits for the save
        (kit.saver.wait: the next save, a rollback, the segment's end, or the step boundary after a
        rank's writer failed, kit.trainer); the previous checkpoint stays latest."""
        if not self.cfg.checkpoint.async_save:
            self._save_sync(step, consumed, why, kit_state)
            return
        import torch.distributed as dist

        t0 = time.perf_counter()
        wait_s = self.wait()
        root, tag = self.root, ck.tag_for(step)
        if self.env.is_main:
            ck.prepare_tag_dir(root, tag)
        dist.barrier()
        guard = diskfull.WriteGuard(self.env.rank, hostname(), step)
        snap = capture(self.engine, str(root), tag, {"kit_step": step}, self.buffers,
                       0 if blocking else self._budget(), guard)
        rng = ck.rng_state()
        stall = time.perf_counter() - t0
        commit = None
        if self.env.is_main:
            state = self._manifest_state(step, consumed, why, copy.deepcopy(kit_state))
            info = {"step": step, "consumed": consumed, "why": why, "pin": self.pin_next, "t0": t0,
                    "stall_s": stall, "wait_s": wait_s, "sync_bytes": snap.sync_bytes, "blocking": blocking}
            self.pin_next = ""
            commit = functools.partial(self._commit_async, state, info)
            if snap.sync_bytes and not blocking and not self._warned_memory:
                self._warned_memory = True
                self.ledger.alert("warning", f"checkpoint.async_save: not enough free host memory for a copy of "
                                  f"this rank's state; {snap.sync_bytes / 2**30:.2f} GiB of {tag} was written "
                                  "synchronously (the loop waited for it)", condition="ckpt_memory", tag=tag)
        job = RankWrite(step, root / tag, self.env.rank, self.env.world_size, snap, rng, snap_zipfile(self.engine),
                        self.buffers, self._buffers_lock, guard, commit)
        self.pending = job.run_here() if blocking else job.start()
        if blocking:
            self.wait()

    def failed(self) -> bool:
        """This rank knows the save in flight has failed (its own write, or rank 0's commit); not collective."""
        job = self.pending
        return job is not None and job.local_done.is_set() and (job.guard.failure is not None or bool(job.error))

    def wait(self) -> float:
        """Collective: wait until the save in flight is complete on every rank (rank 0: committed).
        A write that failed on any rank raises DiskFullError or CheckpointError on every rank alike
        (kit.diskfull). Returns the seconds waited (0 when nothing was in flight)."""
        job = self.pending
        if job is None:
            return 0.0
        t0 = time.perf_counter()
        job.local_done.wait()  # this rank's files are written (or failed)
        self.pending = None
        self._agree(job.guard, job.step, job)  # every rank's writes: a failure stops rank 0 waiting for records
        job.join()  # rank 0: every record is in, the commit follows
        if job.error:  # rank 0's own bookkeeping failed (not a write): the same error on every rank
            job.guard.failure = job.guard.failure or diskfull.WriteFailure(
                self.env.rank, hostname(), str(job.path), job.error, False, -1, -1)
        self._agree(job.guard, job.step)  # rank 0's commit (the manifest, `latest`)
        return time.perf_counter() - t0

    def _agree(self, guard: diskfull.WriteGuard, step: int, job: RankWrite | None = None) -> None:
        failures, nodes = guard.agree()
        if not failures:
            return
        if job is not None:
            job.abort()  # rank 0: the failed ranks' records may never come
            job.join()
        path = self.root / ck.tag_for(step)
        if self.env.is_main and not (path / ck.MANIFEST).exists():
            shutil.rmtree(path, ignore_errors=True)  # the failed save's files: give the room back
        raise diskfull.error(step, failures, nodes)

    def close(self, timeout_s: float = 120.0) -> None:
        """Not collective (the segment may be ending on an error): give a save in flight ``timeout_s``
        to finish; rank 0 says in the ledger if it did not (never dropped silently)."""
        job, self.pending = self.pending, None
        if job is None:
            return
        if not job.join(timeout_s):
            job.abort()
            job.join(10.0)
        failure = job.guard.failure.error if job.guard.failure else job.error
        if self.env.is_main and (failure or not (self.root / ck.tag_for(job.step) / ck.MANIFEST).exists()):
            self.ledger.alert("error", f"checkpoint {ck.tag_for(job.step)} was not completed before the segment "
                              f"ended ({failure or 'still being written'}); the previous one is the latest",
                              tag=ck.tag_for(job.step), condition="ckpt_failed")

    def deadline_reserve_s(self, step_s: float) -> float:
        """Time to keep before a deadline for saving: the final save, and the one in flight if any."""
        save_t = max(self.save_times, default=step_s * 5)
        return 1.5 * save_t + (save_t if self.pending is not None else 0.0)

    def _budget(self) -> int | None:
        """Host memory a snapshot may use on this rank: half of what the node has free, shared among its
        ranks, plus the buffers already held from the previous save."""
        import psutil

        free = psutil.virtual_memory().available * HOST_FRACTION / max(1, self.env.local_world_size)
        return int(free) + self.buffers.held_bytes()

    def _manifest_state(self, step: int, consumed: int, why: str, kit_state: dict[str, Any]) -> ck.KitState:
        m = self.cfg.model
        return ck.KitState(
            step=step, consumed=consumed, world_size=self.layout.world, layout=self.layout.to_dict(),
            model={"hidden_size": m.hidden_size, "n_layer": m.n_layer, "n_head": m.n_head,
                   "seq_length": m.seq_length},
            vocab_size=self.cfg.data.vocab_size, zero_stage=self.cfg.deepspeed.zero_stage,
            precision=self.cfg.deepspeed.precision, config_digest=self.cfg.digest(),
            seg=self.seg, reason=why, extra=kit_state,
        )

    def _commit_async(self, state: ck.KitState, info: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """Rank 0's writer thread, once every rank's files are durable: manifest, pin, latest, ledger, retention."""
        step, root = info["step"], self.root
        tag = ck.tag_for(step)
        fault_point("ckpt.before_manifest", step, self.env.rank)
        manifest = ck.write_manifest(root / tag, step, state, known=known_files(records))
        if info["pin"]:
            ck.pin(root, tag, info["pin"])
        fault_point("ckpt.before_latest", step, self.env.rank)
        ck.set_latest(root, tag)
        remove_records(root / tag, self.env.world_size)
        seconds = time.perf_counter() - info["t0"]
        self.save_times = ([*self.save_times, seconds])[-5:]
        stall = seconds if info["blocking"] else info["stall_s"]  # the loop waited for all of a blocking save
        self.ledger.emit("ckpt_saved", step=step, tag=tag, seconds=round(seconds, 3), reason=info["why"],
                         bytes=manifest.bytes, consumed=info["consumed"],
                         stall_s=round(stall, 4), wait_s=round(info["wait_s"], 4),
                         **{"async": not info["sync_bytes"]})
        self.retain()

    def _save_sync(self, step: int, consumed: int, why: str, kit_state: dict[str, Any]) -> None:
        """checkpoint.async_save = false: DeepSpeed writes in the loop, rank 0 hashes and commits."""
        import torch.distributed as dist

        root, tag = self.root, ck.tag_for(step)
        t0 = time.perf_counter()
        if self.env.is_main:
            ck.prepare_tag_dir(root, tag)
        dist.barrier()
        guard = diskfull.WriteGuard(self.env.rank, hostname(), step)
        with guard.deepspeed(self.engine):
            self.engine.save_checkpoint(str(root), tag=tag, client_state={"kit_step": step}, save_latest=False)
        guard.run(ck.save_rank_state, root / tag, root / tag, self.env.rank)
        fault_point("ckpt.before_manifest", step, self.env.rank)
        self._agree(guard, step)  # instead of a barrier: every rank learns whether every write worked
        if self.env.is_main:
            guard.run(self._commit, root / tag, step, consumed, why, kit_state, t0)
        self._agree(guard, step)
        self.save_times = ([*self.save_times, time.perf_counter() - t0])[-5:]

    def _commit(self, step: int, consumed: int, why: str, kit_state: dict[str, Any], t0: float) -> None:
        root, tag = self.root, ck.tag_for(step)
        manifest = ck.write_manifest(root / tag, step, self._manifest_state(step, consumed, why, kit_state))
        if self.pin_next:
            ck.pin(root, tag, self.pin_next)
            self.pin_next = ""
        fault_point("ckpt.before_latest", step, self.env.rank)
        ck.set_latest(root, tag)
        seconds = time.perf_counter() - t0  # the stall: engine files, hashes, manifest, latest
        self.ledger.emit("ckpt_saved", step=step, tag=tag, seconds=round(seconds, 3), reason=why,
                         bytes=manifest.bytes, consumed=consumed, stall_s=round(seconds, 3), wait_s=0.0,
                         **{"async": False})
        self.retain()

    def retain(self) -> None:
        """Retention after a save (rank 0): keep_last, keep_every, pins, busy uploads, stream holds."""
        c = self.cfg.checkpoint
        _, lost = ck.apply_retention(self.root, c.keep_last, c.keep_every, on_delete=self._on_delete,
                                     hold_max=c.stream_hold_max)
        if lost:
            self.ledger.alert("warning", f"retention deleted {', '.join(lost)} before `kit stream` shipped "
                              f"{'it' if len(lost) == 1 else 'them'}: the stream is more than "
                              f"checkpoint.stream_hold_max = {c.stream_hold_max} checkpoints behind (a slow or "
                              "stalled upload?); raise it if the filesystem has room", tags=lost)

    def _on_delete(self, tag: str, error: str) -> None:
        if error:
            self.ledger.alert("warning", f"retention could not delete {tag}: {error}", tag=tag)
        else:
            self.ledger.emit("ckpt_deleted", tag=tag)

"""Saving and resuming a segment's state: DeepSpeed's engine checkpoint, per-rank RNG, the manifest
written last, retention after it; and on start, the newest intact checkpoint loaded back.

Why its own unit: the save is the one collective protocol that must hold whatever else the loop does
(every rank writes its part, rank 0 commits with the manifest, then retention), and both the loop and
the rollback policy use it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit import checkpoint as ck
from kit import diskfull
from kit.config import RunConfig
from kit.dist import DistEnv
from kit.errors import CheckpointError
from kit.faults import fault_point
from kit.ledger import LedgerWriter, NullLedger, hostname
from kit.parallel.layout import Layout
from kit.rundir import RunDir


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

    @property
    def root(self) -> Path:
        return self.rd.checkpoints

    def saved_at(self, step: int) -> bool:
        return (self.root / ck.tag_for(step) / ck.MANIFEST).exists()

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
    def save(self, step: int, consumed: int, why: str, kit_state: dict[str, Any]) -> None:
        """Collective save: every rank writes its part; rank 0 commits with the manifest, moves
        ``latest`` and applies retention. ``kit_state`` joins the manifest (the spike policy's state).

        A write that fails on any rank (a full disk) fails the save on every rank together
        (kit.diskfull): raises DiskFullError or CheckpointError, the previous checkpoint stays latest."""
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

    def _agree(self, guard: diskfull.WriteGuard, step: int) -> None:
        failures, nodes = guard.agree()
        if not failures:
            return
        path = self.root / ck.tag_for(step)
        if self.env.is_main and not (path / ck.MANIFEST).exists():
            shutil.rmtree(path, ignore_errors=True)  # the failed save's files: give the room back
        raise diskfull.error(step, failures, nodes)

    def _commit(self, step: int, consumed: int, why: str, kit_state: dict[str, Any], t0: float) -> None:
        root, tag, m = self.root, ck.tag_for(step), self.cfg.model
        manifest = ck.write_manifest(root / tag, step, ck.KitState(
            step=step, consumed=consumed, world_size=self.layout.world, layout=self.layout.to_dict(),
            model={"hidden_size": m.hidden_size, "n_layer": m.n_layer, "n_head": m.n_head,
                   "seq_length": m.seq_length},
            vocab_size=self.cfg.data.vocab_size, zero_stage=self.cfg.deepspeed.zero_stage,
            precision=self.cfg.deepspeed.precision, config_digest=self.cfg.digest(),
            seg=self.seg, reason=why, extra=kit_state,
        ))
        if self.pin_next:
            ck.pin(root, tag, self.pin_next)
            self.pin_next = ""
        fault_point("ckpt.before_latest", step, self.env.rank)
        ck.set_latest(root, tag)
        seconds = time.perf_counter() - t0  # the stall: engine files, hashes, manifest, latest
        self.ledger.emit("ckpt_saved", step=step, tag=tag, seconds=round(seconds, 3), reason=why,
                         bytes=manifest.bytes, consumed=consumed)
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

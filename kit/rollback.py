"""The rollback policy of a loss spike: reload a checkpoint from before it, set aside what came after,
and skip the batches that caused it (PaLM's recipe, kit.spikes decides when).

Why its own unit: a rollback is a collective reload in the middle of a segment with its own invariants
(pin the target first, move ``latest`` before anyone loads, record the skip range on every rank and in
the control file, so a restart keeps it) and it is easier to check them here than inside the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kit import checkpoint as ck
from kit import spikes as sp
from kit.config import RunConfig
from kit.dist import DistEnv
from kit.ledger import LedgerWriter, NullLedger
from kit.rundir import RunDir
from kit.saver import Saver


@dataclass(frozen=True, slots=True)
class RolledBack:
    """Where training goes on after a rollback."""

    step: int
    consumed: int
    tag: str


@dataclass
class RollbackPolicy:
    cfg: RunConfig
    rd: RunDir
    env: DistEnv
    ledger: LedgerWriter | NullLedger
    guard: sp.SpikeGuard
    saver: Saver
    log: Callable[[str], None] = print

    def pin_around(self, spike: int) -> None:
        """Keep the newest checkpoint before a spike and the next one saved (rank 0)."""
        root = self.rd.checkpoints
        before, _ = ck.find_resume(root, before_step=spike - 1)
        if before is not None:
            ck.pin(root, before.tag, f"last checkpoint before the spike at step {spike}")
        job = self.saver.pending  # an async save still being written is the newest before the spike:
        if job is not None and job.step < spike:  # pin it now (retention reads pins when it commits)
            ck.pin(root, ck.tag_for(job.step), f"last checkpoint before the spike at step {spike}")
        self.saver.pin_next = f"first checkpoint after the spike at step {spike}"

    def choose(self, spike: int) -> tuple[str | None, str]:
        """Collectively: the tag to roll back to (None: there is none) and a note on the choice."""
        import torch.distributed as dist

        self.saver.wait()  # a save in flight completes first: it may be the one to roll back to
        root, back = self.rd.checkpoints, self.cfg.spikes.rollback_steps
        choice: list[Any] = [None, ""]
        if self.env.is_main:
            found, _ = ck.find_resume(root, before_step=max(spike - back, 0))
            note = ""
            if found is None:
                found, _ = ck.find_resume(root, before_step=spike - 1)
                note = f"no checkpoint {back} steps before the spike; used the newest before it"
            choice = [found.tag if found else None, note]
        dist.broadcast_object_list(choice, src=0)
        return choice[0], choice[1]

    def roll_back(self, d: sp.Decision, tag: str, note: str, step: int, consumed: int,
                  consumed_at: dict[int, int], global_batch: int) -> RolledBack:
        """Reload ``tag`` on every rank and record the skip range from the spike on. ``step`` and
        ``consumed`` are where the loop is now; ``consumed_at`` where each recent step began."""
        import torch.distributed as dist

        cfg, root, spike = self.cfg.spikes, self.rd.checkpoints, d.verdict.step
        ckpt = ck.load(root, tag)
        n = self.guard.skips.rollbacks + 1
        aside: list[list[str]] = [[], []]
        if self.env.is_main:
            ck.pin(root, tag, f"rollback target for the spike at step {spike}")
            aside = list(sp.set_aside_after(root, ckpt.step, spike, f"r{n}-spike{spike}"))
            ck.set_latest(root, tag)
        dist.barrier()
        self.saver.load(ckpt)
        start = consumed_at.get(spike, consumed - global_batch)
        skip = sp.SkipRange(start, start + cfg.skip_batches * global_batch, step=spike, rollback=True,
                            reason=f"rollback {n} for the {d.verdict.metric} spike at step {spike}")
        self.guard.record_skip(self.rd.control / sp.SKIP_FILE if self.env.is_main else None, skip)
        self.guard.after_rollback(ckpt.step)
        self.saver.pin_next = ""  # the next save is after the skip, not around the spike
        self.log(f"rollback: spike at step {spike}, reloaded {tag}, skipping samples [{skip.start}, {skip.end})")
        self.ledger.emit("rollback", from_step=step, to_step=ckpt.step, spike_step=spike, tag=tag,
                         skip_start=skip.start, skip_end=skip.end, skip_batches=cfg.skip_batches,
                         rollbacks=self.guard.skips.rollbacks, why=d.why, note=note, deleted=aside[0],
                         set_aside=[f"{sp.ROLLED_BACK}/r{self.guard.skips.rollbacks}-spike{spike}/{t}"
                                    for t in aside[1]])
        self.ledger.alert("warning", f"loss spike at step {spike}: rolled back to {tag}, skipping "
                          f"{cfg.skip_batches} batches (samples {skip.start}-{skip.end - 1})", step=spike)
        dist.barrier()
        return RolledBack(ckpt.step, ckpt.consumed, tag)

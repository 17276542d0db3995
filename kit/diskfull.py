"""A checkpoint save that fails on some ranks ends on every rank at once, and a full disk is named.

Why: a save that hit a full filesystem showed up as ``basic_ios::clear: iostream error`` (torch's
C++ writer keeps no errno) and counted as a crash; the rank that failed left the save while the
others waited in DeepSpeed's barrier until the hang watchdog's ceiling; and the chain then blamed,
and excluded, the node, as if a shared filesystem being full were the node's fault.

So every write of a save runs under a :class:`WriteGuard`: a failure is recorded instead of raised,
the rank carries on through the save's remaining collectives (DeepSpeed's barriers included), and
after the writes all ranks :meth:`WriteGuard.agree` (one all-gather of what failed where). If any rank
failed, every rank raises the same error: :class:`DiskFullError` when a rank's filesystem was full
(ENOSPC, EDQUOT, or a write error with less free space left than the object needed), else a
:class:`kit.errors.CheckpointError`. The trainer turns the first into the segment-end reason
``disk_full`` (kit.exitcodes.DISK_FULL) with a critical alert; the previous checkpoint stays the
newest complete one.

Which node to blame: none, unless the failures differ between nodes (some nodes' writes failed, other
nodes' writes to the same checkpoint folder did not): then the filesystem that filled is the failing
nodes' own (:func:`local_nodes`). A one-node allocation never blames its node: nothing shows the
disk was its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kit import exitcodes
from kit.errors import CheckpointError
from kit.faults import fault_point

FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
MIN_FREE = 1 << 20  # a write error with less than this left is a full disk, whatever the object's size


class DiskFullError(CheckpointError):
    """A checkpoint save found its filesystem full (or over quota). ``nodes``: the nodes whose own
    disk it was (empty: a shared filesystem, or no way to tell)."""

    exit_code = exitcodes.DISK_FULL

    def __init__(self, message: str, failures: list[WriteFailure], nodes: list[str]) -> None:
        super().__init__(message)
        self.failures = failures
        self.nodes = nodes


@dataclass(frozen=True, slots=True)
class WriteFailure:
    rank: int
    node: str
    path: str  # what was being written
    error: str  # the exception, as text
    disk_full: bool
    free_bytes: int  # left on that filesystem after the failure
    total_bytes: int


def space(path: str | Path) -> tuple[int, int]:
    """(free bytes for unprivileged users, total bytes) of the filesystem holding ``path``."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return -1, -1
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def nbytes(obj: Any) -> int:
    """Bytes of the tensors inside a (nested) state dict: what a save of it needs at least."""
    if hasattr(obj, "element_size") and hasattr(obj, "nelement"):
        return int(obj.element_size() * obj.nelement())
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def is_disk_full(exc: BaseException, path: str | Path, need: int = 0) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception's chain; or, for errors that carry no errno (torch's
    C++ writer: ``basic_ios::clear: iostream error``, ``file write failed``), less room left on the
    filesystem than the object needed."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    free, _ = space(path)
    return 0 <= free < max(need, MIN_FREE)


class WriteGuard:
    """Records this rank's first failed checkpoint write instead of raising it (see the module doc)."""

    def __init__(self, rank: int, node: str, step: int = -1) -> None:
        self.rank = rank
        self.node = node
        self.step = step
        self.failure: WriteFailure | None = None

    def run(self, fn: Callable[..., Any], path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a write to ``path``; a failure is recorded (the first one kept).
        After a failure, later writes of the same save are skipped: the save is lost anyway."""
        if self.failure is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # recorded, and raised on every rank by agree(): never swallowed
            need = sum(nbytes(a) for a in (*args, *kwargs.values()))
            free, total = space(path)
            self.failure = WriteFailure(self.rank, self.node, str(path), f"{type(e).__name__}: {e}",
                                        is_disk_full(e, path, need), free, total)
            return None

    @contextlib.contextmanager
    def deepspeed(self, engine: Any) -> Iterator[None]:
        """Route the writes of ``engine.save_checkpoint`` through :meth:`run`: its checkpoint engine's
        ``save`` (every state file) and the recovery scripts rank 0 copies. DeepSpeed's own
        collectives then run on every rank, whichever rank's write failed."""
        ce = engine.checkpoint_engine
        save, copy = ce.save, engine._copy_recovery_script

        def write(state_dict: Any, path: str) -> None:
            fault_point("ckpt.write", self.step, self.rank)  # tests: this rank's own disk is full
            save(state_dict, path)

        ce.save = lambda state_dict, path: self.run(write, path, state_dict, path)
        engine._copy_recovery_script = lambda save_path: self.run(copy, save_path, save_path)
        try:
            yield
        finally:
            ce.save, engine._copy_recovery_script = save, copy

    def agree(self) -> tuple[list[WriteFailure], list[str]]:
        """Collective: every rank's failure (if any) and every rank's node, the same on every rank."""
        import torch.distributed as dist

        mine = (self.node, asdict(self.failure) if self.failure else None)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            gathered: list[Any] = [mine]
        else:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        nodes = sorted({node for node, _ in gathered})
        return [WriteFailure(**f) for _, f in gathered if f], nodes


def local_nodes(failures: list[WriteFailure], nodes: list[str]) -> list[str]:
    """The nodes to blame for a full disk: those that failed while other nodes' writes succeeded."""
    failed = sorted({f.node for f in failures if f.disk_full})
    ok = set(nodes) - {f.node for f in failures}
    return failed if failed and ok else []


def error(step: int, failures: list[WriteFailure], nodes: list[str]) -> CheckpointError:
    """The error every rank raises after a failed save (the same message on every rank)."""
    full = [f for f in failures if f.disk_full]
    where = "; ".join(f"rank {f.rank} ({f.node}) writing {f.path}: {f.error}" for f in failures[:4])
    if not full:
        return CheckpointError(f"the checkpoint save of step {step} failed: {where}")
    f = full[0]
    why = next((text for code, text in FULL_ERRNOS.items() if os.strerror(code) in f.error), "")
    why = why or ("no space left on device" if f.free_bytes < MIN_FREE else "the write failed with too little "
                  "room left for it")
    blamed = local_nodes(failures, nodes)
    whose = (f"the node-local filesystem of {', '.join(blamed)}" if blamed else
             "the shared checkpoint filesystem (no node is to blame)")
    msg = (f"disk full: the checkpoint save of step {step} failed ({why}; {_mib(f.free_bytes)} free of "
           f"{_mib(f.total_bytes)} at {Path(f.path).parent}) on {len(full)} rank(s), {whose}. First error: {where}")
    return DiskFullError(msg, failures, blamed)


def _mib(n: int) -> str:
    return "?" if n < 0 else f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"

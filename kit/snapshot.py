"""A checkpoint's state copied to host memory at a step boundary, in DeepSpeed's own file layout.

Why: a synchronous save stalls training for the whole write (BLOOM-176B: ~40 s per save). The loop
only needs to pause long enough to copy the state somewhere training will not change it; writing,
fsync and hashing can then happen on a thread (kit.asyncsave) while the next steps run.

How, without re-implementing DeepSpeed's checkpoint format: :func:`capture` calls DeepSpeed's own
``engine.save_checkpoint`` with a :class:`CaptureEngine` in place of its checkpoint engine. DeepSpeed
builds every state dict (module, ZeRO optimizer partitions, scheduler, client state; per-layer files
under a pipeline; per tensor-parallel rank files) and names every file exactly as it would for a
synchronous save, and hands each ``(state_dict, path)`` to ``CaptureEngine.save``, which copies the
tensors to host memory instead of writing. The writer later calls ``torch.save`` on the copies with
DeepSpeed's serialization setting, so the files are byte-identical to DeepSpeed's own and
``engine.load_checkpoint`` reads them as usual (tests/test_asyncsave.py checks both).

The copy keeps storage sharing: tensors that are views of one storage (ZeRO's flat buffers, the
fp32 partitions without their padding) are copied as one storage and re-viewed, as ``torch.save``
would serialize them. On a GPU the copy goes to pinned host memory with non-blocking copies and one
CUDA event the writer waits on; buffers are kept between saves (:class:`HostBuffers`), so a save
costs one memcpy of this rank's state, not an allocation (and no page faults) each time.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

# Types that are immutable and small: kept by reference.
_ATOMS = (str, bytes, int, float, bool, complex, type(None), range)


@dataclass
class HostBuffers:
    """Host storages reused from one save to the next (pinned when the source is on a GPU).

    Why: allocating (and on a GPU, pinning) a checkpoint's worth of host memory at every save costs
    more than the copy itself. A save takes buffers with :meth:`take`; the writer returns them with
    :meth:`give_back` once the files are written, so at most one snapshot's worth is held."""

    free: dict[tuple[int, bool], list[Any]] = field(default_factory=dict)

    def take(self, nbytes: int, pinned: bool) -> Any:
        import torch

        pool = self.free.get((nbytes, pinned))
        if pool:
            return pool.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()

    def give_back(self, storages: list[Any]) -> None:
        for s in storages:
            self.free.setdefault((s.nbytes(), bool(s.is_pinned())), []).append(s)

    def held_bytes(self) -> int:
        return sum(k[0] * len(v) for k, v in self.free.items())

    def clear(self) -> None:
        self.free.clear()


@dataclass
class Snapshot:
    """Copies of the state dicts of one save, with the host storages they live in."""

    files: list[tuple[str, Any]] = field(default_factory=list)  # (path DeepSpeed chose, copy; None: written)
    storages: list[Any] = field(default_factory=list)
    nbytes: int = 0  # copied to host memory
    sync_bytes: int = 0  # written during the capture instead (over the memory budget)
    ready: Any = None  # a CUDA event the writer waits on before reading (None on CPU)

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


class _Copier:
    """Deep copy of a state dict: tensors into host storages (one per source storage), containers
    rebuilt, other objects deep-copied. Keeps identity: an object seen twice is copied once."""

    def __init__(self, buffers: HostBuffers, snap: Snapshot) -> None:
        self.buffers = buffers
        self.snap = snap
        self.storages: dict[tuple[str, int], Any] = {}
        self.memo: dict[int, Any] = {}
        self.cuda = False

    def copy(self, obj: Any) -> Any:
        import torch

        if isinstance(obj, _ATOMS):
            return obj
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        out: Any
        if isinstance(obj, torch.Tensor):
            out = self._tensor(obj)
        elif isinstance(obj, dict):
            out = type(obj)() if type(obj) in (dict, OrderedDict) else copy.copy(obj)  # keeps the key order
            self.memo[key] = out
            for k, v in obj.items():
                out[k] = self.copy(v)
            if getattr(obj, "__dict__", None):  # a module state dict's `_metadata` (pickled with it)
                out.__dict__.update(copy.deepcopy(obj.__dict__))
            return out
        elif type(obj) is list:
            out = []
            self.memo[key] = out
            out.extend(self.copy(v) for v in obj)
            return out
        elif type(obj) is tuple:
            out = tuple(self.copy(v) for v in obj)
        elif isinstance(obj, torch.Size):
            out = obj  # immutable
        else:
            out = copy.deepcopy(obj, {})  # optimizer settings, loss scaler, enums: small objects
        self.memo[key] = out
        return out

    def _tensor(self, t: Any) -> Any:
        import torch

        if t.layout != torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return copy.deepcopy(t)  # sparse tensors, other subclasses: not seen in DeepSpeed's state
        src = t.untyped_storage()
        skey = src._cdata  # the storage itself (as torch.save keys it): views share it, even empty ones
        dst = self.storages.get(skey)
        if dst is None:
            pinned = src.device.type == "cuda"
            dst = self.buffers.take(src.nbytes(), pinned)
            dst.copy_(src, non_blocking=pinned)
            self.cuda = self.cuda or pinned
            self.snap.storages.append(dst)
            self.snap.nbytes += src.nbytes()
            self.storages[skey] = dst
        out = torch.empty(0, dtype=t.dtype).set_(dst, t.storage_offset(), t.size(), t.stride())
        if type(t) is torch.nn.Parameter:
            out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
        elif t.requires_grad:
            out.requires_grad_(True)  # torch.save records the flag: keep the file identical
        for k, v in t.__dict__.items():  # pickled with the tensor (ZeRO-3's ds_id, for one)
            setattr(out, k, self.copy(v))
        return out


class CaptureEngine:
    """A DeepSpeed checkpoint engine that snapshots instead of writing (see the module docstring).

    It wraps the engine's own (for ``makedirs``, ``load`` and its serialization setting) and is
    installed only for the duration of one ``save_checkpoint`` call."""

    def __init__(self, inner: Any, buffers: HostBuffers, budget: int | None = None, guard: Any = None) -> None:
        self.inner = inner
        self.name = "KitCaptureEngine"
        self.snap = Snapshot()
        self.buffers = buffers
        self.budget = budget  # bytes of host copies allowed (None: no limit); past it, files are written now
        self.guard = guard  # kit.diskfull.WriteGuard for the writes made now (a failure recorded, not raised)
        self._cuda = False
        self.zipfile_serialization = getattr(inner, "zipfile_serialization", True)

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        # One copier per file, as torch.save shares storages within one file only. Never across
        # files: DeepSpeed's temporaries of one file may be freed and their addresses (and Python
        # ids) reused by the next file's tensors.
        if self.budget is not None and self.snap.nbytes + state_bytes(state_dict) > self.budget:
            self._write_now(str(path), state_dict)  # no room for a copy: write it now
            return
        copier = _Copier(self.buffers, self.snap)
        try:
            self.snap.files.append((str(path), copier.copy(state_dict)))
        except (RuntimeError, MemoryError):  # host (pinned) memory refused: this file is written now
            self._write_now(str(path), state_dict)
        self._cuda = self._cuda or copier.cuda

    def _write_now(self, path: str, state_dict: Any) -> None:
        """Write during the capture (as a synchronous save does), through the guard when there is one: a
        failed write is recorded and every rank goes on through DeepSpeed's barriers (kit.diskfull)."""
        if self.guard is not None:
            self.guard.run(_guarded_write, path, path, state_dict, self.zipfile_serialization, self.guard)
        else:
            write_file(path, state_dict, self.zipfile_serialization)
        self.snap.sync_bytes += state_bytes(state_dict)
        self.snap.files.append((path, None))

    def load(self, path: str, map_location: Any = None) -> Any:
        return self.inner.load(path, map_location=map_location)

    def commit(self, info: Any) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return bool(self.inner.is_data_parallel_writer(dp_rank))

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass

    def preserves_storage_sharing(self) -> bool:
        return True

    def finish(self) -> Snapshot:
        """The snapshot, with a CUDA event to wait on when copies went to pinned memory."""
        if self._cuda:
            import torch

            ev = torch.cuda.Event()
            ev.record()
            self.snap.ready = ev
        return self.snap


def state_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages in a state dict (what a snapshot of it copies)."""
    import torch

    seen: dict[int, int] = {}
    stack, visited = [obj], set()
    while stack:
        o = stack.pop()
        if isinstance(o, _ATOMS) or id(o) in visited:
            continue
        visited.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.layout == torch.strided:
                st = o.untyped_storage()
                seen[st._cdata] = st.nbytes()
            stack.extend(o.__dict__.values())
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list | tuple):
            stack.extend(o)
    return sum(seen.values())


def capture(engine: Any, save_dir: str, tag: str, client_state: dict[str, Any], buffers: HostBuffers,
            budget: int | None = None, guard: Any = None) -> Snapshot:
    """DeepSpeed's ``save_checkpoint`` (collective, as always) with the writes replaced by host copies
    (up to ``budget`` bytes; files past it are written during the call, as a synchronous save would).

    ``save_latest=False``: kit moves ``latest`` itself, after the manifest."""
    inner = engine.checkpoint_engine
    cap = CaptureEngine(inner, buffers, budget, guard)
    engine.checkpoint_engine = cap
    scripts = engine._copy_recovery_script  # rank 0 copies zero_to_fp32.py: a write like the others
    if guard is not None:
        engine._copy_recovery_script = lambda save_path: guard.run(scripts, save_path, save_path)
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = inner
        engine._copy_recovery_script = scripts
    return cap.finish()


def write_file(path: str, state: Any, zipfile_serialization: bool) -> None:
    """What DeepSpeed's TorchCheckpointEngine.save does, on the copy."""
    import torch

    torch.save(state, path, _use_new_zipfile_serialization=zipfile_serialization)


def snap_zipfile(engine: Any) -> bool:
    """DeepSpeed's serialization setting (its checkpoint engine's), which the writer must use too."""
    return bool(getattr(engine.checkpoint_engine, "zipfile_serialization", True))


def _guarded_write(path: str, state: Any, zipfile_serialization: bool, guard: Any) -> None:
    from kit.faults import fault_point

    fault_point("ckpt.write", guard.step, guard.rank)  # tests: this rank's own disk is full
    write_file(path, state, zipfile_serialization)

"""Read full-size fp32 weights out of a DeepSpeed ZeRO-1/2/3 checkpoint, one tensor at a time.

Why not ``deepspeed.utils.zero_to_fp32``: it concatenates every rank's partition into one flat
vector per group and then builds the whole state dict, about 2.3x the fp32 weights in RAM (66 GB
and 47 minutes for BLOOM-176B's converter). The layout it parses is simple, so this module follows
the same rules (read from its source, DeepSpeed 0.19) without building anything whole:

- The optimizer file of each rank holds its partition of the fp32 master weights:
  ``single_partition_of_fp32_groups[g]`` (ZeRO-1/2) or ``fp32_flat_groups[g]`` (ZeRO-3).
- ZeRO-1/2: group ``g``'s full flat vector is the ranks' partitions end to end; parameters lie in it
  in ``param_shapes[g]`` order, each followed by ``param_alignment_paddings[g][i]`` elements.
- ZeRO-3: every parameter is split in ``ceil(numel / world)`` elements per rank (the last padded);
  rank r's piece of parameter i sits at the same running offset in every rank's flat space (the
  groups of a rank end to end). A parameter is its ranks' pieces end to end, cut to numel.

Two ways to the bytes. :meth:`ZeroCheckpoint.file_extents` says where each fp32 partition lies in its
optimizer file, so a writer can copy or pread them without unpickling anything large (tools.convert
does). Otherwise files are opened with ``torch.load(mmap=True)`` (:meth:`ZeroCheckpoint.open`), so only
the bytes of the requested slices are read; touched pages of a mapping count as resident memory until
dropped, so :meth:`ZeroCheckpoint.read_into` drops them (madvise DONTNEED) after each piece, and leaving
the ``with`` block unmaps everything: peak memory stays small whatever the model size.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.errors import CheckpointError

MODEL_STATES_Z12 = "mp_rank_00_model_states.pt"
MODEL_STATES_Z3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_GLOB = "*_optim_states.pt"
MODEL_STATES_MP = "mp_rank_{mp:02d}_model_states.pt"  # one per model-parallel rank (tensor x pipeline)
OPTIM_GLOB_MP = "*_mp_rank_{mp:02d}_optim_states.pt"
FP32_Z12 = "single_partition_of_fp32_groups"
FP32_Z3 = "fp32_flat_groups"


MADV_DONTNEED = 4
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a whole range in with one call


class _Advice:
    """madvise(2) on the mapped partitions, through libc.

    Faulting a mapped file in page by page is what makes reading a mapping slow (about 2x a plain
    copy here); POPULATE_READ maps a whole range at once. DONTNEED drops the pages of a range once
    copied out (safe: the mapping is private and never written, so a later read re-reads the file);
    that keeps resident memory at the output buffers, whatever the model size. Where madvise is
    missing or refuses (another OS, an old kernel) reading still works, only slower: it is switched
    off after the first refusal.
    """

    def __init__(self) -> None:
        import ctypes
        import ctypes.util
        import os

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fn: Any = None
        name = ctypes.util.find_library("c")
        if name:
            fn = ctypes.CDLL(name, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self.fn = fn

    def __call__(self, t: Any, advice: int) -> None:
        if self.fn is None:
            return
        start = t.data_ptr()
        end = start + t.numel() * t.element_size()
        start -= start % self.page
        if end > start and self.fn(start, end - start, advice) != 0:
            self.fn = None


advise = _Advice()


def _natural(p: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:  # torch reports a torn zip as RuntimeError
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0]}); the checkpoint is damaged, "
                              "choose another step") from None


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """Where one parameter lives in the flat fp32 partitions."""

    name: str
    shape: tuple[int, ...]
    group: int  # ZeRO-1/2 only: the param group
    offset: int  # ZeRO-1/2: in the group's full flat vector; ZeRO-3: in each rank's flat space

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class ZeroCheckpoint:
    """One DeepSpeed checkpoint folder: its parameter layout, read once, then tensors on demand.

    ``mp_rank``: with tensor or pipeline parallelism each model-parallel rank (a tensor shard of a
    pipeline stage) has its own model-states file and ZeRO partitions over the data-parallel ranks;
    this reads one of them (tools.layout_reader puts them together). None: the whole folder, as
    written without model parallelism."""

    def __init__(self, path: Path, mp_rank: int | None = None) -> None:
        self.path = Path(path)
        self.mp_rank = mp_rank
        pattern = OPTIM_GLOB if mp_rank is None else OPTIM_GLOB_MP.format(mp=mp_rank)
        self.optim_files = sorted(self.path.glob(pattern), key=_natural)
        if not self.optim_files:
            raise CheckpointError(f"{self.path} has no ZeRO optimizer files ({OPTIM_GLOB}); "
                                  "is it a DeepSpeed ZeRO checkpoint?")
        first = _load(self.optim_files[0])["optimizer_state_dict"]
        self.stage = int(first.get("zero_stage", 0))
        if self.stage not in (1, 2, 3):
            raise CheckpointError(f"{self.path}: ZeRO stage {self.stage} is not supported (1, 2 or 3)")
        pc = first.get("partition_count")
        self.world_size = int(max(pc) if isinstance(pc, list) else pc)
        if self.world_size != len(self.optim_files):
            raise CheckpointError(
                f"{self.path} was written by {self.world_size} ranks but holds {len(self.optim_files)} "
                f"optimizer files: shards are missing; choose another step")
        self._key = FP32_Z12 if self.stage <= 2 else FP32_Z3
        self.group_sizes = [int(t.numel()) for t in first[self._key]]
        paddings = first.get("param_alignment_paddings")
        del first
        ms_file = self.path / (MODEL_STATES_Z12 if self.stage <= 2 else MODEL_STATES_Z3)
        if mp_rank is not None:
            ms_file = self.path / MODEL_STATES_MP.format(mp=mp_rank)
        if not ms_file.exists():
            raise CheckpointError(f"{ms_file} is missing: the checkpoint is incomplete; choose another step")
        ms = _load(ms_file)
        if ms.get("frozen_param_shapes"):
            raise CheckpointError(f"{self.path} has frozen parameters, which kit's converter does not handle")
        self.shared: dict[str, str] = dict(ms.get("shared_params", {}))
        self.buffer_names: list[str] = list(ms.get("buffer_names", []))
        self.ds_version = str(ms.get("ds_version", ""))
        self.params = self._layout(ms["param_shapes"], paddings)
        del ms

    def _layout(self, param_shapes: list[dict[str, Any]], paddings: list[list[int]] | None) -> list[ParamSpec]:
        specs: list[ParamSpec] = []
        if self.stage <= 2:
            for g, shapes in enumerate(param_shapes):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    spec = ParamSpec(name, tuple(shape), g, offset)
                    specs.append(spec)
                    offset += spec.numel + (paddings[g][i] if paddings else 0)
                if offset > self.group_sizes[g] * self.world_size:
                    raise CheckpointError(f"{self.path}: group {g} needs {offset} elements but the partitions "
                                          f"hold {self.group_sizes[g] * self.world_size}; files do not match")
        else:
            offset = 0
            for shapes in param_shapes:
                for name, shape in shapes.items():
                    spec = ParamSpec(name, tuple(shape), 0, offset)
                    specs.append(spec)
                    offset += math.ceil(spec.numel / self.world_size)
            if offset != sum(self.group_sizes):
                raise CheckpointError(f"{self.path}: parameters need {offset} elements per rank, the partitions "
                                      f"hold {sum(self.group_sizes)}; files do not match")
        return specs

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @contextlib.contextmanager
    def open(self) -> Iterator[list[list[Any]]]:
        """Map every rank's fp32 partitions; leaving the block drops the mappings (and their pages)."""
        parts: list[list[Any]] = []
        try:
            for f in self.optim_files:
                osd = _load(f)["optimizer_state_dict"]
                groups = list(osd[self._key])
                if [int(t.numel()) for t in groups] != self.group_sizes:
                    raise CheckpointError(f"{f}: its partitions differ in size from rank 0's; files do not match")
                parts.append(groups)
                del osd
            yield parts
        finally:
            parts.clear()
            gc.collect()  # unpickled state can hold cycles; collect them so the mappings (and pages) go now

    def tensor(self, parts: list[list[Any]], spec: ParamSpec) -> Any:
        """The full fp32 tensor of one parameter, as a fresh tensor."""
        import torch

        out = torch.empty(spec.numel, dtype=torch.float32)
        self.read_into(parts, spec, out)
        return out.view(spec.shape)

    def ranges(self, spec: ParamSpec) -> list[tuple[int, int, int, int]]:
        """Where one parameter's elements lie, in order: (rank, group, first element in that rank's
        partition of the group, count), cut to the parameter's numel (ZeRO-3's padding left out)."""
        out: list[tuple[int, int, int, int]] = []
        if self.stage <= 2:
            size = self.group_sizes[spec.group]
            lo, hi = spec.offset, spec.offset + spec.numel
            for r in range(lo // size, (hi - 1) // size + 1):
                a, b = max(lo, r * size) - r * size, min(hi, (r + 1) * size) - r * size
                out.append((r, spec.group, a, b - a))
            return out
        per_rank, left = math.ceil(spec.numel / self.world_size), spec.numel
        for r in range(self.world_size):
            start = 0
            for g, size in enumerate(self.group_sizes):
                lo, hi = max(spec.offset, start), min(spec.offset + per_rank, start + size)
                take = min(hi - lo, left)
                if take > 0:
                    out.append((r, g, lo - start, take))
                    left -= take
                start += size
        return out

    def pieces(self, parts: list[list[Any]], spec: ParamSpec) -> list[Any]:
        """The 1-D views of the mappings that hold one parameter, in order (see :meth:`ranges`)."""
        return [parts[r][g][a:a + n] for r, g, a, n in self.ranges(spec)]

    def file_extents(self) -> list[list[tuple[int, int]]] | None:
        """Per rank, per group: (byte offset in the rank's optimizer file, numel) of its fp32 partition.

        With these, a converter writing fp32 copies the weights file to file in the kernel (sendfile),
        never through this process. torch.save writes each storage as an uncompressed zip record;
        ``torch.load(map_location="meta")`` reports where (``UntypedStorage._checkpoint_offset``, what
        torch's own meta/fake loading uses). That attribute is torch's internal, so every extent is
        checked against the bytes that the usual mmap load gives (its first and last 4 KiB); None when
        the attribute is missing or disagrees, or a partition is not contiguous little-endian fp32:
        callers then read through the mappings (:meth:`read_into`), only slower.
        """
        import sys

        import torch

        if sys.byteorder != "little":
            return None
        extents: list[list[tuple[int, int]]] = []
        for f in self.optim_files:
            try:
                meta = torch.load(f, map_location="meta", weights_only=False)["optimizer_state_dict"][self._key]
            except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError):
                return None  # this shortcut failed: read through the mappings instead
            groups = []
            for t in meta:
                off = getattr(t.untyped_storage(), "_checkpoint_offset", None)
                if t.dtype != torch.float32 or not t.is_contiguous() or not isinstance(off, int):
                    return None
                groups.append((off + t.storage_offset() * 4, int(t.numel())))
            if [n for _, n in groups] != self.group_sizes:
                return None
            extents.append(groups)
            del meta
        for f, groups in zip(self.optim_files, extents, strict=True):
            mapped = _load(f)["optimizer_state_dict"][self._key]  # only the compared pages are read
            with open(f, "rb") as fh:
                for (off, n), t in zip(groups, mapped, strict=True):
                    k = min(n, 1024)
                    for first in (0, n - k):
                        want = t.detach()[first:first + k].numpy().tobytes()
                        if os.pread(fh.fileno(), 4 * k, off + 4 * first) != want:
                            return None
            del mapped
        return extents

    def read_into(self, parts: list[list[Any]], spec: ParamSpec, out: Any) -> None:
        """Copy one parameter into ``out`` (1-D, numel elements, any float dtype: cast on the way), one
        piece at a time: fault the piece in at once, copy it, drop its pages."""
        import torch

        pos, n = 0, spec.numel
        with torch.no_grad():
            for piece in self.pieces(parts, spec):
                take = min(piece.numel(), n - pos)
                if take <= 0:
                    break
                src = piece.detach()[:take]
                advise(src, MADV_POPULATE_READ)
                out[pos:pos + take].copy_(src)
                advise(src, MADV_DONTNEED)
                pos += take
        if pos != n:
            raise CheckpointError(f"{self.path}: {spec.name} needs {n} elements, the partitions gave {pos}")

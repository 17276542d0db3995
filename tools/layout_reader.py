"""A checkpoint written at a tensor x pipeline x data layout, read as one BloomForCausalLM.

Each model-parallel rank ``m = stage * T + tensor`` of the layout (kit.parallel.layout) has its own
``mp_rank_<m>`` model states and ZeRO partitions over the data-parallel ranks; tools.zero_reader
reads one of them (``ZeroCheckpoint(path, mp_rank=m)``). This module puts them together without
reading a weight: for every parameter of BloomForCausalLM, the list of places its elements lie in,
in the order of the full tensor, so that tools.convert streams them into the export exactly as it
streams a data-parallel checkpoint (:class:`LayoutCheckpoint` has ZeroCheckpoint's interface).

- Pipeline names (``<layer>.<name>``, ``tied_modules.embed.*``) become BloomForCausalLM's names
  (kit.parallel.pipe.hf_name); the tied embedding, held by the first and the last stage, is read
  from the first.
- Tensor shards are merged along the one dimension in which they are smaller than the full
  parameter (from the model's shapes): column-parallel weights and biases (``query_key_value``,
  ``dense_h_to_4h``) along rows, i.e. one shard after the other; row-parallel weights
  (``self_attention.dense``, ``dense_4h_to_h``) along columns, i.e. row by row, a piece of each
  shard in turn. Replicated parameters (LayerNorms, row-parallel biases) come from tensor rank 0.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kit.errors import CheckpointError
from kit.parallel.layout import Layout
from kit.tools.zero_reader import ParamSpec, ZeroCheckpoint

Range = tuple[int, int, int, int]  # (file index, group, first element, count)


class LayoutCheckpoint:
    """The parameters of one checkpoint written at ``layout``, as ZeroCheckpoint shows a plain one."""

    def __init__(self, path: Path, layout: Layout, full_shapes: dict[str, tuple[int, ...]], n_layer: int) -> None:
        from kit.parallel.pipe import hf_name

        self.path = Path(path)
        self.layout = layout
        self.readers: list[ZeroCheckpoint] = []
        self.optim_files: list[Path] = []
        self._first_file: list[int] = []
        for m in range(layout.model_parallel):
            r = ZeroCheckpoint(self.path, mp_rank=m)
            if r.world_size != layout.data:
                raise CheckpointError(f"{self.path}: model-parallel rank {m} has {r.world_size} ZeRO partitions, "
                                      f"the layout {layout} has {layout.data} data-parallel ranks; files are missing")
            self._first_file.append(len(self.optim_files))
            self.readers.append(r)
            self.optim_files += r.optim_files
        self.stage = self.readers[0].stage
        self.world_size = layout.data
        self.shared = {"lm_head.weight": "transformer.word_embeddings.weight"}
        # HF name -> [(tensor rank, reader index, spec)], first pipeline stage that holds it
        found: dict[str, list[tuple[int, int, ParamSpec]]] = {}
        for m, r in enumerate(self.readers):
            stage, tensor = divmod(m, layout.tensor)
            for spec in r.params:
                name = hf_name(spec.name, n_layer) if layout.pipeline > 1 else spec.name
                shards = found.setdefault(name, [])
                if tensor == len(shards) and (not shards or shards[0][1] // layout.tensor == stage):
                    shards.append((tensor, m, spec))
        self.params: list[ParamSpec] = []
        self._pieces: dict[str, list[tuple[int, ParamSpec]]] = {}
        self._dim: dict[str, int | None] = {}
        for name, shards in found.items():
            if name not in full_shapes:
                raise CheckpointError(f"{self.path}: {name} is not a parameter of this run's model")
            full = tuple(full_shapes[name])
            self._dim[name] = _shard_dim(name, [s.shape for _, _, s in shards], full, layout.tensor)
            self._pieces[name] = [(m, s) for _, m, s in shards]
            self.params.append(ParamSpec(name, full, 0, 0))

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    def ranges(self, spec: ParamSpec) -> list[Range]:
        """Where the parameter's elements lie, in the full tensor's order (file index into optim_files)."""
        shards = self._pieces[spec.name]
        dim = self._dim[spec.name]
        if dim is None:  # replicated: tensor rank 0's copy
            shards = shards[:1]
        per_shard = [self._shard_ranges(m, s) for m, s in shards]
        if dim is None or dim == 0:
            return [r for rs in per_shard for r in rs]
        rows = math.prod(spec.shape[:dim])  # dim 1 of a 2-D weight: each row is a piece of every shard in turn
        out: list[Range] = []
        for i in range(rows):
            for (_, s), rs in zip(shards, per_shard, strict=True):
                width = s.numel // rows
                out += _cut(rs, i * width, width)
        return out

    def _shard_ranges(self, m: int, spec: ParamSpec) -> list[Range]:
        first = self._first_file[m]
        return [(first + f, g, a, n) for f, g, a, n in self.readers[m].ranges(spec)]

    def file_extents(self) -> list[list[tuple[int, int]]] | None:
        out: list[list[tuple[int, int]]] = []
        for r in self.readers:
            ext = r.file_extents()
            if ext is None:
                return None
            out += ext
        return out

    @contextlib.contextmanager
    def open(self) -> Iterator[list[list[Any]]]:
        with contextlib.ExitStack() as stack:
            parts: list[list[Any]] = []
            for r in self.readers:
                parts += stack.enter_context(r.open())
            yield parts


def _shard_dim(name: str, shapes: list[tuple[int, ...]], full: tuple[int, ...], tensor: int) -> int | None:
    """The dimension the tensor shards split (None: replicated, every shard is the whole parameter)."""
    if len(shapes) != tensor:
        raise CheckpointError(f"{name}: {len(shapes)} tensor shards in the checkpoint, the layout has {tensor}")
    if all(tuple(s) == full for s in shapes):
        return None
    dims = [d for d in range(len(full)) if shapes[0][d] != full[d]]
    ok = len(dims) == 1 and dims[0] <= 1 and all(
        len(s) == len(full) and sum(x[dims[0]] for x in shapes) == full[dims[0]] and
        all(s[d] == full[d] for d in range(len(full)) if d != dims[0]) for s in shapes)
    if not ok:
        raise CheckpointError(f"{name}: tensor shards {shapes} do not make a {full} parameter; "
                              "the checkpoint does not match this run's model")
    return dims[0]


def _cut(ranges: list[Range], start: int, count: int) -> list[Range]:
    """The sub-ranges covering elements [start, start + count) of the concatenation of ``ranges``."""
    out: list[Range] = []
    pos = 0
    for f, g, a, n in ranges:
        lo, hi = max(start, pos), min(start + count, pos + n)
        if lo < hi:
            out.append((f, g, a + lo - pos, hi - lo))
        pos += n
        if pos >= start + count:
            break
    return out


def open_checkpoint(path: Path, layout: Layout, full_shapes: dict[str, tuple[int, ...]],
                    n_layer: int) -> ZeroCheckpoint | LayoutCheckpoint:
    """The reader for a checkpoint folder written at ``layout`` (kit.checkpoint.layout_of): plain data
    parallel, or any tensor x pipeline layout."""
    if layout.plain:
        return ZeroCheckpoint(path)
    return LayoutCheckpoint(path, layout, full_shapes, n_layer)

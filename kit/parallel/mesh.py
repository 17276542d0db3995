"""The process groups of a layout: DeepSpeed's PipelineParallelGrid over kit's rank order.

One mpu for every layout. DeepSpeed's grid is generic in its axes; kit gives it the axes
``data, pipe, model`` (model = tensor, fastest), which is kit.parallel.layout's order, so the grid's
groups and :meth:`Layout.coords` always agree. The pipeline engine takes the grid from the
PipelineModule (built on the same topology); other engines get it as ``mpu``.

DeepSpeed's AutoTP reads the tensor group from its global ``deepspeed.utils.groups`` in training
mode; :func:`install_deepspeed_groups` points those globals at the grid's groups (the same thing
``groups._init_tp_mesh_device`` does for a (data, tensor) mesh, which cannot describe pipeline stages).

A plain data-parallel layout builds no grid at all: the engine runs exactly as before layouts
existed (world group, no mpu).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kit.parallel.layout import Coords, Layout

AXES = ("data", "pipe", "model")  # slowest to fastest: kit.parallel.layout's rank order


def topology(layout: Layout) -> Any:
    from deepspeed.runtime.pipe.topology import ProcessTopology

    return ProcessTopology(axes=list(AXES), dims=[layout.data, layout.pipeline, layout.tensor])


@dataclass(slots=True)
class Mesh:
    """This rank in its layout, with the groups the trainer needs (None = the whole world)."""

    layout: Layout
    rank: int
    grid: Any = None  # DeepSpeed PipelineParallelGrid; None for a plain data-parallel layout

    @property
    def coords(self) -> Coords:
        return self.layout.coords(self.rank)

    @property
    def first_stage(self) -> bool:
        return self.coords.pipeline == 0

    @property
    def last_stage(self) -> bool:
        return self.coords.pipeline == self.layout.pipeline - 1

    @property
    def reports_loss(self) -> bool:
        """One rank per model replica contributes the replica's loss to the step's all-reduce: the last
        stage's first tensor rank (every tensor rank of it computes the same loss)."""
        c = self.coords
        return self.last_stage and c.tensor == 0

    @property
    def tensor_group(self) -> Any:
        return self.grid.get_slice_parallel_group() if self.grid is not None else None

    @property
    def data_group(self) -> Any:
        return self.grid.get_data_parallel_group() if self.grid is not None else None

    @property
    def mpu(self) -> Any:
        return self.grid


def build_mesh(layout: Layout, rank: int, grid: Any = None) -> Mesh:
    """The mesh of this rank: ``grid`` (a PipelineModule's) or a new one; none for a plain layout."""
    if layout.plain:
        return Mesh(layout, rank)
    if grid is None:
        from deepspeed.runtime.pipe.topology import PipelineParallelGrid

        grid = PipelineParallelGrid(topology=topology(layout))
    c = layout.coords(rank)
    got = (grid.get_slice_parallel_rank(), grid.get_stage_id(), grid.get_data_parallel_id())
    if got != (c.tensor, c.pipeline, c.data):
        raise RuntimeError(f"DeepSpeed's grid puts rank {rank} at {got}, kit's layout at {c}: topologies disagree")
    install_deepspeed_groups(grid)
    return Mesh(layout, rank, grid)


def install_deepspeed_groups(grid: Any) -> None:
    """Point DeepSpeed's global tensor/data/model-parallel groups at the grid's (AutoTP reads them)."""
    from deepspeed.utils import groups

    groups._TENSOR_MODEL_PARALLEL_GROUP = grid.get_slice_parallel_group()
    groups._DATA_PARALLEL_GROUP = grid.get_data_parallel_group()
    groups._MODEL_PARALLEL_GROUP = grid.get_model_parallel_group()

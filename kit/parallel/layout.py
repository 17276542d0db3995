"""Where a rank sits in the tensor x pipeline x data layout: pure arithmetic, no torch.

The order is tensor-fastest, then pipeline, then data (``[parallel]`` in kit.config)::

    rank = tensor + T * (pipeline + P * data)

so the T ranks of a tensor group are consecutive (one node's NVLink, as Megatron-DeepSpeed placed
BLOOM-176B's TP=4), a pipeline's P stages come next, and data parallelism spans the rest. Everything
that names a rank (events, checkpoints, the monitor, the preflight) uses :func:`coords` so that they
agree; kit.parallel.mesh builds DeepSpeed's process groups from the same order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar


class _Ranked(Protocol):
    @property
    def rank(self) -> int: ...


T = TypeVar("T", bound=_Ranked)


@dataclass(frozen=True, slots=True)
class Coords:
    """A rank's place: its tensor rank, pipeline stage and data-parallel replica."""

    tensor: int
    pipeline: int
    data: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        """How events and alerts name the place: ``tensor 1, pipeline 0, data 3``."""
        return f"tensor {self.tensor}, pipeline {self.pipeline}, data {self.data}"


@dataclass(frozen=True, slots=True)
class Layout:
    """The degrees of the three dimensions; ``world = tensor * pipeline * data``."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    def __post_init__(self) -> None:
        for k in ("tensor", "pipeline", "data"):
            if getattr(self, k) < 1:
                raise ValueError(f"layout {k} must be at least 1, got {getattr(self, k)}")

    @classmethod
    def of(cls, tensor: int, pipeline: int, world: int) -> Layout:
        """The layout of ``world`` ranks with these tensor and pipeline degrees (data is the rest)."""
        mp = tensor * pipeline
        if world % mp:
            raise ValueError(f"{world} ranks are not a multiple of tensor x pipeline = {tensor} x {pipeline}")
        return cls(tensor, pipeline, world // mp)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, world: int = 1) -> Layout:
        """From a manifest's ``layout`` (a checkpoint written before layouts existed: ``world`` x DP)."""
        if not d:
            return cls(1, 1, world)
        return cls(int(d.get("tensor", 1)), int(d.get("pipeline", 1)), int(d.get("data", 1)))

    @property
    def world(self) -> int:
        return self.tensor * self.pipeline * self.data

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the model between them."""
        return self.tensor * self.pipeline

    @property
    def plain(self) -> bool:
        """Data parallel only (the layout kit trained before tensor and pipeline parallelism)."""
        return self.tensor == 1 and self.pipeline == 1

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside a world of {self.world} ({self})")
        return Coords(rank % self.tensor, (rank // self.tensor) % self.pipeline, rank // self.model_parallel)

    def rank(self, tensor: int, pipeline: int, data: int) -> int:
        return tensor + self.tensor * (pipeline + self.pipeline * data)

    def model_rank(self, rank: int) -> int:
        """The rank's index within its model replica (pipeline-major, tensor-minor): DeepSpeed's
        ``mp_rank_XX`` in checkpoint file names."""
        c = self.coords(rank)
        return c.pipeline * self.tensor + c.tensor

    def to_dict(self) -> dict[str, int]:
        return {"tensor": self.tensor, "pipeline": self.pipeline, "data": self.data}

    def __str__(self) -> str:
        parts = [f"TP{self.tensor}"] if self.tensor > 1 else []
        parts += [f"PP{self.pipeline}"] if self.pipeline > 1 else []
        return "x".join([*parts, f"DP{self.data}"])


def coords(rank: int, layout: Layout) -> Coords:
    """``rank``'s (tensor, pipeline, data) coordinates in ``layout``."""
    return layout.coords(rank)


def layout_of(cfg: Any, world: int) -> Layout:
    """The layout a recipe (kit.config.RunConfig) gives ``world`` ranks."""
    return Layout.of(cfg.parallel.tensor, cfg.parallel.pipeline, world)


def placed(ranks: list[T], layout: Layout) -> list[T]:
    """A rank table (kit.stragglers.RankInfo rows: ``rank`` and ``coords`` fields) with every rank's
    coordinates filled in, so that health events and alerts name them; unchanged when the table is
    not the layout's world (a set-up table from the environment, a partial one)."""
    if len(ranks) != layout.world:
        return ranks
    return [dataclasses.replace(r, coords=layout.coords(r.rank)) for r in ranks]  # type: ignore[type-var]

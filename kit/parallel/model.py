"""The model of a layout, ready for ``deepspeed.initialize``: one BLOOM definition for all of them.

- plain data parallel: transformers' BloomForCausalLM, as kit always trained it;
- tensor > 1: the same model (or the pipeline stage), its blocks sharded by AutoTP, alibi per rank;
- pipeline > 1: the stage's layers of kit.parallel.pipe (transformers' BloomBlock in each stage).

Initial weights are those of BloomForCausalLM built with the caller's RNG state (the run's seed), so
every layout starts from the same model; tensor shards and pipeline stages are cut from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kit.config import ModelSection
from kit.parallel.layout import Layout
from kit.parallel.mesh import Mesh, build_mesh, topology


@dataclass(slots=True)
class LayoutModel:
    module: Any  # what deepspeed.initialize trains: BloomForCausalLM or a PipelineModule
    mesh: Mesh
    config: Any  # the transformers BloomConfig

    @property
    def pipelined(self) -> bool:
        return self.mesh.layout.pipeline > 1

    @property
    def mpu(self) -> Any:
        """The mpu to hand deepspeed.initialize (None: the PipelineModule brings its own grid, or a
        plain layout needs none)."""
        return None if self.pipelined else self.mesh.mpu


def build(m: ModelSection, vocab_size: int, layout: Layout, rank: int, dtype: Any = None,
          alibi_wrong: bool = False) -> LayoutModel:
    """Build this rank's part of the model. Collective when the layout is not plain (process groups)."""
    from kit.model import build_model
    from kit.parallel.tensor import apply_autotp, install_alibi_slicing

    hf = build_model(m, vocab_size)
    config = hf.config
    if dtype is not None:
        hf = hf.to(dtype)
    module: Any = hf
    if layout.pipeline > 1:
        from kit.parallel.pipe import build_pipeline

        module = build_pipeline(config, topology(layout), m.activation_checkpointing, hf.state_dict())
        mesh = build_mesh(layout, rank, grid=module._grid)
    else:
        mesh = build_mesh(layout, rank)
    if layout.tensor > 1:
        apply_autotp(module, config, layout.tensor, mesh.tensor_group, reference=hf)
        install_alibi_slicing(module, config.n_head, mesh.coords.tensor, wrong=alibi_wrong)
    del hf  # a pipeline stage holds its own copies of its layers
    return LayoutModel(module, mesh, config)

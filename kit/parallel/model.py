"""The model of a layout, ready for ``deepspeed.initialize``: one BLOOM definition for all of them.

- plain data parallel: transformers' BloomForCausalLM, as kit always trained it;
- tensor > 1: the same model (or the pipeline stage), its blocks sharded by AutoTP, alibi per rank;
- pipeline > 1: the stage's layers of kit.parallel.pipe (transformers' BloomBlock in each stage).

Initial weights are a function of (run seed, Hugging Face parameter name) only
(kit.model.init_parameter), so every layout starts from the same model without any rank building
the whole of it: the rank's module (whole model, or its pipeline stage) is built on the meta device,
AutoTP shards it there if tensor > 1, and each parameter is then filled with its initial value (cut
to the rank's shard: kit.parallel.tensor.shard). Setup memory per rank: what it holds, plus one
full parameter at a time. (Until this change the weights were drawn from the global RNG in module
order while building the whole BloomForCausalLM on every rank: new runs start from different,
equally distributed, weights; resumed runs load their checkpoints and are unaffected.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
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
          alibi_wrong: bool = False, seed: int | None = None) -> LayoutModel:
    """Build this rank's part of the model with the initial weights of ``seed`` (None: torch's
    initial seed, what kit.engine.seed_everything set). Collective when the layout is not plain
    (process groups). The global RNG state is left as it was (the dropout stream starts there)."""
    import torch

    from kit.model import meta_model

    seed = torch.initial_seed() if seed is None else seed
    rng = torch.get_rng_state()
    hf = meta_model(m, vocab_size)  # meta: structure only (AutoTP's parser reads it)
    config = hf.config
    module: Any = hf
    names = _same
    if layout.pipeline > 1:
        from kit.parallel.pipe import build_pipeline, hf_name

        module = build_pipeline(config, topology(layout), m.activation_checkpointing)
        mesh = build_mesh(layout, rank, grid=module._grid)
        names = partial(hf_name, n_layer=config.n_layer)
    else:
        mesh = build_mesh(layout, rank)
    if layout.tensor > 1:
        from kit.parallel.tensor import apply_autotp, install_alibi_slicing

        apply_autotp(module, config, layout.tensor, mesh.tensor_group, reference=hf)
        install_alibi_slicing(module, config.n_head, mesh.coords.tensor, wrong=alibi_wrong)
    fill(module, config, seed, names, mesh.coords.tensor if layout.tensor > 1 else None, dtype)
    torch.set_rng_state(rng)
    return LayoutModel(module, mesh, config)


def _same(name: str) -> str:
    return name


def fill(module: Any, config: Any, seed: int, hf_name: Callable[[str], str], tp_rank: int | None,
         dtype: Any = None) -> None:
    """Materialize ``module`` (on the meta device) with the initial weights: each parameter's full
    value drawn by its HF name, cut to this rank's tensor shard when ``tp_rank`` is given."""
    from kit.model import init_parameter, materialize

    def value(name: str, p: Any) -> Any:
        if tp_rank is None:
            return init_parameter(hf_name(name), tuple(p.shape), config, seed)
        from kit.parallel.tensor import full_shape, shard

        return shard(init_parameter(hf_name(name), full_shape(p), config, seed), p, tp_rank)

    materialize(module, value, dtype)

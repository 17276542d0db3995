"""Tensor parallelism: DeepSpeed's AutoTP shards the BLOOM blocks; kit slices alibi per rank.

Why AutoTP is applied here and not by ``deepspeed.initialize`` (``tensor_parallel.autotp_size``):
the engine's own path replaces the engine's mpu with DeepSpeed's global ``groups`` module, whose
groups are a (data, tensor) mesh. With pipeline stages that mesh is wrong (the stages' checkpoint
files collide, the model-parallel grad-norm group misses the other stages). kit keeps one mpu for
every layout (kit.parallel.mesh: DeepSpeed's PipelineParallelGrid over kit's rank order) and calls
the same AutoTP machinery the engine would (``AutoTP.tp_parser`` + ``replace_transformer_layer``
in training mode) on the model, before the engine is built. The engine then only sees sharded
parameters and a grid whose tensor group matches them.

What AutoTP does to a BloomBlock (measured, ../shared/notes/parallel-cpu.md): ``query_key_value``
and ``dense_h_to_4h`` become column-parallel (each rank a contiguous block of rows: BLOOM stores
q, k, v per head, so a rank holds whole heads ``[r * H/T, (r+1) * H/T)``); ``self_attention.dense``
and ``dense_4h_to_h`` become row-parallel (an all-reduce after them); LayerNorms, the embedding and
the tied head stay replicated.

What AutoTP does not do: slice alibi. BLOOM builds one alibi tensor for all heads at the model (or,
in the pipeline, in each block); a rank with H/T heads needs its own heads' slopes. Without a fix
the shapes disagree (an error); DeepSpeed's ``bloom`` preset instead builds alibi for H/T heads,
i.e. the slopes of a smaller model, and trains silently wrong. :func:`install_alibi_slicing` puts a
forward pre-hook on every attention module that keeps the rank's own heads of the full alibi:
one fix for both model forms, independent of whether an attention mask was passed.

Initial weights under tensor parallelism: AutoTP runs on the model (or stage) while it is still on
the meta device; its partitioning of a meta tensor is only bookkeeping. Each sharded parameter then
records (DeepSpeed's universal-checkpoint metadata, the same record `kit reshape` relies on) its full
shape and an affine map of the pieces each rank holds; :func:`shard` cuts this rank's part of the
full initial value by that record, so a rank never holds more than one full parameter at a time.
"""

from __future__ import annotations

from typing import Any

ALIBI_FAULT = "alibi.wrong"  # kit.faults value fault: every rank keeps heads 0..H/T-1 (the negative test)


def apply_autotp(module: Any, model_config: Any, tensor: int, tp_group: Any, reference: Any = None) -> None:
    """Shard ``module``'s BLOOM blocks over ``tp_group`` with DeepSpeed's AutoTP (training mode), and
    record what DeepSpeed's universal checkpoints need to merge and re-split the shards.

    AutoTP's parser reads the model's structure (its printed form and its ModuleLists), which a
    PipelineModule does not have: the policy (which block class, which of its linears are
    row-parallel) is parsed from ``reference`` (the BloomForCausalLM the stage was cut from) and
    applied to the blocks of ``module`` that are that class or a subclass of it (BloomBlockPipe)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.module_inject import replace_transformer_layer
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.layers import (
        collect_autotp_universal_checkpoint_info,
        configure_tensor_parallel_runtime,
        set_autotp_mode,
    )
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config

    set_autotp_mode(training=True)
    tp_config = get_tensor_parallel_config({"tensor_parallel": {"autotp_size": tensor}})
    configure_tensor_parallel_runtime(tp_config)
    tp_config.tensor_parallel.tp_size = tensor
    tp_config.tensor_parallel.tp_group = tp_group
    classes = {type(m) for m in module.modules()}
    for block_class, row_parallel in AutoTP.tp_parser(module if reference is None else reference):
        for target in sorted((c for c in classes if issubclass(c, block_class)), key=lambda c: c.__name__):
            tp_config.injection_policy_tuple = row_parallel
            replace_transformer_layer(target, module, None, tp_config, model_config, training_mode=True)
    setattr(module, UNIVERSAL_CHECKPOINT_INFO, collect_autotp_universal_checkpoint_info(module))
    module.ds_autotp_parsed = True


def install_alibi_slicing(module: Any, n_head: int, tp_rank: int, wrong: bool = False) -> int:
    """Make every BloomAttention under ``module`` use its own heads' rows of the full alibi tensor;
    returns how many attention modules were hooked. ``wrong`` (tests only) keeps the first heads'
    rows on every rank: the silent error a missing slice makes."""
    from transformers.models.bloom.modeling_bloom import BloomAttention

    hooked = 0
    for m in module.modules():
        if isinstance(m, BloomAttention):
            local = int(m.num_heads)
            if local * (n_head // local) != n_head:
                raise ValueError(f"attention has {local} heads per rank, which does not divide {n_head}")
            m.register_forward_pre_hook(_alibi_hook(n_head, local, 0 if wrong else tp_rank * local),
                                        with_kwargs=True)
            hooked += 1
    return hooked


def _alibi_hook(n_head: int, local: int, first: int) -> Any:
    def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        alibi = kwargs["alibi"]
        hidden = args[0] if args else kwargs["hidden_states"]
        b = hidden.shape[0]
        if alibi.shape[0] == b * n_head and local != n_head:  # the whole model's alibi: keep this rank's heads
            mine = alibi.view(b, n_head, *alibi.shape[1:])[:, first:first + local]
            kwargs["alibi"] = mine.reshape(b * local, *alibi.shape[1:])
        elif alibi.shape[0] != b * local:
            raise RuntimeError(f"alibi has {alibi.shape[0]} rows for a batch of {b} and {n_head} heads "
                               f"({local} on this rank)")
        return args, kwargs

    return hook


def full_shape(param: Any) -> tuple[int, ...]:
    """The shape of the whole parameter of which ``param`` is this rank's AutoTP shard (its own shape
    when AutoTP left it replicated)."""
    from deepspeed.module_inject.layers import DS_AUTOTP_UC_META

    meta = getattr(param, DS_AUTOTP_UC_META, None)
    if not meta or meta.get("replicated"):
        return tuple(param.shape)
    return tuple(meta.get("logical_shape") or meta["original_shape"])


def shard(full: Any, param: Any, tp_rank: int) -> Any:
    """This rank's part of ``full`` (the whole initial value) for ``param`` (sharded by AutoTP, or
    replicated), by the partition record AutoTP left on the parameter: its affine map, the pieces of
    the full tensor (offset and strides) each rank holds, which is what DeepSpeed's universal
    checkpoint uses to merge and re-split the same shards. A parameter without one is refused
    rather than guessed."""
    from deepspeed.module_inject.layers import DS_AUTOTP_UC_META

    meta = getattr(param, DS_AUTOTP_UC_META, None)
    if not meta or meta.get("replicated"):
        return full
    amap = (meta.get("conversion") or {}).get("affine_map")
    if not amap:
        raise NotImplementedError(f"AutoTP left no partition map on a parameter of shape {tuple(full.shape)} "
                                  f"({meta}); kit cannot cut its initial value to this rank's shard")
    ranks = amap["ranks"]
    mine = ranks[tp_rank] if tp_rank in ranks else ranks[str(tp_rank)]
    full = full.contiguous()
    out = full.new_empty(mine["shard_shape"])
    for piece in mine["pieces"]:
        (src, src_strides), (dst, dst_strides) = piece["source"], piece["dest"]
        out.as_strided(piece["shape"], dst_strides, dst).copy_(full.as_strided(piece["shape"], src_strides, src))
    return out

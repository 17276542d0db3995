"""The model: transformers' BLOOM architecture built from the recipe, and its FLOP count.

FLOPs per optimizer step (Megatron-LM / BigScience formula, docs/metrics.md)::

    F = 24 * c * B * s * l * h^2 * (1 + s / (6 h) + V / (16 l h))

B global batch (samples), s sequence length, l layers, h hidden size, V vocabulary, and c = 3
(forward + backward) or 4 with activation recomputation, which BigScience counted in its ~150
TFLOP/s per A100. ``tflops`` in the ledger uses c as the run actually computes (hardware FLOPs);
``mfu`` uses c = 3 (model FLOPs) divided by the accelerator's dense bf16 peak.

Initial weights: each parameter's is a function of (run seed, its BloomForCausalLM name) only
(:func:`init_parameter`), so any rank can build just its part (kit.parallel.model) and every layout
starts from the same model. This replaced drawing them from the global RNG while building the whole
model: new runs start from other weights than before; resumed runs load checkpoints, unaffected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from kit.config import ModelSection, RunConfig

# Dense bf16 peak TFLOP/s by GPU name fragment, for MFU when trainer.peak_tflops is 0.
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "L40S": 362.0}


def bloom_config(m: ModelSection, vocab_size: int) -> Any:
    from transformers import BloomConfig

    return BloomConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        n_layer=m.n_layer,
        n_head=m.n_head,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        layer_norm_epsilon=m.layer_norm_epsilon,
        initializer_range=m.initializer_range,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )


def meta_model(m: ModelSection, vocab_size: int) -> Any:
    """BloomForCausalLM on the meta device: its structure, names and shapes, and no memory; what
    :func:`materialize` fills, or what AutoTP shards before it is filled (kit.parallel.model)."""
    import torch
    from transformers import BloomForCausalLM

    config = bloom_config(m, vocab_size)
    config._attn_implementation = m.attn_implementation
    with torch.device("meta"):
        model = BloomForCausalLM(config)
    if m.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_model(m: ModelSection, vocab_size: int, seed: int | None = None, dtype: Any = None) -> Any:
    """The whole BloomForCausalLM with the run's initial weights (:func:`init_parameter`): what a plain
    data-parallel run trains, ``kit eval`` scores and the tests compare layouts with. ``seed`` None
    is torch's initial seed (what ``torch.manual_seed`` / kit.engine.seed_everything last set).
    The global RNG is not touched: construction does not move the dropout stream."""
    import torch

    seed = torch.initial_seed() if seed is None else seed
    model = meta_model(m, vocab_size)
    config = model.config
    materialize(model, lambda name, p: init_parameter(name, tuple(p.shape), config, seed), dtype)
    return model


# Initial weights: a function of (seed, Hugging Face name) only. The old construction drew every
# parameter from the global RNG in module order, so a rank could only get its part by building the
# whole model (700 GB of host memory for BLOOM-176B). Now each rank draws just the parameters it holds.
TIED = {"lm_head.weight": "transformer.word_embeddings.weight"}  # BLOOM's tied output head
LINEARS = frozenset({"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"})


def param_seed(seed: int, name: str) -> int:
    """The generator seed of one parameter: a stable hash of (run seed, HF name), the same in every
    process and Python version (never ``hash()``, which is salted per process)."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_parameter(name: str, shape: tuple[int, ...], config: Any, seed: int) -> Any:
    """The initial value (float32) of BloomForCausalLM's parameter ``name``, BLOOM's scheme as
    transformers' ``_init_weights`` applies it: Linear and Embedding weights normal(0,
    initializer_range), biases zero, LayerNorm weights one; ``lm_head.weight`` is the tied word
    embeddings. Random values come from a generator seeded by :func:`param_seed`, so a rank can draw
    any one parameter (then keep its tensor shard) without the rest of the model."""
    import torch

    name = TIED.get(name, name)
    owner, _, kind = name.rpartition(".")
    module = owner.rpartition(".")[2]
    norm = module.endswith("layernorm") or module == "ln_f"
    if kind not in ("weight", "bias") or not (norm or module in LINEARS or module == "word_embeddings"):
        raise KeyError(f"{name} is not a BloomForCausalLM parameter name")
    if kind == "bias":
        return torch.zeros(shape)
    if norm:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.empty(shape).normal_(0.0, config.initializer_range or 0.02, generator=g)


def materialize(module: Any, value: Callable[[str, Any], Any], dtype: Any = None) -> None:
    """Give every parameter of ``module`` (built on the meta device) real storage holding
    ``value(name, meta_parameter)``, one parameter at a time. A parameter shared by several modules
    (the tied embedding) stays one parameter; attributes DeepSpeed set on the meta parameters (AutoTP's
    partition records, the pipeline's flags) are kept, which ``nn.Module.to_empty`` would drop."""
    import torch
    import torch.nn as nn

    names = {id(p): n for n, p in module.named_parameters()}
    made: dict[int, tuple[Any, Any]] = {}  # id(meta) -> (meta, real): the meta one kept alive for its id
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in made:
                with torch.no_grad():
                    v = value(names[id(p)], p).to(dtype or p.dtype)
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"{names[id(p)]}: initial value has shape {tuple(v.shape)}, "
                                     f"the module holds {tuple(p.shape)}")
                real = nn.Parameter(v, requires_grad=p.requires_grad)
                real.__dict__.update(p.__dict__)
                made[id(p)] = (p, real)
            mod._parameters[key] = made[id(p)][1]
    left = [n for n, b in module.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"buffers left on the meta device: {left}")


def param_count(m: ModelSection, vocab_size: int) -> int:
    """Parameters of a BLOOM model (tied embeddings), without building it."""
    h, layer = m.hidden_size, m.n_layer
    per_layer = 12 * h * h + 13 * h  # qkv, dense, 4h MLP (weights + biases) and two LayerNorms
    return vocab_size * h + 2 * h + layer * per_layer + 2 * h  # + embedding LN + final LN


def step_flops(m: ModelSection, vocab_size: int, global_batch: int, recompute: bool | None = None) -> float:
    c = 4 if (m.activation_checkpointing if recompute is None else recompute) else 3
    h, layer, s, v = m.hidden_size, m.n_layer, m.seq_length, vocab_size
    return 24.0 * c * global_batch * s * layer * h * h * (1 + s / (6 * h) + v / (16 * layer * h))


def peak_tflops(configured: float) -> float:
    """The accelerator's dense bf16 peak: configured, else from the CUDA device name, else 0 (N/A)."""
    if configured > 0:
        return configured
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            for frag, peak in PEAK_BF16_TFLOPS.items():
                if frag in name:
                    return peak
    except Exception:  # no CUDA runtime: MFU is simply not available
        return 0.0
    return 0.0


CKPT_RANK_OVERHEAD = 32 * 1024  # per rank: kit's RNG file (~15 KB), pickle headers, ZeRO-3's stub model file


def checkpoint_bytes(params: int, bf16: bool, zero_stage: int, world: int) -> float:
    """Bytes of one checkpoint, from the state DeepSpeed saves (measured on the tiny recipe, 231k
    parameters, 2 ranks: within 0.5% at every layout; docs/doctor.md has the table):

    - the module's weights (``mp_rank_00_model_states.pt``): 4 bytes (fp32) or 2 (bf16) a parameter;
      none at ZeRO-3, where the weights live only in the partitions;
    - the fp32 master copy (the ZeRO partitions, or the bf16 optimizer's): 4, except fp32 at ZeRO-0,
      whose optimizer steps the module's own weights;
    - Adam's two fp32 moments: 8.

    So 16 bytes a parameter for fp32 at ZeRO-1/2, 14 for bf16, 12 at ZeRO-3 or fp32 ZeRO-0."""
    weights = 0 if zero_stage >= 3 else (2 if bf16 else 4)
    master = 4 if (zero_stage >= 1 or bf16) else 0
    return float(params * (weights + master + 8) + world * CKPT_RANK_OVERHEAD)


def sizing(cfg: RunConfig, local: bool = False) -> dict[str, float]:
    """What a recipe costs whatever the cluster: parameters, batch, FLOPs, checkpoint bytes, and the
    model state per GPU under its ZeRO stage and layout (the chain, the preflight and `kit plan`).
    The global batch counts data-parallel ranks only: tensor and pipeline ranks share a sample."""
    n = param_count(cfg.model, cfg.data.vocab_size)
    world = cfg.world_size(local=local)
    mp = cfg.parallel.model_parallel
    dp = max(1, world // mp)
    gb = cfg.batch.micro_batch_size * cfg.batch.grad_accum * dp
    tokens = gb * cfg.model.seq_length
    half = cfg.deepspeed.precision == "bf16"
    w, g, o = (2 if half else 4) * n / mp, (2 if half else 4) * n / mp, (12 if half else 8) * n / mp
    z = cfg.deepspeed.zero_stage
    per_gpu = w / (dp if z >= 3 else 1) + g / (dp if z >= 2 else 1) + o / (dp if z >= 1 else 1)
    ckpt_bytes = checkpoint_bytes(n, half, z, world)
    return {"parameters": n, "world_size": world, "global_batch": gb, "tokens_per_step": tokens,
            "total_tokens": tokens * cfg.trainer.max_steps,
            "flops_per_step": step_flops(cfg.model, cfg.data.vocab_size, gb),
            "state_bytes_per_gpu": per_gpu, "checkpoint_bytes": ckpt_bytes, "steps": cfg.trainer.max_steps}

"""The model: transformers' BLOOM architecture built from the recipe, and its FLOP count.

FLOPs per optimizer step (Megatron-LM / BigScience formula, docs/metrics.md)::

    F = 24 * c * B * s * l * h^2 * (1 + s / (6 h) + V / (16 l h))

B global batch (samples), s sequence length, l layers, h hidden size, V vocabulary, and c = 3
(forward + backward) or 4 with activation recomputation, which BigScience counted in its ~150
TFLOP/s per A100. ``tflops`` in the ledger uses c as the run actually computes (hardware FLOPs);
``mfu`` uses c = 3 (model FLOPs) divided by the accelerator's dense bf16 peak.
"""

from __future__ import annotations

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


def build_model(m: ModelSection, vocab_size: int) -> Any:
    from transformers import BloomForCausalLM

    config = bloom_config(m, vocab_size)
    config._attn_implementation = m.attn_implementation
    model = BloomForCausalLM(config)
    if m.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


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

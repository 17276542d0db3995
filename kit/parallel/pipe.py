"""Pipeline parallelism: the BLOOM model as a DeepSpeed PipelineModule of transformers' own blocks.

One model definition: the stages hold ``transformers``' ``BloomBlock`` (through a thin subclass,
:class:`BloomBlockPipe`, whose forward takes and returns one tensor, as the pipeline passes one
activation between stages), the same ``LayerNorm`` and embedding, and transformers' own causal-LM
loss. Layer list (BLOOM-176B's Megatron-DeepSpeed had the same shape)::

    0        tied "embed": word embeddings (first stage)
    1        word_embeddings_layernorm
    2..L+1   BloomBlockPipe x L           (partitioned over the stages by block count)
    L+2      ln_f
    L+3      tied "embed" again, as the output head (last stage): logits = h @ W_emb^T

Names: a stage's parameters are ``<layer>.<hf name inside the layer>`` and
``tied_modules.embed.word_embeddings.weight``; :func:`hf_name` and :func:`pipe_name` map them to and
from BloomForCausalLM's names (the converter and the initial weights use them).

Initial weights: every stage takes its layers' values from a BloomForCausalLM built with the run's
seed, so a pipeline run starts from exactly the weights of a plain one (the tests compare them). That
needs the whole model once in host memory at setup, as the plain and tensor-parallel paths already do.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

TIED = "embed"
TIED_PREFIX = f"tied_modules.{TIED}."
FIRST_BLOCK = 2  # layer index of block 0


class EmbeddingPipe(nn.Module):
    """The word embeddings; on the last stage the same (tied) weights are the output head."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


def output_head(embed: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """BloomForCausalLM's lm_head: a linear layer without bias sharing the embedding weights."""
    return F.linear(hidden, embed.word_embeddings.weight)


class LayerNormPipe(nn.LayerNorm):
    """A LayerNorm the partitioner can tell apart from the blocks' own."""


class BloomBlockPipe(BloomBlock):
    """transformers' BloomBlock with a one-tensor forward: alibi and the causal mask are built here,
    from the hidden states' shape, with transformers' own functions (BloomModel builds them once for
    all blocks; a pipeline stage has no BloomModel). alibi is built for all heads; under tensor
    parallelism kit.parallel.tensor keeps this rank's heads."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.mask_config = config
        self.total_heads = config.n_head  # AutoTP rewrites num_heads to the per-rank count

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, s, _ = hidden.shape
        ones = torch.ones(b, s, dtype=torch.long, device=hidden.device)
        alibi = build_alibi_tensor(ones, self.total_heads, hidden.dtype)
        mask = create_causal_mask(config=self.mask_config, inputs_embeds=hidden, attention_mask=None, cache=None)
        out: torch.Tensor = super().forward(hidden, alibi=alibi, attention_mask=mask)[0]
        return out


def causal_lm_loss(vocab_size: int) -> Any:
    """The pipeline's loss function: transformers' own causal-LM loss (shifted labels, mean)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = ForCausalLMLoss(logits, labels, vocab_size)
        return out

    return loss


def layer_specs(config: Any) -> list[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    v, h, eps = config.vocab_size, config.hidden_size, config.layer_norm_epsilon
    specs: list[Any] = [TiedLayerSpec(TIED, EmbeddingPipe, v, h, tied_weight_attr="word_embeddings.weight"),
                        LayerSpec(LayerNormPipe, h, eps=eps)]
    specs += [LayerSpec(BloomBlockPipe, config, layer_idx=i) for i in range(config.n_layer)]
    specs += [LayerSpec(LayerNormPipe, h, eps=eps),
              TiedLayerSpec(TIED, EmbeddingPipe, v, h, forward_fn=output_head,
                            tied_weight_attr="word_embeddings.weight")]
    return specs


def build_pipeline(config: Any, topology: Any, checkpoint_blocks: bool, hf_state: dict[str, torch.Tensor]) -> Any:
    """The PipelineModule of this rank's stage, its weights taken from ``hf_state`` (a
    BloomForCausalLM state dict); the global RNG state is left as it was."""
    from deepspeed.pipe import PipelineModule

    rng = torch.get_rng_state()
    net = PipelineModule(layers=layer_specs(config), topology=topology, loss_fn=causal_lm_loss(config.vocab_size),
                         partition_method="type:BloomBlockPipe",
                         activation_checkpoint_interval=1 if checkpoint_blocks else 0,
                         checkpointable_layers=["BloomBlockPipe"])  # not the embedding: token ids carry no grad
    torch.set_rng_state(rng)
    net.config = config  # AutoTP reads the model's shape from it
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(hf_state[hf_name(name, config.n_layer)])
    return net


_LAYER = re.compile(r"(\d+)\.(.+)")


def hf_name(name: str, n_layer: int) -> str:
    """A pipeline parameter's name in BloomForCausalLM."""
    if name.startswith(TIED_PREFIX):
        return "transformer." + name[len(TIED_PREFIX):]
    m = _LAYER.fullmatch(name)
    if not m:
        raise KeyError(f"{name} is not a parameter name of kit's BLOOM pipeline")
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 1:
        return "transformer.word_embeddings_layernorm." + rest
    if idx == n_layer + FIRST_BLOCK:
        return "transformer.ln_f." + rest
    if FIRST_BLOCK <= idx < n_layer + FIRST_BLOCK:
        return f"transformer.h.{idx - FIRST_BLOCK}.{rest}"
    raise KeyError(f"{name}: layer {idx} has no parameters in kit's BLOOM pipeline")


def pipe_name(name: str, n_layer: int) -> str:
    """A BloomForCausalLM parameter's name in the pipeline (inverse of :func:`hf_name`)."""
    if name in ("lm_head.weight", "transformer.word_embeddings.weight"):
        return TIED_PREFIX + "word_embeddings.weight"
    rest = name.removeprefix("transformer.")
    if rest.startswith("word_embeddings_layernorm."):
        return "1." + rest[len("word_embeddings_layernorm."):]
    if rest.startswith("ln_f."):
        return f"{n_layer + FIRST_BLOCK}." + rest[len("ln_f."):]
    m = re.fullmatch(r"h\.(\d+)\.(.+)", rest)
    if not m:
        raise KeyError(f"{name} is not a BloomForCausalLM parameter name")
    return f"{int(m.group(1)) + FIRST_BLOCK}.{m.group(2)}"


def stage_forward(net: Any, x: torch.Tensor) -> torch.Tensor:
    """This stage's layers of ``net`` (a PipelineModule) applied to ``x``, for evaluation: what
    ``net.forward`` computes, without its activation checkpointing (nothing to save under no_grad) and
    without touching its state (``forward`` advances the micro-batch counter that seeds layers)."""
    for layer in net.forward_funcs:
        x = layer(x)
    return x

"""Does an export reproduce its checkpoint? Logits of ``from_pretrained(export)`` against the
checkpoint's own weights, on a fixed batch.

The reference must not share code with the converter, or a parsing bug would agree with itself:
- ZeRO-1/2 whose module dtype is the export dtype: the engine's own module weights, saved whole in
  ``mp_rank_00_model_states.pt`` (exactly what the engine computed with);
- otherwise (ZeRO-3 keeps no whole module; or another dtype): DeepSpeed's zero_to_fp32 in lazy
  mode, cast to the export dtype the way the engine casts its fp32 masters.
Both models run the same attention implementation as training, and their weights are compared
tensor by tensor too (exact), so a failure says whether the weights or only the arithmetic differ.

Both models compute from weights in freshly allocated (64-byte aligned) memory. Why: safetensors
places tensors at whatever offset the header length gives (8-byte granularity), torch.load's mmap at
64-byte boundaries, and MKL's AVX-512 kernels may sum in another order for differently aligned
operands (Intel's "conditional numerical reproducibility" caveat). Equal weights at different
addresses then gave logits 1 ulp apart on one CI machine; placement is not what this check is for.
Memory: two models in the export dtype (``kit convert --no-verify`` skips this).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from kit import checkpoint as ck
from kit.config import RunConfig
from kit.errors import CheckpointError
from kit.parallel.layout import Layout
from kit.rundir import RunDir
from kit.tools.zero_reader import MODEL_STATES_Z12

BATCH_SEED = 0
BATCH_SHAPE = (2, 64)


def fixed_batch(cfg: RunConfig) -> Any:
    """Deterministic token ids (no special tokens), the same on every machine."""
    import torch

    g = torch.Generator().manual_seed(BATCH_SEED)
    rows, cols = BATCH_SHAPE
    return torch.randint(4, cfg.data.vocab_size, (rows, min(cols, cfg.model.seq_length)), generator=g)


def reference_state(ckpt: ck.Checkpoint, dtype: Any, full_shapes: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], str]:
    import torch

    layout = ck.layout_of(ckpt)
    if not layout.plain:
        assert full_shapes is not None
        return layout_module_state(ckpt, layout, full_shapes), f"engine module weights ({layout} shards merged)"
    stage = ckpt.manifest["kit"].get("zero_stage")
    if stage in (1, 2):
        module = torch.load(ckpt.path / MODEL_STATES_Z12, map_location="cpu", mmap=True, weights_only=False)["module"]
        if all(v.dtype == dtype for v in module.values() if v.is_floating_point()):
            return dict(module), "engine module weights"
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path.parent), tag=ckpt.tag, lazy_mode=True)
    done: dict[int, Any] = {}
    state = {}
    for name, t in lazy.items():  # shared parameters are one object: convert once, keep them tied
        if id(t) not in done:
            done[id(t)] = t.contiguous().to(dtype)
        state[name] = done[id(t)]
    return state, "deepspeed zero_to_fp32"


def layout_module_state(ckpt: ck.Checkpoint, layout: Layout, full_shapes: dict[str, Any]) -> dict[str, Any]:
    """The engine's own module weights of a tensor/pipeline checkpoint, put together with torch.cat:
    each tensor rank's ``module`` (or, in a pipeline, each layer's file), shards joined along the one
    dimension where they differ from each other's sum. Independent of the converter's byte ranges."""
    import torch

    from kit.parallel.pipe import hf_name

    n_layer = 1 + max((int(k.split(".")[2]) for k in full_shapes if k.startswith("transformer.h.")), default=-1)
    shards: dict[str, dict[int, Any]] = {}
    if layout.pipeline == 1:
        for t in range(layout.tensor):
            module = torch.load(ckpt.path / f"mp_rank_{t:02d}_model_states.pt", map_location="cpu",
                                weights_only=False)["module"]
            for k, v in module.items():
                shards.setdefault(k, {})[t] = v
    else:
        for f in sorted(ckpt.path.glob("layer_*-model_*-model_states.pt")):
            m = re.fullmatch(r"layer_(\d+)-model_(\d+)-model_states\.pt", f.name)
            if m is None:
                continue
            idx, t = int(m.group(1)), int(m.group(2))
            for k, v in torch.load(f, map_location="cpu", weights_only=False).items():
                name = "transformer.word_embeddings.weight" if idx == 0 else hf_name(f"{idx}.{k}", n_layer)
                if name not in full_shapes:
                    raise CheckpointError(f"{f.name}: {k} is not a parameter of this run's model")
                shards.setdefault(name, {})[t] = v
    state: dict[str, Any] = {}
    for name, by_rank in shards.items():
        parts = [by_rank[t] for t in sorted(by_rank)]
        full = tuple(full_shapes[name])
        if tuple(parts[0].shape) == full:  # replicated over the tensor ranks
            state[name] = parts[0]
            continue
        dims = [d for d in range(len(full)) if parts[0].shape[d] * len(parts) == full[d]]
        if len(dims) != 1:
            raise CheckpointError(f"{ckpt.tag}: {name} shards {[tuple(p.shape) for p in parts]} do not make {full}")
        state[name] = torch.cat(parts, dim=dims[0])
    state.setdefault("lm_head.weight", state["transformer.word_embeddings.weight"])
    return state


def verify_export(rd: RunDir, cfg: RunConfig, ckpt: ck.Checkpoint, export: Path, dtype_name: str,
                  atol: float = 0.0) -> dict[str, Any]:
    """Compare logits (``ok``: within ``atol``) and weights; returns the ledger fields (ok, bit_identical,
    max_abs_diff, weights_identical, differing_weights, atol, reference)."""
    import torch
    from transformers import AutoModelForCausalLM, BloomForCausalLM
    from transformers.utils import logging as hf_logging

    from kit.model import bloom_config

    hf_logging.disable_progress_bar()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    attn = cfg.model.attn_implementation
    batch = fixed_batch(cfg)
    config = bloom_config(cfg.model, cfg.data.vocab_size)
    config._attn_implementation = attn
    with torch.device("meta"):
        ref_model = BloomForCausalLM(config)
    state, reference = reference_state(ckpt, dtype, {k: tuple(v.shape) for k, v in ref_model.state_dict().items()})
    kinds = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(kinds) == 1 and dtype not in kinds:  # a layout's module weights are in the training dtype:
        dtype = kinds.pop()  # compare there (the export, loaded in that dtype, must equal them exactly)
        reference += f", export compared as {str(dtype).removeprefix('torch.')}"
    ref_model.load_state_dict(state, strict=True, assign=True)
    ref_model.tie_weights()
    _own_memory(ref_model)
    ref_model.eval()
    with torch.no_grad():
        want = ref_model(input_ids=batch).logits
    got_model = AutoModelForCausalLM.from_pretrained(str(export), dtype=dtype, attn_implementation=attn,
                                                     local_files_only=True)
    _own_memory(got_model)
    got_model.eval()
    differing = _differing_weights(ref_model, got_model)
    del ref_model, state
    with torch.no_grad():
        got = got_model(input_ids=batch).logits
    del got_model
    diff = float((got.float() - want.float()).abs().max())
    return {"ok": diff <= atol, "bit_identical": bool(torch.equal(got, want)),
            "max_abs_diff": diff, "weights_identical": not differing, "differing_weights": differing[:5],
            "atol": atol, "reference": reference, "batch": list(batch.shape), "dtype": dtype_name}


def _own_memory(model: Any) -> None:
    """Move every parameter into fresh tensors (torch's allocator aligns them to 64 bytes), off the
    file mappings they were loaded into; shared (tied) parameters stay one object."""
    import torch

    for p in model.parameters():  # parameters() yields a shared Parameter once
        p.data = p.data.clone(memory_format=torch.contiguous_format)


def _differing_weights(ref: Any, got: Any) -> list[str]:
    """Names of the parameters whose values are not bit-identical (shapes and dtypes included)."""
    import torch

    want = dict(ref.named_parameters(remove_duplicate=False))
    have = dict(got.named_parameters(remove_duplicate=False))
    names = sorted(set(want) | set(have))
    return [n for n in names if n not in want or n not in have or want[n].dtype != have[n].dtype
            or want[n].shape != have[n].shape or not torch.equal(want[n], have[n])]

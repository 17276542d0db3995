"""Initial weights by (seed, Hugging Face name), and a rank's setup memory bounded by its share.

kit.model.init_parameter makes every parameter's initial value a function of the run seed and the
parameter's BloomForCausalLM name, so a rank builds only what it holds (its pipeline stage, its
AutoTP shard) on the meta device and fills it one parameter at a time (kit.parallel.model). These
tests hold the contract: the values follow BLOOM's scheme (against transformers' own initialization),
depend on seed and name only, and a stage's parameters are the plain model's same-named ones. The
layout tests run real DeepSpeed ranks (tests/parallel_worker.py ``parts``) and count the bytes of the
real tensors each rank holds after build, against the whole model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.config import ModelSection
from kit.model import build_model, init_parameter, materialize, meta_model, param_seed
from kit.parallel.pipe import FIRST_BLOCK, hf_name, layer_specs, pipe_name

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128


def section(h: int = 32, layers: int = 2, heads: int = 4) -> ModelSection:
    return ModelSection(hidden_size=h, n_layer=layers, n_head=heads, seq_length=16)


def test_init_parameter_is_a_function_of_seed_and_name() -> None:
    config = meta_model(section(), VOCAB).config
    qkv, dense = "transformer.h.0.self_attention.query_key_value.weight", "transformer.h.1.self_attention.dense.weight"
    a = init_parameter(qkv, (96, 32), config, 7)
    assert torch.equal(a, init_parameter(qkv, (96, 32), config, 7))
    assert not torch.equal(a, init_parameter(qkv, (96, 32), config, 8))
    assert not torch.equal(init_parameter(dense, (32, 32), config, 7), init_parameter(dense.replace("h.1", "h.0"),
                                                                                      (32, 32), config, 7))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    init_parameter(qkv, (96, 32), config, 7)
    assert torch.equal(before, torch.get_rng_state()), "drawing a parameter moved the global RNG"
    assert param_seed(7, qkv) == param_seed(7, qkv) != param_seed(7, dense)
    assert torch.equal(init_parameter("lm_head.weight", (VOCAB, 32), config, 7),
                       init_parameter("transformer.word_embeddings.weight", (VOCAB, 32), config, 7))
    with pytest.raises(KeyError, match="not a BloomForCausalLM parameter"):
        init_parameter("transformer.h.0.mlp.gelu_impl.weight", (3,), config, 7)


def test_init_parameter_follows_transformers_bloom_scheme() -> None:
    """Every parameter of transformers' own BloomForCausalLM (its _init_weights): where it is a constant
    (LayerNorm ones, zero biases) ours is the same constant; where it is random ours is normal with the
    same std (initializer_range) and mean 0 within sampling error."""
    from transformers import BloomForCausalLM

    m = ModelSection(hidden_size=64, n_layer=2, n_head=4, seq_length=16, initializer_range=0.05)
    config = meta_model(m, 512).config
    torch.manual_seed(0)
    hf = BloomForCausalLM(config)
    for name, p in hf.named_parameters():
        p = p.detach()
        ours = init_parameter(name, tuple(p.shape), config, 3)
        if p.std() == 0:
            assert torch.equal(ours, p), name
        else:
            n = p.numel()
            assert abs(float(ours.std()) - 0.05) < 6 * 0.05 / (2 * n) ** 0.5, name
            assert abs(float(p.std()) - 0.05) < 6 * 0.05 / (2 * n) ** 0.5, name
            assert abs(float(ours.mean())) < 6 * 0.05 / n ** 0.5, name
    assert hf.lm_head.weight is hf.transformer.word_embeddings.weight


def test_build_model_leaves_nothing_on_meta_and_keeps_the_tie() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    model = build_model(section(), VOCAB, dtype=torch.bfloat16)
    assert torch.equal(before, torch.get_rng_state()), "construction moved the dropout stream"
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    again = build_model(section(), VOCAB, seed=5, dtype=torch.bfloat16)  # seed None == torch.initial_seed()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def stage(config: object, first: int, stop: int) -> nn.ModuleDict:
    """Layers first..stop-1 of the pipeline built as PipelineModule._build builds a stage (LayerSpec.build
    on the meta device; the tied embedding under its pipeline name), without process groups."""
    from deepspeed.pipe import TiedLayerSpec

    mods = nn.ModuleDict()
    specs = layer_specs(config)
    with torch.device("meta"):
        for i in range(first, stop):
            spec = specs[i]
            if isinstance(spec, TiedLayerSpec):
                if "tied_modules" not in mods:
                    mods["tied_modules"] = nn.ModuleDict({"embed": spec.build()})
            else:
                mods[str(i)] = spec.build()
    return mods


@settings(max_examples=12, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), per_head=st.sampled_from([4, 8]), layers=st.integers(1, 5),
       seed=st.integers(0, 2**40), data=st.data())
def test_every_stage_holds_the_plain_models_weights(heads: int, per_head: int, layers: int, seed: int,
                                                    data: st.DataObject) -> None:
    """At generated shapes: the plain model rebuilt equals itself, and any cut of the pipeline's layer
    list into a stage, filled by pipeline name -> HF name, holds exactly the plain model's parameters."""
    from kit.parallel.model import fill

    m = section(heads * per_head, layers, heads)
    plain = build_model(m, VOCAB, seed=seed)
    again = build_model(m, VOCAB, seed=seed)
    ref = dict(plain.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(ref.values(), again.parameters(), strict=True))
    n_specs = layers + FIRST_BLOCK + 2
    first = data.draw(st.integers(0, n_specs - 1))
    stop = data.draw(st.integers(first + 1, n_specs))
    part = stage(plain.config, first, stop)
    fill(part, plain.config, seed, lambda n: hf_name(n, layers), None)
    names = [n for n, _ in part.named_parameters()]
    assert all(pipe_name(hf_name(n, layers), layers) == n for n in names)
    for name, p in part.named_parameters():
        assert torch.equal(p, ref[hf_name(name, layers)]), name
    other = build_model(m, VOCAB, seed=seed + 1).transformer.h[0].mlp.dense_h_to_4h.weight
    assert not torch.equal(other, plain.transformer.h[0].mlp.dense_h_to_4h.weight)


def test_materialize_refuses_a_wrong_shape() -> None:
    model = meta_model(section(), VOCAB)
    with pytest.raises(ValueError, match="initial value has shape"):
        materialize(model, lambda name, p: torch.zeros(3))


def parts(tensor: int, pipeline: int, out: Path) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(ROOT / "tests" / "parallel_worker.py"), str(tensor), str(pipeline), "parts", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ok")
@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 4), (2, 2)])
def test_a_rank_holds_only_its_share(tensor: int, pipeline: int, tmp_path: Path) -> None:
    """Real DeepSpeed ranks (gloo, CPU) build an 8-block model at PP4 or TP2xPP2 with kit.parallel.model:
    each rank's module holds real (non-meta) bytes for its blocks' share only (a quarter of the blocks at
    PP4, an eighth of the sharded weights at TP2xPP2) plus the replicated embedding/LayerNorms of its
    stage, and every value equals the plain model's (a shard equals its block of the plain parameter)."""
    r = parts(tensor, pipeline, tmp_path / "parts.json")
    full_blocks, full = int(r["full_block_bytes"]), int(r["full_bytes"])  # type: ignore[call-overload]
    ranks = r["ranks"]
    assert isinstance(ranks, list) and len(ranks) == 4
    for row in ranks:
        assert row["meta_left"] == 0 and row["equal_to_plain"], row
        assert row["block_bytes"] <= full_blocks / pipeline / tensor * 1.1, (row, full_blocks)
        assert row["bytes"] < full / 2, (row, full)
    # the stages together hold every block once per tensor rank group
    assert sum(row["block_bytes"] for row in ranks) >= full_blocks  # (DP1 here) every block held once

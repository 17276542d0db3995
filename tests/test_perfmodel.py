"""`kit plan`'s performance model: validated against BLOOM-176B's published run, checked against hand
computation on small cases, and never raising on any valid recipe and cluster (hypothesis).

Pure arithmetic: nothing here needs a GPU; the published numbers it is checked against were measured
on Jean Zay by BigScience (docs/plan.md gives the sources).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kit.config import ClusterSection, RunConfig, from_dict, load_recipe
from kit.errors import ConfigError
from kit.model import sizing
from kit.perfmodel import GIB, Layout, candidate_layouts, compare, plan, recipe_layout, stages
from kit.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "jobs").glob("*.toml"))
JEAN_ZAY = ClusterSection(preset="jean-zay-a100").resolved()

# BigScience's production run (tr11 chronicles, 2022-03-18): TP4 x PP12 x DP8, micro 2, GBS 2048,
# 105.2 s an iteration, 149 TFLOP/s per A100 (Megatron's formula, recomputation counted).
PUBLISHED_TFLOPS = 149.0
BAND = 0.10  # the model lands within 10% of it (it predicts ~139: docs/plan.md)


def bloom(*overrides: str) -> RunConfig:
    return load_recipe(ROOT / "jobs" / "bloom-176b.toml", list(overrides))


# ------------------------------------------------------------------------------ published BLOOM-176B


def test_bloom_176b_published_run_lands_within_the_band() -> None:
    cfg = bloom()
    assert recipe_layout(cfg) == Layout(tensor=4, pipeline=12, data=8, zero=1, micro_batch=2, grad_accum=128)
    pl = plan(cfg, JEAN_ZAY, stack="megatron-deepspeed")
    assert abs(pl.tflops_per_gpu / PUBLISHED_TFLOPS - 1) <= BAND, pl.tflops_per_gpu
    assert abs(pl.timing.step / 105.2 - 1) <= BAND, pl.timing.step
    assert pl.fits
    assert pl.timing.bubble_fraction == pytest.approx(11 / 139)
    # the memory BigScience saw with nvidia-smi was 59 GB (allocator cache included): the model's
    # accounting of what is live stays below it, and not far below
    assert 40 * GIB < pl.memory.total < 59e9, pl.memory.total / GIB


def test_the_single_node_measurement_the_constant_was_fitted_on_also_lands() -> None:
    # 1 node, 6 blocks of the 176B width, TP8, micro 2 x 256: 143.5 and 157.0 TFLOP/s (chronicles-prequel)
    cfg = bloom("model.n_layer=6", "model.n_head=64", "parallel.tensor=8", "parallel.pipeline=1", "slurm.nodes=1",
                "batch.grad_accum=256")
    pl = plan(cfg, JEAN_ZAY, stack="megatron-deepspeed")
    assert abs(pl.tflops_per_gpu / 150.25 - 1) <= BAND, pl.tflops_per_gpu


def test_old_zero3_data_parallel_layout_is_communication_bound_and_much_slower() -> None:
    seed = plan(bloom(), JEAN_ZAY)
    old = bloom("parallel.tensor=1", "parallel.pipeline=1", "deepspeed.zero_stage=3", "slurm.nodes=64",
                "batch.micro_batch_size=1", "batch.grad_accum=4")
    z3 = plan(old, JEAN_ZAY)
    assert z3.global_batch == seed.global_batch == 2048
    assert z3.timing.data_comm > 5 * z3.timing.compute  # ~1 TB a micro-batch at 6.25 GB/s per GPU
    assert z3.timing.step > 3 * seed.timing.step
    assert z3.tflops_per_gpu < 0.3 * seed.tflops_per_gpu
    assert any(n.startswith("communication-bound") for n in z3.notes)
    # the same layout on a 50 GB/s network hides most of it: the verdict comes from the network
    fast = plan(old, ClusterSection(preset="jean-zay-a100", internode_gbps=50.0).resolved())
    assert fast.timing.step < z3.timing.step / 4


def test_comm_bound_zero3_halves_per_gpu_throughput_when_gpus_double_at_a_fixed_batch() -> None:
    # Narayanan et al. 2021 (175B, batch 1536, ZeRO-3 on Selene, 25 GB/s per GPU): 88 -> 44 TFLOP/s
    # from 768 to 1536 GPUs. The model is optimistic in level (nominal bandwidth) but not in shape.
    selene = ClusterSection(preset="", peak_tflops=312, hbm_gib=80, hbm_gbps=2039, nvlink_gbps=300,
                            internode_gbps=25, gpus_per_node=8, matmul_efficiency=JEAN_ZAY.matmul_efficiency)
    gpt3 = ["model.hidden_size=12288", "model.n_layer=96", "model.n_head=96", "data.vocab_size=51200",
            "parallel.tensor=1", "parallel.pipeline=1", "deepspeed.zero_stage=3", "batch.grad_accum=1"]
    at = {nodes: plan(bloom(*gpt3, f"slurm.nodes={nodes}", f"batch.micro_batch_size={mb}"), selene)
          for nodes, mb in ((48, 4), (96, 2), (192, 1))}
    assert at[96].timing.data_comm > at[96].timing.compute  # communication-bound from 768 GPUs
    assert at[192].tflops_per_gpu == pytest.approx(at[96].tflops_per_gpu / 2, rel=0.02)
    assert at[48].tflops_per_gpu > at[96].tflops_per_gpu  # measured 144 > 88: compute-bound at 4 a GPU


def test_kit_stack_shows_the_replicated_head_on_the_last_stage() -> None:
    pl = plan(bloom(), JEAN_ZAY)  # AutoTP keeps the 250880 x 14336 head whole on every tensor rank
    assert pl.timing.slowest_stage == 11
    assert pl.timing.head_share > 0.3
    assert any("LM head" in n for n in pl.notes)
    meg = plan(bloom(), JEAN_ZAY, stack="megatron-deepspeed")
    assert meg.timing.head_share < 0.25


# ------------------------------------------------------------------------------- hand computation


def small(*overrides: str) -> RunConfig:
    """4 blocks of width 64, 4 heads, seq 32, vocab 1000, bf16, on 8 ranks of one node."""
    raw: dict[str, Any] = {
        "model": {"hidden_size": 64, "n_layer": 4, "n_head": 4, "seq_length": 32},
        "data": {"vocab_size": 1000, "sources": [{"name": "x", "path": "/x"}]},
        "batch": {"micro_batch_size": 2, "grad_accum": 4},
        "deepspeed": {"zero_stage": 1, "precision": "bf16"},
        "parallel": {"tensor": 2, "pipeline": 2},
        "slurm": {"nodes": 1, "gpus_per_node": 8},
        "trainer": {"max_steps": 100},
    }
    from kit.config import apply_override

    for o in overrides:
        apply_override(raw, o)
    cfg = from_dict(raw)
    cfg.check()
    return cfg


def test_memory_matches_hand_computation_tp2_pp2_dp2_zero1() -> None:
    cfg = small()
    pl = plan(cfg, JEAN_ZAY)
    # a block per tensor rank: (12 h^2 + 7 h) / 2 split + 6 h replicated = 24800 + 384
    block = 25184
    # last stage: 2 blocks, final LN (2h) and the tied embedding copy (1000 x 64, whole under AutoTP)
    n = 2 * block + 128 + 64000
    assert pl.memory.stage == 1
    assert pl.memory.weights == 2 * n  # bf16
    assert pl.memory.gradients == 2 * n  # bf16, not sharded under ZeRO-1
    assert pl.memory.optimizer == 12 * n / 2  # fp32 master + 2 moments, sharded over DP2
    # one micro-batch in flight on the last stage; a block keeps b*s*(10h + 24h/t + 6*a*s/t) bytes
    full_block = 2 * 32 * (10 * 64 + 24 * 64 / 2 + 6 * 4 * 32 / 2)
    assert pl.memory.activations_full == 1 * 2 * full_block
    assert pl.memory.activations == pl.memory.activations_full  # no checkpointing in this recipe
    assert pl.memory.activations_recompute == 1 * 2 * (2 * 32 * 64 * 2) + full_block
    assert pl.memory.logits == 2 * 32 * 1000 * 12
    assert pl.memory.total == pytest.approx(10 * n + 2 * full_block + 2 * 32 * 1000 * 12 + 2 * GIB)


def test_memory_first_stage_holds_every_micro_batch_in_flight() -> None:
    cfg = small("model.activation_checkpointing=true", "model.hidden_size=512", "model.n_layer=8",
                "data.vocab_size=260", "parallel.pipeline=4", "parallel.tensor=1")  # 2 blocks a stage
    pl = plan(cfg, JEAN_ZAY)
    assert pl.memory.stage == 0 and pl.memory.in_flight == 4  # 1F1B: stage 0 holds p micro-batches
    full_block = 2 * 32 * (10 * 512 + 24 * 512 + 6 * 4 * 32)  # one block recomputed at a time
    assert pl.memory.activations == 4 * 2 * (2 * 32 * 512 * 2) + full_block  # each block keeps its input
    assert pl.memory.activations_full == 4 * 2 * full_block


@pytest.mark.parametrize(("zero", "weights", "grads", "optim"), [
    (1, 2.0, 2.0, 12 / 8), (2, 2.0, 2 / 8, 12 / 8), (3, 2 / 8, 2 / 8, 12 / 8)])
def test_zero_stages_shard_what_they_say(zero: int, weights: float, grads: float, optim: float) -> None:
    cfg = small("parallel.tensor=1", "parallel.pipeline=1", f"deepspeed.zero_stage={zero}")
    pl = plan(cfg, JEAN_ZAY)
    n = 4 * (12 * 64 * 64 + 13 * 64) + 1000 * 64 + 4 * 64  # the whole model on every rank, DP8
    live = min(n, 1e9) * 2 if zero == 3 else 0  # ZeRO-3 gathers what it computes with
    assert pl.memory.weights == pytest.approx(weights * n + live)
    assert pl.memory.gradients == pytest.approx(grads * n)
    assert pl.memory.optimizer == pytest.approx(optim * n)


def test_bf16_optimizer_keeps_an_unsharded_fp32_gradient() -> None:
    plain = plan(small(), JEAN_ZAY)
    fp32 = plan(small('deepspeed.extra.data_types.grad_accum_dtype="fp32"'), JEAN_ZAY)
    n = 2 * 25184 + 128 + 64000
    assert fp32.memory.gradients - plain.memory.gradients == 4 * n


def test_a_compared_layout_is_modelled_at_its_own_zero_stage() -> None:
    cfg = small("parallel.tensor=1", "parallel.pipeline=1")  # the recipe says ZeRO-1
    plans, _ = compare(cfg, JEAN_ZAY, "megatron-deepspeed")
    z2 = next(pl for pl in plans if pl.layout.zero == 2)
    n = 4 * (12 * 64 * 64 + 13 * 64) + 1000 * 64 + 4 * 64
    assert z2.memory.gradients == pytest.approx(2 * n / 8)  # no BF16_Optimizer fp32 copy above ZeRO-1
    z1 = next(pl for pl in plans if pl.layout.zero == 1)
    assert z1.memory.gradients == pytest.approx(2 * n + 4 * n)


def test_communication_follows_the_ring_formulas() -> None:
    cfg = small("slurm.nodes=2", "slurm.gpus_per_node=4")  # TP2 x PP2 = 4 ranks: one replica a node
    pl = plan(cfg, JEAN_ZAY)
    tm, b, s, h = pl.timing, 2, 32, 64
    nvlink, net = 300e9, 6.25e9
    # tensor: 2 all-reduces forward + 2 backward per block, ring 2(t-1)/t of b*s*h bf16, over NVLink
    per_block = 4 * (2 * (2 - 1) / 2) * (b * s * h * 2) / nvlink
    assert tm.tensor == pytest.approx(4 * 2 * per_block)  # 4 micro-batches x 2 blocks on the stage
    assert tm.tensor_gbps == 300
    # pipeline neighbours in one node (NVLink): activations forward, gradients backward
    assert tm.pipeline == pytest.approx(4 * 2 * (b * s * h * 2) / nvlink)
    # data parallel across the two nodes: ZeRO-1 = reduce-scatter + all-gather, (d-1)/d n bytes each
    n = 2 * 25184 + 128 + 64000
    assert tm.data_gbps == 6.25
    assert tm.data_exposed == pytest.approx(2 * (1 / 2) * n * 2 / net)
    assert tm.bubble_fraction == pytest.approx(1 / 5)
    slot = (tm.compute + tm.tensor + tm.pipeline) / 4
    assert tm.bubble == pytest.approx(slot)
    assert tm.step == pytest.approx(5 * slot + tm.data_exposed + tm.optimizer)


def test_stage_partition_is_deepspeeds_uniform_one() -> None:
    from kit.perfmodel import STACKS

    cfg = bloom()
    kit_stages = stages(cfg, 12, STACKS["kit"])
    assert [s.blocks for s in kit_stages] == [6] * 10 + [5] * 2
    meg = stages(cfg, 12, STACKS["megatron-deepspeed"])  # embeddings count as a block each: 72 / 12
    assert [s.blocks for s in meg] == [5] + [6] * 10 + [5]
    assert sum(s.blocks for s in meg) == 70 and meg[0].embedding and meg[-1].head


def test_sizing_counts_the_batch_over_data_parallel_ranks_only() -> None:
    s = sizing(bloom())
    assert s["world_size"] == 384 and s["global_batch"] == 2048 and s["tokens_per_step"] == 2048 * 2048


# ------------------------------------------------------------------------------------------- compare


def test_compare_keeps_the_batch_and_obeys_the_layout_rules() -> None:
    cfg = bloom()
    plans, skipped = compare(cfg, JEAN_ZAY)
    assert sum(pl.layout == recipe_layout(cfg) for pl in plans) == 1
    assert skipped  # DP 384/t layouts cannot keep a batch of 2048
    for pl in plans:
        lay = pl.layout
        assert lay.world == 384 and pl.global_batch == 2048
        assert 112 % lay.tensor == 0 and lay.tensor <= 8 and lay.pipeline <= 70
        assert lay.zero <= 1 or lay.pipeline == 1
        assert lay.pipeline == 1 or lay.grad_accum >= lay.pipeline
    assert [pl.timing.step for pl in plans] == sorted(pl.timing.step for pl in plans)


def test_compare_includes_zero_stages_only_where_deepspeed_takes_them() -> None:
    layouts, _ = candidate_layouts(small("parallel.tensor=1", "parallel.pipeline=1"), JEAN_ZAY)
    zeros = {(lay.tensor, lay.pipeline): set() for lay in layouts}
    for lay in layouts:
        zeros[(lay.tensor, lay.pipeline)].add(lay.zero)
    assert zeros[(1, 1)] == {1, 2, 3} and zeros[(2, 1)] == {1, 2} and zeros[(1, 2)] == {1}


# ------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("recipe", [p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_plans(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["--cluster", "h100"], ["--stack", "megatron-deepspeed"], ["--compare", "--top", "0"]):
        assert main(["plan", recipe, *args]) == 0, args
        out = capsys.readouterr().out
        assert "TFLOP/s" in out
    assert main(["plan", recipe, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["fits"] is True, f"{recipe} does not fit its own cluster"
    assert main(["plan", recipe, "--compare", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(row["recipe"] for row in doc["layouts"]) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--cluster", "h10"], "--cluster 'h10' is not a known cluster; did you mean 'h100'?"),
    (["--set", 'cluster.preset=""'], 'cluster.peak_tflops must be set (> 0) when cluster.preset is ""'),
    (["--set", "cluster.matmul_efficiency=2.0"], "cluster.matmul_efficiency is a fraction of peak"),
    (["--set", "cluster.internode_gbps=inf"], "cluster.internode_gbps must be a finite number"),
    (["--set", "cluster.gpus_per_node=4"], "the recipe runs 8 ranks per node"),
    (["--set", "cluster.hbm_gib=-1"], "cluster.hbm_gib must be a finite number >= 0"),
    (["--set", "parallel.tensor=3"], "parallel.tensor (3) must divide model.n_head (16)"),
    (["--set", "slurm.time_limit=\"soon\""], "slurm.time_limit must be a Slurm time limit"),
])
def test_impossible_inputs_are_one_clear_line(args: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "bloom-1b7.toml", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# -------------------------------------------------------------------------------------- properties


def _finite_non_negative(value: Any, where: str = "") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_non_negative(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite_non_negative(v, f"{where}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value) and value >= 0, f"{where} = {value}"


@st.composite
def recipes(draw: st.DrawFn) -> RunConfig:
    """Valid recipes by construction (the layout divides the world, the heads and the blocks), with
    clusters from tiny to huge numbers: the refusals of RunConfig.check are the only filter."""
    heads = draw(st.sampled_from([1, 2, 4, 8, 12, 16, 32, 112]))
    layers = draw(st.integers(1, 96))
    tensor = draw(st.sampled_from([t for t in (1, 2, 4, 8) if heads % t == 0]))
    pipeline = draw(st.integers(1, min(16, layers)))
    data = draw(st.integers(1, 8))
    world = tensor * pipeline * data
    per_node = draw(st.sampled_from([d for d in range(1, 17) if world % d == 0]))
    precision = draw(st.sampled_from(["bf16", "fp32"]))
    zero = draw(st.integers(1 if precision == "bf16" else 0, 1 if pipeline > 1 else 3))
    raw: dict[str, Any] = {
        "model": {"n_head": heads, "hidden_size": heads * draw(st.sampled_from([8, 64, 128])), "n_layer": layers,
                  "seq_length": draw(st.sampled_from([1, 7, 128, 2048, 8192])),
                  "activation_checkpointing": draw(st.booleans())},
        "data": {"vocab_size": draw(st.integers(260, 300_000)), "sources": [{"name": "x", "path": "/x"}]},
        "batch": {"micro_batch_size": draw(st.integers(1, 16)), "grad_accum": draw(st.integers(pipeline, 300))},
        "deepspeed": {"zero_stage": zero, "precision": precision},
        "parallel": {"tensor": tensor, "pipeline": pipeline},
        "slurm": {"nodes": world // per_node, "gpus_per_node": per_node},
        "trainer": {"max_steps": 100},
        "cluster": {"preset": draw(st.sampled_from(["jean-zay-a100", "h100"])),
                    "peak_tflops": draw(st.sampled_from([0.0, 1e-3, 19.5, 2500.0])),
                    "hbm_gbps": draw(st.sampled_from([0.0, 1.0, 8000.0])),
                    "nvlink_gbps": draw(st.sampled_from([0.0, 0.5, 900.0])),
                    "internode_gbps": draw(st.sampled_from([0.0, 0.01, 6.25, 400.0])),
                    "gpus_per_node": draw(st.sampled_from([0, 8, 16])),
                    "matmul_efficiency": draw(st.sampled_from([0.0, 1e-3, 1.0]))},
    }
    if draw(st.booleans()):
        raw["deepspeed"]["extra"] = {"zero_optimization": {"overlap_comm": draw(st.booleans())},
                                     "data_types": {"grad_accum_dtype": "fp32"}}
    try:
        cfg = from_dict(raw)
        cfg.check()
    except ConfigError:
        assume(False)
    return cfg


@settings(max_examples=200, deadline=None)
@given(cfg=recipes(), stack=st.sampled_from(["kit", "megatron-deepspeed"]))
def test_plan_never_raises_and_every_number_is_finite(cfg: RunConfig, stack: str) -> None:
    cluster = cfg.cluster.resolved()
    try:
        pl = plan(cfg, cluster, stack=stack)
    except ConfigError as e:  # the one refusal: more ranks a node than the cluster has GPUs
        assert "ranks per node" in str(e)
        return
    _finite_non_negative(pl.to_dict())
    assert pl.timing.step > 0 and pl.tflops_per_gpu > 0
    parts = pl.timing
    assert parts.step == pytest.approx(parts.compute + parts.tensor + parts.pipeline + parts.bubble
                                       + parts.data_exposed + parts.optimizer, rel=1e-9)
    if cfg.world_size(local=False) <= 64:
        plans, _ = compare(cfg, cluster, stack)
        for other in plans:
            _finite_non_negative(other.to_dict())

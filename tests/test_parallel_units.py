"""The layout arithmetic and the pieces of tensor/pipeline parallelism that need no ranks: coordinates
(against DeepSpeed's own topology), pipeline names, the alibi slice, shard merging ranges, checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, tiny_overrides
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.config import load_recipe
from kit.errors import ConfigError
from kit.parallel.layout import Coords, Layout

layouts = st.builds(Layout, st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))


@given(layouts)
@settings(max_examples=60, deadline=None)
def test_coords_are_a_bijection_tensor_fastest(layout: Layout) -> None:
    seen = set()
    for rank in range(layout.world):
        c = layout.coords(rank)
        assert layout.rank(c.tensor, c.pipeline, c.data) == rank
        assert layout.model_rank(rank) == c.pipeline * layout.tensor + c.tensor
        seen.add((c.tensor, c.pipeline, c.data))
    assert len(seen) == layout.world
    if layout.world > 1:  # tensor ranks of a group are consecutive
        assert layout.coords(1) == (Coords(1, 0, 0) if layout.tensor > 1 else
                                    Coords(0, 1, 0) if layout.pipeline > 1 else Coords(0, 0, 1))


@given(layouts)
@settings(max_examples=40, deadline=None)
def test_deepspeed_topology_agrees_with_the_layout(layout: Layout) -> None:
    """kit.parallel.mesh hands DeepSpeed a topology; its coordinates must be kit's for every rank."""
    from kit.parallel.mesh import topology

    topo = topology(layout)
    for rank in range(layout.world):
        c = topo.get_coord(rank)
        assert (c.model, c.pipe, c.data) == tuple(layout.coords(rank).to_dict().values())


def test_layout_text_and_errors() -> None:
    assert str(Layout(4, 12, 8)) == "TP4xPP12xDP8" and str(Layout(1, 1, 4)) == "DP4"
    assert Layout.of(2, 2, 8) == Layout(2, 2, 2)
    assert Layout.from_dict(None, 3) == Layout(1, 1, 3)  # a checkpoint from before layouts
    with pytest.raises(ValueError, match="not a multiple"):
        Layout.of(2, 2, 6)
    with pytest.raises(ValueError, match="outside a world of 4"):
        Layout(2, 1, 2).coords(4)


def test_pipeline_names_map_both_ways() -> None:
    from transformers import BloomConfig, BloomForCausalLM

    from kit.parallel.pipe import hf_name, pipe_name

    with torch.device("meta"):
        model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=3, n_head=2))
    names = [n for n, _ in model.named_parameters()]
    for n in names:
        assert hf_name(pipe_name(n, 3), 3) == n
    assert pipe_name("transformer.h.2.mlp.dense_4h_to_h.weight", 3) == "4.mlp.dense_4h_to_h.weight"
    assert pipe_name("lm_head.weight", 3) == "tied_modules.embed.word_embeddings.weight"
    with pytest.raises(KeyError):
        hf_name("9.weight", 3)


@pytest.mark.parametrize(("rank", "wrong", "heads"), [(0, False, [0, 1]), (1, False, [2, 3]), (1, True, [0, 1])])
def test_alibi_slice_keeps_the_ranks_heads(rank: int, wrong: bool, heads: list[int]) -> None:
    """A rank holding heads 2-3 of 4 must see exactly those heads' alibi rows (AutoTP shards the heads
    contiguously); the test fault keeps heads 0-1 everywhere (the silent error)."""
    from transformers import BloomConfig
    from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

    from kit.parallel.tensor import install_alibi_slicing

    block = BloomBlock(BloomConfig(hidden_size=16, n_head=4), 0)
    block.self_attention.num_heads = 2  # as AutoTP leaves it on a rank of TP2
    assert install_alibi_slicing(block, 4, rank, wrong=wrong) == 1
    seen: list[torch.Tensor] = []  # what the attention gets, after kit's hook
    block.self_attention.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["alibi"]), with_kwargs=True)
    b, s = 3, 5
    full = build_alibi_tensor(torch.ones(b, s, dtype=torch.long), 4, torch.float32)
    hidden = torch.zeros(b, s, 16)
    with pytest.raises(RuntimeError):  # the hidden size no longer matches 2 heads: past the hook is enough
        block(hidden, alibi=full, attention_mask=None)
    got = seen[-1].view(b, 2, 1, s)
    assert torch.equal(got, full.view(b, 4, 1, s)[:, heads])


def test_shard_ranges_merge_rows_and_columns() -> None:
    """Column-parallel shards follow each other; row-parallel ones interleave row by row."""
    from kit.tools.layout_reader import _cut, _shard_dim

    assert _shard_dim("w", [(3, 4), (3, 4)], (6, 4), 2) == 0
    assert _shard_dim("w", [(6, 2), (6, 2)], (6, 4), 2) == 1
    assert _shard_dim("b", [(4,), (4,)], (4,), 2) is None
    with pytest.raises(Exception, match="do not make"):
        _shard_dim("w", [(3, 2), (3, 2)], (6, 4), 2)
    ranges = [(0, 0, 10, 4), (1, 0, 0, 8)]  # 12 elements: 4 in file 0 from 10, 8 in file 1 from 0
    assert _cut(ranges, 2, 4) == [(0, 0, 12, 2), (1, 0, 0, 2)]
    assert _cut(ranges, 4, 8) == [(1, 0, 0, 8)]


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 5))
@settings(max_examples=50, deadline=None)
def test_cut_is_a_slice_of_the_concatenation(n1: int, n2: int, n3: int) -> None:
    from kit.tools.layout_reader import _cut

    ranges = [(0, 0, 100, n1), (1, 1, 7, n2), (2, 0, 0, n3)]
    flat = [(f, a + i) for f, _, a, n in ranges for i in range(n)]
    total = n1 + n2 + n3
    for start in range(total):
        for count in range(1, total - start + 1):
            got = [(f, a + i) for f, _, a, n in _cut(ranges, start, count) for i in range(n)]
            assert got == flat[start:start + count]


@pytest.mark.parametrize(("extra", "message"), [
    ({"parallel.tensor": 3}, r"parallel.tensor \(3\) must divide model.n_head \(4\)"),
    ({"parallel.pipeline": 2, "deepspeed.zero_stage": 2}, "zero_stage = 2 cannot be used with parallel.pipeline"),
    ({"parallel.tensor": 2, "deepspeed.zero_stage": 3}, "zero_stage = 3 cannot be used with parallel.tensor"),
    ({"parallel.pipeline": 2, "deepspeed.zero_stage": 1, "batch.grad_accum": 1}, r"grad_accum \(1\) must be at least"),
])
def test_impossible_layouts_are_refused_naming_the_key(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path, "x", **extra))


def test_kit_train_checks_the_local_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """3 local ranks cannot hold TP2: one red line, nothing created."""
    from kit.tools.cli import main as kit_main

    o = tiny_overrides(tmp_path / "runs", "t", **{"parallel.tensor": 2, "trainer.nproc": 3, "slurm.tasks_per_node": 4})
    assert kit_main(["train", str(ROOT / "jobs" / "tiny.toml"), *[x for kv in o for x in ("--set", kv)]]) != 0
    err = capsys.readouterr().err
    assert "trainer.nproc (the local ranks of `kit train`) has 3 ranks, not a multiple of parallel.tensor" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "t").exists()

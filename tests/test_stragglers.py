"""Straggler timings (kit.stragglers): the arithmetic, and a real 2-rank run with one rank slowed down."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.ledger import hostname, read_all
from kit.parallel.layout import Layout, placed
from kit.stragglers import RankInfo, find_stragglers, median, peer_groups, slowdowns


def _rows(*fwd: float) -> list[dict[str, float]]:
    return [{"fwd_s": f} for f in fwd]


def test_leave_one_out_median_names_the_slow_rank() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([1.0, 2.0]) == 1.5 and median([]) == 0.0
    # BLOOM's case: one GPU 6% slower among eight
    found = find_stragglers(_rows(1.0, 1.0, 1.0, 1.06, 1.0, 1.0, 1.0, 1.0), 0.05)
    assert [r for r, _ in found] == [3] and found[0][1] == pytest.approx(0.06)
    assert find_stragglers(_rows(1.0, 1.0, 1.04, 1.0), 0.05) == []  # under the threshold
    # two ranks: each is compared with the other, so only the slow one is named
    assert [r for r, _ in find_stragglers(_rows(1.0, 1.5), 0.05)] == [1]
    assert find_stragglers(_rows(0.0, 0.0), 0.05) == []  # nothing measured: no division by zero
    assert slowdowns(_rows(1.0, 2.0)) == [-0.5, 1.0]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_duty_cycled_rank_is_flagged_with_its_node_within_bounded_windows(deepspeed_ok: None, tiny_cfg: Any) -> None:
    """A real 2-rank DeepSpeed run where rank 1 sleeps 0.2 s in each forward of every other step
    (kit.faults ``step.forward%2``). Timings are gathered every 2 steps; rank 1 must be flagged, with
    its node, from the ``straggler_windows``-th window (the earliest a call is made; allowing two more
    on a loaded machine) and alerted a window later (two flagged windows in a row open an incident), in
    one incident (one alert, then one
    escalation to an error while it stays slow), and rank 0 never.
    The same run shows the node sampler where NVML is absent (nvml_absent once, host samples with
    memory, load and disk), and that a checkpoint save far longer than the hang bound (3 s against
    1 s) does not fire the watchdog."""
    from kit.launch import create_run, run_local_segment

    persist, n = 3, 4
    cfg = tiny_cfg("slow", **{"trainer.max_steps": 24, "checkpoint.interval_steps": 8,
                              "health.straggler_interval": 2, "health.straggler_windows": n,
                              "health.straggler_persist": persist, "health.period_s": 0.3,
                              "health.hang_floor_s": 1.0, "health.hang_factor": 2.0, "health.hang_ceiling_s": 60.0})
    rd = create_run(cfg, log=lambda *a: None)
    faults = "step.forward%2:rank1=sleep0.2,ckpt.async_write@8=sleep3"
    out = run_local_segment(rd, cfg, extra_env={"KIT_FAULTS": faults}, quiet=True)
    assert (out.reason, out.step) == ("done", 24)
    assert not read_all(rd.path, {"hang"}), "a long save is not a hang"
    saved = {e["step"]: e["seconds"] for e in read_all(rd.path, {"ckpt_saved"})}
    assert saved[8] >= 3.0
    timings = read_all(rd.path, {"rank_timings"})
    assert [t["step"] for t in timings] == list(range(2, 25, 2))
    for t in timings:
        r0, r1 = t["ranks"]
        assert r1["fwd_s"] > 0.2 > r0["fwd_s"] and t["bar"] >= 0.05  # one step in two: 2 forwards x 0.2 s
        assert r0["host"] == r1["host"] == hostname() and r0["step_s"] > 0 and r0["other_s"] >= 0
    stragglers = read_all(rd.path, {"straggler"})
    assert {s["rank"] for s in stragglers} == {1}
    assert 2 * n <= stragglers[0]["step"] <= 2 * (n + 2), "flagged within a bounded number of windows"
    assert all(s["node"] == hostname() and s["slowdown"] > s["bar"] and s["local_rank"] == 1 for s in stragglers)
    alerts = [a for a in read_all(rd.path, {"alert"}) if a.get("condition") == "straggler"]
    assert [(a["severity"], a.get("escalated", False)) for a in alerts] == [("warning", False), ("error", True)]
    assert len({a["incident"] for a in alerts}) == 1 and f"rank 1 ({hostname()}" in alerts[0]["message"]
    assert alerts[0]["step"] <= 2 * (n + 3) and alerts[1]["step"] >= alerts[0]["step"] + 2 * n
    # the node sampler, on local rank 0 only: one file, NVML absent said once, host samples
    files = sorted(p.name for p in (rd.path / "ledger").glob("health-*.jsonl"))
    assert files == [f"health-{hostname()}.jsonl"]
    assert len(read_all(rd.path, {"nvml_absent"})) == 1
    health = read_all(rd.path, {"health"})
    assert health and all(h.get("gpus") is None and h["host"]["fs_free_gib"] > 0 for h in health)  # null: absent
    assert all(h["host"]["mem_pct"] > 0 and h["host"]["load1"] >= 0 for h in health)


# ------------------------------------------------------------------------------------------ at a layout


def _table(tensor: int, pipeline: int, data: int) -> list[RankInfo]:
    lay = Layout(tensor, pipeline, data)
    return placed([RankInfo(r, f"node{r // 4}", r % 4, r % 4, 1) for r in range(lay.world)], lay)


def test_under_a_pipeline_ranks_are_compared_within_their_stage() -> None:
    """PP2 x DP2: stage 0 (embedding) is uniformly slower than stage 1; compared with everyone, both
    stage-0 ranks would be stragglers; compared within their stage, only a rank slow among its peers is."""
    ranks = _table(1, 2, 2)  # rank = pipeline + 2 x data: ranks 0, 2 are stage 0; 1, 3 stage 1
    peers = peer_groups(ranks)
    assert peers == [[2], [3], [0], [1]]
    stage_imbalance = _rows(1.5, 1.0, 1.5, 1.0)
    assert [r for r, _ in find_stragglers(stage_imbalance, 0.05)] == [0, 2]  # the old, layout-blind answer
    assert find_stragglers(stage_imbalance, 0.05, peers=peers) == []
    assert [r for r, _ in find_stragglers(_rows(1.5, 1.0, 1.5, 1.2), 0.05, peers=peers)] == [3]
    # no pipeline, an unknown layout, or one rank a stage: compare with every other rank
    assert peer_groups(_table(2, 1, 2)) is None and peer_groups([RankInfo(0, "a", 0, 0, 1)] * 2) is None
    assert peer_groups(_table(1, 4, 1)) is None


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([(1, 2, 2), (2, 2, 1), (2, 2, 2), (1, 3, 2), (2, 3, 2)]),
       st.lists(st.floats(0.5, 5.0), min_size=3, max_size=3), st.floats(0.01, 0.1), st.data())
def test_a_stage_that_is_uniformly_slower_is_never_a_straggler(shape: tuple[int, int, int], costs: list[float],
                                                                threshold: float, data: Any) -> None:
    ranks = _table(*shape)
    peers = peer_groups(ranks)
    assert peers is not None
    base = [costs[r.coords.pipeline % 3] for r in ranks if r.coords is not None]
    assert find_stragglers(_rows(*base), threshold, peers=peers) == []
    slow = data.draw(st.integers(0, len(ranks) - 1))
    base[slow] *= 1 + 2 * threshold
    assert [r for r, _ in find_stragglers(_rows(*base), threshold, peers=peers)] == [slow]


def test_a_straggler_at_a_layout_is_named_by_its_coordinates() -> None:
    (info,) = [r for r in _table(2, 2, 2) if r.rank == 5]
    assert info.where() == "node1, GPU 1, tensor 1, pipeline 0, data 1"
    assert info.coord_fields() == {"tensor": 1, "pipeline": 0, "data": 1}
    assert RankInfo(0, "n", 2, -1, 1).where() == "n, local rank 2" and RankInfo(0, "n", 0, -1, 1).coord_fields() == {}


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_slowed_rank_under_a_pipeline_is_named_with_its_coordinates(deepspeed_ok: None, tiny_cfg: Any) -> None:
    """A real 4-rank DeepSpeed run at PP2 x DP2 (PipelineModule on gloo) where rank 3 (stage 1, replica 1)
    sleeps 50 ms in every forward: it is the one straggler, compared with its stage's other rank, and its
    event and alert carry its node and (tensor 0, pipeline 1, data 1)."""
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("slowpp", **{"parallel.pipeline": 2, "trainer.nproc": 4, "slurm.tasks_per_node": 4,
                                "deepspeed.zero_stage": 1, "batch.grad_accum": 2, "trainer.max_steps": 12,
                                "checkpoint.interval_steps": 6, "health.straggler_interval": 2,
                                "health.straggler_windows": 2, "health.straggler_persist": 2,
                                "health.straggler_threshold": 3.0})  # tiny forwards (~5 ms) jitter by far more than 5%
    rd = create_run(cfg, log=lambda *a: None)
    out = run_local_segment(rd, cfg, extra_env={"KIT_FAULTS": "step.forward:rank3=sleep0.05"}, quiet=True)
    assert (out.reason, out.step) == ("done", 12)
    stragglers = read_all(rd.path, {"straggler"})
    assert {s["rank"] for s in stragglers} == {3}, stragglers
    for s in stragglers:
        assert (s["tensor"], s["pipeline"], s["data"], s["node"]) == (0, 1, 1, hostname())
    alerts = [a for a in read_all(rd.path, {"alert"}) if a.get("condition") == "straggler"]
    assert alerts and alerts[0]["severity"] == "warning" and len({a["incident"] for a in alerts}) == 1
    assert all((a["rank"], a["tensor"], a["pipeline"], a["data"]) == (3, 0, 1, 1) for a in alerts)
    assert "tensor 0, pipeline 1, data 1) is" in alerts[0]["message"]
    assert "the other ranks of pipeline stage 1" in alerts[0]["message"]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_an_unloaded_run_raises_no_straggler_alert(deepspeed_ok: None, tiny_cfg: Any) -> None:
    """The same run without a slow rank, timings gathered every 2 steps for 24 steps (12 windows):
    timings recorded, no straggler event, no straggler alert (a failure shows every gather's bar and
    slowdowns).

    The threshold is 50%, not the recipe's 5%: the other tests load this 2-core machine's cores
    unevenly, and a CI run saw one of the two ranks 15-25% slower for five gathers in a row in its
    5 ms forwards. That rank really was slower (the detector was right to call it); what this test
    asks is that jitter, however it is spread, does not make a straggler of a rank that is not one."""
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("even", **{"trainer.max_steps": 24, "checkpoint.interval_steps": 8,
                              "health.straggler_interval": 2, "health.straggler_threshold": 0.5})
    rd = create_run(cfg, log=lambda *a: None)
    out = run_local_segment(rd, cfg, quiet=True)
    assert (out.reason, out.step) == ("done", 24)
    timings = read_all(rd.path, {"rank_timings"})
    assert len(timings) == 12
    seen = [(t["step"], t.get("bar"), [r.get("slowdown") for r in t["ranks"]]) for t in timings]
    assert not read_all(rd.path, {"straggler"}), seen
    alerts = read_all(rd.path, {"alert"})
    assert not [a for a in alerts if a.get("condition") == "straggler"], (seen, alerts)

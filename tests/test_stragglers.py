"""Straggler timings (kit.stragglers): the arithmetic, and a real 2-rank run with one rank slowed down."""

from __future__ import annotations

from typing import Any

import pytest

from kit.ledger import hostname, read_all
from kit.stragglers import find_stragglers, median


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


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_slowed_rank_is_named_with_its_node(deepspeed_ok: None, tiny_cfg: Any) -> None:
    """A real 2-rank DeepSpeed run where rank 1 sleeps 50 ms in every forward (kit.faults). The timings
    are gathered every 4 steps; rank 1 must be reported as a straggler with its node, rank 0 never.
    The same run shows the node sampler where NVML is absent (nvml_absent once, host samples), and
    that a checkpoint save far longer than the hang bound (3 s against 1 s) does not fire the watchdog."""
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("slow", **{"health.straggler_interval": 4, "health.period_s": 0.3, "health.hang_floor_s": 1.0,
                              "health.hang_factor": 2.0, "health.hang_ceiling_s": 60.0})
    rd = create_run(cfg, log=lambda *a: None)
    faults = "step.forward:rank1=sleep0.05,ckpt.before_manifest@4=sleep3"
    out = run_local_segment(rd, cfg, extra_env={"KIT_FAULTS": faults}, quiet=True)
    assert (out.reason, out.step) == ("done", 8)
    assert not read_all(rd.path, {"hang"}), "a long save is not a hang"
    saved = {e["step"]: e["seconds"] for e in read_all(rd.path, {"ckpt_saved"})}
    assert saved[4] >= 3.0
    timings = read_all(rd.path, {"rank_timings"})
    assert [t["step"] for t in timings] == [4, 8]
    for t in timings:
        r0, r1 = t["ranks"]
        assert r1["fwd_s"] > 0.1 > r0["fwd_s"]  # two forwards (grad_accum 2) x 50 ms on rank 1
        assert r0["host"] == r1["host"] == hostname() and r0["step_s"] > 0 and r0["other_s"] >= 0
    stragglers = read_all(rd.path, {"straggler"})
    assert {s["rank"] for s in stragglers} == {1} and len(stragglers) == 2
    assert all(s["node"] == hostname() and s["slowdown"] > 1.0 and s["local_rank"] == 1 for s in stragglers)
    alerts = [a for a in read_all(rd.path, {"alert"}) if "straggler" in a["message"]]
    assert len(alerts) == 1 and f"rank 1 ({hostname()}" in alerts[0]["message"]
    # the node sampler, on local rank 0 only: one file, NVML absent said once, host samples
    files = sorted(p.name for p in (rd.path / "ledger").glob("health-*.jsonl"))
    assert files == [f"health-{hostname()}.jsonl"]
    assert len(read_all(rd.path, {"nvml_absent"})) == 1
    health = read_all(rd.path, {"health"})
    assert health and all(h.get("gpus") is None and h["host"]["fs_free_gib"] > 0 for h in health)

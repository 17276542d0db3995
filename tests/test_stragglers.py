"""Straggler timings (kit.stragglers): the arithmetic, and a real 2-rank run with one rank slowed down."""

from __future__ import annotations

from typing import Any

import pytest

from kit.ledger import hostname, read_all
from kit.stragglers import find_stragglers, median, slowdowns


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


@pytest.mark.slow
@pytest.mark.deepspeed
def test_an_unloaded_run_raises_no_straggler_alert(deepspeed_ok: None, tiny_cfg: Any) -> None:
    """The same run without a slow rank, timings gathered every 2 steps for 24 steps (12 windows, on a
    machine other tests load unevenly): timings recorded, no straggler event, no straggler alert (a
    failure shows every gather's bar and slowdowns)."""
    from kit.launch import create_run, run_local_segment

    cfg = tiny_cfg("even", **{"trainer.max_steps": 24, "checkpoint.interval_steps": 8,
                              "health.straggler_interval": 2})
    rd = create_run(cfg, log=lambda *a: None)
    out = run_local_segment(rd, cfg, quiet=True)
    assert (out.reason, out.step) == ("done", 24)
    timings = read_all(rd.path, {"rank_timings"})
    assert len(timings) == 12
    seen = [(t["step"], t.get("bar"), [r.get("slowdown") for r in t["ranks"]]) for t in timings]
    assert not read_all(rd.path, {"straggler"}), seen
    alerts = read_all(rd.path, {"alert"})
    assert not [a for a in alerts if a.get("condition") == "straggler"], (seen, alerts)

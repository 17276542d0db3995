"""One run summary: `kit status`, `kit monitor --once` and the TUI show the same thing, and none of
them can be made to raise by what a run directory holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import test_monitor_support as support
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_monitor_support import append, event, wait_for

from kit.ledger import KINDS
from kit.monitor.app import loaded, make_app
from kit.run.summary import collect

tiny_run_src, tiny_run, fixed_run = support.tiny_run_src, support.tiny_run, support.fixed_run

# What depends on the moment a tool looked (ages, the finish time) or on how it was asked.
MOMENT = {"last_event_age_s", "step_age_s", "finish_t", "elapsed_s", "age_s", "slurm", "segment_list"}


def steady(d: Any) -> Any:
    """A summary without what changes from one second to the next."""
    if isinstance(d, dict):
        return {k: steady(v) for k, v in d.items() if k not in MOMENT and k != "eta_s"}
    if isinstance(d, list):
        return [steady(x) for x in d]
    return d


def kit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kit.tools.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_status_once_and_the_tui_agree_on_a_real_run(tiny_run: Path) -> None:
    """A real two-segment tiny run (DeepSpeed ranks): the three faces of the summary, compared."""
    status = kit("status", str(tiny_run), "--json")
    assert status.returncode == 0, status.stderr
    once = kit("monitor", str(tiny_run), "--once", "--json", "--no-slurm")
    assert once.returncode == 0, once.stderr
    from_status, (from_once,) = json.loads(status.stdout), json.loads(once.stdout)
    app = make_app([tiny_run], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        from_tui = json.loads(json.dumps(app.snaps[0].summary, default=str))
    assert from_status["status"] == "healthy" and from_status["phase"] == "finished"
    assert from_status["step"] == from_status["max_steps"] == 8
    assert [s["seg"] for s in from_status["segment_list"]] == ["seg1", "seg2"], "a local run's segments"
    for name, other in (("monitor --once", from_once), ("the TUI", from_tui)):
        a, b = steady(from_status), steady(other)
        assert a == b, f"kit status and {name} disagree: {[k for k in a if a.get(k) != b.get(k)]}"
    text = kit("status", str(tiny_run))
    assert "FINISHED" in text.stdout.upper() and "seg2" in text.stdout and "step 8/8" in text.stdout


def test_status_shows_the_alerts_and_segments_of_a_local_run(fixed_run: Path) -> None:
    now = support.fixed_now()
    append(fixed_run, "train-r0", event("alert", t=now - 30, severity="error", message="GPU 3 fell off the bus"))
    out = kit("status", str(fixed_run))
    assert out.returncode == 0, out.stderr
    assert "GPU 3 fell off the bus" in out.stdout and "seg1" in out.stdout and "seg2" in out.stdout
    code = kit("status", str(fixed_run), "--exit-status").returncode
    assert code == 1  # degraded: an unacknowledged error


def test_an_unreadable_or_missing_run_is_down_not_a_traceback(tmp_path: Path) -> None:
    for args in (["status", str(tmp_path / "nope"), "--json"], ["monitor", str(tmp_path / "nope"), "--once", "--json"]):
        out = kit(*args)
        assert "Traceback" not in out.stderr
        (s,) = [json.loads(out.stdout)] if args[0] == "status" else json.loads(out.stdout)
        assert s["status"] == "down" and s["phase"] == "unreadable"
    run = tmp_path / "locked"
    (run / "ledger").mkdir(parents=True)
    (run / "run.toml").write_text("this is not toml = = =")
    (run / "ledger" / "train-r0.jsonl").write_text(event("step", step=1, loss=1.0))
    for args in (["status", str(run), "--json"], ["monitor", str(run), "--once", "--json"]):
        out = kit(*args)
        assert out.returncode in (0, 2) and "Traceback" not in out.stderr, out.stderr


DAMAGED = [
    '{"v":1,"t":1.0,"kind":"step","step":1,"loss":1.0,"tokens_per_s":' + "9" * 400 + "}",
    '{"v":1,"t":null,"kind":"segment_started","step":0,"world_size":2}',
    '{"v":1,"t":"noon","kind":"step","step":2,"loss":1.0}',
    '{"v":1,"t":3.0,"kind":"step","step":3,"loss":1.0,"step_time":Infinity}',
    '{"v":1,"t":4.0,"kind":"step","step":null,"loss":1.0}',
    '{"v":1,"t":5.0,"kind":"segment_ended","reason":["done"],"step":3}',
    '{"v":1,"t":6.0,"kind":"ckpt_saved","step":3,"tag":{"a":' * 30 + "1" + "}" * 30 + ',"bytes":1,"seconds":1}',
    '{"v":1,"t":7.0,"kind":"chain_submitted","job_id":["1"]}',
]


def test_the_damaged_ledgers_operators_met(tmp_path: Path, tiny_cfg: Any) -> None:
    """Each of these used to crash `kit monitor` or `kit status`; now they are counted and shown."""
    from kit.rundir import RunDir

    run = tmp_path / "damaged"
    RunDir(run).create(tiny_cfg())
    (run / "ledger" / "train-r0.jsonl").write_text("\n".join(DAMAGED) + "\n" + '{"v":1,"t":8.0,"ki')
    for args in (["status", str(run), "--json"], ["monitor", str(run), "--once", "--json", "--no-slurm"]):
        out = kit(*args)
        assert "Traceback" not in out.stderr, out.stderr
        s = json.loads(out.stdout)
        s = s if isinstance(s, dict) else s[0]
        assert s["step"] == 3 and s["reader"]["torn_tail"] == 1 and s["reader"]["invalid_events"] >= 4


field_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8),
                         st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                               max_size=2))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(KINDS)), st.floats(0, 2e9),
                          st.dictionaries(st.sampled_from(["step", "loss", "seg", "reason", "job_id", "tag", "node",
                                                           "severity", "message", "gpus", "world_size", "ok",
                                                           "checks", "alert_t", "step_time", "from_step", "to_step",
                                                           "nodes", "outcome", "bytes", "seconds", "host"]),
                                          field_values, max_size=8)), max_size=40))
def test_the_summary_never_raises(tmp_path: Path, events: list[tuple[str, float, dict[str, Any]]]) -> None:
    run = tmp_path / "gen"
    (run / "ledger").mkdir(parents=True, exist_ok=True)
    lines = []
    for kind, t, fields in events:
        try:
            lines.append(json.dumps({"v": 2, "t": t, "kind": kind, **fields}, allow_nan=True))
        except ValueError:
            continue
    (run / "ledger" / "w.jsonl").write_text("\n".join(lines) + "\n")
    summary, _ = collect(run, now=2e9, use_slurm=False)
    d = summary.to_dict()
    json.dumps(d, allow_nan=True)
    assert d["status"] in ("healthy", "degraded", "down")


async def test_status_and_the_monitor_show_the_runs_layout(fixed_run: Path) -> None:
    """A segment that started at TP2 x PP2 x DP2: `kit status` (text and JSON) and the TUI's Overview and
    GPUs tabs show the layout; a run whose segments recorded none says data parallel."""
    bare = json.loads(kit("status", str(fixed_run), "--json").stdout)
    assert bare["layout"] is None
    now = support.fixed_now()
    append(fixed_run, "train-r0", event("segment_started", t=now - 20, seg="seg3", world_size=8, step=8,
                                        layout={"tensor": 2, "pipeline": 2, "data": 2}))
    out = kit("status", str(fixed_run), "--json")
    assert out.returncode in (0, 1), out.stderr
    lay = json.loads(out.stdout)["layout"]
    assert lay == {"tensor": 2, "pipeline": 2, "data": 2, "world": 8, "label": "TP2 x PP2 x DP2"}
    assert "layout     TP2 x PP2 x DP2 (8 ranks" in kit("status", str(fixed_run)).stdout
    app = make_app([fixed_run], use_slurm=False)
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        assert "TP2 x PP2 x DP2" in str(app.query_one("#chain").render())
        await pilot.press("2")
        await wait_for(pilot, lambda: "TP2 x PP2 x DP2" in str(app.query_one("#layoutline").render()),
                       what="the GPUs tab's layout line")


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.none(), st.integers(), st.text(max_size=5),
                 st.dictionaries(st.sampled_from(["tensor", "pipeline", "data", "x"]),
                                 st.one_of(st.integers(-3, 9), st.text(max_size=3), st.none(), st.booleans()))))
def test_a_segments_layout_is_shown_only_when_it_is_three_positive_integers(raw: Any) -> None:
    from kit.run.model import _layout
    from kit.run.summary import layout_view

    lay = _layout(raw)
    view = layout_view(lay)
    if view is None:
        assert lay is None
    else:
        assert view["world"] == view["tensor"] * view["pipeline"] * view["data"] >= 1
        assert isinstance(raw, dict) and all(raw[k] == view[k] for k in ("tensor", "pipeline", "data"))

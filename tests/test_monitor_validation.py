"""The monitor's validation panel: per-source validation loss from the ledger's eval events.

The ledger is the committed copy of a real tiny run (tests/snapshots/monitor_run); its steps are too few
for an evaluation, so the eval events are appended with the schema's fields (as kit.evaluation writes
them), and each test says what they hold. Folding is also fuzzed with generated events.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import test_monitor_support as support
from hypothesis import given, settings
from hypothesis import strategies as st
from test_monitor_support import append, event, fixed_now, wait_for

from kit.monitor.app import loaded, make_app
from kit.monitor.widgets import ValidationPanel
from kit.run.model import RunModel
from kit.run.validation import EvalHistory

fixed_run = support.fixed_run
SOURCES = ("fr", "de", "ru", "ja", "zh")


def eval_event(step: int, t: float, losses: dict[str, float], by: str = "live", **extra: Any) -> str:
    sources = {k: {"language": k, "loss": v, "ppl": math.exp(v), "tokens": 124, "sequences": 4}
               for k, v in losses.items()}
    return event("eval", t=t, src="train-r0", step=step, by=by, sources=sources, seconds=0.05, fraction=0.012,
                 interval_steps=100, **extra)


def history(t0: float) -> str:
    """Six evaluations: every source improves, except ru, which rises after step 400 (an alert is
    open for it), and ja, which rises a little at the last one."""
    lines = []
    for i in range(6):
        losses = {s: 5.0 - 0.2 * i - 0.01 * k for k, s in enumerate(SOURCES)}
        if i >= 4:
            losses["ru"] = 5.0
        if i == 5:
            losses["ja"] = losses["ja"] + 0.3
        lines.append(eval_event(100 * (i + 1), t0 + i, losses, incidents=["ru"] if i >= 4 else []))
    return "".join(lines)


async def test_panel_shows_every_source_worst_first(fixed_run: Path) -> None:
    now = fixed_now()
    append(fixed_run, "train-r0", history(now - 600))
    app = make_app([fixed_run], use_slurm=False, clock=lambda: now)
    async with app.run_test(size=(130, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        await pilot.press("7")
        panel = app.query_one(ValidationPanel)
        table = panel.query_one("#valtable")
        await wait_for(pilot, lambda: table.row_count == len(SOURCES), what="validation rows")
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert [r[0] for r in rows[:2]] == ["ru", "ja"]  # the open alert first, then the worst-moving
        assert rows[0][-1] == "ALERT" and rows[1][-1] == "worst-moving"
        assert rows[1][4].startswith("+") and all(r[4].startswith("-") for r in rows[2:])
        head = str(panel.query_one("#valhead").render())
        assert "last evaluation: step 600, 10m ago (live)" in head and "1.2% of training time" in head


async def test_panel_follows_new_evaluations(fixed_run: Path) -> None:
    import time

    app = make_app([fixed_run], use_slurm=False)
    async with app.run_test(size=(130, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        await pilot.press("7")
        head = app.query_one(ValidationPanel).query_one("#valhead")
        assert "no evaluations in the ledger yet" in str(head.render())
        append(fixed_run, "train-r0", eval_event(700, time.time(), {"fr": 3.0}))
        await wait_for(pilot, lambda: "step 700" in str(head.render()), what="the appended evaluation")


def test_a_replayed_evaluation_replaces_the_abandoned_timeline() -> None:
    h = EvalHistory()
    for step in (2, 4, 6):
        h.fold({"step": step, "sources": {"fr": {"loss": 3.0 - step / 10}}}, float(step))
    h.fold({"step": 4, "sources": {"fr": {"loss": 9.0}}}, 10.0)  # a rollback replayed step 4
    v = h.view()
    assert v is not None and v.steps == [2, 4] and v.series["fr"] == [2.8, 9.0]
    h.fold({"step": 2, "by": "stream", "sources": {"de": {"loss": 1.0}}}, 11.0)  # kit stream --eval, later
    v = h.view()
    assert v is not None and v.series["de"] == [1.0, None] and v.series["fr"] == [2.8, 9.0] and v.last_step == 4


def test_history_is_bounded() -> None:
    h = EvalHistory(capacity=100)
    for step in range(1, 5001):
        h.fold({"step": step, "sources": {"fr": {"loss": 1.0}, "de": {"loss": 2.0}}}, float(step))
    v = h.view()
    assert v is not None and len(h.points) <= 100 and v.steps[0] == 1 and v.steps[-1] == 5000


junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.floats(), max_size=3))


@settings(max_examples=200, deadline=None)  # a busy machine must not fail it
@given(events=st.lists(st.fixed_dictionaries({"kind": st.just("eval"), "t": st.floats(0, 1e9)}, optional={
    "step": st.one_of(junk, st.integers(0, 100)), "by": junk, "incidents": junk, "note": junk,
    "interval_steps": junk, "seconds": junk,
    "sources": st.one_of(junk, st.dictionaries(st.text(max_size=4), st.one_of(junk, st.fixed_dictionaries(
        {}, optional={"loss": junk, "language": junk})), max_size=4))}), max_size=20))
def test_junk_eval_events_never_break_the_model(events: list[dict[str, Any]]) -> None:
    m = RunModel("r")
    m.fold_all(events)  # a field of the wrong type is counted as junk, never raised
    v = m.evals.view()
    if v is not None:
        assert all(len(ys) == len(v.steps) for ys in v.series.values())
        assert all(y is None or math.isfinite(y) for ys in v.series.values() for y in ys)

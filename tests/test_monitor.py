"""The monitor's behaviour, driven with Textual's Pilot on the ledger of a real tiny run.

The run (two segments, a resume in between) is made once per session by kit's own launcher with
real DeepSpeed ranks on CPU. Events the tiny run cannot produce here (alerts from a GPU sampler, the
trainer's control acknowledgement while the monitor watches) are appended as ledger lines with the
schema's writer, and each test says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_monitor_support as support
from test_monitor_support import append, event, wait_for

from kit.ledger import LedgerWriter, hostname, read_all
from kit.monitor.app import MonitorApp, loaded, make_app
from kit.monitor.feed import Feed
from kit.monitor.widgets import AlertTable, ChainPanel, CkptTable, ConfirmScreen, HelpScreen, SegmentTable

tiny_run_src, tiny_run, fixed_run = support.tiny_run_src, support.tiny_run, support.fixed_run
slow = [pytest.mark.slow, pytest.mark.deepspeed]


def panel_text(app: MonitorApp) -> str:
    return str(app.query_one(ChainPanel).render())


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_shows_the_real_run(tiny_run: Path) -> None:
    """What is on screen agrees with kit's own ledger reader on the same files."""
    events = read_all(tiny_run)
    steps: dict[int, float] = {}
    for e in events:
        if e["kind"] == "step":
            steps[e["step"]] = e["loss"]  # the latest event for a step wins
    last_step = [e for e in events if e["kind"] == "step"][-1]["step"]
    tags = {e["tag"] for e in events if e["kind"] == "ckpt_saved"}
    segs = {e["seg"] for e in events if e["kind"] == "segment_started"}
    app = make_app([tiny_run], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        text = panel_text(app)
        assert f"step {last_step}/8" in text and f"segment {sorted(segs)[-1]} of {len(segs)}" in text
        await pilot.press("3")
        assert app.query_one(CkptTable).row_count == len(tags) > 0
        await pilot.press("5")
        assert app.query_one(SegmentTable).row_count == len(segs) == 2
        xs, ys = app.snaps[0].curves["run"]["loss"]
        assert xs[-1] == last_step and ys[-1] == pytest.approx(steps[last_step])
        assert dict(zip(xs, ys, strict=True)) == pytest.approx({k: steps[k] for k in xs})
        ended = [e for e in events if e["kind"] == "segment_ended"][-1]["reason"]
        if ended == "done":
            assert "HEALTHY" in text and "finished" in text


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_appended_events_reach_the_screen(tiny_run: Path) -> None:
    """A step written by the ledger's own writer is on screen within the follower's period."""
    app = make_app([tiny_run], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        with LedgerWriter(tiny_run, "train-r0", seg="seg3") as w:
            w.emit("segment_started", world_size=2, step=8, max_steps=20)
            w.emit("step", step=9, loss=4.321, tokens_per_s=1234.0, step_time=0.1)
        await wait_for(pilot, lambda: "step 9/" in panel_text(app), timeout=15, what="step 9 on screen")
        assert "4.321" in panel_text(app) and "running" in panel_text(app)


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_keys_windows_tabs_and_help(tiny_run: Path) -> None:
    app = make_app([tiny_run], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        await pilot.press("w")
        assert app.window == "hour"
        await pilot.press("w", "w")
        assert app.window == "run"
        await pilot.press("t")
        assert app.rate_metric == "samples_per_s"
        await pilot.press("l")
        assert app.loss_metric == "grad_norm"
        await pilot.press("2")
        assert app.query_one("TabbedContent").active == "gpus"  # type: ignore[attr-defined]
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_save_now_asks_first_then_writes_the_switch_and_shows_the_ack(tiny_run: Path) -> None:
    """The acknowledgement is appended as the trainer writes it (kit/trainer.py _ack): the tiny run has
    already finished and cannot consume the switch while the monitor watches."""
    app = make_app([tiny_run], use_slurm=False)
    switch = tiny_run / "control" / "save-now"
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause(0.2)
        assert not switch.exists()
        await pilot.press("s")
        await pilot.press("y")
        await wait_for(pilot, switch.exists, timeout=15, what="control/save-now")
        assert "kit monitor" in switch.read_text()
        await wait_for(pilot, lambda: "waiting for the run" in panel_text(app), timeout=15, what="pending")
        with LedgerWriter(tiny_run, "train-r0", seg="seg2") as w:
            w.emit("control_ack", switch="save-now", step=8, note="kit monitor")
        await wait_for(pilot, lambda: "acknowledged at step 8" in panel_text(app), timeout=15, what="ack shown")


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_read_only_refuses_actions(tiny_run: Path) -> None:
    app = make_app([tiny_run], use_slurm=False, read_only=True)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        await pilot.press("s", "x")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmScreen)
        assert not (tiny_run / "control" / "save-now").exists() and not (tiny_run / "control" / "stop").exists()


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_alert_acknowledgement_goes_to_the_monitors_own_ledger(tiny_run: Path) -> None:
    """The alert is written with the ledger writer, as the health sampler would on a GPU node."""
    with LedgerWriter(tiny_run, "health-node07") as w:
        alert = w.alert("error", "node07 GPU 1: Xid 79", node="node07")
    app = make_app([tiny_run], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="first frame")
        assert any("unacknowledged" in r for r in app.snaps[0].summary["reasons"])
        await pilot.press("4", "a")
        mine = tiny_run / "ledger" / f"monitor-{hostname()}-{os.getpid()}.jsonl"
        await wait_for(pilot, mine.exists, timeout=15, what="the monitor's ledger file")
        ack = json.loads(mine.read_text().splitlines()[-1])
        assert ack["kind"] == "alert_ack" and ack["alert_t"] == alert["t"]
        await wait_for(pilot, lambda: app.snaps[0].alerts[0].acked, timeout=15, what="ack read back")
        assert app.snaps[0].alerts[0].message == "node07 GPU 1: Xid 79"
        assert not any("node07" in a.message for a in app.snaps[0].alerts if not a.acked)
        assert app.query_one(AlertTable).row_count == len(app.snaps[0].alerts)


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_several_runs_switch(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    append(other, "train-r0", event("alert", severity="critical", message="boom"))
    app = make_app([tiny_run, other], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        await wait_for(pilot, lambda: loaded(app), what="both runs")
        assert app.query_one("#runs").display
        assert app.title.endswith("mon")
        await pilot.press("n")
        assert app.current == 1 and app.title.endswith("other")
        await pilot.press("4")
        assert "boom" in str(app.query_one(AlertTable).get_row_at(0)[2])
        await pilot.press("p")
        assert app.current == 0 and app.title.endswith("mon")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_replay_plays_the_run_back_in_order(tiny_run: Path) -> None:
    """At real speed the steps (tens of ms apart) arrive one by one, and time never goes backwards;
    the gaps between segments are cut to a second."""
    import time

    feed = Feed(tiny_run, replay_speed=1.0)
    feed.open()
    seen: list[tuple[int | None, float | None]] = []
    deadline = time.monotonic() + 90
    while not feed.replay_done and time.monotonic() < deadline:
        if feed.work():
            seen.append((feed.model.step, feed.model.last_t))
        time.sleep(0.005)
    last = [e for e in read_all(tiny_run) if e["kind"] == "step"][-1]["step"]
    assert feed.replay_done and feed.model.step == last
    assert len({s for s, _ in seen if s is not None}) >= 3  # it went through the steps, not to the end at once
    times = [t for _, t in seen]
    assert times == sorted(times)
    assert feed.snapshot().replay == "replay x1 (end)"


def test_once_exit_status_and_json(fixed_run: Path) -> None:
    """On the committed ledger of a real tiny run (finished): healthy, then degraded, then down."""
    kit = [sys.executable, "-m", "kit.tools.cli", "monitor"]
    for extra in ("stream", "health-node01", "health-node02", "health-node03"):
        (fixed_run / "ledger" / f"{extra}.jsonl").rename(fixed_run / f"{extra}.aside")
    p = subprocess.run([*kit, str(fixed_run), "--once", "--json", "--no-slurm"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    [s] = json.loads(p.stdout)
    assert s["status"] == "healthy" and s["phase"] == "finished" and s["step"] == 8
    append(fixed_run, "health-node01", event("alert", severity="warning", message="slow disk"))
    p = subprocess.run([*kit, str(fixed_run), "--once", "--no-slurm"], capture_output=True, text=True)
    assert p.returncode == 1 and "DEGRADED" in p.stdout and "unacknowledged" in p.stdout
    p = subprocess.run([*kit, str(fixed_run), str(fixed_run.parent / "nope"), "--once", "--no-slurm"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "DOWN (unreadable)" in p.stdout


def test_a_crashed_segment_is_down(fixed_run: Path) -> None:
    """The trainer killed before writing segment_ended: its last lines removed, as a SIGKILL leaves it."""
    tiny_run = fixed_run
    f = tiny_run / "ledger" / "train-r0.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    assert json.loads(lines[-1])["kind"] == "segment_ended"
    f.write_text("".join(lines[:-2]))  # and the final checkpoint's line
    last = json.loads(lines[-3])["t"]
    feed = Feed(tiny_run, use_slurm=False, clock=lambda: last + 3600)
    feed.open()
    feed.work()
    s = feed.snapshot().summary
    assert s["status"] == "down" and s["phase"] == "stalled" and "no step for" in s["reasons"][0]
    fresh = Feed(tiny_run, use_slurm=False, clock=lambda: last + 5)
    fresh.open()
    fresh.work()
    assert fresh.snapshot().summary["phase"] == "running"


@pytest.mark.slow
@pytest.mark.deepspeed
async def test_save_now_end_to_end_with_a_real_training_segment(tmp_path: Path, deepspeed_ok: None) -> None:
    """The monitor watches a real segment (2 DeepSpeed ranks); the operator asks for a save; the
    trainer consumes the switch, saves and acknowledges; the monitor shows the acknowledgement.
    A fault point pauses the ranks for 6 s after step 2 (KIT_FAULTS sleep) so the request lands
    mid-run on this slow machine. Rank 0 looks at control/ every 0.5 s here (every 10 s by default:
    the tiny run can end before its first look)."""
    import asyncio

    from conftest import ROOT, tiny_overrides

    from kit.config import load_recipe
    from kit.launch import create_run, run_local_segment

    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path / "runs", "live",
                                                                  **{"checkpoint.interval_steps": 100,
                                                                     "trainer.control_check_s": 0.5}))
    rd = create_run(cfg, log=lambda *a: None)
    app = make_app([rd.path], use_slurm=False)
    async with app.run_test(size=(140, 40)) as pilot:
        seg = asyncio.create_task(asyncio.to_thread(
            run_local_segment, rd, cfg, seg="live1", quiet=True, extra_env={"KIT_FAULTS": "step.after@2=sleep6"}))
        await wait_for(pilot, lambda: app.snaps.get(0) is not None and app.snaps[0].summary["step"] == 1,
                       timeout=180, what="step 1 of the live segment")
        await pilot.press("s", "y")
        await wait_for(pilot, lambda: "acknowledged at step" in panel_text(app), timeout=60, what="the trainer's ack")
        outcome = await seg
    assert outcome.reason == "done", outcome
    acks = [e for e in read_all(rd.path) if e["kind"] == "control_ack" and e["switch"] == "save-now"]
    saves = {e["step"]: e.get("reason") for e in read_all(rd.path) if e["kind"] == "ckpt_saved"}
    assert len(acks) == 1 and saves[acks[0]["step"]] == "save-now" and not (rd.control / "save-now").exists()

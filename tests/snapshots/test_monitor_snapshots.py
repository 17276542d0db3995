"""Layout of the monitor's screens, checked with pytest-textual-snapshot (SVG golden files).

The ledger is tests/snapshots/monitor_run: a real tiny run's ledger (two segments, a resume), plus
health samples, alerts, a spike and checkpoint verification events written to the schema by hand,
because no GPU sampler or uploader runs on this machine. The clock is fixed a minute after the last
event, so ages on screen do not change with the date.

Regenerate after an intended change of layout, then look at the SVGs before committing them:
    pytest tests/snapshots/test_monitor_snapshots.py --snapshot-update
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from test_monitor_support import FIXED_RUN, fixed_now, wait_for

from kit.monitor.app import MonitorApp, loaded, make_app

SIZE = (130, 36)


@pytest.fixture
def app(tmp_path: Path) -> MonitorApp:
    run = tmp_path / "tiny"  # the run's name on screen
    shutil.copytree(FIXED_RUN, run)
    return make_app([run], use_slurm=False, clock=fixed_now)


async def _loaded(pilot: Any) -> None:
    await wait_for(pilot, lambda: loaded(pilot.app), what="first frame")
    await pilot.pause(0.1)


def test_overview(app: MonitorApp, snap_compare: Any) -> None:
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded)


def test_gpus_worst_first(app: MonitorApp, snap_compare: Any) -> None:
    assert snap_compare(app, press=["2"], terminal_size=SIZE, run_before=_loaded)


def test_checkpoints(app: MonitorApp, snap_compare: Any) -> None:
    assert snap_compare(app, press=["3"], terminal_size=SIZE, run_before=_loaded)


def test_alerts_newest_first(app: MonitorApp, snap_compare: Any) -> None:
    assert snap_compare(app, press=["4"], terminal_size=SIZE, run_before=_loaded)


def test_confirm_before_stop(app: MonitorApp, snap_compare: Any) -> None:
    assert snap_compare(app, press=["x"], terminal_size=SIZE, run_before=_loaded)


def test_help(app: MonitorApp, snap_compare: Any) -> None:
    assert snap_compare(app, press=["question_mark"], terminal_size=SIZE, run_before=_loaded)


def test_goodput(app: MonitorApp, snap_compare: Any) -> None:
    assert snap_compare(app, press=["6"], terminal_size=SIZE, run_before=_loaded)

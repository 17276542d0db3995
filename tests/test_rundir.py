"""The run directory: creation, freezing, refusal of a changed recipe, unwritable places, switches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.errors import ConfigError, RunDirError
from kit.rundir import SAVE_NOW, STOP, RunDir, resolve_run


def test_create_freezes_the_config_and_refuses_a_changed_recipe(tiny_cfg: Any) -> None:
    cfg = tiny_cfg("r")
    rd = RunDir(cfg.run_dir)
    assert rd.create(cfg) is True
    frozen = rd.run_toml.read_text()
    assert rd.create(cfg) is False  # same recipe: reopen
    assert rd.load_config().digest() == cfg.digest()
    with pytest.raises(ConfigError, match="different model/data/optimizer"):
        rd.create(tiny_cfg("r", **{"optim.lr": 0.5}))
    assert rd.run_toml.read_text() == frozen  # nothing overwritten
    # not arithmetic, but never silently ignored (nor silently applied): refused, with the way to amend it
    with pytest.raises(ConfigError, match=r"other settings than this recipe \(slurm.partition '' -> 'other'\); "
                                          r".*pass --amend .*kit amend .* --set 'slurm.partition=\"other\"'"):
        rd.create(tiny_cfg("r", **{"slurm.partition": "other"}))
    assert rd.run_toml.read_text() == frozen


def test_unwritable_run_directory(tmp_path: Path, tiny_cfg: Any) -> None:
    blocker = tmp_path / "runs-is-a-file"
    blocker.write_text("")
    cfg = tiny_cfg("x")
    cfg.run.runs_dir = str(blocker)
    with pytest.raises(RunDirError, match=r"is not writable.*choose another run.runs_dir"):
        RunDir(cfg.run_dir).create(cfg)
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "train", "tiny.toml", "--set",
                          f'run.runs_dir="{blocker}"'], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith("kit: error:") and "Traceback" not in out.stderr


def test_switches_are_files_consumed_once(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    rd.request(STOP, "maintenance at 6")
    assert rd.pending(STOP) and not rd.pending(SAVE_NOW)
    assert rd.consume(STOP) == "maintenance at 6"
    assert rd.consume(STOP) is None
    with pytest.raises(ValueError):
        rd.request("reboot")


def test_resolve_by_name_or_path(tiny_cfg: Any, tmp_path: Path) -> None:
    cfg = tiny_cfg("named")
    RunDir(cfg.run_dir).create(cfg)
    assert resolve_run(cfg.run_dir).path == cfg.run_dir
    assert resolve_run("named", cfg.run.runs_dir).path == Path(cfg.run.runs_dir) / "named"
    with pytest.raises(RunDirError, match="no run directory"):
        resolve_run("nope", tmp_path)


class Clock:
    """A clock the test moves: the watcher's bound is checked in steps of known length, not by sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_switch_watcher_looks_at_once_then_at_most_every_interval(tmp_path: Path) -> None:
    from kit.rundir import SwitchWatcher

    rd, clock = RunDir(tmp_path), Clock()
    rd.request(STOP, "before the segment")
    w = SwitchWatcher(rd, every_s=2.0, clock=clock)
    assert w.poll() == {STOP}  # a switch left before the segment acts at its first step
    rd.consume(STOP)
    rd.request(SAVE_NOW)
    for _ in range(3):  # within the interval: no listing, and never a stale answer
        clock.now += 0.5
        assert w.poll() == frozenset()
    assert w.looks == 1
    clock.now += 0.5
    assert w.poll() == {SAVE_NOW} and w.looks == 2
    every = SwitchWatcher(rd, every_s=0.0, clock=clock)
    assert [every.poll() for _ in range(3)] == [{SAVE_NOW}] * 3 and every.looks == 3
    assert SwitchWatcher(RunDir(tmp_path / "none"), 0.0).poll() == frozenset()  # no control/ folder yet


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.floats(0.001, 5.0), min_size=1, max_size=200), every_s=st.floats(0.0, 10.0),
       made=st.floats(0.0, 1.0))
def test_switch_watcher_bounds_latency_and_looks(tmp_path_factory: pytest.TempPathFactory, steps: list[float],
                                                  every_s: float, made: float) -> None:
    """Whatever the step times: a switch made at any moment is seen at the first step boundary that is
    at least every_s after it (so within every_s plus one step), and the looks are at most one per
    interval (plus the first)."""
    from kit.rundir import SwitchWatcher

    rd, clock = RunDir(tmp_path_factory.mktemp("w")), Clock()
    start = clock.now
    w = SwitchWatcher(rd, every_s=every_s, clock=clock)
    made_at = start + made * sum(steps)
    seen_at = None
    for dt in steps:
        if rd.pending(STOP) is False and clock.now >= made_at:
            rd.request(STOP)
        if STOP in w.poll():
            seen_at = clock.now
            break
        clock.now += dt
    if seen_at is not None:
        assert seen_at >= made_at
        assert seen_at - made_at <= every_s + max(steps) + 1e-9
    else:  # not seen: the run ended before the bound passed
        assert clock.now - made_at <= every_s + max(steps) + 1e-9
    elapsed = clock.now - start
    assert w.looks <= 1 + (elapsed / every_s if every_s else len(steps)) + 1e-9


def test_control_check_s_is_validated(tiny_cfg: Any) -> None:
    with pytest.raises(ConfigError, match=r"trainer.control_check_s must be a number of seconds >= 0"):
        tiny_cfg("c", **{"trainer.control_check_s": -1.0})

"""The run directory: creation, freezing, refusal of a changed recipe, unwritable places, switches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

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
    rd.create(tiny_cfg("r", **{"slurm.partition": "other"}))  # resources may change


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

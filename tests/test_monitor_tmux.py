"""`kit monitor` once in a real terminal: tmux runs the real command, the test reads the screen.

This is the one test that goes through a real terminal driver (keys as bytes, the screen as tmux
draws it) instead of Textual's headless Pilot. The ledger is the committed one of a real tiny run.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_monitor_support as support
from conftest import require

from kit.ledger import LedgerWriter

fixed_run = support.fixed_run


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False, timeout=10).stdout


def wait_screen(session: str, text: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not on screen after {timeout} s; the screen was:\n{screen}")


@pytest.mark.slow
def test_monitor_in_a_real_terminal(fixed_run: Path, tmp_path: Path) -> None:
    require(shutil.which("tmux") is not None, "tmux (dev.sh installs it)")
    session = f"kitmon{os.getpid()}"
    rc_file = tmp_path / "rc"
    cmd = (f"{shlex.quote(sys.executable)} -m kit.tools.cli monitor {shlex.quote(str(fixed_run))} --no-slurm; "
           f"echo $? > {shlex.quote(str(rc_file))}; sleep 30")
    tmux("new-session", "-d", "-s", session, "-x", "130", "-y", "36", cmd)
    try:
        wait_screen(session, "finished")
        with LedgerWriter(fixed_run, "train-r0", seg="seg3") as w:
            w.emit("segment_started", world_size=2, step=8, max_steps=20)
            w.emit("step", step=9, loss=4.25)
        screen = wait_screen(session, "step 9/20")  # followed live (bench/monitor.py times it)
        assert "running" in screen
        tmux("send-keys", "-t", session, "2")
        wait_screen(session, "ECC vol/agg")
        tmux("send-keys", "-t", session, "s")
        wait_screen(session, "save a checkpoint now?")
        tmux("send-keys", "-t", session, "y")
        deadline = time.monotonic() + 15
        while not (fixed_run / "control" / "save-now").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (fixed_run / "control" / "save-now").exists()
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 10
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "0"
    finally:
        tmux("kill-session", "-t", session)

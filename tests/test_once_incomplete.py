"""`kit monitor --once` never answers partially in silence (issue 16).

Nothing in a summary gives up on time any more (the ledger is read whole, through its index); what can
still be missing is what cannot be read: a ledger file the reader may not open or read (permissions, a
dead mount, a disk error) and a Slurm query that timed out. Then the summary says so in ``incomplete``
and its reasons, and the command exits 3, a status of its own (docs/monitor.md).

The unreadable file is real: a file with mode 000. The tests run as root here, which reads any file, so
the command runs with the two capabilities that bypass permissions dropped from its bounding set
(setpriv; a non-root user needs nothing). The hung Slurm controller is a ``squeue`` on the PATH that
never answers (this machine's real Slurm answers fast), with the query timeout shortened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_monitor_support as support

from kit.ledger import ReadStats
from kit.run import queue
from kit.run.summary import INCOMPLETE, incomplete

KIT = [sys.executable, "-m", "kit.tools.cli"]
fixed_run = support.fixed_run


def unprivileged(cmd: list[str]) -> list[str]:
    """``cmd`` subject to file permissions: root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("running as root: dropping the permission-bypassing capabilities needs setpriv (util-linux)")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]


def test_an_unreadable_ledger_file_makes_the_answer_incomplete_and_says_so(fixed_run: Path) -> None:
    p = subprocess.run(unprivileged([*KIT, "monitor", str(fixed_run), "--once", "--json", "--no-slurm"]),
                       capture_output=True, text=True)
    assert p.returncode in (0, 1), p.stderr  # readable: one of the verdicts
    [whole] = json.loads(p.stdout)
    assert whole["incomplete"] == [] and whole["reader"]["unreadable"] == 0
    hidden = fixed_run / "ledger" / "health-node01.jsonl"
    hidden.chmod(0)
    try:
        p = subprocess.run(unprivileged([*KIT, "monitor", str(fixed_run), "--once", "--json", "--no-slurm"]),
                           capture_output=True, text=True)
        assert p.returncode == INCOMPLETE == 3, p.stderr
        [s] = json.loads(p.stdout)
        assert s["exit"] == 3 and s["reader"]["unreadable"] == 1 and len(s["incomplete"]) == 1
        assert "health-node01.jsonl" in s["incomplete"][0] and "Permission denied" in s["incomplete"][0]
        assert any(r.startswith("incomplete: ") for r in s["reasons"])
        assert s["status"] in ("healthy", "degraded", "down") and s["step"] == whole["step"]  # the verdict stays
        text = subprocess.run(unprivileged([*KIT, "monitor", str(fixed_run), "--once", "--no-slurm"]),
                              capture_output=True, text=True)
        assert text.returncode == 3 and "INCOMPLETE" in text.stdout and "could not be read" in text.stdout
        status = subprocess.run(unprivileged([*KIT, "status", str(fixed_run), "--json", "--exit-status"]),
                                capture_output=True, text=True)
        assert status.returncode == 3, status.stderr  # kit status shows the same summary
    finally:
        hidden.chmod(0o644)


def test_a_slurm_query_that_times_out_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hung = tmp_path / "bin"
    hung.mkdir()
    for cmd in ("squeue", "sacct"):
        (hung / cmd).write_text("#!/bin/sh\nexec sleep 30\n")
        (hung / cmd).chmod(0o755)
    monkeypatch.setenv("PATH", f"{hung}:{os.environ['PATH']}")
    monkeypatch.setattr(queue, "TIMEOUT_S", 0.5)
    monkeypatch.setattr(queue.run, "__defaults__", (0.5,))
    q = queue.query(["1234"], history=True)
    assert queue.TIMED_OUT in q.gave_up and "squeue" in q.gave_up and "sacct" in q.gave_up
    said = incomplete(ReadStats(), q)
    assert len(said) == 1 and "Slurm did not answer" in said[0]
    fine = queue.QueueInfo(True, error="squeue: Invalid job id specified")  # jobs that left the queue: not giving up
    assert incomplete(ReadStats(), fine) == [] and incomplete(ReadStats(), None) == []

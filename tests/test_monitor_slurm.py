"""The chain as the monitor sees it: squeue/sacct on the real local Slurm, the ledger without it."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import test_monitor_support as support

from kit.ledger import LedgerWriter
from kit.monitor.feed import Feed
from kit.run import queue

fixed_run = support.fixed_run


def test_without_slurm_the_chain_comes_from_the_ledger(fixed_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no squeue, no sacct
    q = queue.query(["1234"])
    assert not q.available and "no squeue" in q.error
    feed = Feed(fixed_run, clock=support.fixed_now)
    feed.open()
    feed.work()
    s = feed.snapshot().summary
    assert s["slurm"] == {"available": False, "error": q.error, "history": []} and s["segment"]["seg"] == "seg2"
    assert s["next"] is None and s["phase"] == "finished"


@pytest.mark.slurm
def test_squeue_and_sacct_report_a_real_job(slurm: None, tmp_path: Path, fixed_run: Path) -> None:
    """A real job stands in for a segment's allocation: the chain panel's state and time left come
    from squeue while it runs, and from sacct once it is gone."""
    out = subprocess.run(["sbatch", "--parsable", "--time=1", "-o", str(tmp_path / "out"), "--wrap", "sleep 60"],
                         capture_output=True, text=True, check=True).stdout
    job = re.split(r"[;\s]", out.strip())[0]
    try:
        deadline = time.monotonic() + 30
        q = queue.query([job])
        while job not in q.jobs and time.monotonic() < deadline:
            time.sleep(0.5)
            q = queue.query([job])
        assert q.available and q.jobs[job].state in ("PENDING", "RUNNING", "CONFIGURING")
        assert q.running() is not None or q.pending() is not None
        with LedgerWriter(fixed_run, "train-r0", seg=f"{job}_0") as w:
            w.emit("segment_started", world_size=2, step=8, max_steps=20, job_id=job)
        feed = Feed(fixed_run)
        feed.open()
        feed.work()
        seg = feed.snapshot().summary["segment"]
        assert seg["job_id"] == job and seg["state"] in ("PENDING", "RUNNING", "CONFIGURING")
        assert seg["state"] != "RUNNING" or re.fullmatch(r"[\d:-]+", seg["time_left"])
    finally:
        subprocess.run(["scancel", job], check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        q = queue.query([job])
        if q.jobs.get(job) and q.jobs[job].source == "sacct":
            break
        time.sleep(1)
    assert q.jobs[job].source == "sacct" and q.jobs[job].state.startswith("CANCELLED")

"""The chain as Slurm sees it: squeue for running and pending jobs, sacct for ended ones.

Called from the follower thread (never the UI thread), at most every ``QUEUE_PERIOD_S``; a missing
Slurm (a laptop, a test machine), a slow controller or an error is a :class:`QueueInfo` that says so,
and the monitor falls back to what the ledger tells.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field

QUEUE_PERIOD_S = 30.0
TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class JobInfo:
    job_id: str
    state: str
    time_left: str = ""  # squeue %L, e.g. 3:21:05 or 1-02:00:00
    reason: str = ""  # the pending reason (Priority, Resources, ...)
    start: str = ""  # the expected start (pending) or start (running), ISO
    source: str = "squeue"


@dataclass(frozen=True, slots=True)
class QueueInfo:
    available: bool
    jobs: dict[str, JobInfo] = field(default_factory=dict)
    error: str = ""

    def running(self) -> JobInfo | None:
        return next((j for j in self.jobs.values() if j.state in ("RUNNING", "COMPLETING")), None)

    def pending(self) -> JobInfo | None:
        return next((j for j in self.jobs.values() if j.state in ("PENDING", "REQUEUED", "CONFIGURING")), None)


NO_SLURM = QueueInfo(False, error="no squeue on this machine")


def _run(cmd: list[str]) -> tuple[str, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return "", f"{cmd[0]} timed out after {TIMEOUT_S:.0f} s"
    except OSError as e:
        return "", f"{cmd[0]}: {e.strerror}"
    if p.returncode != 0:
        return "", f"{cmd[0]}: {p.stderr.strip()[:200] or f'exit {p.returncode}'}"
    return p.stdout, ""


def query(job_ids: list[str]) -> QueueInfo:
    """State of the chain's jobs (array and requeued ids included), newest first."""
    ids = [j for j in dict.fromkeys(job_ids) if j and j.replace("_", "").isdigit()][-20:]
    if not shutil.which("squeue"):
        return NO_SLURM
    if not ids:
        return QueueInfo(True)
    jobs: dict[str, JobInfo] = {}
    out, err = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%L|%r|%S"])
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 5:
            jid, state, left, reason, start = parts
            jobs[jid] = JobInfo(jid, state, "" if left in ("INVALID", "UNLIMITED") else left,
                                "" if reason in ("None", "(null)") else reason, "" if start == "N/A" else start)
    missing = [j for j in ids if j not in jobs]
    if missing and shutil.which("sacct"):
        out2, err2 = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(missing), "-o", "JobID,State,Start"])
        err = err or err2
        for line in out2.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] not in jobs:
                jobs[parts[0]] = JobInfo(parts[0], parts[1].split()[0] if parts[1] else "", start=parts[2],
                                         source="sacct")
    return QueueInfo(True, jobs, err)

"""The one Slurm query module: what squeue and sacct say about a run's jobs (read-only).

Why shell out: these commands are the stable interface of every Slurm site, they work from login and
compute nodes alike, and submitit uses them too. Every query returns data, never raises: a missing
Slurm (a laptop, a test machine), a slow controller or an error is a :class:`QueueInfo` that says so,
and the tools fall back to what the ledger tells. ``kit status``, ``kit monitor`` (once and live) and
the chain's driver all ask through here; the chain's actions (submit, requeue, cancel) live in
kit.jobs.slurmctl.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from datetime import datetime

TIMEOUT_S = 10.0
TIMED_OUT = "timed out after"  # in the error of a command that did not answer within its timeout


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One job (or one requeued run of it) as Slurm sees it."""

    job_id: str
    state: str
    reason: str = ""  # the pending reason (Priority, Resources, ...)
    start: float | None = None  # actual start (running, ended) or Slurm's expected start (pending)
    end: float | None = None  # expected end (running: start + time limit) or actual end (sacct)
    time_left_s: float | None = None
    nodes: str = ""
    name: str = ""
    source: str = "squeue"  # or "sacct" for jobs that left the queue


@dataclass(frozen=True, slots=True)
class AcctRecord:
    """One run of a job as sacct recorded it (requeued runs appear once each with ``sacct -D``)."""

    job_id: str
    state: str
    submit: float | None
    eligible: float | None
    start: float | None
    end: float | None
    elapsed_s: float | None
    nodes: str
    exit_code: str


@dataclass(frozen=True, slots=True)
class QueueInfo:
    available: bool
    jobs: dict[str, JobInfo] = field(default_factory=dict)
    history: tuple[AcctRecord, ...] = ()
    error: str = ""
    gave_up: str = ""  # a query that timed out: the answer lacks what it would have said (the summary says so)

    def running(self) -> JobInfo | None:
        return next((j for j in self.jobs.values() if j.state in ("RUNNING", "COMPLETING")), None)

    def pending(self) -> JobInfo | None:
        return next((j for j in self.jobs.values() if j.state in ("PENDING", "REQUEUED", "CONFIGURING")), None)


NO_SLURM = QueueInfo(False, error="no squeue on this machine")


def run(cmd: list[str], timeout: float = TIMEOUT_S) -> tuple[str, str]:
    """(stdout, error text): never raises."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "", f"{cmd[0]} {TIMED_OUT} {timeout:.0f} s"
    except OSError as e:
        return "", f"{cmd[0]}: {e.strerror}"
    if p.returncode != 0:
        return "", f"{cmd[0]}: {p.stderr.strip()[:200] or f'exit {p.returncode}'}"
    return p.stdout, ""


def parse_time(text: str) -> float | None:
    """Slurm's local ISO time (``2026-11-28T05:01:02``) as Unix seconds; None for N/A/Unknown/None."""
    text = text.strip()
    if not text or text in ("N/A", "Unknown", "None", "(null)"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_duration(text: str) -> float | None:
    """``[D-]HH:MM:SS``, ``MM:SS`` or minutes as seconds (squeue %L, sacct Elapsed, time limits)."""
    text = text.strip()
    if not text or text in ("UNLIMITED", "INVALID", "NOT_SET", "N/A"):
        return None
    try:
        days = 0
        if "-" in text:
            d, text = text.split("-", 1)
            days = int(d)
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        return None
    if len(parts) > 3 or any(p < 0 for p in parts) or days < 0:
        return None
    if len(parts) == 1:  # plain minutes (sbatch --time=90)
        return days * 86400 + parts[0] * 60.0
    if len(parts) == 2:
        parts = [0, *parts]
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


SQUEUE_FORMAT = "%i|%T|%r|%S|%e|%L|%N|%j"


def squeue_rows(out: str) -> list[JobInfo]:
    rows = []
    for line in out.splitlines():
        f = line.strip().split("|")
        if len(f) != 8:
            continue
        rows.append(JobInfo(f[0], f[1], "" if f[2] in ("None", "(null)") else f[2], parse_time(f[3]),
                            parse_time(f[4]), parse_duration(f[5]), f[6], f[7]))
    return rows


def squeue(job_id: str = "", name: str = "") -> list[JobInfo]:
    """Jobs in the queue (pending or running), by id or by job name; [] when there are none or
    Slurm cannot be asked."""
    cmd = ["squeue", "-h", "-o", SQUEUE_FORMAT]
    if job_id:
        cmd += ["-j", job_id]
    if name:
        cmd += ["-n", name]
    out, _ = run(cmd)  # "Invalid job id specified" once the job has left the queue: no rows
    return squeue_rows(out)


def sacct(job_ids: list[str]) -> list[AcctRecord]:
    """History of the given jobs, every requeued run included, oldest first; [] if sacct fails."""
    return _sacct(job_ids)[0]


def _sacct(job_ids: list[str]) -> tuple[list[AcctRecord], str]:
    if not job_ids:
        return [], ""
    out, err = run(["sacct", "-n", "-X", "-D", "-P", "-j", ",".join(job_ids),
                    "-o", "JobID,State,Submit,Eligible,Start,End,Elapsed,NodeList,ExitCode"])
    rows = []
    for line in out.splitlines():
        f = line.split("|")
        if len(f) != 9:
            continue
        rows.append(AcctRecord(f[0], f[1].split()[0] if f[1] else "", parse_time(f[2]), parse_time(f[3]),
                               parse_time(f[4]), parse_time(f[5]), parse_duration(f[6]), f[7], f[8]))
    rows.sort(key=lambda r: r.submit or 0)
    return rows, err


def query(job_ids: list[str], history: bool = False) -> QueueInfo:
    """State of a run's jobs (newest first): squeue for the queued and running ones, sacct for the
    ones that left the queue; with ``history``, every run of every job (queue waits)."""
    ids = [j for j in dict.fromkeys(job_ids) if j and j.replace("_", "").isdigit()][-50:]
    if not shutil.which("squeue"):
        return NO_SLURM
    if not ids:
        return QueueInfo(True)
    out, err = run(["squeue", "-h", "-j", ",".join(ids), "-o", SQUEUE_FORMAT])
    jobs = {j.job_id: j for j in squeue_rows(out)}
    missing = [j for j in ids if j not in jobs]
    records: list[AcctRecord] = []
    acct_err = ""
    if (missing or history) and shutil.which("sacct"):
        records, acct_err = _sacct(ids if history else missing)
        for r in records:
            if r.job_id in missing:
                jobs[r.job_id] = JobInfo(r.job_id, r.state, start=r.start, end=r.end, nodes=r.nodes, source="sacct")
    gave_up = "; ".join(e for e in (err, acct_err) if TIMED_OUT in e)
    return QueueInfo(True, jobs, tuple(records) if history else (), err, gave_up)

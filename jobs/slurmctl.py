"""Thin, typed wrappers around Slurm's own commands (squeue, scontrol, sacct, sinfo, sbatch --test-only).

Why shell out instead of an API: these commands are the stable interface of every Slurm site, they
work from login and compute nodes alike, and submitit uses them too. Each wrapper returns plain data
(``None`` or an empty list when Slurm does not know the job), never raises on a missing job, and
raises :class:`SlurmError` only when the command itself is missing or broken.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime

from kit.errors import KitError

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


class SlurmError(KitError):
    """A Slurm command failed or refused a request (bad partition, account, option...)."""


def available() -> bool:
    """True when this machine can talk to a Slurm controller (sbatch present and sinfo answers)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def _run(cmd: list[str], timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SlurmError(f"`{cmd[0]}` is not installed here; run on a Slurm login node") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer in {timeout:.0f} s; is slurmctld up?") from None
    if check and out.returncode != 0:
        raise SlurmError(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout).strip()}")
    return out


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
    if len(parts) > 3:
        return None
    if len(parts) == 1:  # plain minutes (sbatch --time=90)
        return days * 86400 + parts[0] * 60.0
    if len(parts) == 2:
        parts = [0, *parts]
    h, m, s = parts
    return days * 86400 + h * 3600 + m * 60 + s


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One job as squeue sees it."""

    job_id: str
    state: str
    reason: str
    start: float | None  # actual start (running) or Slurm's expected start (pending)
    end: float | None  # expected end (running: start + time limit)
    time_left_s: float | None
    nodes: str
    name: str


def squeue(job_id: str = "", name: str = "", mine: bool = False) -> list[QueueEntry]:
    """Jobs in the queue (pending or running), by id or by job name (``mine``: this user's only)."""
    cmd = ["squeue", "-h", "-o", "%i|%T|%r|%S|%e|%L|%N|%j"]
    if job_id:
        cmd += ["-j", job_id]
    if name:
        cmd += ["-n", name]
    if mine:
        import getpass

        cmd += ["-u", getpass.getuser()]
    out = _run(cmd)
    if out.returncode != 0:  # "Invalid job id specified" once the job has left the queue
        return []
    rows = []
    for line in out.stdout.splitlines():
        f = line.split("|")
        if len(f) != 8:
            continue
        rows.append(QueueEntry(f[0], f[1], f[2], parse_time(f[3]), parse_time(f[4]), parse_duration(f[5]), f[6],
                               f[7]))
    return rows


def job_state(job_id: str) -> str:
    """Queue state of a job ("PENDING", "RUNNING"...) or "" once it has left the queue."""
    rows = squeue(job_id)
    return rows[0].state if rows else ""


def is_active(job_id: str) -> bool:
    return bool(job_id) and job_state(job_id) in ACTIVE_STATES


def job_end_time(job_id: str, retries: int = 3) -> float | None:
    """When the running allocation will be killed (Unix seconds): the trainer's KIT_DEADLINE."""
    for _ in range(retries):
        rows = squeue(job_id)
        if rows and rows[0].end:
            return rows[0].end
        time.sleep(1)
    return None


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


def sacct(job_ids: list[str]) -> list[AcctRecord]:
    """History of the given jobs, every requeued run included, oldest first; [] if sacct fails."""
    if not job_ids:
        return []
    out = _run(["sacct", "-n", "-X", "-D", "-P", "-j", ",".join(job_ids),
                "-o", "JobID,State,Submit,Eligible,Start,End,Elapsed,NodeList,ExitCode"])
    if out.returncode != 0:
        return []
    rows = []
    for line in out.stdout.splitlines():
        f = line.split("|")
        if len(f) != 9:
            continue
        rows.append(AcctRecord(f[0], f[1].split()[0] if f[1] else "", parse_time(f[2]), parse_time(f[3]),
                               parse_time(f[4]), parse_time(f[5]), parse_duration(f[6]), f[7], f[8]))
    rows.sort(key=lambda r: r.submit or 0)
    return rows


def expand_nodes(nodelist: str) -> list[str]:
    """``node[1-3],gpu7`` as a list of names (scontrol show hostnames, with a local fallback)."""
    if not nodelist or nodelist in ("(null)", "None"):
        return []
    out = _run(["scontrol", "show", "hostnames", nodelist])
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()
    return [nodelist]


def partition_nodes(partition: str = "") -> list[str]:
    """Nodes of a partition (the default one when empty) that are not down or drained."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%t|%P"]
    if partition:
        cmd += ["-p", partition]
    out = _run(cmd)
    names: list[str] = []
    for line in out.stdout.splitlines():
        f = line.split("|")
        if len(f) != 3:
            continue
        if not partition and not f[2].endswith("*"):
            continue  # not the default partition
        if f[1].rstrip("*~#$@+-") in ("down", "drain", "drng", "fail", "maint"):
            continue
        if f[0] not in names:
            names.append(f[0])
    return names


def test_only(args: list[str]) -> str:
    """Ask Slurm whether it would accept a job (``sbatch --test-only``): partition, account, QoS,
    reservation, time limit and unknown options are refused here, before anything is queued."""
    out = _run(["sbatch", "--test-only", *args, "--wrap=true"])
    text = (out.stderr + out.stdout).strip()
    if out.returncode != 0:
        lines = [ln.removeprefix("sbatch: error: ").strip() for ln in text.splitlines() if ln.strip()]
        raise SlurmError(f"Slurm refuses this job: {'; '.join(lines)}; fix the recipe's [slurm] section")
    return text


def requeue(job_id: str) -> None:
    """Put a running job back in the queue under the same id (SLURM_RESTART_COUNT goes up)."""
    _run(["scontrol", "requeue", job_id], timeout=60, check=True)


def cancel(job_id: str, signal: str = "") -> None:
    cmd = ["scancel", job_id]
    if signal:
        cmd += ["--signal", signal]
    _run(cmd, check=True)

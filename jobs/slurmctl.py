"""The chain's Slurm actions (scontrol requeue, scancel, sbatch --test-only, sinfo); the queries
(squeue, sacct) are kit.run.queue's, the one Slurm query module every tool reads through.

Why shell out instead of an API: these commands are the stable interface of every Slurm site, they
work from login and compute nodes alike, and submitit uses them too. Each wrapper returns plain data
(``None`` or an empty list when Slurm does not know the job), never raises on a missing job, and
raises :class:`SlurmError` only when the command itself is missing or broken.
"""

from __future__ import annotations

import shutil
import subprocess
import time

from kit.errors import KitError
from kit.run.queue import (  # noqa: F401 (the one Slurm query module; re-exported for the chain's code)
    AcctRecord,
    JobInfo,
    parse_duration,
    parse_time,
    sacct,
    squeue,
)

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


def queued_from(name: str, folder: str) -> list[str]:
    """This user's queued or running jobs named ``name`` whose batch script lies in ``folder`` (a run's
    submitit folder): the jobs a submission of that run queued, and no other run's of the same name."""
    import getpass

    out = _run(["squeue", "-h", "-n", name, "-u", getpass.getuser(), "-o", "%i|%o"])
    rows = (line.strip().split("|", 1) for line in out.stdout.splitlines() if "|" in line)
    return [job_id for job_id, command in rows if command.startswith(folder.rstrip("/") + "/")]


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

"""`kit submit` on the REAL local Slurm: nothing is queued for a bad recipe, and a failure after
sbatch queued a job never leaves it running unrecorded (issue 14).

Real parts: slurmctld/slurmd, sbatch through submitit, squeue/scancel. The failure after queueing is
produced two ways: submitit's own crash after sbatch answered (a recipe with slurm.nodes = -1 set
past validation, which is what used to reach it: IndexError inside submitit, the job already queued),
and a kit fault point that raises right after submitit returned the job (KIT_FAULTS, a real process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kit.config import RunConfig
from tests.conftest import ROOT, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
BASE = {"slurm.time_limit": "00:01:00", "trainer.stop_margin_s": 5.0, "chain.signal_lead_s": 10,
        "doctor.enabled": False}


def _cfg(tmp: Path, name: str, **extra: Any) -> RunConfig:
    from kit.config import load_recipe

    return load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp / "runs", name, **{**BASE, **extra}))


def _queued(name: str) -> list[str]:
    from kit.jobs import slurmctl

    return [q.job_id for q in slurmctl.squeue(name=f"kit-{name}")]


def _wait_gone(job_id: str, timeout: float = 60) -> None:
    from kit.jobs import slurmctl

    end = time.time() + timeout
    while slurmctl.is_active(job_id):
        assert time.time() < end, f"job {job_id} is still active {timeout} s after it was cancelled"
        time.sleep(0.5)


@pytest.mark.parametrize(("override", "message"), [
    ("slurm.nodes=-1", "slurm.nodes must be at least 1, got -1"),
    ("slurm.nodes=0", "slurm.nodes must be at least 1, got 0"),
    ("slurm.mem_gb=-4", "slurm.mem_gb must be >= 0"),
    ("slurm.time_limit='abc'", "slurm.time_limit must be a Slurm time limit"),
    ("slurm.sbatch_args.nodes=3", "slurm.sbatch_args.nodes is set by the recipe: use slurm.nodes"),
])
def test_bad_slurm_values_queue_nothing(tmp_path: Path, slurm: None, override: str, message: str) -> None:
    name = f"bad{os.getpid()}"
    args = [a for o in tiny_overrides(tmp_path / "runs", name, **BASE) for a in ("--set", o)]
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "submit", "tiny.toml", *args, "--set", override],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"kit: error: {out.stderr.strip().removeprefix('kit: error: ')}"
    assert message in out.stderr
    assert _queued(name) == [] and not (tmp_path / "runs" / name).exists()


def test_a_crash_inside_submitit_after_sbatch_cancels_the_queued_job(tmp_path: Path, slurm: None) -> None:
    """The reported failure: sbatch queued the job, then submitit raised before returning it, and
    chain.json never got the job id (`kit cancel` said there was no chain while it ran)."""
    from kit.jobs import chain as ch
    from kit.jobs.submit import SubmitError, submit
    from kit.ledger import read_all
    from kit.rundir import RunDir

    cfg = _cfg(tmp_path, f"crash{os.getpid()}")
    cfg.slurm.nodes = -1  # past validation (the dataclass is not frozen): what used to reach submitit
    with pytest.raises(SubmitError, match=r"IndexError.*the queued job (\d+) was cancelled: nothing runs") as e:
        submit(cfg, log=lambda m: None)
    m = re.search(r"the queued job (\d+) was cancelled", str(e.value))
    assert m is not None
    job_id = m.group(1)
    _wait_gone(job_id)
    rd = RunDir(cfg.run_dir)
    state = ch.load_state(rd)
    assert (state.state, state.end_reason) == (ch.ENDED, "submit_failed") and job_id in state.job_ids
    (failed,) = read_all(rd.path, {"chain_submit_failed"})
    assert failed["cancelled"] == [job_id] and failed["still_queued"] == [] and "IndexError" in failed["error"]


def test_a_crash_right_after_queueing_cancels_the_job(tmp_path: Path, slurm: None) -> None:
    """A real `kit submit` process whose code raises right after submitit returned the job (before
    chain.json recorded it): the job is cancelled, the failure recorded, one error line printed."""
    name = f"fault{os.getpid()}"
    args = [a for o in tiny_overrides(tmp_path / "runs", name, **BASE) for a in ("--set", o)]
    out = subprocess.run([sys.executable, "-m", "kit.tools.cli", "submit", "tiny.toml", *args], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, KIT_FAULTS="submit.after_queue=raise"))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    m = re.search(r"kit: error: submitting run \S+ failed \(FaultInjected: .*\); the queued job (\d+) was "
                  r"cancelled: nothing runs", out.stderr)
    assert m is not None, out.stderr
    _wait_gone(m.group(1))
    chain = json.loads((tmp_path / "runs" / name / "slurm" / "chain.json").read_text())
    assert chain["state"] == "ended" and chain["end_reason"] == "submit_failed" and m.group(1) in chain["job_ids"]
    assert _queued(name) == []

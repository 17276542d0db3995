"""Two simulated nodes on the real local Slurm: one segment as 2 nodes x 1 task, real gloo rendezvous.

The local Slurm is reconfigured with two slurmd daemons (node1, node2 on this machine, names added to
/etc/hosts so MASTER_ADDR=node1 resolves) and restored to one node afterwards (this module sorts last
among the chain tests, so the others run on the normal setup). Needs root, as .ci/run has.
The trainer really rendezvous through submitit's TorchDistributedEnvironment (MASTER_ADDR = first node,
port from the job id) and, with doctor.enabled, kit doctor's preflight runs first on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, require, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.deepspeed]


def _start(nodes: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_LOCAL_")}
    if nodes > 1:
        env.update(SLURM_LOCAL_NODES=str(nodes), SLURM_LOCAL_ETC_HOSTS="1")
    out = subprocess.run(["bash", str(ROOT / ".ci" / "slurm" / "start.sh")], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.fixture
def two_nodes(slurm: None) -> Iterator[None]:
    require(os.geteuid() == 0, "root, to reconfigure the local Slurm")
    _start(2)
    try:
        yield
    finally:
        _start(1)


def test_one_segment_on_two_nodes(tmp_path: Path, two_nodes: None, deepspeed_ok: None) -> None:
    from kit.config import load_recipe
    from kit.jobs import slurmctl
    from kit.jobs.submit import submit
    from kit.ledger import read_all

    assert sorted(slurmctl.partition_nodes()) == ["node1", "node2"]
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(
        tmp_path / "runs", "two", **{"slurm.nodes": 2, "slurm.tasks_per_node": 1, "trainer.max_steps": 4,
                                     "slurm.time_limit": "00:02:00", "trainer.stop_margin_s": 5.0,
                                     "chain.signal_lead_s": 10, "doctor.enabled": True}))
    sub = submit(cfg, log=lambda m: None)
    end = time.time() + 150
    state: dict[str, object] = {}
    while time.time() < end:
        state = json.loads((sub.run_dir / "slurm" / "chain.json").read_text())
        if state["state"] == "ended" and not slurmctl.is_active(sub.job_id):
            break
        time.sleep(1)
    logs = sorted((sub.run_dir / "slurm" / "submitit").glob("*_0_log.err"))
    assert state["state"] == "ended" and state["end_reason"] == "done", (state, logs[-1].read_text()[-3000:])
    events = read_all(sub.run_dir)
    alloc = [e for e in events if e["kind"] == "allocation_started"]
    assert alloc[0]["nodes"] == ["node1", "node2"] and alloc[0]["world_size"] == 2
    started = [e for e in events if e["kind"] == "segment_started"]
    assert started[0]["world_size"] == 2
    ended = [e for e in events if e["kind"] == "allocation_ended"]
    assert ended[-1]["exit_codes"] == {"0": 0, "1": 0} and ended[-1]["outcome"] == "finished"
    reports = sorted((sub.run_dir / "slurm" / "ranks").glob("*/r*.json"))
    hosts = {json.loads(p.read_text())["host"] for p in reports}
    assert hosts == {"node1", "node2"}, "each rank ran on its own (simulated) node"
    doctor = [e for e in events if e["kind"] == "doctor"]
    assert doctor and all(e["ok"] for e in doctor), doctor

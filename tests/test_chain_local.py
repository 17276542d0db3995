"""The chain without Slurm: submitit's local executor runs the same per-rank drivers, and the chain
loops segments inside one local job (real DeepSpeed ranks, real submitit LocalExecutor)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def test_local_executor_chain(tmp_path: Path, deepspeed_ok: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from kit.config import load_recipe
    from kit.jobs.submit import SubmitError, submit
    from kit.ledger import read_all

    monkeypatch.setenv("KIT_EXECUTOR", "local")
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(
        tmp_path / "runs", "loc", **{"trainer.max_steps": 6, "trainer.stop_after_steps": 4, "doctor.enabled": False,
                                     "slurm.time_limit": "00:05:00"}))
    sub = submit(cfg, log=lambda m: None)
    assert sub.executor == "local" and not sub.attached
    with pytest.raises(SubmitError, match="local chain in progress"):
        submit(cfg, log=lambda m: None)  # never two chains on one run
    state: dict[str, object] = {}
    end = time.time() + 900  # generous: on a loaded 2-core machine a segment's start-up alone took 120 s
    while time.time() < end:
        state = json.loads((sub.run_dir / "slurm" / "chain.json").read_text())
        if state["state"] == "ended":
            break
        time.sleep(1)
    sub.job.wait()
    assert state["end_reason"] == "done", state
    segs: list[dict[str, object]] = state["segments"]  # type: ignore[assignment]
    assert [s["outcome"] for s in segs] == ["clean", "finished"] and segs[-1]["ckpt_after"] == 6
    assert {s["job_id"] for s in segs} == {sub.job_id}, "one local job loops the segments"
    resumed = [e["step"] for e in read_all(sub.run_dir, {"ckpt_loaded"})]
    assert resumed == [4], "the second segment resumed from the first one's checkpoint"

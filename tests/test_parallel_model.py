"""kit.parallel's model and step path driven directly (tests/parallel_worker.py under torchrun, gloo, CPU).

The skip policy's refusal of an update at a layout: with a pipeline, DeepSpeed's train_batch performs
the update inside its schedule, and kit reaches it through the OptimizerStep instruction
(kit.parallel.stepper). The refused step must be as if the batch never existed, on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]


def worker(tensor: int, pipeline: int, mode: str, out: Path, ranks: int = 4) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(ROOT / "tests" / "parallel_worker.py"), str(tensor), str(pipeline), mode, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(out.read_text())
    return result


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 2), (2, 1)])
def test_refused_update_is_nothing_at_the_layout(tensor: int, pipeline: int, tmp_path: Path) -> None:
    r = worker(tensor, pipeline, "skip", tmp_path / "skip.json")
    assert r == {"layout": "PP2xDP2" if pipeline == 2 else "TP2xDP2", "frozen": True, "equal_to_unpoisoned": True,
                 "control_differs": True, "moved_after": True, "lr_kept": True}

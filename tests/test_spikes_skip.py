"""The skip policy's refused update on real DeepSpeed engines (2 ranks, gloo, CPU), at every ZeRO stage.

tests/spikes_skip_worker.py trains three engines per stage: A refuses the update of a batch with
kit.spikes.hold_update (as the trainer does at the accumulation boundary), B never sees that batch,
C applies it (the control: it must differ, or the comparison proves nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]

WORKER = Path(__file__).with_name("spikes_skip_worker.py")


def run_worker(stages: str, precision: str) -> list[dict[str, object]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(WORKER), stages, precision], env=env, capture_output=True, text=True, timeout=300)
    results = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and results, out.stdout[-3000:] + out.stderr[-3000:]
    return results


@pytest.mark.parametrize(("stages", "precision"), [("0,1,2,3", "fp32"), ("1,2", "bf16")])
def test_refused_update_is_as_if_the_batch_never_existed(stages: str, precision: str) -> None:
    results = run_worker(stages, precision)
    assert [r["stage"] for r in results] == [int(s) for s in stages.split(",")]
    for r in results:
        assert r["control_differs"], r  # applying the batch changes the weights: the check has teeth
        assert r["frozen"], r  # the refused step did not move any weight
        assert r["lr_kept"], r  # nor the LR schedule
        assert r["equal_to_unpoisoned"], r  # bit-identical to a run that never saw the batch
        assert r["adam_steps_equal"], r  # Adam's step count did not advance
        assert r["moved_after"], r  # and the next steps train normally
        assert r["all_ranks_agree"], r
        assert r["global_steps"] == [4, 3], r  # DeepSpeed still counted the refused step

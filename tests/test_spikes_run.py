"""Loss spikes in a real run: 2 DeepSpeed ranks (gloo, CPU) fed a poisoned batch.

tests/spikes_fixtures.py builds a data set whose step 26 holds 3 samples of repeated
control-character junk among 8: a real loss spike made by data, at a known step. Each test trains
it with `kit train`'s launcher (torchrun + kit.segment) and checks what the policy did, that the
run went on, what the ledger, checkpoints and TensorBoard say, and that `kit spikes` names the
poisoned documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from spikes_fixtures import SPIKE_STEP, junk_steps, recipe

from kit import checkpoint as ck
from kit import exitcodes
from kit.config import RunConfig, load_recipe
from kit.launch import SegmentOutcome, create_run, run_local_segment
from kit.ledger import read_all
from kit.rundir import RunDir
from kit.spikes import SKIP_FILE
from kit.tools.cli import main as kit_main

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]


def start(tmp: Path, name: str, policy: str, *overrides: str) -> tuple[RunConfig, RunDir]:
    cfg = load_recipe(recipe(tmp, name, policy), list(overrides))
    rd = create_run(cfg, log=lambda m: None)
    assert junk_steps(rd.data).get(SPIKE_STEP, 0) >= 3  # the poison is where the test expects it
    return cfg, rd


def train(rd: RunDir, cfg: RunConfig, seg: str) -> SegmentOutcome:
    return run_local_segment(rd, cfg, seg=seg, quiet=True)


def steps(rd: RunDir, seg: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_all(rd.path, {"step"}) if seg is None or e.get("seg") == seg]


def poisoned_documents(rd: RunDir, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert kit_main(["spikes", str(rd.path), "--json", "--step", str(SPIKE_STEP)]) == 0
    res = json.loads(capsys.readouterr().out)
    (sp,) = res["spikes"]
    assert sp["start"] == SPIKE_STEP
    return [d for d in sp["batches"]["documents"] if d["flags"]]


def test_skip_policy_refuses_the_poisoned_update(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, rd = start(tmp_path, "skip", "skip")
    out = train(rd, cfg, "a")
    assert (out.reason, out.step) == ("done", cfg.trainer.max_steps)  # the run went on
    spikes = read_all(rd.path, {"spike"})
    assert [(e["step"], e["metric"], e["action"]) for e in spikes] == [(SPIKE_STEP, "loss", "skip")]
    assert spikes[0]["size"] > 0.2 and spikes[0]["consumed"] == (SPIKE_STEP - 1) * 8
    by_step = {e["step"]: e for e in steps(rd)}
    assert by_step[SPIKE_STEP]["action"] == "skip" and "action" not in by_step[SPIKE_STEP + 1]
    assert ck.pinned(rd.checkpoints) >= {"step_0000025", "step_0000030"}  # the checkpoints around it
    odd = poisoned_documents(rd, capsys)
    assert {d["source"] for d in odd} == {"junk"} and len(odd) == 3
    assert all({"repetition", "encoding"} <= set(d["flags"]) for d in odd)


def test_rollback_skips_the_data_and_the_skip_survives_a_restart(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, rd = start(tmp_path, "rb", "rollback")
    out = train(rd, cfg, "a")
    assert (out.reason, out.step) == ("done", cfg.trainer.max_steps)
    (rb,) = read_all(rd.path, {"rollback"})
    # rollback_steps = 5, checkpoints every 5 steps: back to step 20, then skip 3 batches from the spike on
    assert (rb["from_step"], rb["to_step"], rb["tag"]) == (SPIKE_STEP, 20, "step_0000020")
    assert (rb["skip_start"], rb["skip_end"]) == (200, 224)
    # step 25 (between the target and the spike) was the newest checkpoint: never deleted, set aside instead
    assert rb["deleted"] == [] and rb["set_aside"] == [f".rolled-back/r1-spike{SPIKE_STEP}/step_0000025"]
    (skipped,) = read_all(rd.path, {"data_skipped"})
    assert (skipped["step"], skipped["start"], skipped["end"]) == (SPIKE_STEP, 200, 224)
    events = steps(rd, "a")
    first: dict[int, float] = {}
    for e in events:
        first.setdefault(e["step"], e["loss"])
    final = {e["step"]: e["loss"] for e in events}
    assert [s for s in range(21, 27) if final[s] != first[s]] == [SPIKE_STEP]  # 21-25 replayed bit for bit
    assert final[SPIKE_STEP] < 0.85 * first[SPIKE_STEP]  # the poisoned batch is gone
    assert "step_0000020" in ck.pinned(rd.checkpoints)
    on_disk = json.loads((rd.control / SKIP_FILE).read_text())["ranges"]
    assert [(r["start"], r["end"], r["rollback"]) for r in on_disk] == [(200, 224, True)]
    for tag in ("step_0000025", "step_0000030"):
        skips = ck.load(rd.checkpoints, tag).manifest.kit.extra["skips"]
        assert [(r["start"], r["end"]) for r in skips] == [(200, 224)]
    # TensorBoard: the replayed steps replaced the abandoned points (purge_step), one value per step.
    acc = EventAccumulator(str(rd.tensorboard))
    acc.Reload()
    tb = acc.Scalars("train/loss")
    assert [s.step for s in tb] == list(range(1, cfg.trainer.max_steps + 1))
    assert tb[SPIKE_STEP - 1].value == pytest.approx(final[SPIKE_STEP], rel=1e-6)
    assert {d["source"] for d in poisoned_documents(rd, capsys)} == {"junk"}

    # Restart from the replayed step-25 checkpoint with the control file gone: the manifest alone
    # must keep the skip, and the continuation must be the same, bit for bit.
    (rd.control / SKIP_FILE).unlink()
    for tag in ("step_0000030", "step_0000034"):
        (rd.checkpoints / tag / ck.MANIFEST).unlink()
    ck.set_latest(rd.checkpoints, "step_0000025")
    out = train(rd, cfg, "b")
    assert (out.reason, out.step) == ("done", cfg.trainer.max_steps)
    (loaded,) = [e for e in read_all(rd.path, {"ckpt_loaded"}) if e["seg"] == "b"]
    assert loaded["tag"] == "step_0000025"
    again = [e for e in read_all(rd.path, {"data_skipped"}) if e["seg"] == "b"]
    assert [(e["start"], e["end"]) for e in again] == [(200, 224)]
    assert {e["step"]: e["loss"] for e in steps(rd, "b")} == {s: final[s] for s in range(26, 35)}
    assert not [e for e in read_all(rd.path, {"spike"}) if e["seg"] == "b"]


def test_rollback_cap_gives_up_without_saving_the_spiked_state(tmp_path: Path) -> None:
    cfg, rd = start(tmp_path, "cap", "rollback", "spikes.max_rollbacks=0")
    out = train(rd, cfg, "a")
    # The segment exits with GIVE_UP (78); torchrun turns any non-zero status into its own failure,
    # so kit.launch reports "crashed" here: the ledger holds the trainer's own word.
    assert out.returncode != 0
    (ended,) = read_all(rd.path, {"segment_ended"})
    assert (ended["reason"], ended["step"], ended["exit_code"]) == ("give_up", SPIKE_STEP, exitcodes.GIVE_UP)
    assert [(e["step"], e["action"]) for e in read_all(rd.path, {"spike"})] == [(SPIKE_STEP, "give_up")]
    critical = [e for e in read_all(rd.path, {"alert"}) if e["severity"] == "critical"]
    assert len(critical) == 1 and "max_rollbacks" in critical[0]["message"]
    assert ck.find_resume(rd.checkpoints)[0].tag == "step_0000025"  # type: ignore[union-attr]
    assert not read_all(rd.path, {"rollback"})


def test_nan_loss_on_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Rank 1 alone sees a NaN loss at step 15 (fault loss.nan): the all-reduced loss is NaN, so both
    ranks refuse that update, even under policy log; the run goes on with finite weights."""
    cfg, rd = start(tmp_path, "nan", "log", "trainer.max_steps=20")
    out = run_local_segment(rd, cfg, seg="a", quiet=True, extra_env={"KIT_FAULTS": "loss.nan@15:rank1"})
    assert (out.reason, out.step) == ("done", 20)
    spikes = [(e["step"], e["metric"], e["nonfinite"], e["action"]) for e in read_all(rd.path, {"spike"})]
    assert spikes == [(15, "loss", True, "skip"), (15, "grad_norm", True, "log")]
    loss = {e["step"]: e["loss"] for e in steps(rd)}
    assert loss[15] != loss[15]  # NaN, logged as it was
    assert all(0 < loss[s] < 1.2 * loss[14] for s in range(16, 21)), loss

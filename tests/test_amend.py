"""Amendments of a frozen run (issue 14): a recipe that differs from run.toml is refused with what to
do, never silently ignored; `kit amend` and --amend apply non-arithmetic changes, checked and recorded.

The end-to-end test trains a real run (2 DeepSpeed ranks on gloo), extends it with --amend and trains
on from its checkpoint; the others need no DeepSpeed (the refusals come before any rank starts).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from kit import checkpoint as ck
from kit.errors import ConfigError
from kit.ledger import read_all
from kit.rundir import RunDir
from kit.tools.cli import main as kit_main
from tests.conftest import tiny_overrides


def _sets(tmp_path: Path, name: str, **extra: Any) -> list[str]:
    return [a for o in tiny_overrides(tmp_path / "runs", name, **extra) for a in ("--set", o)]


def _frozen(rd: RunDir) -> dict[str, Any]:
    return tomllib.loads(rd.run_toml.read_text())


def test_train_with_a_changed_max_steps_is_refused_not_ignored(tiny_cfg: Any, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`kit train --set trainer.max_steps=16` on an existing run used to keep the frozen 8, silently."""
    cfg = tiny_cfg("r")
    rd = RunDir(cfg.run_dir)
    rd.create(cfg)
    before = rd.run_toml.read_text()
    assert kit_main(["train", "tiny.toml", *_sets(tmp_path, "r", **{"trainer.max_steps": 16})]) == 1
    err = capsys.readouterr().err
    assert "trainer.max_steps 8 -> 16" in err and "pass --amend" in err
    assert "kit amend" in err and "--set trainer.max_steps=16" in err and "nothing was changed" in err
    assert rd.run_toml.read_text() == before and not list(rd.checkpoints.iterdir())


def test_kit_amend_records_the_change_and_refuses_what_cannot_change(tiny_cfg: Any,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_cfg("a")
    rd = RunDir(cfg.run_dir)
    rd.create(cfg)
    run = str(rd.path)
    assert kit_main(["amend", run, "--set", "trainer.max_steps=20", "--set", "slurm.nodes=2",
                     "--set", 'slurm.time_limit="2-00:00:00"', "--reason", "more data arrived"]) == 0
    out = capsys.readouterr().out
    assert "amended a: trainer.max_steps 8 -> 20" in out and "optim.decay_steps = 0" in out  # the LR schedule note
    frozen = _frozen(rd)
    assert (frozen["trainer"]["max_steps"], frozen["slurm"]["nodes"], frozen["slurm"]["time_limit"]) == (
        20, 2, "2-00:00:00")
    (ev,) = read_all(rd.path, {"amended"})
    assert {(c["key"], c["old"], c["new"]) for c in ev["changes"]} == {
        ("trainer.max_steps", 8, 20), ("slurm.nodes", 1, 2), ("slurm.time_limit", "00:10:00", "2-00:00:00")}
    assert ev["by"] == "kit amend" and ev["reason"] == "more data arrived" and ev["config_digest"] == cfg.digest()

    after = rd.run_toml.read_text()
    for sets, message in [(["optim.lr=0.5"], "cannot amend optim.lr of run a: model, data, optimizer"),
                          (["run.seed=7"], "cannot amend run.seed"),
                          (["run.name='b'"], "cannot amend run.name"),
                          (["slurm.nodes=0"], "slurm.nodes must be at least 1"),
                          (["deepspeed.extra.bf16.enabled=true"], "deepspeed.extra.bf16 is set by the recipe"),
                          (["trainer.max_stepz=3"], "unknown key trainer.max_stepz; did you mean trainer.max_steps?"),
                          ([], "nothing to amend")]:
        assert kit_main(["amend", run, *[a for s in sets for a in ("--set", s)]]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kit: error:") and message in err, (sets, err)
        assert rd.run_toml.read_text() == after
    assert len(read_all(rd.path, {"amended"})) == 1

    # max_steps may not go below what the run has already saved
    ck.write_manifest(_fake_ckpt(rd, 12), 12, {"consumed": 96})
    assert kit_main(["amend", run, "--set", "trainer.max_steps=10"]) == 1
    assert "below the run's newest checkpoint (step 12)" in capsys.readouterr().err
    assert kit_main(["amend", run, "--set", "trainer.max_steps=20"]) == 0  # unchanged: nothing recorded
    assert "already has these values" in capsys.readouterr().out and len(read_all(rd.path, {"amended"})) == 1


def _fake_ckpt(rd: RunDir, step: int) -> Path:
    p = rd.checkpoints / ck.tag_for(step)
    p.mkdir(parents=True)
    (p / "weights.bin").write_bytes(b"w" * 10)
    return p


def test_submit_refuses_a_changed_recipe_without_amend(tiny_cfg: Any) -> None:
    """kit submit used to rewrite run.toml with whatever the recipe said (silently applied)."""
    from kit.jobs.submit import submit

    cfg = tiny_cfg("s")
    RunDir(cfg.run_dir).create(cfg)
    with pytest.raises(ConfigError, match=r"slurm.time_limit '00:10:00' -> '02:00:00'.*pass --amend"):
        submit(tiny_cfg("s", **{"slurm.time_limit": "02:00:00"}), log=lambda m: None)
    assert _frozen(RunDir(cfg.run_dir))["slurm"]["time_limit"] == "00:10:00"


@pytest.mark.deepspeed
@pytest.mark.slow
def test_train_amend_extends_a_finished_run(tmp_path: Path, deepspeed_ok: None,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Train to step 4 (done), then `kit train --set trainer.max_steps=6 --amend`: the run goes on from
    its step-4 checkpoint to step 6, and the ledger says who changed what."""
    first = _sets(tmp_path, "ext", **{"trainer.max_steps": 4})
    assert kit_main(["train", "tiny.toml", *first]) == 0
    assert "segment ended: done at step 4" in capsys.readouterr().out
    more = _sets(tmp_path, "ext", **{"trainer.max_steps": 6})
    assert kit_main(["train", "tiny.toml", *more]) == 1  # without --amend: refused
    assert "pass --amend" in capsys.readouterr().err
    assert kit_main(["train", "tiny.toml", *more, "--amend"]) == 0
    out = capsys.readouterr().out
    assert "amended ext: trainer.max_steps 4 -> 6" in out and "segment ended: done at step 6" in out
    rd = RunDir(tmp_path / "runs" / "ext")
    (ev,) = read_all(rd.path, {"amended"})
    assert ev["changes"] == [{"key": "trainer.max_steps", "old": 4, "new": 6}] and ev["by"] == "kit train"
    loaded = read_all(rd.path, {"ckpt_loaded"})
    assert loaded[-1]["tag"] == "step_0000004" and loaded[-1]["t"] > ev["t"]
    assert ck.newest_complete(rd.checkpoints) == "step_0000006"

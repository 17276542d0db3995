"""The spike postmortem's validation view: per-source validation loss around each spike tells a spike
that healed from one that did lasting damage. Ledgers written by the real LedgerWriter: step events
with two planted spikes and eval events every 100 steps, as kit.evaluation writes them."""

from __future__ import annotations

import json
from pathlib import Path

from test_postmortem import make_run, synthetic, write_steps

from kit.ledger import LedgerWriter
from kit.tools.cli import main as kit_main
from kit.tools.postmortem import analyse, validation_around
from kit.tools.spike_report import write_report

HEALED, DAMAGED = 1210, 3010  # spike steps (between evaluations)


def val_losses(step: int) -> dict[str, float]:
    """fr and de improve steadily; after the first spike both are 10% worse at one evaluation and
    back at the next; after the second, ru stays 20% worse."""
    base = {"fr": 3.0 - step / 10000, "de": 3.2 - step / 10000, "ru": 3.1 - step / 10000}
    if step == 1300:
        base = {k: v * 1.1 for k, v in base.items()}
    if step > DAMAGED:
        base["ru"] *= 1.2
    return base


def ledger(rd_path: Path) -> None:
    loss = synthetic(4000, 5, [HEALED, DAMAGED], factor=2.0)
    with LedgerWriter(rd_path, "train-r0") as led:
        write_steps(led, range(1, 4001), loss)
        for step in range(100, 4001, 100):
            led.emit("eval", step=step, by="live",
                     sources={k: {"language": k, "loss": v, "tokens": 124} for k, v in val_losses(step).items()})


def test_healed_and_damaged_spikes_are_told_apart(tmp_path: Path) -> None:
    rd = make_run(tmp_path)
    ledger(rd.path)
    res = analyse(rd.path, data=False)
    by_start = {sp["start"]: sp for sp in res["spikes"]}
    assert {HEALED, DAMAGED} <= set(by_start)
    healed, damaged = by_start[HEALED]["validation"], by_start[DAMAGED]["validation"]
    assert healed["verdict"] == "healed" and healed["before_step"] == 1200 and healed["after_steps"] == [1300, 1400,
                                                                                                         1500]
    assert abs(healed["sources"]["fr"]["peak_rise"] - 0.1) < 0.01  # hit, then healed
    assert damaged["verdict"] == "damaged" and damaged["damaged"] == ["ru"]
    assert 0.15 < damaged["sources"]["ru"]["rise"] < 0.2  # 20% over a baseline that kept improving
    assert damaged["sources"]["fr"]["verdict"] == "healed"
    files = write_report(res, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "damaged: ru +19%" in md and "Validation (eval events): healed" in md
    assert (tmp_path / "report" / f"spike_{DAMAGED:07d}_val.png") in files
    assert json.loads((tmp_path / "report" / "spikes.json").read_text())["spikes"]


def test_cli_shows_the_verdict(tmp_path: Path, capsys: object) -> None:
    rd = make_run(tmp_path)
    ledger(rd.path)
    assert kit_main(["spikes", str(rd.path), "--no-data"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "validation" in out.splitlines()[0] and "damaged: ru +19%" in out and "healed" in out


def test_without_evaluations_the_verdict_is_unknown() -> None:
    from kit.tools.postmortem import Episode

    ep = Episode(start=50, end=50, peak_step=50, peak_loss=3.0, baseline=2.0, size=0.5, duration=1)
    assert validation_around({}, ep, 0.05)["verdict"] == "unknown"
    assert validation_around({"fr": {60: 2.0}}, ep, 0.05)["note"] == "no evaluation before the spike"
    assert validation_around({"fr": {40: 2.0}}, ep, 0.05)["note"] == "not evaluated since the spike (yet)"

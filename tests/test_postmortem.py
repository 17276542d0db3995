"""The spike postmortem (`kit spikes`) on ledgers written by the real LedgerWriter: planted spikes
(precision and recall), live spike and rollback events, damaged ledgers, the CLI and its report,
and the batch analysis on a real prepared data set with a poisoned source (no training needed:
the ledger's consumed/samples fields are what the trainer writes)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from spikes_fixtures import GLOBAL_BATCH, SPIKE_STEP, junk_steps, recipe

from kit.config import load_recipe
from kit.launch import create_run
from kit.ledger import LedgerWriter
from kit.rundir import RunDir
from kit.tools.cli import main as kit_main
from kit.tools.postmortem import analyse, episodes, spikes_config
from kit.tools.spike_ledger import read_ledger

ROOT = Path(__file__).resolve().parent.parent


def make_run(tmp: Path, name: str = "p") -> RunDir:
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", [f'run.name="{name}"', f'run.runs_dir="{tmp}"'])
    rd = RunDir(cfg.run_dir)
    rd.create(cfg)
    return rd


def write_steps(led: LedgerWriter, steps: range, loss: dict[int, float], t0: float = 0.0, **extra: float) -> None:
    for s in steps:
        led.emit("step", step=s, loss=loss[s], grad_norm=0.5, lr=1e-3, consumed=(s - 1) * GLOBAL_BATCH,
                 samples=GLOBAL_BATCH, tokens_per_s=1000.0, step_time=0.1, **extra)


def synthetic(n: int, seed: int, planted: list[int], factor: float = 1.5) -> dict[int, float]:
    rng = random.Random(seed)
    loss = {s: (2.5 + 4 * math.exp(-s / 400)) * math.exp(rng.gauss(0, 0.01)) for s in range(1, n + 1)}
    for p in planted:
        loss[p] *= factor
    return loss


def test_offline_detection_precision_and_recall_on_a_planted_ledger(tmp_path: Path) -> None:
    rd = make_run(tmp_path)
    rng = random.Random(3)
    planted = sorted(rng.sample(range(200, 4800, 20), 25))
    loss = synthetic(5000, 1, planted)
    for s in (3010, 3011, 3012):  # one spike lasting three steps
        loss[s] *= 1.8
    loss[4500] = math.nan  # a non-finite loss
    with LedgerWriter(rd.path, "train-r0") as led:
        write_steps(led, range(1, 5001), loss)
    eps = episodes(read_ledger(rd.path), spikes_config(rd.path))
    starts = {e.start for e in eps}
    truth = set(planted) | {3010, 4500}
    tp = len(starts & truth)
    assert tp / len(truth) >= 0.95 and tp / len(starts) >= 0.95, (sorted(truth - starts), sorted(starts - truth))
    long = next(e for e in eps if e.start == 3010)
    assert long.end == 3012 and long.duration >= 3 and long.found_by == "offline" and long.actions == []
    assert long.size == pytest.approx(0.8, abs=0.15)
    assert "non-finite" in next(e for e in eps if e.start == 4500).metrics


def test_live_spike_and_rollback_events(tmp_path: Path) -> None:
    rd = make_run(tmp_path)
    loss = synthetic(60, 2, [40], factor=2.0)
    replay = {s: v * 0.99 for s, v in synthetic(60, 3, []).items()}
    with LedgerWriter(rd.path, "train-r0") as led:
        write_steps(led, range(1, 40), loss)
        led.emit("spike", step=40, loss=loss[40], metric="loss", value=loss[40], median=loss[39], size=1.0,
                 score=30.0, nonfinite=False, action="rollback", consumed=39 * GLOBAL_BATCH, samples=GLOBAL_BATCH)
        write_steps(led, range(40, 41), loss)
        led.emit("rollback", from_step=40, to_step=30, spike_step=40, tag="step_0000030", skip_start=312,
                 skip_end=336, skip_batches=3, rollbacks=1, why="policy rollback")
        write_steps(led, range(31, 40), replay)
        led.emit("data_skipped", step=40, start=312, end=336)
        write_steps(led, range(40, 61), replay)
    res = analyse(rd.path, data=False)
    assert len(res["spikes"]) == 1 and res["rollbacks"] == 1 and res["skipped_ranges"] == [[312, 336]]
    sp = res["spikes"][0]
    assert (sp["start"], sp["actions"], sp["found_by"]) == (40, ["rollback"], "live")
    assert sp["skipped"] == [[312, 336]] and sp["rollbacks"][0]["tag"] == "step_0000030"
    assert sp["peak_loss"] == pytest.approx(loss[40]) and sp["steps"] == [{"step": 40, "consumed": 312, "samples": 8}]
    rows = sp["context"]["steps"]
    abandoned = sorted(r["step"] for r in rows if r["abandoned"])
    assert abandoned == list(range(31, 41))  # the first timeline's steps 31-40, replayed after the rollback
    final = read_ledger(rd.path).timeline.final()
    assert float(final.around(40, 40)["loss"][0]) == pytest.approx(replay[40])  # the latest event per step wins


def test_reader_tolerates_torn_and_garbage_lines_and_nan(tmp_path: Path) -> None:
    rd = make_run(tmp_path)
    loss = synthetic(50, 4, [])
    loss[20] = math.nan
    with LedgerWriter(rd.path, "train-r0") as led:
        write_steps(led, range(1, 51), loss)
    clean = read_ledger(rd.path)
    assert len(clean.timeline) == 50 and clean.bad_lines == 0 and math.isnan(clean.timeline["loss"][19])
    path = rd.ledger / "train-r0.jsonl"
    parsed = read_ledger(rd.path, use_index=False)  # parsing every line agrees with the writer's index
    assert parsed.bad_lines == 0 and all(np.array_equal(parsed.timeline[k], clean.timeline[k], equal_nan=True)
                                         for k in clean.timeline.cols)
    assert [e["lr"] for e in clean.detail(clean.timeline.around(20, 21))] == [1e-3, 1e-3]
    lines = path.read_bytes().split(b"\n")
    lines.insert(10, b"\x00garbage{")
    path.write_bytes(b"\n".join(lines) + b'{"v":1,"kind":"step","step":51,"lo')  # torn tail
    damaged = read_ledger(rd.path)
    assert len(damaged.timeline) == 50 and damaged.bad_lines == 1


def test_cli_lists_explains_and_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rd = make_run(tmp_path)
    loss = synthetic(400, 5, [150, 300])
    with LedgerWriter(rd.path, "train-r0") as led:
        write_steps(led, range(1, 401), loss)
        led.emit("health", node="n1", gpus=[{"index": 0, "temp_c": 70, "power_w": 300.0}], host={"mem_pct": 50.0})
    assert kit_main(["spikes", str(rd.path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["steps", "peak"] and "150" in out and "300" in out
    assert kit_main(["spikes", str(rd.path), "--json", "--step", "290"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [s["start"] for s in res["spikes"]] == [300]
    report = tmp_path / "report"
    assert kit_main(["spikes", str(rd.path), "--report", str(report), "--no-data"]) == 0
    md = (report / "report.md").read_text()
    assert "## Step 150" in md and "## Step 300" in md and "overview.png" in md
    for png in ("overview.png", "spike_0000150.png", "spike_0000300.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "spikes.json").read_text())["spikes"][0]["start"] == 150
    assert kit_main(["spikes", str(tmp_path / "nope")]) == 1
    assert "no run directory" in capsys.readouterr().err


def test_batch_analysis_names_the_poisoned_documents(tmp_path: Path) -> None:
    cfg = load_recipe(recipe(tmp_path, "poisoned"))
    rd = create_run(cfg, log=lambda m: None)  # prepares the real data set; nothing is trained
    junk = junk_steps(rd.data)
    assert junk.get(SPIKE_STEP, 0) >= 3 and 12 not in junk, junk
    loss = synthetic(34, 6, [12, SPIKE_STEP], factor=1.6)
    with LedgerWriter(rd.path, "train-r0") as led:
        write_steps(led, range(1, 35), loss)
    res = analyse(rd.path)
    by_step = {s["start"]: s for s in res["spikes"]}
    assert set(by_step) == {12, SPIKE_STEP}
    poisoned = by_step[SPIKE_STEP]["batches"]
    odd = [d for d in poisoned["documents"] if d["flags"]]
    assert {d["source"] for d in odd} == {"junk"} and len(odd) == junk[SPIKE_STEP]
    assert all({"repetition", "encoding"} <= set(d["flags"]) and d["origin"].startswith(str(tmp_path / "src"))
               for d in odd)
    mix = {m["source"]: m for m in poisoned["mix"]}
    assert mix["junk"]["ratio"] > 10 and mix["junk"]["language"] == "und"
    assert poisoned["snippets"][0]["source"] == "junk" and "\\x" in poisoned["snippets"][0]["text"]
    clean = by_step[12]["batches"]  # a spike with nothing odd in its data: nothing is blamed
    assert clean["flagged_samples"] == 0 and not any(d["flags"] for d in clean["documents"])


def test_offline_detector_agrees_with_the_live_one() -> None:
    """The vectorised pass of the postmortem (strided statistics, exact near the bar) flags exactly
    the steps kit.spikes.SeriesDetector flags, with the same scores."""
    from kit.config import SpikesSection
    from kit.spikes import SeriesDetector
    from kit.tools.postmortem import detect

    cfg = SpikesSection()
    for seed in range(3):
        rng = np.random.default_rng(seed)
        n = 20000
        vals = (2 + 6 * np.exp(-np.arange(n) / 500)) * np.exp(rng.normal(0, 0.015, n))
        vals[rng.choice(np.arange(100, n), 60, replace=False)] *= 1.4
        vals[7000] = np.nan
        steps = np.arange(1, n + 1)
        off = detect(steps, vals, cfg, clamp=True)
        d = SeriesDetector("loss", cfg.window, cfg.threshold, cfg.warmup_steps, cfg.min_rise, True)
        live = [d.observe(int(s), float(v)) for s, v in zip(steps, vals, strict=True)]
        flags = np.array([v.spike for v in live])
        assert np.array_equal(flags, off.spike) and flags.sum() >= 60
        hit = np.flatnonzero(flags & np.isfinite(vals))
        assert np.allclose([live[i].score for i in hit], off.score[hit], rtol=1e-9)


def test_sample_flags_language_length_encoding(tmp_path: Path) -> None:
    """Each anomaly rule against the usual data of a real prepared run (the poisoned data set)."""
    from kit.tools.spike_data import DataInspector, SampleStats

    cfg = load_recipe(recipe(tmp_path, "flags"))
    rd = create_run(cfg, log=lambda m: None)
    with LedgerWriter(rd.path, "train-r0") as led:
        write_steps(led, range(1, 35), synthetic(34, 7, []))
    insp = DataInspector.open(rd.path)
    assert insp is not None and insp.usual_script["en"] == "Latin"

    def flags(**kw: object) -> list[str]:
        base = {"index": 0, "source": "en", "docs": [1], "main_doc": 1, "doc_tokens": 150, "repetition": 0.1,
                "control": 0.0, "replacement": 0.0, "script": "Latin", "text": "the cat sees the house."}
        return [f.split(":")[0].split(" ")[0] for f in insp.flags(SampleStats(**{**base, **kw}))]

    assert flags() == []
    assert flags(script="Cyrillic") == ["language"]
    assert flags(doc_tokens=200_000) == ["length"]
    assert flags(replacement=0.2) == ["encoding"]
    assert flags(repetition=0.9, control=0.5) == ["repetition", "encoding"]

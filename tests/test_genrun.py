"""bench/genrun.py: the realistic runs every benchmark measures must read like real ones.

Two kinds of checks, on a small generated run (a few thousand steps; the shape's every feature: time-
limit boundaries, a crash on a GPU's Xid with the node excluded, a hang, a spike rolled back, a
straggler, a save-now, a hot GPU, retention):
- every reader of the repository reads it without one bad line, unknown kind or future version, and
  finds every event the generator says it wrote (kit.ledger's reader, the monitor's follower, cold
  start and replay, the postmortem's columnar reader, the chain's tail reader, ``kit monitor --once``);
- the payloads are the real writers' own: a health sample has exactly the fields kit.health writes
  (taken through the real sampler on the fake NVML: no GPU here), a rank_timings row exactly what
  kit.stragglers reports.
The slow test compares every event kind a real 2-rank DeepSpeed run writes with the generator's.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import genrun

from kit.ledger import EVENTS, SCHEMA_VERSION, Cursor, Follower, LedgerReader, ReadStats, read_all
from kit.rundir import RunDir

SMALL = genrun.Shape(steps=6000, segments=10, nodes=2, gpus=4, ckpt_interval=100, keep_every=500, spikes=2,
                     timing_interval=50)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, genrun.Counts]:
    return genrun.generate(SMALL, tmp_path_factory.mktemp("gen"), workers=1)


def _clean(stats: ReadStats) -> None:
    assert (stats.bad_lines, stats.invalid_events, stats.coerced, stats.unknown_kinds, stats.future_version,
            stats.last_error) == (0, 0, 0, 0, 0, ""), stats


def test_the_shape_has_every_feature(small: tuple[Path, genrun.Counts]) -> None:
    run, counts = small
    ev = counts.events
    for kind in ("step", "rank_timings", "health", "ckpt_saved", "ckpt_deleted", "ckpt_loaded", "spike", "rollback",
                 "data_skipped", "straggler", "doctor", "control_ack", "hang", "node_excluded", "segment_signalled",
                 "chain_requeued", "allocation_started", "allocation_ended", "alert", "alert_ack"):
        assert ev.get(kind, 0) > 0, f"no {kind} event"
    assert counts.step_events > SMALL.steps  # the rolled-back steps are replayed
    names = {p.stem for p in (run / "ledger").glob("*.jsonl")}
    assert {"train-r0", "chain", "chain-signals", "cli", "submit", "doctor-r0", "doctor-r4"} <= names
    assert len([n for n in names if n.startswith("health-")]) == SMALL.nodes + 1  # the crashed node's replacement
    chain = json.loads((run / "slurm" / "chain.json").read_text())
    assert len(chain["segments"]) == SMALL.segments and chain["state"] == "running"
    assert all(len(e["ranks"]) == SMALL.world for e in read_all(run, {"rank_timings"}))
    assert all(len(e["gpus"]) == SMALL.gpus for e in read_all(run, {"health"}))


def test_kit_ledger_reads_it_all(small: tuple[Path, genrun.Counts]) -> None:
    """The one reader (kit.ledger): every line parses and conforms to the schema, nothing coerced."""
    run, counts = small
    reader = LedgerReader(run)
    events = reader.poll()
    _clean(reader.stats)
    assert Counter(e["kind"] for e in events) == Counter(counts.events)
    assert all(e["v"] == SCHEMA_VERSION and e["kind"] in EVENTS for e in events)
    ts = [e["t"] for e in events]
    assert ts == sorted(ts)
    for name in sorted(p.name for p in (run / "ledger").glob("*.jsonl")):  # each writer's file in time order
        one = Follower(run / "ledger", ReadStats())
        one.cursors = {other: Cursor(offset=1 << 62) for other in one.files() if other != name}
        t = [e["t"] for e in one.poll_all()]
        assert t == sorted(t) and t, name


def test_every_reader_reads_it_all(small: tuple[Path, genrun.Counts]) -> None:
    """Chunked following (the monitor's backfill), replay, the tail (chain, status), the indexed scan
    (cold starts, the postmortem's columns) and ``kit monitor --once``'s summary."""
    from kit.ledger import merged, tail
    from kit.ledger.scan import scan
    from kit.monitor.cli import summary_of
    from kit.tools.spike_ledger import read_ledger

    run, counts = small
    total = sum(counts.events.values())
    stats = ReadStats()
    follower = Follower(run / "ledger", stats)
    got: list[dict[str, Any]] = []
    while True:
        chunk, more = follower.poll(64 << 10)
        got += chunk
        if not more:
            break
    _clean(stats)
    assert len(got) == total
    replay = ReadStats()
    assert sum(1 for _ in merged(run, replay)) == total
    _clean(replay)
    tailed = tail(run, set(EVENTS), max_bytes=1 << 30)
    assert Counter(e["kind"] for e in tailed) == Counter(counts.events)
    cold = ReadStats()
    s = scan(run, cold)
    _clean(cold)
    assert len(s.steps) == counts.step_events and s.parsed_bytes < s.indexed_bytes  # the writer's index served
    led = read_ledger(run)
    assert led.bad_lines == 0 and len(led.timeline) == counts.step_events
    assert int(led.timeline.final()["step"][-1]) == SMALL.steps
    summary = summary_of(RunDir(run), use_slurm=False)
    assert summary["step"] == SMALL.steps


def test_health_and_timings_are_the_real_writers_payloads(small: tuple[Path, genrun.Counts], tmp_path: Path) -> None:
    """The real sampler on the fake NVML (no GPU here) and the real straggler report, against the generator's."""
    sys.path.insert(0, str(ROOT / "tests"))
    import fake_nvml

    from kit.alerts import Incidents
    from kit.config import HealthSection
    from kit.health import HealthSampler
    from kit.stragglers import RankInfo, StepTimer, StragglerDetector, Verdict

    run, _ = small
    fake_nvml.install(2)
    real = HealthSampler(tmp_path, HealthSection(record_every=1), seg="s", node="n", nvml=fake_nvml).sample_once()
    assert real is not None
    gen = read_all(run, {"health"})[0]
    assert list(gen) == list(real)
    assert list(gen["gpus"][0]) == list(real["gpus"][0])
    assert list(gen["host"]) == list(real["host"])

    class Capture:
        def __init__(self) -> None:
            self.events: list[tuple[str, dict[str, Any]]] = []

        def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
            self.events.append((kind, fields))
            return fields

        alert = emit

    timer = StepTimer.__new__(StepTimer)  # the report alone: no engine needed
    timer.ranks = [RankInfo(r, "n", r, r, 1) for r in range(2)]
    timer.ledger = Capture()  # type: ignore[assignment]
    timer.detector = StragglerDetector(0.05)
    timer.peers = None  # no pipeline: every rank against the others (kit.stragglers.peer_groups)
    timer.incidents = Incidents(timer.ledger, "x")  # type: ignore[arg-type]
    row = {"step_s": 1.0, "fwd_s": 0.3, "bwd_s": 0.5, "opt_s": 0.1, "other_s": 0.1}
    timer._report(50, [row, row], Verdict([0.0, 0.0], 0.05, 0.0, []))
    real_row = timer.ledger.events[0][1]["ranks"][0]  # type: ignore[attr-defined]
    gen_row = read_all(run, {"rank_timings"})[0]["ranks"][0]
    assert list(gen_row) == list(real_row)


def test_same_shape_same_bytes(tmp_path: Path) -> None:
    shape = genrun.Shape(steps=800, segments=3, nodes=1, gpus=2, ckpt_interval=100, spikes=0)
    a, _ = genrun.generate(shape, tmp_path / "a", workers=1)
    b, _ = genrun.generate(shape, tmp_path / "b", workers=1)
    for f in sorted((a / "ledger").glob("*.jsonl")):
        assert f.read_bytes().replace(str(a).encode(), b"") == (b / "ledger" / f.name).read_bytes().replace(
            str(b).encode(), b""), f.name
    path, meta = genrun.cached(shape, tmp_path / "cache")
    again, meta2 = genrun.cached(shape, tmp_path / "cache")
    assert path == again and meta == meta2 and shape.key() in str(path)

"""kit.evaluation without ranks: the held-out split, the fixed set and its batches, the sharding, the
cost bound and the alert rule (generated inputs as well as hand-picked ones)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.config import EvalSection, load_recipe
from kit.data import HELDOUT, META, heldout_count, heldout_indices, prepare
from kit.errors import ConfigError, DataError
from kit.evaluation import (
    MAX_STRETCH,
    EvalSet,
    EvalSource,
    Evaluator,
    LossWatch,
    Placement,
    load_eval_set,
    needed_stretch,
    pick_windows,
    summarize,
)
from kit.ledger import LedgerWriter, read_all
from tests.conftest import ROOT, tiny_overrides
from tests.test_data import recipe, write_sources


# ------------------------------------------------------------------------------------ held out
@settings(deadline=None)  # timing is not what these check (a busy machine)
@given(n=st.integers(0, 500), fraction=st.floats(0, 0.99), docs=st.integers(0, 600), seed=st.integers(0, 2**31))
def test_heldout_choice_is_deterministic_disjoint_and_sized(n: int, fraction: float, docs: int, seed: int) -> None:
    ev = EvalSection(heldout_fraction=fraction, heldout_docs=docs, enabled=False)
    origins = [f"/data/f{i // 7}.txt#{i}" for i in range(n)]
    idx = heldout_indices(origins, "src", seed, ev)
    assert idx == heldout_indices(list(origins), "src", seed, ev)  # the same on a re-prepare
    assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    assert len(idx) == heldout_count(n, ev)
    if n >= 2 and (docs or fraction):
        assert 1 <= len(idx) <= n - 1  # at least one held out, never the whole source
        if docs:
            assert len(idx) == min(docs, n - 1)
    else:
        assert idx == []


def test_heldout_choice_depends_on_the_seed_and_source() -> None:
    ev = EvalSection(heldout_docs=10)
    origins = [f"doc{i}" for i in range(100)]
    a = heldout_indices(origins, "fr", 1, ev)
    assert a != heldout_indices(origins, "fr", 2, ev) and a != heldout_indices(origins, "de", 1, ev)


def test_prepare_sets_documents_aside_and_records_it(tmp_path: Path) -> None:
    cfg = recipe(tmp_path, write_sources(tmp_path / "src"), **{"eval.heldout_docs": 4})
    meta = prepare(cfg, tmp_path / "d", log=lambda m: None)
    assert meta["version"] == 2 and meta[HELDOUT]["docs"] == 4 and meta[HELDOUT]["seed"] == cfg.run.seed
    for s in meta["sources"]:
        train = json.loads((tmp_path / "d" / f"{s['name']}.origins.json").read_text())
        held = json.loads((tmp_path / "d" / f"{s['name']}.{HELDOUT}.origins.json").read_text())
        assert len(held) == 4 == s[HELDOUT]["documents"] and not set(train) & set(held)
        assert s["documents"] == len(train)
        tokens = np.fromfile(tmp_path / "d" / f"{s['name']}.{HELDOUT}.tokens.bin", dtype=np.uint16)
        assert len(tokens) == s[HELDOUT]["tokens"] > 0
    (tmp_path / "r2").mkdir()
    again = prepare(recipe(tmp_path / "r2", write_sources(tmp_path / "src"), **{"eval.heldout_docs": 4}),
                    tmp_path / "d2", log=lambda m: None)
    assert [s[HELDOUT] for s in again["sources"]] == [s[HELDOUT] for s in meta["sources"]]
    for s in meta["sources"]:  # a re-prepare makes the same files, byte for byte
        for suffix in (f"{HELDOUT}.tokens.bin", "tokens.bin"):
            assert (tmp_path / "d" / f"{s['name']}.{suffix}").read_bytes() == \
                (tmp_path / "d2" / f"{s['name']}.{suffix}").read_bytes()


def test_the_split_does_not_depend_on_where_the_files_are(tmp_path: Path) -> None:
    """The same documents under another path (a moved run, a copy on scratch): the same split."""
    import shutil

    write_sources(tmp_path / "src")
    shutil.copytree(tmp_path / "src", tmp_path / "elsewhere" / "copy")
    metas = []
    for i, where in enumerate((tmp_path / "src", tmp_path / "elsewhere" / "copy")):
        (tmp_path / f"r{i}").mkdir()
        sources = [{**s, "path": str(where / Path(s["path"]).name)} for s in write_sources(tmp_path / "unused")]
        metas.append(prepare(recipe(tmp_path / f"r{i}", sources, **{"eval.heldout_docs": 5}), tmp_path / f"d{i}",
                             log=lambda m: None))
    assert [s[HELDOUT] for s in metas[0]["sources"]] == [s[HELDOUT] for s in metas[1]["sources"]]
    assert (tmp_path / "d0" / "js.tokens.bin").read_bytes() == (tmp_path / "d1" / "js.tokens.bin").read_bytes()


def test_a_prepared_folder_with_another_split_is_refused(tmp_path: Path) -> None:
    sources = write_sources(tmp_path / "src")
    prepare(recipe(tmp_path, sources, **{"eval.heldout_docs": 4}), tmp_path / "d", log=lambda m: None)
    (tmp_path / "r2").mkdir()
    with pytest.raises(DataError, match=r"eval.heldout_fraction 0.02, eval.heldout_docs 4; the recipe differs"):
        prepare(recipe(tmp_path / "r2", sources, **{"eval.heldout_docs": 3}), tmp_path / "d", log=lambda m: None)


def test_data_prepared_before_heldout_splits_trains_without_evaluation(tmp_path: Path) -> None:
    cfg = recipe(tmp_path, write_sources(tmp_path / "src"))
    prepare(cfg, tmp_path / "d", log=lambda m: None)
    meta = json.loads((tmp_path / "d" / META).read_text())
    del meta[HELDOUT]
    meta["version"] = 1
    (tmp_path / "d" / META).write_text(json.dumps(meta))
    assert prepare(cfg, tmp_path / "d", log=lambda m: None)["version"] == 1  # accepted as it is
    assert load_eval_set(tmp_path / "d", cfg) is None
    logs: list[str] = []
    ev = Evaluator.build(cfg, tmp_path / "d", None, Placement(), None, lambda: None, logs.append, None)
    assert not ev.active and "prepared before held-out splits existed" in logs[0]
    assert ev.after_step(cfg.eval.interval_steps, 0.1) is None


def test_eval_set_from_prepared_data(tmp_path: Path) -> None:
    cfg = recipe(tmp_path, write_sources(tmp_path / "src"), **{"eval.heldout_docs": 4, "eval.sequences": 3,
                                                              "eval.micro_batch_size": 2})
    prepare(cfg, tmp_path / "d", log=lambda m: None)
    es = load_eval_set(tmp_path / "d", cfg)
    assert es is not None and [s.name for s in es.sources] == ["txt", "js", "pq"]
    assert all(s.windows.shape == (3, 32) for s in es.sources)
    assert es.batches == ((0, 0, 2), (0, 2, 3), (1, 0, 2), (1, 2, 3), (2, 0, 2), (2, 2, 3))
    assert np.array_equal(load_eval_set(tmp_path / "d", cfg).sources[1].windows, es.sources[1].windows)


# -------------------------------------------------------------------------------- the fixed set
@settings(deadline=None)  # timing is not what these check (a busy machine)
@given(n=st.integers(0, 10_000), seq=st.integers(1, 64), k=st.integers(1, 64))
def test_windows_are_evenly_spread_and_inside_the_stream(n: int, seq: int, k: int) -> None:
    starts = pick_windows(n, seq, k)
    assert len(starts) == min(k, max(0, (n - 1) // seq))
    assert all(s % seq == 0 and s + seq <= max(n - 1, 0) + 1 for s in starts)
    assert list(starts) == sorted(set(starts.tolist()))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6), micro=st.integers(1, 5), dp=st.integers(1, 7))
def test_batches_cover_every_sequence_once_and_any_sharding_covers_every_batch(sizes: list[int], micro: int,
                                                                              dp: int) -> None:
    es = EvalSet(8, micro, tuple(EvalSource(f"s{i}", "", np.zeros((n, 8), dtype=np.int64))
                                 for i, n in enumerate(sizes)))
    slots = [es.offsets[k] + r for k, a, z in es.batches for r in range(a, z)]
    assert sorted(slots) == list(range(es.sequences))
    assert all(z - a <= micro for _, a, z in es.batches)
    shards = [list(range(r, len(es.batches), dp)) for r in range(dp)]
    assert sorted(b for s in shards for b in s) == list(range(len(es.batches)))


@settings(max_examples=80, deadline=None)
@given(tensor=st.integers(1, 4), pipeline=st.integers(1, 5), data=st.integers(1, 4))
def test_placement_at_any_layout_pairs_the_stages_and_writes_once_per_replica(tensor: int, pipeline: int,
                                                                              data: int) -> None:
    """Every rank's send partner receives from it (same tensor and data coordinates, the next stage), the
    first stage receives from no one and the last sends to no one, and exactly one rank of each
    replica writes: the first tensor rank of the last stage."""
    from kit.parallel.layout import Layout
    from kit.parallel.mesh import Mesh

    layout = Layout(tensor, pipeline, data)
    where = [Placement.of(Mesh(layout, r), r, layout.world) for r in range(layout.world)]
    for r, w in enumerate(where):
        c = layout.coords(r)
        assert (w.replica, w.replicas, w.stage, w.stages, w.rank) == (c.data, data, c.pipeline, pipeline, r)
        assert w.pipelined == (pipeline > 1)
        assert (w.prev == -1) == (c.pipeline == 0) and (w.next == -1) == (c.pipeline == pipeline - 1)
        if w.next != -1:
            nxt = layout.coords(w.next)
            assert (nxt.tensor, nxt.pipeline, nxt.data) == (c.tensor, c.pipeline + 1, c.data)
            assert where[w.next].prev == r
    writers = [w.replica for w in where if w.writes]
    assert sorted(writers) == list(range(data))
    assert all(w.stage == pipeline - 1 and layout.coords(w.rank).tensor == 0 for w in where if w.writes)


def test_summary_is_the_token_mean_per_source() -> None:
    es = EvalSet(5, 2, (EvalSource("a", "fr", np.zeros((2, 5), dtype=np.int64)),
                        EvalSource("b", "", np.zeros((1, 5), dtype=np.int64))))
    res = summarize(es, [4.0, 8.0, 2.0])
    assert res["sources"]["a"] == {"language": "fr", "loss": 1.5, "ppl": math.exp(1.5), "tokens": 8, "sequences": 2}
    assert res["sources"]["b"]["loss"] == 0.5 and res["tokens"] == 12 and res["loss"] == 14 / 12


# ---------------------------------------------------------------------------------- cost bound
@settings(deadline=None)  # timing is not what these check (a busy machine)
@given(eval_s=st.floats(1e-6, 1e4), step_s=st.floats(1e-6, 1e3), interval=st.integers(1, 10_000),
       frac=st.floats(1e-4, 1.0))
def test_stretch_is_the_smallest_power_of_two_that_fits(eval_s: float, step_s: float, interval: int,
                                                        frac: float) -> None:
    k = needed_stretch(eval_s, step_s, interval, frac)
    assert k >= 1 and k & (k - 1) == 0 and k <= MAX_STRETCH
    if k < MAX_STRETCH:
        assert eval_s <= frac * step_s * interval * k * (1 + 1e-12)
    if k > 1:
        assert eval_s > frac * step_s * interval * (k // 2)


def test_no_bound_never_stretches() -> None:
    assert needed_stretch(100.0, 0.001, 1, 0.0) == 1
    assert needed_stretch(float("nan"), 1.0, 1, 0.05) == 1


# ------------------------------------------------------------------------------------- alerting
@settings(max_examples=80, deadline=None)
@given(series=st.lists(st.floats(0.5, 5.0), min_size=1, max_size=40), margin=st.floats(0.01, 0.5),
       window=st.integers(1, 8))
def test_one_alert_per_incident(series: list[float], margin: float, window: int) -> None:
    w = LossWatch(margin, window)
    opened = closed = 0
    for i, loss in enumerate(series):
        was_open = "fr" in w.open
        o, c = w.observe((i + 1) * 10, {"fr": loss})
        opened, closed = opened + len(o), closed + len(c)
        best = min(series[max(0, i - window):i], default=None)
        above = best is not None and loss > best * (1 + margin)
        assert ("fr" in w.open) == above  # open exactly while above the recent best
        assert len(o) == (above and not was_open)  # an alert only when an incident starts
        assert len(c) == (was_open and not above)
    assert opened - closed == len(w.open)


def test_a_non_finite_loss_is_an_incident_and_never_the_best() -> None:
    w = LossWatch(0.05, 5)
    w.observe(10, {"fr": 2.0})
    opened, _ = w.observe(20, {"fr": float("nan")})
    assert [o["source"] for o in opened] == ["fr"]
    _, closed = w.observe(30, {"fr": 2.02})  # judged against 2.0, not against the NaN
    assert closed == ["fr"] and not w.open


def test_rewind_forgets_abandoned_evaluations() -> None:
    w = LossWatch(0.05, 5)
    w.observe(10, {"fr": 2.0})
    w.observe(20, {"fr": 3.0})
    assert w.open == {"fr": 20}
    assert w.rewind(10) == [("fr", 20)]
    assert w.open == {} and w.history["fr"] == [(10, 2.0)]
    restored = LossWatch(0.05, 5)
    restored.restore(json.loads(json.dumps(w.state())))
    assert restored.history == w.history


def test_the_trainer_alerts_once_per_incident_in_the_ledger(tmp_path: Path) -> None:
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path, **{"eval.alert_margin": 0.1}))
    es = EvalSet(4, 2, (EvalSource("fr", "fr", np.zeros((1, 4), dtype=np.int64)),
                        EvalSource("de", "de", np.zeros((1, 4), dtype=np.int64))))
    with LedgerWriter(tmp_path, "train-r0") as led:
        ev = Evaluator(cfg, es, None, Placement(), led, lambda: None, log=lambda m: None)
        for step, (fr, de) in enumerate([(2.0, 2.0), (1.9, 2.0), (2.5, 2.0), (2.6, 2.05), (1.95, 2.4), (2.3, 2.5)]):
            res = summarize(es, [fr * 3, de * 3])
            ev._report((step + 1) * 100, res, 0.01, 0.1, 0.01)
    alerts = read_all(tmp_path, {"alert"})
    assert [(a["source"], a["step"]) for a in alerts] == [("fr", 300), ("de", 500), ("fr", 600)]
    assert [a["incident"] for a in alerts] == ["eval/fr/300", "eval/de/500", "eval/fr/600"]  # one id each
    assert {a["condition"] for a in alerts} == {"eval_loss"}
    cleared = read_all(tmp_path, {"alert_cleared"})  # kit.alerts: an incident that is over says so
    assert [(c["incident"], c["step"]) for c in cleared] == [("eval/fr/300", 500)]
    from kit.run.model import RunModel

    m = RunModel("r")  # what kit status and the monitor see: fr's first incident over, two open
    m.fold_all(read_all(tmp_path))
    assert sorted(a.incident for a in m.open_incidents("eval_loss")) == ["eval/de/500", "eval/fr/600"]
    assert "validation loss of fr is 2.5 at step 300, +31.6% over its best" in alerts[0]["message"]
    events = read_all(tmp_path, {"eval"})
    assert [e["incidents"] for e in events] == [[], [], ["fr"], ["fr"], ["de"], ["de", "fr"]]
    assert events[4]["recovered"] == ["fr"]


def test_a_rollback_clears_the_incidents_of_the_steps_it_abandons(tmp_path: Path) -> None:
    """The replayed steps' evaluations are forgotten, so is an incident they opened: alert_cleared
    (kit.alerts), or the run would stay degraded by an alert about steps that no longer exist."""
    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path, **{"eval.interval_steps": 100}))
    es = EvalSet(4, 2, (EvalSource("fr", "fr", np.zeros((1, 4), dtype=np.int64)),))
    with LedgerWriter(tmp_path, "train-r0") as led:
        ev = Evaluator(cfg, es, None, Placement(), led, lambda: None, log=lambda m: None)
        for step, fr in ((100, 2.0), (200, 3.0)):
            ev._report(step, summarize(es, [fr * 3]), 0.01, 0.1, 0.01)
            ev._last_step = step
        assert ev.after_step(150, 0.1) is None  # a rollback to step 149: step 200's evaluation is abandoned
        ev.after_step(151, 0.1)  # the replay goes on: nothing more to clear
    assert [a["incident"] for a in read_all(tmp_path, {"alert"})] == ["eval/fr/200"]
    cleared = read_all(tmp_path, {"alert_cleared"})
    assert [(c["incident"], c["step"]) for c in cleared] == [("eval/fr/200", 149)]
    assert ev.watch.open == {}


# --------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("override", "message"), [
    ({"eval.interval_steps": 0}, "eval.interval_steps must be at least 1"),
    ({"eval.heldout_fraction": 1.0}, r"eval.heldout_fraction must be in \[0, 1\)"),
    ({"eval.max_fraction": 2.0}, r"eval.max_fraction must be in \[0, 1\]"),
    ({"eval.heldout_fraction": 0.0}, "eval.enabled = true needs held-out documents"),
    ({"eval.intervall_steps": 5}, "did you mean eval.interval_steps"),
])
def test_bad_eval_settings_name_the_key(tmp_path: Path, override: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path, **override))


def test_the_heldout_split_is_part_of_the_config_digest(tmp_path: Path) -> None:
    a = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path))
    b = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path, **{"eval.heldout_docs": 2}))
    c = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path, **{"eval.interval_steps": 7}))
    assert a.digest() != b.digest() and a.digest() == c.digest()


# ------------------------------------------------------------------------------------- kit eval
@pytest.mark.parametrize(("setup", "message"), [
    ("nothing", "no run directory at"),
    ("no_checkpoint", "holds no complete checkpoint"),
    ("bad_export", "no readable MANIFEST.json from `kit convert`"),
])
def test_kit_eval_refuses_with_one_clear_line(tmp_path: Path, capsys: Any, setup: str, message: str) -> None:
    from kit.rundir import RunDir
    from kit.tools.cli import main as kit_main

    target = tmp_path / "target"
    args = [str(target)]
    if setup == "no_checkpoint":
        RunDir(target).create(load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path)))
    elif setup == "bad_export":
        target.mkdir()
        (target / "config.json").write_text("{}")
    assert kit_main(["eval", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_kit_eval_options_are_checked_before_anything_runs(capsys: Any) -> None:
    from kit.tools.cli import main as kit_main

    for bad in (["--step", "-3"], ["--new-tokens", "0"], ["--samples", "x"]):
        assert kit_main(["eval", "somewhere", *bad]) == 2
        assert f"kit eval: argument {bad[0]}" in capsys.readouterr().err

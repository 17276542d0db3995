"""kit.spikes without DeepSpeed: the detector (precision and recall on synthetic curves), the policy
table, skip ranges, the guard's persistence, the refused-update context and the rollback's
handling of abandoned checkpoints (real files, real kit.checkpoint)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from kit import checkpoint as ck
from kit.config import SpikesSection, load_recipe
from kit.errors import ConfigError
from kit.ledger import LedgerWriter, read_all
from kit.spikes import (
    GIVE_UP,
    LOG,
    ROLLBACK,
    ROLLED_BACK,
    SKIP,
    SeriesDetector,
    SkipRange,
    SkipRanges,
    SpikeGuard,
    Verdict,
    decide,
    hold_update,
    set_aside_after,
)

ROOT = Path(__file__).resolve().parent.parent


def curve(n: int, seed: int, noise: float = 0.01, spikes: int = 0, lo: float = 0.15, hi: float = 0.8,
          start: int = 100) -> tuple[np.ndarray, set[int]]:
    """A loss curve: fast early fall, slow trend, multiplicative noise, planted one-step spikes."""
    rng = random.Random(seed)
    s = np.arange(1, n + 1)
    v = (2.0 + 6.0 * np.exp(-s / 300) + 0.5 * np.exp(-s / 3000)) * np.exp(
        np.array([rng.gauss(0, noise) for _ in s]))
    planted = set(rng.sample(range(start, n), spikes))
    for p in planted:
        v[p - 1] *= 1 + rng.uniform(lo, hi)
    return v, planted


def run_detector(values: np.ndarray, **kw: float) -> set[int]:
    cfg = SpikesSection(**kw)  # type: ignore[arg-type]
    d = SeriesDetector("loss", cfg.window, cfg.threshold, cfg.warmup_steps, cfg.min_rise, True)
    return {i + 1 for i, x in enumerate(values) if d.observe(i + 1, float(x)).spike}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_detector_precision_and_recall_on_planted_spikes(seed: int) -> None:
    values, planted = curve(6000, seed, spikes=40)
    found = run_detector(values)
    tp = len(found & planted)
    precision, recall = tp / max(1, len(found)), tp / len(planted)
    assert recall >= 0.95, (sorted(planted - found), precision, recall)
    assert precision >= 0.95, (sorted(found - planted), precision, recall)


def test_detector_is_quiet_on_a_clean_curve_with_a_steep_warm_up_fall() -> None:
    # The plain rolling median/MAD flags the decelerating early fall or hides spikes in it; the
    # trend-robust rule must do neither (here: nothing to find in 5 noisy clean curves).
    for seed in range(5):
        values, _ = curve(3000, seed, noise=0.02)
        assert run_detector(values, warmup_steps=10) == set()


def test_detector_finds_a_spike_during_the_early_fall() -> None:
    values, _ = curve(400, 7, noise=0.01)
    values[59] *= 1.3
    assert run_detector(values, warmup_steps=10) == {60}


def test_warm_up_and_small_rises_are_not_spikes() -> None:
    values, _ = curve(300, 4)
    values[9] *= 3  # inside warm-up: no verdict yet
    values[199] *= 1.03  # 3%: under spikes.min_rise
    assert run_detector(values, warmup_steps=20) == set()


def test_a_level_shift_is_flagged_then_becomes_the_new_normal() -> None:
    values, _ = curve(600, 5)
    values[300:] *= 1.5
    found = run_detector(values)
    assert 301 in found and max(found) < 301 + 50, sorted(found)


def test_non_finite_values_are_always_spikes_and_do_not_poison_the_history() -> None:
    d = SeriesDetector("loss", 20, 6.0, 5, 0.05, True)
    for i in range(1, 30):
        d.observe(i, 3.0 + 0.01 * (i % 3))
    v = d.observe(30, math.nan)
    assert v.spike and v.nonfinite
    assert not d.observe(31, 3.01).spike and d.observe(32, 6.0).spike


def test_policy_table() -> None:
    def v(nonfinite: bool = False) -> Verdict:
        return Verdict(5, "loss", math.nan if nonfinite else 9.0, spike=True, nonfinite=nonfinite)

    log, skip, rb = (SpikesSection(policy=p, max_rollbacks=2) for p in ("log", "skip", "rollback"))
    assert decide(log, v(), True, False, 0).action == LOG
    assert decide(skip, v(), True, False, 0).action == SKIP
    assert decide(skip, v(), False, True, 0).action == LOG  # a grad-norm spike is known after the update
    assert decide(rb, v(), False, False, 0).action == LOG  # ...of an update that was refused: nothing to undo
    assert decide(rb, v(), True, False, 0).action == ROLLBACK
    assert decide(rb, v(), True, False, 2).action == GIVE_UP  # the cap
    # Non-finite: never just logged while the update can be refused; rolled back if it was applied.
    assert decide(log, v(True), True, False, 0).action == SKIP
    assert decide(log, v(True), False, False, 0).action == LOG  # DeepSpeed skipped it itself
    assert decide(log, v(True), False, True, 0).action == ROLLBACK
    assert decide(log, v(True), False, True, 5).action == GIVE_UP


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spikes\.policy"):
        load_recipe(ROOT / "jobs" / "tiny.toml", ['spikes.policy="panic"'])
    with pytest.raises(ConfigError, match=r"spikes\.window"):
        load_recipe(ROOT / "jobs" / "tiny.toml", ["spikes.window=2"])
    with pytest.raises(ConfigError, match=r"spikes\.min_rise"):
        load_recipe(ROOT / "jobs" / "tiny.toml", ["spikes.min_rise=-1.0"])


def test_skip_ranges_advance_persist_and_merge(tmp_path: Path) -> None:
    sr = SkipRanges()
    sr.add(SkipRange(100, 200, "a", 10, True))
    sr.add(SkipRange(200, 260, "b"))  # adjacent: one jump over both
    sr.add(SkipRange(150, 180, "c"))  # inside another
    assert [sr.advance(x) for x in (0, 99, 100, 150, 199, 200, 259, 260)] == [0, 99, 260, 260, 260, 260, 260, 260]
    assert sr.rollbacks == 1
    path = tmp_path / "control" / "skip-ranges.json"
    sr.save(path)
    back = SkipRanges.load(path)
    assert back.to_list() == sr.to_list()
    back.merge([*sr.to_list(), {"start": 5, "end": 6}])
    assert len(back.ranges) == 4 and back.advance(5) == 6
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"skip-ranges\.json"):
        SkipRanges.load(path)
    with pytest.raises(ConfigError, match="empty"):
        sr.add(SkipRange(7, 7))
    assert SkipRanges.load(tmp_path / "missing.json").ranges == []


def test_guard_emits_decides_and_survives_a_restart(tmp_path: Path) -> None:
    cfg = SpikesSection(policy="rollback", window=20, warmup_steps=10, max_rollbacks=1)
    values, _ = curve(80, 11)
    values[59] *= 1.6
    with LedgerWriter(tmp_path, "train-r0") as led:
        g = SpikeGuard(cfg, led)
        checks = {}
        for i, x in enumerate(values[:50], start=1):
            checks[i] = g.check(i, float(x), i - 1, 1.0, True, {"consumed": 8 * (i - 1), "samples": 8})
        state = json.loads(json.dumps(g.manifest_state()))  # what a checkpoint manifest keeps
        g2 = SpikeGuard(cfg, led)
        g2.restore(state)
        for i, x in enumerate(values[50:], start=51):
            a = g.check(i, float(x), i - 1, 1.0, True, {"consumed": 8 * (i - 1), "samples": 8})
            b = g2.check(i, float(x), i - 1, 1.0, True, {"consumed": 8 * (i - 1), "samples": 8})
            assert (a.rollback is None) == (b.rollback is None)
            checks[i] = a
        g.record_skip(tmp_path / "control" / "skip-ranges.json", SkipRange(472, 500, step=60, rollback=True))
        after = g.check(81, 99.0, 80, None, True, {"consumed": 640, "samples": 8})
    assert [i for i, c in checks.items() if c.decisions] == [60]
    assert checks[60].rollback is not None and g.note == {"spike": "loss", "action": GIVE_UP}
    assert after.give_up is not None  # the cap (1 rollback recorded) turns the next rollback into give_up
    spikes = read_all(tmp_path, {"spike"})
    assert [(e["step"], e["action"]) for e in spikes] == [(60, ROLLBACK), (60, ROLLBACK), (81, GIVE_UP)]
    assert spikes[0]["consumed"] == 472 and spikes[0]["size"] > 0.4
    assert SkipRanges.load(tmp_path / "control" / "skip-ranges.json").rollbacks == 1


def test_grad_norm_nan_after_an_applied_update_rolls_back(tmp_path: Path) -> None:
    with LedgerWriter(tmp_path, "train-r0") as led:
        g = SpikeGuard(SpikesSection(policy="log"), led)
        g.check(2, 2.5, 1, None, True, {"consumed": 8, "samples": 8})
        out = g.check(3, 2.0, 2, math.nan, True, {"consumed": 16, "samples": 8})
        assert out.rollback is not None and out.rollback.verdict.metric == "grad_norm"
        assert g.check(4, 2.0, 3, math.nan, False, {}).rollback is None  # DeepSpeed had skipped that update
    first = read_all(tmp_path, {"spike"})[0]
    # the spike is step 2's (known one step late): its loss and data position, not step 3's
    assert (first["step"], first["loss"], first["consumed"]) == (2, 2.5, 8)


class _Null:
    def emit(self, kind: str, /, **fields: object) -> dict[str, object]:
        return {"kind": kind, **fields}


def test_hold_update_refuses_exactly_one_update() -> None:
    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    before = [p.detach().clone() for p in lin.parameters()]
    lin(torch.ones(1, 4)).sum().backward()
    with hold_update(opt, sched):
        opt.step()
        sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters(), strict=True))
    assert sched.last_epoch == 0 and not opt.state
    with pytest.raises(RuntimeError), hold_update(opt, sched):
        raise RuntimeError("boom")
    opt.step()  # the real step is back, also after an exception inside the block
    sched.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, lin.parameters(), strict=True))
    assert sched.last_epoch == 1


def test_set_aside_after_deletes_replayed_and_keeps_post_spike_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        d = root / ck.tag_for(step)
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(bytes([step]) * 10)
        ck.write_manifest(d, step, {"consumed": step * 8})
    (root / "step_0000050").mkdir()  # an incomplete save of the abandoned timeline
    ck.pin(root, "step_0000040", "first after spike")
    deleted, moved = set_aside_after(root, 10, 30, "r1-spike30")
    assert deleted == ["step_0000020"] and moved == ["step_0000030", "step_0000040"]
    assert [c.tag for c in ck.scan(root)[0]] == ["step_0000010"] and ck.scan(root)[1] == []
    kept = root / ROLLED_BACK / "r1-spike30" / "step_0000040"
    assert (kept / ck.MANIFEST).exists() and "step_0000040" not in ck.pinned(root)
    assert ck.find_resume(root)[0].tag == "step_0000010"  # type: ignore[union-attr]


def test_set_aside_never_deletes_the_newest_checkpoint(tmp_path: Path) -> None:
    """No checkpoint after the spike: the newest one (between the target and the spike) used to be
    deleted; it is set aside with the abandoned timeline instead (kit.checkpoint.delete refuses it)."""
    root = tmp_path / "checkpoints"
    for step in (10, 20, 25):
        d = root / ck.tag_for(step)
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(bytes([step]) * 10)
        ck.write_manifest(d, step, {"consumed": step * 8})
    deleted, moved = set_aside_after(root, 10, 26, "r1-spike26")
    assert deleted == ["step_0000020"] and moved == ["step_0000025"]
    assert (root / ROLLED_BACK / "r1-spike26" / "step_0000025" / ck.MANIFEST).exists()
    assert [c.tag for c in ck.scan(root)[0]] == ["step_0000010"]

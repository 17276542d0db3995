"""Loss spikes, live: a robust detector on the all-reduced loss and grad norm, and the policy.

Why it looks like this:
- Every rank runs the same detector on the same all-reduced values (the trainer's one all-reduce per
  step), so every rank takes the same decision. A decision taken on rank 0 alone is the bug that
  let other ranks' bad gradients be averaged in (issue 8).
- The statistic works on log(value) over the previous ``window`` steps (:func:`predict`): a robust
  local-linear prediction (median of the last values projected by the median first difference) and
  a noise scale from the trimmed deviation of the first differences. Neither is fooled by the fast fall of the
  early loss (a plain rolling MAD is: the trend inflates it and hides spikes) nor blown up by the
  spike itself; the log makes the floor ``min_rise`` relative. A step is a spike when
  ``log(x) - prediction > max(threshold * noise, log1p(min_rise))``. The median of n values is
  ``sorted[n // 2]``; tools/postmortem.py vectorises the same rule (tested to flag the same steps).
- The loss of a step is known before its optimizer update (the trainer all-reduces it before the
  last micro-step's ``engine.step()``), so ``skip`` can refuse the update. The grad norm is known
  only after the update; it reaches the detector one step later through the next all-reduce, and
  can only be logged or rolled back.
- Skipped data is a list of global sample ranges (the sampler is a pure function of the sample
  index): kept in ``<run>/control/skip-ranges.json`` (an operator may add ranges by hand, as OPT and
  BigScience did) and in every checkpoint's manifest, so a restart keeps the skip.

Nothing here imports torch at module import; the one torch-touching helper imports lazily.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from kit.config import SpikesSection
from kit.fsio import atomic_write_json

SKIP_FILE = "skip-ranges.json"  # under <run>/control/
MAD_SCALE = 1.4826  # MAD -> standard deviation for a normal distribution
LOCAL = 8  # the prediction projects only the last LOCAL values: a long linear extrapolation of a
# decelerating early fall undershoots and turns noise into "spikes"
SQRT2 = math.sqrt(2)  # the difference of two independent noises has sqrt(2) times their deviation
TRIM = 0.1  # the noise scale is the standard deviation of the central 80% of the first differences
# (more efficient than their MAD, still blind to the spike's own two differences)...
TRIM_STD = 0.6616  # ...divided by that of the central 80% of a unit normal
# The prediction (a median of k values) is itself noisy: variance ~ pi/2 / k of one value's.
PRED_VAR = {k: math.sqrt(1 + math.pi / 2 / k) for k in range(1, LOCAL + 1)}

# Actions, in the order of severity.
LOG, SKIP, ROLLBACK, GIVE_UP = "log", "skip", "rollback", "give_up"


# ----------------------------------------------------------------------------------------- detector


class History:
    """The last ``size`` (step, log value) pairs, in arrival order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fifo: deque[tuple[int, float]] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.fifo)

    def push(self, step: int, x: float) -> None:
        self.fifo.append((step, x))

    def truncate(self, last_step: int) -> None:
        """Forget values of steps after ``last_step`` (a rollback replays them)."""
        while self.fifo and self.fifo[-1][0] > last_step:
            self.fifo.pop()

    def state(self) -> list[list[float]]:
        return [[s, x] for s, x in self.fifo]

    def restore(self, items: list[list[float]]) -> None:
        for s, x in items[-self.size:]:
            self.push(int(s), float(x))


def _med(values: list[float]) -> float:
    values.sort()
    return values[len(values) // 2]


def predict(xs: list[float], clamp_rise: bool) -> tuple[float, float]:
    """Robust local-linear prediction of the next value of ``xs`` (oldest first) and the noise scale.

    slope = median of the first differences (a slow trend shifts them all alike); noise = the
    deviation of the central 80% of the differences, / sqrt(2), times the prediction's own noise
    factor (the trend does not inflate it, unlike the MAD of the values; the spike's own
    differences are trimmed); prediction = median of the last LOCAL values, each projected forward
    by the slope.
    ``clamp_rise``: never extrapolate a rising trend (a slowly diverging loss is not "the trend").
    The offline detector of the postmortem computes exactly this, vectorised.
    """
    n = len(xs)
    d = sorted(xs[i + 1] - xs[i] for i in range(n - 1))
    m = d[len(d) // 2]
    cut = int(TRIM * len(d))
    core = d[cut:len(d) - cut]
    mean = sum(core) / len(core)
    spread = math.sqrt(sum((v - mean) ** 2 for v in core) / len(core)) / TRIM_STD
    slope = min(m, 0.0) if clamp_rise else m
    first = max(0, n - LOCAL)
    pred = _med([xs[i] + slope * (n - i) for i in range(first, n)])
    return pred, spread / SQRT2 * PRED_VAR[n - first]


@dataclass(slots=True)
class Verdict:
    """What the detector says about one value of one step."""

    step: int
    metric: str  # "loss" or "grad_norm"
    value: float
    spike: bool
    nonfinite: bool = False
    median: float = math.nan  # in the value's own units (exp of the log-median)
    score: float = 0.0  # robust z-score of log(value)

    @property
    def size(self) -> float:
        """Relative height above the rolling median (0.5 = 50% above)."""
        return self.value / self.median - 1 if self.median and math.isfinite(self.median) else math.nan


class SeriesDetector:
    """Online detector for one metric (see the module docstring and :func:`predict`)."""

    def __init__(self, metric: str, window: int, threshold: float, warmup: int, min_rise: float,
                 clamp_rise: bool) -> None:
        self.metric = metric
        self.hist = History(window)
        self.threshold = threshold
        self.warmup = max(warmup, 4)
        self.floor = math.log1p(min_rise)
        self.clamp_rise = clamp_rise
        self.seen = 0

    def observe(self, step: int, x: float) -> Verdict:
        if not math.isfinite(x):
            return Verdict(step, self.metric, x, spike=True, nonfinite=True)
        lx = math.log(max(x, 1e-12))
        v = Verdict(step, self.metric, x, spike=False)
        if self.seen >= self.warmup and len(self.hist) >= 4:
            pred, sigma = predict([h for _, h in self.hist.fifo], self.clamp_rise)
            rise = lx - pred
            v.median = math.exp(pred)
            v.score = rise / sigma if sigma > 0 else (math.inf if rise > 0 else 0.0)
            v.spike = rise > max(self.threshold * sigma, self.floor)
        self.hist.push(step, lx)
        self.seen += 1
        return v


# ------------------------------------------------------------------------------------------- policy


@dataclass(slots=True)
class Decision:
    action: str  # log | skip | rollback | give_up
    verdict: Verdict
    why: str


def decide(cfg: SpikesSection, v: Verdict, before_update: bool, applied: bool, rollbacks: int) -> Decision:
    """The policy. ``before_update``: the optimizer update of this step can still be refused.
    ``applied``: for a post-update verdict, whether the update really happened (DeepSpeed itself
    skips updates whose gradients are not finite at ZeRO 1/2). ``rollbacks``: done so far."""
    if v.nonfinite:
        if before_update:
            action = ROLLBACK if cfg.policy == ROLLBACK else SKIP
            why = f"non-finite {v.metric}: never applied"
        elif not applied:
            action = ROLLBACK if cfg.policy == ROLLBACK else LOG
            why = f"non-finite {v.metric}: that update was not applied"
        else:
            action, why = ROLLBACK, f"non-finite {v.metric} and the update was applied: weights are suspect"
    elif not before_update and not applied:
        action, why = LOG, "that step's update was not applied (refused or skipped by DeepSpeed)"
    elif cfg.policy == SKIP and before_update:
        action, why = SKIP, "policy skip"
    elif cfg.policy == SKIP:
        action, why = LOG, "policy skip, but the update was already applied (grad-norm spikes are known late)"
    else:
        action, why = cfg.policy, f"policy {cfg.policy}"
    if action == ROLLBACK and rollbacks >= cfg.max_rollbacks:
        action, why = GIVE_UP, f"{why}; rollback cap spikes.max_rollbacks={cfg.max_rollbacks} reached"
    return Decision(action, v, why)


# --------------------------------------------------------------------------------------- skip ranges


@dataclass(slots=True)
class SkipRange:
    start: int  # first global sample index skipped
    end: int  # first sample index not skipped
    reason: str = ""
    step: int = 0  # the spike step that caused it (0 = by hand)
    rollback: bool = False  # counted against spikes.max_rollbacks
    t: float = 0.0


@dataclass
class SkipRanges:
    """Sample ranges never trained on. The trainer asks :meth:`advance` before each step."""

    ranges: list[SkipRange] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> SkipRanges:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as e:
            from kit.errors import ConfigError

            raise ConfigError(f"{path} is not readable JSON ({e}); fix it or remove it "
                              '(format: {"ranges": [{"start": N, "end": M, "reason": "..."}]})') from None
        out = cls()
        for r in raw.get("ranges", []):
            out.add(SkipRange(int(r["start"]), int(r["end"]), str(r.get("reason", "by hand")), int(r.get("step", 0)),
                              bool(r.get("rollback", False)), float(r.get("t", 0.0))))
        return out

    def merge(self, items: list[dict[str, Any]]) -> None:
        known = {(r.start, r.end) for r in self.ranges}
        for r in items:
            if (int(r["start"]), int(r["end"])) not in known:
                self.add(SkipRange(**{f.name: r[f.name] for f in fields(SkipRange) if f.name in r}))

    def add(self, r: SkipRange) -> None:
        if r.end <= r.start:
            from kit.errors import ConfigError

            raise ConfigError(f"skip range [{r.start}, {r.end}) is empty; end must be greater than start")
        self.ranges.append(r)
        self.ranges.sort(key=lambda x: (x.start, x.end))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"version": 1, "ranges": self.to_list()})

    def to_list(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.ranges]

    @property
    def rollbacks(self) -> int:
        return sum(r.rollback for r in self.ranges)

    def advance(self, consumed: int) -> int:
        """The first sample index at or after ``consumed`` that is not in a skip range."""
        moved = True
        while moved:
            moved = False
            for r in self.ranges:
                if r.start <= consumed < r.end:
                    consumed, moved = r.end, True
        return consumed


# -------------------------------------------------------------------------------------------- guard


@dataclass(slots=True)
class StepCheck:
    """The guard's answer before a step's optimizer update."""

    skip_update: bool = False
    rollback: Decision | None = None  # roll back after this step
    give_up: Decision | None = None
    decisions: list[Decision] = field(default_factory=list)


class SpikeGuard:
    """Everything the trainer needs, identical on every rank: detectors, policy, skip ranges.

    Fed only all-reduced values. Emits ``spike`` events through the ledger it is given (a NullLedger
    on ranks other than 0).
    """

    def __init__(self, cfg: SpikesSection, ledger: Any, skips: SkipRanges | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.skips = skips or SkipRanges()
        self.loss = SeriesDetector("loss", cfg.window, cfg.threshold, cfg.warmup_steps, cfg.min_rise, True)
        self.gnorm = SeriesDetector("grad_norm", cfg.window, cfg.threshold, cfg.warmup_steps, cfg.min_rise, False)
        self.note: dict[str, Any] = {}  # merged into the step event of the step just checked
        self._prev: tuple[int, dict[str, Any]] = (0, {})  # the previous step and its context

    def check(self, step: int, loss: float, prev_step: int, prev_gnorm: float | None, prev_applied: bool,
              context: dict[str, Any]) -> StepCheck:
        """Before the update of ``step``: judge its loss, and the previous step's grad norm.
        ``context`` (loss, consumed, samples, lr of ``step``) goes into the spike events; a grad-norm
        spike of the previous step gets that step's context, kept from the previous call."""
        out = StepCheck()
        prev_ctx = self._prev[1] if self._prev[0] == prev_step else {}
        self._prev = (step, {**context, "loss": loss})
        self.note = {}
        verdicts: list[tuple[Verdict, bool, bool]] = []
        if prev_gnorm is not None and prev_step > 0:
            verdicts.append((self.gnorm.observe(prev_step, prev_gnorm), False, prev_applied))
        verdicts.append((self.loss.observe(step, loss), True, False))
        for v, before, applied in verdicts:
            if not v.spike:
                continue
            d = decide(self.cfg, v, before, applied, self.skips.rollbacks)
            out.decisions.append(d)
            if d.action == SKIP and before:
                out.skip_update = True
            elif d.action == ROLLBACK and out.rollback is None:
                out.rollback = d
            elif d.action == GIVE_UP:
                out.give_up = d
            self._emit(d, prev_ctx if v.metric == "grad_norm" else {**context, "loss": loss})
        if out.decisions:
            worst = max(out.decisions, key=lambda d: (LOG, SKIP, ROLLBACK, GIVE_UP).index(d.action))
            self.note = {"spike": worst.verdict.metric, "action": worst.action}
        return out

    def _emit(self, d: Decision, context: dict[str, Any]) -> None:
        v = d.verdict
        self.ledger.emit("spike", step=v.step, loss=context.get("loss"),
                         metric=v.metric, value=v.value, median=v.median, size=v.size,
                         score=v.score if math.isfinite(v.score) else None, nonfinite=v.nonfinite,
                         action=d.action, why=d.why, policy=self.cfg.policy,
                         threshold=self.cfg.threshold, window=self.cfg.window,
                         **{k: x for k, x in context.items() if k != "loss"})

    def after_rollback(self, to_step: int) -> None:
        self._prev = (0, {})
        self.loss.hist.truncate(to_step)
        self.gnorm.hist.truncate(to_step)

    # ---- persistence in checkpoint manifests
    def manifest_state(self) -> dict[str, Any]:
        return {"skips": self.skips.to_list(),
                "spikes": {"loss": self.loss.hist.state(), "grad_norm": self.gnorm.hist.state(),
                           "seen": [self.loss.seen, self.gnorm.seen]}}

    def restore(self, kit_state: dict[str, Any]) -> None:
        self.skips.merge(kit_state.get("skips", []))
        s = kit_state.get("spikes")
        if s:
            self.loss.hist.restore(s.get("loss", []))
            self.gnorm.hist.restore(s.get("grad_norm", []))
            self.loss.seen, self.gnorm.seen = (int(x) for x in s.get("seen", [0, 0]))

    def record_skip(self, path: Path | None, r: SkipRange) -> None:
        """Add a skip range everywhere (each rank in memory; rank 0 passes ``path`` to persist it)."""
        r.t = r.t or time.time()
        self.skips.add(r)
        if path is not None:
            on_disk = SkipRanges.load(path)
            on_disk.merge([asdict(r)])
            on_disk.save(path)


ROLLED_BACK = ".rolled-back"  # under <run>/checkpoints: post-spike checkpoints set aside by a rollback


def set_aside_after(root: Path, to_step: int, spike_step: int, label: str) -> tuple[list[str], list[str]]:
    """Before a rollback to ``to_step`` (rank 0): checkpoints of the abandoned timeline must not be
    resumed from nor block the replay's saves. Those before the spike hold the same state the
    replay recomputes: deleted (manifest first), their pins stay for the replayed ones. Those at or
    after the spike hold post-spike weights: moved to ``.rolled-back/<label>/`` as evidence, outside
    resume and retention (the operator deletes them). Returns (deleted, moved) tags.

    Deleting goes through kit.checkpoint.delete, which never deletes the newest complete checkpoint:
    when none was saved after the spike, the newest one before it is moved aside with them instead
    (the replay recomputes it; nothing a restart or a postmortem could need is ever deleted)."""
    from kit import checkpoint as ck

    complete, incomplete = ck.scan(root)
    deleted: list[str] = []
    moved: list[str] = []
    for c in complete:
        if c.step <= to_step:
            continue
        if c.step < spike_step:
            with contextlib.suppress(ck.ProtectedCheckpoint):
                ck.delete(root, c.tag)
                deleted.append(c.tag)
                continue
        dest = root / ROLLED_BACK / label
        dest.mkdir(parents=True, exist_ok=True)
        os.replace(c.path, dest / c.tag)
        ck.unpin(root, c.tag)
        moved.append(c.tag)
    for p in incomplete:
        if (ck.step_of(p.name) or 0) > to_step:
            with contextlib.suppress(OSError):
                ck.delete(root, p.name)
    return deleted, moved


@contextlib.contextmanager
def hold_update(optimizer: Any, scheduler: Any) -> Iterator[None]:
    """Within the block, the torch optimizer's and the LR scheduler's ``step`` do nothing.

    Wrap the boundary ``engine.step()`` in it to refuse one update while DeepSpeed does all its
    other work as usual on every rank: the ZeRO wrappers still reduce, clip and clear the gradients,
    copy their (unchanged) fp32 partitions back to the model and all-gather them; the engine still
    counts the micro and global steps. The innermost optimizer (the one handed to
    ``deepspeed.initialize``) is what every ZeRO stage calls, so parameters and Adam moments stay
    exactly as they were, and the scheduler does not advance: the step is as if the batch never
    existed (the same convention as DeepSpeed's own overflow skips), which the tests check bit for bit.
    """
    saved = [(obj, obj.__dict__.get("step")) for obj in (optimizer, scheduler) if obj is not None]

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    for obj, _ in saved:
        obj.step = noop
    try:
        yield
    finally:
        for obj, prev in saved:
            if prev is None:
                del obj.step
            else:
                obj.step = prev

"""Validation on held-out data: the fixed evaluation set, its scoring, and the trainer's live evaluator.

What makes the numbers trustworthy (docs/eval.md):
- The set is fixed: per source, ``eval.sequences`` windows of model.seq_length tokens, evenly spaced
  over the held-out documents that data preparation set aside (kit.data), cut into batches of
  ``eval.micro_batch_size`` sequences that never mix sources. Every evaluation, live or offline,
  scores the same batches.
- The numbers do not depend on the data-parallel size: batch b is scored by model replica b % dp
  (every tensor rank of the replica runs it: their collectives need them all; the first one writes
  the result), and each sequence's summed loss lands in its own slot of one float64 vector that is
  all-reduced (a sum of one value and zeros is exact). Per-source totals are then added in a fixed
  order on every rank. So DP 1, DP 2, ``kit eval`` of the checkpoint and of its Hugging Face export
  compute the same forward passes on the same batches and agree exactly. (Tensor parallelism splits
  the matrix products, so its numbers agree with ``kit eval``'s to rounding, as its training does.)
- Under a pipeline (``parallel.pipeline > 1``) every stage of the replica takes the same batches in
  the same order: it runs its own layers of the PipelineModule (kit.parallel.pipe.stage_forward) and
  sends the boundary activation to the next stage's rank at its tensor and data coordinates
  (torch.distributed send/recv); the last stage's first tensor rank scores the logits and writes
  them, the other ranks contribute zeros. Not ``PipelineEngine.eval_batch``: it would average over
  the data-parallel group, barrier the world and use the training micro-batch count and the engine's
  cached activation shapes and buffers. At tensor 1 the numbers equal ``kit eval``'s exactly.
- Training does not notice: the forward passes run under ``torch.no_grad()`` in eval mode on the
  engine's module (no engine call, no optimizer, no data sampler, no pipeline buffer or micro-batch
  counter), the RNG state is saved and restored, and the train/eval flag is put back. Training with
  and without evaluation is bit-identical (tested plain, at ZeRO 1-3, bf16, and at pipeline 2).
- The cost is bounded: the evaluator measures an evaluation against the training time of an interval;
  above ``eval.max_fraction`` it stretches the interval (doubling, on the grid of ``interval_steps``),
  and the ``eval`` event says so. The stretch is kept in the checkpoint manifest, so a resumed segment
  keeps the schedule.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kit.config import RunConfig
from kit.data import EOS_ID, HELDOUT, META
from kit.errors import DataError

EVAL_KIND = "eval"
MAX_STRETCH = 1024  # an interval is never stretched beyond 1024 x eval.interval_steps


# ------------------------------------------------------------------------------------------ the set


@dataclass(frozen=True, slots=True)
class EvalSource:
    name: str
    language: str
    windows: np.ndarray  # [sequences, seq_length] int64 token ids


@dataclass(frozen=True)
class EvalSet:
    """The sequences every evaluation scores, and the fixed batches they are scored in."""

    seq_length: int
    micro_batch: int
    sources: tuple[EvalSource, ...]
    notes: tuple[str, ...] = ()  # sources left out, and why
    batches: tuple[tuple[int, int, int], ...] = field(init=False)  # (source index, first row, end row)
    offsets: tuple[int, ...] = field(init=False)  # each source's first slot in the flat result vector

    def __post_init__(self) -> None:
        batches, offsets, at = [], [], 0
        for k, src in enumerate(self.sources):
            offsets.append(at)
            n = len(src.windows)
            batches += [(k, a, min(a + self.micro_batch, n)) for a in range(0, n, self.micro_batch)]
            at += n
        object.__setattr__(self, "batches", tuple(batches))
        object.__setattr__(self, "offsets", tuple(offsets))

    @property
    def sequences(self) -> int:
        return sum(len(s.windows) for s in self.sources)

    @property
    def tokens(self) -> int:
        """Predicted tokens per evaluation (each sequence predicts seq_length - 1)."""
        return self.sequences * (self.seq_length - 1)


def pick_windows(n_tokens: int, seq: int, k: int) -> np.ndarray:
    """Start offsets of up to ``k`` windows evenly spaced over a stream of ``n_tokens`` tokens."""
    windows = max(0, (n_tokens - 1) // seq)
    if windows <= k:
        return np.arange(windows) * seq
    return np.unique(np.linspace(0, windows - 1, k).round().astype(np.int64)) * seq


def _windows(tokens: np.ndarray, seq: int, k: int) -> np.ndarray:
    starts = pick_windows(len(tokens), seq, k)
    if not len(starts):
        return np.empty((0, seq), dtype=np.int64)
    return np.stack([np.asarray(tokens[s:s + seq], dtype=np.int64) for s in starts])


def load_eval_set(data_dir: str | Path, cfg: RunConfig) -> EvalSet | None:
    """The run's evaluation set from its prepared data; None when the data has no held-out split
    (prepared by a kit before held-out splits: the run trains as before, without evaluation)."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / META).read_text())
    if HELDOUT not in meta:
        return None
    seq = cfg.model.seq_length
    micro = cfg.eval.micro_batch_size or cfg.batch.micro_batch_size
    dtype = np.dtype(meta["dtype"])
    sources, notes = [], []
    for s in meta["sources"]:
        path = data_dir / f"{s['name']}.{HELDOUT}.tokens.bin"
        n = s[HELDOUT]["tokens"]
        if n - 1 < seq:
            notes.append(f"{s['name']}: {n} held-out tokens, fewer than one sequence of {seq}" if n else
                         f"{s['name']}: no held-out documents (it has {s['documents']})")
            continue
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
        sources.append(EvalSource(s["name"], s.get("language", ""), _windows(tokens, seq, cfg.eval.sequences)))
    return EvalSet(seq, micro, tuple(sources), tuple(notes))


def eval_set_from_texts(tok: Any, texts: dict[str, list[str]], seq: int, sequences: int, micro: int,
                        languages: dict[str, str] | None = None) -> EvalSet:
    """An evaluation set from raw documents (``kit eval --data FILE``), tokenized the way data
    preparation does (documents joined by </s>)."""
    sources = []
    for name, docs in texts.items():
        ids: list[int] = []
        for enc in tok.encode_batch(docs):
            ids += [*enc.ids, EOS_ID]
        w = _windows(np.asarray(ids, dtype=np.int64), seq, sequences)
        if not len(w):
            raise DataError(f"{name}: {len(ids)} tokens, fewer than one sequence of {seq}; give more text")
        sources.append(EvalSource(name, (languages or {}).get(name, ""), w))
    return EvalSet(seq, micro, tuple(sources))


# -------------------------------------------------------------------------------------- scoring


def score_batch(model: Any, x: Any) -> Any:
    """Summed next-token loss of each row of ``x`` (float64, shape [rows]), in fp32 from the logits.
    Every path (live, checkpoint, export) scores with this one function."""
    return row_losses(model(input_ids=x, use_cache=False).logits, x)


def row_losses(logits: Any, x: Any) -> Any:
    """Summed next-token loss of each row of ``x`` from its ``logits`` (float64, shape [rows]): the
    one loss every path uses (a plain model's logits, or a pipeline's last stage's)."""
    import torch
    import torch.nn.functional as F

    rows, cols = x.shape
    # Targets shifted left, the last position ignored (-100: a loss of exactly 0), so the logits are used
    # in place: no copy of a [rows, cols - 1, vocab] slice (the vocabulary makes it the largest tensor).
    targets = torch.cat([x[:, 1:], torch.full((rows, 1), -100, dtype=x.dtype, device=x.device)], dim=1)
    ce = F.cross_entropy(logits.float().reshape(rows * cols, -1), targets.view(-1), reduction="none")
    return ce.view(rows, cols).to(torch.float64).sum(dim=1)


def score_into(model: Any, es: EvalSet, out: Any, batches: Iterable[int]) -> None:
    """Score some of the set's batches into their slots of ``out`` (a float64 tensor, one slot per
    sequence); the caller owns no_grad, eval mode and the device."""
    import torch

    for b in batches:
        k, a, z = es.batches[b]
        x = torch.from_numpy(es.sources[k].windows[a:z]).to(out.device)
        at = es.offsets[k] + a
        out[at:at + (z - a)] = score_batch(model, x)


def score_stage_into(module: Any, es: EvalSet, out: Any, batches: Iterable[int], where: Placement,
                     hidden: int, dtype: Any) -> None:
    """Score some batches through a pipeline: this rank runs its stage's layers of the PipelineModule
    (kit.parallel.pipe.stage_forward) and passes the boundary activation (one tensor [rows, seq,
    hidden] in the engine's dtype: kit's pipeline layers pass one) to the same tensor rank and replica
    of the next stage with a point-to-point send; the last stage scores the logits into ``out``.
    Every stage of a replica takes the same batches in the same order, so the sends pair up. The
    caller owns no_grad, eval mode and the device."""
    import torch
    import torch.distributed as dist

    from kit.parallel.pipe import stage_forward

    first, last = where.stage == 0, where.stage == where.stages - 1
    for b in batches:
        k, a, z = es.batches[b]
        ids = torch.from_numpy(es.sources[k].windows[a:z]).to(out.device)
        if first:
            x = ids
        else:
            x = torch.empty((z - a, es.seq_length, hidden), dtype=dtype, device=out.device)
            dist.recv(x.view(torch.uint8), src=where.prev)  # as bytes: any dtype, bit for bit
        y = stage_forward(module, x)
        if last:
            at = es.offsets[k] + a
            out[at:at + (z - a)] = row_losses(y, ids)
        else:
            dist.send(y.contiguous().view(torch.uint8), dst=where.next)


def score_all(model: Any, es: EvalSet, device: Any = "cpu") -> list[float]:
    """Every sequence's summed loss, in one process (``kit eval``)."""
    import torch

    out = torch.zeros(es.sequences, dtype=torch.float64, device=device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            score_into(model, es, out, range(len(es.batches)))
    finally:
        model.train(was)
    return [float(v) for v in out.tolist()]


def summarize(es: EvalSet, sums: list[float]) -> dict[str, Any]:
    """Per-source loss (mean next-token loss), perplexity, tokens; totals added in a fixed order."""
    per = es.seq_length - 1
    sources: dict[str, Any] = {}
    for k, src in enumerate(es.sources):
        n = len(src.windows)
        rows = sums[es.offsets[k]:es.offsets[k] + n]
        loss = math.fsum(rows) / (n * per)
        sources[src.name] = {"language": src.language, "loss": loss, "ppl": _ppl(loss), "tokens": n * per,
                             "sequences": n}
    loss = math.fsum(sums) / max(1, es.tokens)
    return {"sources": sources, "loss": loss, "ppl": _ppl(loss), "tokens": es.tokens}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan


# ------------------------------------------------------------------------------------- alerting


@dataclass
class LossWatch:
    """Per-source validation loss against its best of the last ``window`` evaluations: an incident
    opens when it is more than ``margin`` above (one alert), and closes when it is back within it."""

    margin: float
    window: int
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    open: dict[str, int] = field(default_factory=dict)  # source -> step its incident opened

    def observe(self, step: int, losses: dict[str, float]) -> tuple[list[dict[str, Any]], list[str]]:
        """Fold one evaluation; returns (incidents that opened, sources whose incident closed)."""
        opened, closed = [], []
        for name, loss in losses.items():
            h = self.history.setdefault(name, [])
            best = min((v for s, v in h if s < step and math.isfinite(v)), default=None)
            above = best is not None and not loss <= best * (1 + self.margin)  # NaN counts as above
            if above and name not in self.open:
                self.open[name] = step
                best_step = min((s for s, v in h if v == best), default=step)
                opened.append({"source": name, "loss": loss, "best": best, "best_step": best_step,
                               "rise": loss / best - 1 if best else math.inf})
            elif not above and name in self.open:
                del self.open[name]
                closed.append(name)
            h.append((step, loss))
            del h[:-self.window]
        return opened, closed

    def rewind(self, step: int) -> list[tuple[str, int]]:
        """A rollback to ``step``: forget evaluations of the abandoned steps; returns the incidents
        (source, step opened) that opened after it, abandoned with them."""
        for h in self.history.values():
            h[:] = [(s, v) for s, v in h if s <= step]
        gone = [(k, s) for k, s in self.open.items() if s > step]
        self.open = {k: s for k, s in self.open.items() if s <= step}
        return gone

    def state(self) -> dict[str, Any]:
        return {"history": {k: [list(x) for x in v] for k, v in self.history.items()}, "open": dict(self.open)}

    def restore(self, state: dict[str, Any]) -> None:
        self.history = {k: [(int(s), float(v)) for s, v in h] for k, h in state.get("history", {}).items()}
        self.open = {k: int(s) for k, s in state.get("open", {}).items()}


def incident_id(source: str, opened: int) -> str:
    """One id per incident (the ledger's rule: escalations of one incident share it, another incident
    has its own): the source and the step its incident opened, so a resumed segment names it the same."""
    return f"eval/{source}/{opened}"


def needed_stretch(eval_s: float, step_s: float, interval: int, max_fraction: float) -> int:
    """The smallest power-of-two multiple of ``interval`` whose training time bounds ``eval_s`` to
    ``max_fraction`` of it (1 when it fits already, or when ``max_fraction`` is 0: no bound)."""
    if not eval_s > 0 or not step_s > 0 or not max_fraction > 0:
        return 1
    need = eval_s / (max_fraction * step_s * interval)
    k = 1
    while k < need and k < MAX_STRETCH:
        k *= 2
    return k


# ------------------------------------------------------------------------------------ the trainer


@dataclass(frozen=True, slots=True)
class Placement:
    """Where this rank scores: its model replica (data-parallel index) among ``replicas``; ``writes``:
    it is the one rank of its replica whose results count (the first tensor rank of the last stage:
    the tensor ranks of a stage compute the same logits); ``rank`` and ``world`` place its timings in
    the all-reduce over every rank. Under a pipeline: its ``stage`` of ``stages``, and the ranks of
    the previous and next stage at its tensor and data coordinates (-1: none), its send partners."""

    replica: int = 0
    replicas: int = 1
    writes: bool = True
    rank: int = 0
    world: int = 1
    stage: int = 0
    stages: int = 1
    prev: int = -1
    next: int = -1

    @property
    def pipelined(self) -> bool:
        return self.stages > 1

    @classmethod
    def of(cls, mesh: Any, rank: int, world: int) -> Placement:
        """From a kit.parallel.mesh.Mesh (its coordinates and layout)."""
        c, layout = mesh.coords, mesh.layout
        last = c.pipeline == layout.pipeline - 1
        prev = layout.rank(c.tensor, c.pipeline - 1, c.data) if c.pipeline > 0 else -1
        nxt = layout.rank(c.tensor, c.pipeline + 1, c.data) if not last else -1
        return cls(c.data, layout.data, c.tensor == 0 and last, rank, world, c.pipeline, layout.pipeline, prev, nxt)


class Evaluator:
    """The trainer's live validation (one call per step: :meth:`after_step`). Collective: every rank
    calls it at every step and takes the same branches (the step, the stretch and ``hurry`` agree)."""

    def __init__(self, cfg: RunConfig, es: EvalSet | None, engine: Any, where: Placement, ledger: Any,
                 sink: Callable[[], Any], log: Callable[[str], None] = print,
                 phase: Callable[[str], None] = lambda what: None) -> None:
        self.cfg = cfg.eval
        self.es = es
        self.engine = engine
        self.where = where
        self.ledger = ledger
        self.sink = sink
        self.log = log
        self.phase = phase  # told "eval" before an evaluation: not a step, for the hang watchdog
        self.stretch = 1
        self.watch = LossWatch(cfg.eval.alert_margin, cfg.eval.alert_window)
        self._times: list[float] = []  # step seconds since the last evaluation (this rank)
        self._last_step = -1
        self.active = bool(cfg.eval.enabled and es is not None and es.sources)

    @classmethod
    def build(cls, cfg: RunConfig, data_dir: Path, engine: Any, where: Placement, ledger: Any,
              sink: Callable[[], Any], log: Callable[[str], None], resumed: dict[str, Any] | None,
              phase: Callable[[str], None] = lambda what: None) -> Evaluator:
        """Load the set (every rank), restore the schedule and alert state of the resumed checkpoint."""
        es = load_eval_set(data_dir, cfg) if cfg.eval.enabled else None
        ev = cls(cfg, es, engine, where, ledger, sink, log, phase=phase)
        dp = where.replicas
        if cfg.eval.enabled and es is None:
            log(f"eval: {data_dir} was prepared before held-out splits existed: no validation for this run")
        elif es is not None:
            for note in es.notes:
                log(f"eval: not evaluated: {note}")
            log(f"eval: {len(es.sources)} sources, {es.sequences} sequences ({es.tokens:,} tokens) every "
                f"{cfg.eval.interval_steps} steps, in {len(es.batches)} batches over {dp} data-parallel rank(s)"
                + (f" through {where.stages} pipeline stages" if where.pipelined else ""))
        if resumed:
            ev.restore(resumed)
        return ev

    @property
    def every(self) -> int:
        return self.cfg.interval_steps * self.stretch

    def after_step(self, step: int, seconds: float, hurry: bool = False) -> dict[str, Any] | None:
        """After optimizer step ``step`` took ``seconds``: evaluate when it is due. ``hurry`` (a
        signal or the deadline, all-reduced) skips it: saving before the allocation ends comes first."""
        if step <= self._last_step:  # a rollback replays steps: their old evaluations are abandoned
            for name, opened in self.watch.rewind(step - 1):  # ...and so are incidents they opened (kit.alerts)
                self.ledger.emit("alert_cleared", incident=incident_id(name, opened), condition="eval_loss",
                                 step=step - 1, message=f"validation loss of {name}: the steps that raised it were "
                                 "rolled back")
        self._last_step = step
        if not self.active:
            return None
        self._times.append(seconds)
        del self._times[:-self.every]  # the interval's steps are all the cost bound needs
        if step % self.every:
            return None
        if hurry:
            self.log(f"eval: skipped at step {step} (the segment is ending)")
            return None
        self.phase("eval")
        return self.evaluate(step)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Score the set on every rank, reduce, write the event (rank 0); training state untouched."""
        import torch
        import torch.distributed as dist

        assert self.es is not None
        es, eng, where = self.es, self.engine, self.where
        t0 = time.perf_counter()
        module = eng.module
        was_training = module.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        vec = torch.zeros(es.sequences + 2 * where.world, dtype=torch.float64, device=eng.device)
        try:
            module.eval()
            batches = range(where.replica, len(es.batches), where.replicas)
            with torch.no_grad():
                if where.pipelined:  # the stage's own layers, activations sent on: no engine call (see above)
                    score_stage_into(module, es, vec, batches, where, module.config.hidden_size,
                                     next(module.parameters()).dtype)
                else:
                    score_into(module, es, vec, batches)
            if not where.writes:  # another rank of this replica writes the numbers (or none: an earlier stage)
                vec.zero_()
        finally:
            module.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        if vec.is_cuda:
            torch.cuda.synchronize()
        mine = time.perf_counter() - t0
        recent = self._times[-max(1, self.every):]
        vec[es.sequences + 2 * where.rank] = mine
        vec[es.sequences + 2 * where.rank + 1] = sum(recent) / len(recent) if recent else 0.0  # 0: unknown
        if where.world > 1:
            dist.all_reduce(vec)
        values = vec.tolist()
        sums, timing = values[:es.sequences], values[es.sequences:]
        eval_s, step_s = max(timing[0::2]), max(timing[1::2])  # the slowest rank decides, alike on all
        self._times = []
        return self._report(step, summarize(es, sums), eval_s, step_s, time.perf_counter() - t0)

    def _report(self, step: int, res: dict[str, Any], eval_s: float, step_s: float, wall: float) -> dict[str, Any]:
        interval = self.every
        fraction = eval_s / (step_s * interval) if step_s > 0 else None  # None: no step timed since the last one
        stretch = needed_stretch(eval_s, step_s, self.cfg.interval_steps, self.cfg.max_fraction) if step_s > 0 \
            else self.stretch  # no step timed since the last evaluation: nothing to judge by
        note = ""
        if stretch != self.stretch:
            note = (f"evaluation took {eval_s:.3g}s = {fraction or 0:.1%} of {interval} steps of training "
                    f"(eval.max_fraction {self.cfg.max_fraction:.0%}): interval now "
                    f"{self.cfg.interval_steps * stretch} steps")
            self.log(f"eval: {note}")
        self.stretch = stretch
        was_open = dict(self.watch.open)
        opened, closed = self.watch.observe(step, {k: v["loss"] for k, v in res["sources"].items()})
        event = {"step": step, "by": "live", **res, "seconds": round(wall, 4), "eval_s": round(eval_s, 4),
                 "step_s": step_s, "fraction": fraction, "interval_steps": self.every, "stretch": stretch,
                 "dp": self.where.replicas, "incidents": sorted(self.watch.open), "recovered": closed}
        if note:
            event["note"] = note
        self.ledger.emit(EVAL_KIND, **event)
        for inc in opened:
            self.ledger.alert("warning", f"validation loss of {inc['source']} is {inc['loss']:.4g} at step {step}, "
                              f"{inc['rise']:+.1%} over its best of the last {self.cfg.alert_window} evaluations "
                              f"({inc['best']:.4g} at step {inc['best_step']}): lasting damage? see "
                              "`kit spikes` and `kit eval`", step=step, source=inc["source"], condition="eval_loss",
                              incident=incident_id(inc["source"], step))
        for name in closed:  # back within the margin: the incident is over (kit.alerts: it no longer degrades the run)
            self.ledger.emit("alert_cleared", incident=incident_id(name, was_open[name]), condition="eval_loss",
                             step=step, message=f"validation loss of {name} is back within eval.alert_margin of its "
                             "recent best")
        sink = self.sink()
        if sink is not None:
            scalars: dict[str, float | None] = {"eval/all/loss": res["loss"], "perf/eval_seconds": wall,
                                                "perf/eval_fraction": fraction}
            for name, v in res["sources"].items():
                scalars[f"eval/{name}/loss"] = v["loss"]
                scalars[f"eval/{name}/ppl"] = v["ppl"]
            sink.scalars(step, scalars)
        self.log(f"eval at step {step}: loss {res['loss']:.4f} ("
                 + ", ".join(f"{k} {v['loss']:.3f}" for k, v in res["sources"].items()) + f") in {wall:.2f}s")
        return event

    # --------------------------------------------------------------------------- checkpoint state
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (its manifest's kit.eval): the stretch and the alert history."""
        return {"stretch": self.stretch, **self.watch.state()}

    def restore(self, state: dict[str, Any]) -> None:
        self.stretch = max(1, int(state.get("stretch", 1)))
        self.watch.restore(state)

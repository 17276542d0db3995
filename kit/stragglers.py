"""Per-rank step timings, gathered every ``health.straggler_interval`` steps, and the ranks that lag.

BLOOM found a GPU 5% slower than the rest only by bisecting nodes by hand. In synchronous data
parallelism every rank's *step* takes the same wall time (the collectives wait for the slowest), so
step time cannot name the slow rank. What can: the part of the step that contains no collective.
At ZeRO stages 0-2 that is the forward pass, so each rank times its forwards (module hooks), its
backwards and optimizer steps (thin wrappers on the engine's methods: DeepSpeed has no hook for them),
and the rest of the step (data, kit's flags all-reduce: mostly waiting for the slowest rank). On a
GPU the spans are timed with CUDA events (GPU time, not the time to enqueue the kernels).

Every N steps (a *window*) one ``all_gather`` of a 5-number tensor brings all ranks' sums to every
rank (no collective is added to the other steps). A rank's *slowdown* in a window is its forward time
per step over the median of the *other* ranks' (leave-one-out, so two ranks work too), minus one.

Whether a rank is a straggler is a statistical call (:class:`StragglerDetector`), because timings are
noisy (11.6% window-to-window jitter on a 2-core CPU demo, against a 5% bar) and one slow window proves
nothing: over the last ``health.straggler_windows`` windows, a rank must be slower than
``health.straggler_threshold`` in at least ``health.straggler_persist`` of them, and its mean slowdown
must exceed the bar ``max(threshold, k x noise / sqrt(windows))`` (``k`` = ``health.straggler_noise_k``).
The noise is the run's own: the window-to-window jitter of the ranks' slowdowns, from successive
differences (a rank that is *persistently* slow shifts its level, not its differences, so it cannot
hide itself by inflating the noise, as a spread across ranks or over time would let it).

Global rank 0 writes a ``rank_timings`` event every window (with the bar and the noise) and a
``straggler`` event for each flagged rank, naming its node and GPU. Alerts follow kit.alerts: one
incident per slow rank, opened when it is flagged in two windows in a row, escalated from warning to
error when it stays flagged for another ``health.straggler_windows`` windows, cleared after two
windows unflagged.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kit.alerts import Incidents
from kit.faults import fault_point
from kit.ledger import LedgerWriter, NullLedger, hostname
from kit.parallel.layout import Coords

FIELDS = ("steps", "step_s", "fwd_s", "bwd_s", "opt_s")


@dataclass(frozen=True, slots=True)
class RankInfo:
    """Where a rank runs: what a report needs to name it (node, GPU)."""

    rank: int
    host: str
    local_rank: int
    gpu: int  # CUDA device index, -1 without a GPU
    pid: int
    coords: Coords | None = None  # (tensor, pipeline, data) at the run's layout (kit.parallel.layout)

    def coord_fields(self) -> dict[str, Any]:
        """``tensor``, ``pipeline``, ``data`` for an event or alert (empty when the layout is unknown)."""
        return self.coords.to_dict() if self.coords is not None else {}

    def where(self) -> str:
        """``node, GPU 3, tensor 1, pipeline 0, data 1``: everything that names this rank's place."""
        gpu = f"GPU {self.gpu}" if self.gpu >= 0 else f"local rank {self.local_rank}"
        return ", ".join([self.host, gpu, *([str(self.coords)] if self.coords is not None else [])])


def gather_ranks(rank: int, local_rank: int, world: int) -> tuple[list[RankInfo], str]:
    """Every rank's RankInfo, and a stamp all ranks agree on (rank 0's clock): ONE collective, at setup."""
    import torch

    gpu = torch.cuda.current_device() if torch.cuda.is_available() else -1
    me = (rank, hostname(), local_rank, gpu, os.getpid(), time.time())
    rows: list[Any] = [me]
    if world > 1:
        import torch.distributed as dist

        rows = [None] * world
        dist.all_gather_object(rows, me)
    stamp = datetime.fromtimestamp(rows[0][5], tz=UTC).strftime("%Y%m%dT%H%M%S")
    return [RankInfo(*r[:5]) for r in rows], stamp


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return 0.0 if not n else (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)


def peer_groups(ranks: list[RankInfo]) -> list[list[int]] | None:
    """Whom each rank's forward time is compared with: the other ranks of its own pipeline stage.

    Under a pipeline, stages do different work (the first holds the embedding, the last the head and
    the loss): comparing across stages would call a whole stage a straggler. Ranks of one stage (its
    tensor ranks and data-parallel replicas) do the same work. None (compare with every other rank)
    without a pipeline, when the layout is unknown, or when a stage has a single rank (nothing to
    compare it with but other stages)."""
    stages = [r.coords.pipeline if r.coords is not None else None for r in ranks]
    if None in stages or len(set(stages)) < 2:
        return None
    groups = [[j for j, s in enumerate(stages) if s == stages[i] and j != i] for i in range(len(ranks))]
    return groups if all(groups) else None


def slowdowns(per_step: list[dict[str, float]], key: str = "fwd_s",
              peers: list[list[int]] | None = None) -> list[float]:
    """Each rank's ``key`` over the median of the other ranks' (of its ``peers[rank]`` when given:
    :func:`peer_groups`), minus one (0 when nothing was measured)."""
    out = []
    for r, row in enumerate(per_step):
        ref = median([x[key] for i, x in enumerate(per_step) if i != r and (peers is None or i in peers[r])])
        out.append(row[key] / ref - 1.0 if ref > 0 else 0.0)
    return out


def find_stragglers(per_step: list[dict[str, float]], threshold: float, key: str = "fwd_s",
                    peers: list[list[int]] | None = None) -> list[tuple[int, float]]:
    """(rank, slowdown) for ranks whose ``key`` exceeds the median of the other ranks (of its peers) by
    > threshold in this one window (no statistics: :class:`StragglerDetector` decides)."""
    return [(r, round(s, 4)) for r, s in enumerate(slowdowns(per_step, key, peers)) if s > threshold]


# MAD of successive differences -> standard deviation of the values: 1.4826 (normal MAD) / sqrt(2)
DIFF_MAD_TO_SD = 1.4826 / 2**0.5


@dataclass
class Verdict:
    """One window's call: every rank's slowdown, the bar the mean of its recent windows was held to (a
    slowdown), the noise behind the bar (a standard deviation of log-slowdowns, ~ a fraction), the ranks
    flagged."""

    slowdowns: list[float]
    bar: float
    noise: float
    flagged: list[int]


@dataclass
class StragglerDetector:
    """Flags ranks that are persistently slower than the others, by more than the threshold and by more
    than the run's own timing noise can explain.

    Slowdowns are taken as logarithms (``l = log(fwd / median of the others)``: a 3x slower rank is +1.1
    whatever the noise, and timing jitter is multiplicative). Over the last ``windows`` windows a rank
    is flagged when both hold:

    - persistence: ``l > log(1 + threshold)`` in at least ``persist`` of them;
    - size: their mean exceeds ``max(log(1 + threshold), k * noise / sqrt(windows))``, i.e. it is more than
      ``k`` standard errors of the run's noise away from "as fast as the others".

    ``noise`` is the window-to-window standard deviation of the log-slowdowns, from the median of the
    absolute successive differences of every rank's series over the last ``history`` windows: a rank that
    is persistently slow shifts its level, not its differences, so it cannot hide by inflating the bar.
    Nothing is flagged before ``windows`` windows have been seen (the noise is not known yet), so a rank
    slow from the start is flagged at the ``windows``-th window, one that becomes slow within ``windows``
    windows of it."""

    threshold: float
    k: float = 5.0
    windows: int = 5
    persist: int = 3
    history: int = 20
    _hist: deque[list[float]] = field(default_factory=deque)

    def update(self, per_step: list[dict[str, float]], peers: list[list[int]] | None = None) -> Verdict:
        s = slowdowns(per_step, peers=peers)
        self._hist.append([math.log1p(x) if x > -1 else 0.0 for x in s])
        while len(self._hist) > max(self.history, self.windows):
            self._hist.popleft()
        noise = self.noise()
        floor = math.log1p(self.threshold)
        bar = max(floor, self.k * noise / math.sqrt(self.windows))
        recent = list(self._hist)[-self.windows:]
        flagged = []
        if len(recent) >= self.windows:
            for r in range(len(s)):
                ls = [w[r] for w in recent if r < len(w)]
                if sum(x > floor for x in ls) >= self.persist and sum(ls) / len(ls) > bar:
                    flagged.append(r)
        return Verdict(s, math.expm1(bar), noise, flagged)

    def noise(self) -> float:
        """Window-to-window standard deviation of the log-slowdowns (MAD of successive differences)."""
        h = list(self._hist)[-self.history:]
        diffs = [abs(b[r] - a[r]) for a, b in itertools.pairwise(h) for r in range(min(len(a), len(b)))]
        return median(diffs) * DIFF_MAD_TO_SD if diffs else 0.0


class StepTimer:
    """Times forward, backward and optimizer spans of one rank and gathers them every N steps."""

    def __init__(self, engine: Any, rank: int, ranks: list[RankInfo], interval: int, threshold: float,
                 ledger: LedgerWriter | NullLedger, detector: StragglerDetector | None = None,
                 incidents: Incidents | None = None) -> None:
        import torch

        self.engine = engine
        self.rank = rank
        self.ranks = ranks
        self.interval = interval
        self.threshold = threshold
        self.ledger = ledger
        self.peers = peer_groups(ranks)  # under a pipeline: compared within the stage
        self.detector = detector or StragglerDetector(threshold)
        w = self.detector.windows
        # opened after 2 flagged windows in a row (a lone flagged window is the likeliest false alarm),
        # escalated after `windows` more, cleared after 2 unflagged
        self.incidents = incidents or Incidents(ledger, f"{ledger.src or 'train'}/straggler", open_after=2,
                                                clear_after=2, escalate_after=w)
        self.cuda = engine.device.type == "cuda"
        self.step = 0  # steps completed (the trainer's count), for fault points
        self.sums = dict.fromkeys(FIELDS, 0.0)
        self._pending: list[tuple[str, Any, Any]] = []  # CUDA event pairs, summed at gather time
        self._open: dict[str, Any] = {}
        self._torch = torch
        self._hooks = [engine.module.register_forward_pre_hook(lambda *_: self._start("fwd_s")),
                       engine.module.register_forward_hook(lambda *_: self._end("fwd_s"))]
        # DeepSpeed has no hooks around backward() and step(): wrap the bound methods of this one engine
        # (instance attributes shadowing the class's methods; detach() deletes them).
        engine.backward = self._wrap(engine.backward, "bwd_s")
        engine.step = self._wrap(engine.step, "opt_s")

    def detach(self) -> None:
        """Remove the hooks and wrappers (the engine is as DeepSpeed made it)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for name in ("backward", "step"):
            self.engine.__dict__.pop(name, None)

    def _wrap(self, fn: Any, key: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._start(key)
            try:
                return fn(*args, **kwargs)
            finally:
                self._end(key)

        return timed

    def _mark(self) -> Any:
        if self.cuda:
            e = self._torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, key: str) -> None:
        self._open[key] = self._mark()
        if key == "fwd_s":
            fault_point("step.forward", self.step + 1, self.rank)  # tests slow one rank's forward down here

    def _end(self, key: str) -> None:
        a, b = self._open.pop(key, None), self._mark()
        if a is None:
            return
        if self.cuda:
            self._pending.append((key, a, b))
        else:
            self.sums[key] += b - a

    def after_step(self, step: int, dt: float) -> list[tuple[int, float]] | None:
        """Count the step; every ``interval`` steps gather (a collective: all ranks call this at the same
        steps). Returns the stragglers found at a gather, else None."""
        self.step = step
        self.sums["steps"] += 1
        self.sums["step_s"] += dt
        if not self.interval or step % self.interval:
            return None
        return self.gather(step)

    def _flush_cuda(self) -> None:
        if self._pending:
            self._pending[-1][2].synchronize()
            for key, a, b in self._pending:
                self.sums[key] += a.elapsed_time(b) / 1000.0
            self._pending.clear()

    def gather(self, step: int) -> list[tuple[int, float]]:
        import torch.distributed as dist

        torch = self._torch
        self._flush_cuda()
        mine = torch.tensor([self.sums[k] for k in FIELDS], dtype=torch.float64, device=self.engine.device)
        world = len(self.ranks)
        rows = [mine]
        if world > 1:
            rows = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(rows, mine)
        self.sums = dict.fromkeys(FIELDS, 0.0)
        per_step = []
        for row in rows:
            vals = dict(zip(FIELDS, row.cpu().tolist(), strict=True))
            n = max(vals.pop("steps"), 1.0)
            d = {k: v / n for k, v in vals.items()}
            d["other_s"] = max(0.0, d["step_s"] - d["fwd_s"] - d["bwd_s"] - d["opt_s"])
            per_step.append(d)
        verdict = self.detector.update(per_step, self.peers)  # the same on every rank (same gathered numbers)
        found = [(r, round(verdict.slowdowns[r], 4)) for r in verdict.flagged]
        if self.rank == 0:
            self._report(step, per_step, verdict)
        return found

    def _report(self, step: int, per_step: list[dict[str, float]], v: Verdict) -> None:
        self.ledger.emit("rank_timings", step=step, bar=round(v.bar, 4), noise=round(v.noise, 4), ranks=[
            {"rank": i, "host": self.ranks[i].host, "gpu": self.ranks[i].gpu, "slowdown": round(v.slowdowns[i], 4),
             **{k: round(x, 6) for k, x in row.items()}} for i, row in enumerate(per_step)])
        for r, info in enumerate(self.ranks):
            slow = v.slowdowns[r] if r < len(v.slowdowns) else 0.0
            where = info.where()  # node, GPU, (tensor, pipeline, data) at a layout
            of = (f"the other ranks of pipeline stage {info.coords.pipeline}" if self.peers and info.coords
                  else "the other ranks")
            peers = self.peers[r] if self.peers else [i for i in range(len(per_step)) if i != r]
            flagged = r in v.flagged
            what = self.incidents.observe(
                f"r{r}", flagged, "warning",
                f"straggler: rank {r} ({where}) is {slow:.1%} slower than {of}' median in "
                f"forward (bar {v.bar:.1%}: {self.detector.persist} of the last {self.detector.windows} windows; "
                f"step {step})" if flagged else f"straggler: rank {r} ({where}) is back within "
                f"{v.bar:.1%} of the others (step {step})",
                escalate_to="error", condition="straggler", rank=r, node=info.host, gpu=info.gpu, step=step,
                **info.coord_fields())
            if flagged:
                inc = self.incidents.open.get(f"r{r}")
                self.ledger.emit("straggler", rank=r, slowdown=round(slow, 4), step=step, node=info.host,
                                 gpu=info.gpu, local_rank=info.local_rank, fwd_s=round(per_step[r]["fwd_s"], 6),
                                 median_fwd_s=round(median([per_step[i]["fwd_s"] for i in peers]), 6),
                                 bar=round(v.bar, 4), noise=round(v.noise, 4), incident=inc.id if inc else "",
                                 state=what or "open", **info.coord_fields())

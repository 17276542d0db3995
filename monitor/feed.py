"""One run's feed: the model, the readers that fill it, and the immutable snapshots the UI renders.

A feed is driven by one background thread (the app's ``@work(thread=True)`` worker, or ``--once``
directly): ``open()`` reads the whole history at once through the ledger's index (kit.ledger.scan:
well under a second for a million steps), then each ``work()`` call does one bounded unit (a live
poll, a replay slice, a Slurm query every 30 s) and says whether anything changed.
``snapshot()`` copies out what the screen needs, downsampled to ``MAX_POINTS`` per curve, so the UI
thread never touches the model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kit.ledger import Follower, ReadStats, event_time, merged
from kit.ledger.scan import bulk_read, scan
from kit.run import queue as slurm
from kit.run.chainstate import ChainState, load_state
from kit.run.goodput import Account, Inputs, Tracker, account, recipe_plan
from kit.run.gpus import GpuHealth, worst_first
from kit.run.model import Alert, Ckpt, RunModel, Segment
from kit.run.summary import query_for, recipe_facts, summarize
from kit.rundir import RunDir

WINDOWS: dict[str, float] = {"hour": 3600.0, "day": 86400.0, "run": math.inf}
CURVES = ("loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s", "tflops", "mfu")
MAX_POINTS = 600
MAX_GAP_S = 1.0  # replay: idle gaps longer than this (after the speed-up) are cut to it
QUEUE_PERIOD_S = 30.0  # ask Slurm (and re-read chain.json) at most this often
GOODPUT_PERIOD_S = 30.0  # redo the goodput account at most this often (a million steps: a fraction of a second)
GOODPUT_NEWEST = 30  # segments, days and restarts of the account a snapshot carries


@dataclass(frozen=True)
class Snapshot:
    """What the screen shows of one run at one moment; never mutated after it is made."""

    name: str
    path: str
    now: float
    version: int
    summary: dict[str, Any]
    curves: dict[str, dict[str, tuple[list[int], list[float]]]]  # window -> metric -> (steps, values)
    spikes: list[tuple[int, float, float]]
    ckpts: list[Ckpt]
    alerts: list[Alert]
    health: list[tuple[str, GpuHealth, bool]]  # (node, gpu, flagged) worst first
    nvml_absent: dict[str, str]
    segments: list[Segment]
    control_acks: list[tuple[float, str, int | None]]
    loading: str
    replay: str
    goodput: dict[str, Any] | None = None  # kit.run.goodput.Account.to_dict(GOODPUT_NEWEST): the goodput tab


def thin(xs: list[int], ys: list[float], n: int = MAX_POINTS) -> tuple[list[int], list[float]]:
    """At most ``n`` points, keeping the last one (the one the operator looks at)."""
    if len(xs) <= n:
        return xs, ys
    k = math.ceil(len(xs) / n)
    return xs[-1::-k][::-1], ys[-1::-k][::-1]


class Feed:
    def __init__(self, run_dir: str | Path, name: str = "", clock: Callable[[], float] = time.time,
                 use_slurm: bool = True, replay_speed: float | None = None) -> None:
        self.rd = RunDir(run_dir)
        self.name = name or self.rd.path.name
        self.clock = clock
        self.use_slurm = use_slurm and replay_speed is None
        self.replay_speed = replay_speed
        self.stats = ReadStats()
        self.model = RunModel(self.name, str(self.rd.path), reader=self.stats)
        self.live: Follower | None = None
        self.queue: slurm.QueueInfo | None = None
        self.chain = ChainState()
        self.time_limit_s: float | None = None
        self._queue_at = -math.inf
        self._replay: Iterator[dict[str, Any]] | None = None
        self._peek: dict[str, Any] | None = None
        self._vnow = 0.0
        self._real = 0.0
        self.replay_done = False
        self.live_more = False
        # The goodput account (kit.run.goodput) needs every step event, which the model does not keep:
        # a Tracker keeps their columns, and the account is redone every goodput_period_s.
        self.tracker = Tracker()
        self.account: Account | None = None
        self.goodput_period_s = GOODPUT_PERIOD_S
        self._goodput_at = -math.inf
        self._goodput_of: tuple[Any, ...] = ()  # what the account was made from (redone only when it moved)
        self.interval_steps: int | None = None

    # -------------------------------------------------------------------------------- driving
    def open(self) -> None:
        self.time_limit_s = recipe_facts(self.rd, self.model)
        _, self.interval_steps = recipe_plan(self.rd)
        if self.replay_speed is not None:
            self._replay = merged(self.rd.path, self.stats)
            self._peek = next(self._replay, None)
            self._vnow = event_time(self._peek) if self._peek else 0.0
            self._real = time.monotonic()
            return
        with bulk_read():  # the whole history in a few big arrays, once (kit.ledger.scan.bulk_read)
            history = scan(self.rd.path, self.stats)
            self.model.load_scan(history)
            self.model.reader = self.stats
            self.live = Follower(self.rd.ledger, self.stats, history.cursors)
            self.tracker = Tracker(Inputs.from_scan(history))
            del history  # its step records (120 MB a million steps): the model and the tracker have what they need
            self.chain = load_state(self.rd)
            self.update_goodput()

    def update_goodput(self) -> bool:
        """Redo the account from what the tracker holds (the chain and Slurm's history as last read), when
        any of them changed since the last one; True when it was redone."""
        self._goodput_at = time.monotonic()
        q = self.queue
        of = (self.tracker.added, self.chain, q.history if q else ())
        if of == self._goodput_of:
            return False
        self._goodput_of = of
        self.account = account(self.tracker.inputs(), self.chain, q.history if q else (),
                               interval_steps=self.interval_steps, time_limit_s=self.time_limit_s)
        return True

    def now(self) -> float:
        return self._vnow if self.replay_speed is not None else self.clock()

    def work(self) -> bool:
        """One bounded unit of reading; True when the model changed."""
        if self.replay_speed is not None:
            return self._replay_slice()
        assert self.live is not None
        before = self.model.version
        events, self.live_more = self.live.poll()
        self.model.fold_all(events)
        self.tracker.add(events)
        changed = self.model.version != before
        if self.clock() - self._queue_at >= QUEUE_PERIOD_S:
            self._queue_at = self.clock()
            chain = load_state(self.rd)
            changed |= chain != self.chain
            self.chain = chain
            if self.use_slurm:
                q = query_for(self.model, chain)
                changed |= q != self.queue
                self.queue = q
        if time.monotonic() - self._goodput_at >= self.goodput_period_s:
            changed |= self.update_goodput()
        return changed

    @property
    def busy(self) -> bool:
        """More to read right now: the follower thread should not sleep."""
        return self.live_more

    def _replay_slice(self) -> bool:
        assert self._replay is not None and self.replay_speed is not None
        real = time.monotonic()
        self._vnow += (real - self._real) * self.replay_speed
        self._real = real
        if self._peek is None:
            self.replay_done = True
            return False
        if event_time(self._peek) - self._vnow > MAX_GAP_S * self.replay_speed:
            self._vnow = event_time(self._peek)
        n = 0
        while self._peek is not None and event_time(self._peek) <= self._vnow and n < 50_000:
            self.model.fold(self._peek)
            self.tracker.add((self._peek,))
            self._peek = next(self._replay, None)
            n += 1
        self.model.reader = self.stats
        if n and time.monotonic() - self._goodput_at >= self.goodput_period_s:
            self.update_goodput()
        return n > 0

    # ------------------------------------------------------------------------------- snapshot
    def snapshot(self) -> Snapshot:
        m, now = self.model, self.now()
        end = m.last_t if m.last_t is not None else now
        curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        for win, span in WINDOWS.items():
            since = end - span if math.isfinite(span) else -math.inf
            curves[win] = {k: thin(*m.curves.window(k, since)) for k in CURVES}
        flagged = {str(s.get("node") or "") for s in m.stragglers} | set(m.excluded)
        for h in m.hangs:  # the watchdog names the nodes whose ranks' stacks differ
            nodes = h.get("suspect_nodes")
            if isinstance(nodes, list):
                flagged.update(n for n in nodes if isinstance(n, str))
        loading = ""
        replay = ""
        if self.replay_speed is not None:
            replay = f"replay x{self.replay_speed:g}" + (" (end)" if self.replay_done else "")
        return Snapshot(
            name=self.name, path=str(self.rd.path), now=now, version=m.version,
            summary=summarize(m, now, self.queue, self.chain, self.time_limit_s,
                              goodput=self.account.block() if self.account else None).to_dict(),
            curves=curves, spikes=list(m.spikes)[-200:],
            ckpts=[replace(c) for c in reversed(m.ckpts.values())][:40],
            alerts=[replace(a) for a in m.alerts_newest()[:200]],
            health=[(n.node, g, n.node in flagged) for n, g in worst_first(m.health, flagged)][:1024],
            nvml_absent=dict(m.nvml_absent), segments=[replace(s) for s in m.segments.values()][-30:],
            control_acks=list(m.control_acks), loading=loading, replay=replay,
            goodput=self.account.to_dict(GOODPUT_NEWEST) if self.account else None,
        )


"""The Textual app: one follower thread per run, snapshots in, panels out.

Threads: each run's :class:`~kit.monitor.feed.Feed` is driven by its own ``@work(thread=True)``
worker; the worker posts :class:`SnapshotReady` messages (floods merge: a newer snapshot of the same
run replaces one still queued). The UI thread only renders snapshots and handles keys. Actions that
change the run (stop, save-now) write control files through :meth:`kit.rundir.RunDir.request` after a
confirmation; alert acknowledgements go into the monitor's own ledger file. ``--read-only`` turns
all three off. :func:`make_app` builds the app for the CLI and the tests alike.
"""

from __future__ import annotations

import getpass
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Header, OptionList, Static, TabbedContent, TabPane
from textual.widgets.option_list import Option

from kit.ledger import LedgerWriter, hostname, writer_name
from kit.monitor.feed import WINDOWS, Feed, Snapshot
from kit.monitor.widgets import (
    STATUS_STYLE,
    AlertTable,
    ChainPanel,
    CkptTable,
    ConfirmScreen,
    CurvePlot,
    GoodputPanel,
    HealthTable,
    HelpScreen,
    SegmentTable,
    clock_text,
    layout_text,
)
from kit.rundir import SAVE_NOW, STOP, RunDir

POLL_S = 0.25  # follower period: an appended event is on screen well within a second
POST_S = 0.2  # at most this often a snapshot per run while data streams in
TICK_S = 5.0  # a snapshot at least this often anyway (ages, Slurm), even when nothing was appended
LOSS_METRICS = ("loss", "grad_norm", "lr")
RATE_METRICS = ("tokens_per_s", "samples_per_s", "tflops", "mfu")
TABS = ("overview", "gpus", "checkpoints", "alerts", "segments", "goodput")


@dataclass
class SnapshotReady(Message):
    """A follower thread's latest picture of run ``index``."""

    index: int
    snapshot: Snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotReady) and message.index == self.index


class MonitorApp(App[int]):
    CSS_PATH = "monitor.tcss"
    TITLE = "kit monitor"
    BINDINGS: ClassVar[list[BindingType]] = [
        ("q", "quit", "quit"),
        ("question_mark", "help", "help"),
        ("w", "window", "window"),
        ("l", "cycle_loss", "loss/grad/lr"),
        ("t", "cycle_rate", "throughput"),
        ("n", "run(1)", "next run"),
        ("p", "run(-1)", "prev run"),
        ("a", "ack", "ack alert"),
        ("s", "save_now", "save now"),
        ("x", "stop_run", "stop run"),
        *[(str(i + 1), f"tab('{tab}')", tab) for i, tab in enumerate(TABS)],
    ]

    def __init__(self, feeds: list[Feed], read_only: bool = False, poll_s: float = POLL_S) -> None:
        super().__init__()
        self.feeds = feeds
        self.read_only = read_only
        self.poll_s = poll_s
        self.snaps: dict[int, Snapshot] = {}
        self.current = 0
        self.window = "run"
        self.loss_metric = "loss"
        self.rate_metric = "tokens_per_s"
        self.requests: dict[int, list[tuple[str, float]]] = {}
        self._stop = threading.Event()
        self._writers: dict[int, LedgerWriter] = {}
        # for tests and bench/monitor: when the first frame was drawn, and what step each run shows
        self.started = time.perf_counter()
        self.first_frame: float | None = None
        self.shown: dict[int, tuple[int | None, float]] = {}  # index -> (step on screen, perf_counter)

    # ----------------------------------------------------------------------------------- layout
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            runs = OptionList(*[Option(f.name, id=str(i)) for i, f in enumerate(self.feeds)], id="runs")
            runs.display = len(self.feeds) > 1
            yield runs
            with TabbedContent(id="tabs", initial="overview"):
                with TabPane("Overview", id="overview"), Vertical():
                    yield ChainPanel(id="chain")
                    with Horizontal(id="plots"):
                        yield CurvePlot(id="lossplot")
                        yield CurvePlot(id="rateplot")
                with TabPane("GPUs", id="gpus"), Vertical():
                    yield Static(id="layoutline")
                    yield HealthTable(id="health")
                with TabPane("Checkpoints", id="checkpoints"):
                    yield CkptTable(id="ckpts")
                with TabPane("Alerts", id="alerts"):
                    yield AlertTable(id="alerttable")
                with TabPane("Segments", id="segments"):
                    yield SegmentTable(id="segtable")
                with TabPane("Goodput", id="goodput"), VerticalScroll():
                    yield GoodputPanel(id="goodputpanel")
        yield Static(id="statusline")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "read-only" if self.read_only else ""
        for i in range(len(self.feeds)):
            self.follow(i)

    def on_unmount(self) -> None:
        self._stop.set()
        for w in self._writers.values():
            w.close()

    # -------------------------------------------------------------------------------- followers
    @work(thread=True, group="followers")
    def follow(self, index: int) -> None:
        """Drive one run's feed off the UI thread; post a snapshot when something changed."""
        feed = self.feeds[index]
        feed.open()
        self.post_message(SnapshotReady(index, feed.snapshot()))
        posted, dirty = time.monotonic(), False
        while not self._stop.is_set():
            dirty |= feed.work()
            now = time.monotonic()
            if (dirty and now - posted >= POST_S) or now - posted >= TICK_S:
                self.post_message(SnapshotReady(index, feed.snapshot()))
                posted, dirty = now, False
            if not feed.busy:
                self._stop.wait(self.poll_s)

    def on_snapshot_ready(self, msg: SnapshotReady) -> None:
        self.snaps[msg.index] = msg.snapshot
        self._label_run(msg.index, msg.snapshot)
        if msg.index == self.current:
            self.render_current()

    # -------------------------------------------------------------------------------- rendering
    def render_current(self) -> None:
        snap = self.snaps.get(self.current)
        if snap is None:
            return
        self.title = f"kit monitor: {snap.name}"
        tab = self.query_one(TabbedContent).active  # hidden tabs are drawn when they are shown
        if tab == "overview":
            self.query_one(ChainPanel).show(snap, self._request_lines(snap))
            self.query_one("#lossplot", CurvePlot).show(snap, self.window, self.loss_metric)
            self.query_one("#rateplot", CurvePlot).show(snap, self.window, self.rate_metric)
        elif tab == "gpus":
            self.query_one("#layoutline", Static).update(layout_text(snap.summary))
            self.query_one(HealthTable).show(snap)
        elif tab == "checkpoints":
            self.query_one(CkptTable).show(snap)
        elif tab == "alerts":
            self.query_one(AlertTable).show(snap)
        elif tab == "segments":
            self.query_one(SegmentTable).show(snap)
        elif tab == "goodput":
            self.query_one(GoodputPanel).show(snap)
        r = snap.summary["reader"]
        skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in r.items()
                            if k in ("bad_lines", "invalid_events", "coerced", "unknown_kinds", "future_version",
                                     "vanished_files", "unreadable", "torn_tail",
                                     "truncated_files", "junk_events") and v)
        parts = [f"{r['events']:,} events", f"window {self.window}", snap.loading, snap.replay,
                 f"skipped: {skipped}" if skipped else "", r["last_error"], "READ-ONLY" if self.read_only else ""]
        self.query_one("#statusline", Static).update(" | ".join(p for p in parts if p))
        self.call_after_refresh(self._drawn, self.current, snap.summary["step"])

    def _drawn(self, index: int, step: int | None) -> None:
        if self.first_frame is None:
            self.first_frame = time.perf_counter()
        self.shown[index] = (step, time.perf_counter())

    def _label_run(self, index: int, snap: Snapshot) -> None:
        runs = self.query_one("#runs", OptionList)
        status = snap.summary["status"]
        label = f"[{STATUS_STYLE[status]}]●[/] {snap.name}"
        runs.replace_option_prompt(str(index), label)

    def _request_lines(self, snap: Snapshot) -> list[str]:
        lines = []
        for switch, at in self.requests.get(self.current, [])[-3:]:
            ack = next((a for a in snap.control_acks if a[1] == switch and a[0] >= at - 1), None)
            state = f"acknowledged at step {ack[2]} ({clock_text(ack[0])})" if ack else "waiting for the run"
            lines.append(f"{switch} requested {clock_text(at)}: {state}")
        return lines

    # ---------------------------------------------------------------------------------- actions
    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self.render_current()

    @on(TabbedContent.TabActivated)
    def _tab_shown(self) -> None:
        self.render_current()

    def action_window(self) -> None:
        names = list(WINDOWS)
        self.window = names[(names.index(self.window) + 1) % len(names)]
        self.render_current()

    def action_cycle_loss(self) -> None:
        self.loss_metric = LOSS_METRICS[(LOSS_METRICS.index(self.loss_metric) + 1) % len(LOSS_METRICS)]
        self.render_current()

    def action_cycle_rate(self) -> None:
        self.rate_metric = RATE_METRICS[(RATE_METRICS.index(self.rate_metric) + 1) % len(RATE_METRICS)]
        self.render_current()

    def action_run(self, delta: int) -> None:
        self.select_run((self.current + delta) % len(self.feeds))

    @on(OptionList.OptionSelected, "#runs")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.select_run(int(event.option.id or 0))

    def select_run(self, index: int) -> None:
        self.current = index
        self.query_one("#runs", OptionList).highlighted = index
        self.render_current()

    def _writable(self) -> bool:
        if self.read_only:
            self.notify("read-only: actions are disabled (--read-only)", severity="warning")
            return False
        return True

    def action_save_now(self) -> None:
        self._ask(SAVE_NOW, f"Ask run {self.feeds[self.current].name} to save a checkpoint now?")

    def action_stop_run(self) -> None:
        self._ask(STOP, f"Stop run {self.feeds[self.current].name}? It saves at the next step and the chain "
                        "ends (resubmit to continue).")

    def _ask(self, switch: str, question: str) -> None:
        if not self._writable():
            return
        index = self.current

        def answered(yes: bool | None) -> None:
            if yes:
                self._request(index, switch)

        self.push_screen(ConfirmScreen(question), answered)

    @work(thread=True, group="actions")
    def _request(self, index: int, switch: str) -> None:
        rd = RunDir(self.feeds[index].rd.path)
        try:
            path = rd.request(switch, reason=f"kit monitor, {getpass.getuser()}@{hostname()}")
        except OSError as e:
            self.call_from_thread(self.notify, f"could not write {switch}: {e.strerror}", severity="error")
            return
        self.requests.setdefault(index, []).append((switch, time.time()))
        self.call_from_thread(self.notify, f"{switch} requested: {path}")
        self.call_from_thread(self.render_current)

    def action_ack(self) -> None:
        if not self._writable():
            return
        snap = self.snaps.get(self.current)
        table = self.query_one(AlertTable)
        if snap is None or not snap.alerts or self.query_one(TabbedContent).active != "alerts":
            self.notify("go to the alerts tab (4) and highlight an alert to acknowledge it")
            return
        alert = snap.alerts[min(table.cursor_row, len(snap.alerts) - 1)]
        if alert.acked:
            self.notify("already acknowledged")
            return
        self._ack(self.current, alert.t, alert.message, alert.incident, alert.severity)

    @work(thread=True, group="actions")
    def _ack(self, index: int, alert_t: float, message: str, incident: str = "", severity: str = "") -> None:
        """The ack names the incident and the severity acknowledged (kit.alerts: an escalation above it
        asks again)."""
        try:
            w = self._writers.get(index)
            if w is None:
                w = self._writers[index] = LedgerWriter(self.feeds[index].rd.path,
                                                        writer_name("monitor", host=f"{hostname()}-{os.getpid()}"))
            w.emit("alert_ack", alert_t=alert_t, by=getpass.getuser(), message=message[:200],
                   **({"incident": incident} if incident and not incident.startswith("@") else {}),
                   **({"severity": severity} if severity else {}))
        except (OSError, ValueError) as e:
            self.call_from_thread(self.notify, f"could not acknowledge: {e}", severity="error")
            return
        self.call_from_thread(self.notify, "alert acknowledged")


def make_app(runs: list[RunDir] | list[Path] | list[str], read_only: bool = False, use_slurm: bool = True,
             replay_speed: float | None = None, clock: Callable[[], float] = time.time,
             poll_s: float = POLL_S) -> MonitorApp:
    """The one factory for the CLI, the tests and the benchmark."""
    feeds = []
    for r in runs:
        path = r.path if isinstance(r, RunDir) else Path(r)
        feeds.append(Feed(path, clock=clock, use_slurm=use_slurm, replay_speed=replay_speed))
    return MonitorApp(feeds, read_only=read_only or replay_speed is not None, poll_s=poll_s)


def loaded(app: MonitorApp) -> bool:
    """Every run shown once, its history read (tests wait for this before they look)."""
    done = all(not s.loading for s in app.snaps.values())
    return len(app.snaps) == len(app.feeds) and done and app.first_frame is not None


__all__: list[Any] = ["MonitorApp", "SnapshotReady", "loaded", "make_app"]

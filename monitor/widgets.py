"""The monitor's panels. Each one renders a :class:`~kit.monitor.feed.Snapshot` and nothing else.

Panels skip work when what they show has not changed (a version or signature check), so a quiet run
costs next to no CPU: redrawing a plot or refilling a 512-row table only happens on new data.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.binding import BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label, Markdown, Static
from textual_plotext import PlotextPlot

from kit.monitor.feed import Snapshot
from kit.run.goodput import LABELS as GOODPUT_LABELS
from kit.run.goodput import line as goodput_line
from kit.run.gpus import NA, fmt, mem_text
from kit.run.summary import dur

LABELS = {"loss": "loss", "grad_norm": "grad norm", "lr": "learning rate", "tokens_per_s": "tokens/s",
          "samples_per_s": "samples/s", "tflops": "TFLOP/s per GPU", "mfu": "MFU"}
STATUS_STYLE = {"healthy": "bold green", "degraded": "bold yellow", "down": "bold red"}
SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "error": "red", "critical": "bold white on red"}


def clock_text(t: float | None) -> str:
    """UTC wall time: the same on every login node and in every snapshot test."""
    return NA if t is None else time.strftime("%m-%d %H:%M:%S", time.gmtime(t))


def size_text(b: float | None) -> str:
    if b is None:
        return NA
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if b < 1024 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return NA


def val(v: Any, spec: str = ".4g") -> str:
    return NA if v is None else format(v, spec)


class ChainPanel(Static):
    """Run state, chain and latest step, as a few lines of text."""

    def show(self, snap: Snapshot, requests: list[str]) -> None:
        s = snap.summary
        t = Text()
        t.append(f"{snap.name} ", "bold")
        t.append(f"{s['status'].upper()}", STATUS_STYLE[s["status"]])
        t.append(f"  {s['phase']}")
        if snap.replay:
            t.append(f"  [{snap.replay} @ {clock_text(snap.now)}]", "magenta")
        t.append("\n")
        for r in s["reasons"]:
            t.append(f"! {r}\n", "yellow")
        seg = s.get("segment") or {}
        nxt = s.get("next")
        step, mx = s["step"], s["max_steps"]
        pct = f" ({100 * step / mx:.1f}%)" if step is not None and mx else ""
        t.append(f"step {val(step, 'd')}/{val(mx, 'd')}{pct}  to go {val(s['to_go'], ',d')}  "
                 f"finish in {dur(s['eta_s'])} ({clock_text(s['finish_t']) if s['eta_s'] else 'now'})\n")
        t.append(f"segment {seg.get('seg', NA)} of {s['segments']}  job {seg.get('job_id') or NA}  "
                 f"{seg.get('state', NA)}  up {dur(seg.get('elapsed_s'))}  left {seg.get('time_left') or NA}  "
                 f"on {seg.get('host') or NA} x{val(seg.get('world_size'), 'd')}"
                 + (f"  {s['layout']['label']}" if s.get("layout") else "") + "\n")
        if nxt:
            t.append(f"next: job {nxt['job_id']} {nxt['state']} ({nxt['reason'] or NA}), "
                     f"expected {nxt['start'] or NA}\n")
        elif s.get("slurm") and not s["slurm"]["available"]:
            t.append("next: N/A (no Slurm here: chain from the ledger)\n", "dim")
        t.append(f"loss {val(s['loss'])}  grad {val(s['grad_norm'], '.3g')}  lr {val(s['lr'], '.3g')}  "
                 f"tok/s {val(s['tokens_per_s'], ',.0f')}  smp/s {val(s['samples_per_s'], ',.1f')}  "
                 f"TFLOP/s/GPU {val(s['tflops'], '.3g')}  MFU {val(s['mfu'], '.1%')}  "
                 f"step {val(s['step_time'], '.3g')}s ({dur(s['step_age_s'])} ago)\n")
        ck = s.get("last_ckpt")
        if ck:
            t.append(f"checkpoint {ck['tag']} {dur(ck['age_s'])} ago, {size_text(ck['bytes'])} in "
                     f"{val(ck['seconds'], '.3g')}s\n")
        rb, doc, excl = s.get("rollbacks"), s.get("doctor"), s.get("excluded_nodes")
        if excl:
            t.append(f"excluded nodes: {', '.join(excl[:8])}{' ...' if len(excl) > 8 else ''}\n", "yellow")
        if rb:
            t.append(f"rollbacks {rb['count']}, last {rb['from_step']} -> {rb['to_step']} at {clock_text(rb['t'])}\n",
                     "yellow")
        if doc:
            t.append(f"preflight (kit doctor) {'passed' if doc['ok'] else 'FAILED'} at {clock_text(doc['t'])}\n",
                     "" if doc["ok"] else "red")
        if s.get("goodput"):
            t.append(f"goodput {goodput_line(s['goodput'])}\n")
        for line in requests:
            t.append(line + "\n", "cyan")
        self.update(t)


class CurvePlot(PlotextPlot):
    """One metric over the chosen window; spikes marked on the loss, the run's median on throughput."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._key: tuple[Any, ...] = ()

    def show(self, snap: Snapshot, window: str, metric: str) -> None:
        key = (snap.name, snap.version, window, metric, self.size)
        if key == self._key:
            return
        self._key = key
        xs, ys = snap.curves[window][metric]
        plt = self.plt
        plt.clear_figure()
        plt.title(f"{LABELS[metric]} ({window})")
        plt.xlabel("step")
        if not xs:
            plt.text("N/A: no data yet", 0, 0)
        else:
            plt.plot(xs, ys, marker="braille")
            if metric == "loss":
                sx = [s[0] for s in snap.spikes if xs[0] <= s[0] <= xs[-1]]
                sy = [s[1] for s in snap.spikes if xs[0] <= s[0] <= xs[-1]]
                if sx:
                    plt.scatter(sx, sy, marker="x", color="red", label="spike")
            elif len(ys) >= 10 and metric != "lr":
                med = statistics.median(ys)
                if math.isfinite(med):
                    plt.hline(med, "gray")
        self.refresh()


def layout_text(summary: dict[str, Any]) -> Text:
    """The GPUs tab's header: the run's layout, and how a rank maps to its coordinates."""
    lay = summary.get("layout")
    if not lay:
        return Text("layout: data parallel only (or not recorded by this run's segments)", "dim")
    t, p = lay["tensor"], lay["pipeline"]
    return Text(f"layout {lay['label']} ({lay['world']} ranks): rank = tensor + {t} x (pipeline + {p} x data); "
                "stragglers and hangs are named by (tensor, pipeline, data)")


class HealthTable(DataTable[Any]):
    """Every GPU of every node, worst first; N/A where the sampler had nothing."""

    COLUMNS = ("node", "gpu", "temp", "power", "util", "mem", "SM MHz", "throttle", "ECC vol/agg", "Xid", "flag")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns(*self.COLUMNS)
        self._sig: tuple[Any, ...] = ()

    def show(self, snap: Snapshot) -> None:
        sig = (snap.name, tuple((n, id(g)) for n, g, _ in snap.health), tuple(snap.nvml_absent))
        if sig == self._sig:
            return
        self._sig = sig
        self.clear()
        for node, g, flagged in snap.health:
            probs = g.problems()
            style = "bold red" if {"xid", "ecc", "lost", "remap"} & set(probs) else "yellow" if probs else ""
            flag = ",".join(probs + (["suspect"] if flagged else []))
            power = fmt(g.power, ".0f", "W") + (f"/{g.power_limit:.0f}" if g.power_limit else "")
            ecc = f"{fmt(g.ecc)}/{fmt(g.ecc_agg)}"
            self.add_row(Text(node, style), str(g.index), fmt(g.temp, ".0f", "C"), power, fmt(g.util, ".0f", "%"),
                         mem_text(g), fmt(g.sm_clock), g.throttle or "-", ecc, g.xid_codes or fmt(g.xid),
                         Text(flag, style or "yellow"))
        for node, reason in sorted(snap.nvml_absent.items()):
            self.add_row(node, NA, NA, NA, NA, NA, NA, NA, NA, NA, Text(f"no NVML: {reason}"[:60], "dim"))
        if not snap.health and not snap.nvml_absent:
            self.add_row(NA, NA, NA, NA, NA, NA, NA, NA, NA, NA, Text("no health samples in the ledger", "dim"))


class CkptTable(DataTable[Any]):
    COLUMNS = ("checkpoint", "step", "saved (UTC)", "size", "save s", "verified", "converted", "uploaded")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)
        self._sig: tuple[Any, ...] = ()

    def show(self, snap: Snapshot) -> None:
        sig = (snap.name, tuple((c.tag, c.verified, c.converted, c.uploaded, c.deleted) for c in snap.ckpts))
        if sig == self._sig:
            return
        self._sig = sig
        self.clear()

        def yn(v: object) -> Text:
            return Text("yes", "green") if v else Text("no", "red") if v is False else Text("-", "dim")

        for c in snap.ckpts:
            tag = Text(c.tag, "dim strike") if c.deleted else Text(c.tag)
            self.add_row(tag, val(c.step, "d"), clock_text(c.t), size_text(c.bytes), val(c.seconds, ".3g"),
                         yn(c.verified), yn(bool(c.converted) or None), yn(bool(c.uploaded) or None))


class AlertTable(DataTable[Any]):
    """Incidents (kit.alerts), newest first: worst severity (an arrow when escalated), latest message
    (x N when several alerts were folded in), and in the last column "yes" once acknowledged or
    "cleared" once kit saw the condition end. The row key is the first alert's time."""

    COLUMNS = ("time (UTC)", "severity", "message", "from", "ack")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)
        self._sig: tuple[Any, ...] = ()

    def show(self, snap: Snapshot) -> None:
        sig = (snap.name, tuple((a.t, a.acked, a.severity, a.count, a.cleared_t) for a in snap.alerts))
        if sig == self._sig:
            return
        self._sig = sig
        row = self.cursor_row
        self.clear()
        for a in snap.alerts:
            quiet = a.acked or not a.open
            style = "dim" if quiet else SEVERITY_STYLE.get(a.severity, "")
            sev = Text(a.severity + (" ^" if a.count > 1 else ""), style)
            msg = a.message[:150] + (f" (x{a.count})" if a.count > 1 else "")
            state = "yes" if a.acked else ("cleared" if not a.open else "")
            self.add_row(clock_text(a.t), sev, msg, a.src, state, key=repr(a.t))
        if snap.alerts:
            self.move_cursor(row=min(row, len(snap.alerts) - 1))


class SegmentTable(DataTable[Any]):
    COLUMNS = ("segment", "job", "started (UTC)", "steps", "ended", "why", "host", "ranks")

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.add_columns(*self.COLUMNS)
        self._sig: tuple[Any, ...] = ()

    def show(self, snap: Snapshot) -> None:
        sig = (snap.name, tuple((s.seg, s.ended_t, s.end_step) for s in snap.segments))
        if sig == self._sig:
            return
        self._sig = sig
        self.clear()
        for s in reversed(snap.segments):
            steps = f"{val(s.start_step, 'd')}-{val(s.end_step, 'd') if s.end_step is not None else '...'}"
            self.add_row(s.seg, s.job_id or NA, clock_text(s.started_t), steps, clock_text(s.ended_t),
                         s.reason or ("running" if s.ended_t is None else NA), s.host or NA, val(s.world_size, "d"))


GOODPUT_ORDER = ("productive", "preflight", "ckpt_load", "startup", "ckpt_stall", "eval", "redone", "hang", "other")


def pct(x: float | None) -> str:
    return NA if x is None else f"{100 * x:.1f}%"


class GoodputPanel(Static):
    """The goodput account (kit.run.goodput, docs/goodput.md): where the allocated time went, for the run
    and the last UTC day; restarts; segments; the projection for the recipe's allocation length."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._key: tuple[Any, ...] = ()

    def show(self, snap: Snapshot) -> None:
        a = snap.goodput
        key = (snap.name, None if a is None else (a["as_of"], a["allocated_s"], a["queue_s"], len(a["restarts"])))
        if key == self._key:
            return
        self._key = key
        if not a or not a["allocated_s"]:
            self.update(Text("goodput: N/A (no allocated time in the ledger yet)", "dim"))
            return
        head = Text()
        head.append(f"ETTR {pct(a['ettr'])}", "bold green" if (a["ettr"] or 0) >= 0.9 else "bold yellow")
        head.append(f" of {dur(a['allocated_s'])} allocated in {a['segment_count']} segment(s), as of "
                    f"{clock_text(a['as_of'])}; queue wait {dur(a['queue_s'])} apart (not allocated)")
        self.update(Group(head, self._parts(a), self._restarts(a), self._segments(a), self._projection(a)))

    def _parts(self, a: dict[str, Any]) -> Table:
        day = a["days"][-1] if a["days"] else None
        t = Table(title="allocated time", title_justify="left", box=None, pad_edge=False)
        t.add_column("category")
        t.add_column("run", justify="right")
        t.add_column("share", justify="right")
        if day:
            t.add_column(f"day {day['day']}", justify="right")
            t.add_column("share", justify="right")
        for c in GOODPUT_ORDER:
            v = a["parts"][c]
            row = [GOODPUT_LABELS[c], dur(v), pct(v / a["allocated_s"])]
            if day:
                d = day["parts"][c]
                row += [dur(d), pct(d / day["allocated_s"]) if day["allocated_s"] else NA]
            t.add_row(*row, style="green" if c == "productive" else "red" if c in ("redone", "hang") and v else "")
        return t

    def _restarts(self, a: dict[str, Any]) -> Text:
        rs = a["restarts"]
        if not rs:
            return Text("restarts: none", "dim")
        t = Text(f"restarts: {len(rs)} (failure -> first completed step of the next segment)\n")
        for r in rs[-5:]:
            t.append(f"  {r['seg']} {r['outcome']} at {clock_text(r['failure_t'])}: "
                     + (f"{dur(r['cost_s'])} (queue {dur(r.get('queue_s'))}, start-up {dur(r.get('startup_s'))})"
                        if r["cost_s"] is not None else "not trained since") + "\n")
        return t

    def _segments(self, a: dict[str, Any]) -> Table:
        t = Table(title="segments (newest first)", title_justify="left", box=None, pad_edge=False)
        for col in ("segment", "outcome", "started (UTC)", "allocated", "ETTR", "start-up"):
            t.add_column(col, justify="right" if col in ("allocated", "ETTR", "start-up") else "left")
        for s in reversed(a["segments"][-8:]):
            t.add_row(s["seg"], s["outcome"], clock_text(s["start"]), dur(s["allocated_s"]), pct(s["ettr"]),
                      dur(s["startup_s"]))
        return t

    def _projection(self, a: dict[str, Any]) -> Text:
        p = a.get("projection")
        if not p:
            return Text("")
        if p["ettr"] is None:
            return Text(f"projection: N/A ({'; '.join(p['notes'])})", "dim")
        t = Text(f"projection for {dur(p['time_limit_s'])} allocations: ETTR {pct(p['ettr'])} (start-up "
                 f"{pct(p['startup_share'])}, failures {pct(p['failure_share'])}, saves {pct(p['save_share'])}, "
                 f"evaluation {pct(p['eval_share'])}, rollbacks {pct(p['rollback_share'])})")
        if p.get("young_daly_interval_steps"):
            t.append(f"\nYoung/Daly: save every ~{p['young_daly_interval_steps']} steps at this failure rate")
        return t


class ConfirmScreen(ModalScreen[bool]):
    """Yes/no before anything that changes the run."""

    BINDINGS: ClassVar[list[BindingType]] = [("y", "answer(True)", "yes"), ("n,escape", "answer(False)", "no")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> Any:
        with Vertical(id="confirm"):
            yield Label(self.question, id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


HELP = """\
# kit monitor

| key | what |
|---|---|
| `1`-`6` | overview, GPUs, checkpoints, alerts, segments, goodput |
| `w` | loss/throughput window: last hour, last day, whole run |
| `l` | left plot: loss, grad norm, learning rate |
| `t` | right plot: tokens/s, samples/s, TFLOP/s per GPU, MFU |
| `n` / `p` | next / previous run (or pick one in the list) |
| `a` | acknowledge the highlighted alert (alerts tab) |
| `s` | ask the run to save a checkpoint now (asks first) |
| `x` | ask the run to stop gracefully: save, end the chain (asks first) |
| `?` | this help; `escape` closes it |
| `q` | quit (the run is not affected) |

Times are UTC. N/A means the value is missing (no NVML, not logged yet).
`--read-only` disables `a`, `s` and `x`. See docs/monitor.md.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> Any:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)

"""The monitor's model: ledger events folded into a bounded picture of one run.

No UI here (the nvitop split: collector below, screens above). A follower thread owns a
:class:`RunModel`, folds events into it, and hands the UI immutable :class:`Snapshot` objects. Every
collection is bounded (series downsample, deques have a maxlen), so memory does not grow with the
length of the run. Nothing in an event is trusted: a field of the wrong type is N/A, never a crash.
"""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from kit.ledger import EVENTS, PLOTTED, ReadStats
from kit.ledger.scan import Scan
from kit.run.gpus import NodeHealth, parse_health
from kit.run.series import Curves, clean

MAX_ALERTS = 500
MAX_CKPTS = 200
MAX_SEGMENTS = 400


def num(v: Any) -> float | None:
    """A finite number, or None (N/A) for anything else: junk in a field never reaches the screen."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def text(v: Any, limit: int = 200) -> str:
    return v[:limit] if isinstance(v, str) else ("" if v is None else str(v)[:limit])


@dataclass(slots=True)
class Segment:
    seg: str
    job_id: str = ""
    started_t: float | None = None
    start_step: int | None = None
    ended_t: float | None = None
    end_step: int | None = None
    reason: str = ""
    host: str = ""
    world_size: int | None = None
    layout: dict[str, int] | None = None  # segment_started's (tensor, pipeline, data); None before layouts existed
    restarts: int = 0
    first_step_t: float | None = None  # its first completed step: start-up ends here


@dataclass(slots=True)
class Ckpt:
    tag: str
    step: int | None = None
    t: float | None = None
    bytes: float | None = None
    seconds: float | None = None
    reason: str = ""
    verified: bool | None = None
    converted: str = ""
    uploaded: str = ""
    deleted: bool = False


@dataclass(slots=True)
class Alert:
    """One incident (kit.alerts): its first alert's time ``t`` (the row key and what an ack names), its
    worst severity so far, the latest message; cleared by kit or acknowledged by an operator."""

    t: float
    severity: str
    message: str
    src: str
    acked: bool = False
    incident: str = ""
    condition: str = ""
    last_t: float | None = None
    count: int = 1  # alert events folded into this incident (the first and its escalations)
    acked_severity: str = ""  # an ack covers the incident up to this severity; an escalation asks again
    cleared_t: float | None = None

    @property
    def open(self) -> bool:
        return self.cleared_t is None


@dataclass
class RunModel:
    """Folds events of one run; ``version`` increases whenever something visible changed."""

    name: str
    path: str = ""
    max_steps: int | None = None
    version: int = 0
    first_t: float | None = None
    last_t: float | None = None
    step: int | None = None
    step_t: float | None = None
    last: dict[str, Any] = field(default_factory=dict)
    curves: Curves = field(default_factory=lambda: Curves(PLOTTED))
    spikes: deque[tuple[int, float, float]] = field(default_factory=lambda: deque(maxlen=1000))
    rollbacks: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=200))
    segments: OrderedDict[str, Segment] = field(default_factory=OrderedDict)
    chain_jobs: list[str] = field(default_factory=list)
    chain_ended: str = ""
    chain_ended_t: float | None = None
    signal_lead_s: float | None = None  # from chain_submitted: how long before the limit Slurm signals
    # seg -> (start, end) of its allocation (the chain's driver): queue waits and start-up are measured from it
    allocations: OrderedDict[str, tuple[float, float | None]] = field(default_factory=OrderedDict)
    excluded: dict[str, str] = field(default_factory=dict)  # node -> why (kit.jobs excludes it from segments)
    ckpts: OrderedDict[str, Ckpt] = field(default_factory=OrderedDict)
    alerts: deque[Alert] = field(default_factory=lambda: deque(maxlen=MAX_ALERTS))
    incidents: dict[str, Alert] = field(default_factory=dict)  # incident id -> its row in ``alerts``
    acked: set[float] = field(default_factory=set)
    acked_incidents: dict[str, str] = field(default_factory=dict)  # incident -> severity acknowledged
    health: dict[str, NodeHealth] = field(default_factory=dict)
    nvml_absent: dict[str, str] = field(default_factory=dict)
    stragglers: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    hangs: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    control_acks: deque[tuple[float, str, int | None]] = field(default_factory=lambda: deque(maxlen=50))
    doctor: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    unknown_kinds: dict[str, int] = field(default_factory=dict)
    junk_events: int = 0
    reader: ReadStats = field(default_factory=ReadStats)

    # ------------------------------------------------------------------------------------ folding
    def load_scan(self, scan: Scan) -> None:
        """Fold a whole history at once (kit.ledger.scan): the step columns straight into the curves,
        the other events one by one, each node's latest health sample. The same picture as folding
        every event in time order, without parsing a million step lines."""
        import numpy as np

        from kit.ledger.index import decode_enum
        from kit.ledger.scan import surviving

        cols = scan.steps
        bulk_latest = sorted(scan.latest.items(), key=lambda kv: kv[1]["t"])
        spikes: list[tuple[float, int, float]] = []
        if len(cols):
            keep = surviving(cols["step"])
            self.curves.load(cols["step"], cols["t"], plotted(cols), None if bool(keep.all()) else keep)
            flagged = np.flatnonzero((cols["spike"] > 0) & np.isfinite(cols["loss"]))
            spikes = list(zip(cols["t"][flagged].tolist(), cols["step"][flagged].astype(np.int64).tolist(),
                              cols["loss"][flagged].tolist(), strict=True))
            self.kinds["step"] = len(cols)
            last = [e for (_, kind), e in bulk_latest if kind == "step"]
            self.last = dict(last[-1]) if last else {}
            self.step, self.step_t = int(cols["step"][-1]), float(cols["t"][-1])
            if self.last.get("step") != self.step:  # the latest step line could not be read back
                self.last = {"step": self.step, "t": self.step_t, "spike": decode_enum("spike", cols["spike"][-1])}
            self._span(float(cols["t"][0]), self.step_t)
        for code, count in enumerate(np.bincount(scan.bulk["kind"]).tolist() if len(scan.bulk) else []):
            if count:
                self.kinds[scan.kinds[code] if code < len(scan.kinds) else "?"] = count
        if len(scan.bulk):
            self._span(float(scan.bulk["t"][0]), float(scan.bulk["t"][-1]))
        for e in scan.events:
            self.fold(e)
        for (_, kind), e in bulk_latest:
            if kind != "step":
                handler = _HANDLERS.get(kind)
                if handler is not None:
                    handler(self, e, float(e["t"]))
        for t, step, loss in sorted(spikes):
            self._add_spike(step, loss, t)
        if len(cols):  # each segment's first completed step (start-up ends there)
            ts = np.ascontiguousarray(cols["t"])  # searchsorted copies a strided column on every call
            for sg in self.segments.values():
                if sg.started_t is not None and sg.first_step_t is None:
                    i = int(np.searchsorted(ts, sg.started_t, "left"))
                    if i < len(ts) and (sg.ended_t is None or ts[i] <= sg.ended_t):
                        sg.first_step_t = float(ts[i])
        self.version += 1

    def _span(self, first: float, last: float) -> None:
        if self.first_t is None or first < self.first_t:
            self.first_t = first
        if self.last_t is None or last > self.last_t:
            self.last_t = last

    def fold_all(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            self.fold(e)

    def fold(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        t = num(e.get("t"))
        if not isinstance(kind, str) or t is None:
            self.junk_events += 1
            return
        self.version += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if self.first_t is None or t < self.first_t:
            self.first_t = t
        if self.last_t is None or t > self.last_t:
            self.last_t = t
        handler = _HANDLERS.get(kind)
        if handler is None:
            if kind not in EVENTS and len(self.unknown_kinds) < 50:
                self.unknown_kinds[kind] = self.unknown_kinds.get(kind, 0) + 1
            return
        try:
            handler(self, e, t)
        except (TypeError, ValueError, KeyError, AttributeError):
            self.junk_events += 1  # a known kind with fields of the wrong shape: counted, shown

    def _step(self, e: dict[str, Any], t: float) -> None:
        step = e["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError("step")
        # a resume or rollback replays steps: Curves.add truncates, the latest event wins
        self.step, self.step_t, self.last = step, t, e
        seg = self.current_segment()
        if seg is not None and seg.first_step_t is None and seg.started_t is not None and t >= seg.started_t:
            seg.first_step_t = t
        if e.get("spike") and num(e.get("loss")) is not None:  # the trainer's detector flags the step itself
            self._add_spike(step, float(e["loss"]), t)
        self.curves.add(step, t, [clean(e.get(k)) for k in PLOTTED])

    def _seg(self, e: dict[str, Any]) -> Segment:
        seg = text(e.get("seg")) or "?"
        s = self.segments.get(seg)
        if s is None:
            s = self.segments[seg] = Segment(seg)
            while len(self.segments) > MAX_SEGMENTS:
                self.segments.popitem(last=False)
        return s

    def _segment_started(self, e: dict[str, Any], t: float) -> None:
        s = self._seg(e)
        s.started_t, s.start_step = t, _int(e.get("step"))
        s.job_id = text(e.get("job_id")) or s.job_id
        s.host, s.world_size = text(e.get("host")), _int(e.get("world_size"))
        s.layout = _layout(e.get("layout"))
        s.restarts = _int(e.get("restarts")) or 0
        self.max_steps = _int(e.get("max_steps")) or self.max_steps
        s.ended_t, s.reason = None, ""

    def _segment_ended(self, e: dict[str, Any], t: float) -> None:
        s = self._seg(e)
        s.ended_t, s.end_step, s.reason = t, _int(e.get("step")), text(e.get("reason"))

    def _chain(self, e: dict[str, Any], t: float) -> None:
        job = text(e.get("job_id"))
        if job and job not in self.chain_jobs:
            self.chain_jobs = [*self.chain_jobs, job][-50:]
        kind, seg = e["kind"], text(e.get("seg"))
        if kind == "chain_ended":
            self.chain_ended, self.chain_ended_t = text(e.get("reason")) or "?", t
        elif kind == "chain_submitted":
            self.chain_ended = ""
            self.signal_lead_s = num(e.get("signal_lead_s")) or self.signal_lead_s
        elif kind == "allocation_started" and seg:
            self.allocations[seg] = (t, None)
            while len(self.allocations) > MAX_SEGMENTS:
                self.allocations.popitem(last=False)
        elif kind == "allocation_ended" and seg in self.allocations:
            self.allocations[seg] = (self.allocations[seg][0], t)

    def _node_excluded(self, e: dict[str, Any], t: float) -> None:
        node = text(e.get("node"))
        if node and len(self.excluded) < 1000:
            self.excluded[node] = text(e.get("reason"))

    def _ckpt(self, e: dict[str, Any], t: float) -> None:
        tag = text(e.get("tag"))
        if not tag:
            raise ValueError("tag")
        c = self.ckpts.get(tag)
        if c is None:
            c = self.ckpts[tag] = Ckpt(tag)
            while len(self.ckpts) > MAX_CKPTS:
                self.ckpts.popitem(last=False)
        kind = e["kind"]
        if kind == "ckpt_saved":
            c.step, c.t, c.bytes, c.seconds = _int(e.get("step")), t, num(e.get("bytes")), num(e.get("seconds"))
            c.reason, c.deleted = text(e.get("reason")), False
        elif kind == "ckpt_verified":
            c.verified = bool(e.get("ok"))
        elif kind == "ckpt_converted":
            c.converted = text(e.get("out")) or "yes"
        elif kind == "ckpt_uploaded":
            c.uploaded = text(e.get("url")) or "yes"
        elif kind == "ckpt_deleted":
            c.deleted = True

    def _alert(self, e: dict[str, Any], t: float) -> None:
        """One row per incident (kit.alerts): an escalation raises its severity and asks for a new ack.
        An alert without an incident id (older ledgers) is an incident of its own."""
        sev = text(e.get("severity")) or "warning"
        inc = text(e.get("incident")) or f"@{t!r}"
        msg = text(e.get("message"), 500)
        a = self.incidents.get(inc)
        if a is None:
            a = Alert(t, sev, msg, text(e.get("src")), incident=inc, condition=text(e.get("condition")), last_t=t)
            if t in self.acked:
                a.acked_severity = sev
            a.acked_severity = _worse(a.acked_severity, self.acked_incidents.get(inc, ""))
            self.alerts.append(a)
            self.incidents[inc] = a
            if len(self.incidents) > 2 * MAX_ALERTS:  # rows evicted from the deque leave the index too
                self.incidents = {x.incident: x for x in self.alerts}
        else:
            a.count += 1
            a.message, a.last_t = msg, max(t, a.last_t or t)
            a.severity = _worse(a.severity, sev)
            a.cleared_t = None if (a.cleared_t or 0) <= t else a.cleared_t
        a.acked = _covers(a.acked_severity, a.severity)

    def _alert_ack(self, e: dict[str, Any], t: float) -> None:
        """An ack names the incident (and the alert's time, for older ledgers); it covers the incident up
        to the severity it was shown at (``severity``; when absent, the incident's severity now)."""
        at = num(e.get("alert_t"))
        inc = text(e.get("incident"))
        if at is None and not inc:
            raise ValueError("alert_t")
        a = self.incidents.get(inc) if inc else None
        if a is None and at is not None:
            a = next((x for x in self.alerts if x.t == at), None)
        sev = text(e.get("severity")) or (a.severity if a is not None else "critical")
        if at is not None:
            self.acked.add(at)
            if len(self.acked) > 4 * MAX_ALERTS:
                self.acked = set(sorted(self.acked)[-2 * MAX_ALERTS:])
        if inc:
            self.acked_incidents[inc] = _worse(self.acked_incidents.get(inc, ""), sev)
            if len(self.acked_incidents) > 4 * MAX_ALERTS:
                self.acked_incidents = dict(list(self.acked_incidents.items())[-2 * MAX_ALERTS:])
        if a is not None:
            a.acked_severity = _worse(a.acked_severity, sev)
            a.acked = _covers(a.acked_severity, a.severity)

    def _alert_cleared(self, e: dict[str, Any], t: float) -> None:
        a = self.incidents.get(text(e.get("incident")))
        if a is not None and (a.last_t or a.t) <= t:
            a.cleared_t = t

    def _health(self, e: dict[str, Any], t: float) -> None:
        node = text(e.get("node"))
        if not node:
            raise ValueError("node")
        old = self.health.get(node)
        if old is None or old.t <= t:
            self.health[node] = parse_health(node, t, e)

    def _nvml_absent(self, e: dict[str, Any], t: float) -> None:
        self.nvml_absent[text(e.get("node")) or "?"] = text(e.get("reason"))

    def _spike(self, e: dict[str, Any], t: float) -> None:
        step, loss = _int(e.get("step")), num(e.get("loss"))
        if step is not None and loss is not None:
            self._add_spike(step, loss, t)

    def _add_spike(self, step: int, loss: float, t: float) -> None:
        """One spike per step: the trainer reports it twice (a `spike` event and the step's flag)."""
        if any(s[0] == step for s in self.spikes):
            return
        self.spikes.append((step, loss, t))

    def _rollback(self, e: dict[str, Any], t: float) -> None:
        self.rollbacks.append((t, _int(e.get("from_step")) or 0, _int(e.get("to_step")) or 0))

    def _incident(self, e: dict[str, Any], t: float) -> None:
        (self.stragglers if e["kind"] == "straggler" else self.hangs).append(dict(e))

    def _control_ack(self, e: dict[str, Any], t: float) -> None:
        self.control_acks.append((t, text(e.get("switch")), _int(e.get("step"))))

    def _doctor(self, e: dict[str, Any], t: float) -> None:
        self.doctor = {"t": t, "ok": bool(e.get("ok")), "checks": e.get("checks")}

    # ------------------------------------------------------------------------------------ reading
    def current_segment(self) -> Segment | None:
        return next(reversed(self.segments.values()), None) if self.segments else None

    def step_time(self) -> float | None:
        """Median of the recent step times (robust to one slow step)."""
        recent = self.curves.recent_values("step_time", 50)
        return statistics.median(recent) if recent else None

    def alerts_newest(self) -> list[Alert]:
        return sorted(self.alerts, key=lambda a: a.t, reverse=True)

    def unacked(self, min_severity: str = "warning") -> list[Alert]:
        from kit.ledger import SEVERITIES

        floor = SEVERITIES.index(min_severity)
        return [a for a in self.alerts if not a.acked and a.open and a.severity in SEVERITIES
                and SEVERITIES.index(a.severity) >= floor]

    def open_incidents(self, condition: str) -> list[Alert]:
        """Incidents of one kind (``straggler``, ``temp``...) that kit has not cleared."""
        return [a for a in self.alerts if a.open and a.condition == condition]


def _rank(severity: str) -> int:
    from kit.ledger import SEVERITIES

    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)  # unknown: worst


def _worse(a: str, b: str) -> str:
    """The more severe of two levels ("" is none)."""
    if not a or not b:
        return a or b
    return a if _rank(a) >= _rank(b) else b


def _covers(acked: str, severity: str) -> bool:
    return bool(acked) and _rank(acked) >= _rank(severity)


def plotted(cols: Any) -> Any:
    """The plotted metrics of a scan's step records as an (n x len(PLOTTED)) array: a view of the records
    when the index keeps them side by side in that order (it does: kit.ledger.index.COLUMNS), else a copy."""
    import numpy as np

    from kit.ledger.index import COLUMNS, STEP_DTYPE

    first = COLUMNS.index(PLOTTED[0]) if PLOTTED[0] in COLUMNS else -1
    if (first >= 0 and COLUMNS[first:first + len(PLOTTED)] == PLOTTED and cols.dtype == STEP_DTYPE
            and cols.strides[0] == STEP_DTYPE.itemsize):
        return cols.view(np.float64).reshape(len(cols), len(COLUMNS))[:, first:first + len(PLOTTED)]
    return np.stack([np.asarray(cols[k], dtype=np.float64) for k in PLOTTED], axis=1)


def _layout(v: Any) -> dict[str, int] | None:
    """A segment's layout, when it is three positive integers (anything else is not shown)."""
    if not isinstance(v, dict):
        return None
    d = {k: _int(v.get(k)) for k in ("tensor", "pipeline", "data")}
    return {k: x for k, x in d.items() if x is not None} if all(x and x > 0 for x in d.values()) else None


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v):
        return int(v)
    return None


_HANDLERS: dict[str, Any] = {
    "step": RunModel._step,
    "segment_started": RunModel._segment_started,
    "segment_ended": RunModel._segment_ended,
    "chain_submitted": RunModel._chain,
    "chain_requeued": RunModel._chain,
    "chain_ended": RunModel._chain,
    "allocation_started": RunModel._chain,
    "allocation_ended": RunModel._chain,
    "node_excluded": RunModel._node_excluded,
    "ckpt_saved": RunModel._ckpt,
    "ckpt_verified": RunModel._ckpt,
    "ckpt_converted": RunModel._ckpt,
    "ckpt_uploaded": RunModel._ckpt,
    "ckpt_deleted": RunModel._ckpt,
    "alert": RunModel._alert,
    "alert_ack": RunModel._alert_ack,
    "alert_cleared": RunModel._alert_cleared,
    "health": RunModel._health,
    "nvml_absent": RunModel._nvml_absent,
    "spike": RunModel._spike,
    "rollback": RunModel._rollback,
    "straggler": RunModel._incident,
    "hang": RunModel._incident,
    "control_ack": RunModel._control_ack,
    "doctor": RunModel._doctor,
}

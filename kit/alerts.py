"""Alert discipline: one alert per incident, escalation while it lasts, a clear when it is over.

Why: an alert that fires on noise, or again at every sample while a condition lasts, teaches the
operator to ignore the channel; one that fires once and never says it is over leaves a finished run
"degraded" for good. Every ``alert`` event carries an ``incident`` id (kit.ledger gives a one-off alert
its own). A condition that lasts is an :class:`Incidents` entry:

- it opens (one ``alert``) once it has held for ``open_after`` consecutive observations;
- while it holds, after ``escalate_after`` more observations it escalates once: another ``alert`` with
  the same incident id, a higher severity and ``escalated: true`` (an acknowledgement covers an
  incident up to the severity acknowledged, so an escalation asks again);
- it clears (``alert_cleared`` with the incident id) once it has not held for ``clear_after``
  consecutive observations, unless it is ``sticky`` (hardware faults: only an operator's ack ends them).

The monitor (kit.monitor.model) folds alerts by incident: one row per incident, its worst severity, and
an open incident that is neither acknowledged nor cleared is what degrades a run's verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from kit.ledger import SEVERITIES, LedgerWriter, NullLedger


@dataclass(slots=True)
class Incident:
    id: str
    severity: str
    opened_t: float
    held: int = 0  # consecutive observations that held since it opened (or escalated)
    quiet: int = 0  # consecutive observations that did not hold
    escalated: bool = False


@dataclass(slots=True)
class _Pending:
    held: int = 0


def higher(a: str, b: str) -> bool:
    """``a`` is a more severe level than ``b``."""
    return SEVERITIES.index(a) > SEVERITIES.index(b)


@dataclass
class Incidents:
    """Conditions of one source (the straggler detector, a node's sampler), keyed by what they are about.

    ``scope`` makes incident ids unique across writers and segments (``<scope>/<key>/<n>``)."""

    ledger: LedgerWriter | NullLedger
    scope: str
    open_after: int = 1
    clear_after: int = 1
    escalate_after: int = 0  # 0: never escalate
    open: dict[str, Incident] = field(default_factory=dict)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _count: int = 0

    def observe(self, key: str, holds: bool, severity: str, message: str, escalate_to: str = "",
                sticky: bool = False, **fields: Any) -> str:
        """One observation of condition ``key``. Returns what it did: "opened", "escalated", "cleared"
        or "" (``message`` and ``fields`` describe the condition now; they are used only when an event
        is written)."""
        inc = self.open.get(key)
        if holds:
            if inc is None:
                p = self._pending.setdefault(key, _Pending())
                p.held += 1
                if p.held < self.open_after:
                    return ""
                del self._pending[key]
                self._open(key, severity, message, **fields)
                return "opened"
            inc.quiet = 0
            inc.held += 1
            if (escalate_to and not inc.escalated and self.escalate_after and inc.held >= self.escalate_after
                    and higher(escalate_to, inc.severity)):
                inc.severity, inc.escalated = escalate_to, True
                self.ledger.alert(escalate_to, message, incident=inc.id, escalated=True, **fields)
                return "escalated"
            return ""
        self._pending.pop(key, None)
        if inc is None or sticky:
            return ""
        inc.quiet += 1
        if inc.quiet < self.clear_after:
            return ""
        self.clear(key, message, **fields)
        return "cleared"

    def event(self, severity: str, message: str, **fields: Any) -> str:
        """A one-off incident (an Xid, a failed save): alerted once, never cleared by kit."""
        self._count += 1
        inc = f"{self.scope}/event/{self._count}"
        self.ledger.alert(severity, message, incident=inc, **fields)
        return inc

    def clear(self, key: str, message: str = "", **fields: Any) -> None:
        inc = self.open.pop(key, None)
        if inc is not None:
            self.ledger.emit("alert_cleared", incident=inc.id, message=message, **fields)

    def _open(self, key: str, severity: str, message: str, **fields: Any) -> None:
        self._count += 1
        inc = Incident(f"{self.scope}/{key}/{self._count}", severity, time.time())
        self.open[key] = inc
        self.ledger.alert(severity, message, incident=inc.id, **fields)

"""Waiting for a chain (local or Slurm) in tests: one event-bounded wait, shared by the chain tests.

``timeout`` bounds the wait for the NEXT sign of progress (a new ledger line, a change of
slurm/chain.json), not the whole chain: a busy machine that makes every segment slower cannot fail a
test, while a chain that stops moving (or keeps going past ``max_segments``) still does, with the
state and the newest driver log in the failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kit.ledger import read_all


def ended(state: dict[str, Any]) -> bool:
    return state.get("state") == "ended"


def wait_chain(run_dir: Path, until: Callable[[dict[str, Any]], bool] = ended, timeout: float = 300,
               max_segments: int = 12) -> dict[str, Any]:
    """slurm/chain.json once ``until(state)`` holds (default: the chain ended)."""
    end = time.time() + timeout
    state: dict[str, Any] = {}
    seen: tuple[int, str] = (-1, "")
    while time.time() < end:
        try:
            text = (run_dir / "slurm" / "chain.json").read_text()
            state = json.loads(text)
        except (FileNotFoundError, ValueError):
            text, state = "", {}
        if until(state):
            return state
        assert len(state.get("segments", [])) <= max_segments, f"the chain keeps going: {state}"
        now = (len(read_all(run_dir)), text)
        if now != seen:
            seen, end = now, time.time() + timeout
        time.sleep(1)
    logs = sorted((run_dir / "slurm" / "submitit").glob("*.err"))
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in logs[-2:]) or "(no logs)"
    raise AssertionError(f"chain made no progress for {timeout} s; state {state}\n{tails}")


def wait_ledger(run_dir: Path, pred: Callable[[list[dict[str, Any]]], bool], what: str,
                timeout: float = 300, kinds: set[str] | None = None) -> list[dict[str, Any]]:
    """The run's events (of ``kinds``, or all) once ``pred(events)`` holds; ``what`` names the wait in
    the failure."""
    end = time.time() + timeout
    while time.time() < end:
        events = read_all(run_dir, kinds)
        if pred(events):
            return events
        time.sleep(0.5)
    raise AssertionError(f"{what}: not seen in the ledger within {timeout} s")

"""The chain's record: ``<run>/slurm/chain.json``, what the chain remembers between allocations.

Why here (not in kit.jobs): it is part of the run directory's contract, read by every tool that shows
a run (``kit status``, the monitor, the goodput account) as well as written by the chain's driver.
Exactly one process writes it at a time (``kit submit``/``stop``/``cancel`` while no segment runs,
the rank-0 driver of the running segment otherwise); readers never change it. A damaged file (torn by
a crash, edited by hand) reads as what can be salvaged: fields of the wrong type take their defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kit.fsio import atomic_write
from kit.rundir import RunDir

CHAIN_JSON = "chain.json"
RANKS_DIR = "ranks"
SUBMITIT_DIR = "submitit"

# Chain states (ChainState.state)
QUEUED, RUNNING, ENDED = "queued", "running", "ended"
# Segment outcomes (SegmentRecord.outcome)
CLEAN = "clean"  # saved at an allocation boundary (signal, deadline, segment_limit): continue
FINISHED = "finished"  # done, stop or give_up: the trainer says the chain ends
PREFLIGHT = "preflight"  # the node failed its preflight: exclude it, resubmit, not a training failure
HANG = "hang"
CRASH = "crash"  # a rank died, a non-zero exit, no segment_ended from the trainer
DISK_FULL = "disk_full"  # a save found the checkpoint filesystem full: end (or exclude nodes whose own disk it was)
LOST = "lost"  # the driver never recorded an end (node failure, job killed): found by the next segment


@dataclass(slots=True)
class SegmentRecord:
    """One allocation of the chain, as its rank-0 driver saw it."""

    seg: str
    job_id: str
    restarts: int = 0
    nodes: list[str] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    outcome: str = "running"
    reason: str = ""  # the trainer's reason (done, stop, signal, deadline, segment_limit...) or crash detail
    ckpt_before: int = 0
    ckpt_after: int = 0
    step: int = -1
    exit_codes: dict[str, int] = field(default_factory=dict)
    implicated: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ChainState:
    """Everything the chain remembers between allocations (``<run>/slurm/chain.json``)."""

    job_id: str = ""
    state: str = ""
    end_reason: str = ""
    executor: str = ""  # "slurm" or "local"
    submitted: float = 0.0
    segments: list[SegmentRecord] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)
    suspect_nodes: list[str] = field(default_factory=list)
    consecutive_crashes: int = 0
    no_progress: int = 0
    job_ids: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, RUNNING)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> ChainState:
        """A state from JSON, salvaging what has the right type (the rest takes its default)."""
        if not isinstance(d, dict):
            return cls()
        segs = [_typed(SegmentRecord, s) for s in d.get("segments") or [] if isinstance(s, dict)]
        state = _typed(cls, {k: v for k, v in d.items() if k != "segments"})
        state.segments = [s for s in segs if s is not None]
        return state


def chain_path(rd: RunDir) -> Path:
    return rd.slurm / CHAIN_JSON


def load_state(rd: RunDir, repair: bool = False) -> ChainState:
    """The chain's state; an empty one for a run never submitted, or a file that is not JSON.

    Readers never change the file. The chain's writers pass ``repair=True``: a file that is not JSON
    (torn by a crash) is then set aside as ``chain.json.bad-<time>`` before they write a new one."""
    try:
        raw = chain_path(rd).read_text()
    except (FileNotFoundError, NotADirectoryError):
        return ChainState()
    except OSError:
        return ChainState()
    try:
        return ChainState.from_dict(json.loads(raw))
    except (ValueError, RecursionError):
        if repair:
            bad = chain_path(rd)
            bad.replace(bad.with_suffix(f".json.bad-{int(time.time())}"))
        return ChainState()


def save_state(rd: RunDir, state: ChainState) -> None:
    """Atomic replace: a reader on another node sees the old or the new file, never half of one."""
    p = chain_path(rd)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, state.to_json())


def latest_step(rd: RunDir) -> int:
    """Step of the newest complete checkpoint (0 when there is none): the chain's measure of progress."""
    from kit import checkpoint as ck

    best = 0
    if rd.checkpoints.is_dir():
        for p in rd.checkpoints.iterdir():
            s = ck.step_of(p.name)
            if s is not None and s > best and (p / ck.MANIFEST).exists():
                best = s
    return best




@functools.cache
def _hints(cls: type) -> tuple[dict[str, Any], tuple[dataclasses.Field[Any], ...]]:
    """A dataclass's resolved field types and fields (resolving them costs ~1 ms: once per class, not per
    record of a long chain)."""
    return typing.get_type_hints(cls), dataclasses.fields(cls)


def _typed(cls: type, d: dict[str, Any]) -> Any:
    """``cls(**d)`` keeping only the fields whose values have the declared type; None when a required
    field is unusable."""
    hints, fields = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields:
        if f.name in d and _fits(hints[f.name], d[f.name]):
            v = d[f.name]
            kwargs[f.name] = float(v) if hints[f.name] is float else v
    if any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs
           for f in fields):
        return None
    return cls(**kwargs)


def _fits(tp: Any, v: Any) -> bool:
    if isinstance(v, bool):
        return False  # never a bool where a number or text belongs (the record has no bool fields)
    if tp is float:
        return isinstance(v, int | float) and abs(v) < 1e18
    if tp is int:
        return isinstance(v, int) and abs(v) < 2**63
    if tp is str:
        return isinstance(v, str)
    origin = typing.get_origin(tp)
    if origin is list:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if origin is dict:
        return isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) for x in v.values())
    return False

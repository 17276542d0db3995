"""Named fault points, for tests that must break a real run at an exact place.

``KIT_FAULTS="ckpt.before_manifest@40,step.after@25:rank1"`` makes :func:`fault_point` kill the
process with SIGKILL (or hang, with ``=hang``; sleep, with ``=sleep0.5``) when the named point is
reached at that step (on the given rank only, when ``:rankN`` is given; at every Nth step, with
``name%N``: ``step.forward%2:rank1=sleep0.05`` slows rank 1 down every other step). Production runs
never set it; it costs one dict lookup.
``=enospc`` raises OSError(ENOSPC) there instead (a write that finds this rank's own disk full);
``=raise`` raises :class:`FaultInjected` (an unexpected error in the middle of an operation, to test
what is undone). ``=wait`` is a gate the test opens: the process creates ``NAME@STEP.rankR.reached`` in
the folder KIT_FAULTS_GATE, then waits until the test creates ``NAME@STEP.go`` there (:func:`reached`,
:func:`release`), so a test orders processes by events instead of by how fast each one is. Value
faults (``loss.nan@15:rank1``: that rank's loss becomes NaN) are asked with :func:`fault_active`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from kit import envvars


def _parse(spec: str) -> dict[str, list[tuple[int, int | None, str, int]]]:
    out: dict[str, list[tuple[int, int | None, str, int]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action = "kill"
        if "=" in item:
            item, action = item.split("=", 1)
        rank: int | None = None
        if ":rank" in item:
            item, r = item.split(":rank", 1)
            rank = int(r)
        name, _, step = item.partition("@")
        name, _, every = name.partition("%")
        out.setdefault(name, []).append((int(step or -1), rank, action, int(every or 0)))
    return out


_FAULTS = _parse(os.environ.get(envvars.FAULTS, ""))


class FaultInjected(RuntimeError):
    """Raised at a fault point armed with ``=raise`` (deliberately not a KitError: it stands for a bug)."""


def fault_point(name: str, step: int, rank: int) -> None:
    for at, only_rank, action, every in _FAULTS.get(name, ()):
        if at in (-1, step) and (only_rank is None or only_rank == rank) and (not every or step % every == 0):
            if action == "hang":
                while True:
                    time.sleep(3600)
            elif action == "wait":
                _wait_for_go(name, step, rank)
            elif action.startswith("sleep"):
                time.sleep(float(action[5:] or 1))
            elif action == "exit":
                os._exit(17)
            elif action == "enospc":  # a full disk of this rank's own (one machine cannot have one per rank)
                raise OSError(errno.ENOSPC, f"No space left on device (fault point {name})")
            elif action == "raise":
                raise FaultInjected(f"fault point {name} at step {step}")
            else:
                os.kill(os.getpid(), signal.SIGKILL)


def _gate(name: str, step: int) -> Path:
    folder = os.environ.get(envvars.FAULTS_GATE)
    if not folder:
        raise RuntimeError(f"fault point {name}=wait needs {envvars.FAULTS_GATE} (the test's gate folder)")
    return Path(folder) / f"{name}@{step}"


def _wait_for_go(name: str, step: int, rank: int) -> None:
    gate = _gate(name, step)
    gate.parent.mkdir(parents=True, exist_ok=True)
    gate.with_name(f"{gate.name}.rank{rank}.reached").touch()
    while not gate.with_name(gate.name + ".go").exists():
        time.sleep(0.05)


def reached(gate_dir: Path, name: str, step: int) -> list[int]:
    """Test side: the ranks that have reached the ``=wait`` fault point ``name`` at ``step`` (and wait)."""
    prefix = f"{name}@{step}.rank"
    return sorted(int(p.name[len(prefix):-len(".reached")]) for p in gate_dir.glob(f"{prefix}*.reached"))


def release(gate_dir: Path, name: str, step: int) -> None:
    """Test side: let the processes waiting at ``name`` at ``step`` go on (and any that reach it later)."""
    gate_dir.mkdir(parents=True, exist_ok=True)
    (gate_dir / f"{name}@{step}.go").touch()


def fault_active(name: str, step: int, rank: int) -> bool:
    """A value fault (``loss.nan@12:rank1``): True when armed here; the caller corrupts its own value."""
    return any(at in (-1, step) and (only is None or only == rank) and (not every or step % every == 0)
               for at, only, _, every in _FAULTS.get(name, ()))

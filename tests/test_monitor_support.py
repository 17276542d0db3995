"""Fixtures and helpers shared by the monitor's tests (this module holds no tests itself).

The monitor is tested on ledgers written by a real tiny run: two segments of the shipped tiny recipe
through kit's own launcher (real DeepSpeed ranks on CPU), generated once per session and copied for
each test that changes it. Snapshot tests use a committed copy of such a ledger instead
(tests/snapshots/monitor_run), so that their pictures do not depend on this machine's timings.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, tiny_overrides

FIXED_RUN = ROOT / "tests" / "snapshots" / "monitor_run"


def fixed_now() -> float:
    """A minute after the committed run's last event: ages on screen do not depend on today's date."""
    return last_t(FIXED_RUN) + 60.0


def last_t(run: Path) -> float:
    ts = [json.loads(line)["t"] for f in (run / "ledger").glob("*.jsonl") for line in f.read_text().splitlines()
          if line.strip()]
    return max(ts)


def make_tiny_run(base: Path) -> Path:
    """A real two-segment tiny run (resume in between), made once per session (~20-30 s)."""
    run = base / "runs" / "mon"
    if (run / "ledger" / "train-r0.jsonl").exists() and (base / "done").exists():
        return run
    from kit.config import load_recipe
    from kit.launch import create_run, run_local_segment

    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(base / "runs", "mon"))
    rd = create_run(cfg, log=lambda *a: None)
    first = run_local_segment(rd, cfg, stop_after_steps=4, seg="seg1", quiet=True)
    second = run_local_segment(rd, cfg, seg="seg2", quiet=True)
    assert (first.reason, second.reason) == ("segment_limit", "done"), (first, second)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # the monitor reads the ledger only
    shutil.rmtree(run / "data", ignore_errors=True)
    (base / "done").write_text("")
    return run


@pytest.fixture(scope="session")
def tiny_run_src(tmp_path_factory: pytest.TempPathFactory, deepspeed_ok: None) -> Path:
    # basetemp is shared by every module that imports this fixture: the run is made once
    return make_tiny_run(tmp_path_factory.getbasetemp() / "monitor-tiny-run")


@pytest.fixture
def tiny_run(tiny_run_src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "mon"
    shutil.copytree(tiny_run_src, dst)
    return dst


@pytest.fixture
def fixed_run(tmp_path: Path) -> Path:
    dst = tmp_path / "fixed"
    shutil.copytree(FIXED_RUN, dst)
    return dst


def append(run: Path, name: str, data: bytes | str) -> None:
    with open(run / "ledger" / f"{name}.jsonl", "ab") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def event(kind: str, t: float | None = None, src: str = "test", **fields: Any) -> str:
    """A raw ledger line with a chosen time (LedgerWriter always stamps now)."""
    e = {"v": 1, "t": time.time() if t is None else t, "kind": kind, "src": src, **fields}
    return json.dumps(e) + "\n"


async def wait_for(pilot: Any, cond: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.05)

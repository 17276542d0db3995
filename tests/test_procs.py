"""Process lifetimes (kit.procs): the parent-death signal, stopping a frozen child, the segment-end watch.

Real processes throughout: a launcher killed with SIGKILL, a child frozen with SIGSTOP, ledger files
appended by a real LedgerWriter. Waits are bounded and generous (2 busy cores), never fixed sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit import procs
from kit.ledger import LedgerWriter
from tests.conftest import processes_of, wait_no_processes

LAUNCHER = """
import signal, subprocess, sys, time
from kit import procs
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]],
                         preexec_fn=procs.preexec(signal.SIGKILL) if sys.argv[2] == "armed" else None)
print(child.pid, flush=True)
time.sleep(600)
"""


def _launch(tag: str, armed: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen([sys.executable, "-c", LAUNCHER, tag, armed], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def test_a_child_dies_with_its_sigkilled_launcher(no_leftovers: Path) -> None:
    """kill -9 of the launcher: the child started with procs.preexec dies too; without it, it is
    orphaned (reparented) and lives on: the defect, shown side by side."""
    armed, armed_child = _launch(f"{no_leftovers}/armed", "armed")
    bare, bare_child = _launch(f"{no_leftovers}/bare", "bare")
    for p in (armed, bare):
        p.kill()
        p.wait(timeout=60)
    assert not wait_no_processes(f"{no_leftovers}/armed", 60), "the armed child outlived its launcher"
    end = time.monotonic() + 30  # one /proc scan can miss a process (a read of its cmdline under load)
    while [pid for pid, _ in processes_of(f"{no_leftovers}/bare")] != [bare_child] and time.monotonic() < end:
        time.sleep(0.2)
    left = processes_of(f"{no_leftovers}/bare")
    assert [pid for pid, _ in left] == [bare_child], "without the parent-death signal the child is orphaned"
    os.kill(bare_child, signal.SIGKILL)
    assert armed_child != bare_child


def test_stop_ends_a_frozen_child() -> None:
    """A SIGSTOPped child acts on no signal but SIGKILL: stop() terminates, then kills it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        rc = procs.stop(child, term_wait=1.0)
        assert rc in (-signal.SIGTERM, -signal.SIGKILL)
        assert time.monotonic() - t0 < 60
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_ledger_tail_sees_only_new_segment_ends(tmp_path: Path) -> None:
    """Only events appended after the tail starts count, of the right segment, torn lines completed."""
    with LedgerWriter(tmp_path, "train-r0", seg="s1") as led:
        led.emit("segment_ended", reason="done", step=3)  # before the tail: history
    tail = procs.LedgerTail(tmp_path, "s1")
    assert tail.ended() is None
    with LedgerWriter(tmp_path, "train-r0", seg="s2") as led:
        led.emit("segment_ended", reason="done", step=4)  # another segment
    assert tail.ended() is None
    path = tmp_path / "ledger" / "watchdog-r1.jsonl"
    line = b'{"v":1,"t":1.0,"kind":"segment_ended","src":"watchdog-r1","seg":"s1","reason":"hang","step":5}\n'
    with open(path, "ab") as f:
        f.write(line[:30])  # torn: a reader on a shared filesystem can see half a line
        f.flush()
        assert tail.ended() is None
        f.write(line[30:])
    e = tail.ended()
    assert e is not None and e["reason"] == "hang" and e["src"] == "watchdog-r1"


def test_end_watch_waits_the_grace_after_the_first_trigger(tmp_path: Path) -> None:
    folder = tmp_path / "ranks"
    folder.mkdir()
    watch = procs.EndWatch(0.5, [procs.other_reports(folder, "r1.json")], poll_s=0.01)
    (folder / "r1.json").write_text("{}")  # my own report does not end my segment
    (folder / "go.json").write_text("{}")
    assert not watch.overdue() and not watch.seen
    (folder / "r0.json").write_text("{}")
    end = time.monotonic() + 30
    while not watch.overdue():
        assert time.monotonic() < end
        time.sleep(0.01)
    assert watch.seen == "rank 0's process ended" and time.monotonic() - watch.since >= 0.5


def test_arm_in_rank_exits_an_orphan_of_torchrun() -> None:
    """A rank that starts after its torchrun died (its parent is no torchrun) exits at once."""
    code = "from kit import procs; procs.arm_in_rank(); print('alive')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TORCHELASTIC_RUN_ID": "x"})
    assert out.returncode == 1 and "launcher is gone" in out.stderr and "alive" not in out.stdout
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"})
    assert out.returncode == 0 and "alive" in out.stdout


@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_pdeathsig_is_armed_in_the_child(sig: int) -> None:
    """/proc cannot show the parent-death signal, but the child can ask for it: PR_GET_PDEATHSIG."""
    code = ("import ctypes; libc = ctypes.CDLL(None); v = ctypes.c_int(); "
            "libc.prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=procs.preexec(sig))
    assert int(out.stdout) == sig

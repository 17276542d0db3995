"""Process lifetimes: no rank outlives its segment or its launcher.

Why: a rank frozen by SIGSTOP (or stuck in a driver call) never exits by itself. The hang watchdog
of the other ranks ends the segment, but a launcher that waits on its child with no limit then
waits forever: the next segment cannot start (its rendezvous misses a rank), and under Slurm the
job holds its allocation to the time limit. And a launcher killed with SIGKILL (OOM killer, a
cancelled step, an operator) leaves its ranks orphaned, training on for tens of minutes.

Two mechanisms, used by every launcher of the kit (the chain's driver, ``kit train``'s torchrun):

- the parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``): a child asks the kernel to send it a
  signal when the thread that started it exits, however it exits. :func:`preexec` arms it between
  fork and exec (no window); ranks started by torchrun, which offers no such option, arm it
  themselves at start (:func:`arm_in_rank`) and check that their launcher is still the parent;
- the segment-end watch (:class:`EndWatch`): once the segment has ended (the ledger's
  ``segment_ended``, or another rank's process has ended), a child still running after
  ``health.exit_grace_s`` is terminated, and killed :data:`TERM_WAIT_S` later (:func:`stop`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TERM_WAIT_S = 10.0  # after SIGTERM, how long a child gets before SIGKILL
LAUNCHERS = ("torch.distributed.run", "torchrun", "torch/distributed/run.py")  # what a torchrun parent runs

_libc: Any = None


def _prctl() -> Any:
    """libc's prctl, loaded once in the parent (a dlopen between fork and exec is not safe)."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(None, use_errno=True)
    return getattr(_libc, "prctl", None)


def set_pdeathsig(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) exits. False where
    the platform has no prctl (macOS): nothing is armed there."""
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    return True


def preexec(sig: int = signal.SIGKILL, then: Callable[[], None] | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for subprocess.Popen: the child gets ``sig`` when this process dies.

    Armed before exec, so there is no window in which the child is unprotected; if this process died
    between fork and prctl, the child sees another parent and exits at once."""
    parent = os.getpid()
    _prctl()  # load libc here, before the fork

    def fn() -> None:
        set_pdeathsig(sig)
        if os.getppid() != parent:
            os._exit(1)
        if then is not None:
            then()

    return fn


def arm_in_rank(environ: Any = None) -> bool:
    """Called first thing in a rank process: SIGKILL when the launcher dies.

    The chain's driver arms it before exec already (:func:`preexec`); this covers torchrun, whose
    workers start in their own session with no parent-death signal. A launcher that died before
    this call is detected too: under torchrun (TORCHELASTIC_RUN_ID set) the parent must still be a
    torchrun process, else this rank is an orphan and exits."""
    e = os.environ if environ is None else environ
    if not set_pdeathsig(signal.SIGKILL):
        return False
    if e.get("TORCHELASTIC_RUN_ID") and not _is_launcher(os.getppid()):
        print(f"kit: rank {e.get('RANK', '?')}: its torchrun launcher is gone (parent pid {os.getppid()}); "
              "exiting", file=sys.stderr, flush=True)
        os._exit(1)
    return True


def _is_launcher(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return True  # no /proc to ask (not Linux): trust the parent-death signal alone
    return any(name in cmd for name in LAUNCHERS)


# ------------------------------------------------------------------------------------ ending a child


def stop(proc: subprocess.Popen[Any], term_wait: float = TERM_WAIT_S) -> int:
    """End a child: SIGTERM (and SIGCONT: a stopped process acts on nothing else), then SIGKILL
    after ``term_wait`` seconds. Returns its exit status."""
    for sig in (signal.SIGTERM, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        return proc.wait(timeout=term_wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        return proc.wait()


class LedgerTail:
    """Follows the ledger of a run from where its files end now, for ``segment_ended`` of one segment.

    The ledger's own reader (kit.ledger.Follower), started at the end of each file: only the bytes
    appended since construction are read (a months-long run's ledger is large), and only lines that
    can be ``segment_ended`` are parsed."""

    def __init__(self, run_dir: str | Path, seg: str) -> None:
        from kit.ledger import Cursor, Follower, ledger_dir

        self.seg = seg
        self.follower = Follower(ledger_dir(run_dir), kinds=frozenset({"segment_ended"}))
        for name in self.follower.files():
            with contextlib.suppress(OSError):  # a file that vanished meanwhile is read from its start
                st = os.stat(self.follower.ledger_dir / name)
                self.follower.cursors[name] = Cursor(offset=st.st_size, inode=st.st_ino)

    def ended(self) -> dict[str, Any] | None:
        """The first new ``segment_ended`` event of the segment, or None."""
        events, _ = self.follower.poll()
        return next((e for e in events if e.get("seg") == self.seg), None)


class EndWatch:
    """Decides when a still-running child must be stopped: ``grace_s`` after its segment ended.

    ``triggers`` are cheap checks run at each poll; each returns a description of the end it sees
    (another rank's exit report, a ledger ``segment_ended``) or "". The first one seen starts the
    grace period; ``overdue()`` says when it has run out."""

    def __init__(self, grace_s: float, triggers: list[Callable[[], str]], poll_s: float = 1.0) -> None:
        self.grace_s = grace_s
        self.triggers = triggers
        self.poll_s = poll_s
        self.seen = ""  # what ended the segment
        self.since = 0.0
        self._next = 0.0

    def overdue(self) -> bool:
        now = time.monotonic()
        if not self.seen and now >= self._next:
            self._next = now + self.poll_s
            for trigger in self.triggers:
                why = trigger()
                if why:
                    self.seen, self.since = why, now
                    break
        return bool(self.seen) and now - self.since >= self.grace_s


def other_reports(folder: Path, mine: str) -> Callable[[], str]:
    """A trigger: another rank's driver wrote its exit report (``r<rank>.json``) in ``folder``."""

    def check() -> str:
        try:
            names = [e.name for e in os.scandir(folder) if e.name.startswith("r") and e.name.endswith(".json")]
        except FileNotFoundError:
            return ""
        others = sorted(n for n in names if n != mine)
        return f"rank {others[0][1:-5]}'s process ended" if others else ""

    return check


def ledger_ended(tail: LedgerTail) -> Callable[[], str]:
    """A trigger: the ledger has the segment's ``segment_ended`` (the trainer's or the watchdog's)."""

    def check() -> str:
        e = tail.ended()
        return f"segment_ended ({e.get('reason', '?')}) from {e.get('src', '?')}" if e else ""

    return check

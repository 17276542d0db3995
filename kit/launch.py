"""Local launches: prepare a run directory and start ranks with torch's launcher (torchrun).

Under Slurm the chain (kit.jobs) launches ranks through submitit instead; both end in kit.segment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit import envvars, exitcodes, opcache, procs
from kit.config import RunConfig
from kit.data import prepare
from kit.errors import KitError
from kit.ledger import LedgerWriter, read_all
from kit.ledger.schema import end_outcome
from kit.progress import NO_BARS, PREFIX, Bars
from kit.rundir import RunDir


def create_run(cfg: RunConfig, log: object = print, bars: Bars = NO_BARS) -> RunDir:
    """Create (or reopen, with the same frozen config) the run directory and prepare its data (``bars``:
    the CLI's progress bars, kit.progress)."""
    rd = RunDir(cfg.run_dir)
    new = rd.create(cfg)
    if new:
        with LedgerWriter(rd.path, "cli") as led:
            led.emit("run_created", name=cfg.run.name, config_digest=cfg.digest())
    data_dir = Path(cfg.data.prepared) if cfg.data.prepared else rd.data
    prepare(cfg, data_dir, log=log, bars=bars)
    return rd


def torchrun_cmd(run_dir: Path, nproc: int, stop_after_steps: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "kit.segment", str(run_dir), "--boundary-exit-code", "0"]
    if stop_after_steps:
        cmd += ["--stop-after-steps", str(stop_after_steps)]
    return cmd


@dataclass(frozen=True, slots=True)
class SegmentOutcome:
    returncode: int
    reason: str  # the trainer's segment_ended reason, or "crashed" when there is none
    step: int
    event: dict[str, Any] = field(default_factory=dict)  # the segment_ended event itself (its details)

    @property
    def exit_code(self) -> int:
        return exitcodes.REASONS.get(self.reason, self.returncode or 1)


def run_local_segment(rd: RunDir, cfg: RunConfig, stop_after_steps: int = 0, seg: str = "local",
                      extra_env: dict[str, str] | None = None, quiet: bool = False,
                      lines: Callable[[str], None] | None = None) -> SegmentOutcome:
    """One segment on this machine with trainer.nproc ranks; says how it ended (from the ledger).

    ``quiet``: the ranks' output is not shown, except their live step lines when ``lines`` takes them
    (kit.progress; ``kit demo`` shows those alone).

    torchrun dies with this process (parent-death signal; its ranks arm their own, kit.procs), and
    once the ledger says the segment ended, a torchrun still running after health.exit_grace_s (a
    rank stuck in its teardown) is terminated, then killed: no rank outlives the segment."""
    cfg.check_layout(cfg.trainer.nproc, "trainer.nproc (the local ranks)")
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(cfg.trainer.threads), envvars.SEGMENT: seg,
                "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1"})
    opcache.set_extensions_dir(env)
    env.update(extra_env or {})
    stale = opcache.stale_locks([Path(env[opcache.ENV])])
    if stale:  # every rank would wait on it forever, silently
        raise KitError(f"stale DeepSpeed build lock {stale[0].path} ({stale[0].age_s / 60:.0f} min old, no process "
                       f"building): the ranks would wait on it forever; remove it: {stale[0].command}")
    forward = quiet and lines is not None
    out: Any = subprocess.PIPE if forward else subprocess.DEVNULL if quiet else None
    watch = procs.EndWatch(cfg.health.exit_grace_s, [procs.ledger_ended(procs.LedgerTail(rd.path, seg))])
    # SIGTERM, not SIGKILL, for torchrun itself: it then ends its ranks (which also die with it).
    proc = subprocess.Popen(torchrun_cmd(rd.path, cfg.trainer.nproc, stop_after_steps), env=env, stdout=out,
                            stderr=subprocess.DEVNULL if quiet else None, preexec_fn=procs.preexec(signal.SIGTERM),
                            text=forward, errors="replace" if forward else None)
    reader = threading.Thread(target=_forward, args=(proc.stdout, lines), daemon=True) if forward else None
    if reader is not None:
        reader.start()
    stopped = False  # by the watch: the segment had ended, its teardown had not
    try:
        while proc.poll() is None:
            if watch.overdue():
                print(f"kit: the segment ended ({watch.seen}) but torchrun (pid {proc.pid}) is still running after "
                      f"health.exit_grace_s = {cfg.health.exit_grace_s:g} s; terminating it", file=sys.stderr)
                procs.stop(proc)
                stopped = True
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:  # an exception here (Ctrl-C): torchrun ends its ranks on SIGTERM
            procs.stop(proc, term_wait=60.0)
    returncode = int(proc.returncode)
    if reader is not None:
        reader.join(timeout=10.0)
    ended = [e for e in read_all(rd.path, {"segment_ended"}) if e.get("seg") == seg]
    if not ended:
        return SegmentOutcome(returncode, "crashed", -1)
    # The ledger is authoritative: torchrun turns any rank's non-zero status (a hang the watchdog
    # ended, a give-up) into 1, but the trainer or the watchdog wrote why before it exited.
    last = ended[-1]
    if returncode != 0 and not stopped and end_outcome(last["reason"]) in ("finished", "clean") \
            and last["reason"] != "give_up":
        return SegmentOutcome(returncode, "crashed", last["step"])  # died after ending cleanly?
    return SegmentOutcome(returncode, last["reason"], last["step"], last)


def _forward(stream: Any, lines: Callable[[str], None] | None) -> None:
    """Read the ranks' output to its end (a full pipe would block them), passing on the step lines."""
    for line in stream:
        if lines is not None and line.startswith(PREFIX):
            lines(line.rstrip())

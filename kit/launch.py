"""Local launches: prepare a run directory and start ranks with torch's launcher (torchrun).

Under Slurm the chain (kit.jobs) launches ranks through submitit instead; both end in kit.segment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kit import envvars, exitcodes
from kit.config import RunConfig
from kit.data import prepare
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

    @property
    def exit_code(self) -> int:
        return exitcodes.REASONS.get(self.reason, self.returncode or 1)


def run_local_segment(rd: RunDir, cfg: RunConfig, stop_after_steps: int = 0, seg: str = "local",
                      extra_env: dict[str, str] | None = None, quiet: bool = False,
                      lines: Callable[[str], None] | None = None) -> SegmentOutcome:
    """One segment on this machine with trainer.nproc ranks; says how it ended (from the ledger).

    ``quiet``: the ranks' output is not shown, except their live step lines when ``lines`` takes them
    (kit.progress; ``kit demo`` shows those alone)."""
    cfg.check_layout(cfg.trainer.nproc, "trainer.nproc (the local ranks)")
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(cfg.trainer.threads), envvars.SEGMENT: seg,
                "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1"})
    env.update(extra_env or {})
    cmd = torchrun_cmd(rd.path, cfg.trainer.nproc, stop_after_steps)
    if quiet and lines is not None:
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              errors="replace") as p:
            assert p.stdout is not None
            for line in p.stdout:  # read to the end: a full pipe would block the ranks
                if line.startswith(PREFIX):
                    lines(line.rstrip())
        returncode = p.returncode
    else:
        out = subprocess.DEVNULL if quiet else None
        returncode = subprocess.run(cmd, env=env, stdout=out, stderr=out).returncode
    ended = [e for e in read_all(rd.path, {"segment_ended"}) if e.get("seg") == seg]
    if not ended:
        return SegmentOutcome(returncode, "crashed", -1)
    # The ledger is authoritative: torchrun turns any rank's non-zero status (a hang the watchdog
    # ended, a give-up) into 1, but the trainer or the watchdog wrote why before it exited.
    last = ended[-1]
    if returncode != 0 and end_outcome(last["reason"]) in ("finished", "clean") and last["reason"] != "give_up":
        return SegmentOutcome(returncode, "crashed", last["step"])  # died after ending cleanly?
    return SegmentOutcome(returncode, last["reason"], last["step"])

"""The run directory: the contract between the job, the monitor and the tools.

Layout (documented in docs/run-directory.md)::

    runs/<name>/
      run.toml        resolved, frozen config of the whole chain (written once, checked after)
      ledger/         append-only JSON Lines, one file per writer (kit.ledger)
      checkpoints/    step_000100/ ... complete once MANIFEST.json is written; `latest` (kit.checkpoint)
      tensorboard/    event files
      control/        operator switches: stop, save-now (consumed, acknowledged in the ledger)
      data/           tokenizer.json and token shards, prepared once (kit.data)
      slurm/          submitit's folder (logs of every allocation)
      exports/        converted checkpoints
      stacks/         stack dumps from the hang watchdog

The monitor and the tools only read it (the monitor writes control files on an operator's say-so).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from kit.config import RunConfig, dumps_toml, from_dict
from kit.errors import ConfigError, RunDirError
from kit.fsio import atomic_write

RUN_TOML = "run.toml"
LEDGER = "ledger"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
CONTROL = "control"
DATA = "data"
SLURM = "slurm"
EXPORTS = "exports"
STACKS = "stacks"

# Control switches: files an operator (or `kit stop`, or the monitor) creates under control/.
STOP = "stop"
SAVE_NOW = "save-now"
SWITCHES = (STOP, SAVE_NOW)
_SWITCH_SET = frozenset(SWITCHES)


class RunDir:
    """Paths of one run directory, and its creation/freezing rules."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- paths
    @property
    def run_toml(self) -> Path:
        return self.path / RUN_TOML

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def control(self) -> Path:
        return self.path / CONTROL

    @property
    def data(self) -> Path:
        return self.path / DATA

    @property
    def slurm(self) -> Path:
        return self.path / SLURM

    @property
    def exports(self) -> Path:
        return self.path / EXPORTS

    @property
    def stacks(self) -> Path:
        return self.path / STACKS

    def exists(self) -> bool:
        return _is_file(self.run_toml)

    # ---- creation
    def create(self, cfg: RunConfig) -> bool:
        """Create the directory and freeze the config; returns True if it was new.

        An existing run keeps its frozen run.toml: a recipe that changes what determines the
        arithmetic (model, data, optimizer, batch, seed, ZeRO) is refused, so a resubmission
        cannot silently train a different model into the same checkpoints.
        """
        new = not self.exists()
        try:
            for sub in (LEDGER, CHECKPOINTS, TENSORBOARD, CONTROL, DATA, SLURM, EXPORTS, STACKS):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise RunDirError(
                f"run directory {self.path} is not writable ({e.strerror}); choose another run.runs_dir "
                "or fix its permissions"
            ) from None
        if new:
            atomic_write(self.run_toml, cfg.to_toml(), fsync=True)
        else:
            self.check_frozen(cfg)
        return new

    def check_frozen(self, cfg: RunConfig) -> None:
        """Refuse a recipe that differs from the frozen run.toml, saying what differs and what to do.

        Arithmetic keys (model, data, optimizer, batch, seed, ZeRO: RunConfig.digest) can never change
        in a run; the others (trainer.max_steps, Slurm resources...) change only through an explicit
        amendment (kit.amend: `kit amend`, or --amend on train/submit), recorded in the ledger. A
        recipe that differs is never silently ignored (the frozen value kept) nor silently applied."""
        frozen = self.load_config()
        changes = frozen.differences(cfg)
        if not changes:
            return
        shown = "; ".join(str(c) for c in changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        if frozen.digest() != cfg.digest():
            raise ConfigError(
                f"{self.run_toml} was frozen with a different model/data/optimizer/batch/seed/ZeRO setup than "
                f"this recipe ({shown}); resume with the same recipe, or give the run a new run.name")
        sets = " ".join(f"--set {shlex.quote(f'{c.key}={_toml_value(c.new)}')}" for c in changes[:3])
        raise ConfigError(
            f"run {self.path.name} is frozen with other settings than this recipe ({shown}); a run keeps its "
            f"run.toml: pass --amend to change them (recorded in the ledger), or `kit amend {self.path} {sets}`; "
            "nothing was changed")

    def load_config(self) -> RunConfig:
        import tomllib

        try:
            raw = tomllib.loads(self.run_toml.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not a run directory (no {RUN_TOML}); check the path") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RunDirError(f"{self.run_toml} cannot be read: {e}") from None
        return from_dict(raw)

    def write_frozen(self, cfg: RunConfig) -> None:
        """Rewrite run.toml; only kit.amend calls it (an amendment is checked and recorded first)."""
        atomic_write(self.run_toml, dumps_toml(cfg.to_dict()), fsync=True)

    # ---- control switches
    def request(self, switch: str, reason: str = "") -> Path:
        """Ask the running job to act (stop, save-now) at its next step boundary."""
        if switch not in SWITCHES:
            raise ValueError(f"unknown switch {switch!r}; one of {SWITCHES}")
        self.control.mkdir(parents=True, exist_ok=True)
        p = self.control / switch
        p.write_text(reason or switch)
        return p

    def pending(self, switch: str) -> bool:
        return (self.control / switch).exists()

    def pending_switches(self) -> frozenset[str]:
        """Every switch waiting, with one directory read (the trainer asks at every step)."""
        try:
            return frozenset(os.listdir(self.control)) & _SWITCH_SET
        except FileNotFoundError:
            return frozenset()

    def consume(self, switch: str) -> str | None:
        """Remove a switch file; returns its text, or None if it was not there."""
        p = self.control / switch
        try:
            text = p.read_text()
            p.unlink()
        except FileNotFoundError:
            return None
        return text


def _is_file(path: Path) -> bool:
    """Whether ``path`` is a file; False too for a name the system refuses (too long, a loop, no access)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _toml_value(value: object) -> str:
    """A value as `--set` takes it (TOML), for the advice in error messages."""
    text = dumps_toml({"x": {"v": value}}).split("\n")[1]
    return text.removeprefix("v = ")


class SwitchWatcher:
    """Rank 0's look at the control switches, at most once every ``every_s`` seconds.

    Why not a directory listing every step: on a loaded parallel filesystem (Lustre, GPFS, NFS) one
    metadata round trip takes milliseconds, sometimes tens of them, on the training thread: with short
    steps that is percents of the run (bench/switches.py measures it through a FUSE mount with added
    latency). An operator's stop or save-now does not need a reply within one step: here the first
    call looks at once (a switch left before the segment started acts at its first step), then a look
    happens at the first step that starts ``every_s`` seconds or more after the previous look. A
    switch is therefore seen within ``every_s`` plus one step of being made, and between looks
    :meth:`poll` answers "none" (never a cached answer: the trainer consumes a switch it acted on).
    ``every_s = 0`` looks at every step (the trainer's behaviour before ``trainer.control_check_s``).
    """

    def __init__(self, run_dir: RunDir, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.rd = run_dir
        self.every_s = every_s
        self.clock = clock
        self.looks = 0  # directory listings made (benchmarks and tests count them)
        self._last: float | None = None

    def poll(self) -> frozenset[str]:
        """The switches waiting now, or an empty set when it is not yet time to look."""
        now = self.clock()
        if self._last is not None and now - self._last < self.every_s:
            return frozenset()
        self._last = now
        self.looks += 1
        return self.rd.pending_switches()


def resolve_run(arg: str | Path, runs_dir: str | Path = "runs") -> RunDir:
    """A run given by path or by name (looked up under runs_dir)."""
    p = Path(arg)
    if _is_file(p / RUN_TOML):
        return RunDir(p)
    q = Path(runs_dir) / str(arg)
    if _is_file(q / RUN_TOML):
        return RunDir(q)
    raise RunDirError(f"no run directory at {p} or {q} (a run directory holds {RUN_TOML}); check the name")

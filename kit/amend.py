"""Amendments: the one way a frozen run's settings change, checked and recorded in the ledger.

A run freezes its resolved recipe in ``run.toml`` when it is created, and every segment of its chain
reads that file, never the recipe: a months-long chain trains one thing. Some settings must still
change in the life of a run — more steps (extending ``trainer.max_steps`` is routine), other Slurm
resources, a deadline, thresholds — and those go through :func:`amend`: the new config is validated
whole, arithmetic keys (model, data, optimizer, batch, seed, ZeRO: what RunConfig.digest covers) are
refused, the run's identity (name, runs_dir: where the directory is) too, and the change is an
``amended`` ledger event with every key's old and new value. ``kit amend RUN --set KEY=VALUE``,
and ``--amend`` on ``kit train`` and ``kit submit`` (the recipe's differences from run.toml), use
it; without it a differing recipe is refused (kit.rundir.RunDir.check_frozen), never silently
ignored.

A running segment keeps the settings it started with; the next segment reads the amended run.toml.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass

from kit import checkpoint as ck
from kit.config import IDENTITY_KEYS, Change, RunConfig, apply_override, from_dict
from kit.errors import ConfigError
from kit.ledger import LedgerWriter, hostname
from kit.rundir import RunDir


@dataclass(frozen=True, slots=True)
class Amendment:
    """What an amendment changed, and notes on what follows from it (said to the operator and logged)."""

    changes: list[Change]
    notes: list[str]


def check(rd: RunDir, frozen: RunConfig, new: RunConfig, changes: list[Change]) -> list[str]:
    """Refuse what cannot be amended; returns notes on consequences of what can."""
    fixed = [c for c in changes if c.arithmetic]
    if fixed:
        raise ConfigError(
            f"cannot amend {', '.join(c.key for c in fixed)} of run {rd.path.name}: model, data, optimizer, batch, "
            "seed and ZeRO settings are the arithmetic every checkpoint of the run was trained with; start a new "
            "run (another run.name) to change them; nothing was changed")
    notes: list[str] = []
    if any(c.key == "trainer.max_steps" for c in changes):
        newest = ck.newest_complete_step(rd.checkpoints)
        if newest is not None and new.trainer.max_steps < newest:
            raise ConfigError(f"trainer.max_steps = {new.trainer.max_steps} is below the run's newest checkpoint "
                              f"(step {newest}); give at least {newest}; nothing was changed")
        if new.optim.decay_steps == 0:
            notes.append(f"optim.decay_steps = 0: the cosine decay follows trainer.max_steps, so from the next "
                         f"segment on the learning rate follows a {new.trainer.max_steps}-step schedule instead of "
                         f"{frozen.trainer.max_steps}")
    return notes


def amend(rd: RunDir, new: RunConfig, who: str, reason: str = "", log: Callable[[str], None] = print) -> Amendment:
    """Make ``new`` the run's frozen config after :func:`check`; the ledger gets an ``amended`` event
    (if it cannot be written, run.toml is put back and the error raised: never an unrecorded change)."""
    frozen = rd.load_config()
    changes = frozen.differences(new)
    if not changes:
        return Amendment([], [])
    new.check()
    notes = check(rd, frozen, new, changes)
    old_text = rd.run_toml.read_text()
    rd.write_frozen(new)
    try:
        with LedgerWriter(rd.path, f"amend-{hostname()}-{os.getpid()}") as led:
            led.emit("amended", changes=[{"key": c.key, "old": c.old, "new": c.new} for c in changes], by=who,
                     reason=reason, notes=notes, config_digest=new.digest())
    except BaseException:
        from kit.fsio import atomic_write

        atomic_write(rd.run_toml, old_text, fsync=True)
        raise
    for c in changes:
        log(f"amended {rd.path.name}: {c}")
    for note in notes:
        log(f"note: {note}")
    return Amendment(changes, notes)


def amend_overrides(rd: RunDir, overrides: list[str], who: str, reason: str = "",
                    log: Callable[[str], None] = print) -> Amendment:
    """``kit amend``: apply ``dotted.key=value`` overrides to the frozen run.toml (not to a recipe)."""
    if not overrides:
        raise ConfigError("nothing to amend: give one or more --set KEY=VALUE, e.g. --set trainer.max_steps=20000")
    try:
        raw = tomllib.loads(rd.run_toml.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{rd.run_toml} cannot be read ({e}); restore it before amending") from None
    moved = [item.partition("=")[0].strip() for item in overrides if item.partition("=")[0].strip() in IDENTITY_KEYS]
    if moved:
        raise ConfigError(f"cannot amend {', '.join(moved)}: they say where the run is; move the run directory "
                          "instead, or start a new run; nothing was changed")
    for item in overrides:
        apply_override(raw, item)
    new = from_dict(raw)
    result = amend(rd, new, who, reason, log)
    if not result.changes:
        log(f"{rd.path.name}: run.toml already has these values; nothing to amend")
    return result

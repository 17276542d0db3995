"""The Apptainer build command, composed from the pins, and the recipe's container checks.

Why composed and not hand-written: the build must pass every pin as a ``--build-arg`` (the
definition files hold no version). The list is compared with golden files in tests (Apptainer
cannot be installed here) and ``kit container build`` runs exactly this list. The ``apptainer
exec`` line of a segment has one composer too, the chain's (kit.jobs.command.segment_command,
golden file tests/test_chain_command.golden).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from kit.config import RunConfig
from kit.containers.pins import Pins, PinsError
from kit.errors import ConfigError

APPTAINER = "apptainer"
_ARG = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def definition_path(pins: Pins, target: str) -> Path:
    return pins.path.parent / pins.target(target).definition


def definition_args(text: str) -> list[str]:
    """The ``{{ KEY }}`` build arguments a definition file uses, in first-use order."""
    return list(dict.fromkeys(_ARG.findall(text)))


def render(text: str, args: dict[str, str], where: str = "definition") -> str:
    """Substitute ``{{ KEY }}`` as Apptainer does at build time; a key without a value is an error
    (Apptainer would refuse the build too), so tests can check the rendered file."""
    missing = [k for k in definition_args(text) if k not in args]
    if missing:
        raise PinsError(f"{where} uses {{{{ {missing[0]} }}}} but the pins provide no such build argument")
    return _ARG.sub(lambda m: args[m.group(1)], text)


def build_command(pins: Pins, target: str, output: str | Path, kit_src: str | Path, kit_commit: str,
                  force: bool = False) -> list[str]:
    """``apptainer build`` with one ``--build-arg`` per argument the target's definition file uses.

    Only the arguments the file uses are passed: Apptainer warns about unused ones, and a golden
    file of the command then shows exactly what reaches the image.
    """
    defn = definition_path(pins, target)
    args = pins.build_args(target, kit_src)
    args["KIT_COMMIT"] = kit_commit
    used = definition_args(defn.read_text())
    render(defn.read_text(), args, where=str(defn))  # every used key has a value
    cmd = [APPTAINER, "build"]
    if force:
        cmd.append("--force")
    for key in args:  # the pins' order (base, target, stack, kit), not the file's
        if key in used:
            cmd += ["--build-arg", f"{key}={args[key]}"]
    cmd += [str(output), str(defn)]
    return cmd


def check_recipe(cfg: RunConfig, recipe: str | Path = "the recipe", pins: Pins | None = None) -> Path | None:
    """The recipe's container settings before anything runs: a known target, an existing image.
    Returns the image (None when the recipe runs on the host environment)."""
    if cfg.container.target:
        from kit.containers.pins import load_pins

        p = pins or load_pins()
        if cfg.container.target not in p.targets:
            raise ConfigError(f"{recipe}: container.target = {cfg.container.target!r} is not a target of {p.path} "
                              f"(known: {', '.join(sorted(p.targets))})")
    return check_image(cfg, recipe)


def check_image(cfg: RunConfig, recipe: str | Path = "the recipe") -> Path | None:
    """The recipe's image, which must exist (None when the recipe runs on the host environment)."""
    if not cfg.container.image:
        return None
    p = Path(cfg.container.image).expanduser()
    if not p.is_file():
        hint = f"`kit container build {cfg.container.target or 'TARGET'}`"
        raise ConfigError(f"{recipe}: container.image = {cfg.container.image!r} does not exist; build it with "
                          f"{hint} or fix the path")
    return p


def format_command(cmd: Sequence[str]) -> str:
    """One option per line after the verb, then the positional tail, shell-quoted: what the golden
    files hold and what a person can paste into a shell."""
    head: list[str] = []
    rest = list(cmd)
    while rest and not rest[0].startswith("-") and len(head) < 2:
        head.append(rest.pop(0))
    lines = [shlex.join(head)]
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        if rest[i] in ("--build-arg", "--bind") and i + 1 < len(rest):
            lines.append(shlex.join(rest[i:i + 2]))
            i += 2
        else:
            lines.append(shlex.quote(rest[i]))
            i += 1
    if i < len(rest):
        lines.append(shlex.join(rest[i:]))  # the positional tail: image/output, then the command
    return " \\\n    ".join(lines) + "\n"

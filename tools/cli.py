"""The ``kit`` command: one verb table, each verb in its own module, imported only when used.

Why lazy: ``kit status`` on a login node must not pay for importing DeepSpeed or Textual, and
importing kit must not import them (DESIGN.md). A verb module exposes ``add_arguments(parser)`` and
``run(args) -> int``. Expected failures raise :class:`kit.errors.KitError`: one red line on stderr,
exit 1, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from kit.errors import KitError

# verb -> (module, one-line help). Modules live under kit (kit/), kit.jobs (jobs/), kit.monitor
# (monitor/) and kit.tools (tools/), following the dependency direction of DESIGN.md.
VERBS: dict[str, tuple[str, str]] = {
    "validate": ("kit.tools.commands", "check a recipe (and --set overrides); print the resolved config"),
    "amend": ("kit.tools.amend", "change a run's frozen settings (max_steps, Slurm resources...), recorded"),
    "plan": ("kit.tools.commands", "size a recipe: parameters, batch, tokens, FLOPs and memory per GPU"),
    "train": ("kit.tools.commands", "run one segment on this machine with torchrun (no Slurm)"),
    "demo": ("kit.tools.commands", "the embedded default: a small multilingual run, end to end, on this machine"),
    "submit": ("kit.jobs.cli", "submit a run as a self-resubmitting chain of Slurm allocations"),
    "status": ("kit.jobs.cli", "state of a run's chain, segments, progress and finish estimate"),
    "stop": ("kit.jobs.cli", "graceful stop: save at the next step and end the chain"),
    "cancel": ("kit.jobs.cli", "cancel the chain's Slurm job now (no save)"),
    "monitor": ("kit.monitor.cli", "watch runs live in a terminal UI (or --once for scripts)"),
    "convert": ("kit.tools.convert", "convert a DeepSpeed checkpoint to a Hugging Face model"),
    "reshape": ("kit.tools.reshape", "make a checkpoint resumable on another data-parallel size"),
    "upload": ("kit.tools.upload", "upload a folder to any fsspec URL, resumably, manifest last"),
    "verify": ("kit.tools.upload", "check an uploaded folder (or a checkpoint) against its manifest"),
    "stream": ("kit.tools.stream", "follow a live run: verify, convert, upload new checkpoints"),
    "spikes": ("kit.tools.spikes", "list and explain loss spikes (Markdown + PNG report, JSON)"),
    "goodput": ("kit.tools.goodput", "where every allocated second went (ETTR), restart costs, projection"),
    "doctor": ("kit.tools.doctor", "preflight: versions, GPUs, all-reduce bandwidth, checkpoint filesystem"),
    "container": ("kit.tools.container", "compose and run the Apptainer build of a pinned image"),
}


def _top_help() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: kit VERB [options]   (kit VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"kit {version('kit')}")
        return 0
    verb = argv[0]
    if verb not in VERBS:
        import difflib

        near = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"; did you mean `kit {near[0]}`?" if near else "; see `kit --help`"
        _error(f"unknown verb {verb!r}{hint}")
        return 2
    module_name, text = VERBS[verb]
    from kit import opcache

    opcache.set_extensions_dir()  # DeepSpeed's ops build in this install's cache, never a shared one
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(module_name):
            _error(f"`kit {verb}` is not available in this version of kit")
            return 2
        raise
    parser = KitParser(prog=f"kit {verb}", description=text)
    module.add_arguments(parser, verb)
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit as e:  # --help (0) or a malformed option (2, after one `kit: error:` line)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(module.run(args, verb) or 0)
    except KitError as e:
        _error(str(e))
        return e.exit_code
    except OSError as e:
        if e.errno not in PATH_ERRNOS or not e.filename:
            raise  # not about a path the operator gave: a bug, keep its traceback
        _error(f"cannot use {e.filename}: {e.strerror}; check the path")
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


# An OSError about a path itself (too long, a loop, a file where a folder belongs, no permission, a
# full or read-only filesystem) from a path an operator gave: one line naming it, whatever verb met it.
PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                         errno.EROFS, errno.ENOSPC, errno.EDQUOT})


def _error(msg: str) -> None:
    red, end = ("\033[31m", "\033[0m") if sys.stderr.isatty() else ("", "")
    print(f"{red}kit: error: {msg}{end}", file=sys.stderr)


class KitParser(argparse.ArgumentParser):
    """argparse, with its errors in the kit's form: the usage line, then one ``kit: error:`` line naming
    the verb and the option, exit 2 (subparsers, e.g. ``kit container build``, inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        _error(f"{self.prog}: {message}")
        sys.exit(2)


# ------------------------------------------------------------------------- shared argument types
# argparse ``type=`` functions: a bad value is one `kit: error:` line naming the option, before the
# verb does anything (``--jobs 0`` used to end in a traceback, ``--keep-last -2`` in deleted data).


def count(minimum: int) -> Callable[[str], int]:
    """An integer option of at least ``minimum`` (1 for counts of workers and ranks, 0 where 0 means
    off or default, as the option's help says)."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if value >= 2**63:
            raise argparse.ArgumentTypeError(f"is too large: {text}")
        return value

    parse.__name__ = "count"
    return parse


def seconds(minimum: float = 0.0, strict: bool = False) -> Callable[[str], float]:
    """A finite number of at least ``minimum`` (more than it when ``strict``): periods, backoffs,
    tolerances, speeds."""

    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'greater than' if strict else 'at least'} {minimum:g}, "
                                             f"got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def out_dir(text: str) -> Path:
    """A local folder to write into: it may not exist yet, but it is not an existing file, and nothing
    on its way is a file (``--report results.txt/x`` would fail only after the work)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder; choose another path")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {text} cannot be a folder under it")
            break
    return path


POSITIVE = count(1)
NONNEGATIVE = count(0)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The recipe argument and its overrides, the same on every verb that takes a recipe."""
    p.add_argument("recipe", help="TOML recipe (a path, or the name of one shipped in jobs/, e.g. tiny.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set trainer.max_steps=200 (repeatable)")


def add_amend_arg(p: argparse.ArgumentParser) -> None:
    """``--amend`` on the verbs that reopen an existing run (train, submit)."""
    p.add_argument("--amend", action="store_true",
                   help="the run exists and this recipe changes some of its frozen settings (e.g. "
                        "trainer.max_steps, slurm.*): apply them, recorded in the ledger (kit amend)")


if __name__ == "__main__":
    sys.exit(main())

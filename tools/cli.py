"""The ``kit`` command: one verb table, each verb in its own module, imported only when used.

Why lazy: ``kit status`` on a login node must not pay for importing DeepSpeed or Textual, and
importing kit must not import them (DESIGN.md). A verb module exposes ``add_arguments(parser)`` and
``run(args) -> int``. Expected failures raise :class:`kit.errors.KitError`: one red line on stderr,
exit 1, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kit.errors import KitError

# verb -> (module, one-line help). Modules live under kit (kit/), kit.jobs (jobs/), kit.monitor
# (monitor/) and kit.tools (tools/), following the dependency direction of DESIGN.md.
VERBS: dict[str, tuple[str, str]] = {
    "validate": ("kit.tools.commands", "check a recipe (and --set overrides); print the resolved config"),
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
    parser = argparse.ArgumentParser(prog=f"kit {verb}", description=text)
    module.add_arguments(parser, verb)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args, verb) or 0)
    except KitError as e:
        _error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _error(msg: str) -> None:
    red, end = ("\033[31m", "\033[0m") if sys.stderr.isatty() else ("", "")
    print(f"{red}kit: error: {msg}{end}", file=sys.stderr)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The recipe argument and its overrides, the same on every verb that takes a recipe."""
    p.add_argument("recipe", help="TOML recipe (a path, or the name of one shipped in jobs/, e.g. tiny.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set trainer.max_steps=200 (repeatable)")


if __name__ == "__main__":
    sys.exit(main())

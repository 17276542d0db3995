"""Every verb's options, fuzzed (issue 14): no operator mistake ends in a traceback.

For each verb, hypothesis builds command lines from the verb's own parser (its options, positionals,
choices and sub-commands, read from argparse) with values drawn from what operators get wrong:
negative and zero counts, huge and non-finite numbers, text where numbers belong, paths under a file,
a file where a folder belongs, folders that are not runs, malformed URLs and bucket names, every
recipe key with a bad value. ``kit.tools.cli.main`` runs in-process; the only outcomes allowed are
exit 0, 1 or 2 (and a verb's documented statuses: ``kit monitor --once`` and ``kit status
--exit-status`` 0/1/2, ``kit doctor`` 76) with a ``kit: error:`` line for every failure, never an
exception.

Nothing long may start: runs are looked up in an empty temporary folder (no run exists, so verbs
that follow, convert or upload a run stop at their checks), no URL reaches a network (only malformed
S3 names, which fail before any request, and local paths). Where a verb gets past all its checks
into long work, the fuzz stops it at that boundary — creating the run and preparing its data (train,
demo, submit), the preflight (doctor), the terminal UI (monitor) — by raising a marker the test
counts as "accepted". The checks before those boundaries, sbatch --test-only included, are real.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit.config import describe_keys
from kit.tools import cli
from tests.conftest import ROOT


class Accepted(BaseException):
    """Raised where a verb's long work would start."""


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise Accepted()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An empty working folder (./runs holds no run), a file, a folder, and the long-work boundaries."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "a-file").write_text("not a folder")
    (root / "a-dir").mkdir()
    old = os.getcwd()
    os.chdir(root)
    with pytest.MonkeyPatch.context() as mp:
        import kit.launch
        import kit.monitor.app
        import kit.tools.doctor

        mp.setattr(kit.launch, "create_run", _stop)  # train, demo, submit: past every check
        mp.setattr(kit.tools.doctor, "preflight", _stop)
        mp.setattr(kit.monitor.app, "make_app", _stop)
        mp.setenv("KIT_FAULTS", "")
        try:
            yield {"file": str(root / "a-file"), "dir": str(root / "a-dir"), "root": str(root)}
        finally:
            os.chdir(old)


NUMBERS = ["-1", "0", "-2", "1", "3", "0.5", "-0.5", "1e999", "nan", "inf", "-inf", "99999999999999999999999",
           "abc", "", " ", "1,2", "0x10", "1_000"]
TEXT = ["x", "é", "../x", "-", "a b", "--", "/dev/null", "tiny.toml", "nope.toml", "s3://Bad_Name!/x",
        "s3://ab/x", "file:///nonexistent/x", "runs", "::", "$HOME", "x" * 300]
RECIPES = ["tiny.toml", "bloom-560m.toml", "bloom-176b.toml", "nope.toml", ""]
SET_VALUES = ["-1", "0", "1", "2", "-3", "1e999", "nan", "inf", "99999999999999999999999", "'abc'", "abc", "''",
              "true", "[]", "[1, 2]", "{a = 1}", "'1-00:00:00'", "20:00:00", "1979-05-27", "'x y'", "0.5", "[['a']]",
              "{zero_optimization = {stage = 3}}", "{bf16 = {enabled = true}}", "'/dev/null'", "\"", "=", "'é'"]
KEYS = [*describe_keys(), "deepspeed.extra.x", "slurm.sbatch_args.gres", "slurm.sbatch_args.time", "run", "nope.key",
        "trainer.max_stepz", ""]


def _paths(box: dict[str, str]) -> list[str]:
    return [box["file"], f"{box['file']}/under", box["dir"], f"{box['root']}/nothing", f"file://{box['dir']}/up"]


def _value(action: argparse.Action, box: dict[str, str]) -> st.SearchStrategy[str]:
    if action.choices:
        return st.sampled_from([*map(str, action.choices), "nope", ""])
    if action.dest == "overrides":
        return st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(SET_VALUES)) | st.sampled_from(
            ["batch", "=1", "a..b=1", "trainer.max_steps"])
    if action.dest == "recipe":
        return st.sampled_from([*RECIPES, *_paths(box)])
    if action.type is not None and action.type is not str:
        return st.sampled_from(NUMBERS + _paths(box)[:2])
    # any text but NUL, which no real command line can hold (argv entries are C strings)
    return st.sampled_from(TEXT + _paths(box)) | st.text(st.characters(exclude_characters="\x00"), max_size=8)


def _argv(parser: argparse.ArgumentParser, box: dict[str, str]) -> st.SearchStrategy[list[str]]:
    """Command lines for one parser: each option maybe, each positional, sub-commands recursively."""
    parts: list[st.SearchStrategy[list[str]]] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            subs = [st.tuples(st.just(name), _argv(sub, box)).map(lambda t: [t[0], *t[1]])
                    for name, sub in action.choices.items()]
            parts.append(st.one_of(subs) | st.just(["nope"]))
            continue
        flag = action.option_strings[-1] if action.option_strings else ""
        if flag and action.nargs == 0:
            parts.append(st.sampled_from([[], [flag]]))
        elif flag:
            one = _value(action, box).map(lambda v, f=flag: [f, v])
            many = st.lists(one, max_size=3).map(lambda xs: [a for x in xs for a in x])
            parts.append(many if isinstance(action, argparse._AppendAction) else st.one_of(st.just([]), one))
        elif action.nargs in ("+", "*"):
            parts.append(st.lists(_value(action, box), min_size=1, max_size=3))
        elif action.nargs == "?":
            parts.append(st.one_of(st.just([]), _value(action, box).map(lambda v: [v])))
        else:
            parts.append(_value(action, box).map(lambda v: [v]))
    return st.tuples(*parts).map(lambda ps: [a for p in ps for a in p]) if parts else st.just([])


def _parser(verb: str) -> argparse.ArgumentParser:
    import importlib

    module = importlib.import_module(cli.VERBS[verb][0])
    parser = cli.KitParser(prog=f"kit {verb}")
    module.add_arguments(parser, verb)
    return parser


EXTRA_OK = {"monitor": {0, 1, 2}, "status": {0, 1, 2}, "doctor": {0, 1, 2, 76}}
SCALE = float(os.environ.get("KIT_FUZZ_SCALE", "1"))  # e.g. 20 for a long hunt; CI runs the default
EXAMPLES = {"submit": 15, "demo": 15, "train": 20, "doctor": 15}


def run_kit(argv: list[str]) -> tuple[int | None, str, str]:
    """`kit ARGV` in this process; the environment is put back after (`kit doctor` completes a bare
    process's torch.distributed variables, as it should in its own process)."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc: int | None = cli.main(argv)
        except Accepted:
            rc = None
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return rc, out.getvalue(), err.getvalue()


def test_the_fuzz_reaches_both_refusals_and_acceptance(sandbox: dict[str, str]) -> None:
    """The boundaries are where the docstring says: a valid train is accepted (stopped at create_run),
    a bad option is a usage error, a bad recipe value a one-line error."""
    assert run_kit(["train", str(ROOT / "jobs" / "tiny.toml")])[0] is None
    rc, _, err = run_kit(["train", "tiny.toml", "--stop-after-steps", "-1"])
    assert rc == 2 and "kit: error: kit train: argument --stop-after-steps: must be at least 0, got -1" in err
    rc, _, err = run_kit(["upload", sandbox["dir"], "x", "--jobs", "0"])
    assert rc == 2 and "argument --jobs: must be at least 1, got 0" in err
    rc, _, err = run_kit(["upload", sandbox["dir"], "x", "--retries", "-1"])
    assert rc == 2 and "argument --retries: must be at least 0, got -1" in err
    rc, _, err = run_kit(["plan", "tiny.toml", "--set", "slurm.nodes=0"])
    assert rc == 1 and err.strip() == "kit: error: slurm.nodes must be at least 1, got 0"
    rc, _, err = run_kit(["spikes", "x", "--report", f"{sandbox['file']}/report"])
    assert rc == 2 and "is a file, so" in err


@pytest.mark.parametrize("verb", sorted(cli.VERBS))
def test_no_option_of_any_verb_ends_in_a_traceback(verb: str, sandbox: dict[str, str]) -> None:
    parser = _parser(verb)

    @settings(max_examples=int(EXAMPLES.get(verb, 40) * SCALE), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(argv=_argv(parser, sandbox))
    def check(argv: list[str]) -> None:
        try:
            rc, _out, err = run_kit([verb, *argv])
        except Exception as e:
            raise AssertionError(f"kit {verb} {argv}: {type(e).__name__}: {e}") from e
        if rc is None:
            return  # got past every check to where its long work starts
        assert rc in {0, 1, 2} | EXTRA_OK.get(verb, set()), (argv, rc, err)
        assert "Traceback" not in err, (argv, err)
        if rc != 0 and not (verb in EXTRA_OK and rc in EXTRA_OK[verb]):
            lines = [ln for ln in err.splitlines() if ln.startswith("kit: error:")]
            assert len(lines) == 1, (argv, rc, err)

    check()

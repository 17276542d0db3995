"""Core verbs: ``kit validate``, ``kit plan``, ``kit train`` and ``kit demo``."""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import datetime
from pathlib import Path

from kit.config import load_recipe
from kit.errors import KitError
from kit.model import sizing
from kit.tools.cli import NONNEGATIVE, add_amend_arg, add_recipe_args


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    if verb == "demo":
        p.add_argument("--name", default="", help="run name (default: demo-<date-time>, never reused)")
        p.add_argument("--runs-dir", default="runs", help="where the run directory goes (default: ./runs)")
        p.add_argument("--steps", type=NONNEGATIVE, default=0, help="total steps (default: the recipe's)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of the embedded recipe (jobs/tiny.toml)")
        return
    add_recipe_args(p)
    if verb in ("validate", "plan"):
        p.add_argument("--json", action="store_true", help="machine-readable output")
    if verb == "plan":
        from kit.config import CLUSTER_PRESETS
        from kit.perfmodel import STACKS

        p.add_argument("--cluster", default="", metavar="NAME",
                       help="plan on this named cluster instead of the recipe's [cluster] "
                       f"({', '.join(CLUSTER_PRESETS)})")
        p.add_argument("--compare", action="store_true",
                       help="compare every tensor x pipeline x data x ZeRO layout of the recipe's world side by side")
        p.add_argument("--top", type=NONNEGATIVE, default=12,
                       help="with --compare: show the N fastest that fit (0 = all)")
        p.add_argument("--stack", default="kit", choices=sorted(STACKS),
                       help="software modelled: kit (default), or megatron-deepspeed as BLOOM-176B ran (docs/plan.md)")
    if verb == "train":
        p.add_argument("--stop-after-steps", type=NONNEGATIVE, default=0,
                       help="end the segment after N steps, saving first (a simulated allocation boundary; "
                            "exit 75: run the same command again to continue)")
        add_amend_arg(p)


def run(args: argparse.Namespace, verb: str) -> int:
    return {"validate": validate, "plan": plan, "train": train, "demo": demo}[verb](args)


def validate(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    if args.json:
        print(json.dumps(cfg.to_dict(), indent=1))
    else:
        print(cfg.to_toml())
        print(f"# OK: {args.recipe} is valid (config digest {cfg.digest()}); run directory {cfg.run_dir}")
    return 0


# ---------------------------------------------------------------------------------------------- plan


def plan(args: argparse.Namespace) -> int:
    """The performance model (kit/perfmodel.py) on the recipe's layout, or every layout (--compare)."""
    from kit import perfmodel
    from kit.tools import planreport

    cfg = load_recipe(args.recipe, args.overrides)
    cluster = perfmodel.resolve_cluster(cfg, args.cluster)
    if args.compare:
        plans, skipped = perfmodel.compare(cfg, cluster, args.stack)
        if args.json:
            print(json.dumps(planreport.compare_json(cfg, plans, skipped), indent=1))
        else:
            print(planreport.render_compare(cfg, plans, skipped, args.recipe, args.top))
        return 0
    pl = perfmodel.plan(cfg, cluster, stack=args.stack)
    s = sizing(cfg)
    days = pl.timing.step * cfg.trainer.max_steps / 86400
    training = {"total_tokens": s["total_tokens"], "checkpoint_bytes": s["checkpoint_bytes"], "days": days,
                "segments": math.ceil(days * 86400 / cfg.slurm.time_limit_s)}
    if args.json:
        print(json.dumps({**s, **training, "plan": pl.to_dict()}, indent=1))
    else:
        print(planreport.render_plan(cfg, pl, args.recipe, training))
    return 0


# --------------------------------------------------------------------------------------- train, demo


def train(args: argparse.Namespace) -> int:
    from kit.amend import amend
    from kit.launch import create_run, run_local_segment
    from kit.progress import Bars
    from kit.rundir import RunDir

    cfg = load_recipe(args.recipe, args.overrides)
    cfg.check_layout(cfg.trainer.nproc, "trainer.nproc (the local ranks of `kit train`)")
    if args.amend and RunDir(cfg.run_dir).exists():
        amend(RunDir(cfg.run_dir), cfg, who="kit train")
    with Bars() as bars:
        rd = create_run(cfg, bars=bars)
    seg = f"local-{datetime.now():%Y%m%d-%H%M%S}"  # unique: the outcome is read back from the ledger by seg
    out = run_local_segment(rd, cfg, stop_after_steps=args.stop_after_steps, seg=seg)
    if out.reason == "crashed":
        raise KitError(f"the segment failed (exit {out.returncode}); see the output above and {rd.ledger}")
    code = out.exit_code  # the segment's own status (kit.exitcodes): a hang is not a success
    print(f"segment ended: {_what(out.reason, out.event)} at step {out.step}; exit {code}; run directory {rd.path}")
    return code


def _what(reason: str, event: dict[str, object]) -> str:
    """How a segment ended, in words, from its segment_ended event."""
    if reason == "hang":
        nodes = event.get("suspect_nodes") or []
        return ("hang: the hang watchdog ended it (stack dumps under stacks/, `hang` in the ledger"
                + (f"; suspect nodes {', '.join(map(str, nodes))}" if isinstance(nodes, list) and nodes else "") + ")")
    if reason == "disk_full":
        return "disk_full: a checkpoint save found its filesystem full (see the alert); the previous checkpoint is kept"
    if reason == "give_up":
        return "give_up: the trainer gave up (see its alerts)"
    return reason


def demo(args: argparse.Namespace) -> int:
    """The embedded default, end to end: data, tokenizer, 2 ranks with ZeRO, a simulated allocation
    boundary, resume, finish; then where everything is."""
    from rich.console import Console

    from kit.launch import create_run, run_local_segment
    from kit.ledger import read_all
    from kit.progress import Bars

    console = Console()
    name = args.name or f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    overrides = [f'run.name="{name}"', f'run.runs_dir="{Path(args.runs_dir).absolute()}"', *args.overrides]
    if args.steps:
        overrides.append(f"trainer.max_steps={args.steps}")
    cfg = load_recipe("tiny.toml", overrides)  # the embedded default, found with importlib.resources
    if cfg.run_dir.exists() and any(cfg.run_dir.iterdir()):
        raise KitError(f"{cfg.run_dir} already exists; pick another --name (nothing was changed)")
    t0 = time.time()
    console.rule(f"kit demo: {name}")
    console.print(f"1/4 data: {len(cfg.data.sources)} languages from this machine's gettext catalogues, "
                  f"byte-level BPE of {cfg.data.vocab_size} tokens")
    with Bars(console=console) as bars:
        rd = create_run(cfg, log=lambda m: console.print(f"    {m}"), bars=bars)
    half = cfg.trainer.max_steps // 2

    def step_line(line: str) -> None:
        console.print(f"    {line}", highlight=False, markup=False)

    console.print(f"2/4 segment 1: {cfg.trainer.nproc} ranks, ZeRO-{cfg.deepspeed.zero_stage}, "
                  f"{cfg.deepspeed.precision}; the allocation 'ends' after step {half}")
    first = run_local_segment(rd, cfg, stop_after_steps=half, seg="demo-1", quiet=True, lines=step_line)
    _expect(first.reason, "segment_limit", rd)
    console.print(f"    saved and left at step {first.step} (as at a Slurm time limit)")
    console.print("3/4 segment 2: a new process resumes from the newest complete checkpoint")
    second = run_local_segment(rd, cfg, seg="demo-2", quiet=True, lines=step_line)
    _expect(second.reason, "done", rd)
    events = read_all(rd.path)
    steps = [e for e in events if e["kind"] == "step"]
    loaded = [e for e in events if e["kind"] == "ckpt_loaded"]
    console.print(f"    resumed from {loaded[-1]['tag'] if loaded else '?'}; finished at step {second.step}")
    console.print("4/4 results")
    if steps:
        console.print(f"    loss {steps[0]['loss']:.3f} at step {steps[0]['step']} -> {steps[-1]['loss']:.3f} "
                      f"at step {steps[-1]['step']}; {steps[-1]['tokens_per_s']:,.0f} tokens/s")
    console.print(f"    run directory  {rd.path}")
    console.print(f"    ledger         {rd.ledger}  ({len(events)} events)")
    console.print(f"    TensorBoard    {rd.tensorboard}  (tensorboard --logdir {rd.tensorboard})")
    console.print(f"    checkpoints    {rd.checkpoints}  (latest: {(rd.checkpoints / 'latest').read_text()})")
    console.print(f"    watch it       kit monitor {rd.path}")
    console.rule(f"done in {time.time() - t0:.0f}s")
    return 0


def _expect(reason: str, want: str, rd: object) -> None:
    if reason != want:
        raise KitError(f"demo segment ended with {reason!r}, expected {want!r}; see the ledger in {rd}")

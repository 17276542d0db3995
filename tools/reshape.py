"""``kit reshape RUN --world-size M [--tensor T] [--pipeline P]``: move a checkpoint to another layout.

A checkpoint is partitioned over the ranks that wrote it (ZeRO partitions over the data-parallel
ranks, AutoTP shards over the tensor ranks); DeepSpeed refuses to load it at another layout, and
kit's resume refuses too (kit.checkpoint.check_compatible). The route is DeepSpeed's *universal
checkpoint*:

1. ``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` turns the tag folder
   into one file per parameter (fp32 weights and Adam moments), whole: tensor shards are merged
   with the AutoTP layout the engine recorded in the checkpoint (kit.parallel.tensor records it);
2. kit adds per-rank RNG files for the new world size (copied from the old ranks, round robin: the
   resumed run is not bit-exact, it cannot be) and a MANIFEST.json whose ``kit.layout`` is the new
   layout and ``kit.universal`` is true; the engine of the new layout loads it, DeepSpeed cutting
   each parameter for its tensor rank and ZeRO partition;
3. the original folder is kept as ``<tag>.dp<N>`` (``<tag>.tp2xdp2`` for a layout; ignored by resume
   and retention), and the universal one takes its name, so the next segment resumes from it;
4. the run's frozen ``run.toml`` gets the new ``[parallel]``, ``trainer.nproc`` and (to keep the
   global batch ``micro x grad_accum x data``) ``batch.grad_accum``; update the recipe the same way.

Pipeline layouts are refused: a pipeline checkpoint names its parameters by pipeline layer, which
another layout's engine does not know (see docs/parallel.md). Stop the run first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kit import checkpoint as ck
from kit.config import RunConfig
from kit.errors import CheckpointError, ConfigError, KitError
from kit.ledger import LedgerWriter, NullLedger, hostname
from kit.parallel.layout import Layout
from kit.rundir import RunDir, resolve_run


def backup_name(tag: str, old: Layout) -> str:
    """Where the original of a reshaped checkpoint is kept (not a ``step_N`` name: never resumed)."""
    return f"{tag}.dp{old.data}" if old.plain else f"{tag}.{str(old).lower()}"


def new_config(cfg: RunConfig, old: Layout, target: Layout, grad_accum: int = 0) -> RunConfig:
    """The run's config at ``target``: its [parallel], nproc and a grad_accum that keeps the global batch
    (or ``grad_accum`` when given); refused with the key named when the layout does not fit."""
    import copy

    new = copy.deepcopy(cfg)
    new.parallel.tensor, new.parallel.pipeline = target.tensor, target.pipeline
    new.trainer.nproc = target.world
    if grad_accum:
        new.batch.grad_accum = grad_accum
    elif (cfg.batch.grad_accum * old.data) % target.data == 0:
        new.batch.grad_accum = max(1, cfg.batch.grad_accum * old.data // target.data)
    new.check_layout(target.world, "--world-size")
    return new


def reshape(rd: RunDir, ckpt: ck.Checkpoint, target: Layout | int, ledger: LedgerWriter | NullLedger | None = None,
            workers: int = 1, grad_accum: int = 0) -> Path:
    """Replace ``ckpt`` by a universal checkpoint for ``target`` (an int: that many data-parallel ranks)
    and move the run's config to it; returns where the original is kept."""
    led = ledger or NullLedger()
    root, tag = rd.checkpoints, ckpt.tag
    old = ck.layout_of(ckpt)
    if isinstance(target, int):
        if target < 1:
            raise KitError("--world-size must be at least 1")
        target = Layout(old.tensor, old.pipeline, target) if old.model_parallel == 1 else Layout(1, 1, target)
    if ckpt.manifest.kit.universal:
        raise KitError(f"{tag} is already a universal checkpoint; resume it at {old} first, then reshape a newer one")
    if target == old:
        raise KitError(f"{tag} was written at {old} already; nothing to do")
    if old.pipeline > 1 or target.pipeline > 1:
        raise KitError(f"kit reshape moves checkpoints between data- and tensor-parallel layouts; {old} -> {target} "
                       "involves pipeline stages, whose checkpoints name parameters by pipeline layer. Resume at "
                       f"{old}, or convert the checkpoint (`kit convert`) and start a new run from it")
    cfg = new_config(rd.load_config(), old, target, grad_accum)
    problems = ck.verify(ckpt, hashes=True)
    if problems:
        raise CheckpointError(f"checkpoint {tag} is corrupt ({'; '.join(problems[:3])}); choose another step")
    backup = root / backup_name(tag, old)
    if backup.exists():
        raise KitError(f"{backup} already exists (an earlier reshape); move it away first")
    stage = root / f".reshape-{tag}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _to_universal(ckpt, stage, workers)
        for r in range(target.world):
            shutil.copy2(ckpt.path / ck.RANK_STATE.format(rank=r % old.world), stage / ck.RANK_STATE.format(rank=r))
        kit_state = ckpt.manifest.kit.replace(world_size=target.world, layout=target.to_dict(), universal=True,
                                              reshaped_from={"tag": tag, "world_size": old.world,
                                                             "layout": old.to_dict(), "kept_as": backup.name})
        ck.write_manifest(stage, ckpt.step, kit_state)
        os.rename(ckpt.path, backup)
        try:
            os.rename(stage, root / tag)
        except OSError:
            os.rename(backup, ckpt.path)  # the original back: the newest checkpoint never goes missing
            raise
    except OSError as e:
        raise CheckpointError(f"reshaping {tag} failed ({e.strerror or e}): nothing was changed, {tag} is as it "
                              f"was; free space in {root} or fix its permissions") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    rd.write_frozen(cfg)  # the new layout, nproc and grad_accum (same global batch): ckpt_reshaped records them
    led.emit("ckpt_reshaped", tag=tag, world_size=target.world, from_world_size=old.world, layout=target.to_dict(),
             from_layout=old.to_dict(), kept_as=backup.name, grad_accum=cfg.batch.grad_accum)
    return backup


def _to_universal(ckpt: ck.Checkpoint, out: Path, workers: int) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.path),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers)]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CheckpointError(f"DeepSpeed's ds_to_universal failed on {ckpt.tag}: {tail[0]}")


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    from kit.tools.cli import NONNEGATIVE, POSITIVE

    p.add_argument("run", help="run directory (or run name under --runs-dir); stop the run first")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: ./runs)")
    p.add_argument("--world-size", type=POSITIVE, required=True, help="ranks of the next segment (all of them)")
    p.add_argument("--tensor", type=NONNEGATIVE, default=0, help="parallel.tensor of the next segment (default: 1)")
    p.add_argument("--pipeline", type=NONNEGATIVE, default=0,
                   help="parallel.pipeline of the next segment (default: 1)")
    p.add_argument("--grad-accum", type=NONNEGATIVE, default=0,
                   help="batch.grad_accum of the next segment (default: what keeps the global batch)")
    p.add_argument("--step", type=NONNEGATIVE, default=None,
                   help="the checkpoint's step (default: the newest complete)")
    p.add_argument("--workers", type=POSITIVE, default=1,
                   help="ds_to_universal worker processes (memory grows with it)")


def run(args: argparse.Namespace, verb: str) -> int:
    from kit.tools.convert import pick_checkpoint

    rd = resolve_run(args.run, args.runs_dir)
    ckpt = pick_checkpoint(rd, args.step)
    tensor, pipeline = args.tensor or 1, args.pipeline or 1
    if args.world_size < 1 or args.world_size % (tensor * pipeline):
        raise ConfigError(f"--world-size {args.world_size} is not a positive multiple of --tensor x --pipeline "
                          f"= {tensor} x {pipeline}")
    target = Layout.of(tensor, pipeline, args.world_size)
    before = rd.load_config()
    with LedgerWriter(rd.path, f"reshape-{hostname()}-{os.getpid()}") as led:
        backup = reshape(rd, ckpt, target, led, args.workers, args.grad_accum)
    after = rd.load_config()
    b, a = before.batch, after.batch
    print(f"{ckpt.tag}: universal checkpoint for {target} ({target.world} ranks); the original is kept as {backup}.\n"
          f"{rd.run_toml} now says parallel.tensor = {target.tensor}, parallel.pipeline = {target.pipeline}, "
          f"trainer.nproc = {target.world}, batch.grad_accum = {a.grad_accum} (global batch "
          f"{b.micro_batch_size * b.grad_accum * ck.layout_of(ckpt).data} -> "
          f"{a.micro_batch_size * a.grad_accum * target.data} samples); make the same changes to the recipe "
          f"(and slurm.nodes x tasks per node = {target.world}) before the next `kit submit` or `kit train`. "
          f"Delete {backup.name} once the run goes on.")
    return 0

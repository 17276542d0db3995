"""``kit reshape RUN --world-size M``: make a checkpoint resumable on another data-parallel size.

A ZeRO checkpoint is partitioned over the ranks that wrote it; DeepSpeed refuses to load it on
another world size, and kit's resume refuses too (kit.checkpoint.check_compatible). When the cluster
gives fewer (or more) nodes, the route is DeepSpeed's *universal checkpoint*:

1. ``python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state`` turns the tag folder
   into one file per parameter (fp32 weights and Adam moments), independent of the world size;
2. kit adds per-rank RNG files for the new world size (copied from the old ranks, round robin:
   the resumed run is not bit-exact, it cannot be) and a MANIFEST.json whose ``kit.world_size`` is
   the new size and ``kit.universal`` is true;
3. the original folder is kept as ``<tag>.dp<old>`` (ignored by resume and retention), and the
   universal one takes its name, so the next segment resumes from it.

The trainer sees ``kit.universal`` in the manifest and loads with DeepSpeed's ``load_universal``
switched on for that one load; its next checkpoint is an ordinary one again. Stop the run first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kit import checkpoint as ck
from kit.errors import CheckpointError, KitError
from kit.ledger import LedgerWriter, NullLedger, hostname
from kit.rundir import RunDir, resolve_run


def reshape(rd: RunDir, ckpt: ck.Checkpoint, world_size: int, ledger: LedgerWriter | NullLedger | None = None,
            workers: int = 1) -> Path:
    """Replace ``ckpt`` by a universal checkpoint for ``world_size`` ranks; returns the kept original."""
    led = ledger or NullLedger()
    root, tag = rd.checkpoints, ckpt.tag
    old = ckpt.manifest.kit.world_size or 0
    if world_size < 1:
        raise KitError("--world-size must be at least 1")
    if ckpt.manifest.kit.universal:
        raise KitError(f"{tag} is already a universal checkpoint; it resumes on any world size as it is")
    problems = ck.verify(ckpt, hashes=True)
    if problems:
        raise CheckpointError(f"checkpoint {tag} is corrupt ({'; '.join(problems[:3])}); choose another step")
    backup = root / f"{tag}.dp{old}"
    if backup.exists():
        raise KitError(f"{backup} already exists (an earlier reshape); move it away first")
    stage = root / f".reshape-{tag}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt.path),
               "--output_folder", str(stage), "--inject_missing_state", "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers)]
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CheckpointError(f"DeepSpeed's ds_to_universal failed on {tag}: {tail[0]}")
        for r in range(world_size):
            shutil.copy2(ckpt.path / ck.RANK_STATE.format(rank=r % old), stage / ck.RANK_STATE.format(rank=r))
        kit_state = ckpt.manifest.kit.replace(world_size=world_size, universal=True,
                                              reshaped_from={"tag": tag, "world_size": old, "kept_as": backup.name})
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
    led.emit("ckpt_reshaped", tag=tag, world_size=world_size, from_world_size=old, kept_as=backup.name)
    return backup


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    from kit.tools.cli import NONNEGATIVE, POSITIVE

    p.add_argument("run", help="run directory (or run name under --runs-dir); stop the run first")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: ./runs)")
    p.add_argument("--world-size", type=POSITIVE, required=True, help="data-parallel ranks of the next segment")
    p.add_argument("--step", type=NONNEGATIVE, default=None,
                   help="the checkpoint's step (default: the newest complete)")
    p.add_argument("--workers", type=POSITIVE, default=1,
                   help="ds_to_universal worker processes (memory grows with it)")


def run(args: argparse.Namespace, verb: str) -> int:
    from kit.tools.convert import pick_checkpoint

    rd = resolve_run(args.run, args.runs_dir)
    ckpt = pick_checkpoint(rd, args.step)
    with LedgerWriter(rd.path, f"reshape-{hostname()}-{os.getpid()}") as led:
        backup = reshape(rd, ckpt, args.world_size, led, args.workers)
    print(f"{ckpt.tag}: universal checkpoint for {args.world_size} rank(s); the original is kept as {backup}. "
          f"Resume with {args.world_size} rank(s); delete {backup.name} once the run goes on.")
    return 0

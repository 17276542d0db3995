"""Per-rank entry point of one training segment: ``python -m kit.segment RUN_DIR``.

Every rank of every launcher (torchrun locally, srun under Slurm) runs this. It reads the frozen
``run.toml`` of the run directory, never the recipe, so that every segment of a chain trains the
same thing. Its exit status is one of kit.exitcodes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from kit import envvars, exitcodes
from kit.errors import KitError


def run_segment(run_dir: str, stop_after_steps: int = 0, seg: str = "") -> str:
    """Train one segment in this process (distributed env from the environment); returns the reason."""
    from kit import dist
    from kit.rundir import RunDir
    from kit.trainer import Trainer
    from kit.watchdog import for_setup

    rd = RunDir(run_dir)
    cfg = rd.load_config()
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.trainer.threads))
    env = dist.from_environ()
    seg = seg or os.environ.get(envvars.SEGMENT, "local")
    # Watched from before the first collective: a rendezvous or NCCL set-up that never completes
    # must end the segment, not hold the allocation (kit.watchdog, health.setup_timeout_s).
    watchdog = for_setup(rd.path, cfg.health, env.rank, env.world_size, env.local_world_size, seg,
                         layout=(cfg.parallel.tensor, cfg.parallel.pipeline))
    try:
        dist.init(env)
        trainer = Trainer(cfg, rd, env, seg=seg, stop_after_steps=stop_after_steps, setup_watchdog=watchdog)
        try:
            trainer.setup()
            return trainer.run()
        finally:
            trainer.close()
    finally:
        if watchdog is not None:
            watchdog.stop()  # idempotent: the trainer's health parts stop it too


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kit.segment", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--stop-after-steps", type=int, default=0,
                   help="end this segment after N steps, saving first (simulated allocation boundary)")
    p.add_argument("--boundary-exit-code", type=int, default=exitcodes.REQUEUE,
                   help="exit status at an allocation boundary (torchrun launches use 0: any other "
                        "status makes torchrun report a failure; the launcher reads the ledger instead)")
    p.add_argument("--seg", default="", help="segment id for the ledger (default: $KIT_SEGMENT or 'local')")
    args = p.parse_args(argv)
    try:
        reason = run_segment(args.run_dir, args.stop_after_steps, args.seg)
    except KitError as e:
        print(f"kit: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        from kit.faults import fault_point

        fault_point("segment.teardown", -1, int(os.environ.get("RANK", "0")))  # tests: a rank stuck after its end
        _destroy()
    code = exitcodes.REASONS.get(reason, 1)
    return args.boundary_exit_code if code == exitcodes.REQUEUE else code


def _destroy() -> None:
    try:
        import torch.distributed as d

        if d.is_available() and d.is_initialized():
            d.destroy_process_group()
    except Exception as e:  # teardown of a broken group must not mask the real exit status
        print(f"kit: warning: destroy_process_group failed: {e}", file=sys.stderr)


def start_process() -> None:
    """First thing in a rank's process: die with the launcher (kit.procs: a SIGKILLed torchrun or
    driver leaves no orphaned rank), and build DeepSpeed's ops in this install's cache (kit.opcache)."""
    from kit import opcache, procs

    procs.arm_in_rank()
    opcache.set_extensions_dir()


def exit_now(code: int) -> NoReturn:
    """End this rank's process with ``code``, skipping interpreter finalization.

    Why: by then everything kit owns is closed (Trainer.close, destroy_process_group), and
    finalization only runs destructors of torch's distributed back ends, one of which aborted a
    2-rank DeepSpeed process on CI after it had finished its work and destroyed its process group
    (SIGABRT, "terminate called without an active exception"). The launcher would have reported a
    clean segment as a crash. It also spares a large model's teardown at the end of an allocation.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    start_process()
    exit_now(main())

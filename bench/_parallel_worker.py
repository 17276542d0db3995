"""One rank of bench/parallel.py: the kit engine of a layout (kit.engine.build_engine, kit.parallel.stepper)
stepped on fixed synthetic batches; rank 0 prints the step times as ``TIMES [...]``.

    torchrun --nproc_per_node=N bench/_parallel_worker.py RECIPE.toml WARMUP STEPS [overrides...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch
    import torch.distributed as dist

    from kit import dist as kdist
    from kit.config import load_recipe
    from kit.engine import build_engine

    recipe, warmup, steps, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    env = kdist.from_environ()
    kdist.init(env)
    cfg = load_recipe(recipe, overrides)
    torch.set_num_threads(cfg.trainer.threads)
    built = build_engine(cfg, env.world_size, env.rank)
    mesh, ga, micro = built.mesh, cfg.batch.grad_accum, cfg.batch.micro_batch_size

    def batches(step: int):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(step * 1000 + mesh.coords.data)
        for _ in range(ga):
            yield torch.randint(4, cfg.data.vocab_size, (micro, cfg.model.seq_length), generator=g)

    def before_update(loss_sum, update):  # type: ignore[no-untyped-def]
        vec = torch.zeros(8, dtype=torch.float64)  # the trainer's one all-reduce of the step
        if loss_sum is not None and mesh.reports_loss:
            vec[0] = loss_sum
        dist.all_reduce(vec)
        update()

    times = []
    for step in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        built.stepper.step(batches(step), ga, before_update)
        times.append(time.perf_counter() - t0)
    if env.rank == 0:
        print("TIMES " + json.dumps(times[warmup:]), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from kit.segment import exit_now

    exit_now(main())

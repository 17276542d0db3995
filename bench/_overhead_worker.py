"""Worker of bench/overhead.py (launched by torchrun): one engine, two ways of stepping it.

"kit" steps are Trainer.step_once(): everything the kit does each step (the flags all-reduce,
control and deadline checks, ledger and TensorBoard metrics, health heartbeat, spike guard).
"bare" steps are the plain DeepSpeed loop on the same engine and data: forward, backward, step.
Blocks alternate in ABBA order so drift in machine load falls on both sides; rank 0 prints the
per-step wall time and process CPU time (all threads: the health sampler's too) of every block as
JSON. CPU time is the steadier figure on a shared machine: other tenants stretch wall time, not it.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    import torch.distributed as dist

    from kit import dist as kdist
    from kit.data import rank_micro_indices
    from kit.rundir import RunDir
    from kit.trainer import Trainer

    rd = RunDir(sys.argv[1])
    block, rounds = int(sys.argv[2]), int(sys.argv[3])
    cfg = rd.load_config()
    env = kdist.from_environ()
    kdist.init(env)
    tr = Trainer(cfg, rd, env, seg="bench")
    tr.setup()
    tr.begin_loop()
    eng, data, st = tr.engine, tr.data, tr.state
    assert data is not None
    mb, ga, dp = cfg.batch.micro_batch_size, cfg.batch.grad_accum, env.world_size

    def bare_step() -> None:
        for m in range(ga):
            x = torch.from_numpy(data.batch(rank_micro_indices(st.consumed, mb, dp, env.rank, m)))
            out = eng(input_ids=x, labels=x)
            eng.backward(out.loss)
            eng.step()
        st.consumed += tr.global_batch

    def kit_step() -> None:
        assert tr.step_once() == "", "the benchmark must not end the segment"

    for _ in range(10):  # warm-up: both paths
        kit_step()
        bare_step()
    times: dict[str, list[float]] = {"bare": [], "kit": [], "bare_cpu": [], "kit_cpu": []}
    order = ["bare", "kit", "kit", "bare"]
    for r in range(rounds):
        for mode in order if r % 2 == 0 else order[::-1]:
            dist.barrier()
            fn = bare_step if mode == "bare" else kit_step
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                fn()
            times[mode].append((time.perf_counter() - t0) / block)
            times[mode + "_cpu"].append((time.process_time() - c0) / block)
    if env.rank == 0:
        print("TIMES " + json.dumps(times), flush=True)
    tr._finish("done")


if __name__ == "__main__":
    main()

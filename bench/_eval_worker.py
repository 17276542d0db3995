"""Worker of bench/eval.py (launched by torchrun): evaluation against training on one engine.

Part 1, throughput, in alternating ABBA rounds on the same engine and data:
  train  = a bare DeepSpeed step (forward + backward + optimizer step over the micro-batches),
  fwd    = the forward pass of training alone (train mode, autograd recording, no backward),
  eval   = kit.evaluation.Evaluator.evaluate (the live evaluation: no_grad, eval mode, sharded, reduced).
Tokens are positions processed (sequences x seq_length) on all ranks together.

Part 2, overhead of live evaluation at the recipe's interval: blocks of exactly ``interval`` kit steps
(Trainer.step_once), each starting on a multiple of it, with the evaluator on (one evaluation per block)
and off, in ABBA order. Wall time and rank 0's process CPU time (the steadier figure on a shared machine:
other tenants stretch wall time, not it) of both parts. Rank 0 prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    import torch
    import torch.distributed as dist

    from kit import dist as kdist
    from kit.data import rank_micro_indices
    from kit.rundir import RunDir
    from kit.trainer import Trainer

    rd = RunDir(sys.argv[1])
    rounds, blocks = int(sys.argv[2]), int(sys.argv[3])
    cfg = rd.load_config()
    env = kdist.from_environ()
    kdist.init(env)
    tr = Trainer(cfg, rd, env, seg="bench")
    tr.setup()
    tr.begin_loop()
    eng, data, st, ev = tr.engine, tr.data, tr.state, tr.evaluator
    assert data is not None and ev is not None and ev.es is not None and ev.active
    mb, ga, dp, seq = cfg.batch.micro_batch_size, cfg.batch.grad_accum, env.world_size, cfg.model.seq_length

    def batches() -> list[Any]:
        return [torch.from_numpy(data.batch(rank_micro_indices(st.consumed, mb, dp, env.rank, m))) for m in range(ga)]

    def train() -> int:
        for x in batches():
            eng.backward(eng(input_ids=x, labels=x).loss)
            eng.step()
        st.consumed += tr.global_batch
        return tr.global_batch * seq

    def fwd() -> int:
        for x in batches():
            eng.module(input_ids=x, labels=x).loss.detach()
        st.consumed += tr.global_batch
        return tr.global_batch * seq

    def evaluate() -> int:
        ev.evaluate(st.step)
        return ev.es.sequences * seq

    fns = {"train": train, "fwd": fwd, "eval": evaluate}
    for fn in fns.values():  # warm-up
        fn()
    tok: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}  # tokens per CPU second of rank 0's process
    order = list(fns)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(fns[name]() for _ in range(3))
            dist.barrier()
            tok[name].append(n / (time.perf_counter() - t0))
            cpu[name].append(n / (time.process_time() - c0))

    interval = cfg.eval.interval_steps
    while st.step % interval:  # align: every block of `interval` steps holds exactly one evaluation step
        assert tr.step_once() == ""
    block_s: dict[str, list[float]] = {"on": [], "off": [], "on_cpu": [], "off_cpu": []}
    for b in range(blocks):
        for mode in ("on", "off", "off", "on") if b % 2 == 0 else ("off", "on", "on", "off"):
            ev.active = mode == "on"
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(interval):
                assert tr.step_once() == "", "the benchmark must not end the segment"
            block_s[mode].append(time.perf_counter() - t0)
            block_s[mode + "_cpu"].append(time.process_time() - c0)
    ev.active = True
    if env.rank == 0:
        print("RESULT " + json.dumps({"tokens_per_s": tok, "tokens_per_cpu_s": cpu, "block_s": block_s,
                                      "interval": interval, "stretch": ev.stretch, "eval_sequences": ev.es.sequences,
                                      "global_batch": tr.global_batch}), flush=True)
    tr._finish("done")


if __name__ == "__main__":
    main()

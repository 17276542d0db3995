"""A bare DeepSpeed loop on the kit's model and data: the baseline of bench/overhead.py.

Launched with torchrun on the run directory the kit run uses; same model, same DeepSpeed config,
same batches; no ledger, no metrics, no control checks, no flag all-reduce. Rank 0 prints the
wall time between consecutive steps as JSON.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import deepspeed
    import torch

    from kit import dist
    from kit.data import MixtureDataset, rank_micro_indices
    from kit.model import build_model
    from kit.rundir import RunDir
    from kit.trainer import deepspeed_config, lr_lambda

    rd = RunDir(sys.argv[1])
    steps = int(sys.argv[2])
    cfg = rd.load_config()
    env = dist.from_environ()
    dist.init(env)
    torch.set_num_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.run.seed)
    data = MixtureDataset(rd.data, cfg.run.seed, cfg.model.seq_length)
    model = build_model(cfg.model, cfg.data.vocab_size)
    o = cfg.optim
    optim = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                              weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, env.world_size))
    gb = cfg.batch.micro_batch_size * cfg.batch.grad_accum * env.world_size
    consumed = 0
    stamps = []
    for _ in range(steps):
        for m in range(cfg.batch.grad_accum):
            idx = rank_micro_indices(consumed, cfg.batch.micro_batch_size, env.world_size, env.rank, m)
            x = torch.from_numpy(data.batch(idx))
            out = engine(input_ids=x, labels=x)
            engine.backward(out.loss)
            engine.step()
        consumed += gb
        stamps.append(time.time())
    if env.rank == 0:
        print("BARE " + json.dumps(stamps), flush=True)


if __name__ == "__main__":
    main()

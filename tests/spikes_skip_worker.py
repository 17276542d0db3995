"""Run by tests/test_spikes_skip.py under torchrun (2 ranks): is a refused update really nothing?

For each ZeRO stage, two engines from the same seed train on batches of two micro-steps each:
A sees b1, b2 (update refused with kit.spikes.hold_update, the way the trainer does it), b3;
B sees b1, b3. A's weights must equal B's bit for bit after b3, A's weights must not move
during b2, and the engines' counters must stay usable (the next steps train normally).
Prints one JSON line per stage on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from kit.config import RunConfig
from kit.engine import deepspeed_config, lr_lambda
from kit.model import build_model
from kit.spikes import hold_update


def make_engine(stage: int, precision: str) -> tuple[Any, Any, Any]:
    cfg = RunConfig()
    cfg.deepspeed.zero_stage, cfg.deepspeed.precision = stage, precision
    cfg.batch.micro_batch_size, cfg.batch.grad_accum = 2, 2
    cfg.optim.warmup_steps, cfg.trainer.max_steps = 1, 10
    torch.manual_seed(0)
    model = build_model(cfg.model, 300, seed=0)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, lr_scheduler=sched,
                                        config=deepspeed_config(cfg, dist.get_world_size()))
    return eng, optim, sched


def batch(k: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * k + 10 * m + dist.get_rank())
    return torch.randint(4, 300, (2, 16), generator=g)


def train(eng: Any, optim: Any, sched: Any, k: int, refuse: bool = False) -> None:
    for m in range(2):
        x = batch(k, m)
        out = eng(input_ids=x, labels=x)
        eng.backward(out.loss)
        if m == 0:
            eng.step()
        else:
            with hold_update(optim, sched) if refuse else contextlib.nullcontext():
                eng.step()


def weights(eng: Any, stage: int) -> list[torch.Tensor]:
    params = list(eng.module.parameters())
    ctx = deepspeed.zero.GatheredParameters(params) if stage == 3 else contextlib.nullcontext()
    with ctx:
        return [p.detach().clone().float() for p in params]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    precision = sys.argv[2] if len(sys.argv) > 2 else "fp32"
    for stage in [int(s) for s in sys.argv[1].split(",")]:
        a, oa, sa = make_engine(stage, precision)
        b, ob, sb = make_engine(stage, precision)
        c, oc, sc = make_engine(stage, precision)  # control: b2 applied as usual
        for k in (1, 2, 3, 4):
            train(c, oc, sc, k)
        train(a, oa, sa, 1)
        train(b, ob, sb, 1)
        w1 = weights(a, stage)
        lr_before = a.get_lr()[0]
        train(a, oa, sa, 2, refuse=True)
        frozen = same(w1, weights(a, stage))
        lr_kept = a.get_lr()[0] == lr_before
        for k in (3, 4):
            train(a, oa, sa, k)
            train(b, ob, sb, k)
        moved = not same(w1, weights(a, stage))
        equal = same(weights(a, stage), weights(b, stage))
        adam_a = [v["step"] for v in oa.state.values() if "step" in v][:1]
        adam_b = [v["step"] for v in ob.state.values() if "step" in v][:1]
        control_differs = not same(weights(c, stage), weights(b, stage))
        report = {"stage": stage, "precision": precision, "control_differs": control_differs, "frozen": frozen,
                  "lr_kept": lr_kept, "moved_after": moved,
                  "equal_to_unpoisoned": equal,
                  "adam_steps_equal": [float(x) for x in adam_a] == [float(x) for x in adam_b],
                  "global_steps": [a.global_steps, b.global_steps]}
        flags = torch.tensor([float(v) for v in (frozen, lr_kept, moved, equal, control_differs)])
        gathered = [torch.zeros_like(flags) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flags)
        report["all_ranks_agree"] = all(torch.equal(g, gathered[0]) for g in gathered)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from kit.segment import exit_now

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    exit_now(main())  # as a rank of kit does: no interpreter finalization after the group is destroyed

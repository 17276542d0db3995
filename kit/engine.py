"""The DeepSpeed side of a segment: its config, the seeded model, optimizer, schedule and engine.

Why its own unit: what DeepSpeed is asked to do is derived from the recipe in exactly one place, so the
trainer, the tests' workers and the benchmarks build the same engine, and a new parallel layout changes
this module, not the step loop.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kit.config import RunConfig
from kit.faults import fault_active, fault_point
from kit.parallel.layout import layout_of

if TYPE_CHECKING:
    from kit.parallel.mesh import Mesh
    from kit.parallel.stepper import Stepper


def lr_lambda(cfg: RunConfig) -> Any:
    """Linear warm-up to optim.lr, then cosine decay to optim.min_lr (as a factor of optim.lr)."""
    o, total = cfg.optim, cfg.trainer.max_steps
    decay = o.decay_steps or max(1, total - o.warmup_steps)
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / decay)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config for ``world_size`` data-parallel ranks (the data dimension of the layout:
    one micro-batch per replica, not per rank), with ``deepspeed.extra`` merged last."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        # DeepSpeed's memory-efficient linear patches torch.nn.functional.linear process-wide and
        # changes rounding: off, so converted checkpoints reproduce the engine's logits exactly.
        zero["memory_efficient_linear"] = False
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch.grad_accum,
        "train_batch_size": cfg.batch.micro_batch_size * cfg.batch.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.deepspeed.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge(ds, cfg.deepspeed.extra)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, recursively for tables."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def seed_everything(seed: int) -> None:
    """torch, numpy and Python's RNGs: the model init and the first dropout masks depend on them."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass(slots=True)
class Engine:
    """What ``deepspeed.initialize`` returns that the trainer uses: the engine, and the optimizer and
    schedule it wraps (the spike policy holds their update for one step, kit.spikes.hold_update);
    where this rank sits in the layout (kit.parallel.mesh) and how a step runs there (kit.parallel.stepper)."""

    engine: Any
    optimizer: Any
    scheduler: Any
    mesh: Mesh
    stepper: Stepper


def build_engine(cfg: RunConfig, world: int, rank: int = 0) -> Engine:
    """Seed, build this rank's part of the BLOOM model at the recipe's layout (kit.parallel.model),
    torch's AdamW (bit-exact resume needs it, not DeepSpeed's CPU Adam) and the LR schedule, and hand
    them to DeepSpeed. Collective (process groups) when the layout is not plain data parallel."""
    import deepspeed
    import torch

    from kit.parallel.model import build
    from kit.parallel.stepper import Stepper
    from kit.parallel.tensor import ALIBI_FAULT

    layout = layout_of(cfg, world)
    seed_everything(cfg.run.seed)
    dtype = torch.bfloat16 if cfg.deepspeed.precision == "bf16" else None
    built = build(cfg.model, cfg.data.vocab_size, layout, rank, dtype=dtype,
                  alibi_wrong=fault_active(ALIBI_FAULT, 0, rank), seed=cfg.run.seed)
    o = cfg.optim
    optim = torch.optim.AdamW(built.module.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                              weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))
    fault_point("setup.before_engine", 0, rank)
    engine, _, _, _ = deepspeed.initialize(model=built.module, optimizer=optim, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, layout.data), mpu=built.mpu)
    return Engine(engine, optim, sched, built.mesh, Stepper(engine, built.mesh, built.pipelined))

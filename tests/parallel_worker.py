"""Run by tests/test_parallel_model.py under torchrun: one tiny BLOOM trained at a layout.

``parallel_worker.py TENSOR PIPELINE STEPS OUT.json [alibi-wrong]``: builds the layout's model with
kit.parallel.model (AutoTP, the BLOOM pipeline, DeepSpeed's grid as mpu), trains STEPS steps of a
fixed synthetic global batch (8 samples x 32 tokens, the same for every layout) with ZeRO-1 and
gradient clipping, and writes on rank 0: the per-step global-mean loss and grad norm, and checks of
the layout (shard shapes, coordinates of every rank). Losses must match the plain run's within 1e-5.

``parallel_worker.py TENSOR PIPELINE skip OUT.json``: is a refused update (kit.parallel.stepper's
``before_update`` running DeepSpeed's step under kit.spikes.hold_update, as the trainer's skip policy
does) really nothing at this layout? Engine A trains batches 1, 2 (refused), 3; engine B 1, 3. A's
weights must not move during 2 and must equal B's bit for bit after 3, on every rank; a control C
that applies 2 must differ.

``parallel_worker.py TENSOR PIPELINE parts OUT.json``: what does each rank hold after
kit.parallel.model.build of an 8-block model? Bytes of its real (non-meta) parameters, of its blocks,
parameters left on the meta device, and whether every value equals the plain model's (a tensor shard
its contiguous block of the plain parameter); and the whole model's bytes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from kit.config import ModelSection
from kit.parallel.layout import Layout
from kit.parallel.model import build

VOCAB, SEQ, GLOBAL, MICRO = 256, 32, 8, 2


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)  # learnable: arithmetic sequences mod the vocabulary
    start = torch.randint(0, VOCAB, (GLOBAL, 1), generator=g)
    stride = torch.randint(1, 8, (GLOBAL, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def engine(layout: Layout, rank: int, wrong: bool = False) -> tuple[Any, Any, Any, Any]:
    """(engine, model, optimizer, scheduler) of the layout, from the same seed every time."""
    torch.manual_seed(1234)
    m = ModelSection(hidden_size=64, n_layer=4, n_head=4, seq_length=SEQ)
    lm = build(m, VOCAB, layout, rank, alibi_wrong=wrong)
    optim = torch.optim.AdamW(lm.module.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 / (1 + s))
    ga = GLOBAL // (MICRO * layout.data)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ga, "train_batch_size": GLOBAL,
          "zero_optimization": {"stage": 1}, "gradient_clipping": 0.5, "steps_per_print": 10**9,
          "zero_allow_untested_optimizer": True}
    eng, _, _, _ = deepspeed.initialize(model=lm.module, optimizer=optim, lr_scheduler=sched, config=ds, mpu=lm.mpu)
    return eng, lm, optim, sched


def skip_check(layout: Layout, rank: int, out: str) -> None:
    from kit.parallel.stepper import Stepper
    from kit.spikes import hold_update

    ga = GLOBAL // (MICRO * layout.data)
    runs = {k: (*engine(layout, rank),) for k in "ABC"}
    steppers = {k: Stepper(e, lm.mesh, lm.pipelined) for k, (e, lm, _, _) in runs.items()}

    def train(k: str, step: int, refuse: bool = False) -> None:
        _, lm, optim, sched = runs[k]
        c = lm.mesh.coords
        mine = global_batch(step)[c.data * MICRO * ga:(c.data + 1) * MICRO * ga]

        def before_update(loss_sum: Any, update: Any) -> None:
            dist.all_reduce(torch.zeros(1))  # the trainer's collective (every rank, same point)
            if refuse:
                with hold_update(optim, sched):
                    update()
            else:
                update()

        steppers[k].step(iter([mine[j * MICRO:(j + 1) * MICRO] for j in range(ga)]), ga, before_update)

    def weights(k: str) -> list[torch.Tensor]:
        return [p.detach().clone() for p in runs[k][0].module.parameters()]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    for k in "ABC":
        train(k, 1)
    w1 = weights("A")
    train("A", 2, refuse=True)
    frozen = same(w1, weights("A"))
    train("C", 2)
    for k in "ABC":
        train(k, 3)
    flags = torch.tensor([float(frozen), float(same(weights("A"), weights("B"))),
                          float(not same(weights("A"), weights("C"))), float(not same(w1, weights("A"))),
                          float(runs["A"][0].get_lr()[0] == runs["B"][0].get_lr()[0])])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank must say yes
    if rank == 0:
        keys = ("frozen", "equal_to_unpoisoned", "control_differs", "moved_after", "lr_kept")
        with open(out, "w") as f:
            json.dump({"layout": str(layout), **{k: bool(v) for k, v in zip(keys, flags.tolist(), strict=True)}}, f)


def parts_check(layout: Layout, rank: int, out: str) -> None:
    from kit.model import build_model
    from kit.parallel.pipe import hf_name

    m = ModelSection(hidden_size=64, n_layer=8, n_head=4, seq_length=SEQ)
    lm = build(m, VOCAB, layout, rank, seed=1234)
    plain = dict(build_model(m, VOCAB, seed=1234).named_parameters())

    def nbytes(params: list[tuple[str, torch.Tensor]]) -> int:
        return sum(p.numel() * p.element_size() for _, p in params)

    def equal(name: str, p: torch.Tensor) -> bool:
        ref = plain[hf_name(name, m.n_layer) if lm.pipelined else name]
        if ref.shape == p.shape:
            return torch.equal(ref, p)
        dim = [a != b for a, b in zip(ref.shape, p.shape, strict=True)].index(True)
        return torch.equal(ref.chunk(layout.tensor, dim)[lm.mesh.coords.tensor], p)

    def block(name: str) -> bool:
        return (hf_name(name, m.n_layer) if lm.pipelined else name).startswith("transformer.h.")

    held = list(lm.module.named_parameters())
    real = [(n, p) for n, p in held if not p.is_meta]
    row = {"rank": rank, "bytes": nbytes(real), "block_bytes": nbytes([(n, p) for n, p in real if block(n)]),
           "meta_left": len(held) - len(real), "equal_to_plain": all(equal(n, p) for n, p in real)}
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        full = list(plain.items())
        with open(out, "w") as f:
            json.dump({"layout": str(layout), "full_bytes": nbytes(full),
                       "full_block_bytes": nbytes([(n, p) for n, p in full if n.startswith("transformer.h.")]),
                       "ranks": rows}, f)


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    if sys.argv[3] == "parts":
        parts_check(Layout.of(int(sys.argv[1]), int(sys.argv[2]), dist.get_world_size()), dist.get_rank(), sys.argv[4])
        dist.barrier()
        dist.destroy_process_group()
        return 0
    if sys.argv[3] == "skip":
        layout = Layout.of(int(sys.argv[1]), int(sys.argv[2]), dist.get_world_size())
        skip_check(layout, dist.get_rank(), sys.argv[4])
        dist.barrier()
        dist.destroy_process_group()
        return 0
    tensor, pipeline, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    wrong = "alibi-wrong" in sys.argv[5:]
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = Layout.of(tensor, pipeline, world)
    ga = GLOBAL // (MICRO * layout.data)
    eng, lm, _, _ = engine(layout, rank, wrong)
    c = lm.mesh.coords
    losses: list[float] = []
    norms: list[float] = []
    for step in range(steps):
        mine = global_batch(step)[c.data * MICRO * ga:(c.data + 1) * MICRO * ga]
        micro = [mine[k * MICRO:(k + 1) * MICRO] for k in range(ga)]
        if lm.pipelined:
            loss = eng.train_batch(iter([(x, x) for x in micro]))
            total = loss.detach().double() * ga if lm.mesh.reports_loss else torch.zeros((), dtype=torch.float64)
        else:
            total = torch.zeros((), dtype=torch.float64)
            for x in micro:
                loss = eng(input_ids=x, labels=x).loss
                eng.backward(loss)
                eng.step()
                total += loss.detach().double()
            if not lm.mesh.reports_loss:
                total.zero_()
        dist.all_reduce(total)
        losses.append(float(total) / (layout.data * ga))
        norms.append(float(eng.get_global_grad_norm()))
    shapes = {n: list(p.shape) for n, p in eng.module.named_parameters() if "query_key_value.weight" in n
              or "dense_4h_to_h.weight" in n}
    tp_rank = lm.mesh.grid.get_slice_parallel_rank() if lm.mesh.grid else 0
    me = torch.tensor([rank, c.tensor, c.pipeline, c.data, tp_rank], dtype=torch.long)
    rows = [torch.zeros_like(me) for _ in range(world)]
    dist.all_gather(rows, me)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"layout": str(layout), "losses": losses, "grad_norms": norms, "shapes": shapes,
                       "coords": [r.tolist() for r in rows]}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from kit.segment import exit_now

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    exit_now(main())

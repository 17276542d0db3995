"""Run by tests/test_parallel_model.py under torchrun: one tiny BLOOM trained at a layout.

``parallel_worker.py TENSOR PIPELINE STEPS OUT.json [alibi-wrong]``: builds the layout's model with
kit.parallel.model (AutoTP, the BLOOM pipeline, DeepSpeed's grid as mpu), trains STEPS steps of a
fixed synthetic global batch (8 samples x 32 tokens, the same for every layout) with ZeRO-1 and
gradient clipping, and writes on rank 0: the per-step global-mean loss and grad norm, and checks of
the layout (shard shapes, coordinates of every rank). Losses must match the plain run's within 1e-5.
"""

from __future__ import annotations

import json
import os
import sys

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


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    tensor, pipeline, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    wrong = "alibi-wrong" in sys.argv[5:]
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = Layout.of(tensor, pipeline, world)
    ga = GLOBAL // (MICRO * layout.data)
    torch.manual_seed(1234)
    m = ModelSection(hidden_size=64, n_layer=4, n_head=4, seq_length=SEQ)
    lm = build(m, VOCAB, layout, rank, alibi_wrong=wrong)
    optim = torch.optim.AdamW(lm.module.parameters(), lr=3e-3, weight_decay=0.01)
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ga, "train_batch_size": GLOBAL,
          "zero_optimization": {"stage": 1}, "gradient_clipping": 0.5, "steps_per_print": 10**9,
          "zero_allow_untested_optimizer": True}
    eng, _, _, _ = deepspeed.initialize(model=lm.module, optimizer=optim, config=ds, mpu=lm.mpu)
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

"""Run by tests/test_evaluation.py under torchrun (1 or 2 ranks): the live evaluator on real engines.

Usage: eval_worker.py RUN_DIR STAGES PRECISION. For each ZeRO stage, from the run's config and data:

- engine A trains 3 steps with an evaluation after each (kit.evaluation.Evaluator, as the trainer
  calls it); engine B, built from the same seed, trains the same 3 steps without: their training
  losses and a last evaluation must be identical (evaluation leaves training untouched);
- the first evaluation of A (at the seeded initial weights) is printed, so that the test can compare
  1 rank with 2, and rank 0 also scores the same set with a plain transformers model holding the same
  initial weights (what `kit eval` computes), which must agree exactly.

Prints one ``RESULT {json}`` line per stage on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import torch
import torch.distributed as dist

from kit import dist as kdist
from kit.data import MixtureDataset, rank_micro_indices
from kit.engine import build_engine, seed_everything
from kit.evaluation import Evaluator, Placement, load_eval_set, score_all, summarize
from kit.ledger import NullLedger
from kit.model import build_model
from kit.rundir import RunDir


def train_step(eng: Any, data: MixtureDataset, step: int, mb: int, ga: int, dp: int, rank: int) -> float:
    total = 0.0
    consumed = step * mb * ga * dp
    for m in range(ga):
        x = torch.from_numpy(data.batch(rank_micro_indices(consumed, mb, dp, rank, m)))
        loss = eng(input_ids=x, labels=x).loss
        eng.backward(loss)
        eng.step()
        total += float(loss.detach())
    return total


def losses(ev: dict[str, Any]) -> dict[str, float]:
    return {k: v["loss"] for k, v in ev["sources"].items()}


def main() -> None:
    rd = RunDir(sys.argv[1])
    stages, precision = [int(s) for s in sys.argv[2].split(",")], sys.argv[3]
    env = kdist.from_environ()
    kdist.init(env)
    base = rd.load_config()
    dp, rank = env.world_size, env.rank
    data = MixtureDataset(rd.data, base.run.seed, base.model.seq_length)
    for stage in stages:
        cfg = dataclasses.replace(base, deepspeed=dataclasses.replace(base.deepspeed, zero_stage=stage,
                                                                      precision=precision))
        es = load_eval_set(rd.data, cfg)
        assert es is not None
        mb, ga = cfg.batch.micro_batch_size, cfg.batch.grad_accum
        a = build_engine(cfg, dp, rank).engine
        where = Placement(replica=rank, replicas=dp, rank=rank, world=dp)
        ev = Evaluator(cfg, es, a, where, NullLedger(), lambda: None, log=lambda m: None)
        first = ev.evaluate(0)
        a_losses, a_evals = [], [losses(first)]
        for step in range(3):
            a_losses.append(train_step(a, data, step, mb, ga, dp, rank))
            a_evals.append(losses(ev.evaluate(step + 1)))
        b = build_engine(cfg, dp, rank).engine
        b_losses = [train_step(b, data, step, mb, ga, dp, rank) for step in range(3)]
        b_last = Evaluator(cfg, es, b, where, NullLedger(), lambda: None, log=lambda m: None).evaluate(3)
        plain = None
        if rank == 0:  # a plain transformers model with the same initial weights: what `kit eval` does
            seed_everything(cfg.run.seed)
            model = build_model(cfg.model, cfg.data.vocab_size, seed=cfg.run.seed)
            if precision == "bf16":
                model = model.to(torch.bfloat16)
            plain = summarize(es, score_all(model, es))["sources"]
        gathered: list[Any] = [None] * dp
        dist.all_gather_object(gathered, (a_losses, b_losses))
        if rank == 0:
            assert plain is not None
            print("RESULT " + json.dumps({
                "stage": stage, "precision": precision, "dp": dp, "first": losses(first),
                "plain_equal": {k: v["loss"] == first["sources"][k]["loss"] for k, v in plain.items()},
                "train_losses_equal": all(x == y for x, y in gathered),
                "last_eval_equal": a_evals[-1] == losses(b_last),
                "evals_moved": a_evals[0] != a_evals[-1],
                "a_losses": a_losses, "sequences": es.sequences,
            }), flush=True)
        del a, b
        dist.barrier()


if __name__ == "__main__":
    main()

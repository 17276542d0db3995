"""One optimizer step's forward and backward at any layout, with kit's decision before the update.

The trainer's invariant (kit.trainer): after the step's last backward and *before* the update, every
rank takes part in one all-reduce (loss, non-finite, control flags), and the spike policy may refuse
the update on every rank alike. :meth:`Stepper.step` gives the trainer that moment as a callback,
``before_update(loss_sum, update)``: it all-reduces, decides, and calls ``update()`` (the boundary
optimizer step), plainly or inside kit.spikes.hold_update.

- Engines without a pipeline (plain data parallel, tensor parallel): kit runs the micro-steps
  (forward, backward, non-boundary ``engine.step()``) and calls the callback before the boundary
  ``engine.step()``, as it always did.
- The pipeline engine runs a whole step inside ``train_batch``: DeepSpeed's TrainSchedule ends
  every stage's step with the instructions ReduceTiedGrads, ReduceGrads, OptimizerStep, and the
  engine executes each instruction through its ``_INSTRUCTION_MAP``. kit gives this one engine an
  instance map whose OptimizerStep entry calls the callback with DeepSpeed's own optimizer step as
  ``update``: the all-reduce happens on every stage at the same point of the schedule (after the
  gradients are reduced, before any parameter moves), and a refused update is DeepSpeed's step under
  hold_update, exactly as without a pipeline. The loss is taken where the pipeline computes it: the
  module's ``loss_fn`` on the last stage is wrapped to sum the micro-batch losses in float64 (as the
  plain path does), so the step's loss is the same number at every layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kit.parallel.mesh import Mesh

# before_update(loss_sum or None where this rank computes no loss, update)
BeforeUpdate = Callable[[torch.Tensor | None, Callable[[], None]], None]


class Stepper:
    """Runs the micro-steps of one optimizer step on ``engine`` (one per rank, for the segment)."""

    def __init__(self, engine: Any, mesh: Mesh, pipelined: bool) -> None:
        self.engine = engine
        self.mesh = mesh
        self.pipelined = pipelined
        self._before: BeforeUpdate | None = None
        self._loss_sum: torch.Tensor | None = None
        self._poison = False
        if pipelined:
            self._hook_pipeline()

    def step(self, batches: Iterator[torch.Tensor], grad_accum: int, before_update: BeforeUpdate,
             poison: bool = False) -> None:
        """``batches`` yields this rank's ``grad_accum`` micro-batches (token ids; labels are the same
        ids, shifted by the loss). ``poison`` (tests): the first micro-batch's loss becomes NaN."""
        if self.pipelined:
            self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.engine.device)
            self._poison, self._before = poison, before_update
            try:
                self.engine.train_batch(data_iter=((x, x) for x in batches))
            finally:
                self._before = None
            return
        eng = self.engine
        loss_sum = torch.zeros((), dtype=torch.float64, device=eng.device)
        for m in range(grad_accum):
            x = next(batches)
            loss = eng(input_ids=x, labels=x).loss
            if m == 0 and poison:
                loss = loss * math.nan
            eng.backward(loss)
            loss_sum += loss.detach().double()
            if m < grad_accum - 1:
                eng.step()  # not a boundary: DeepSpeed only counts the micro step
        before_update(loss_sum, lambda: eng.step())

    # ------------------------------------------------------------------------------- pipeline
    def _hook_pipeline(self) -> None:
        from deepspeed.runtime.pipe.schedule import OptimizerStep

        eng = self.engine
        deepspeed_step = type(eng)._INSTRUCTION_MAP[OptimizerStep]

        def optimizer_step(engine: Any, **kwargs: Any) -> None:
            if self._before is None:  # a train_batch kit did not start: DeepSpeed's behaviour
                deepspeed_step(engine, **kwargs)
                return
            known = self._loss_sum if self.mesh.last_stage else None
            self._before(known, lambda: deepspeed_step(engine, **kwargs))

        eng._INSTRUCTION_MAP = {**type(eng)._INSTRUCTION_MAP, OptimizerStep: optimizer_step}
        inner = eng.module.loss_fn
        self.deepspeed_loss_fn = inner  # DeepSpeed's own, for bench/overhead's bare blocks (unhook)

        def loss_fn(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            loss: torch.Tensor = inner(outputs, labels)
            if self._poison:
                loss, self._poison = loss * math.nan, False
            if self._loss_sum is not None:
                self._loss_sum += loss.detach().double()
            return loss

        eng.module.loss_fn = loss_fn
        self.kit_hooks = {"instructions": eng._INSTRUCTION_MAP, "loss_fn": loss_fn}

    def unhook(self) -> None:
        """Leave the pipeline engine exactly as DeepSpeed built it (bench/overhead's bare blocks measure
        DeepSpeed's own loop on the same engine); :meth:`rehook` puts kit's hooks back."""
        if self.pipelined:
            del self.engine._INSTRUCTION_MAP  # back to the class's map
            self.engine.module.loss_fn = self.deepspeed_loss_fn

    def rehook(self) -> None:
        if self.pipelined:
            self.engine._INSTRUCTION_MAP = self.kit_hooks["instructions"]
            self.engine.module.loss_fn = self.kit_hooks["loss_fn"]

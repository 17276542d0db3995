"""Per-step metrics: one place computes them, two sinks (ledger, TensorBoard) receive them.

Only global rank 0 writes metrics. TensorBoard is opened with ``purge_step`` = the resumed step, so
steps replayed after a resume or rollback replace the old points instead of doubling the curve back;
in the ledger, for any step the latest event wins (docs/run-directory.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kit.ledger import LedgerWriter, NullLedger

TB_TAGS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "tokens_per_s": "perf/tokens_per_s",
    "samples_per_s": "perf/samples_per_s",
    "step_time": "perf/step_time_s",
    "tflops": "perf/tflops_per_device",
    "mfu": "perf/mfu",
}


class MetricSink:
    def __init__(self, ledger: LedgerWriter | NullLedger, tb_dir: Path | None, purge_step: int | None) -> None:
        self.ledger = ledger
        self.tb: Any = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step, flush_secs=10)

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        self.ledger.emit("step", step=step, **metrics)
        if self.tb is not None:
            for key, tag in TB_TAGS.items():
                v = metrics.get(key)
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None

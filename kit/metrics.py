"""Per-step metrics: one place computes them, two sinks (ledger, TensorBoard) receive them.

Only global rank 0 writes metrics. TensorBoard's protobuf encoding costs ~0.15 ms a step, so it runs
on a background thread fed by a queue: the training thread only appends. TensorBoard is opened with
``purge_step`` = the resumed step, so steps replayed after a resume or rollback replace the old points
instead of doubling the curve back; in the ledger, for any step the latest event wins
(docs/run-directory.md).
"""

from __future__ import annotations

import math
import queue
import threading
from pathlib import Path
from typing import Any

from kit.ledger import TB_TAGS, LedgerWriter, NullLedger


class MetricSink:
    def __init__(self, ledger: LedgerWriter | NullLedger, tb_dir: Path | None, purge_step: int | None) -> None:
        self.ledger = ledger
        self.tb: Any = None
        self._queue: queue.SimpleQueue[tuple[int, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step, flush_secs=10)
            self._thread = threading.Thread(target=self._write_tb, name="kit-tensorboard", daemon=True)
            self._thread.start()

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        self.ledger.emit("step", step=step, **metrics)
        if self.tb is not None:
            self._queue.put((step, metrics))

    def _write_tb(self) -> None:
        while (item := self._queue.get()) is not None:
            step, metrics = item
            for key, tag in TB_TAGS.items():
                v = metrics.get(key)
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(tag, v, step)

    def close(self) -> None:
        """Drain the queue, then flush and close the event file."""
        if self.tb is not None:
            self._queue.put(None)
            if self._thread is not None:
                self._thread.join()
            self.tb.flush()
            self.tb.close()
            self.tb = None

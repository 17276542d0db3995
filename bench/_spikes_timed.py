"""A kit segment that times its own spike guard: bench/spikes.py's in-run detector cost.

Same entry point as `kit train` (kit.segment); Trainer._check_spikes (the detector and policy
work of a step) is wrapped with a clock. At the end rank 0 writes the per-step seconds spent in it
to $KIT_BENCH_GUARD_OUT, next to which the ledger gives the step times of the same run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from kit import trainer

_real = trainer.Trainer._check_spikes
_spent: list[float] = []


def _timed(self: Any, vec: list[float]) -> Any:
    t0 = time.perf_counter()
    out = _real(self, vec)
    _spent.append(time.perf_counter() - t0)
    return out


trainer.Trainer._check_spikes = _timed  # type: ignore[method-assign]

if __name__ == "__main__":
    from kit.segment import main

    code = main()
    if os.environ.get("RANK", "0") == "0" and os.environ.get("KIT_BENCH_GUARD_OUT"):
        with open(os.environ["KIT_BENCH_GUARD_OUT"], "w") as f:
            json.dump(_spent, f)
    sys.exit(code)

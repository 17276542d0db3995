"""A kit segment with the spike guard switched off: the baseline of bench/spikes.py's detector cost.

Same entry point as `kit train` (kit.segment), with Trainer._check_spikes replaced by a no-op, so
the only difference from a normal segment is the detector and policy work per step.
"""

from __future__ import annotations

import sys

from kit import spikes as sp
from kit import trainer

trainer.Trainer._check_spikes = lambda self, vec: sp.StepCheck()  # type: ignore[method-assign]

if __name__ == "__main__":
    from kit.segment import main

    sys.exit(main())

"""kit.monitor: the operator's terminal UI (``kit monitor``), reading a run directory only.

Layers, bottom up (no Textual below ``widgets``): ``follow`` (tolerant, chunked ledger reading),
``series`` and ``health`` (bounded curves, GPU readings), ``model`` (events folded into one run's
picture), ``status`` (healthy / degraded / down), ``slurm`` (squeue/sacct), ``feed`` (drives the
readers, makes snapshots), then ``widgets``, ``app`` and ``cli``. docs/monitor.md is the guide.
"""

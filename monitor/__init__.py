"""kit.monitor: the operator's terminal UI (``kit monitor``), reading a run directory only.

What it shows comes from kit.run (no UI there): kit.ledger's reader and index, the run's folded model,
the chain's record, the one Slurm query module and the one run summary that ``kit status`` prints too.
Here, bottom up: ``feed`` (drives those off the UI thread, makes immutable snapshots), then
``widgets``, ``app`` and ``cli``. docs/monitor.md is the guide.
"""

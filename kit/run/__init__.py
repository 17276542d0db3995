"""A run as the tools see it, from its run directory: no UI, no Slurm commands of its own but queries.

Layers, bottom up: kit.ledger (the events), ``series`` and ``gpus`` (bounded curves, GPU readings),
``model`` (events folded into one run's bounded picture), ``chainstate`` (the chain's record,
``slurm/chain.json``), ``queue`` (the one Slurm query module: squeue and sacct, read-only), and
``summary``: the one typed run summary that ``kit status``, ``kit monitor --once`` and the TUI all
show, so they never disagree.
"""

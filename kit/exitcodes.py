"""Exit statuses of a training segment: the contract between the trainer and the chain.

The chain (kit.jobs) reads them to decide: end the chain, requeue at once, or resubmit with
backoff and count a failure. Anything not listed (a crash, a signal) counts as a failure.
``kit train`` exits with the same status as the segment it ran (docs/chain.md).

:data:`REASONS` maps the segment-end reasons (the ``reason`` of ``segment_ended``; one vocabulary,
kit.ledger.schema.END_REASONS) to their statuses.
"""

from __future__ import annotations

from kit.ledger.schema import END_REASONS

DONE = 0  # trainer.max_steps reached: the chain ends
STOPPED = 0  # the operator's `stop` switch: the chain ends (the ledger says which)
REQUEUE = 75  # saved at an allocation boundary (signal, deadline, stop_after_steps): continue the chain
PREFLIGHT = 76  # `kit doctor` failed on this node: exclude the node, resubmit, not a training failure
HANG = 77  # the hang watchdog ended the segment: exclude the suspect node, resubmit
GIVE_UP = 78  # the trainer asks the chain to stop (rollback cap, unrecoverable state): alert, end
DISK_FULL = 79  # a checkpoint save found its filesystem full (or over quota): alert, no node blamed
USAGE = 2  # a bad command line or recipe (nothing ran)

# reason -> exit status, from the one vocabulary of segment-end reasons (kit.ledger.schema.END_REASONS)
REASONS = {r.name: r.exit_code for r in END_REASONS}

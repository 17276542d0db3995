"""The kit's error hierarchy.

Every *expected* failure (a bad recipe, missing data, a corrupt checkpoint, a run directory that is
not writable) raises a subclass of :class:`KitError`. The CLI prints its message as one red line and
exits 1, with no traceback: the message must say what is wrong and what to do next. Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class KitError(Exception):
    """An expected failure whose message tells the operator what to do."""

    exit_code: int = 1


class ConfigError(KitError):
    """A recipe or override is malformed, contradictory or names an unknown key."""


class DataError(KitError):
    """Training data is missing, empty or in the wrong format."""


class CheckpointError(KitError):
    """A checkpoint is incomplete, corrupt, or does not fit this run."""


class RunDirError(KitError):
    """The run directory cannot be created, written or read."""


class LedgerError(KitError):
    """A ledger file cannot be written."""

"""The ledger: append-only JSON Lines events, one file per writer, one schema for everyone.

Every line is one JSON object::

    {"v": 2, "t": 1764300000.123, "kind": "step", "src": "train-r0", "seg": "1234_2", ...fields}

``v`` is :data:`SCHEMA_VERSION`; ``t`` is Unix time; ``kind`` names the event; ``src`` the writer;
``seg`` the chain segment. The parts:

- :mod:`kit.ledger.schema`: every kind with its typed fields, the step metrics, the segment-end reasons;
- :mod:`kit.ledger.writer`: :class:`LedgerWriter` (one per file; checks events, maintains the index);
- :mod:`kit.ledger.reader`: the one reader (:func:`parse_line`, :class:`Follower`, :func:`tail`,
  :func:`read_all`, :func:`merged`);
- :mod:`kit.ledger.index` and :mod:`kit.ledger.scan`: the index beside each file and the fast cold read
  of a whole run built on it.
"""

from kit.ledger.reader import (
    CHUNK,
    LEDGER_DIR,
    MAX_LINE,
    SUFFIX,
    Cursor,
    Event,
    Follower,
    LedgerReader,
    ReadStats,
    coerce,
    event_time,
    ledger_dir,
    ledger_files,
    merged,
    parse_line,
    read_all,
    read_tail,
    tail,
)
from kit.ledger.schema import (
    BULK_KINDS,
    END_REASONS,
    EVENTS,
    KINDS,
    METRICS,
    PLOTTED,
    REASONS,
    REQUEUE_REASONS,
    SCHEMA_VERSION,
    SEVERITIES,
    STEP_METRICS,
    TB_TAGS,
)
from kit.ledger.writer import LedgerWriter, NullLedger, hostname, writer_name

__all__ = [
    "BULK_KINDS", "CHUNK", "END_REASONS", "EVENTS", "KINDS", "LEDGER_DIR", "MAX_LINE", "METRICS", "PLOTTED",
    "REASONS", "REQUEUE_REASONS", "SCHEMA_VERSION", "SEVERITIES", "STEP_METRICS", "SUFFIX", "TB_TAGS", "Cursor",
    "Event", "Follower", "LedgerReader", "LedgerWriter", "NullLedger", "ReadStats", "coerce", "event_time",
    "hostname", "ledger_dir", "ledger_files", "merged", "parse_line", "read_all", "read_tail", "tail",
    "writer_name",
]

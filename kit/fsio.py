"""Atomic file writes: one helper for every small file a reader on another node may open mid-write.

Why: the run directory lives on a shared filesystem read by other nodes while it is written (the
monitor, the chain's drivers, ``kit stream``). A reader must see the old file or the new one, never
half of one, and a crash mid-write must leave the old one. Write a temporary file beside the target
(same directory, so the rename stays on one filesystem), optionally fsync it, rename it over the
target, and optionally fsync the directory so the rename itself survives a crash of the node.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: str | bytes, fsync: bool = False) -> Path:
    """Replace ``path`` with ``data`` atomically; ``fsync`` also makes it durable (manifests)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves neither a torn target nor litter
        raise
    if fsync:
        fsync_path(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any, fsync: bool = False, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON."""
    return atomic_write(path, json.dumps(obj, indent=indent), fsync=fsync)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder: so a rename inside it survives a crash of the node)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

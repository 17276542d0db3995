"""CRC-32 (zlib's polynomial: what zip, so torch.save, writes for every record) at memory speed.

Every integrity check in kit that is not sha256 uses it: checkpoint manifests (kit.checkpoint.digests),
`kit convert`'s source check and export verification (tools.source_check, tools.convert,
tools.verify_export). ISA-L's (the ``isal`` package: PCLMULQDQ, 25 GB/s on one core of this machine,
4x zlib's; it releases the GIL) where it is installed, else zlib's; the same values either way.

:func:`crc32_combine` (the CRC-32 of A + B from those of A and B and B's length) is ISA-L's, or, where
isal is missing, zlib's algorithm in Python (Python's zlib does not expose it).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import cache
from typing import Any

_isal: Any
try:
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    _isal = None

crc32: Callable[..., int] = _isal.crc32 if _isal is not None else zlib.crc32
IMPLEMENTATION = "isal" if _isal is not None else "zlib"


def _times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


@cache
def _zeros_operator(k: int) -> tuple[int, ...]:
    """The GF(2) matrix that appends 2**k zero bytes to a (raw) CRC-32 register (zlib's crc32_combine)."""
    if k == 0:  # one zero byte: eight one-bit shifts of the reflected polynomial
        one_bit = (0xEDB88320, *(1 << n for n in range(31)))
        op = one_bit
        for _ in range(3):
            op = tuple(_times(op, op[n]) for n in range(32))
        return op
    prev = _zeros_operator(k - 1)
    return tuple(_times(prev, prev[n]) for n in range(32))


def py_crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine, which Python's
    zlib does not expose). The operators for each power of two are cached: a combine is a few
    dozen 32-bit matrix-vector products, whatever the lengths."""
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_zeros_operator(k), crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2


crc32_combine: Callable[[int, int, int], int] = _isal.crc32_combine if _isal is not None else py_crc32_combine

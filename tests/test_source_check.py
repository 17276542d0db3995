"""tools.source_check on real torch.save files of generated tensors (sizes, dtypes, views), no DeepSpeed.

The CRC-32 algebra is checked against zlib itself; the record reader against the bytes torch.save wrote;
the check as the converter drives it (pieces of the records in any order, gaps left unread) against a
byte flipped anywhere in a read record. What the default check deliberately leaves out (records not read)
and the fall-backs (no CRC-32s, not a zip) are tested here too; the end-to-end refusals by `kit convert`
are in tests/test_convert.py on real DeepSpeed checkpoints.
"""

from __future__ import annotations

import io
import random
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kit import crc as kit_crc
from kit.tools.source_check import SourceCheck, check_pickles, crc32_combine, records

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.binary(max_size=3000), st.integers(0, 2**32 - 1))
def test_crc32_and_combine_are_zlibs(a: bytes, b: bytes, start: int) -> None:
    """kit.crc (ISA-L's where installed, as in CI) and the pure-Python combine (its fallback) against zlib."""
    assert kit_crc.crc32(a, start) == zlib.crc32(a, start) and kit_crc.crc32(b) == zlib.crc32(b)
    for combine in (crc32_combine, kit_crc.py_crc32_combine):
        assert combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_crc32_combine_of_long_runs() -> None:
    """Lengths with high bits set (the operators for large powers of two, which a 2 GB record needs)."""
    data = random.Random(1).randbytes(1 << 20)
    for combine in (crc32_combine, kit_crc.py_crc32_combine):
        for cut in (1, 4095, 1 << 19, (1 << 20) - 7):
            assert combine(zlib.crc32(data[:cut]), zlib.crc32(data[cut:]), len(data) - cut) == zlib.crc32(data)


def test_the_fast_crc_is_installed() -> None:
    """isal is a dependency (requirements/lock.txt): without it every check runs at zlib's speed, 4x slower."""
    assert kit_crc.IMPLEMENTATION == "isal"


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    torch.save({"state": tensors, "meta": {"step": 3}}, path)


tensor_sets = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=4),
    st.tuples(st.sampled_from(DTYPES), st.integers(0, 5000)),
    min_size=1, max_size=5)


@settings(max_examples=30, deadline=None)
@given(tensor_sets)
def test_records_are_torch_saves_bytes_and_crcs(tmp_path_factory: pytest.TempPathFactory,
                                                spec: dict[str, tuple[torch.dtype, int]]) -> None:
    """Every record's data offset and size give exactly the storage's bytes, and zlib's CRC-32 of them is
    the one the zip directory holds (torch.save's crc32 option is on by default)."""
    tensors = {k: torch.randint(0, 100, (n,)).to(dt) for k, (dt, n) in spec.items()}
    buf = io.BytesIO()
    torch.save(tensors, buf)
    raw = buf.getvalue()
    path = tmp_path_factory.mktemp("rec") / "t.pt"
    path.write_bytes(raw)
    recs = {r.name: r for r in records(path)}
    assert any(name.endswith("data.pkl") for name in recs)
    for r in recs.values():
        assert r.stored and r.crc == zlib.crc32(raw[r.start:r.start + r.size])
    meta = torch.load(path, map_location="meta", weights_only=True)
    for k, t in tensors.items():
        off = meta[k].untyped_storage()._checkpoint_offset
        rec = next(r for r in recs.values() if r.start == off)
        plain = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        assert raw[rec.start:rec.start + rec.size] == plain.numpy().tobytes(), k


def _partitions(path: Path, names: list[str]) -> list[tuple[int, int]]:
    """(byte offset, numel) of fp32 tensors in a saved file, as ZeroCheckpoint.file_extents gives them."""
    meta = torch.load(path, map_location="meta", weights_only=True)["state"]
    return [(meta[n].untyped_storage()._checkpoint_offset + 4 * meta[n].storage_offset(), meta[n].numel())
            for n in names]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 40000), min_size=1, max_size=3), st.integers(0, 2**32 - 1), st.booleans())
def test_pieces_in_any_order_and_a_flipped_byte(tmp_path_factory: pytest.TempPathFactory, sizes: list[int], seed: int,
                                                flip: bool) -> None:
    """The writer reads the partitions in pieces, out of order, skipping some bytes (padding): the check
    puts them together and passes them; with one byte flipped in a partition's record (read or skipped)
    it names that file and record."""
    rng = random.Random(seed)
    folder = tmp_path_factory.mktemp("sc")
    path = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    fp32 = {f"fp32_{i}": torch.randn(n) for i, n in enumerate(sizes)}
    _save(path, {**fp32, "exp_avg": torch.randn(100), "step": torch.tensor(3)})
    parts = _partitions(path, list(fp32))
    if flip:
        off, numel = parts[rng.randrange(len(parts))]
        data = bytearray(path.read_bytes())
        data[off + rng.randrange(4 * numel)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    check = SourceCheck([path], [parts])
    assert check.whole == []
    pieces = []
    for off, numel in parts:  # cut each partition in pieces, leave some out (as padding is), shuffle
        pos, end = off, off + 4 * numel
        while pos < end:
            n = min(end - pos, 4 * rng.randint(1, 5000))
            if rng.random() > 0.2:
                pieces.append((pos, n))
            pos += n
    rng.shuffle(pieces)
    for off, n in pieces:
        check.sent(0, off, n)
    problems = check.finish()
    if flip:
        assert len(problems) == 1 and path.name in problems[0] and "crc32 mismatch" in problems[0]
    else:
        assert problems == []


def test_what_is_not_read_is_not_checked_and_the_fallbacks(tmp_path: Path) -> None:
    """A flipped byte in a record the conversion does not read (an Adam moment) passes the record check
    by design (the full check catches it: tests/test_convert.py); a flipped byte in the pickle is caught
    before anything is unpickled; a file saved with torch's CRC-32s off, or not a zip, is left to the
    whole-file check."""
    path = tmp_path / "optim.pt"
    _save(path, {"fp32": torch.randn(1000), "exp_avg": torch.randn(1000)})
    parts = _partitions(path, ["fp32"])
    moment = _partitions(path, ["exp_avg"])[0]
    data = bytearray(path.read_bytes())
    data[moment[0] + 17] ^= 0x40
    path.write_bytes(bytes(data))
    check = SourceCheck([path], [parts])
    check.sent(0, parts[0][0], 4 * parts[0][1])
    assert check.finish() == []
    assert check_pickles([path]) == ([], [])

    pkl = next(r for r in records(path) if r.name.endswith("data.pkl"))
    data[pkl.start + pkl.size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems, whole = check_pickles([path])
    assert whole == [] and problems == [f"optim.pt: record {pkl.name}: crc32 mismatch"]

    off = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        _save(tmp_path / "nocrc.pt", {"fp32": torch.randn(1000)})
    finally:
        torch.serialization.set_crc32_options(off)
    assert all(r.crc == 0 for r in records(tmp_path / "nocrc.pt"))
    nocrc = SourceCheck([tmp_path / "nocrc.pt"], [_partitions(tmp_path / "nocrc.pt", ["fp32"])])
    assert nocrc.whole == [tmp_path / "nocrc.pt"] and nocrc.finish() == []
    (tmp_path / "junk.pt").write_bytes(b"not a zip" * 100)
    assert check_pickles([tmp_path / "junk.pt"]) == ([], [tmp_path / "junk.pt"])
    assert SourceCheck([tmp_path / "junk.pt"], None).whole == [tmp_path / "junk.pt"]

"""The export's CRC-32s, taken while its shards are read back (tools.convert._ShardFile.digest), and the proof
of the export's tensors by the CRC-32s torch.save wrote for the module (tools.verify_export.saved_record_check),
on generated shards and generated module layouts; no DeepSpeed (the end-to-end refusals are in
tests/test_convert.py on real checkpoints).

The digest is driven the way the writer drives it: a safetensors header, then each tensor's bytes copied in
pieces from a source file (sendfile, registered for the source check) or written from this process (the
cast path), in any mix; a piece that crosses a tensor's end (never written so, but must not mislead) is
left to the source check to read. The source check is a recorder here (it is tested in
tests/test_source_check.py).
"""

from __future__ import annotations

import os
import random
import threading
import zlib
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kit.tools.convert import _ShardFile, _tensor_spans
from kit.tools.verify_export import saved_record_check


class Recorder:
    """Stands in for tools.source_check.SourceCheck: the pieces it is told of."""

    def __init__(self) -> None:
        self.pieces: list[tuple[int, int, int, int]] = []
        self.lock = threading.Lock()

    def known(self, file: int, offset: int, nbytes: int, crc: int) -> None:
        with self.lock:
            self.pieces.append((file, offset, nbytes, crc))


shapes = st.lists(st.tuples(st.integers(0, 3000), st.sampled_from([torch.float32, torch.bfloat16])),
                  min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 2**32 - 1), st.booleans())
def test_digest_gives_each_tensors_and_each_pieces_crc(tmp_path_factory: pytest.TempPathFactory,
                                                       specs: list[tuple[int, Any]], seed: int, cross: bool) -> None:
    from safetensors.torch import save_file

    rng = random.Random(seed)
    folder = tmp_path_factory.mktemp("digest")
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}.w": torch.randn(n, generator=g).to(dt) for i, (n, dt) in enumerate(specs)}
    src = folder / "src.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt"})
    data = src.read_bytes()
    spans = _tensor_spans(data)
    assert spans is not None and len(spans) == len(tensors)
    header_end = min((s0 for s0, _, _ in spans), default=len(data))

    check = Recorder()
    out = _ShardFile(folder / "out.safetensors", check)  # type: ignore[arg-type]
    result: dict[str, Any] = {}
    hasher = threading.Thread(target=lambda: result.update(d=out.digest()))
    hasher.start()
    sent: list[tuple[int, int]] = []
    fd = os.open(src, os.O_RDONLY)
    try:
        out.write(data[:header_end])
        pos = header_end
        for _, s1, _ in spans:  # (contiguous after the header: safetensors packs them; a crossing piece ran on)
            while pos < s1:
                n = min(s1 - pos, rng.randint(1, 5000))
                if cross and rng.random() < 0.1:  # a piece over the tensor's end (the writer never does it)
                    n = min(len(data) - pos, n + rng.randint(1, 64))
                if rng.random() < 0.6:
                    out.sendfile(fd, pos, n, 0)  # source offsets = output offsets: the file is copied as is
                    sent.append((pos, n))
                else:
                    out.write(data[pos:pos + n])
                pos += n
        if pos < len(data):
            out.write(data[pos:])
    finally:
        os.close(fd)
        out.close()
        hasher.join(timeout=120)
    file_crc, crcs = result["d"]
    assert file_crc == f"{zlib.crc32(data):08x}"  # the manifest's CRC-32 of the whole file
    assert crcs == {name: zlib.crc32(data[s0:s1]) for s0, s1, name in spans}
    for file, offset, n, crc in check.pieces:  # every piece told is right, and is one the writer sent
        assert file == 0 and (offset, n) in sent and crc == zlib.crc32(data[offset:offset + n])
    inside = [(o, n) for o, n in sent if any(s0 <= o and o + n <= s1 for s0, s1, _ in spans)]
    assert sorted((o, n) for _, o, n, _ in check.pieces) == sorted(inside)  # the rest left to the check


def test_tensor_spans_refuse_what_is_not_plain() -> None:
    import json

    def file(header: dict[str, Any]) -> bytes:
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw

    assert _tensor_spans(b"\x10\x00") == []  # not whole yet
    assert _tensor_spans(file({"a": {"data_offsets": [0, 8]}})[:12]) == []
    assert _tensor_spans(file({"a": {"data_offsets": [0, 8]}, "b": {"data_offsets": [4, 12]}})) is None  # overlap
    assert _tensor_spans(file({"a": {"data_offsets": [8, 0]}})) is None
    assert _tensor_spans(file({"a": {"nope": 1}})) is None
    assert _tensor_spans(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!") is None


layouts = st.lists(st.tuples(st.integers(1, 700), st.integers(0, 9)), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(layouts, st.integers(0, 3), st.booleans(), st.integers(0, 2**32 - 1))
def test_saved_record_check(tmp_path_factory: pytest.TempPathFactory, views: list[tuple[int, int]], own: int,
                            tie: bool, seed: int) -> None:
    """A module of views into one flat buffer (with padding between them, as DeepSpeed's flat groups have),
    maybe a tied view of the first, and tensors of their own: every one is proven by the export's CRC-32s
    alone; one wrong CRC-32 leaves unproven exactly the tensors of its storage (to be compared byte for
    byte, which names it); a view with no export CRC-32 the same."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(sum(n + gap for n, gap in views) + 5, generator=g)
    module: dict[str, torch.Tensor] = {}
    pos = 0
    for i, (n, gap) in enumerate(views):
        pos += gap
        module[f"flat.{i}"] = flat[pos:pos + n].view(n)
        pos += n
    if tie:
        module["tied"] = module["flat.0"]
    for i in range(own):
        module[f"own.{i}"] = torch.randn(rng.randint(1, 300), generator=g)
    path = tmp_path_factory.mktemp("saved") / "mp_rank_00_model_states.pt"
    torch.save({"module": module, "other": [1, 2]}, path)
    crcs = {k: zlib.crc32(v.contiguous().view(torch.uint8).numpy()) for k, v in module.items() if k != "tied"}
    names = set(module)
    proven, checked = saved_record_check(path, crcs, names)
    assert proven == names and checked == 1 + own

    victim = rng.choice(sorted(crcs))
    wrong = {**crcs, victim: crcs[victim] ^ 1}
    share = {k for k in module if k.startswith("flat.") or k == "tied"} if victim.startswith("flat.") else {victim}
    assert saved_record_check(path, wrong, names)[0] == names - share
    missing = {k: v for k, v in crcs.items() if k != victim}
    assert saved_record_check(path, missing, names)[0] == names - share

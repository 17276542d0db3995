"""``kit convert``: a DeepSpeed ZeRO checkpoint of the run to a Hugging Face BLOOM model, verified.

What it writes (into a hidden staging folder beside ``--out``, renamed into place only after it
verified, so nothing at the destination looks complete before it is)::

    config.json, generation_config.json        from the run's frozen run.toml
    model-0000i-of-0000n.safetensors + index   sharded (model.safetensors when one shard)
    tokenizer.json, tokenizer_config.json      the run's tokenizer; AutoTokenizer loads it offline
    MANIFEST.json                              written last: every file's size and CRC-32, the
                                               source checkpoint, the verification result

Memory and speed: each tensor's bytes go from the ZeRO partitions (tools.zero_reader) straight into
its shard file, under a safetensors header built from the layout: fp32 copied file to file in the
kernel, bf16 cast 16 MB at a time. Peak memory is the Python process plus a few 16 MB buffers, not one
shard, and not 2.3x the model like DeepSpeed's zero_to_fp32.

Shards are written side by side (a writer per core, up to WRITERS), and each is read back from the page
cache as it grows (:meth:`_ShardFile.digest`) for three things at once: its CRC-32 (the manifest; the
sha256 is taken by ``kit upload``, which reads every byte anyway), the CRC-32 of each tensor (the
verification), and the CRC-32 of each fp32 piece copied from the checkpoint (the source check). So the
command costs about the conversion alone plus the logits check (bench/convert.py).

The source is checked as it is read (tools.source_check): every file's size against the manifest, the
pickles' zip records against torch.save's CRC-32s before anything is unpickled, and each fp32 partition
record against its CRC-32, put together from the pieces' CRC-32s (for bf16, read again from the page
cache on another thread, since the export holds cast bytes). A fp32 record whose CRC-32 does not match is
read again from the checkpoint, to tell a damaged checkpoint from a bad copy. Records no export byte
comes from (the Adam moments: 3/4 of the checkpoint) are not read, so not checked; ``--full-check``
checks every byte of every file against the manifest instead (:func:`verify_source`), and files the
record check cannot cover are checked so anyway. After, the result is verified against the checkpoint's
own weights (the engine's module weights, ZeRO-1/2 in the same dtype, or DeepSpeed's own zero_to_fp32
reconstruction): every tensor (by CRC-32: the export's as written against the CRC-32s torch.save wrote
for the module, or the reference tensor's own; byte for byte where neither can be had) and the logits of
the model's first blocks loaded with ``from_pretrained`` (tools/verify_export.py). Memory stays near the
largest tensor either way.

Checkpoints written at a tensor x pipeline layout (kit.parallel) are read through
tools.layout_reader: the same byte ranges, gathered from every model-parallel rank's partitions, with
pipeline names mapped and tensor shards merged; their reference is the engine's module weights of
every shard, joined with torch.cat (tools.verify_export.layout_module_state), held whole in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from kit import checkpoint as ck
from kit.config import RunConfig
from kit.crc import crc32, crc32_combine
from kit.errors import CheckpointError, KitError
from kit.fsio import atomic_write_json, fsync_path
from kit.ledger import LedgerWriter, NullLedger, hostname
from kit.progress import NO_BARS, Bars
from kit.rundir import RunDir, resolve_run
from kit.tools.layout_reader import LayoutCheckpoint, open_checkpoint
from kit.tools.source_check import SourceCheck, check_pickles, verify_source
from kit.tools.zero_reader import MADV_DONTNEED, MADV_POPULATE_READ, ZeroCheckpoint, advise

Reader: TypeAlias = ZeroCheckpoint | LayoutCheckpoint  # a data-parallel checkpoint, or one of any layout

DTYPES = ("bf16", "fp32")
EXPORT_VERSION = 2  # 2: files list size and crc32 (1: size and sha256)


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KiB"`` or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError, OverflowError):
        raise KitError(f"--shard-size {text!r} is not a size; write e.g. 2GB, 500MB or 1048576") from None
    if value <= 0:
        raise KitError("--shard-size must be positive")
    return value


def torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


@dataclass(frozen=True, slots=True)
class Export:
    out: Path
    tag: str
    step: int
    dtype: str
    shards: int
    bytes: int
    seconds: float
    verify: dict[str, Any]


# ------------------------------------------------------------------------------------------ checks


def pick_checkpoint(rd: RunDir, step: int | None, check: bool = True) -> ck.Checkpoint:
    """The requested step (or the newest complete one) as a complete, intact checkpoint (``check``:
    every byte against the manifest first; ``kit convert`` passes False and has :func:`convert` check
    while it converts)."""
    root = rd.checkpoints
    if step is not None:
        tag = ck.tag_for(step)
        if not (root / tag).is_dir():
            have = [c.step for c in ck.scan(root)[0]]
            raise CheckpointError(f"{rd.path} has no checkpoint at step {step}; complete ones: {have or 'none'}")
        ckpt = ck.load(root, tag)
    else:
        complete, _ = ck.scan(root)
        if not complete:
            raise CheckpointError(f"{root} holds no complete checkpoint (none with {ck.MANIFEST}); train first")
        ckpt = complete[-1]
    if check:
        _refuse_corrupt(ckpt, verify_source(ckpt))
    return ckpt


def _refuse_corrupt(ckpt: ck.Checkpoint, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.tag} is corrupt ({'; '.join(problems[:3])}); "
                              "choose another step with --step")


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def expected_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the run's model, built on the meta device (no memory); once per
    model description in a process (a conversion asks twice)."""
    import torch
    from transformers import BloomForCausalLM

    from kit.model import bloom_config

    key = f"{cfg.model!r} {cfg.data.vocab_size}"
    if key not in _SHAPES:
        with torch.device("meta"):
            model = BloomForCausalLM(bloom_config(cfg.model, cfg.data.vocab_size))
        _SHAPES[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return dict(_SHAPES[key])


def check_model(reader: Reader, cfg: RunConfig, ckpt: ck.Checkpoint) -> list[str]:
    """Refuse a checkpoint of another model; returns the parameter names to write, in order."""
    expected = expected_shapes(cfg)
    got = {p.name: p.shape for p in reader.params}
    wrong = [f"{n}: {got[n]} != {expected.get(n)}" for n in got if expected.get(n) != got[n]]
    missing = [n for n in expected if n not in got and n not in reader.shared]
    if wrong or missing:
        raise CheckpointError(f"checkpoint {ckpt.tag} is not of this run's model ({'; '.join((wrong + missing)[:3])}); "
                              "convert it with the run directory it was trained in")
    return [p.name for p in reader.params]


# ------------------------------------------------------------------------------------------ writing


def plan_shards(reader: Reader, dtype: str, shard_bytes: int) -> list[list[int]]:
    """Parameter indices per output shard, known before reading a single weight."""
    item = 2 if dtype == "bf16" else 4
    shards: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(reader.params):
        nbytes = p.numel * item
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


ST_DTYPE = {"bf16": "BF16", "fp32": "F32"}
CHUNK = 16 << 20  # bytes of fp32 read at a time when weights go through this process
HEADER_ALIGN = 64  # the tensors' bytes begin at a multiple of this (safetensors_header)
WRITERS = 4  # at most this many shards written at once (write_weights)


def safetensors_header(entries: list[tuple[str, tuple[int, ...], int]], dtype: str) -> tuple[bytes, list[str]]:
    """The header that safetensors' ``save_file(..., metadata={"format": "pt"})`` writes for tensors of one
    dtype, and the order their bytes follow it: names sorted, compact JSON after its little-endian u64
    length (the format spec), padded with spaces (the spec allows any) so that the tensors' bytes begin at
    a multiple of 64 bytes, not save_file's 8. Why: a reader that maps the file (from_pretrained) then
    finds every tensor whose predecessors' sizes are multiples of 64 bytes (all of BLOOM's, hidden a
    multiple of 16) at a 64-byte aligned address, as kernels want and as the logits check needs it
    (tools/verify_export.py: otherwise it copies the prefix's weights, the embedding included)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, nbytes in sorted(entries):
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-(8 + len(raw)) % HEADER_ALIGN)
    return len(raw).to_bytes(8, "little") + raw, sorted(name for name, _, _ in entries)


class _ShardFile:
    """One shard being written, read back as it grows: the writer appends and reports each step
    (:meth:`write`, :meth:`sendfile`), a pool thread reads the new bytes back from the page cache and
    takes their CRC-32s (:meth:`digest`), starting with the first bytes, not after the whole shard.
    pread, kit.crc and sendfile release the GIL: the two go on in parallel.

    ``check``: the source check (tools.source_check.SourceCheck), told the CRC-32 of each piece of a
    ZeRO partition copied unchanged (fp32), from the same reads: the source is then not read twice."""

    STEP = 8 << 20  # the largest single write or sendfile: the hashing thread follows at that distance
    READ = 1 << 20  # hashing reads: cache-sized
    kernel_copy = True  # sendfile(2) works here (set False, for the process, at its first refusal)

    def __init__(self, path: Path, check: SourceCheck | None = None) -> None:
        self.path = path
        self.check = check
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.written = 0
        self.closed = False
        self.buf: bytearray | None = None
        self.cond = threading.Condition()
        self.pieces: list[tuple[int, int, int, int]] = []  # (position here, source file, its offset, bytes)

    def _advance(self, n: int) -> None:
        with self.cond:
            self.written += n
            self.cond.notify()

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self.fd, view[:self.STEP])
            view = view[n:]
            self._advance(n)

    def sendfile(self, in_fd: int, offset: int, count: int, source: int = -1) -> None:
        """Append ``count`` bytes of another file (``source``: its index in the source check), copied in
        the kernel (sendfile(2)); where the file systems refuse that, through a buffer in this process."""
        if self.check is not None and source >= 0:
            with self.cond:  # before its bytes count as written: the hashing thread sees the piece first
                self.pieces.append((self.written, source, offset, count))
        while count > 0:
            if self.kernel_copy:
                try:
                    sent = os.sendfile(self.fd, in_fd, offset, min(count, self.STEP))
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    _ShardFile.kernel_copy = False
                    continue
            else:
                self.buf = self.buf or bytearray(self.STEP)
                sent = os.preadv(in_fd, [memoryview(self.buf)[:min(count, self.STEP)]], offset)
                if sent > 0:
                    self.write(memoryview(self.buf)[:sent])
            if sent <= 0:
                raise CheckpointError(f"a ZeRO partition file ended early (offset {offset}); the checkpoint "
                                      "is damaged")
            offset, count = offset + sent, count - sent
            if self.kernel_copy:
                self._advance(sent)

    def close(self) -> None:
        with self.cond:
            if not self.closed:
                self.closed = True
                os.close(self.fd)
            self.cond.notify()

    def digest(self) -> tuple[str, dict[str, int]]:
        """The file's CRC-32 (8 hex digits, for the export's manifest), once the writer has closed (a pool
        thread runs this), and, from the same reads, the CRC-32 of each tensor's bytes and of each copied
        piece (told to the source check). The tensors are those the file's own header names (parsed from
        the bytes read back, not taken from the writer), so the verification can check every tensor of the
        export as written against the checkpoint's CRC-32s without reading it again (tools.verify_export).
        A tensor's CRC-32 is its pieces' put together (crc32_combine); tensors the header does not lay out
        plainly get none (compared by bytes).

        Why CRC-32 and not sha256 for the manifest: sha256 (OpenSSL, 1.7 GB/s a core here) was half the
        command's CPU time and, on a two-core node, what kept it under half a copy's speed
        (bench/convert.py); ISA-L's CRC-32 is ~15x faster. It catches any accidental change (an integrity
        check, as the checkpoints' CRC-32s are for ``kit convert``); ``kit upload`` takes each file's
        sha256 as it reads it to send (it always did, to check it against this manifest) and writes it
        into the destination's KIT_UPLOAD.json, where the hub and ``kit verify URL`` use it."""
        file_crc = 0
        buf = bytearray(self.READ)
        view = memoryview(buf)
        pos = 0
        head = bytearray()
        spans: list[tuple[int, int, str]] | None = []  # file offsets [start, end) of each tensor, in file order
        crcs: dict[str, int] = {}
        k, crc = 0, 0  # the tensor being read, its CRC so far
        pieces = self.pieces  # appended to by the writer, before the bytes they cover count as written
        j, piece_crc, piece_open = 0, 0, False  # the next piece, the CRC so far of the one being read
        with open(self.path, "rb", buffering=0) as f:
            while True:
                with self.cond:
                    while pos == self.written and not self.closed:
                        self.cond.wait()
                    end = self.written
                if pos == end:
                    crcs.update((name, 0) for s0, s1, name in (spans or [])[k:] if s0 == s1 == pos)  # empty, last
                    return f"{file_crc:08x}", crcs
                while pos < end:
                    got = os.preadv(f.fileno(), [view[:min(self.READ, end - pos)]], pos)
                    if got <= 0:
                        raise CheckpointError(f"{self.path} shrank while it was written; is another process "
                                              "writing the same export?")
                    file_crc = crc32(view[:got], file_crc)
                    if spans is not None and not spans and len(head) < (8 << 20):  # the header: the spans
                        head += view[:got]
                        spans = _tensor_spans(bytes(head))  # None: not laid out plainly; []: not whole yet
                    a, b = pos, pos + got
                    while spans and k < len(spans) and spans[k][0] < b:  # this read's tensor bytes
                        s0, s1, name = spans[k]
                        a = max(a, s0)
                        while a < min(b, s1):  # a piece's bytes, or (not copied: cast) the tensor's own
                            while not piece_open and j < len(pieces) and (  # pieces not to be had whole here:
                                    pieces[j][0] < a or pieces[j][0] < s1 < pieces[j][0] + pieces[j][3]):
                                j += 1  # left to the source check to read itself
                            if j < len(pieces) and (piece_open or pieces[j][0] == a):
                                at, source, offset, n = pieces[j]
                                stop = min(b, at + n)
                                piece_crc, piece_open = crc32(view[a - pos:stop - pos], piece_crc), True
                                if stop == at + n:  # the piece is whole: its CRC to the check and the tensor
                                    assert self.check is not None
                                    self.check.known(source, offset, n, piece_crc)
                                    crc = crc32_combine(crc, piece_crc, n)
                                    piece_crc, piece_open, j = 0, False, j + 1
                            else:
                                nxt = pieces[j][0] if j < len(pieces) and pieces[j][0] > a else s1
                                stop = min(b, s1, nxt)
                                crc = crc32(view[a - pos:stop - pos], crc)
                            a = stop
                        if s1 > b:
                            break
                        crcs[name], crc, k = crc, 0, k + 1
                    pos += got


def _tensor_spans(head: bytes) -> list[tuple[int, int, str]] | None:
    """The file offsets of each tensor of a safetensors file, from its first bytes: [] while the header
    is not whole yet; None if it is not a plain layout (unreadable, overlapping or out-of-order tensors)."""
    if len(head) < 8:
        return []
    n = int.from_bytes(head[:8], "little")
    if len(head) < 8 + n:
        return [] if n < (8 << 20) else None
    try:
        header = json.loads(head[8:8 + n])
        spans = sorted((8 + n + int(v["data_offsets"][0]), 8 + n + int(v["data_offsets"][1]), k)
                       for k, v in header.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    if any(s1 < s0 for s0, s1, _ in spans) or any(a[1] > b[0] for a, b in itertools.pairwise(spans)):
        return None
    return spans


class _Stopped(Exception):
    """A shard writer stopped because another one failed (write_weights raises that one's error)."""


def write_weights(reader: Reader, stage: Path, dtype: str, shard_bytes: int, progress: Any = None,
                  advance: Callable[[int], None] | None = None,
                  extents: list[list[tuple[int, int]]] | bool | None = True,
                  check: SourceCheck | None = None,
                  writers: int = 0,
                  syncs: list[Future[None]] | None = None) -> tuple[int, int, dict[str, str], dict[str, int]]:
    """Write the safetensors shards (and their index); returns (shards, bytes, CRC-32 per shard file,
    CRC-32 per tensor as read back from the shards: :meth:`_ShardFile.digest`).

    Each shard is its safetensors header (built here, from the layout alone) followed by each tensor's
    bytes, copied from the ZeRO partitions straight into the file:

    - where tools.zero_reader.ZeroCheckpoint.file_extents finds the fp32 partitions in the optimizer
      files: fp32 file to file with sendfile(2), the bytes never enter this process; bf16 read (pread)
      in CHUNK pieces into one buffer, cast into another, written;
    - otherwise, through the mmapped partitions in CHUNK windows (madvise POPULATE_READ, cast or
      written as is, DONTNEED).

    Either way resident memory stays at a few CHUNKs per writer whatever the model size. ``extents``: the
    reader's file_extents() when the caller has them (True: find them here). ``check``: told of every
    range read from the optimizer files (tools.source_check: their CRC-32 is taken on the way).

    ``writers`` threads (0: one per core, at most WRITERS) write shards side by side when the partitions'
    file extents are known: a kernel copy runs at one core's memory-copy speed, and one writer left the
    other cores idle (two writers: 0.79 s -> 0.62 s for 1 GB here, bench/convert.py). Through memory maps
    (no extents) one writer, shard after shard, so each shard's pages can be given back. A thread per
    shard being written reads it back as it grows (:class:`_ShardFile`: its CRC-32 for the manifest, and
    each tensor's and copied piece's), and one fsyncs each finished shard. ``syncs``: where given, the
    fsyncs' futures are put there and not waited for (the caller waits before its commit point: the logits
    check needs the bytes in the page cache, not on disk, and the last shard's fsync is then not in its way).
    """
    import torch

    plan = plan_shards(reader, dtype, shard_bytes)
    n = len(plan)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {reader.params[i].name: fname for fname, idx in zip(names, plan, strict=True) for i in idx}
    td = torch_dtype(dtype)
    item = 2 if dtype == "bf16" else 4
    if extents is True:
        extents = reader.file_extents()
    assert extents is not True
    per_chunk = CHUNK // 4
    by_name = {p.name: p for p in reader.params}
    writers = max(1, min(writers or WRITERS, os.cpu_count() or 1, n)) if extents else 1

    def write_cast(out: _ShardFile, r: int, offset: int, count: int, raw_bytes: bytearray, buf: Any) -> None:
        """``count`` fp32 elements at ``offset`` of file ``r``, cast to the output dtype (through this
        writer's buffers)."""
        in_fd = srcs[r]
        view = memoryview(raw_bytes)
        raw = torch.frombuffer(raw_bytes, dtype=torch.float32)
        for i in range(0, count, per_chunk):
            k = min(per_chunk, count - i)
            got = 0
            while got < 4 * k:
                n = os.preadv(in_fd, [view[got:4 * k]], offset + 4 * i + got)
                if n <= 0:
                    raise CheckpointError(f"a ZeRO partition file ended early (offset {offset}); the checkpoint "
                                          "is damaged")
                got += n
            if check:
                check.sent(r, offset + 4 * i, 4 * k)
            cast = buf[:k * item]
            cast.view(td).copy_(raw[:k])
            out.write(cast.numpy())

    def write_mapped(out: _ShardFile, src: Any, buf: Any) -> None:
        for i in range(0, src.numel(), per_chunk):
            piece = src[i:i + per_chunk]
            advise(piece, MADV_POPULATE_READ)
            if td == torch.float32:
                out.write(piece.numpy())
            else:
                cast = buf[:piece.numel() * item]
                cast.view(td).copy_(piece)
                out.write(cast.numpy())
            advise(piece, MADV_DONTNEED)

    def write_shard(k: int, parts: list[list[Any]] | None) -> int:
        """Shard ``k``, whole: its bytes written, its read-back started, its fsync queued."""
        fname = names[k]
        specs = [reader.params[i] for i in plan[k]]
        buf = torch.empty(0 if extents and dtype == "fp32" else CHUNK, dtype=torch.uint8)
        raw_bytes = bytearray(CHUNK if extents and dtype != "fp32" else 4)
        header, order = safetensors_header([(p.name, p.shape, p.numel * item) for p in specs], dtype)
        out = _ShardFile(stage / fname, check)
        hashes[fname] = hashing.submit(out.digest)
        written = 0
        try:
            with torch.no_grad():
                out.write(header)
                for name in order:
                    spec = by_name[name]
                    for r, g, a, count in reader.ranges(spec):
                        if stop.is_set():
                            raise _Stopped  # another writer failed: its error is the one raised
                        if extents and dtype == "fp32":  # the source check learns CRCs from out.digest
                            out.sendfile(srcs[r], extents[r][g][0] + 4 * a, 4 * count, r)
                        elif extents:
                            write_cast(out, r, extents[r][g][0] + 4 * a, count, raw_bytes, buf)
                        else:
                            assert parts is not None
                            write_mapped(out, parts[r][g].detach()[a:a + count], buf)
                    written += spec.numel * item
                    if advance:  # a progress bar's bytes written (rich's bars take a lock)
                        advance(spec.numel * item)
        except BaseException:
            stop.set()
            raise
        finally:
            out.close()  # also on an error: the hashing thread must not wait for bytes that never come
        pending.append(syncing.submit(fsync_path, out.path))
        return written

    total = 0
    hashes: dict[str, Future[tuple[str, dict[str, int]]]] = {}
    wait_syncs = syncs is None
    pending: list[Future[None]] = [] if syncs is None else syncs
    stop = threading.Event()
    with contextlib.ExitStack() as stack:
        hashing = stack.enter_context(ThreadPoolExecutor(max_workers=writers + 1))
        syncing = ThreadPoolExecutor(max_workers=1)  # left running (the caller waits) where syncs was given
        stack.callback(syncing.shutdown, wait=wait_syncs)
        srcs = [stack.enter_context(open(f, "rb")).fileno() for f in reader.optim_files] if extents else []
        if writers > 1:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=writers, thread_name_prefix="shard-writer"))
            jobs = [pool.submit(write_shard, k, None) for k in range(n)]
            try:
                for fname, job in zip(names, jobs, strict=True):
                    total += job.result()
                    if progress:
                        progress(fname)
            except BaseException as e:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                errors = [j.exception() for j in jobs if j.done() and not j.cancelled()]
                raise next((x for x in errors if x is not None and not isinstance(x, _Stopped)), e) from None
        else:
            mapped = stack.enter_context(contextlib.ExitStack())
            parts: list[list[Any]] | None = None
            for k, fname in enumerate(names):
                if not extents and (parts is None or advise.fn is None):  # no madvise: drop the pages per shard
                    mapped.close()
                    parts = mapped.enter_context(reader.open())
                total += write_shard(k, parts)
                if progress:
                    progress(fname)
        done = {fname: f.result() for fname, f in hashes.items()}
        digests = {fname: d for fname, (d, _) in done.items()}
        crcs = {name: crc for _, tensors in done.values() for name, crc in tensors.items()}
        for f in pending if wait_syncs else []:
            f.result()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (stage / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return n, total, digests, crcs


def write_config_and_tokenizer(rd: RunDir, cfg: RunConfig, stage: Path, dtype: str) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from kit.data import TOKENIZER
    from kit.model import bloom_config

    config = bloom_config(cfg.model, cfg.data.vocab_size)
    config.architectures = ["BloomForCausalLM"]
    config.use_cache = True  # training turns the KV cache off; generation wants it
    config.dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    config.save_pretrained(stage)
    GenerationConfig.from_model_config(config).save_pretrained(stage)
    tok_file = (Path(cfg.data.prepared) if cfg.data.prepared else rd.data) / TOKENIZER
    if not tok_file.exists():
        raise KitError(f"{tok_file} is missing: the run's tokenizer is needed for the export; restore it")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>", model_max_length=cfg.model.seq_length)
    tok.save_pretrained(stage)


def write_export_manifest(stage: Path, ckpt: ck.Checkpoint, cfg: RunConfig, dtype: str,
                          verify: dict[str, Any], known: dict[str, str], source_check: str = "none") -> dict[str, Any]:
    """MANIFEST.json of the export, last (a checkpoint manifest's ``files`` format, each file's size and
    CRC-32: no sha256, see :meth:`_ShardFile.digest`); ``known``: CRC-32s taken while writing;
    ``source_check``: how the source was checked ("records": the zip records read, "full": every byte,
    "none")."""
    files = sorted(p for p in stage.rglob("*") if p.is_file() and p.name != ck.MANIFEST)
    manifest = {
        "version": EXPORT_VERSION,
        "kind": "hf-export",
        "created": time.time(),
        "files": {str(p.relative_to(stage)): {"size": p.stat().st_size, "crc32": known.get(p.name) or ck.crc32(p)}
                  for p in files},
        "export": {"tag": ckpt.tag, "step": ckpt.step, "run": cfg.run.name, "dtype": dtype,
                   "zero_stage": ckpt.manifest.kit.zero_stage, "config_digest": cfg.digest(),
                   "source_manifest_sha256": hashlib.sha256((ckpt.path / ck.MANIFEST).read_bytes()).hexdigest(),
                   "source_check": source_check, "verify": verify},
    }
    atomic_write_json(stage / ck.MANIFEST, manifest)
    return manifest


def convert(rd: RunDir, ckpt: ck.Checkpoint, out: Path, dtype: str = "", shard_bytes: int = 2 * 10**9,
            verify: bool = True, atol: float = 0.0, force: bool = False,
            ledger: LedgerWriter | NullLedger | None = None, progress: Any = None,
            check_source: bool = False, bars: Bars = NO_BARS, full_check: bool = False) -> Export:
    """Convert one checkpoint into ``out`` (a local folder); raises KitError on any problem. ``bars``:
    progress bars (kit.progress: bytes written, the logits check).

    ``check_source``: check the bytes of the checkpoint that the conversion reads, while it reads them
    (tools.source_check: every file's size against the manifest, and each zip record read against
    the CRC-32 torch.save wrote), and refuse it before anything appears at ``out``. ``full_check``:
    every byte of every file against the manifest instead (:func:`verify_source`), on another thread
    while converting."""
    from kit.tools.verify_export import verify_export, warm_up

    led = ledger or NullLedger()
    out = Path(out)
    check_destination(out, force)
    cfg = rd.load_config()
    dtype = dtype or cfg.deepspeed.precision
    if dtype not in DTYPES:
        raise KitError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    whole: list[Path] = []
    if check_source and not full_check:  # before anything is unpickled: sizes, then the pickles' records
        _refuse_corrupt(ckpt, ck.verify(ckpt, hashes=False))
        problems, whole = check_pickles([ckpt.path / rel for rel in ckpt.manifest.files if rel.endswith(".pt")])
        _refuse_corrupt(ckpt, problems)
    reader = open_checkpoint(ckpt.path, ck.layout_of(ckpt), expected_shapes(cfg), cfg.model.n_layer)
    check_model(reader, cfg, ckpt)
    extents = reader.file_extents()
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    checking = ThreadPoolExecutor(max_workers=3)  # the whole-file check; the small files; warm_up
    records: SourceCheck | None = None
    source: Future[list[str]] | None = None
    try:
        if check_source and not full_check:
            records = SourceCheck(reader.optim_files, extents)
            if whole + records.whole:  # what cannot be checked record by record: whole files, meanwhile
                source = checking.submit(verify_source, ckpt, only=whole + records.whole)
        elif check_source:
            source = checking.submit(verify_source, ckpt)
        stage.mkdir(parents=True)
        small = checking.submit(write_config_and_tokenizer, rd, cfg, stage, dtype)  # while the shards are written,
        warm = checking.submit(warm_up) if verify else None  # as is what from_pretrained builds on first use
        item = 2 if dtype == "bf16" else 4
        task = bars.task(f"writing {dtype}", sum(p.numel for p in reader.params) * item, unit="bytes")
        syncs: list[Future[None]] = []  # the shards' fsyncs: waited for before the manifest, the commit point
        shards, nbytes, digests, crcs = write_weights(reader, stage, dtype, shard_bytes, progress,
                                                      advance=task.advance, extents=extents, check=records,
                                                      syncs=syncs)
        small.result()
        seconds = time.perf_counter() - t0
        # a corrupt source must not be verified against, nor exported
        _refuse_corrupt(ckpt, (records.finish() if records else []) + (source.result() if source else []))
        result: dict[str, Any] = {"skipped": True}
        if warm:
            warm.result()
        if verify:
            with bars.phase("logits check"):
                result = verify_export(rd, cfg, ckpt, stage, dtype, atol, crcs)
            led.emit("ckpt_verified", tag=ckpt.tag, where="export", **result)
            if not result["ok"] and check_source and not full_check:  # the reference's bytes were not checked:
                _refuse_corrupt(ckpt, verify_source(ckpt))  # is it a damaged checkpoint? (then say so)
            if not result["ok"]:
                weights = ("its weights are bit-identical to the checkpoint's, so the arithmetic differs: "
                           "pass --atol (e.g. 1e-5) if this machine's kernels are not reproducible"
                           if result["weights_identical"] else
                           f"weights that differ: {', '.join(result['differing_weights'])}")
                raise CheckpointError(
                    f"the export of {ckpt.tag} does not reproduce the checkpoint's logits (max |diff| "
                    f"{result['max_abs_diff']:.3g} > tolerance {atol}; {weights}); nothing was written to {out}")
        for f in syncs:
            f.result()
        write_export_manifest(stage, ckpt, cfg, dtype, result, digests,
                              ("full" if full_check else "records") if check_source else "none")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except OSError as e:
        raise _write_error(e, out) from None
    finally:
        if records is not None:
            records.close()
        checking.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(stage, ignore_errors=True)
    export = Export(out, ckpt.tag, ckpt.step, dtype, shards, nbytes, round(seconds, 3), result)
    led.emit("ckpt_converted", tag=ckpt.tag, out=str(out), step=ckpt.step, dtype=dtype, shards=shards,
             bytes=nbytes, seconds=export.seconds, verified=result.get("ok"))
    return export


def check_destination(out: Path, force: bool) -> None:
    """Before any work: ``out`` can be written (nothing on its way is a file, its folder is writable:
    a write probe) and, if it exists, may be replaced: only with ``force``, and only an earlier
    export. --force never deletes a checkpoint, a run directory or any other folder."""
    from kit.tools.remote import UploadError, local_folder, probe

    if out.exists():
        if not force:
            raise KitError(f"{out} already exists; choose another --out or pass --force to replace it")
        if not out.is_dir():
            raise KitError(f"{out} is a file; --force replaces only an earlier export folder; choose another --out")
        if any(out.iterdir()) and not _is_export(out):
            kind = "a checkpoint" if (out / ck.MANIFEST).exists() else "not an earlier kit export"
            raise KitError(f"{out} is {kind}: --force replaces only an earlier export (a folder whose "
                           f"{ck.MANIFEST} says hf-export) or an empty folder; choose another --out; nothing "
                           "was changed")
    try:
        local_folder(out, "cannot write the export")
        probe(str(out.parent))
    except UploadError as e:
        raise KitError(f"--out {out}: {e}") from None


def _is_export(path: Path) -> bool:
    try:
        raw = json.loads((path / ck.MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("kind") == "hf-export"


def _write_error(e: OSError, out: Path) -> KitError | OSError:
    """The operator's version of an OSError met while writing the export (anything else stays a bug)."""
    import errno

    where = f"{out.parent} ({e.strerror})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return KitError(f"the filesystem of {where} is full; free space or choose another --out "
                        f"(the export needs about the model's size in the chosen dtype); nothing was written to {out}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return KitError(f"cannot write to {where}; choose another --out; nothing was written to {out}")
    return e


# ---------------------------------------------------------------------------------------------- CLI


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except KitError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--shard-size ")) from None


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    from kit.tools.cli import NONNEGATIVE, seconds

    p.add_argument("run", help="run directory (or run name under --runs-dir)")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: ./runs)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=NONNEGATIVE, default=None, help="the checkpoint's step")
    which.add_argument("--latest", action="store_true", help="the newest complete checkpoint (the default)")
    p.add_argument("--out", default="", help="output folder or fsspec URL (default: <run>/exports/<tag>-<dtype>)")
    p.add_argument("--dtype", default="", choices=("", *DTYPES), help="weights dtype (default: the run's precision)")
    p.add_argument("--shard-size", type=_size_arg, default=2 * 10**9, help="largest safetensors shard (default 2GB)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check of the export against the checkpoint (weights and first blocks' logits)")
    p.add_argument("--atol", type=seconds(0.0), default=0.0,
                   help="largest accepted |logit difference| (default 0: exact)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--full-check", action="store_true",
                   help="check every byte of the source checkpoint against its manifest (default: the bytes "
                        "the conversion reads, against torch.save's CRC-32s, as it reads them)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace, verb: str) -> int:
    from kit.tools.upload import is_url, probe, redact, upload_folder

    rd = resolve_run(args.run, args.runs_dir)
    url = args.out if is_url(args.out) else ""
    if url:
        probe(url)  # before hours of conversion: a destination that cannot work fails now
    elif args.out:
        check_destination(Path(args.out), args.force)
    ckpt = pick_checkpoint(rd, args.step, check=False)  # convert() checks the source while it converts
    dtype = args.dtype or rd.load_config().deepspeed.precision
    out = Path(args.out) if args.out and not url else rd.exports / f"{ckpt.tag}-{dtype}"
    with LedgerWriter(rd.path, f"convert-{hostname()}-{os.getpid()}") as led:
        with Bars(enabled=not args.json) as bars:
            exp = convert(rd, ckpt, out, dtype, args.shard_size, verify=not args.no_verify,
                          atol=args.atol, force=args.force or bool(url), ledger=led, check_source=True, bars=bars,
                          full_check=args.full_check)
        result: dict[str, Any] = {"tag": exp.tag, "step": exp.step, "out": str(exp.out), "dtype": exp.dtype,
                                  "shards": exp.shards, "bytes": exp.bytes, "seconds": exp.seconds,
                                  "verify": exp.verify}
        if url:
            with ck.busy(rd.checkpoints, ckpt.tag, "convert"):
                up = upload_folder(out, url, progress=not args.json)
            led.emit("ckpt_uploaded", tag=ckpt.tag, url=redact(url), what="export", sent=up.sent, skipped=up.skipped,
                     bytes=up.bytes_sent)
            result["url"] = redact(url)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        v = exp.verify
        check = ("not verified" if v.get("skipped") else
                 f"logits {'bit-identical' if v['bit_identical'] else 'max |diff| ' + format(v['max_abs_diff'], '.3g')}"
                 f" (tolerance {v['atol']}, reference: {v['reference']})")
        print(f"{exp.tag} -> {result.get('url', exp.out)}: {exp.shards} shard(s), {exp.bytes / 1e6:.1f} MB "
              f"{exp.dtype} in {exp.seconds:.1f} s; {check}")
    return 0

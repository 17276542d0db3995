"""The source check of ``kit convert``: exactly the bytes the conversion reads, against torch.save's CRC-32.

Why: checking every byte of the source checkpoint against its manifest (tools.convert.verify_source) was
most of ``kit convert``'s time (bench/convert.py): the source is about 4x the fp32 export, because the
optimizer files also hold the Adam moments, which an export never reads. torch.save writes every
storage as one uncompressed record of a zip file, and (torch.serialization.get_crc32_options(), on by
default) the CRC-32 of every record in the zip's central directory. So the conversion can check just
what it uses, as it uses it:

- the records it reads weights from (the fp32 partitions, located by
  tools.zero_reader.ZeroCheckpoint.file_extents): the CRC-32 of each range the writer copies unchanged
  (fp32) is taken from the export's copy of it, as the export is read back for its CRC-32s
  (:meth:`SourceCheck.known`); a range it casts (bf16) is read back from the page cache (it was just
  read from there) and its CRC-32 taken on a worker thread (:meth:`SourceCheck.sent`); at the end the
  pieces are put together in the record's order
  (:func:`crc32_combine`), with the bytes the conversion skipped (alignment padding) read to fill the
  gaps, and compared with the record's CRC-32;
- every other record of the files it unpickles (the pickles, format and byte-order records), at once;
- every file's size against the manifest (tools.convert does that before).

A changed byte where the conversion does not look (an Adam moment, a rank's RNG state) does not change
the export and is not refused: ``kit convert --full-check`` (and ``kit verify``) still check every byte.
Where this cannot be done for a file (a zip without CRCs, written with crc32 off; a compressed record;
a partition that is not inside one record; a zip directory that cannot be read; the converter reading
through memory maps because the records could not be located) that whole file is checked against the
manifest instead, as before (:attr:`SourceCheck.whole`).
"""

from __future__ import annotations

import os
import struct
import threading
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kit import checkpoint as ck
from kit.crc import crc32, crc32_combine

READ = 1 << 20  # bytes read back at a time
AHEAD = 256 << 20  # the most bytes sent but not yet checked: the writer waits beyond (stays in the page cache)
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header: its name and extra lengths are last


# ------------------------------------------------------------------------------------------ the full check


def verify_source(ckpt: ck.Checkpoint, threads: int = 0, only: list[Path] | None = None) -> list[str]:
    """Every byte of the checkpoint against its manifest: sizes, then each file's CRC-32 (sha256 for a
    checkpoint saved before manifests had one), on several threads (zlib and hashlib release the GIL).
    ``only``: hash just these files (those tools.source_check cannot check record by record).

    This is ``kit convert --full-check``; the default checks only the records the conversion reads
    (tools.source_check), as it reads them. Why CRC-32 here: the source is several times the export's
    size (the Adam moments), and its sha256 was most of ``kit convert``'s time (bench/convert.py). A
    CRC-32 still catches any changed byte; ``kit verify`` and resume keep checking sha256."""
    problems = ck.verify(ckpt, hashes=False)
    if problems:
        return problems
    files = sorted(ckpt.manifest.files.items(), key=lambda item: -item[1].size)  # big ones first
    if only is not None:
        names = {str(p.relative_to(ckpt.path)) for p in only}
        files = [item for item in files if item[0] in names]
    crc = all(info.crc32 for _, info in files)
    key, digest = ("crc32", ck.crc32) if crc else ("sha256", ck.sha256)
    with ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: digest(ckpt.path / item[0]), files))
    return [f"{rel}: {key} mismatch" for (rel, info), d in zip(files, digests, strict=True)
            if d != (info.crc32 if crc else info.sha256)]


# ------------------------------------------------------------------------------------------ zip records


@dataclass(frozen=True, slots=True)
class Record:
    """One zip record (member) of a torch.save file: where its bytes lie and their CRC-32."""

    name: str
    start: int  # byte offset of its data in the file
    size: int
    crc: int
    stored: bool  # uncompressed (torch.save writes every record so)


def records(path: Path) -> list[Record]:
    """The records of a zip file, with their data offsets (zipfile reads the central directory; each
    data offset is after its local header, whose name and extra field lengths say how long it is).
    Raises zipfile.BadZipFile or OSError where the file is not a readable zip."""
    out: list[Record] = []
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            head = os.pread(f.fileno(), LOCAL_HEADER.size, info.header_offset)
            if len(head) != LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"no local header for {info.filename}")
            *_, name_len, extra_len = LOCAL_HEADER.unpack(head)
            start = info.header_offset + LOCAL_HEADER.size + name_len + extra_len
            out.append(Record(info.filename, start, info.file_size, info.CRC,
                              info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size))
    return out


def crc_of_range(fd: int, start: int, size: int, buf: memoryview) -> int:
    """CRC-32 of ``size`` bytes of an open file from ``start`` (kit.crc releases the GIL)."""
    crc, pos, end = 0, start, start + size
    while pos < end:
        got = os.preadv(fd, [buf[:min(len(buf), end - pos)]], pos)
        if got <= 0:
            raise EOFError(f"the file ends at {pos}, before {end}")
        crc = crc32(buf[:got], crc)
        pos += got
    return crc


# ------------------------------------------------------------------------------------------ the check


@dataclass(slots=True)
class _Member:
    """A record the conversion reads, and the CRC-32s of the runs of it seen so far (one worker thread
    updates them)."""

    record: Record
    runs: dict[int, list[int]] = field(default_factory=dict)  # start -> [end, crc]: contiguous pieces
    ends: dict[int, int] = field(default_factory=dict)  # end -> start of the run ending there
    derived: bool = False  # some pieces' CRC-32s were taken from the export's copy of them (SourceCheck.known)


def _partition_records(path: Path, groups: list[tuple[int, int]]) -> list[_Member] | None:
    """The records of a file that hold ``groups`` (its fp32 partitions: byte offset, numel); None where
    this file must be checked whole (no CRC-32s, a compressed record, a partition outside one record,
    no readable zip directory)."""
    try:
        recs = records(path)
    except (OSError, zipfile.BadZipFile, struct.error):
        return None
    members: list[_Member] = []
    for off, numel in groups:
        rec = next((r for r in recs if r.start <= off and off + 4 * numel <= r.start + r.size), None)
        if rec is None or not rec.stored or rec.crc == 0:  # crc 0: written with torch's crc32 off
            return None
        if all(m.record != rec for m in members):
            members.append(_Member(rec))
    return members


def check_pickles(paths: list[Path]) -> tuple[list[str], list[Path]]:
    """Before anything is unpickled: every record of these torch.save files but the tensors' (the
    pickle, format, version and byte-order records; small) against its CRC-32. Returns the problems
    and the files that cannot be checked so (not a zip with CRC-32s: to check whole)."""
    problems: list[str] = []
    whole: list[Path] = []
    buf = memoryview(bytearray(READ))
    for path in paths:
        try:
            recs = [r for r in records(path) if r.name.split("/")[-2:-1] != ["data"]]
        except (OSError, zipfile.BadZipFile, struct.error):
            whole.append(path)
            continue
        if any(not r.stored or r.crc == 0 for r in recs):
            whole.append(path)
            continue
        with open(path, "rb", buffering=0) as f:
            for r in recs:
                try:
                    bad = crc_of_range(f.fileno(), r.start, r.size, buf) != r.crc
                except EOFError:
                    bad = True
                if bad:
                    problems.append(f"{path.name}: record {r.name}: crc32 mismatch")
                    break
    return problems, whole


class SourceCheck:
    """Checks, while the conversion runs, every zip record it reads of ``files`` (the optimizer files,
    by index as the writer addresses them) against the CRC-32s torch.save wrote. ``extents``: per file,
    per group, (byte offset, numel) of the fp32 partitions the writer copies (None: it reads through
    memory maps instead: every file is then to be checked whole).

    Use: :meth:`sent` after each range the writer read (on the writer's thread; the CRC is taken on a
    worker thread while the writer goes on), then :meth:`finish` for the problems (empty: fine).
    :attr:`whole` lists the files this cannot check record by record: the caller checks those whole,
    against the manifest, as before."""

    def __init__(self, files: list[Path], extents: list[list[tuple[int, int]]] | None) -> None:
        self.files = files
        self.whole: list[Path] = []
        self.problems: list[str] = []
        self._members: dict[int, list[_Member]] = {}
        self._fds: dict[int, int] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="source-crc")
        self._pending: list[Future[None]] = []
        self._ahead = 0  # bytes sent, not yet checked
        self._cond = threading.Condition()
        self._buf = memoryview(bytearray(READ))
        try:
            for i, f in enumerate(files):
                members = _partition_records(f, extents[i]) if extents is not None else None
                if members is None:
                    self.whole.append(f)
                else:
                    self._members[i] = members
                    self._fds[i] = os.open(f, os.O_RDONLY)
        except BaseException:
            self.close()
            raise

    def sent(self, file: int, offset: int, nbytes: int) -> None:
        """The writer read ``nbytes`` of file ``file`` at ``offset``: take their CRC-32 (worker thread;
        the writer waits only when the worker is AHEAD bytes behind, so they are still in the page cache)."""
        if file not in self._members or nbytes <= 0:
            return
        with self._cond:
            while self._ahead > AHEAD:
                self._cond.wait()
            self._ahead += nbytes
        self._pending.append(self._pool.submit(self._crc_piece, file, offset, nbytes))

    def known(self, file: int, offset: int, nbytes: int, crc: int) -> None:
        """The CRC-32 of ``nbytes`` of file ``file`` at ``offset``, taken elsewhere: from the export's
        bytes as they were read back for its CRC-32s (tools.convert; fp32 pieces are copied unchanged).
        Nothing is read here. A record put together from such pieces that does not match is read again
        from the checkpoint itself in :meth:`finish`, to tell a damaged source from a bad copy."""
        if file in self._members and nbytes > 0:
            self._pending.append(self._pool.submit(self._add_piece, file, offset, nbytes, crc, True))

    def _crc_piece(self, file: int, offset: int, nbytes: int) -> None:
        try:
            self._add_piece(file, offset, nbytes, None, False)
        finally:
            with self._cond:
                self._ahead -= nbytes
                self._cond.notify()

    def _add_piece(self, file: int, offset: int, nbytes: int, crc: int | None, derived: bool) -> None:
        member = next((m for m in self._members[file] if m.record.start <= offset
                       and offset + nbytes <= m.record.start + m.record.size), None)
        if member is None:  # the writer read outside the records it was to read: check the whole file
            self.problems.append(f"{self.files[file].name}: bytes {offset}-{offset + nbytes} are outside "
                                 "the fp32 partitions' records; this checkpoint's layout is not understood")
            return
        if crc is None:
            crc = crc_of_range(self._fds[file], offset, nbytes, self._buf)
        member.derived |= derived
        start = member.ends.pop(offset, None)
        if start is not None:  # continues a run: extend it
            run = member.runs[start]
            run[0], run[1] = offset + nbytes, crc32_combine(run[1], crc, nbytes)
        else:
            start = offset
            member.runs[start] = [offset + nbytes, crc]
        member.ends[offset + nbytes] = start

    def finish(self) -> list[str]:
        """Wait for the worker, fill every record's unread gaps, compare each with its CRC-32."""
        try:
            for fut in self._pending:
                fut.result()
            for i, members in self._members.items():
                for m in members:
                    if self._crc_of(m, self._fds[i]) == m.record.crc:
                        continue
                    rec = m.record
                    if m.derived and crc_of_range(self._fds[i], rec.start, rec.size, self._buf) == rec.crc:
                        self.problems.append(f"the export's copy of {self.files[i].name}: record {rec.name} "
                                             "differs from the checkpoint's bytes, which are intact: the copy "
                                             "went wrong (failing memory or disk on this node?); run again")
                    else:
                        self.problems.append(f"{self.files[i].name}: record {rec.name} (fp32 weights the "
                                             "export is made of): crc32 mismatch")
        except EOFError as e:
            self.problems.append(f"a ZeRO optimizer file is shorter than its zip directory says ({e})")
        finally:
            self.close()
        return self.problems

    def _crc_of(self, member: _Member, fd: int) -> int:
        """The record's CRC-32 from the runs seen, in order, reading only the bytes between them."""
        rec = member.record
        crc, pos = 0, rec.start
        for start, (stop, piece) in sorted(member.runs.items()):
            if start < pos:  # overlapping pieces (the readers here never read a byte twice): read it all
                return crc_of_range(fd, rec.start, rec.size, self._buf)
            if start > pos:
                crc = crc32_combine(crc, crc_of_range(fd, pos, start - pos, self._buf), start - pos)
            crc, pos = crc32_combine(crc, piece, stop - start), stop
        if pos < rec.start + rec.size:
            crc = crc32_combine(crc, crc_of_range(fd, pos, rec.start + rec.size - pos, self._buf),
                                rec.start + rec.size - pos)
        return crc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

"""Checkpoints: DeepSpeed's engine checkpoint plus what it does not save, made atomic by a manifest.

Layout under ``<run>/checkpoints`` (docs/run-directory.md)::

    step_0000040/                    one folder per step (the DeepSpeed tag)
      mp_rank_00_model_states.pt     DeepSpeed's files (model, ZeRO optimizer partitions, scheduler)
      zero_pp_rank_*_optim_states.pt
      kit_rank_00000.pt              per-rank RNG state (torch, numpy, python): DeepSpeed saves none
      .written_r00000.json           an asynchronous save's per-rank record (kit.asyncsave): this rank's
                                     files are durable, with their sizes and digests; removed after commit
      MANIFEST.json                  written LAST: every file's size, sha256 and CRC-32, step, consumed samples,
                                     world size, model shape. No manifest = not a checkpoint.
    latest                           the newest complete tag (DeepSpeed's own format), moved after the
                                     manifest, so DeepSpeed tools and zero_to_fp32 find it too
    .pins/<tag>                      pinned against retention (spike policy), with the reason
    .busy/<tag>.<who>.<host>.<pid>   in use (upload in progress): never deleted while its process lives
    .holds/<who>.json                a live consumer's lease on the checkpoints after a step (kit stream:
                                     not shipped yet); retention keeps a bounded number of them

A save killed at any point leaves a folder without a manifest; resume ignores it and says so.

The manifest is a typed record (:class:`Manifest`, with :class:`KitState` for what kit adds), written
and read here only; its JSON form is unchanged since MANIFEST_VERSION 1, so old checkpoints resume.
Checkpoint folders are deleted in one place, :func:`delete` (manifest first, then the files), which
never deletes the newest complete checkpoint: retention, ``kit stream``, the rollback and a killed
save's leftovers all go through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kit.crc import crc32 as crc32_raw
from kit.errors import CheckpointError
from kit.fsio import atomic_write, atomic_write_json, fsync_path
from kit.parallel.layout import Layout

MANIFEST = "MANIFEST.json"
LATEST = "latest"
PINS = ".pins"
BUSY = ".busy"
HOLDS = ".holds"
RANK_STATE = "kit_rank_{rank:05d}.pt"
WRITTEN = ".written_r{rank:05d}.json"  # kit.asyncsave's per-rank record; never part of the manifest
WRITTEN_PREFIX = ".written_r"
MANIFEST_VERSION = 1


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(tag: str) -> int | None:
    if tag.startswith("step_") and tag[5:].isdigit():
        return int(tag[5:])
    return None


# ------------------------------------------------------------------------------------- the manifest


class ManifestError(CheckpointError):
    """A MANIFEST.json that is not JSON, or not of the expected shape."""


def _field(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    value = d.get(key, default)
    if value is default:
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(f"{where}: {key} is {type(value).__name__} {value!r}, not the expected "
                            f"{getattr(kind, '__name__', kind)}; the manifest is damaged: delete the folder or "
                            "restore it")
    return value


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a checkpoint or export folder: its size and digests, as written. A checkpoint lists
    sha256 and CRC-32 (older ones sha256 only); an export lists CRC-32 (older ones sha256:
    tools.convert._ShardFile.digest says why)."""

    size: int
    sha256: str  # "" where the manifest lists none (an export)
    crc32: str = ""  # zlib CRC-32, 8 hex digits (kit convert's fast check); "" in older manifests

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: a file entry is {type(d).__name__}, not a table; the manifest is damaged")
        return cls(_field(d, "size", int, where, 0), _field(d, "sha256", str, where, ""),
                   _field(d, "crc32", str, where, ""))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "sha256": self.sha256}
        if self.crc32:
            out["crc32"] = self.crc32
        return out

    def matches(self, sha256: str, crc32: str) -> bool:
        """Whether a file with these digests (:func:`digests`) is the one listed: every digest the entry
        has must match; an entry with none matches nothing (its manifest is damaged)."""
        return bool(self.sha256 or self.crc32) and self.sha256 in ("", sha256) and self.crc32 in ("", crc32)


def read_files(d: dict[str, Any], where: str) -> dict[str, FileEntry]:
    """The ``files`` table of a kit manifest (checkpoint, export) as typed entries."""
    files = d.get("files", {})
    if not isinstance(files, dict):
        raise ManifestError(f"{where}: files is {type(files).__name__}, not a table; the manifest is damaged")
    return {str(rel): FileEntry.from_dict(info, f"{where} ({rel})") for rel, info in files.items()}


# KitState's fields as they appear in MANIFEST.json's "kit" table, with their JSON types
_KIT_TYPES: dict[str, type] = {
    "step": int, "consumed": int, "world_size": int, "model": dict, "vocab_size": int, "zero_stage": int,
    "precision": str, "config_digest": str, "seg": str, "reason": str, "universal": bool, "reshaped_from": dict,
    "layout": dict}


@dataclass(frozen=True, slots=True)
class KitState:
    """What kit adds to DeepSpeed's checkpoint: where the data stream is, who wrote it and with what
    arithmetic, and (``extra``) the spike policy's state and any key a newer kit added (kept as is)."""

    step: int
    consumed: int | None = None  # samples consumed; None only in manifests not written by a trainer
    world_size: int | None = None  # data-parallel ranks that wrote the ZeRO partitions
    model: dict[str, int] = field(default_factory=dict)  # hidden_size, n_layer, n_head, seq_length
    vocab_size: int | None = None
    zero_stage: int | None = None
    precision: str = ""
    config_digest: str = ""
    seg: str = ""
    reason: str = ""  # why it was saved: interval, segment_limit, signal, stop, rollback...
    universal: bool = False  # kit reshape: a DeepSpeed universal checkpoint, loaded with load_universal
    reshaped_from: dict[str, Any] | None = None
    layout: dict[str, int] | None = None  # tensor, pipeline, data (kit.parallel.layout); None: data parallel only
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str, step: int = 0) -> KitState:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: kit is {type(d).__name__}, not a table; the manifest is damaged")
        known = {k: _field(d, k, t, where) for k, t in _KIT_TYPES.items() if d.get(k) is not None}
        known.setdefault("step", step)
        return cls(**known, extra={k: v for k, v in d.items() if k not in _KIT_TYPES})

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (MANIFEST_VERSION 1): the fields flat, beside the extra keys; ``universal`` and
        ``reshaped_from`` only on reshaped checkpoints, as before."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _KIT_TYPES if k not in ("universal", "reshaped_from")}
        if self.universal:
            out["universal"] = True
        if self.reshaped_from is not None:
            out["reshaped_from"] = self.reshaped_from
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    def replace(self, **changes: Any) -> KitState:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class Manifest:
    """MANIFEST.json of a checkpoint: its commit point (written last) and its contract with readers."""

    tag: str
    step: int
    files: dict[str, FileEntry]
    kit: KitState
    created: float = 0.0
    version: int = MANIFEST_VERSION

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "tag": self.tag, "step": self.step, "created": self.created,
                "files": {rel: f.to_dict() for rel, f in self.files.items()},
                "kit": self.kit.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str, tag: str = "") -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{where} is not a JSON object; the manifest is damaged: delete the folder or "
                                "restore it")
        step = _field(d, "step", int, where)
        if step is None:
            raise ManifestError(f"{where} has no step; the manifest is damaged: delete the folder or restore it")
        created = _field(d, "created", (int, float), where, 0.0)
        return cls(tag=_field(d, "tag", str, where, tag) or tag, step=step, files=read_files(d, where),
                   kit=KitState.from_dict(d.get("kit", {}), where, step), created=float(created),
                   version=_field(d, "version", int, where, MANIFEST_VERSION))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    step: int
    tag: str
    path: Path
    manifest: Manifest

    @property
    def consumed(self) -> int:
        consumed = self.manifest.kit.consumed
        if consumed is None:
            raise CheckpointError(f"{self.path / MANIFEST} does not say how many samples were consumed; it was not "
                                  "written by kit's trainer and cannot be resumed from")
        return consumed

    @property
    def bytes(self) -> int:
        return self.manifest.bytes


# ------------------------------------------------------------------------------------------- writing


def rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_tag_dir(root: Path, tag: str) -> Path:
    """Before a save: a same-named folder without a manifest is a killed earlier save; remove it."""
    path = root / tag
    if (path / MANIFEST).exists():
        raise CheckpointError(f"{path} is already a complete checkpoint; refusing to overwrite it")
    if path.exists():
        delete(root, tag)
    return path


def save_rank_state(path: Path, rank: int, state: dict[str, Any] | None = None) -> Path:
    """Write this rank's RNG state (``state``: one taken earlier, by an asynchronous save)."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (RANK_STATE.format(rank=rank) + ".tmp")
    torch.save(rng_state() if state is None else state, tmp)
    os.replace(tmp, path / RANK_STATE.format(rank=rank))
    return path / RANK_STATE.format(rank=rank)


def load_rank_state(path: Path, rank: int) -> None:
    import torch

    f = path / RANK_STATE.format(rank=rank)
    if not f.exists():
        raise CheckpointError(f"{f} is missing: this checkpoint was written by fewer ranks; "
                              "resume with the world size it was saved with, or `kit reshape` it")
    set_rng_state(torch.load(f, weights_only=False))


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


HASH_CHUNK = 8 << 20


def digests(path: Path) -> tuple[str, str]:
    """A file's sha256 and CRC-32, in one read. sha256 is what ``kit verify``, resume and uploads check;
    the CRC-32 (kit.crc: ISA-L's, ~14x faster here) lets ``kit convert`` check every byte of a checkpoint several
    times the export's size without its time being mostly sha256 (bench/convert.py). CRC-32 catches
    any change of up to 32 consecutive bits and a random corruption but for 1 in 2^32: an integrity
    check, not a defence against a forger (sha256 stays that)."""
    h, crc = hashlib.sha256(), 0
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            crc = crc32_raw(view[:n], crc)
    return h.hexdigest(), f"{crc:08x}"


def crc32(path: Path) -> str:
    """A file's CRC-32 as :func:`digests` writes it in manifests (kit.crc releases the GIL: threads help)."""
    crc = 0
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = crc32_raw(view[:n], crc)
    return f"{crc:08x}"


def write_manifest(path: Path, step: int, kit_state: KitState | dict[str, Any], threads: int = 4,
                   known: dict[str, dict[str, Any]] | None = None) -> Manifest:
    """Hash every file of the tag folder and write MANIFEST.json atomically (the commit point).

    ``known``: sizes and digests (sha256, crc32) of files already hashed by the ranks that wrote them
    (an asynchronous save's records, kit.asyncsave); only the others are hashed here."""
    known = known or {}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
                   and not p.name.startswith((WRITTEN_PREFIX, f".{MANIFEST}.tmp")))
    rels = [str(p.relative_to(path)) for p in files]
    todo = [p for p, rel in zip(files, rels, strict=True) if rel not in known]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        hashed = dict(zip(todo, pool.map(digests, todo), strict=True))
    entries: dict[str, FileEntry] = {}
    for p, rel in zip(files, rels, strict=True):
        d, c = (known[rel]["sha256"], known[rel]["crc32"]) if rel in known else hashed[p]
        entries[rel] = FileEntry(p.stat().st_size, d, c)
    wrong = [f"{rel}: missing" if rel not in entries else f"{rel}: size {entries[rel].size} != {info['size']}"
             for rel, info in known.items() if rel not in entries or entries[rel].size != info["size"]]
    if wrong:
        raise CheckpointError(f"{path}: files changed after their rank wrote them ({'; '.join(wrong[:3])}); "
                              "is another process writing this checkpoint folder?")
    kit = kit_state if isinstance(kit_state, KitState) else KitState.from_dict({"step": step, **kit_state},
                                                                                   f"{path / MANIFEST}", step)
    manifest = Manifest(tag=path.name, step=step, created=time.time(), kit=kit, files=entries)
    atomic_write_json(path / MANIFEST, manifest.to_dict(), fsync=True)
    return manifest


def set_latest(root: Path, tag: str) -> None:
    atomic_write(root / LATEST, tag, fsync=True)


# ------------------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    """MANIFEST.json of a folder as JSON; None when there is none (no folder, or not a folder)."""
    try:
        return json.loads((path / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path / MANIFEST} is unreadable ({e}); delete the folder or restore it") from None


def read_manifest(path: Path) -> Manifest | None:
    """A checkpoint folder's manifest; None when it has none (an incomplete save, or no folder)."""
    raw = _read_json(path)
    return None if raw is None else Manifest.from_dict(raw, str(path / MANIFEST), path.name)


def read_file_list(path: Path) -> dict[str, FileEntry] | None:
    """The files any kit folder's MANIFEST.json lists (a checkpoint's or an export's); None: no manifest."""
    raw = _read_json(path)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path / MANIFEST} is not a JSON object; delete the folder or restore it")
    return read_files(raw, str(path / MANIFEST))


def verify(ckpt: Checkpoint, hashes: bool = True) -> list[str]:
    """Problems with a checkpoint against its manifest (empty = fine)."""
    problems = []
    for rel, info in ckpt.manifest.files.items():
        p = ckpt.path / rel
        if not p.exists():
            problems.append(f"{rel}: missing")
        elif p.stat().st_size != info.size:
            problems.append(f"{rel}: size {p.stat().st_size} != {info.size}")
        elif hashes and sha256(p) != info.sha256:
            problems.append(f"{rel}: sha256 mismatch")
    return problems


def scan(root: Path) -> tuple[list[Checkpoint], list[Path]]:
    """Complete checkpoints (oldest first) and incomplete step folders under ``root``."""
    complete: list[Checkpoint] = []
    incomplete: list[Path] = []
    if not root.is_dir():
        return complete, incomplete
    for p in sorted(root.iterdir()):
        step = step_of(p.name)
        if step is None or not p.is_dir():
            continue
        m = read_manifest(p)
        if m is None:
            incomplete.append(p)
        else:
            complete.append(Checkpoint(step, p.name, p, m))
    complete.sort(key=lambda c: c.step)
    return complete, incomplete


def find_resume(
    root: Path, hashes: bool = False, before_step: int | None = None
) -> tuple[Checkpoint | None, list[str]]:
    """The newest complete, intact checkpoint (optionally at or before a step) and notes on what was
    passed over and why, so the trainer can say which it resumed from."""
    complete, incomplete = scan(root)
    notes = [f"{p.name}: incomplete (no {MANIFEST}), ignored" for p in incomplete]
    for ckpt in reversed(complete):
        if before_step is not None and ckpt.step > before_step:
            continue
        problems = verify(ckpt, hashes=hashes)
        if problems:
            notes.append(f"{ckpt.tag}: corrupt ({'; '.join(problems[:3])}), skipped")
            continue
        return ckpt, notes
    return None, notes


def load(root: Path, tag: str) -> Checkpoint:
    path = root / tag
    m = read_manifest(path)
    if m is None:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); choose another step")
    step = step_of(tag)
    return Checkpoint(step if step is not None else m.step, tag, path, m)


def layout_of(ckpt: Checkpoint) -> Layout:
    """The layout a checkpoint was written at (``kit.layout``; before layouts: data parallel only)."""
    kit = ckpt.manifest.kit
    return Layout.from_dict(kit.layout, kit.world_size or 1)


def check_compatible(ckpt: Checkpoint, layout: Layout | int, model: dict[str, Any], vocab_size: int) -> None:
    """Refuse to resume ``ckpt`` at another layout (an int: that many data-parallel ranks) or of
    another model, saying what to do instead."""
    kit = ckpt.manifest.kit
    want = layout if isinstance(layout, Layout) else Layout(1, 1, layout)
    have = layout_of(ckpt)
    if have != want:
        raise CheckpointError(
            f"checkpoint {ckpt.tag} was written at layout {have} ({have.world} ranks: parallel.tensor = "
            f"{have.tensor}, parallel.pipeline = {have.pipeline}), this segment runs {want} ({want.world} ranks); "
            f"resume at {have}, or move the checkpoint to the new layout with `kit reshape RUN --tensor "
            f"{want.tensor} --pipeline {want.pipeline} --world-size {want.world}`")
    theirs = kit.model
    keys = ("hidden_size", "n_layer", "n_head")
    diff = [f"model.{k} {theirs.get(k)} != {model[k]}" for k in keys if theirs.get(k) != model[k]]
    if kit.vocab_size != vocab_size:
        diff.append(f"vocab {kit.vocab_size} != {vocab_size}")
    if diff:
        raise CheckpointError(f"checkpoint {ckpt.tag} is of a different model ({', '.join(diff)}); "
                              "resume with the recipe it was trained with")


# ------------------------------------------------------------------------------------ pins and busy


def pin(root: Path, tag: str, reason: str) -> None:
    (root / PINS).mkdir(parents=True, exist_ok=True)
    (root / PINS / tag).write_text(reason)


def unpin(root: Path, tag: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / PINS / tag).unlink()


def pinned(root: Path) -> set[str]:
    d = root / PINS
    return {p.name for p in d.iterdir()} if d.is_dir() else set()


@contextlib.contextmanager
def busy(root: Path, tag: str, who: str) -> Iterator[None]:
    """Mark a checkpoint in use (an upload): retention will not delete it meanwhile.

    The marker ``.busy/<tag>.<who>.<host>.<pid>`` names its process, so a marker left by a process
    that was SIGKILLed is recognised as stale (on the host that made it) instead of protecting the
    checkpoint forever."""
    d = root / BUSY
    d.mkdir(parents=True, exist_ok=True)
    marker = d / f"{tag}.{who}.{_host()}.{os.getpid()}"
    marker.write_text(who)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()


def _host() -> str:
    import socket

    return socket.gethostname().split(".")[0].replace(".", "-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_busy(root: Path) -> list[str]:
    """Remove busy markers of processes of this host that no longer exist; returns their names.

    Markers from other hosts are kept: their processes cannot be checked from here."""
    d = root / BUSY
    removed = []
    for marker in d.iterdir() if d.is_dir() else []:
        parts = marker.name.split(".")
        if len(parts) >= 4 and parts[-2] == _host() and parts[-1].isdigit() and not _pid_alive(int(parts[-1])):
            marker.unlink(missing_ok=True)
            removed.append(marker.name)
    return removed


def busy_tags(root: Path) -> set[str]:
    clear_stale_busy(root)
    d = root / BUSY
    return {p.name.split(".", 1)[0] for p in d.iterdir()} if d.is_dir() else set()


def hold(root: Path, who: str, after_step: int, lease_s: float, prefer_every: int = 0) -> None:
    """Ask retention to keep the checkpoints after ``after_step`` (those a consumer has not taken yet,
    including the ones still to be saved) for ``lease_s`` seconds from now; when only a few can be
    kept, multiples of ``prefer_every`` first, then the oldest.

    A lease, not a marker: the holder (kit stream, on a login node) and the deleter (the trainer, on a
    compute node) cannot see each other's processes, so a holder that dies stops protecting anything
    once its lease runs out. The holder renews it while it lives."""
    d = root / HOLDS
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / f"{who}.json", {"who": who, "until": time.time() + lease_s, "after_step": after_step,
                                          "prefer_every": prefer_every})


def release(root: Path, who: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / HOLDS / f"{who}.json").unlink()


def held(root: Path, complete: list[Checkpoint], now: float | None = None) -> list[str]:
    """The tags among ``complete`` that live holds ask for, most wanted first (an expired or
    unreadable hold asks for nothing)."""
    now = time.time() if now is None else now
    out: list[str] = []
    d = root / HOLDS
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            h = json.loads(p.read_text())
            if float(h["until"]) <= now:
                continue
            after, every = int(h["after_step"]), int(h.get("prefer_every") or 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a hold being replaced, or garbage: it protects nothing
        wanted = sorted((c for c in complete if c.step > after), key=lambda c: (not (every and c.step % every == 0),
                                                                                  c.step))
        out += [c.tag for c in wanted if c.tag not in out]
    return out


# ------------------------------------------------------------------------------------------ deleting


class ProtectedCheckpoint(CheckpointError):
    """Refused: the folder is the newest complete checkpoint, the one a restart resumes from."""


def newest_complete(root: Path) -> str | None:
    """The tag of the newest step folder that has its manifest (the commit point), from a listing and
    one stat per folder, newest first: cheap enough to ask before every delete."""
    try:
        names = sorted((n for n in os.listdir(root) if step_of(n) is not None), key=lambda n: step_of(n) or 0,
                       reverse=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    for name in names:
        if (root / name / MANIFEST).is_file():
            return name
    return None


def newest_complete_step(root: Path) -> int | None:
    tag = newest_complete(root)
    return None if tag is None else step_of(tag)


def delete(root: Path, name: str) -> None:
    """Delete the checkpoint folder ``root/name``: the one way kit deletes checkpoints (retention,
    ``kit stream``, the rollback, a killed save's leftovers).

    Never the newest complete checkpoint, whoever asks (raises :class:`ProtectedCheckpoint`): whatever
    goes wrong in a policy, a restart always finds something to resume from. The manifest goes first,
    made durable, so a folder half deleted (a crash, a full metadata server) never looks complete; then
    the files."""
    path = root / name
    if name == newest_complete(root):
        raise ProtectedCheckpoint(f"{path} is the newest complete checkpoint (what a restart resumes from): "
                                  "it is never deleted")
    manifest = path / MANIFEST
    try:
        manifest.unlink()
    except FileNotFoundError:
        pass
    else:
        fsync_path(path)
    shutil.rmtree(path)


# ----------------------------------------------------------------------------------------- retention


def retention_plan(root: Path, keep_last: int, keep_every: int, hold_max: int = 0) -> tuple[list[Path], list[str]]:
    """What to delete: complete checkpoints beyond the newest ``keep_last`` (never the newest one),
    except multiples of ``keep_every``, pinned or busy ones, and the first ``hold_max`` older ones a
    live hold asks for; and incomplete folders older than the newest complete one. Also returns what
    live holds ask for."""
    complete, incomplete = scan(root)
    keep = {c.tag for c in complete[max(0, len(complete) - max(1, keep_last)):]}
    keep |= {c.tag for c in complete if keep_every and c.step % keep_every == 0}
    keep |= pinned(root) | busy_tags(root)
    wanted = held(root, complete)
    keep |= set([t for t in wanted if t not in keep][:hold_max])
    doomed = [c.path for c in complete if c.tag not in keep]
    newest = complete[-1].step if complete else -1
    doomed += [p for p in incomplete if (step_of(p.name) or 0) < newest and p.name not in keep]
    return doomed, wanted


def apply_retention(root: Path, keep_last: int, keep_every: int, on_delete: Any = None,
                    hold_max: int = 0) -> tuple[list[str], list[str]]:
    """Delete what :func:`retention_plan` says; returns the deleted tags, and those of them a live
    hold still wanted (deleted past its bound: the caller says so)."""
    doomed, wanted = retention_plan(root, keep_last, keep_every, hold_max)
    deleted = []
    for path in doomed:
        try:
            delete(root, path.name)
        except (OSError, ProtectedCheckpoint) as e:  # log and carry on: a failed delete must not stop training
            if on_delete:
                on_delete(path.name, f"delete failed: {e}")
            continue
        deleted.append(path.name)
        if on_delete:
            on_delete(path.name, "")
    return deleted, [t for t in deleted if t in wanted]

"""``kit upload SRC URL`` and ``kit verify TARGET``: ship a folder to any fsspec URL, and check it.

The protocol at the destination (docs/export.md):

1. every file except the manifests is sent, several at a time; after a file landed and its size was
   read back, a note ``.kit-upload/<file>.sha256`` records its hash and size;
2. the source's own MANIFEST.json (a checkpoint's or an export's) is sent after all other files, so
   the remote copy never looks like a complete checkpoint early;
3. KIT_UPLOAD.json (every file's size and sha256) is written last: a destination is complete iff it
   is there. The notes are then removed.

Resuming: a file whose remote size and note match the local size and hash is not sent again; a
previous KIT_UPLOAD.json is removed before anything changes. Transient errors are retried with
exponential backoff; a permission error or a full destination fails at once, and in every failure
case no KIT_UPLOAD.json is written.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kit.checkpoint import MANIFEST, digests, read_file_list
from kit.errors import CheckpointError, KitError
from kit.faults import fault_point
from kit.tools.remote import (
    JOURNAL,
    UPLOAD_MANIFEST,
    UploadError,
    is_url,
    open_fs,
    probe,
    read_json,
    redact,
    retrying,
    scrub,
    verify_local,
    verify_url,
)

__all__ = ["UploadResult", "is_url", "probe", "redact", "upload_folder", "verify_url"]


@dataclass(slots=True)
class UploadResult:
    url: str  # redacted
    files: int
    sent: int
    skipped: int
    bytes_total: int
    bytes_sent: int
    seconds: float


def local_inventory(src: Path, jobs: int = 4, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``src``; checked against its MANIFEST.json when it has one
    (by the hashes it lists: a checkpoint's sha256, an export's CRC-32; both come from the one read,
    kit.checkpoint.digests). ``progress``: a bar of the bytes hashed (hashing a large checkpoint takes
    minutes)."""
    if not src.is_dir():
        raise KitError(f"{src} is not a folder; give a checkpoint or export folder to upload")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    from kit.progress import Bars

    with Bars(enabled=progress) as bars, ThreadPoolExecutor(max_workers=jobs) as pool:
        task = bars.task("hashing", sum(p.stat().st_size for p in files), unit="bytes")

        def one(p: Path) -> tuple[str, str]:
            d = digests(p)
            task.advance(p.stat().st_size)
            return d

        hashed = dict(zip((str(p.relative_to(src)) for p in files), pool.map(one, files), strict=True))
    inv = {rel: {"size": (src / rel).stat().st_size, "sha256": sha} for rel, (sha, _) in hashed.items()}
    listed = read_file_list(src)
    if listed is not None:
        bad = [rel for rel, info in listed.items() if rel not in hashed or not info.matches(*hashed[rel])]
        if bad:
            raise CheckpointError(f"{src} does not match its {MANIFEST} ({', '.join(bad[:3])}): it is corrupt; "
                                  "it was not uploaded")
    return inv


class _Progress:
    """rich bars for bytes and files (or nothing, for --json and tests)."""

    def __init__(self, enabled: bool, total_bytes: int, total_files: int) -> None:
        self.bar: Any = None
        self.lock = threading.Lock()
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("{task.description:>5}"), BarColumn(), MofNCompleteColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
            self.bytes = self.bar.add_task("bytes", total=total_bytes)
            self.files = self.bar.add_task("files", total=total_files)
            self.bar.start()

    def advance(self, nbytes: int, files: int = 0) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.advance(self.bytes, nbytes)
                if files:
                    self.bar.advance(self.files, files)

    def skip(self, nbytes: int) -> None:
        """A file already at the destination: out of the bytes to send (counting it as sent would
        make the transfer rate a lie), one more file done."""
        if self.bar is not None:
            with self.lock:
                task = self.bar.tasks[self.bytes]
                self.bar.update(self.bytes, total=max(0, (task.total or 0) - nbytes))
                self.bar.advance(self.files, 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _callback(progress: _Progress) -> Any:
    from fsspec.callbacks import Callback

    class Bytes(Callback):
        """Per-file byte progress from back ends that report it (s3fs does; local copies do not)."""

        def relative_update(self, inc: int = 1) -> None:
            self.value += inc
            progress.advance(inc)

    return Bytes()


def upload_folder(src: Path, url: str, jobs: int = 4, retries: int = 5, backoff_s: float = 1.0,
                  progress: bool = False) -> UploadResult:
    """Upload ``src`` to ``url`` following the protocol above; safe to call again after a failure.

    The destination is probed first (tools.remote.probe): a destination that cannot work fails before
    the source is hashed, with what to fix."""
    src = Path(src)
    t0 = time.perf_counter()
    safe = redact(url)
    if not src.is_dir():
        raise KitError(f"{src} is not a folder; give a checkpoint or export folder to upload")
    probe(url, retries, backoff_s)
    inv = local_inventory(src, jobs, progress)
    fs, root = open_fs(url)
    manifest = {"version": 1, "kind": "kit-upload", "created": time.time(), "source": src.name,
                "files": inv}
    remote_manifest = f"{root}/{UPLOAD_MANIFEST}"
    if not is_url(url) or url.startswith("file://"):
        retrying(lambda: fs.makedirs(root, exist_ok=True), f"creating {safe}", retries, backoff_s)
    fs.invalidate_cache()
    previous = f"{root}/{JOURNAL}/previous.json"
    old = retrying(lambda: read_json(fs, remote_manifest), f"reading {safe}", retries, backoff_s)
    if old is not None:  # about to change a complete destination: it must stop looking complete first,
        # but what it knew (every file's hash) is kept in the journal, so unchanged files are not sent again
        retrying(lambda: _pipe(fs, previous, json.dumps(old).encode()), "keeping the old manifest", retries, backoff_s)
        retrying(lambda: fs.rm_file(remote_manifest), f"removing the old {UPLOAD_MANIFEST}", retries, backoff_s)
    known = (old or retrying(lambda: read_json(fs, previous), f"reading {safe}", retries, backoff_s) or {}).get(
        "files", {})
    sizes = retrying(lambda: _remote_sizes(fs, root), f"listing {safe}", retries, backoff_s)
    order = [r for r in inv if r != MANIFEST] + ([MANIFEST] if MANIFEST in inv else [])
    bar = _Progress(progress, sum(i["size"] for i in inv.values()), len(inv))
    counts = {"sent": 0, "skipped": 0, "bytes": 0, "done": 0}
    lock = threading.Lock()

    def one(rel: str) -> None:
        info = inv[rel]
        target, note = f"{root}/{rel}", f"{root}/{JOURNAL}/{rel}.sha256"
        line = f"{info['sha256']} {info['size']}"
        if sizes.get(rel) == info["size"] and (known.get(rel) == info or retrying(
                lambda: _note(fs, note), f"reading the note of {rel}", retries, backoff_s) == line):
            with lock:
                counts["skipped"] += 1
            bar.skip(info["size"])
            return
        if sizes.get(f"{JOURNAL}/{rel}.sha256") is not None:
            retrying(lambda: fs.rm_file(note), f"clearing the note of {rel}", retries, backoff_s)
        cb = _callback(bar)
        retrying(lambda: _put(fs, src / rel, target, info["size"], cb), f"uploading {rel} to {safe}", retries,
                 backoff_s)
        retrying(lambda: _pipe(fs, note, line.encode()),
                 f"writing the note of {rel}", retries, backoff_s)
        bar.advance(max(0, info["size"] - int(cb.value)), 1)
        with lock:
            counts["sent"] += 1
            counts["bytes"] += info["size"]
            counts["done"] += 1
            done = counts["done"]
        fault_point("upload.file_done", done, 0)

    try:
        body = [r for r in order if r != MANIFEST]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(one, body))
        if MANIFEST in inv:
            one(MANIFEST)
        payload = json.dumps(manifest, indent=1).encode()
        retrying(lambda: fs.pipe_file(remote_manifest, payload), f"writing {UPLOAD_MANIFEST} to {safe}", retries,
                 backoff_s)
    finally:
        bar.close()
    _clear_journal(fs, root)
    return UploadResult(safe, len(inv), counts["sent"], counts["skipped"], sum(i["size"] for i in inv.values()),
                        counts["bytes"], round(time.perf_counter() - t0, 3))


def _mkparent(fs: Any, target: str) -> str:
    parent = target.rsplit("/", 1)[0]
    if "file" in fs.protocol:  # a str or a tuple of names; only local folders must exist first
        fs.makedirs(parent, exist_ok=True)
    return parent


def _pipe(fs: Any, target: str, data: bytes) -> None:
    _mkparent(fs, target)
    fs.pipe_file(target, data)


def _put(fs: Any, local: Path, target: str, size: int, cb: Any) -> None:
    cb.value = 0
    parent = _mkparent(fs, target)
    fs.put_file(str(local), target, callback=cb)
    fs.invalidate_cache(parent)
    got = int(fs.info(target)["size"])
    if got != size:
        raise OSError(f"{target}: {got} bytes arrived, {size} were sent")


def _note(fs: Any, path: str) -> str:
    try:
        return bytes(fs.cat_file(path)).decode().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


def _remote_sizes(fs: Any, root: str) -> dict[str, int]:
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    n = len(root) + 1
    return {path[n:]: int(info.get("size") or 0) for path, info in found.items() if path.startswith(root + "/")}


def _clear_journal(fs: Any, root: str) -> None:
    """The notes are only for resuming; a failure to remove them is harmless and only printed."""
    try:
        fs.rm(f"{root}/{JOURNAL}", recursive=True)
    except FileNotFoundError:
        return
    except OSError as e:
        print(f"kit: note: could not remove {JOURNAL}/ at the destination ({scrub(str(e))}); it is harmless")


# ---------------------------------------------------------------------------------------------- CLI


def _upload_cli(src: Path, args: argparse.Namespace) -> UploadResult:
    """A checkpoint of a run (``<run>/checkpoints/<tag>``) is marked busy while it is sent, so the
    trainer's retention leaves it alone, and the upload goes to that run's ledger."""
    from kit import checkpoint as ck
    from kit.ledger import LedgerWriter, hostname
    from kit.rundir import RUN_TOML

    def send() -> UploadResult:
        return upload_folder(src, args.url, jobs=args.jobs, retries=args.retries, backoff_s=args.backoff,
                             progress=not args.json)

    run_dir = src.resolve().parent.parent
    if ck.step_of(src.resolve().name) is None or not (run_dir / RUN_TOML).exists():
        return send()
    tag = src.resolve().name
    with ck.busy(run_dir / "checkpoints", tag, "upload"), \
            LedgerWriter(run_dir, f"upload-{hostname()}-{os.getpid()}") as led:
        res = send()
        led.emit("ckpt_uploaded", tag=tag, url=res.url, sent=res.sent, skipped=res.skipped, bytes=res.bytes_sent,
                 seconds=res.seconds, what="checkpoint")
    return res


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    from kit.tools.cli import NONNEGATIVE, POSITIVE, seconds

    if verb == "upload":
        p.add_argument("src", help="local folder: a checkpoint (step_NNNNNNN) or an export")
        p.add_argument("url", help="destination: a path or any fsspec URL (s3://bucket/prefix, hf://, file://)")
        p.add_argument("--jobs", type=POSITIVE, default=4, help="files sent at once (default 4)")
        p.add_argument("--retries", type=NONNEGATIVE, default=5,
                       help="attempts per file after the first, for transient errors (default 5)")
        p.add_argument("--backoff", type=seconds(0.0), default=1.0,
                       help="first retry wait in seconds, doubled each time")
    else:
        p.add_argument("target", help="an uploaded URL (checked against KIT_UPLOAD.json) or a local checkpoint "
                                      "or export folder (checked against MANIFEST.json)")
        p.add_argument("--quick", action="store_true", help="sizes only, no hashes (no download)")
        p.add_argument("--jobs", type=POSITIVE, default=4, help="files checked at once (default 4)")
    p.add_argument("--json", action="store_true", help="machine-readable result, no progress bars")


def run(args: argparse.Namespace, verb: str) -> int:
    if verb == "upload":
        res = _upload_cli(Path(args.src), args)
        if args.json:
            print(json.dumps(asdict(res), indent=1))
        else:
            print(f"uploaded {args.src} -> {res.url}: {res.sent} file(s) sent, {res.skipped} already there, "
                  f"{res.bytes_sent / 1e6:.1f} MB in {res.seconds:.1f} s; {UPLOAD_MANIFEST} written last")
        return 0
    target: str = args.target
    local = Path(target)
    if not is_url(target) and (local / MANIFEST).exists() and not (local / UPLOAD_MANIFEST).exists():
        manifest, problems = verify_local(local, hashes=not args.quick, jobs=args.jobs)
    else:
        manifest, problems = verify_url(target, hashes=not args.quick, jobs=args.jobs)
    ok = manifest is not None and not problems
    n = len(manifest.get("files", {})) if manifest else 0
    if args.json:
        print(json.dumps({"target": redact(target), "ok": ok, "files": n, "hashes": not args.quick,
                          "problems": problems}, indent=1))
    elif ok:
        print(f"{redact(target)}: OK, {n} file(s) match the manifest ({'sizes' if args.quick else 'sizes and hashes'})")
    if not ok:
        if not args.json:
            for prob in problems[:20]:
                print(f"  {prob}")
        raise UploadError(f"{redact(target)} does not match its manifest ({len(problems)} problem(s)); "
                          "upload it again (resumes) or restore the files")
    return 0

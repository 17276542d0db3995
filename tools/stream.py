"""``kit stream RUN --to URL``: follow a live run and ship each new complete checkpoint.

For every complete checkpoint, oldest first, while it is marked busy (so the trainer's retention
leaves it alone): verify it locally against its manifest, upload it to ``URL/checkpoints/<tag>``,
verify the remote copy against KIT_UPLOAD.json, optionally score it on the run's held-out data
(``--eval``: kit.tools.evaluate, an ``eval`` event with ``by: stream``), optionally convert it and
upload the export to ``URL/hf/<tag>``. Then retention: remotely keep every N-th step (and the newest); locally keep the
newest K, deleting only checkpoints whose remote copy verified. Every stage is a ledger event
(writer ``stream``), so the monitor shows it.

While it lives, the stream holds the checkpoints it has not shipped yet (kit.checkpoint.hold, a
lease it renews): the trainer's own retention then keeps up to ``checkpoint.stream_hold_max`` of them
beyond its keep_last, instead of deleting a checkpoint before it was ever uploaded.

Restarts: the state (which tags are done, which remote copies were removed) is in
``<run>/exports/stream.json``, rewritten atomically after each stage; an upload cut in the middle
resumes without resending the files that landed (tools.upload).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit import checkpoint as ck
from kit.errors import KitError
from kit.faults import fault_point
from kit.fsio import atomic_write_json
from kit.ledger import Follower, LedgerWriter
from kit.ledger.schema import FINISHED_REASONS
from kit.rundir import RunDir, resolve_run
from kit.tools.remote import UPLOAD_MANIFEST, UploadError, open_fs, probe, redact, retrying, verify_url
from kit.tools.upload import upload_folder

STATE = "stream.json"
STATE_VERSION = 1
HOLDER = "stream"  # this stream's hold in checkpoints/.holds/ (one stream per run: _single_stream)
HOLD_LEASE_S = 900.0  # a killed stream stops protecting checkpoints this long after its last renewal


@dataclass(kw_only=True, slots=True)
class StreamOptions:
    url: str
    convert: bool = False
    evaluate: bool = False  # score each checkpoint on the held-out sets before it counts as shipped
    dtype: str = ""
    atol: float = 0.0  # accepted |logit difference| of an export (kit convert --atol)
    keep_last: int = 0  # 0: never delete local checkpoints
    keep_every: int = 0  # 0: keep every remote checkpoint
    hashes: bool = True  # remote verification re-reads and hashes every file
    jobs: int = 4
    retries: int = 5
    backoff_s: float = 1.0
    progress: bool = False


class StreamState:
    """What has been shipped, persisted in the run directory so a restart picks up where it stopped."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"version": STATE_VERSION, "url": redact(url), "done": {}, "remote_deleted": []}
        if path.exists():
            loaded = json.loads(path.read_text())
            if loaded.get("url") != redact(url):
                raise KitError(f"{path} belongs to a stream to {loaded.get('url')}; move it away to stream "
                               f"this run to {redact(url)}")
            self.data.update(loaded)

    @property
    def done(self) -> dict[str, dict[str, Any]]:
        return self.data["done"]

    def shipped(self, tag: str) -> bool:
        return bool(self.done.get(tag, {}).get("remote_verified"))

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


class Hold:
    """This stream's lease on the checkpoints after the last one it shipped (kit.checkpoint.hold),
    renewed by a thread every tenth of the lease (uploading a 2 TB checkpoint outlasts a lease);
    released on close."""

    def __init__(self, root: Path, prefer_every: int = 0, lease_s: float = HOLD_LEASE_S) -> None:
        self.root = root
        self.prefer_every = prefer_every
        self.lease_s = lease_s
        self.after_step: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="kit-stream-hold", daemon=True)
        self._thread.start()

    def set(self, after_step: int) -> None:
        self.after_step = after_step
        ck.hold(self.root, HOLDER, after_step, self.lease_s, self.prefer_every)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 10):
            if self.after_step is not None:
                with contextlib.suppress(OSError):  # retried at the next renewal; the lease covers ten
                    ck.hold(self.root, HOLDER, self.after_step, self.lease_s, self.prefer_every)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        ck.release(self.root, HOLDER)


class Streamer:
    def __init__(self, rd: RunDir, opts: StreamOptions, ledger: LedgerWriter, hold: Hold | None = None) -> None:
        self.rd = rd
        self.opts = opts
        self.led = ledger
        self.url = opts.url.rstrip("/")
        self.hold = hold
        rd.exports.mkdir(parents=True, exist_ok=True)
        self.state = StreamState(rd.exports / STATE, opts.url)
        self._ends: Follower | None = None
        self._last_end: dict[str, Any] | None = None
        self.clear_stale_busy()

    def clear_stale_busy(self) -> None:
        """A stream killed mid-upload leaves its busy marker behind, which would protect that
        checkpoint from retention forever: markers of dead processes of this host are removed."""
        ck.clear_stale_busy(self.rd.checkpoints)

    def remote(self, kind: str, tag: str) -> str:
        return f"{self.url}/{kind}/{tag}"

    # ---------------------------------------------------------------------------------- one pass
    def run_once(self) -> int:
        """Ship every complete checkpoint not shipped yet, then apply retention; returns how many."""
        complete, _ = ck.scan(self.rd.checkpoints)
        done = self.state.done
        todo = [c for c in complete if not self.state.shipped(c.tag) and not done.get(c.tag, {}).get("corrupt")]
        self._hold()
        shipped = 0
        for c in todo:
            n = self.ship(c)
            shipped += n
            if n:
                self._hold()  # shipped: the trainer may delete it now
        self.remote_retention()
        self.local_retention()
        return shipped

    def _hold(self) -> None:
        """Hold every checkpoint after the newest shipped one (oldest first is the shipping order, so
        the ones before it are shipped, corrupt, or gone)."""
        if self.hold is not None:
            self.hold.set(max((e["step"] for e in self.state.done.values() if e.get("remote_verified")), default=-1))

    def ship(self, c: ck.Checkpoint) -> int:
        root, tag, o = self.rd.checkpoints, c.tag, self.opts
        entry = self.state.done.setdefault(tag, {"step": c.step})
        with ck.busy(root, tag, "stream"):
            if not (c.path / ck.MANIFEST).exists():
                return 0  # deleted meanwhile (the trainer's retention): nothing to ship
            problems = ck.verify(c, hashes=True)
            self.led.emit("ckpt_verified", tag=tag, ok=not problems, where="local", problems=problems[:5])
            if problems:
                entry["corrupt"] = problems[:5]
                self.state.save()
                self.led.alert("error", f"checkpoint {tag} is corrupt and was not uploaded: {problems[0]}", tag=tag)
                return 0
            dest = self.remote("checkpoints", tag)
            res = upload_folder(c.path, dest, o.jobs, o.retries, o.backoff_s, o.progress)
            self.led.emit("ckpt_uploaded", tag=tag, url=res.url, step=c.step, sent=res.sent, skipped=res.skipped,
                          bytes=res.bytes_sent, seconds=res.seconds, what="checkpoint")
            fault_point("stream.after_upload", c.step, 0)
            _, problems = verify_url(dest, hashes=o.hashes, jobs=o.jobs)
            self.led.emit("ckpt_verified", tag=tag, ok=not problems, where="remote", url=redact(dest),
                          hashes=o.hashes, problems=problems[:5])
            if problems:
                raise UploadError(f"the remote copy of {tag} does not verify ({problems[0]}); "
                                  "run `kit stream` again to resume")
            if o.evaluate:  # before it counts as shipped: a stream killed meanwhile evaluates it again
                self.evaluate(c)
            entry.update(remote_verified=True, url=redact(dest), uploaded=time.time())
            self.state.save()
            if o.convert:
                self.ship_export(c, entry)
        return 1

    def evaluate(self, c: ck.Checkpoint) -> None:
        """Score a checkpoint on the run's held-out sets and record it in the ledger. A failure to
        evaluate (no held-out data, say) is an alert, not a reason to stop shipping."""
        from kit.tools.evaluate import evaluate_checkpoint, record

        try:
            res = evaluate_checkpoint(self.rd, c)
        except KitError as e:
            self.led.alert("warning", f"stream could not evaluate {c.tag}: {e}", tag=c.tag)
            return
        res["by"] = "stream"
        record(self.rd, res, self.led)

    def ship_export(self, c: ck.Checkpoint, entry: dict[str, Any]) -> None:
        from kit.tools.convert import convert

        o = self.opts
        local = self.rd.exports / f"{c.tag}-hf"
        exp = convert(self.rd, c, local, o.dtype, atol=o.atol, force=True, ledger=self.led,
                      check_source=True)  # as `kit convert`: the records it reads, against torch.save's CRC-32s
        dest = self.remote("hf", c.tag)
        res = upload_folder(exp.out, dest, o.jobs, o.retries, o.backoff_s, o.progress)
        self.led.emit("ckpt_uploaded", tag=c.tag, url=res.url, step=c.step, sent=res.sent, skipped=res.skipped,
                      bytes=res.bytes_sent, seconds=res.seconds, what="export")
        _, problems = verify_url(dest, hashes=o.hashes, jobs=o.jobs)
        self.led.emit("ckpt_verified", tag=c.tag, ok=not problems, where="remote-export", url=res.url)
        if problems:
            raise UploadError(f"the remote export of {c.tag} does not verify ({problems[0]}); run again to resume")
        shutil.rmtree(local)  # derived, and verified remotely: the run's disk is for checkpoints
        entry["export_url"] = res.url
        self.state.save()

    # --------------------------------------------------------------------------------- retention
    def remote_retention(self) -> None:
        """Keep every N-th step remotely, and the newest shipped one; delete the others' manifest first."""
        n = self.opts.keep_every
        shipped = sorted((e["step"], tag) for tag, e in self.state.done.items() if e.get("remote_verified"))
        if not n or not shipped:
            return
        newest = shipped[-1][1]
        deleted = self.state.data["remote_deleted"]
        for step, tag in shipped:
            if step % n == 0 or tag == newest or tag in deleted:
                continue
            fs, root = open_fs(self.remote("checkpoints", tag))
            retrying(lambda fs=fs, root=root: _rm(fs, f"{root}/{UPLOAD_MANIFEST}", False), f"deleting {tag} remotely")
            retrying(lambda fs=fs, root=root: _rm(fs, root, True), f"deleting {tag} remotely")
            deleted.append(tag)
            self.state.save()
            self.led.emit("ckpt_deleted", tag=tag, where="remote", url=redact(self.remote("checkpoints", tag)))

    def local_retention(self) -> None:
        """Keep the newest K locally; older ones go only once their remote copy verified, and never
        the newest complete one (kit.checkpoint.delete refuses it, whatever K says)."""
        k = self.opts.keep_last
        if k <= 0:
            return  # 0: keep everything (the CLI refuses negative values)
        root = self.rd.checkpoints
        complete, _ = ck.scan(root)
        protected = ck.pinned(root) | ck.busy_tags(root)
        for c in complete[:max(0, len(complete) - k)]:
            if c.tag in protected or not self.state.shipped(c.tag):
                continue
            try:
                ck.delete(root, c.tag)
            except ck.ProtectedCheckpoint:
                continue
            except OSError as e:
                self.led.alert("warning", f"stream could not delete {c.tag} locally: {e}", tag=c.tag)
                continue
            self.led.emit("ckpt_deleted", tag=c.tag, where="local", reason="stream retention")

    # ------------------------------------------------------------------------------------ follow
    def run_ended(self) -> bool:
        """Has the run ended for good? Followed incrementally (the one reader, only these kinds):
        a poll reads what was appended since the last one, not the whole ledger."""
        if self._ends is None:
            self._ends = Follower(self.rd.ledger, kinds=frozenset({"segment_ended", "chain_ended", "segment_started"}))
        for e in self._ends.poll_all():
            self._last_end = e
        last = self._last_end
        if last is None:
            return False
        return last["kind"] == "chain_ended" or (
            last["kind"] == "segment_ended" and last["reason"] in FINISHED_REASONS)

    def follow(self, poll_s: float, exit_when_done: bool, log: Any = print) -> int:
        total = 0
        while True:
            ended = self.run_ended()  # read before the pass: a checkpoint saved before the end is seen
            n = self.run_once()
            total += n
            if n:
                log(f"kit stream: shipped {n} checkpoint(s) ({total} so far)")
            if exit_when_done and ended:
                return total
            time.sleep(poll_s)


@contextlib.contextmanager
def _single_stream(rd: RunDir) -> Iterator[None]:
    """One stream per run: two would race on the same uploads and share one ledger file."""
    import fcntl
    import socket

    rd.exports.mkdir(parents=True, exist_ok=True)
    path = rd.exports / "stream.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise KitError(f"another `kit stream` is already following {rd.path} ({fh.read().strip() or 'unknown'}); "
                           "stop it first, or wait for it to end") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        yield


def _rm(fs: Any, path: str, recursive: bool) -> None:
    """Remove a remote path; one that is already gone (a previous pass was cut after it) is fine."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    from kit.tools.cli import NONNEGATIVE, POSITIVE, seconds

    p.add_argument("run", help="run directory (or run name under --runs-dir)")
    p.add_argument("--to", required=True, metavar="URL", help="destination root: a path or any fsspec URL")
    p.add_argument("--runs-dir", default="runs", help="where run names are looked up (default: ./runs)")
    p.add_argument("--convert", action="store_true", help="also convert each checkpoint and upload it to URL/hf/<tag>")
    p.add_argument("--eval", action="store_true",
                   help="score each checkpoint on the run's held-out data (kit eval) and record it in the ledger")
    p.add_argument("--dtype", default="", choices=("", "bf16", "fp32"), help="export dtype (default: the run's)")
    p.add_argument("--atol", type=seconds(0.0), default=0.0,
                   help="with --convert: largest accepted |logit difference| (default 0: exact)")
    p.add_argument("--keep-last", type=NONNEGATIVE, default=0,
                   help="keep the newest K checkpoints locally, delete older ones once verified remotely (0: keep all)")
    p.add_argument("--keep-every", type=NONNEGATIVE, default=0,
                   help="remotely keep only multiples of N steps (and the newest); 0 keeps all")
    p.add_argument("--quick-verify", action="store_true", help="verify remote copies by size only (no read-back)")
    p.add_argument("--jobs", type=POSITIVE, default=4, help="files sent at once (default 4)")
    p.add_argument("--poll", type=seconds(0.0, strict=True), default=30.0,
                   help="seconds between looks at the run (default 30)")
    p.add_argument("--once", action="store_true", help="ship what is there now, then exit")
    p.add_argument("--exit-when-done", action="store_true", help="exit once the run (or its chain) has ended")


def run(args: argparse.Namespace, verb: str) -> int:
    rd = resolve_run(args.run, args.runs_dir)
    probe(args.to)  # a destination that cannot work fails now, not after the first checkpoint's hashing
    opts = StreamOptions(url=args.to, convert=args.convert, evaluate=args.eval, dtype=args.dtype, atol=args.atol,
                         keep_last=args.keep_last,
                         keep_every=args.keep_every, hashes=not args.quick_verify, jobs=args.jobs)
    with _single_stream(rd), LedgerWriter(rd.path, "stream") as led:
        hold = Hold(rd.checkpoints, prefer_every=opts.keep_every)
        try:
            streamer = Streamer(rd, opts, led, hold)
            if args.once:
                n = streamer.run_once()
                print(f"kit stream: shipped {n} checkpoint(s) to {redact(args.to)}")
                return 0
            streamer.follow(args.poll, args.exit_when_done)
        finally:
            hold.close()
    return 0

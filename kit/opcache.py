"""DeepSpeed's compiled ops: one build cache per kit install, prebuilt, and stale build locks found.

Why: DeepSpeed compiles its CPU communication op (``deepspeed_shm_comm``) on the first distributed
start, into torch's extension cache. By default that cache is per user (``~/.cache/torch_extensions``)
and shared by every virtual environment and image of that user, whatever their torch. A process killed
while it held the build's ``lock`` file left the lock behind, and every later DeepSpeed start on the
machine slept on it forever, silently (a test suite hung 40 minutes).

So the kit gives each install its own cache, ``<sys.prefix>/torch_extensions`` (or, when the install
is read-only, a folder under ``~/.cache/kit`` named after it), unless ``TORCH_EXTENSIONS_DIR`` is set:
:func:`set_extensions_dir` is called by the ``kit`` command, the chain's driver and every rank.
``bash dev.sh setup`` prebuilds the op there (``python -m kit.opcache build``), and the preflight
(``kit doctor``) names a stale lock with the command that removes it (:func:`stale_locks`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"
LOCK = "lock"  # torch.utils.file_baton's lock file, inside each extension's build folder
STALE_AFTER_S = 300.0  # a build takes ~30-60 s; older than this with no holder is stale


def default_dir(prefix: str | None = None) -> Path:
    """This install's extension cache: ``<prefix>/torch_extensions`` where the install is writable,
    else ``~/.cache/kit/torch_extensions-<hash of prefix>`` (an image's read-only prefix)."""
    prefix = prefix or sys.prefix
    own = Path(prefix) / "torch_extensions"
    if os.access(own if own.exists() else prefix, os.W_OK):
        return own
    digest = hashlib.sha256(str(Path(prefix).resolve()).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kit" / f"torch_extensions-{digest}"


def set_extensions_dir(environ: MutableMapping[str, str] | None = None) -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` to this install's cache unless it is set already; returns it."""
    env = os.environ if environ is None else environ
    if not env.get(ENV):
        env[ENV] = str(default_dir())
    return env[ENV]


def build() -> str:
    """Build DeepSpeed's CPU comm op into this install's cache (what ``bash dev.sh setup`` runs)."""
    folder = set_extensions_dir()
    Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()
    return folder


# ------------------------------------------------------------------------------------ stale locks


@dataclass(slots=True)
class BuildLock:
    path: Path
    age_s: float
    holders: list[int] = field(default_factory=list)  # processes of this machine that have it open

    @property
    def command(self) -> str:
        return f"rm {self.path}"


def roots(environ: MutableMapping[str, str] | None = None) -> list[Path]:
    """The extension cache DeepSpeed starts of this install use: ``TORCH_EXTENSIONS_DIR``, or the kit's
    default when it is unset (the kit sets it for every process it starts)."""
    env = os.environ if environ is None else environ
    return [Path(env.get(ENV) or default_dir())]


def build_locks(folders: list[Path] | None = None, now: float | None = None) -> list[BuildLock]:
    """Build locks present in the caches (``<root>/<ext>/lock`` and torch's ``<root>/py311_cpu/<ext>/lock``)."""
    now = time.time() if now is None else now
    found: list[BuildLock] = []
    for root in roots() if folders is None else folders:
        for lock in [*root.glob(f"*/{LOCK}"), *root.glob(f"*/*/{LOCK}")]:
            try:
                age = now - lock.stat().st_mtime
            except OSError:
                continue  # released meanwhile
            found.append(BuildLock(lock, age))
    if found:
        holders = _holders({lk.path for lk in found})
        for lk in found:
            lk.holders = holders.get(lk.path, [])
    return found


def stale_locks(folders: list[Path] | None = None, max_age_s: float = STALE_AFTER_S) -> list[BuildLock]:
    """Locks no process of this machine holds open (torch's builder keeps the lock's descriptor open
    while it builds) and older than ``max_age_s`` (a builder on another node of a shared cache)."""
    return [lk for lk in build_locks(folders) if not lk.holders and lk.age_s > max_age_s]


def _holders(paths: set[Path]) -> dict[Path, list[int]]:
    """pid lists of the processes that have one of ``paths`` open (those /proc lets us see)."""
    want = {str(p.resolve()): p for p in paths}
    out: dict[Path, list[int]] = {}
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in want:
                out.setdefault(want[target], []).append(int(pid))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m kit.opcache build`` prebuilds the op; ``python -m kit.opcache locks`` lists locks."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["build"]:
        print(f"DeepSpeed ops cache: {build()}")
        return 0
    if args[:1] == ["locks"]:
        for lk in build_locks():
            state = f"held by {lk.holders}" if lk.holders else ("STALE" if lk.age_s > STALE_AFTER_S else "fresh")
            print(f"{lk.path}  age {lk.age_s:.0f} s  {state}")
        return 0
    print("usage: python -m kit.opcache {build|locks}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

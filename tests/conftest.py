"""Shared fixtures. Real parts only: real DeepSpeed ranks, the real local Slurm, real files.

In CI (KIT_REQUIRE_REAL=1, set by .ci/run) a test that needs Slurm or DeepSpeed and cannot find them
FAILS instead of skipping: a green CI must mean those parts ran.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_REAL = os.environ.get("KIT_REQUIRE_REAL") == "1"
# Every ledger writer of the tests (ranks included: they inherit it) raises on a field that does not
# conform to kit/ledger/schema.py, instead of writing it as null as production does.
os.environ.setdefault("KIT_LEDGER_STRICT", "1")


def require(condition: bool, what: str) -> None:
    """Skip when a real part is missing on a developer machine; fail in CI."""
    if condition:
        return
    if REQUIRE_REAL:
        pytest.fail(f"{what} is required in CI (KIT_REQUIRE_REAL=1) but is not available")
    pytest.skip(f"{what} not available")


def slurm_available() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm() -> None:
    require(slurm_available(), "a running local Slurm cluster (bash .ci/slurm/start.sh, as root)")


@pytest.fixture(scope="session")
def deepspeed_ok() -> None:
    """DeepSpeed is importable, and its CPU communication op is built (once, ~30 s on a fresh machine;
    cached in this install's folder, kit.opcache): otherwise the first test to start ranks pays for it
    inside its own timings, and every rank of it waits on the build lock."""
    import sys

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        require(False, "DeepSpeed")
    warm = subprocess.run([sys.executable, "-m", "kit.opcache", "build"],
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, f"building DeepSpeed's CPU comm op failed (is g++ installed?):\n{warm.stderr[-2000:]}"


def tiny_overrides(runs_dir: Path, name: str = "t", **extra: object) -> list[str]:
    """Overrides that make the shipped tiny recipe fast enough for tests."""
    o = {
        "run.name": f'"{name}"',
        "run.runs_dir": f'"{runs_dir}"',
        "model.seq_length": 32,
        "trainer.max_steps": 8,
        "optim.warmup_steps": 2,
        "checkpoint.interval_steps": 2,
        "checkpoint.keep_last": 10,
        "batch.micro_batch_size": 2,
        "batch.grad_accum": 2,
        "data.vocab_size": 512,
    }
    o.update({k: (f'"{v}"' if isinstance(v, str) else v) for k, v in extra.items()})
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in o.items()]


@pytest.fixture
def tiny_cfg(tmp_path: Path):  # type: ignore[no-untyped-def]
    from kit.config import load_recipe

    def make(name: str = "t", **extra: object):  # type: ignore[no-untyped-def]
        return load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(tmp_path / "runs", name, **extra))

    return make


@pytest.fixture
def full_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real filesystem with 64 KiB of room (a tmpfs), to see what kit does when a disk fills up.
    Needs root and permission to mount: skipped (and says so) elsewhere."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (and CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def mount_tmpfs(where: Path, size: str) -> None:
    """A real, small filesystem at ``where`` (skips without the right to mount: root and CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (and CAP_SYS_ADMIN)")


def processes_of(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line mentions ``text`` (a test's tmp_path),
    from /proc: what a test leaves behind."""
    out = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if text in cmd:
            out.append((int(entry.name), cmd))
    return out


def wait_no_processes(text: str, timeout: float) -> list[tuple[int, str]]:
    """Wait (bounded) until no process mentions ``text``; returns those still there at the end."""
    import time

    end = time.monotonic() + timeout
    left = processes_of(text)
    while left and time.monotonic() < end:
        time.sleep(0.5)
        left = processes_of(text)
    return left


def _reap(tmp_path: Path) -> list[tuple[int, str]]:
    """Processes of a test still there after a grace of 90 s (on their way out): killed, and returned."""
    import signal

    left = wait_no_processes(str(tmp_path), 90.0)
    for pid, _ in left:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    return left


@pytest.fixture
def no_leftovers(tmp_path: Path):  # type: ignore[no-untyped-def]
    """At teardown, no process of the test (its command line mentions tmp_path) may be left: any found
    are killed, and the test fails naming them."""
    yield tmp_path
    left = _reap(tmp_path)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(autouse=True)
def _no_leftover_ranks(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Every test that starts ranks (marked deepspeed or slurm) and has a tmp_path leaves no process
    behind: checked at teardown, like :func:`no_leftovers` (a frozen or orphaned rank fails it)."""
    marked = any(request.node.get_closest_marker(m) for m in ("deepspeed", "slurm"))
    uses_tmp = bool({"tmp_path", "tiny_cfg", "no_leftovers"} & set(request.fixturenames))
    if not marked or not uses_tmp or "no_leftovers" in request.fixturenames:
        yield
        return
    tmp = request.getfixturevalue("tmp_path")
    yield
    left = _reap(tmp)
    assert not left, f"processes left behind: {left}"

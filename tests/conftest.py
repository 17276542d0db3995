"""Shared fixtures. Real parts only: real DeepSpeed ranks, the real local Slurm, real files.

In CI (KIT_REQUIRE_REAL=1, set by .ci/run) a test that needs Slurm or DeepSpeed and cannot find them
FAILS instead of skipping: a green CI must mean those parts ran.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_REAL = os.environ.get("KIT_REQUIRE_REAL") == "1"
# Every ledger writer of the tests (ranks included: they inherit it) raises on a field that does not
# conform to kit/ledger/schema.py, instead of writing it as null as production does.
os.environ.setdefault("KIT_LEDGER_STRICT", "1")

# --------------------------------------------------------------------------------- nothing left behind
# Every process a test starts inherits this mark (Slurm jobs too: sbatch exports the environment), so
# one left running after its test — an orphaned rank whose launcher was killed, a stream, a monitor, a
# Slurm job — is found even when it was re-parented away from pytest.
SESSION_MARK = "KIT_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"
LEFTOVER_GRACE_S = float(os.environ.get("KIT_TEST_LEFTOVER_GRACE_S", "30"))


def session_processes() -> dict[int, str]:
    """Live processes of this test session other than pytest itself: pid -> command line."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    out: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    continue  # a zombie: already dead, its parent has not reaped it yet
            with open(f"/proc/{d}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                out[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:300]
        except (OSError, IndexError):
            continue
    return out


# Daemons a test may (re)start (the two-node Slurm test restarts Slurm): shared by everyone, never a leak.
DAEMONS = ("slurmctld", "slurmd", "slurmdbd", "slurmstepd", "munged", "mariadbd")


def leftovers(before: set[int], grace_s: float) -> dict[int, str]:
    """Processes started since ``before`` still alive after ``grace_s``; they are killed (Slurm jobs among
    them cancelled first), and returned."""
    deadline = time.monotonic() + grace_s
    while True:
        left = {p: c for p, c in session_processes().items()
                if p not in before and c.split(" ", 1)[0].rsplit("/", 1)[-1] not in DAEMONS}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    jobs = {j for j in map(_slurm_job, left) if j}
    if jobs and shutil.which("scancel"):
        subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=30, check=False)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


def _slurm_job(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return ""
    return env.get(b"SLURM_JOB_ID", b"").decode()


@pytest.fixture(autouse=True)
def no_process_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test that leaves a process of its own running (after a grace period for processes that are
    on their way out); the processes are killed so the next test starts clean."""
    before = set(session_processes())
    yield
    left = leftovers(before, LEFTOVER_GRACE_S)
    if left:
        pytest.fail(f"{request.node.nodeid} left {len(left)} process(es) running (killed now):\n"
                    + "\n".join(f"  {pid}: {cmd}" for pid, cmd in sorted(left.items())), pytrace=False)


def stale_build_locks() -> list[Path]:
    """DeepSpeed/torch extension build locks no process holds, older than a few minutes (a killed build:
    every later DeepSpeed start would wait on it forever), in this install's cache (kit.opcache)."""
    from kit import opcache

    return [lk.path for lk in opcache.stale_locks()]


def mounts_under(basetemp: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(basetemp))]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Teardown checks of the whole session: no process, no build lock, no mount left behind."""
    problems = []
    left = leftovers(set(), 10.0)
    if left:
        problems.append("processes left running: " + "; ".join(f"{p}: {c}" for p, c in sorted(left.items())))
    problems += [f"stale torch extension build lock: {p}" for p in stale_build_locks()]
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None:
        problems += [f"mount left: {m}" for m in mounts_under(factory.getbasetemp())]
    if problems:
        print("\n\nTEARDOWN CHECKS FAILED:\n  " + "\n  ".join(problems))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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


@pytest.fixture
def no_leftovers(tmp_path: Path):  # type: ignore[no-untyped-def]
    """tmp_path, and at teardown no process whose command line mentions it (found even without the
    session mark, e.g. under another user's Slurm): any left are killed and the test fails naming them
    (the autouse no_process_left_behind checks the session's processes as well)."""
    yield tmp_path
    left = wait_no_processes(str(tmp_path), LEFTOVER_GRACE_S)
    for pid, _ in left:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    assert not left, f"processes left behind: {left}"


# The tests whose outcome depends on several processes or threads meeting (stream vs trainer, monitor vs
# writer, chain vs Slurm, the watchdog, signals): marked `concurrency`, run under load by tests/stress.py.
CONCURRENCY = ("test_stream", "test_monitor", "test_monitor_tmux", "test_monitor_slurm", "test_chain_local",
               "test_chain_slurm", "test_chain_twonode", "test_watchdog", "test_stragglers", "test_trainer",
               "test_spikes_run", "test_summary", "test_faults", "test_goodput_chain", "test_train_procs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in CONCURRENCY:
            item.add_marker(pytest.mark.concurrency)

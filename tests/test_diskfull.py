"""A full disk during a checkpoint save (kit.diskfull): recognised, agreed by every rank, named.

Real filesystems: small tmpfs mounts (tests/conftest.py; root only, skipped elsewhere). Real ranks: two
gloo processes under torchrun, one of which writes into the full filesystem.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kit import diskfull, exitcodes
from kit.errors import CheckpointError


def _fill(fs: Path) -> None:
    """Write into ``fs`` until the kernel says it is full."""
    with open(fs / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_full_is_recognised_with_and_without_an_errno(full_fs: Path, tmp_path: Path) -> None:
    """ENOSPC/EDQUOT anywhere in the chain; torch's C++ writer's errors (no errno) only when the
    filesystem has less room than the object needed."""
    assert diskfull.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert diskfull.is_disk_full(RuntimeError("x"), full_fs, need=10**9), "less room than the object needs"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert diskfull.is_disk_full(wrapped, tmp_path)
    cpp = RuntimeError("basic_ios::clear: iostream error")
    assert not diskfull.is_disk_full(cpp, tmp_path), "a write error with plenty of room is not a full disk"
    _fill(full_fs)
    assert diskfull.is_disk_full(cpp, full_fs / "step_0000006" / "x.pt")


def test_guard_records_instead_of_raising_and_skips_later_writes(full_fs: Path) -> None:
    import torch

    g = diskfull.WriteGuard(0, "n0")
    state = {"w": torch.zeros(1 << 16)}  # 256 KiB into a 64 KiB filesystem
    g.run(torch.save, full_fs / "a.pt", state, full_fs / "a.pt")
    assert g.failure is not None and g.failure.disk_full and g.failure.rank == 0
    assert 0 <= g.failure.free_bytes < diskfull.MIN_FREE and g.failure.total_bytes == 64 * 1024
    assert g.run(lambda: pytest.fail("a write after a failure must be skipped"), full_fs) is None
    failures, nodes = g.agree()  # no process group: this rank alone
    err = diskfull.error(6, failures, nodes)
    assert isinstance(err, diskfull.DiskFullError) and err.exit_code == exitcodes.DISK_FULL == 79
    assert str(err).startswith("disk full: the checkpoint save of step 6 failed") and "no node is to blame" in str(err)
    assert err.nodes == []


def test_only_the_nodes_that_failed_while_others_did_not_are_blamed() -> None:
    f = diskfull.WriteFailure(1, "n1", "/ck/x", "OSError: [Errno 28] No space left on device", True, 0, 100)
    assert diskfull.local_nodes([f], ["n0", "n1"]) == ["n1"]
    assert diskfull.local_nodes([f], ["n1"]) == [], "a one-node allocation cannot tell: blame nothing"
    g = diskfull.WriteFailure(0, "n0", "/ck/y", "OSError: [Errno 28] No space left on device", True, 0, 100)
    assert diskfull.local_nodes([f, g], ["n0", "n1"]) == [], "every node failed: the shared filesystem"
    other = diskfull.WriteFailure(1, "n1", "/ck/x", "OSError: [Errno 5] Input/output error", False, 10**12, 10**13)
    err = diskfull.error(4, [other], ["n0", "n1"])
    assert type(err) is CheckpointError and "Input/output error" in str(err)


WORKER = """
import os, sys
import torch.distributed as dist
from kit import diskfull
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
g = diskfull.WriteGuard(rank, "node0")
target = os.path.join(sys.argv[1] if rank == 1 else sys.argv[2], "part.bin")
def write(path):
    with open(path, "wb") as f:
        f.write(b"x" * (1 << 20))
g.run(write, target, target)  # rank 1 writes 1 MiB into a 64 KiB filesystem
dist.barrier()  # the save's own collectives go on, whichever rank failed
failures, nodes = g.agree()
err = diskfull.error(7, failures, nodes)
# one write(2) of one line: under PYTHONUNBUFFERED print() writes the text and its newline apart and
# the two ranks' lines interleave in the shared pipe
line = f"RANK{rank} {type(err).__name__} blamed={err.nodes if hasattr(err, 'nodes') else None} :: {err}\\n"
os.write(1, line.encode())
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_one_rank_out_of_space_fails_the_save_on_every_rank(full_fs: Path, tmp_path: Path) -> None:
    """Two real ranks; only rank 1's write hits ENOSPC. Both learn it in the agreement (no rank is
    left waiting in a barrier), raise the same DiskFullError, and blame no node."""
    ok = tmp_path / "ok"
    ok.mkdir()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "--no-python", sys.executable, "-c", WORKER, str(full_fs), str(ok)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("RANK"))
    assert len(lines) == 2, out.stdout
    messages = {line.split(" :: ")[1] for line in lines}
    assert len(messages) == 1, "every rank raises the same error"
    assert all("DiskFullError blamed=[]" in line for line in lines)
    (msg,) = messages
    assert "rank 1 (node0)" in msg and "No space left on device" in msg and str(full_fs) in msg
    assert (ok / "part.bin").stat().st_size == 1 << 20


@pytest.mark.parametrize(("zero", "precision", "per_param"), [(0, "fp32", 12), (1, "fp32", 16), (2, "fp32", 16),
                                                             (1, "bf16", 14), (2, "bf16", 14), (3, "fp32", 12),
                                                             (3, "bf16", 12)])
def test_checkpoint_size_follows_the_zero_state(tiny_cfg: Any, zero: int, precision: str, per_param: int) -> None:
    """The preflight's free-space need (kit.model.sizing): module weights (4 fp32 / 2 bf16, none at
    ZeRO-3) + fp32 master copy (4, but not fp32 ZeRO-0) + Adam's two moments (8) a parameter, plus a
    little per rank; it was 12 (fp32) or 14 (bf16) at every stage, below what ZeRO-1/2 fp32 writes (16).
    A real checkpoint is compared with it in test_chain_local's disk-full test."""
    from kit.model import CKPT_RANK_OVERHEAD, param_count, sizing

    cfg = tiny_cfg(**{"deepspeed.zero_stage": zero, "deepspeed.precision": precision})
    s = sizing(cfg)
    n = param_count(cfg.model, cfg.data.vocab_size)
    assert (s["checkpoint_bytes"] - s["world_size"] * CKPT_RANK_OVERHEAD) / n == per_param

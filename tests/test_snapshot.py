"""Host snapshots of state dicts (kit.snapshot) and the background writer's protocol (kit.asyncsave),
without DeepSpeed: real torch tensors, real files, real threads.

What must hold for an asynchronous save to be a checkpoint at all: the copy serializes to the same
bytes as the live state would have at the save (storage sharing, views, tensor attributes, a module
state dict's ``_metadata`` all kept), and training changing the live state afterwards changes nothing
in it. Generated state dicts (hypothesis) as well as a hand-built one shaped like ZeRO's.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit import checkpoint as ck
from kit import diskfull
from kit.asyncsave import RankWrite, known_files, remove_records
from kit.snapshot import CaptureEngine, HostBuffers, Snapshot, state_bytes


def saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class _Inner:
    """DeepSpeed's checkpoint engine as CaptureEngine uses it (serialization setting, writer choice)."""

    zipfile_serialization = True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0


def snap_of(state: Any, budget: int | None = None, buffers: HostBuffers | None = None,
            path: str = "f.pt") -> Snapshot:
    cap = CaptureEngine(_Inner(), buffers or HostBuffers(), budget)
    cap.save(state, path)
    return cap.finish()


@dataclass
class Scaler:
    """A small non-tensor object in the state (DeepSpeed's loss scaler)."""

    scale: float = 1.0


def zero_like_state() -> dict[str, Any]:
    """Shaped like DeepSpeed's files at ZeRO-1/2: params as views of one flat buffer, the fp32 partition
    without its padding (a non-leaf slice of a leaf that requires grad), Adam moments, a tensor with an
    attribute (ZeRO-3's ds_id), a module state dict's _metadata, shapes, a small object."""
    flat = torch.randn(40)
    module: OrderedDict[str, torch.Tensor] = OrderedDict(w=flat[:30].view(5, 6), b=flat[30:36])
    module._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    fp32 = torch.randn(42, requires_grad=True)
    tagged = torch.randn(3)
    tagged.ds_id = "0_28"  # type: ignore[attr-defined]
    return {"module": module, "param_shapes": [OrderedDict(w=torch.Size([5, 6]), b=torch.Size([6]))],
            "optimizer": {"fp32": [fp32[:40]], "state": {0: {"exp_avg": torch.zeros(40), "step": torch.tensor(3.0)}},
                          "param": torch.nn.Parameter(torch.randn(4)), "tagged": tagged},
            "scaler": Scaler(2.0), "names": ("w", "b"), "shared": [flat, flat[1:3]], "n": 7, "none": None}


def bump(obj: Any) -> None:
    """What training does to the live state after a save: change every tensor in place."""
    if isinstance(obj, torch.Tensor):
        with torch.no_grad():
            obj.add_(1)
    elif isinstance(obj, dict):
        for v in obj.values():
            bump(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            bump(v)


def test_copy_serializes_to_the_same_bytes_and_ignores_later_training() -> None:
    state = zero_like_state()
    before = saved(state)
    snap = snap_of(state)
    (path, copy), = snap.files
    assert path == "f.pt" and saved(copy) == before
    assert snap.nbytes == state_bytes(state) == 4 * (40 + 42 + 40 + 1 + 4 + 3)
    bump(state["module"])
    bump(state["optimizer"])
    assert saved(state) != before and saved(copy) == before  # training went on; the copy did not move
    assert copy["module"]["w"].untyped_storage().data_ptr() == copy["shared"][0].untyped_storage().data_ptr()


def test_buffers_are_reused_from_one_save_to_the_next() -> None:
    buffers = HostBuffers()
    first = snap_of(zero_like_state(), buffers=buffers)
    ptrs = sorted(s.data_ptr() for s in first.storages)
    buffers.give_back(first.storages)
    assert buffers.held_bytes() == first.nbytes
    second = snap_of(zero_like_state(), buffers=buffers)
    assert sorted(s.data_ptr() for s in second.storages) == ptrs  # no new allocation
    assert buffers.held_bytes() == 0


def test_over_the_memory_budget_a_file_is_written_at_once(tmp_path: Path) -> None:
    state = zero_like_state()
    snap = snap_of(state, budget=100, path=str(tmp_path / "f.pt"))
    assert snap.files == [(str(tmp_path / "f.pt"), None)] and snap.nbytes == 0
    assert snap.sync_bytes == state_bytes(state)
    (tmp_path / "ref").mkdir()
    torch.save(state, tmp_path / "ref" / "f.pt")  # the zip's folder name is the file's: same name
    assert (tmp_path / "f.pt").read_bytes() == (tmp_path / "ref" / "f.pt").read_bytes()


def test_host_memory_refused_writes_the_file_at_once(tmp_path: Path) -> None:
    """Pinned memory can be refused (cudaHostAlloc fails): the file is written during the capture."""

    class Refusing(HostBuffers):
        def take(self, nbytes: int, pinned: bool) -> Any:
            raise RuntimeError("CUDA error: out of memory (host allocation)")

    state = zero_like_state()
    snap = snap_of(state, buffers=Refusing(), path=str(tmp_path / "f.pt"))
    assert snap.files == [(str(tmp_path / "f.pt"), None)] and snap.sync_bytes == state_bytes(state)
    assert torch.equal(torch.load(tmp_path / "f.pt", weights_only=False)["optimizer"]["fp32"][0],
                       state["optimizer"]["fp32"][0].detach())


dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.float16])


@st.composite
def states(draw: st.DrawFn) -> Any:
    """Nested dicts/lists/tuples of tensors, many of them views (slices, reshapes, other dtypes) of a
    few base storages, as optimizer and module state dicts are."""
    bases = [torch.randn(draw(st.integers(1, 64))).to(draw(dtypes)) for _ in range(draw(st.integers(1, 4)))]

    def tensor() -> torch.Tensor:
        b = draw(st.sampled_from(bases))
        n = b.numel()
        kind = draw(st.sampled_from(["whole", "slice", "step", "empty", "fresh"]))
        if kind == "whole":
            return b
        if kind == "slice":
            i = draw(st.integers(0, n - 1))
            return b[i:draw(st.integers(i, n))]
        if kind == "step":
            return b[::draw(st.integers(1, 3))]
        if kind == "empty":
            return b[:0]
        return torch.arange(draw(st.integers(0, 10)), dtype=torch.int64)

    leaves = st.one_of(st.builds(tensor), st.integers(), st.text(max_size=5), st.none(), st.floats(allow_nan=False))
    return draw(st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple)), max_leaves=20))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_generated_states_copy_to_the_same_bytes(state: Any) -> None:
    before = saved(state)
    snap = snap_of({"s": state})
    copy = snap.files[0][1]["s"]
    assert saved(copy) == before
    bump(state)
    assert saved(copy) == before


# ------------------------------------------------------------------------------------- the writer


def rank_write(path: Path, rank: int, world: int, commit: Any = None, bad: bool = False) -> RankWrite:
    """One rank's background part: its 'DeepSpeed file' (a captured state) and its RNG state."""
    target = (path / "missing-dir" if bad else path) / f"zero_pp_rank_{rank}_optim_states.pt"
    snap = snap_of({"rank": rank, "w": torch.full((8,), float(rank))}, path=str(target))
    return RankWrite(7, path, rank, world, snap, ck.rng_state(), True, HostBuffers(), threading.Lock(),
                     diskfull.WriteGuard(rank, "node0", 7), commit)


def test_rank_zero_commits_once_every_rank_has_recorded_its_files(tmp_path: Path) -> None:
    tag = tmp_path / ck.tag_for(7)
    tag.mkdir()
    committed: list[dict[str, Any]] = []

    def commit(records: list[dict[str, Any]]) -> None:
        committed.append(ck.write_manifest(tag, 7, {"consumed": 1}, known=known_files(records)))
        remove_records(tag, 2)

    r0 = rank_write(tag, 0, 2, commit).start()
    record = tag / ck.WRITTEN.format(rank=0)
    deadline = time.monotonic() + 60  # rank 0 records its files, then waits for rank 1 (busy machine: generous)
    while not record.exists() and time.monotonic() < deadline:
        r0.join(0.05)
    assert record.exists(), "rank 0 never recorded its files"
    assert not r0.join(0.3) and not committed  # rank 1 has not written yet: no manifest
    assert not (tag / ck.MANIFEST).exists()
    r1 = rank_write(tag, 1, 2).start()
    assert r1.join(30) and r0.join(30) and not r0.error and not r1.error
    files = committed[0].files
    assert sorted(files) == ["kit_rank_00000.pt", "kit_rank_00001.pt", "zero_pp_rank_0_optim_states.pt",
                             "zero_pp_rank_1_optim_states.pt"]
    assert all(files[f].sha256 == ck.sha256(tag / f) and (files[f].sha256, files[f].crc32) == ck.digests(tag / f)
               for f in files)  # each rank's own hashes are right
    assert not list(tag.glob(f"{ck.WRITTEN_PREFIX}*"))
    found, _ = ck.find_resume(tmp_path, hashes=True)
    assert found is not None and found.tag == ck.tag_for(7)


def test_a_rank_that_fails_to_write_stops_the_commit_and_says_why(tmp_path: Path) -> None:
    tag = tmp_path / ck.tag_for(7)
    tag.mkdir()
    commits: list[Any] = []
    r0 = rank_write(tag, 0, 2, commits.append).start()
    r1 = rank_write(tag, 1, 2, bad=True).start()
    assert r1.join(30) and r0.join(30)
    failure = r1.guard.failure
    assert failure is not None and "missing-dir" in failure.error and failure.rank == 1 and not failure.disk_full
    assert r0.error.startswith("rank 1: ") and r1.local_done.is_set()
    assert json.loads((tag / ck.WRITTEN.format(rank=1)).read_text())["error"] == failure.error
    assert not commits and not (tag / ck.MANIFEST).exists()


def test_rank_zero_gives_up_waiting_when_told_to(tmp_path: Path) -> None:
    tag = tmp_path / ck.tag_for(7)
    tag.mkdir()
    commits: list[Any] = []
    r0 = rank_write(tag, 0, 3, commits.append).start()
    assert not r0.join(0.2)
    r0.abort()
    assert r0.join(30) and "ranks [1, 2] never reported" in r0.error and not commits


@pytest.mark.parametrize("world", [1, 4])
def test_every_rank_returns_its_buffers(tmp_path: Path, world: int) -> None:
    tag = tmp_path / "t"
    tag.mkdir()
    writes = [rank_write(tag, r, world, (lambda recs: None) if r == 0 else None) for r in range(world)]
    held = [w.snap.nbytes for w in writes]
    for w in writes:
        w.start()
    assert all(w.join(30) for w in writes)
    assert [w.buffers.held_bytes() for w in writes] == held and all(h > 0 for h in held)

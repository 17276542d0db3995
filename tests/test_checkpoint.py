"""Checkpoint contract without DeepSpeed: manifest as commit point, scan/resume choice, retention."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kit import checkpoint as ck
from kit.errors import CheckpointError


def fake_ckpt(root: Path, step: int, complete: bool = True, world: int = 2) -> Path:
    """A folder shaped like a kit checkpoint (DeepSpeed files are opaque bytes to this layer)."""
    p = root / ck.tag_for(step)
    p.mkdir(parents=True)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"m" * (100 + step))
    (p / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
    if complete:
        ck.write_manifest(p, step, {"step": step, "consumed": step * 8, "world_size": world,
                                    "model": {"hidden_size": 64, "n_layer": 2, "n_head": 4}, "vocab_size": 512})
    return p


def test_manifest_is_the_commit_point(tmp_path: Path) -> None:
    fake_ckpt(tmp_path, 2)
    fake_ckpt(tmp_path, 4)
    fake_ckpt(tmp_path, 6, complete=False)  # a save killed before its manifest
    ckpt, notes = ck.find_resume(tmp_path)
    assert ckpt is not None and ckpt.step == 4 and ckpt.consumed == 32
    assert notes == ["step_0000006: incomplete (no MANIFEST.json), ignored"]


def test_corrupt_checkpoint_is_skipped_with_a_reason(tmp_path: Path) -> None:
    fake_ckpt(tmp_path, 2)
    p = fake_ckpt(tmp_path, 4)
    (p / "mp_rank_00_model_states.pt").write_bytes(b"short")  # truncated on a full filesystem
    ckpt, notes = ck.find_resume(tmp_path)
    assert ckpt is not None and ckpt.step == 2
    assert "step_0000004: corrupt" in notes[0] and "size" in notes[0]
    q = fake_ckpt(tmp_path, 8)
    (q / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 50)  # same size, other bytes
    assert ck.find_resume(tmp_path)[0].step == 8  # type: ignore[union-attr]  (sizes only by default)
    ckpt, notes = ck.find_resume(tmp_path, hashes=True)
    assert ckpt is not None and ckpt.step == 2 and "sha256 mismatch" in notes[0]


def test_before_step_for_rollbacks(tmp_path: Path) -> None:
    for s in (10, 20, 30):
        fake_ckpt(tmp_path, s)
    assert ck.find_resume(tmp_path, before_step=25)[0].step == 20  # type: ignore[union-attr]
    assert ck.find_resume(tmp_path, before_step=5)[0] is None


def test_prepare_tag_dir_clears_a_killed_save_but_never_a_complete_one(tmp_path: Path) -> None:
    p = fake_ckpt(tmp_path, 6, complete=False)
    ck.prepare_tag_dir(tmp_path, p.name)
    assert not p.exists()
    fake_ckpt(tmp_path, 8)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        ck.prepare_tag_dir(tmp_path, ck.tag_for(8))


def test_retention_keeps_last_k_every_n_pinned_and_busy(tmp_path: Path) -> None:
    for s in range(10, 110, 10):
        fake_ckpt(tmp_path, s)
    fake_ckpt(tmp_path, 55, complete=False)  # garbage from a killed save, older than the newest complete
    ck.pin(tmp_path, ck.tag_for(30), "spike at step 34")
    with ck.busy(tmp_path, ck.tag_for(20), "upload"):
        deleted, _ = ck.apply_retention(tmp_path, keep_last=2, keep_every=40)
    kept = sorted(c.step for c in ck.scan(tmp_path)[0])
    assert kept == [20, 30, 40, 80, 90, 100]
    assert ck.tag_for(55) in deleted and not (tmp_path / ck.tag_for(55)).exists()
    ck.unpin(tmp_path, ck.tag_for(30))
    ck.apply_retention(tmp_path, keep_last=2, keep_every=40)
    assert sorted(c.step for c in ck.scan(tmp_path)[0]) == [40, 80, 90, 100]


def test_compatibility_errors_say_what_to_do(tmp_path: Path) -> None:
    fake_ckpt(tmp_path, 2, world=4)
    c = ck.load(tmp_path, ck.tag_for(2))
    model = {"hidden_size": 64, "n_layer": 2, "n_head": 4}
    with pytest.raises(CheckpointError, match=r"written at layout DP4 \(4 ranks.*this segment runs DP2 \(2 ranks\)"
                                              r".*kit reshape RUN --tensor 1 --pipeline 1 --world-size 2"):
        ck.check_compatible(c, 2, model, 512)
    with pytest.raises(CheckpointError, match=r"different model \(model.hidden_size 64 != 128"):
        ck.check_compatible(c, 4, {**model, "hidden_size": 128}, 512)
    ck.check_compatible(c, 4, model, 512)


def test_unreadable_manifest(tmp_path: Path) -> None:
    p = fake_ckpt(tmp_path, 2)
    (p / ck.MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        ck.scan(tmp_path)


def test_busy_marker_of_a_killed_process_does_not_protect_forever(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    for s in (10, 20, 30):
        fake_ckpt(tmp_path, s)
    # A real uploader process marks step 10 busy, then is SIGKILLed (its `finally` never runs).
    code = ("import sys, time; from pathlib import Path; from kit import checkpoint as ck\n"
            "with ck.busy(Path(sys.argv[1]), ck.tag_for(10), 'upload'):\n"
            "    print('marked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "marked"
    assert ck.busy_tags(tmp_path) == {ck.tag_for(10)}  # alive: protected
    ck.apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert (tmp_path / ck.tag_for(10)).exists()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.busy_tags(tmp_path) == set()  # dead: the stale marker is cleared
    ck.apply_retention(tmp_path, keep_last=1, keep_every=0)
    assert not (tmp_path / ck.tag_for(10)).exists()
    # A marker from another host is kept: its process cannot be checked from here.
    (tmp_path / ck.BUSY / f"{ck.tag_for(30)}.stream.otherhost.1").write_text("stream")
    assert ck.busy_tags(tmp_path) == {ck.tag_for(30)}


def test_a_live_hold_keeps_a_bounded_number_of_unshipped_checkpoints(tmp_path: Path) -> None:
    """kit stream's lease (kit.checkpoint.hold): the trainer's retention keeps up to hold_max of the
    checkpoints after the holder's step (preferred multiples first, then the oldest), never more,
    and nothing once the lease has run out or the hold is released."""
    import json
    import time

    for s in (10, 20, 30, 40, 50, 60):
        fake_ckpt(tmp_path, s)
    complete = ck.scan(tmp_path)[0]

    def plan(hold_max: int) -> list[str]:
        return sorted(p.name for p in ck.retention_plan(tmp_path, 1, 0, hold_max)[0])

    assert plan(2) == [ck.tag_for(s) for s in (10, 20, 30, 40, 50)], "no hold: hold_max changes nothing"
    ck.hold(tmp_path, "stream", after_step=20, lease_s=60)
    assert ck.held(tmp_path, complete) == [ck.tag_for(s) for s in (30, 40, 50, 60)]
    assert plan(2) == [ck.tag_for(s) for s in (10, 20, 50)]  # 30 and 40 held (the oldest), 60 is keep_last
    assert plan(0) == [ck.tag_for(s) for s in (10, 20, 30, 40, 50)], "hold_max 0: the stream is ignored"
    ck.hold(tmp_path, "stream", after_step=20, lease_s=60, prefer_every=50)
    assert plan(2) == [ck.tag_for(s) for s in (10, 20, 40)]  # 50 (a remote keeper) first, then 30
    ck.hold(tmp_path, "stream", after_step=20, lease_s=-1)  # a killed stream's lease ran out
    assert ck.held(tmp_path, complete) == [] and plan(2) == [ck.tag_for(s) for s in (10, 20, 30, 40, 50)]
    ck.hold(tmp_path, "stream", after_step=20, lease_s=60)
    (tmp_path / ck.HOLDS / "junk.json").write_text("{not json")
    (tmp_path / ck.HOLDS / "old.json").write_text(json.dumps({"until": time.time() + 60}))  # no after_step
    assert plan(2) == [ck.tag_for(s) for s in (10, 20, 50)], "unreadable holds are ignored, the good one counts"
    ck.release(tmp_path, "stream")
    assert ck.held(tmp_path, complete) == []
    ck.release(tmp_path, "stream")  # twice is fine


# ------------------------------------------------------------- issue 14: typed manifest, one delete path

OLD_MANIFEST = {  # what the trainer wrote before the manifest was typed (a dict literal in kit/trainer.py)
    "version": 1, "tag": "step_0000040", "step": 40, "created": 1764300000.5,
    "files": {"mp_rank_00_model_states.pt": {"size": 140, "sha256": ""}},
    "kit": {"step": 40, "consumed": 320, "world_size": 2,
            "model": {"hidden_size": 64, "n_layer": 2, "n_head": 4, "seq_length": 32}, "vocab_size": 512,
            "zero_stage": 2, "precision": "fp32", "config_digest": "0123456789abcdef", "seg": "1234_0",
            "reason": "interval", "skips": [{"start": 200, "end": 224}], "spikes": {"loss": [], "seen": [0, 0]}},
}


def test_an_old_manifest_reads_typed_resumes_and_writes_back_the_same(tmp_path: Path) -> None:
    import hashlib
    import json

    p = tmp_path / "step_0000040"
    p.mkdir()
    (p / "mp_rank_00_model_states.pt").write_bytes(b"m" * 140)
    old = json.loads(json.dumps(OLD_MANIFEST))
    old["files"]["mp_rank_00_model_states.pt"]["sha256"] = hashlib.sha256(b"m" * 140).hexdigest()
    (p / ck.MANIFEST).write_text(json.dumps(old))
    c, notes = ck.find_resume(tmp_path, hashes=True)
    assert c is not None and notes == [] and (c.step, c.consumed, c.bytes) == (40, 320, 140)
    kit = c.manifest.kit
    assert (kit.world_size, kit.zero_stage, kit.precision, kit.universal) == (2, 2, "fp32", False)
    assert kit.extra == {"skips": [{"start": 200, "end": 224}], "spikes": {"loss": [], "seen": [0, 0]}}
    assert c.manifest.to_dict() == old  # the on-disk format is unchanged
    ck.check_compatible(c, 2, {"hidden_size": 64, "n_layer": 2, "n_head": 4}, 512)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(where=st.sampled_from([(), ("files",), ("kit",), ("step",), ("files", "mp_rank_00_model_states.pt"),
                              ("files", "mp_rank_00_model_states.pt", "size"), ("kit", "consumed"),
                              ("kit", "world_size"), ("kit", "model"), ("kit", "universal"), ("created",), ("tag",),
                              ("version",)]),
       value=_JSON)
def test_a_damaged_manifest_is_a_checkpoint_error_never_a_crash(tmp_path_factory: pytest.TempPathFactory,
                                                                 where: tuple[str, ...], value: object) -> None:
    """Any JSON value in any field: reading, scanning and resuming raise CheckpointError (with what to
    do) or read a manifest; never KeyError/TypeError deep inside a reader."""
    import copy
    import json

    root = tmp_path_factory.mktemp("damaged")
    p = root / "step_0000040"
    p.mkdir()
    m: object = copy.deepcopy(OLD_MANIFEST)
    if where:
        node: dict = m  # type: ignore[assignment]
        for k in where[:-1]:
            node = node[k]
        node[where[-1]] = value
    else:
        m = value
    (p / ck.MANIFEST).write_text(json.dumps(m))
    try:
        found, _ = ck.find_resume(root)
        if found is not None:
            assert isinstance(found.manifest, ck.Manifest) and found.step == 40
            _ = found.consumed
    except CheckpointError as e:
        assert "MANIFEST.json" in str(e) or "consumed" in str(e)


def test_the_newest_complete_checkpoint_is_never_deleted(tmp_path: Path) -> None:
    for s in (10, 20, 30):
        fake_ckpt(tmp_path, s)
    fake_ckpt(tmp_path, 40, complete=False)  # a save in progress is not the newest complete one
    with pytest.raises(ck.ProtectedCheckpoint, match="newest complete checkpoint"):
        ck.delete(tmp_path, ck.tag_for(30))
    for keep_last in (0, -1, -5):  # whatever a caller asks, retention keeps the newest
        assert ck.tag_for(30) not in {p.name for p in ck.retention_plan(tmp_path, keep_last, 0)[0]}
    deleted, _ = ck.apply_retention(tmp_path, keep_last=0, keep_every=0)
    assert deleted == [ck.tag_for(10), ck.tag_for(20)]
    assert [c.tag for c in ck.scan(tmp_path)[0]] == [ck.tag_for(30)]
    ck.delete(tmp_path, ck.tag_for(40))  # incomplete: deletable
    assert sorted(os.listdir(tmp_path)) == [ck.tag_for(30)]


def test_delete_removes_the_manifest_first(tmp_path: Path) -> None:
    """A delete that fails midway leaves an incomplete folder (resume ignores it), never one that looks
    complete with files missing. The failure is real: a filesystem mounted inside the checkpoint
    folder cannot be removed (EBUSY), as a busy or vanished network mount; needs root to mount."""
    import subprocess

    for s in (10, 20):
        fake_ckpt(tmp_path, s)
    p = tmp_path / ck.tag_for(10)
    mnt = p / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and CAP_SYS_ADMIN)")
    try:
        with pytest.raises(OSError):
            ck.delete(tmp_path, ck.tag_for(10))
        assert not (p / ck.MANIFEST).exists()
        complete, incomplete = ck.scan(tmp_path)
        assert [c.step for c in complete] == [20] and incomplete == [p]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_manifest_digests_are_sha256_and_crc32_of_the_bytes(tmp_path: Path) -> None:
    import hashlib
    import os
    import zlib

    folder = tmp_path / "step_0000001"
    folder.mkdir()
    blobs = {"empty.bin": b"", "small.bin": b"kit", "big.bin": os.urandom(ck.HASH_CHUNK * 2 + 12345)}
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    files = ck.write_manifest(folder, 1, {"consumed": 0}).files
    for name, data in blobs.items():
        assert files[name] == ck.FileEntry(len(data), hashlib.sha256(data).hexdigest(), f"{zlib.crc32(data):08x}")
        assert ck.crc32(folder / name) == files[name].crc32


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=3000), flip=st.integers(min_value=0), lists=st.sampled_from(["both", "sha256",
                                                                                             "crc32", "none"]))
def test_a_file_entry_matches_its_own_bytes_and_no_changed_byte(tmp_path_factory: pytest.TempPathFactory,
                                                                data: bytes, flip: int, lists: str) -> None:
    """FileEntry.matches (what kit upload checks a folder with): an entry with whichever digests its manifest
    lists (a checkpoint's sha256 and CRC-32, an export's CRC-32, an old export's sha256) matches the digests
    of its own bytes and not those of the same bytes with one bit flipped; one that lists none matches
    nothing (a damaged manifest)."""
    p = tmp_path_factory.mktemp("entry") / "f.bin"
    p.write_bytes(data)
    sha, crc = ck.digests(p)
    entry = ck.FileEntry(len(data), sha if lists in ("both", "sha256") else "",
                         crc if lists in ("both", "crc32") else "")
    assert entry.matches(sha, crc) == (lists != "none")
    if data:
        changed = bytearray(data)
        changed[flip % len(data)] ^= 1 << (flip % 8)
        p.write_bytes(bytes(changed))
        assert not entry.matches(*ck.digests(p))

"""`kit convert` on real ZeRO-1/2/3 checkpoints of the tiny model, made by real DeepSpeed ranks.

The exports are checked three ways: the converter's own logits check (recorded in the ledger), an
independent comparison of every tensor with DeepSpeed's zero_to_fp32, and transformers loading the
tokenizer offline. Bad inputs (incomplete, corrupt, missing shards, another model, a failed check)
must leave nothing at the destination.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, tiny_overrides

from kit import checkpoint as ck
from kit.errors import CheckpointError, KitError
from kit.ledger import LedgerWriter, read_all
from kit.rundir import RunDir
from kit.tools.cli import main as kit_main

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, RunDir]:
    """One tiny run per ZeRO stage, 4 steps, checkpoints at steps 2 and 4 (~15 s each)."""
    from kit.config import load_recipe
    from kit.launch import create_run, run_local_segment

    base = tmp_path_factory.mktemp("zero")
    runs = {}
    for stage in (1, 2, 3):
        cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(
            base, f"z{stage}", **{"deepspeed.zero_stage": stage, "trainer.max_steps": 4}))
        rd = create_run(cfg, log=lambda *a: None)
        out = run_local_segment(rd, cfg, quiet=True)
        assert out.reason == "done", out
        runs[stage] = rd
    return runs


def ds_reference(ckpt: ck.Checkpoint) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path.parent), tag=ckpt.tag)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_convert_each_zero_stage_bit_identical(zero_runs: dict[int, RunDir], stage: int, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    rd = zero_runs[stage]
    out = tmp_path / "hf"
    rc = kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out), "--shard-size", "100KB", "--json"])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3, files  # 0.5 MB of fp32 weights in 100 KB shards
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "model.safetensors.index.json", "MANIFEST.json"):
        assert name in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)

    # independent of the converter: every tensor equals DeepSpeed's own reconstruction
    ref = ds_reference(ck.load(rd.checkpoints, "step_0000004"))
    seen = set()
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert torch.equal(f.get_tensor(key), ref[key]), key
                seen.add(key)
    assert seen == set(ref) - {"lm_head.weight"}  # tied to the embeddings, as save_pretrained writes it

    verified = [e for e in read_all(rd.path, {"ckpt_verified"}) if e.get("where") == "export"]
    assert verified[-1]["ok"] and verified[-1]["bit_identical"] and verified[-1]["atol"] == 0.0
    assert verified[-1]["weights_identical"] and verified[-1]["differing_weights"] == []
    assert verified[-1]["reference"] == ("deepspeed zero_to_fp32" if stage == 3 else "engine module weights")
    # every tensor checked without reading the reference again: by the CRC-32s torch.save wrote for the module
    # (ZeRO-1/2), or against zero_to_fp32's tensors' own (ZeRO-3); the export's from its bytes as written
    way = "crc32" if stage == 3 else "saved_crc32"
    assert verified[-1]["weights_compared_by"] == {"saved_crc32": 0, "crc32": 0, "bytes": 0,
                                                   way: verified[-1]["weights_compared"]}
    converted = read_all(rd.path, {"ckpt_converted"})
    assert converted[-1]["tag"] == "step_0000004" and converted[-1]["shards"] == len(shards)
    # the manifest: every file's size and CRC-32 (the shards' taken as they were read back, written side by side)
    manifest = json.loads((out / ck.MANIFEST).read_text())
    assert manifest["version"] == 2 and manifest["files"] == {
        p.name: {"size": p.stat().st_size, "crc32": f"{zlib.crc32(p.read_bytes()):08x}"}
        for p in out.iterdir() if p.name != ck.MANIFEST}

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.eos_token_id == 2 and tok.pad_token_id == 3
    text = "Bonjour tout le monde"
    assert tok.decode(tok(text).input_ids) == text


def test_convert_bf16_from_fp32_training(zero_runs: dict[int, RunDir], tmp_path: Path) -> None:
    """bf16 export of an fp32 run: the reference is DeepSpeed's masters cast to bf16, still exact."""
    from kit.tools.convert import convert, pick_checkpoint

    rd = zero_runs[2]
    exp = convert(rd, pick_checkpoint(rd, 2), tmp_path / "bf16", "bf16", shard_bytes=100_000)
    assert exp.shards >= 3  # written side by side (write_weights' writers), each cast through its own buffers
    assert exp.verify["bit_identical"] and exp.verify["reference"] == "deepspeed zero_to_fp32"
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    assert exp.bytes == sum(ds_reference(ck.load(rd.checkpoints, "step_0000002"))[k].numel() * 2
                            for k in ds_reference(ck.load(rd.checkpoints, "step_0000002")) if k != "lm_head.weight")


def _copy_run(rd: RunDir, dst: Path) -> RunDir:
    shutil.copytree(rd.path, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return RunDir(dst)


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_bad_checkpoints_are_refused(zero_runs: dict[int, RunDir], tmp_path: Path) -> None:
    from kit.tools.convert import convert, pick_checkpoint

    rd = _copy_run(zero_runs[2], tmp_path / "run")
    out = tmp_path / "out" / "hf"
    out.parent.mkdir()
    step4 = rd.checkpoints / "step_0000004"
    step2 = rd.checkpoints / "step_0000002"

    # corrupt: one byte changed in a rank's optimizer file
    f = step4 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        pick_checkpoint(rd, 4)

    # missing shards: a rank's optimizer file gone, even with a manifest rewritten to match
    (step2 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (step2 / ck.MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        pick_checkpoint(rd, 2)  # incomplete: no manifest
    ck.write_manifest(step2, 2, ck.load(zero_runs[2].checkpoints, "step_0000002").manifest.kit)
    with pytest.raises(CheckpointError, match="shards are missing"):
        convert(rd, pick_checkpoint(rd, 2), out)
    _nothing_at(out)


def test_other_model_and_failed_check_leave_nothing(zero_runs: dict[int, RunDir], tmp_path: Path) -> None:
    from kit.tools.convert import convert, pick_checkpoint

    rd = _copy_run(zero_runs[1], tmp_path / "run")
    out = tmp_path / "out" / "hf"
    out.parent.mkdir()
    ckpt = pick_checkpoint(rd, 4)

    # the verification's tolerance cannot be met: the export must not appear
    with LedgerWriter(rd.path, "test") as led, pytest.raises(CheckpointError, match=r"does not reproduce.*weights are"
                                                                                     r" bit-identical"):
        convert(rd, ckpt, out, atol=-1.0, ledger=led)
    _nothing_at(out)
    failed = [e for e in read_all(rd.path, {"ckpt_verified"}) if e["src"] == "test"]
    assert failed and failed[-1]["ok"] is False

    # the run's recipe says another model than the checkpoint holds
    toml = rd.run_toml.read_text().replace("hidden_size = 64", "hidden_size = 96")
    assert toml != rd.run_toml.read_text()
    rd.run_toml.write_text(toml)
    with pytest.raises(CheckpointError, match="not of this run's model"):
        convert(rd, ckpt, out)
    _nothing_at(out)


def test_verification_names_a_wrong_weight(zero_runs: dict[int, RunDir], tmp_path: Path) -> None:
    """The check has teeth: one value changed in an export's shard is caught and named."""
    from safetensors.torch import load_file, save_file

    from kit.tools.convert import convert, pick_checkpoint
    from kit.tools.verify_export import verify_export

    rd = zero_runs[2]
    ckpt = pick_checkpoint(rd, 4)
    out = tmp_path / "hf"
    exp = convert(rd, ckpt, out)
    assert exp.verify["ok"] and exp.verify["weights_identical"]
    shard = out / "model.safetensors"
    tensors = load_file(str(shard))
    name = "transformer.h.1.mlp.dense_4h_to_h.weight"
    tensors[name][3, 5] += 1e-3
    save_file(tensors, str(shard), metadata={"format": "pt"})
    result = verify_export(rd, rd.load_config(), ckpt, out, "fp32")
    assert not result["ok"] and result["max_abs_diff"] > 0
    assert not result["weights_identical"] and result["differing_weights"] == [name]


@pytest.mark.parametrize("shard", ["2GB", "40KB"])
def test_a_full_destination_is_one_clear_error_and_leaves_nothing(zero_runs: dict[int, RunDir], full_fs: Path,
                                                                   capsys: Any, shard: str) -> None:
    """0.5 MB of weights onto a real 64 KiB filesystem: one red line that says the disk is full, and no
    partial folder left behind (kit upload's full-destination path is tested in test_upload.py). In one
    shard, and in 40 KB shards written side by side: the writer that meets the full disk stops the others
    and its error is the one told."""
    rd = zero_runs[2]
    out = full_fs / "hf"
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out), "--shard-size", shard]) == 1
    err = capsys.readouterr().err
    assert "is full; free space or choose another --out" in err and "Traceback" not in err
    assert list(full_fs.iterdir()) == []


def test_cli_errors_are_one_line(zero_runs: dict[int, RunDir], tmp_path: Path, capsys: Any) -> None:
    rd = zero_runs[2]
    assert kit_main(["convert", str(rd.path), "--step", "3", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "no checkpoint at step 3" in err and "Traceback" not in err
    with pytest.raises(KitError, match="already exists"):
        from kit.tools.convert import convert, pick_checkpoint

        (tmp_path / "exists").mkdir()
        convert(rd, pick_checkpoint(rd, 4), tmp_path / "exists")


def test_reshape_resumes_on_another_world_size(zero_runs: dict[int, RunDir], tmp_path: Path) -> None:
    """`kit reshape` to 1 rank (DeepSpeed universal checkpoint), then a real 1-rank segment resumes it."""
    from kit.amend import amend
    from kit.config import load_recipe
    from kit.launch import create_run, run_local_segment

    src = zero_runs[2]
    rd = _copy_run(src, tmp_path / "z2")
    assert kit_main(["reshape", str(rd.path), "--world-size", "1"]) == 0
    ckpt = ck.load(rd.checkpoints, "step_0000004")
    assert ckpt.manifest.kit.world_size == 1 and ckpt.manifest.kit.universal is True
    assert (rd.checkpoints / "step_0000004.dp2" / ck.MANIFEST).exists()  # the original is kept, not scanned
    assert [c.tag for c in ck.scan(rd.checkpoints)[0]] == ["step_0000002", "step_0000004"]
    assert read_all(rd.path, {"ckpt_reshaped"})[-1]["world_size"] == 1

    cfg = load_recipe(ROOT / "jobs" / "tiny.toml", tiny_overrides(
        tmp_path, "z2", **{"deepspeed.zero_stage": 2, "trainer.max_steps": 6, "trainer.nproc": 1,
                           "batch.grad_accum": 4}))  # reshape kept the global batch: 2 x 2 x 2 ranks = 2 x 4 x 1
    amend(RunDir(cfg.run_dir), cfg, who="test: more steps after the reshape", log=lambda m: None)
    rd = create_run(cfg, log=lambda *a: None)
    out = run_local_segment(rd, cfg, seg="one-rank", quiet=True)
    assert (out.reason, out.step) == ("done", 6)
    loaded = [e for e in read_all(rd.path, {"ckpt_loaded"}) if e.get("seg") == "one-rank"]
    assert loaded and loaded[-1]["tag"] == "step_0000004"
    # what DeepSpeed loaded is the original's state: the universal fp32 weights are the 2-rank ones exactly,
    # and the LR schedule went on from step 4 (a fresh scheduler would start the warm-up again)
    from kit.engine import lr_lambda
    from kit.tools.zero_reader import ZeroCheckpoint

    orig = ZeroCheckpoint(rd.checkpoints / "step_0000004.dp2")
    with orig.open() as parts:
        for spec in orig.params:
            uni = torch.load(rd.checkpoints / "step_0000004" / "zero" / spec.name / "fp32.pt", weights_only=False)
            uni = uni["param"] if isinstance(uni, dict) else uni
            assert torch.equal(uni.view(spec.shape), orig.tensor(parts, spec)), spec.name
    lr5 = [e["lr"] for e in read_all(rd.path, {"step"}) if e.get("seg") == "one-rank" and e["step"] == 5]
    trained = src.load_config()  # the schedule the checkpoint was written under (4 steps)
    assert lr5 == [pytest.approx(cfg.optim.lr * lr_lambda(trained)(4))]
    assert lr_lambda(trained)(4) != lr_lambda(cfg)(0)


def test_fallback_paths_give_the_same_bytes(zero_runs: dict[int, RunDir], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Where sendfile is refused, or the weights' places in the optimizer file cannot be found, the
    converter copies through a buffer / reads through the memory map: the shards must not change."""
    from kit.tools import convert as conv
    from kit.tools.zero_reader import ZeroCheckpoint

    rd = zero_runs[2]
    shard = 100_000  # several shards: written side by side where the extents are known, one by one when mapped
    fast = conv.convert(rd, conv.pick_checkpoint(rd, 2), tmp_path / "fast", "fp32", shard, check_source=True)
    monkeypatch.setattr(conv._ShardFile, "kernel_copy", False)
    buffered = conv.convert(rd, conv.pick_checkpoint(rd, 2), tmp_path / "buffered", "fp32", shard,
                            check_source=True)
    monkeypatch.setattr(ZeroCheckpoint, "file_extents", lambda self: None)
    # no extents: the record check cannot follow the reads; every optimizer file is checked whole instead
    ckpt = conv.pick_checkpoint(rd, 2)
    whole = conv.verify_source
    checked: list[list[Path]] = []

    def verify_source(ckpt: ck.Checkpoint, only: list[Path] | None = None) -> list[str]:
        checked.append(only or [])
        return whole(ckpt, only=only)

    monkeypatch.setattr(conv, "verify_source", verify_source)
    mapped = conv.convert(rd, ckpt, tmp_path / "mapped", "fp32", shard, check_source=True)
    optim = sorted(f.name for f in (rd.checkpoints / "step_0000002").glob("*_optim_states.pt"))
    assert len(optim) == 2 and [sorted(p.name for p in c) for c in checked] == [optim]
    assert fast.verify["bit_identical"] and buffered.verify["bit_identical"] and mapped.verify["bit_identical"]
    shards = sorted(p.name for p in (tmp_path / "fast").glob("*.safetensors"))
    assert len(shards) >= 3
    for name in shards:
        data = (tmp_path / "fast" / name).read_bytes()
        assert (tmp_path / "buffered" / name).read_bytes() == data
        assert (tmp_path / "mapped" / name).read_bytes() == data


def test_any_changed_byte_of_the_source_is_caught(zero_runs: dict[int, RunDir], tmp_path: Path,
                                                  capsys: Any) -> None:
    """The full check (pick_checkpoint's, `kit convert --full-check`) covers every source byte (CRC-32 from
    the manifest, or sha256 where an older manifest has none): one byte changed anywhere in any file (the
    fp32 masters, the Adam moments, the module, a rank's RNG state, the pickles' own structure) is refused,
    and nothing is written."""
    import random

    from kit.tools.convert import pick_checkpoint

    rng = random.Random(16)
    for stage in (2, 3):
        rd = _copy_run(zero_runs[stage], tmp_path / f"run{stage}")
        step4 = rd.checkpoints / "step_0000004"
        manifest = ck.read_manifest(step4)
        assert manifest is not None and all(f.crc32 for f in manifest.files.values())
        for rel in sorted(manifest.files):
            f = step4 / rel
            data = bytearray(f.read_bytes())
            for where in (0, len(data) - 1, rng.randrange(len(data))):
                bit = 1 << rng.randrange(8)
                data[where] ^= bit
                f.write_bytes(bytes(data))
                with pytest.raises(CheckpointError, match=rf"corrupt \({rel}: crc32 mismatch"):
                    pick_checkpoint(rd, 4)
                data[where] ^= bit  # put it back before the next one
            f.write_bytes(bytes(data))
        assert pick_checkpoint(rd, 4).tag == "step_0000004"  # restored: accepted again
        # --full-check: the command checks every byte while it converts (other threads): refused all the same,
        # nothing written (the default checks only what it reads: test_the_default_check_*)
        rel = max(manifest.files, key=lambda r: manifest.files[r].size)
        data = bytearray((step4 / rel).read_bytes())
        data[len(data) // 2] ^= 0x04
        (step4 / rel).write_bytes(bytes(data))
        out = tmp_path / f"out{stage}" / "hf"
        out.parent.mkdir()
        capsys.readouterr()
        assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out), "--full-check"]) == 1
        err = capsys.readouterr().err
        assert f"is corrupt ({rel}: crc32 mismatch" in err and "Traceback" not in err
        _nothing_at(out)
        data[len(data) // 2] ^= 0x04
        (step4 / rel).write_bytes(bytes(data))
        # a manifest without CRC-32 (saved by an older kit): the same byte is caught by sha256
        raw = manifest.to_dict()
        for info in raw["files"].values():
            del info["crc32"]
        (step4 / ck.MANIFEST).write_text(json.dumps(raw))
        rel = next(r for r in manifest.files if "optim_states" in r)
        data = bytearray((step4 / rel).read_bytes())
        data[len(data) // 3] ^= 0x10
        (step4 / rel).write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rf"corrupt \({rel}: sha256 mismatch"):
            pick_checkpoint(rd, 4)


def test_weights_outside_the_logits_sample_are_checked_too(zero_runs: dict[int, RunDir], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The logits check runs the first blocks only; a changed weight in a later block is still found (every
    tensor is compared), at ZeRO-2 (the engine's module as reference) and ZeRO-3 (zero_to_fp32's)."""
    from safetensors.torch import load_file, save_file

    import kit.tools.verify_export as ve
    from kit.tools.convert import convert, pick_checkpoint

    monkeypatch.setattr(ve, "SAMPLE_LAYERS", 1)  # the tiny model has 2 blocks: sample only the first
    for stage in (2, 3):
        rd = zero_runs[stage]
        ckpt = pick_checkpoint(rd, 4)
        out = tmp_path / f"hf{stage}"
        exp = convert(rd, ckpt, out)
        assert exp.verify["ok"] and exp.verify["logits_layers"] == 1 and exp.verify["weights_compared"] > 10
        shard = out / "model.safetensors"
        tensors = load_file(str(shard))
        name = "transformer.h.1.self_attention.dense.bias"
        tensors[name][7] += 1e-3
        save_file(tensors, str(shard), metadata={"format": "pt"})
        result = ve.verify_export(rd, rd.load_config(), ckpt, out, "fp32")
        assert result["bit_identical"] and result["max_abs_diff"] == 0  # the sampled block's logits agree...
        assert not result["ok"] and result["differing_weights"] == [name]  # ...the weights do not


def _records_read(step: Path, rank: int) -> tuple[Path, Any, Any]:
    """A rank's optimizer file, the zip record of its fp32 partition (what the export is made of) and that
    of its Adam first moment (which no export reads)."""
    from kit.tools.source_check import records
    from kit.tools.zero_reader import ZeroCheckpoint

    reader = ZeroCheckpoint(step)
    f = reader.optim_files[rank]
    extents = reader.file_extents()
    assert extents is not None
    recs = records(f)
    fp32 = next(r for r in recs if r.start <= extents[rank][0][0] < r.start + r.size)

    def exp_avg(obj: Any) -> Any:  # the first Adam moment, wherever the stage's optimizer state keeps it
        if isinstance(obj, dict):
            if isinstance(obj.get("exp_avg"), torch.Tensor):
                return obj["exp_avg"]
            obj = list(obj.values())
        if isinstance(obj, list | tuple):
            return next((t for t in map(exp_avg, obj) if t is not None), None)
        return None

    off = exp_avg(torch.load(f, map_location="meta", weights_only=False)).untyped_storage()._checkpoint_offset
    moment = next(r for r in recs if r.start == off)
    assert fp32 != moment
    return f, fp32, moment


def _flip(f: Path, where: int) -> None:
    with open(f, "r+b") as fh:
        fh.seek(where)
        b = fh.read(1)[0]
        fh.seek(where)
        fh.write(bytes([b ^ 0x20]))


@pytest.mark.parametrize("stage", [2, 3])
def test_the_default_check_refuses_a_changed_weight(zero_runs: dict[int, RunDir], stage: int, tmp_path: Path,
                                                    capsys: Any) -> None:
    """`kit convert` (default check: the records it reads, against torch.save's CRC-32s, as it reads them):
    one byte changed inside a rank's fp32 partition is refused, naming the file and the record, and no
    export appears (the staging folder is removed, never renamed into place), whether the bytes are
    copied by the kernel (fp32) or read and cast (bf16). Also a byte changed in the pickle (refused
    before anything is unpickled)."""
    rd = _copy_run(zero_runs[stage], tmp_path / "run")
    step4 = rd.checkpoints / "step_0000004"
    f, fp32, _ = _records_read(step4, 1)
    _flip(f, fp32.start + fp32.size // 2)
    out = tmp_path / "out" / "hf"
    out.parent.mkdir()
    capsys.readouterr()
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"is corrupt ({f.name}: record {fp32.name} (fp32 weights the export is made of): crc32 mismatch" in err
    assert "Traceback" not in err
    _nothing_at(out)
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out), "--dtype", "bf16"]) == 1
    assert f"({f.name}: record {fp32.name} (fp32 weights" in capsys.readouterr().err  # read and cast: the same
    _nothing_at(out)
    _flip(f, fp32.start + fp32.size // 2)  # put back: converts again
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out), "--no-verify"]) == 0
    shutil.rmtree(out)

    from kit.tools.source_check import records

    pkl = next(r for r in records(f) if r.name.endswith("data.pkl"))
    _flip(f, pkl.start + pkl.size - 3)
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"is corrupt ({f.name}: record {pkl.name}: crc32 mismatch" in err and "Traceback" not in err
    _nothing_at(out)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_a_bad_copy_is_refused_and_told_from_a_damaged_checkpoint(zero_runs: dict[int, RunDir], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 kernel_copy: bool) -> None:
    """The fp32 partitions' CRC-32s are taken from the export's bytes as written (one read for the manifest's
    sha256, the source check and the verification): a byte that goes wrong in the copy (after it left the
    intact checkpoint) is refused, said to be the copy's fault, not the checkpoint's, and no export appears.
    The corruption is injected into the written file before the hashing thread can read it (the test's
    stand-in for failing memory or disk; the kernel's copy cannot be made to fail here)."""
    import os

    import kit.tools.convert as conv
    from kit.tools.convert import convert, pick_checkpoint

    rd = zero_runs[2]
    monkeypatch.setattr(conv._ShardFile, "kernel_copy", kernel_copy)
    sendfile, calls = conv._ShardFile.sendfile, []

    def bad_copy(self: Any, in_fd: int, offset: int, count: int, source: int = -1) -> None:
        calls.append(count)
        if len(calls) != 5:
            return sendfile(self, in_fd, offset, count, source)
        at = self.written + count // 2
        advance = self._advance
        self._advance = lambda n: None  # hold the bytes back from the hashing thread until they are damaged
        try:
            sendfile(self, in_fd, offset, count, source)
        finally:
            self._advance = advance
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0x04]), at)
        finally:
            os.close(fd)
        self._advance(count)

    monkeypatch.setattr(conv._ShardFile, "sendfile", bad_copy)
    out = tmp_path / "hf"
    with pytest.raises(CheckpointError, match="differs from the checkpoint's bytes, which are intact: the copy "
                                              "went wrong"):
        convert(rd, pick_checkpoint(rd, 4), out, check_source=True)
    assert len(calls) > 5
    _nothing_at(out)


def test_the_default_check_leaves_adam_moments_to_the_full_check(zero_runs: dict[int, RunDir], tmp_path: Path,
                                                                 capsys: Any) -> None:
    """A byte changed in an Adam moment's record is NOT refused by the default check, by design: no export
    byte comes from it (the export is the fp32 partitions), the export is bit-identical to the intact
    checkpoint's and verified, and checking the moments was 3/4 of the source's bytes (most of the
    command's time, bench/convert.py). `kit convert --full-check` (every byte against the manifest)
    refuses it, and `kit verify` would."""
    from safetensors.torch import load_file

    rd = _copy_run(zero_runs[2], tmp_path / "run")
    step4 = rd.checkpoints / "step_0000004"
    f, _, moment = _records_read(step4, 0)
    intact = tmp_path / "intact"
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(intact)]) == 0
    _flip(f, moment.start + moment.size // 3)
    out = tmp_path / "out"
    capsys.readouterr()
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verify"]["ok"]
    assert json.loads((out / ck.MANIFEST).read_text())["export"]["source_check"] == "records"
    got, want = load_file(str(out / "model.safetensors")), load_file(str(intact / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    full = tmp_path / "full"
    assert kit_main(["convert", str(rd.path), "--step", "4", "--out", str(full), "--full-check"]) == 1
    err = capsys.readouterr().err
    assert f"is corrupt ({f.relative_to(step4)}: crc32 mismatch" in err and "Traceback" not in err
    _nothing_at(full)


def test_the_exports_crc32s_guard_it_until_upload_which_takes_its_sha256(zero_runs: dict[int, RunDir],
                                                                         tmp_path: Path, capsys: Any) -> None:
    """The export's manifest lists CRC-32s, not sha256 (tools.convert._ShardFile.digest says why): `kit verify`
    checks them, a byte changed in a shard after the conversion is named and `kit upload` refuses to send
    it; a clean export uploads with each file's sha256, taken as the upload read it, in KIT_UPLOAD.json."""
    import hashlib

    from kit.errors import KitError as Refused
    from kit.tools.upload import upload_folder

    rd = zero_runs[1]
    out = tmp_path / "hf"
    assert kit_main(["convert", str(rd.path), "--step", "2", "--out", str(out), "--shard-size", "100KB",
                     "--json"]) == 0
    capsys.readouterr()
    assert kit_main(["verify", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    up = upload_folder(out, f"file://{tmp_path}/remote")
    sent = json.loads((tmp_path / "remote" / "KIT_UPLOAD.json").read_text())["files"]
    assert up.sent == len(sent) and {rel: info["sha256"] for rel, info in sent.items()} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}

    shard = sorted(out.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # a weight's byte, the size unchanged
    shard.write_bytes(bytes(data))
    assert kit_main(["verify", str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"] == [f"{shard.name}: crc32 mismatch"]
    with pytest.raises(Refused, match=rf"does not match its MANIFEST.json \({shard.name}\): it is corrupt"):
        upload_folder(out, f"file://{tmp_path}/remote2")
    assert not (tmp_path / "remote2" / "KIT_UPLOAD.json").exists()


def test_zero3_reference_crcs_without_the_copy_equal_deepspeeds_tensors(zero_runs: dict[int, RunDir],
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeRO-3's weights' check takes each zero_to_fp32 tensor's CRC-32 where its chunks lie (gathered_crc)
    instead of from the copy DeepSpeed's contiguous() makes: for every tensor of a real ZeRO-3 checkpoint
    the two are the same CRC-32; and where it cannot (another DeepSpeed's tensors), the copy is CRC'd as
    before and the export still verifies."""
    from kit.tools import verify_export as ve
    from kit.tools.convert import convert, pick_checkpoint

    rd = zero_runs[3]
    ckpt = pick_checkpoint(rd, 4)
    ref = ve.Reference(ckpt, torch.float32, rd.load_config())
    assert ref.lazy and ref.kind == "deepspeed zero_to_fp32"
    for name, t in ref.lazy.items():
        assert ve.gathered_crc(t) == ve.tensor_crc(t.contiguous()), name
    monkeypatch.setattr(ve, "gathered_crc", lambda t: None)
    exp = convert(rd, ckpt, tmp_path / "hf", "fp32", check_source=True)
    assert exp.verify["ok"] and exp.verify["weights_compared_by"]["crc32"] == exp.verify["weights_compared"]

"""Tensor x pipeline x data parallel training on real DeepSpeed ranks (gloo, CPU), through `kit train`'s
launcher (torchrun + kit.segment), against the plain data-parallel run of the same global batch and seed.

One module fixture trains each layout once (shared by the tests that read it): plain DP4, TP2xDP2,
PP2xDP2 (4 ranks) and TP2xPP2xDP2 (8 ranks), 20 steps each at global batch 8 (micro 2 x grad_accum x
data), ZeRO-1, no dropout (tensor and pipeline ranks draw dropout masks of other shapes, so only the
dropout-free arithmetic can be compared), checkpoints every 4 steps. Each layout's run is itself the
kill-during-save scenario: its first segment is killed while the step-8 checkpoint is being written,
its second resumes from step 4 and trains on to step 20 (one run serves both proofs: the resumed run
must replay steps 5-8 bit for bit and still match the plain run). The layouts' runs stop at step 20
of a 24-step schedule (a simulated allocation boundary) so the reshape test can go on from there; the
plain run goes to 24.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, tiny_overrides

from kit import checkpoint as ck
from kit import faults
from kit.config import RunConfig, load_recipe
from kit.data import prepare
from kit.launch import SegmentOutcome, create_run, run_local_segment
from kit.ledger import read_all
from kit.parallel.layout import Layout
from kit.rundir import RunDir

pytestmark = [pytest.mark.deepspeed, pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ok")]

LAYOUTS = {"tp2": (2, 1, 4), "pp2": (1, 2, 4), "tp2pp2": (2, 2, 8)}  # name: tensor, pipeline, ranks
TOL = 1e-5  # the bound on |loss - plain loss|; measured: <= 4e-7 (docs/parallel.md)
STEPS, MAX_STEPS = 20, 24


def layout_cfg(base: Path, name: str, tensor: int, pipeline: int, nproc: int, **extra: Any) -> RunConfig:
    data = nproc // (tensor * pipeline)
    o = tiny_overrides(base / "runs", name, **{
        "parallel.tensor": tensor, "parallel.pipeline": pipeline, "trainer.nproc": nproc, "slurm.tasks_per_node": nproc,
        "batch.micro_batch_size": 2, "batch.grad_accum": 8 // (2 * data), "deepspeed.zero_stage": 1,
        "model.hidden_dropout": 0.0, "trainer.max_steps": MAX_STEPS, "checkpoint.interval_steps": 4,
        "data.prepared": str(base / "data"), **extra})
    return load_recipe(ROOT / "jobs" / "tiny.toml", o)


def train(cfg: RunConfig, seg: str, stop_after: int = 0, faults: str = "") -> tuple[RunDir, SegmentOutcome]:
    rd = create_run(cfg, log=lambda m: None)
    env = {"KIT_FAULTS": faults} if faults else {}
    return rd, run_local_segment(rd, cfg, stop_after_steps=stop_after, seg=seg, extra_env=env, quiet=True)


def metric(rd: RunDir, key: str = "loss") -> dict[int, float]:
    """Per step; for a step replayed after a resume, the latest event wins (the ledger rule)."""
    return {e["step"]: e[key] for e in read_all(rd.path, {"step"})}


def max_delta(a: dict[int, float], b: dict[int, float]) -> float:
    steps = sorted(set(a) & set(b))
    assert steps, "no common steps"
    return max(abs(a[s] - b[s]) for s in steps)


KILL = "ckpt.before_manifest"  # the fault point: the ranks' files are written, the manifest is not


def killed_during_save_then_resumed(cfg: RunConfig, gate: Path, written: Path) -> tuple[RunDir, dict[str, Any]]:
    """Segment "a": the step-8 save stops at its fault point (every rank's files written, no manifest),
    the test copies the step-8 folder aside (the uninterrupted run's step 8, whole), then SIGKILLs rank 0
    there. Segment "b" resumes and trains to step 20. Returns the run and what was seen after the kill."""
    from tests.test_chain_local import rank_pid

    rd = create_run(cfg, log=lambda m: None)
    env = {"KIT_FAULTS": f"{KILL}@8=wait", "KIT_FAULTS_GATE": str(gate)}
    seen: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: seen.update(
        a=run_local_segment(rd, cfg, seg="a", extra_env=env, quiet=True)))
    runner.start()
    try:
        # the event, with a generous bound: with checkpoint.async_save (the default) rank 0's writer reaches
        # the point once every rank's files are durable; a synchronous save passes it on every rank
        want = list(range(cfg.trainer.nproc)) if not cfg.checkpoint.async_save else [0]
        end = time.monotonic() + 900
        while faults.reached(gate, KILL, 8)[:len(want)] != want:
            assert runner.is_alive() and time.monotonic() < end, ("not every rank reached the step-8 save", seen)
            time.sleep(0.2)
        shutil.copytree(rd.checkpoints / "step_0000008", written)
        os.kill(rank_pid(rd.path, 0), signal.SIGKILL)
    finally:
        faults.release(gate, KILL, 8)  # the other ranks go on into the save's collective and fail there
        runner.join(timeout=600)
    assert not runner.is_alive(), "segment a did not end after its rank 0 was killed"
    seen["latest"] = (rd.checkpoints / "latest").read_text()
    seen["manifest8"] = (rd.checkpoints / "step_0000008" / ck.MANIFEST).exists()
    seen["b"] = run_local_segment(rd, cfg, stop_after_steps=STEPS - 4, seg="b", quiet=True)
    return rd, seen


@pytest.fixture(scope="module")
def killed() -> dict[str, dict[str, Any]]:
    """What each layout's first segment left (filled by ``runs``)."""
    return {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, killed: dict[str, dict[str, Any]]) -> dict[str, RunDir]:
    base = tmp_path_factory.mktemp("parallel")
    plain = layout_cfg(base, "plain", 1, 1, 4)
    prepare(plain, base / "data", log=lambda m: None)
    out: dict[str, RunDir] = {}
    rd, o = train(plain, "plain")
    assert (o.reason, o.step) == ("done", MAX_STEPS), o
    out["plain"] = rd
    for name, (t, p, n) in LAYOUTS.items():
        rd, seen = killed_during_save_then_resumed(layout_cfg(base, name, t, p, n), base / f"gate-{name}",
                                                   base / f"{name}-step8-written")
        assert (seen["b"].reason, seen["b"].step) == ("segment_limit", STEPS), (name, seen)
        out[name] = rd
        killed[name] = {**seen, "written": base / f"{name}-step8-written"}
    out["base"] = RunDir(base)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_plain_data_parallel(runs: dict[str, RunDir], name: str) -> None:
    """20 steps at the layout == 20 steps of plain DP (loss and grad norm within 1e-5), with the layout
    recorded where the tools look for it (segment_started, every manifest)."""
    rd, plain = runs[name], runs["plain"]
    loss, ref = metric(rd), metric(plain)
    assert sorted(loss) == list(range(1, STEPS + 1))
    print(f"{name}: max |loss - plain| {max_delta(loss, ref):.3g}, max |grad norm - plain| "
          f"{max_delta(metric(rd, 'grad_norm'), metric(plain, 'grad_norm')):.3g} over {STEPS} steps")
    assert max_delta(loss, ref) <= TOL, f"{name}: max |loss delta| {max_delta(loss, ref):.3g} > {TOL}"
    assert max_delta(metric(rd, "grad_norm"), metric(plain, "grad_norm")) <= TOL
    assert metric(rd, "tokens") == {s: 8 * 32 for s in range(1, STEPS + 1)}  # the same global batch
    t, p, n = LAYOUTS[name]
    layout = Layout.of(t, p, n)
    started = read_all(rd.path, {"segment_started"})[-1]
    assert started["layout"] == layout.to_dict() and started["world_size"] == n
    for c in ck.scan(rd.checkpoints)[0]:
        assert ck.layout_of(c) == layout and c.manifest.kit.world_size == n


def test_wrong_alibi_fails_the_comparison(runs: dict[str, RunDir]) -> None:
    """The guard can fail: TP2xDP2 with every rank using the first heads' alibi slopes (the silent error
    of DeepSpeed's `bloom` preset) trains without an error but misses the plain run by more than 1e-5
    within 4 steps (measured: ~5e-5 after 3, ~8e-3 after 10)."""
    cfg = layout_cfg(runs["base"].path, "wrong", 2, 1, 4)
    rd, out = train(cfg, "wrong", stop_after=4, faults="alibi.wrong")
    assert (out.reason, out.step) == ("segment_limit", 4)
    print(f"wrong alibi: max |loss - plain| {max_delta(metric(rd), metric(runs['plain'])):.3g} over 4 steps")
    assert max_delta(metric(rd), metric(runs["plain"])) > TOL


def test_activation_checkpointing_in_pipeline_stages(runs: dict[str, RunDir]) -> None:
    """model.activation_checkpointing at PP2xDP2 recomputes the stages' blocks (not the embedding, whose
    token ids carry no gradient) and trains the plain run's numbers."""
    cfg = layout_cfg(runs["base"].path, "recompute", 1, 2, 4, **{"model.activation_checkpointing": True})
    rd, out = train(cfg, "recompute", stop_after=4)
    assert (out.reason, out.step) == ("segment_limit", 4)
    assert max_delta(metric(rd), metric(runs["plain"])) <= TOL


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside a loaded checkpoint file, by its path in the structure."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def same_checkpoint_tensors(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.glob("*_states.pt"))
    assert files and files == sorted(p.name for p in b.glob("*_states.pt"))
    for f in files:
        ta = tensors(torch.load(a / f, map_location="cpu", weights_only=False))
        tb = tensors(torch.load(b / f, map_location="cpu", weights_only=False))
        assert ta.keys() == tb.keys(), f
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differ, f"{f}: {differ[:3]}"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_kill_during_save_then_bit_exact_resume(runs: dict[str, RunDir], killed: dict[str, dict[str, Any]],
                                                name: str) -> None:
    """Rank 0 is SIGKILLed while the step-8 checkpoint is being written (DeepSpeed's files are there,
    the manifest is not): step 4 stays `latest`; the next segment resumes from it and replays steps
    5-8 (and any step the first segment went on to) bit for bit: the same losses as before the kill,
    and the same step-8 checkpoint tensors as the files written for step 8 before the kill (copied
    aside at the fault point)."""
    rd, seen = runs[name], killed[name]
    assert seen["a"].reason == "crashed", seen
    assert seen["latest"] == "step_0000004" and not seen["manifest8"], "step 8 never completed"
    loaded = [e for e in read_all(rd.path, {"ckpt_loaded"}) if e.get("seg") == "b"]
    assert [e["tag"] for e in loaded] == ["step_0000004"]
    assert "step_0000008: incomplete (no MANIFEST.json), ignored" in loaded[0]["skipped"]
    steps = read_all(rd.path, {"step"})
    before = {e["step"]: e["loss"] for e in steps if e.get("seg") == "a"}
    after = {e["step"]: e["loss"] for e in steps if e.get("seg") == "b"}
    # with an asynchronous save the loop went on past step 8 while the save was held: those steps count too
    assert set(range(1, 9)) <= set(before) and sorted(after) == list(range(5, STEPS + 1))
    replayed = sorted(set(before) & set(after))
    assert all(after[s] == before[s] for s in replayed), {s: (after[s], before[s]) for s in replayed}
    same_checkpoint_tensors(rd.checkpoints / "step_0000008", seen["written"])


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=torch.randint(4, 512, (2, 32), generator=g)).logits
    return out


@pytest.fixture(scope="module")
def plain_export(runs: dict[str, RunDir], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kit.tools.convert import convert, pick_checkpoint

    out = tmp_path_factory.mktemp("exports") / "plain"
    convert(runs["plain"], pick_checkpoint(runs["plain"], STEPS), out)
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_convert_gives_the_plain_runs_model(runs: dict[str, RunDir], plain_export: Path, name: str,
                                            tmp_path: Path) -> None:
    """`kit convert` merges the layout's tensor and pipeline shards into one BloomForCausalLM: bit-identical
    to the run's own module weights and logits (the converter's check), and the plain run's model to
    rounding (weights and logits within 1e-4 after 20 steps of training apart)."""
    from kit.tools.cli import main as kit_main

    rd = runs[name]
    out = tmp_path / "hf"
    assert kit_main(["convert", str(rd.path), "--step", str(STEPS), "--out", str(out), "--shard-size", "60KB"]) == 0
    check = read_all(rd.path, {"ckpt_verified"})[-1]
    assert check["ok"] and check["bit_identical"] and check["weights_identical"], check
    assert "shards merged" in check["reference"]
    got, want = hf_weights(out), hf_weights(plain_export)
    assert got.keys() == want.keys()
    assert max(float((got[k] - want[k]).abs().max()) for k in got) < 1e-4
    assert float((logits(out) - logits(plain_export)).abs().max()) < 1e-4


def copy_run(src: RunDir, dst: Path) -> RunDir:
    shutil.copytree(src.path, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return RunDir(dst)


def test_convert_checks_the_records_it_reads_at_a_layout(runs: dict[str, RunDir], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """At TP2xPP2, `kit convert`'s default source check covers the fp32 partitions of every model-parallel
    rank (tools.source_check, record by record): one byte changed in the last stage's second tensor
    shard's partition is refused, naming the file and record, and no export appears."""
    from kit.tools.cli import main as kit_main
    from kit.tools.source_check import records
    from kit.tools.zero_reader import ZeroCheckpoint

    rd = copy_run(runs["tp2pp2"], tmp_path / "run")
    step = rd.checkpoints / ck.tag_for(STEPS)
    reader = ZeroCheckpoint(step, mp_rank=3)
    extents = reader.file_extents()
    assert extents is not None
    f, (off, numel) = reader.optim_files[1], extents[1][0]
    rec = next(r for r in records(f) if r.start <= off < r.start + r.size)
    data = bytearray(f.read_bytes())
    data[off + 4 * (numel // 2) + 1] ^= 0x08
    f.write_bytes(bytes(data))
    out = tmp_path / "hf"
    capsys.readouterr()
    assert kit_main(["convert", str(rd.path), "--step", str(STEPS), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"is corrupt ({f.name}: record {rec.name} (fp32 weights the export is made of): crc32 mismatch" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.partial")]


@pytest.mark.parametrize(("src", "args"), [("tp2", ["--world-size", "4"]),
                                           ("plain", ["--tensor", "2", "--world-size", "4", "--step", "20"])])
def test_reshape_between_tp2dp2_and_dp4_then_resume(runs: dict[str, RunDir], src: str, args: list[str],
                                                    tmp_path: Path) -> None:
    """`kit reshape` moves the step-20 checkpoint TP2xDP2 -> DP4 and DP4 -> TP2xDP2 (DeepSpeed universal
    checkpoints); a segment at the new layout resumes it and trains steps 21-24 as the plain run did."""
    from kit.tools.cli import main as kit_main

    rd = copy_run(runs[src], tmp_path / "run")
    if src == "plain":  # the plain run went on to 24: reshape its step 20 and drop what came after
        for tag in ("step_0000024",):
            shutil.rmtree(rd.checkpoints / tag)
    assert kit_main(["reshape", str(rd.path), *args]) == 0
    cfg = rd.load_config()
    target = Layout.of(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.trainer.nproc)
    assert str(target) == ("DP4" if src == "tp2" else "TP2xDP2")
    assert cfg.batch.micro_batch_size * cfg.batch.grad_accum * target.data == 8  # the global batch is kept
    out = run_local_segment(rd, cfg, seg="reshaped", quiet=True)
    assert (out.reason, out.step) == ("done", MAX_STEPS)
    loaded = [e for e in read_all(rd.path, {"ckpt_loaded"}) if e.get("seg") == "reshaped"]
    assert [e["tag"] for e in loaded] == ["step_0000020"]
    after = {s: v for s, v in metric(rd).items() if s > STEPS}
    assert sorted(after) == [21, 22, 23, 24]
    assert max_delta(after, metric(runs["plain"])) <= TOL
    assert ck.layout_of(ck.load(rd.checkpoints, "step_0000024")) == target


def test_rollback_at_a_pipeline_layout(tmp_path: Path) -> None:
    """The poisoned run of tests/spikes_fixtures.py at PP2xDP2 (4 ranks): the loss spike at step 26 is
    caught, the pipeline engine reloads step 20 mid-segment, skips the poisoned batches, replays steps
    21-25 bit for bit and finishes (the skip policy's refusal at a layout: tests/test_parallel_model.py)."""
    from spikes_fixtures import SPIKE_STEP, junk_steps, recipe

    cfg = load_recipe(recipe(tmp_path, "rb", "rollback"), ["parallel.pipeline=2", "trainer.nproc=4",
                                                            "slurm.tasks_per_node=4", "deepspeed.zero_stage=1"])
    rd = create_run(cfg, log=lambda m: None)
    assert junk_steps(rd.data).get(SPIKE_STEP, 0) >= 3
    out = run_local_segment(rd, cfg, seg="a", quiet=True)
    assert (out.reason, out.step) == ("done", cfg.trainer.max_steps)
    (rb,) = read_all(rd.path, {"rollback"})
    assert (rb["from_step"], rb["to_step"], rb["tag"]) == (SPIKE_STEP, 20, "step_0000020")
    first: dict[int, float] = {}
    for e in read_all(rd.path, {"step"}):
        first.setdefault(e["step"], e["loss"])
    final = metric(rd)
    assert [s for s in range(21, 27) if final[s] != first[s]] == [SPIKE_STEP]  # 21-25 replayed bit for bit
    assert final[SPIKE_STEP] < 0.85 * first[SPIKE_STEP]  # the poisoned batch is gone
    assert ck.layout_of(ck.load(rd.checkpoints, ck.tag_for(cfg.trainer.max_steps))) == Layout(1, 2, 2)

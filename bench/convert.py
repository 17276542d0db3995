"""bench/convert: kit's streaming converter against a plain copy and DeepSpeed's zero_to_fp32 route.

A 253M-parameter BLOOM (hidden 1024, 16 layers, vocab 50k, the notes' size) is trained for ONE step
with 2 real DeepSpeed ranks at ZeRO-2 and at ZeRO-3, and checkpointed (skipped when the checkpoint
is already there: ``--runs``). Then, per checkpoint, each in a fresh process (so peak RSS is its own):

- ``kit_cli``: ``kit convert RUN --step 1 --dtype fp32`` as users run it (the CLI verb, in-process after
  its imports): the default source check (every file's size; each zip record the conversion reads, the
  fp32 partitions and the pickles, against torch.save's CRC-32, as it reads them: tools.source_check),
  the conversion, the verification of the export (every weight exactly, the first blocks' logits through
  from_pretrained), the ledger events. Its phases are timed (``phases``; ``source_check_records_finish``
  is what is left of the record check once the last shard is written). The targets are this route's;
- ``kit_cli_full``: the same with ``--full-check``: every byte of the source checkpoint against its
  manifest (CRC-32; 4x the export with the Adam moments), on another thread while converting (the
  default before issue 16's record check); beside it, untimed, what that check costs with sha256
  (checkpoints whose manifest predates the CRC-32);
- ``kit``: the conversion step alone: tools.convert.convert writing fp32 safetensors shards
  (``--shard-size``), no source check, no verification;
- ``copy``: shutil.copyfile of the exported shards (the same bytes) to another folder (sendfile:
  the bytes stay in the kernel), and ``copy_userspace``: the same through a buffer in this process;
  ``copy_sha256``: the sendfile copy, then the sha256 of each copied shard (what kit's manifest needed
  before it listed CRC-32s, and what ``kit upload`` does as it reads each file: for comparison);
- ``kit_bf16``: kit writing bf16 shards (half the bytes, cast on the way), for information;
- ``zero_to_fp32``: DeepSpeed's get_fp32_state_dict_from_zero_checkpoint, then
  BloomForCausalLM.load_state_dict and save_pretrained (the documented route).

What is compared: the same output bytes (the fp32 shards), from the same page-cache-warm sources.
kit's time covers everything ``convert(..., verify=False)`` does: read the ZeRO layout, check the model,
write the shards (side by side), index, config and tokenizer files, CRC-32 every file for MANIFEST.json,
fsync the shards; the copies only copy (and, for copy_sha256, hash) the shards. Every route's clock starts after
its imports (reported apart as import_s) and stops after its output is fsynced. kit also reports
where its time went (``phases``: wall seconds of each step of convert(), and, untimed, of the check of
the source checkpoint's hashes that ``kit convert`` does first).

Each route runs ``--repeat`` times (default 5); the fastest run counts, the largest peak RSS counts.
Targets (issues 7, 16): `kit convert` as users run it (kit_cli) >= 0.5x the copy's throughput and
<= 0.5x zero_to_fp32's peak RSS; the conversion step alone is printed beside it.
Writes bench/results/convert.json with the machine's load before and after.

    python bench/convert.py [--runs /tmp/bench-convert] [--shard-size 200MB]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "convert.json"
MODEL = {"model.hidden_size": 1024, "model.n_layer": 16, "model.n_head": 16, "model.seq_length": 128,
         "data.vocab_size": 50_000, "batch.micro_batch_size": 1, "batch.grad_accum": 1, "trainer.max_steps": 1,
         "checkpoint.interval_steps": 1000, "optim.warmup_steps": 0}


def make_checkpoint(runs: Path, stage: int) -> Path:
    if (runs / f"z{stage}" / "checkpoints" / "step_0000001" / "MANIFEST.json").exists():
        return runs / f"z{stage}"  # made by an earlier run (perhaps by an older kit: its run.toml is frozen)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_overrides  # the shipped tiny recipe's test overrides, then the 253M model

    from kit.config import load_recipe
    from kit.launch import create_run, run_local_segment

    cfg = load_recipe(ROOT / "jobs" / "tiny.toml",
                      tiny_overrides(runs, f"z{stage}", **{**MODEL, "deepspeed.zero_stage": stage}))
    rd = create_run(cfg, log=lambda *a: None)
    if not (rd.checkpoints / "step_0000001" / "MANIFEST.json").exists():
        t0 = time.perf_counter()
        out = run_local_segment(rd, cfg, quiet=True)
        if out.reason != "done":
            raise SystemExit(f"training the ZeRO-{stage} checkpoint failed: {out}")
        print(f"ZeRO-{stage}: checkpoint made in {time.perf_counter() - t0:.0f} s", flush=True)
    return rd.path


# --------------------------------------------------------------------------- measured, one per process


def _fsync_all(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _cpu() -> float:
    """CPU seconds of this process so far, all threads (on a shared machine, steadier than wall time)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss of a child starts at its parent's size)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Any, name: str, phases: dict[str, float]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
    return wrapper


def child(kind: str, run: str, out: str, shard: str) -> dict[str, Any]:
    """One route, timed from after its imports (a constant start-up cost, reported apart as import_s)."""
    t_import = time.perf_counter()
    if not kind.startswith("copy"):
        import deepspeed.utils.zero_to_fp32  # noqa: F401 (the checkpoints' pickles need DeepSpeed's classes)
        import safetensors.torch  # noqa: F401
        import transformers.models.bloom.modeling_bloom  # noqa: F401

        import kit.tools.convert  # noqa: F401
    import_s = time.perf_counter() - t_import
    os.sync()  # flush what others left dirty (the checkpoint just written) outside the timed part
    t0 = time.perf_counter()
    cpu0 = _cpu()
    if kind in ("kit", "kit_bf16"):
        import kit.tools.convert as conv
        from kit.rundir import RunDir
        from kit.tools.convert import convert, parse_size, pick_checkpoint

        phases: dict[str, float] = {}
        for name in ("check_model", "write_weights", "write_config_and_tokenizer", "write_export_manifest"):
            setattr(conv, name, _timed(getattr(conv, name), name, phases))
        rd = RunDir(run)
        t_verify = time.perf_counter()
        ckpt = pick_checkpoint(rd, 1)
        phases["source_verify_untimed"] = time.perf_counter() - t_verify
        t0, cpu0 = time.perf_counter(), _cpu()  # the source's hash check above: kit convert does it, not timed
        exp = convert(rd, ckpt, Path(out), "bf16" if kind == "kit_bf16" else "fp32", parse_size(shard), verify=False)
        nbytes = exp.bytes
    elif kind in ("kit_cli", "kit_cli_full"):  # the command as users run it: source check, conversion, verify
        import contextlib
        import io

        import kit.tools.convert as conv
        import kit.tools.verify_export as ve
        from kit.tools.cli import main as kit_main

        phases = {}
        conv.verify_source = _timed(conv.verify_source, "source_check" if kind == "kit_cli_full"
                                    else "source_check_whole_files", phases)
        conv.check_pickles = _timed(conv.check_pickles, "source_check_pickles", phases)
        conv.SourceCheck.finish = _timed(conv.SourceCheck.finish, "source_check_records_finish", phases)
        conv.write_weights = _timed(conv.write_weights, "write_weights", phases)
        ve.compare_weights = _timed(ve.compare_weights, "verify_weights", phases)
        ve.sampled_logits = _timed(ve.sampled_logits, "verify_logits", phases)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            rc = kit_main(["convert", run, "--step", "1", "--out", out, "--dtype", "fp32", "--shard-size", shard,
                           "--json", *(["--full-check"] if kind == "kit_cli_full" else [])])
        if rc != 0:
            raise SystemExit(f"kit convert exited {rc}")
        done = json.loads(printed.getvalue())
        nbytes = done["bytes"]
        verified = done["verify"]
    elif kind in ("copy", "copy_userspace", "copy_sha256"):
        src = Path(run)  # here: the kit export folder
        Path(out).mkdir(parents=True)
        nbytes = 0
        for f in sorted(src.glob("*.safetensors")):
            if kind in ("copy", "copy_sha256"):  # shutil: sendfile(2), the bytes never leave the kernel
                shutil.copyfile(f, Path(out) / f.name)
                if kind == "copy_sha256":
                    with open(Path(out) / f.name, "rb") as fh:
                        hashlib.file_digest(fh, "sha256")
            else:  # the bytes pass through this process, as any converter's must
                with open(f, "rb") as fin, open(Path(out) / f.name, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 8 << 20)
            nbytes += f.stat().st_size
    else:
        import torch
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        from transformers import BloomForCausalLM

        from kit.model import bloom_config
        from kit.rundir import RunDir

        cfg = RunDir(run).load_config()
        sd = get_fp32_state_dict_from_zero_checkpoint(str(Path(run) / "checkpoints"), tag="step_0000001")
        with torch.device("meta"):
            model = BloomForCausalLM(bloom_config(cfg.model, cfg.data.vocab_size))
        model.load_state_dict(sd, strict=True, assign=True)
        model.tie_weights()
        model.save_pretrained(out, max_shard_size=shard)
        nbytes = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    t_sync = time.perf_counter()
    _fsync_all(Path(out))  # every route's output is on disk when its clock stops
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"kind": kind, "seconds": seconds, "cpu_s": round(_cpu() - cpu0, 3),
                              "import_s": import_s, "bytes": nbytes,
                              "mb_per_s": nbytes / seconds / 1e6,
                              "peak_rss_mb": _peak_rss_mb()}
    if kind in ("kit", "kit_bf16", "kit_cli", "kit_cli_full"):
        result["phases"] = {**{k: round(v, 3) for k, v in phases.items()},
                            "final_fsync": round(time.perf_counter() - t_sync, 3)}
    if kind in ("kit_cli", "kit_cli_full"):
        result["verify"] = {k: verified[k] for k in ("ok", "bit_identical", "weights_identical", "weights_compared",
                                                       "logits_layers", "reference")}
    if kind == "kit_cli_full":
        from kit import checkpoint as ck
        from kit.rundir import RunDir
        from kit.tools.convert import pick_checkpoint

        files = pick_checkpoint(RunDir(run), 1).manifest.files
        t = time.perf_counter()  # untimed, for comparison: the same check with sha256 (older manifests)
        for rel in files:
            ck.sha256(Path(run) / "checkpoints" / "step_0000001" / rel)
        result["source_check_sha256_one_thread_untimed_s"] = round(time.perf_counter() - t, 3)
    return result


def digest_speeds(files: list[Path], repeat: int) -> dict[str, Any]:
    """CPU seconds to digest ``files`` (read 8 MB at a time into one buffer, one thread) with each
    candidate of the source check, best of ``repeat``; and what reading alone costs. The stdlib's
    candidates, and xxhash's xxh3 when it happens to be installed (kit does not depend on it)."""
    import zlib

    def run(make: Any, update: Any) -> float:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        c = _cpu()
        for f in files:
            state = make()
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    state = update(state, view[:n])
        return _cpu() - c

    def hashed(name: str) -> tuple[Any, Any]:
        return (lambda: hashlib.new(name)), (lambda h, b: (h.update(b), h)[1])

    candidates: dict[str, tuple[Any, Any]] = {
        "read_only": (lambda: 0, lambda s, b: s),
        "crc32": (lambda: 0, lambda s, b: zlib.crc32(b, s)),
        "adler32": (lambda: 1, lambda s, b: zlib.adler32(b, s)),
        **{name: hashed(name) for name in ("sha256", "sha1", "blake2b", "md5")},
    }
    try:
        import xxhash

        candidates["xxh3_64 (xxhash, not a dependency)"] = (xxhash.xxh3_64, lambda h, b: (h.update(b), h)[1])
    except ImportError:
        pass
    nbytes = sum(f.stat().st_size for f in files)
    out: dict[str, Any] = {"bytes": nbytes}
    for name, (make, update) in candidates.items():
        cpu = min(run(make, update) for _ in range(repeat))
        out[name] = {"cpu_s": round(cpu, 3), "gb_per_cpu_s": round(nbytes / cpu / 1e9, 2)}
    return out


def save_hash_cost(files: list[Path], repeat: int) -> dict[str, Any]:
    """What the CRC-32 beside sha256 costs a checkpoint save (kit.checkpoint.digests hashes each file
    once for both): one thread's CPU for sha256 alone and for both, per GB of checkpoint."""
    from kit import checkpoint as ck

    def cpu(fn: Any) -> float:
        best = float("inf")
        for _ in range(repeat):
            c = _cpu()
            for f in files:
                fn(f)
            best = min(best, _cpu() - c)
        return best

    gb = sum(f.stat().st_size for f in files) / 1e9
    alone, both = cpu(ck.sha256), cpu(ck.digests)
    return {"gb": round(gb, 3), "sha256_cpu_s": round(alone, 3), "sha256_and_crc32_cpu_s": round(both, 3),
            "crc32_extra_cpu_s_per_gb": round((both - alone) / gb, 3),
            "crc32_extra_pct_of_hashing": round(100 * (both - alone) / alone, 1)}


def measure(kind: str, run: Path, out: Path, shard: str, repeat: int) -> dict[str, Any]:
    """Best of ``repeat`` runs by time (the machine is shared: the fastest run is the least disturbed);
    peak RSS is the largest seen."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, DS_ACCELERATOR="cpu")  # torch's threads as an operator's shell leaves them
        proc = subprocess.run([sys.executable, __file__, "--child", kind, str(run), str(out), shard],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = min(runs, key=lambda r: r["seconds"])
    result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    result["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    print(f"  {kind:<14} {result['seconds']:7.2f} s (CPU {result['cpu_s']:5.2f} s) {result['mb_per_s']:7.1f} MB/s  "
          f"peak RSS {result['peak_rss_mb']:7.0f} MB", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="/tmp/bench-convert", help="where the two runs live (kept for reruns)")
    p.add_argument("--shard-size", default="200MB", help="output shard size for kit and for save_pretrained")
    p.add_argument("--stages", default="2,3")
    p.add_argument("--repeat", type=int, default=5, help="runs per route; the fastest counts")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return 0
    runs = Path(a.runs)
    results: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "shard_size": a.shard_size,
                               "repeat": a.repeat, "load_avg_before": os.getloadavg(),
                               "model": MODEL, "params": None, "stages": {}}
    for stage in (int(s) for s in a.stages.split(",")):
        run = make_checkpoint(runs, stage)
        ckpt_bytes = sum(f.stat().st_size for f in (run / "checkpoints" / "step_0000001").iterdir())
        print(f"ZeRO-{stage}: checkpoint {ckpt_bytes / 1e9:.2f} GB", flush=True)
        kit = measure("kit", run, runs / f"out-kit-{stage}", a.shard_size, a.repeat)
        cli = measure("kit_cli", run, runs / f"out-cli-{stage}", a.shard_size, a.repeat)
        full = measure("kit_cli_full", run, runs / f"out-full-{stage}", a.shard_size, a.repeat)
        copy = measure("copy", runs / f"out-kit-{stage}", runs / f"out-copy-{stage}", a.shard_size, a.repeat)
        user = measure("copy_userspace", runs / f"out-kit-{stage}", runs / f"out-user-{stage}", a.shard_size,
                       a.repeat)
        hashed = measure("copy_sha256", runs / f"out-kit-{stage}", runs / f"out-hash-{stage}", a.shard_size,
                         a.repeat)
        bf16 = measure("kit_bf16", run, runs / f"out-bf16-{stage}", a.shard_size, a.repeat)
        ds = measure("zero_to_fp32", run, runs / f"out-ds-{stage}", a.shard_size, a.repeat)
        r = {"checkpoint_bytes": ckpt_bytes, "kit": kit, "kit_cli": cli, "kit_cli_full": full, "copy": copy,
             "copy_userspace": user,
             "copy_sha256": hashed, "kit_bf16": bf16, "zero_to_fp32": ds,
             "command_throughput_vs_copy": cli["mb_per_s"] / copy["mb_per_s"],
             "command_peak_rss_vs_zero_to_fp32": cli["peak_rss_mb"] / ds["peak_rss_mb"],
             "command_full_check_throughput_vs_copy": full["mb_per_s"] / copy["mb_per_s"],
             "throughput_vs_copy": kit["mb_per_s"] / copy["mb_per_s"],
             "throughput_vs_copy_userspace": kit["mb_per_s"] / user["mb_per_s"],
             "throughput_vs_copy_sha256": kit["mb_per_s"] / hashed["mb_per_s"],
             "throughput_zero_to_fp32_vs_copy": ds["mb_per_s"] / copy["mb_per_s"],
             "peak_rss_vs_zero_to_fp32": kit["peak_rss_mb"] / ds["peak_rss_mb"]}
        r["ok"] = r["command_throughput_vs_copy"] >= 0.5 and r["command_peak_rss_vs_zero_to_fp32"] <= 0.5
        cores = os.cpu_count() or 1
        # The floor on this machine: the command's CPU seconds spread perfectly over every core, against the
        # copy's measured time; the copy is mostly the kernel's page copy, the command must also hash.
        r["floor"] = {"command_cpu_s": cli["cpu_s"], "copy_cpu_s": copy["cpu_s"], "cores": cores,
                      "command_wall_at_least_s": round(cli["cpu_s"] / cores, 3),
                      "best_ratio_vs_copy_this_run": round(copy["seconds"] / (cli["cpu_s"] / cores), 3),
                      "best_ratio_vs_copy_if_quiet": round(max(copy["cpu_s"], 1e-9) / (cli["cpu_s"] / cores), 3)}
        files = [f for f in (run / "checkpoints" / "step_0000001").iterdir()
                 if f.is_file() and f.name != "MANIFEST.json"]
        r["digests"] = digest_speeds(files, a.repeat)
        r["save_hashing"] = save_hash_cost(files, a.repeat)
        results["stages"][f"zero{stage}"] = r
        results["params"] = kit["bytes"] // 4
        print(f"ZeRO-{stage}: `kit convert` as users run it (source check, conversion, verification): "
              f"{r['command_throughput_vs_copy']:.2f}x a copy's throughput (target >= 0.5), peak RSS "
              f"{r['command_peak_rss_vs_zero_to_fp32']:.2f}x zero_to_fp32's (target <= 0.5): "
              f"{'MET' if r['ok'] else 'NOT MET'}; phases {cli['phases']}; verify {cli['verify']}", flush=True)
        print(f"ZeRO-{stage}: with --full-check (every source byte): {r['command_full_check_throughput_vs_copy']:.2f}x "
              f"a copy; phases {full['phases']}; the same check with sha256 (older manifests) would take "
              f"{full['source_check_sha256_one_thread_untimed_s']} s on one thread", flush=True)
        print(f"ZeRO-{stage}: the conversion step alone: throughput kit/copy = {r['throughput_vs_copy']:.2f} ("
              f"vs a user-space copy {r['throughput_vs_copy_userspace']:.2f}; vs copy+sha256 "
              f"{r['throughput_vs_copy_sha256']:.2f}; zero_to_fp32/copy "
              f"{r['throughput_zero_to_fp32_vs_copy']:.2f}); "
              f"peak RSS kit/zero_to_fp32 = {r['peak_rss_vs_zero_to_fp32']:.2f} (target <= 0.5)", flush=True)
        fl, dg, sv = r["floor"], r["digests"], r["save_hashing"]
        print(f"ZeRO-{stage}: the floor: the command used {fl['command_cpu_s']:.2f} CPU-s against the copy's "
              f"{fl['copy_cpu_s']:.2f}: on {fl['cores']} cores at least {fl['command_wall_at_least_s']:.2f} s, so at "
              f"best {fl['best_ratio_vs_copy_this_run']:.2f}x this run's copy "
              f"({fl['best_ratio_vs_copy_if_quiet']:.2f}x a copy that ran at its CPU time)", flush=True)
        speeds = ", ".join(f"{k} {v['cpu_s']} ({v['gb_per_cpu_s']})" for k, v in dg.items() if k != "bytes")
        print(f"ZeRO-{stage}: digests of the {dg['bytes'] / 1e9:.2f} GB source, one thread, CPU-s (GB/CPU-s): "
              f"{speeds}", flush=True)
        print(f"ZeRO-{stage}: a save's hashing: sha256 {sv['sha256_cpu_s']} CPU-s, sha256 + CRC-32 "
              f"{sv['sha256_and_crc32_cpu_s']} (+{sv['crc32_extra_cpu_s_per_gb']} CPU-s per GB, "
              f"+{sv['crc32_extra_pct_of_hashing']}%)", flush=True)
        for d in ("out-kit", "out-cli", "out-full", "out-copy", "out-user", "out-hash", "out-bf16", "out-ds"):
            shutil.rmtree(runs / f"{d}-{stage}", ignore_errors=True)
    results["load_avg_after"] = os.getloadavg()
    results["when"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"saved {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

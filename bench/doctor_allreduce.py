"""Is the preflight's bus bandwidth honest, and what does the preflight cost a segment?

Side by side in one run, on 2 gloo ranks of this machine (torchrun): the busbw that
``kit.tools.doctor_net.measure`` reports against a bare ``torch.distributed.all_reduce`` loop timed
the plain way, for several buffer sizes (ratio ~1 = the doctor's extra per-node tests and bookkeeping
do not bias the number), and the wall time of a whole ``preflight`` with the recipe defaults.

    python bench/doctor_allreduce.py        # writes bench/results/doctor_allreduce.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "doctor_allreduce.json"
SIZES_MIB = (1, 16, 64)
ITERS = 10
REPEATS = 3


def raw_busbw(nbytes: int, iters: int) -> float:
    import torch
    import torch.distributed as dist

    from kit.tools.doctor_net import busbw

    buf = torch.ones(nbytes // 4)
    for _ in range(2):
        dist.all_reduce(buf)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    t = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return busbw(nbytes, float(t.item()), dist.get_world_size())[1]


def worker() -> None:
    import torch.distributed as dist

    from kit.config import load_recipe
    from kit.dist import from_environ
    from kit.tools.doctor import preflight
    from kit.tools.doctor_net import measure

    dist.init_process_group("gloo")
    rows = []
    for mib in SIZES_MIB:
        nbytes = mib << 20
        raws, docs, secs = [], [], []
        for _ in range(REPEATS):  # alternate, so that load from other users hits both alike
            raws.append(raw_busbw(nbytes, ITERS))
            t0 = time.perf_counter()
            docs.append(measure("bench", nbytes, ITERS).busbw_gbps)
            secs.append(time.perf_counter() - t0)
        raw, doc = statistics.median(raws), statistics.median(docs)
        rows.append({"mib": mib, "raw_busbw_gbps": round(raw, 4), "doctor_busbw_gbps": round(doc, 4),
                     "ratio_doctor_over_raw": round(doc / raw, 3), "measure_s": round(statistics.median(secs), 3)})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_recipe("tiny.toml", [f'run.runs_dir="{tmp}"'])
        t0 = time.perf_counter()
        report = preflight(cfg, cfg.run_dir, from_environ(), ledger=None)
        total = time.perf_counter() - t0
    if dist.get_rank() == 0:
        out = {"ranks": dist.get_world_size(), "backend": "gloo", "iters": ITERS, "repeats_median_of": REPEATS,
               "sizes": rows,
               "preflight_s_defaults": round(total, 3), "preflight_ok": report.ok,
               "machine": f"{os.cpu_count()} CPUs, shared", "load_avg_1m": os.getloadavg()[0],
               "load_avg": list(os.getloadavg())}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        for r in rows:
            print(f"{r['mib']:>4} MiB  raw {r['raw_busbw_gbps']:.3f} GB/s  doctor {r['doctor_busbw_gbps']:.3f} GB/s  "
                  f"ratio {r['ratio_doctor_over_raw']:.3f}  (measure {r['measure_s']:.2f} s)")
        print(f"whole preflight with the recipe defaults (64 MiB x 10): {total:.2f} s; saved {RESULTS}")
    dist.destroy_process_group()


if __name__ == "__main__":
    if os.environ.get("RANK") is None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "KIT_IMAGE_TARGET": ""}
        sys.exit(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 __file__], env=env).returncode)
    worker()

"""Worker of bench/checkpoint.py (launched by torchrun): one trainer, saves both ways, side by side.

The same engine saves synchronously (``checkpoint.async_save = false``: DeepSpeed writes inside the
loop, rank 0 hashes and commits) and asynchronously (host copy, then kit.asyncsave's writer thread), in
alternating order round after round (ABBA), with plain training steps around each save. Measured on
rank 0, every figure from the loop's point of view:

- stall: wall time of ``Trainer.save`` (what the step loop waits for);
- total: from the save's start to its ``ckpt_saved`` (async: the commit on the writer thread);
- step times: steps with no save in flight ("idle") and steps taken while an asynchronous write was
  in flight ("writing");
- CPU: the process's CPU time during a synchronous save, the writer thread's own CPU time, and the
  training thread's CPU time per step (the work a step needs, whatever else wants the cores).

Prints one ``RESULT`` JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    import torch.distributed as dist

    from kit import dist as kdist
    from kit.ledger import read_all
    from kit.rundir import RunDir
    from kit.trainer import Trainer

    rd = RunDir(sys.argv[1])
    rounds, idle_steps = int(sys.argv[2]), int(sys.argv[3])
    cfg = rd.load_config()
    env = kdist.from_environ()
    kdist.init(env)
    tr = Trainer(cfg, rd, env, seg="bench")
    tr.setup()
    tr.begin_loop()
    out: dict[str, Any] = {"sync_stall": [], "async_stall": [], "idle_step": [], "writing_step": [],
                           "idle_step_cpu": [], "writing_step_cpu": [],
                           "writing_steps_per_save": [], "async_snapshot_bytes": [], "sync_cpu": [],
                           "async_writer_cpu": []}

    cpu: list[float] = []

    def step() -> float:
        """One step's wall time (its training thread's CPU time goes to ``cpu``)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        assert tr.step_once() == "", "the benchmark must not end the segment"
        cpu.append(time.thread_time() - c0)
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up
        step()
    tr.saver.cfg.checkpoint.async_save = True
    tr.save("warm-up")  # the first save allocates the host buffers (kept for the next ones)
    tr.wait_for_saves()
    for r in range(rounds):
        for mode in (("sync", "async") if r % 2 == 0 else ("async", "sync")):
            out["idle_step"] += [step() for _ in range(idle_steps)]
            out["idle_step_cpu"] += cpu[-idle_steps:]
            dist.barrier()
            tr.saver.cfg.checkpoint.async_save = mode == "async"
            t0, c0 = time.perf_counter(), time.process_time()
            tr.save(f"bench-{mode}")
            out[f"{mode}_stall"].append(time.perf_counter() - t0)
            if mode == "sync":
                out["sync_cpu"].append(time.process_time() - c0)
            if mode == "async":
                job = tr.saver.pending
                assert job is not None
                out["async_snapshot_bytes"].append(job.snap.nbytes)
                n = 0
                while not job.join(0):  # steps while this rank's write (and rank 0's commit) is in flight
                    out["writing_step"].append(step())
                    out["writing_step_cpu"].append(cpu[-1])
                    n += 1
                out["writing_steps_per_save"].append(n)
                out["async_writer_cpu"].append(job.cpu_s)
                tr.wait_for_saves()
    tr.wait_for_saves()
    if env.rank == 0:
        saved = [e for e in read_all(rd.path, {"ckpt_saved"}) if str(e.get("reason", "")).startswith("bench-")]
        out["totals"] = {m: [e["seconds"] for e in saved if e["reason"] == f"bench-{m}"] for m in ("sync", "async")}
        out["ledger_stall"] = {m: [e["stall_s"] for e in saved if e["reason"] == f"bench-{m}"]
                               for m in ("sync", "async")}
        out["bytes"] = saved[-1]["bytes"] if saved else 0
        out["params"] = sum(p.numel() for p in tr.engine.module.parameters())
        print("RESULT " + json.dumps(out), flush=True)
    tr._finish("done")


if __name__ == "__main__":
    main()

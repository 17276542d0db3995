"""Worker of bench/overhead.py (launched by torchrun): one engine, stepped bare and by the kit.

"kit" steps are Trainer.step_once() with everything the kit runs during training: the flags all-reduce,
control and deadline checks, ledger and TensorBoard metrics (the TensorBoard thread), the health
sampler thread, the hang watchdog thread and heartbeat, the straggler timer's hooks and gathers, the
spike guard. "bare" steps are the plain DeepSpeed loop on the same engine and data: forward, backward,
step, with NO kit hook on the engine and NO kit thread alive: before each bare block the kit's parts
are stopped (JobHealth.stop: sampler and watchdog threads joined, the timer's hooks and wrappers
removed; the TensorBoard sink closed, its thread joined), and started again before each kit block
(untimed; the sampler's first sample is awaited, so a kit block sees the sampler's steady state:
one sample per health.period_s). Each block checks what it claims: the engine's forward hooks and the
threads named ``kit-*`` are counted at its start.

Blocks alternate in ABBA order; rank 0 prints each block's per-step wall time and process CPU time
(all threads: the kit's threads' CPU counts against the kit), its own and summed over every rank, as
JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any


def kit_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("kit-"))


def main() -> None:
    import torch
    import torch.distributed as dist

    from kit import dist as kdist
    from kit.data import rank_micro_indices
    from kit.health import JobHealth
    from kit.metrics import MetricSink
    from kit.rundir import RunDir
    from kit.trainer import Trainer

    rd = RunDir(sys.argv[1])
    block, rounds = int(sys.argv[2]), int(sys.argv[3])
    cfg = rd.load_config()
    env = kdist.from_environ()
    kdist.init(env)
    tr = Trainer(cfg, rd, env, seg="bench")
    tr.setup()
    tr.begin_loop()
    eng, data, st = tr.engine, tr.data, tr.state
    assert data is not None
    mb, ga, dp = cfg.batch.micro_batch_size, cfg.batch.grad_accum, env.world_size

    def bare_step() -> None:
        for m in range(ga):
            x = torch.from_numpy(data.batch(rank_micro_indices(st.consumed, mb, dp, env.rank, m)))
            out = eng(input_ids=x, labels=x)
            eng.backward(out.loss)
            eng.step()
        st.consumed += tr.global_batch

    def kit_step() -> None:
        assert tr.step_once() == "", "the benchmark must not end the segment"

    def kit_off() -> None:
        if tr.health is not None:
            tr.health.stop()
            tr.health = None
        if tr.sink is not None:
            tr.sink.close()
            tr.sink = None

    def kit_on() -> None:
        tr.health = JobHealth.start(cfg, tr.rd, env, tr.seg, eng, tr.ledger)  # a collective: every rank
        if env.is_main:
            tr.sink = MetricSink(tr.ledger, tr.rd.tensorboard, purge_step=st.step + 1)
        sampler = tr.health.sampler
        deadline = time.monotonic() + 30
        while sampler is not None and sampler.samples < 1 and time.monotonic() < deadline:
            time.sleep(0.01)

    def hooks() -> int:
        """Forward hooks on the module and method wrappers on the engine (DeepSpeed's own included)."""
        return len(eng.module._forward_hooks) + len(eng.module._forward_pre_hooks) + \
            sum(1 for k in ("backward", "step") if k in eng.__dict__)

    checks: dict[str, Any] = {"bare_kit_threads": set(), "bare_hooks": 0, "kit_threads": set(), "kit_hooks": 0}
    for _ in range(5):  # warm-up: both paths
        kit_step()
    kit_off()
    deepspeed_hooks = hooks()  # what DeepSpeed itself installs: a bare block has exactly these
    checks["deepspeed_hooks"] = deepspeed_hooks
    for _ in range(5):
        bare_step()
    times: dict[str, list[float]] = {"bare": [], "kit": [], "bare_cpu": [], "kit_cpu": []}
    order = ["bare", "kit", "kit", "bare"]
    for r in range(rounds):
        for mode in order if r % 2 == 0 else order[::-1]:
            if mode == "kit" and tr.health is None:
                kit_on()
            elif mode == "bare" and tr.health is not None:
                kit_off()
            checks[f"{mode}_hooks"] = max(checks[f"{mode}_hooks"], hooks() - deepspeed_hooks)  # the kit's
            checks[f"{mode}_kit_threads" if mode == "bare" else "kit_threads"].update(kit_threads())
            dist.barrier()
            fn = bare_step if mode == "bare" else kit_step
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(block):
                fn()
            times[mode].append((time.perf_counter() - t0) / block)
            times[mode + "_cpu"].append((time.process_time() - c0) / block)
    every = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object({"bare": times["bare_cpu"], "kit": times["kit_cpu"]}, every, dst=0)
    if env.rank == 0:
        assert every is not None
        # every rank's process CPU per step, summed: the kit's work on the other ranks (its threads, hooks,
        # gathers) competes for the same cores
        times["bare_cpu_all"] = [sum(r["bare"][i] for r in every) for i in range(len(times["bare_cpu"]))]
        times["kit_cpu_all"] = [sum(r["kit"][i] for r in every) for i in range(len(times["kit_cpu"]))]
        out = {**times, "checks": {k: sorted(v) if isinstance(v, set) else v for k, v in checks.items()}}
        print("TIMES " + json.dumps(out), flush=True)
    if tr.health is None:
        kit_on()
    tr._finish("done")


if __name__ == "__main__":
    main()

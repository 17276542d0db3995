"""Worker of bench/overhead.py (launched by torchrun): one engine, stepped bare and by the kit.

"kit" steps are Trainer.step_once() with everything the kit runs during training: the flags all-reduce,
control and deadline checks, ledger and TensorBoard metrics (the TensorBoard thread), the health
sampler thread, the hang watchdog thread and heartbeat, the straggler timer's hooks and gathers, the
spike guard. "bare" steps are the plain DeepSpeed loop on the same engine and data: forward, backward,
step (``train_batch`` on a pipeline engine, with kit's schedule and loss hooks taken off), with NO
kit hook on the engine and NO kit thread alive: before each bare block the kit's parts
are stopped (JobHealth.stop: sampler and watchdog threads joined, the timer's hooks and wrappers
removed; the TensorBoard sink closed, its thread joined), and started again before each kit block
(untimed; the sampler's first sample is awaited, so a kit block sees the sampler's steady state:
one sample per health.period_s). Each block checks what it claims: the engine's forward hooks and the
threads named ``kit-*`` are counted at its start.

Blocks alternate in ABBA order, until the overhead's interval (every rank's CPU) is as narrow as
asked, or the time budget or the rounds run out; rank 0 prints each block's per-step wall time and process CPU time
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
    resolve = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0  # stop once the CI half-width is this (%)
    budget_s = float(sys.argv[5]) if len(sys.argv) > 5 else float("inf")
    cfg = rd.load_config()
    env = kdist.from_environ()
    kdist.init(env)
    tr = Trainer(cfg, rd, env, seg="bench")
    tr.setup()
    tr.begin_loop()
    eng, data, st, mesh, stepper = tr.engine, tr.data, tr.state, tr.mesh, tr.stepper
    assert data is not None and mesh is not None and stepper is not None
    mb, ga, dp, replica = cfg.batch.micro_batch_size, cfg.batch.grad_accum, tr.dp, mesh.coords.data
    pipelined = stepper.pipelined

    def micro_batches() -> Any:  # this replica's micro-batches, as the trainer reads them
        for m in range(ga):
            yield torch.from_numpy(data.batch(rank_micro_indices(st.consumed, mb, dp, replica, m)))

    def bare_step() -> None:
        """DeepSpeed's own loop: train_batch on a pipeline engine (its schedule, its optimizer step, its
        loss_fn: kit's hooks are off), forward/backward/step otherwise (AutoTP's or plain)."""
        if pipelined:
            eng.train_batch(data_iter=((x, x) for x in micro_batches()))
        else:
            for x in micro_batches():
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
        stepper.unhook()

    def kit_on() -> None:
        stepper.rehook()
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
            sum(1 for k in ("backward", "step", "_INSTRUCTION_MAP") if k in eng.__dict__) + \
            (1 if pipelined and eng.module.loss_fn is not stepper.deepspeed_loss_fn else 0)

    checks: dict[str, Any] = {"bare_kit_threads": set(), "bare_hooks": 0, "kit_threads": set(), "kit_hooks": 0}
    for _ in range(5):  # warm-up: both paths
        kit_step()
    kit_off()
    deepspeed_hooks = hooks()  # what DeepSpeed itself installs: a bare block has exactly these
    checks["deepspeed_hooks"] = deepspeed_hooks
    for _ in range(5):
        bare_step()
    times: dict[str, list[float]] = {"bare": [], "kit": [], "bare_cpu": [], "kit_cpu": [], "bare_cpu_all": [],
                                     "kit_cpu_all": []}
    order = ["bare", "kit", "kit", "bare"]
    started = time.monotonic()
    stopped = f"max rounds ({rounds})"
    for r in range(rounds):
        why = _done(times, r, resolve, started, budget_s) if r else ""
        if why:
            stopped = why
            break
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
        # every rank's process CPU per step, summed: the kit's work on the other ranks (its threads, hooks,
        # gathers) competes for the same cores
        mine = {m: times[m + "_cpu"][-2:] for m in ("bare", "kit")}
        every: list[Any] = [None] * env.world_size
        dist.all_gather_object(every, mine)
        for m in ("bare", "kit"):
            times[m + "_cpu_all"] += [sum(x[m][i] for x in every) for i in range(2)]
    if env.rank == 0:
        out = {**times, "stopped": stopped,
               "checks": {k: sorted(v) if isinstance(v, set) else v for k, v in checks.items()}}
        print("TIMES " + json.dumps(out), flush=True)
    if tr.health is None:
        kit_on()
    tr._finish("done")


def _done(times: dict[str, list[float]], rounds: int, resolve: float, started: float, budget_s: float) -> str:
    """Why to stop now ("" to go on): the interval of every rank's CPU overhead is as narrow as asked
    (after 10 rounds at least), or the time budget is spent. Every rank has the same lists (all-gathered),
    and the same clock budget decides within a round's time, so all ranks stop together (checked:
    the decision is all-reduced)."""
    import _stats
    import torch
    import torch.distributed as dist

    why = ""
    if resolve > 0 and rounds >= 10:
        r = _stats.paired_ratio(times["bare_cpu_all"], times["kit_cpu_all"])
        if r["half_width_pct"] <= resolve:
            why = f"resolved: +-{r['half_width_pct']:.2f}% <= {resolve}% after {rounds} rounds"
    if not why and time.monotonic() - started > budget_s:
        why = f"time budget ({budget_s:.0f} s) spent after {rounds} rounds"
    flag = torch.tensor([1 if why else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank's clock must not leave the other waiting
    return why or ("stopped with the other rank" if int(flag) else "")


if __name__ == "__main__":
    main()

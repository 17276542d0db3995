"""``kit submit``: validate everything, create the run directory, submit the chain's first job.

Order matters: every check that can fail (recipe, image, data paths, time limit, and Slurm itself
through ``sbatch --test-only``) runs BEFORE the run directory is created or anything is queued, so a
bad recipe leaves no trace. Then a lock (one submitter at a time) and the chain record decide between
attaching to the chain that is already there and starting one: never two chains on one run.

The sbatch script is submitit's (AutoExecutor: Slurm when there, the local executor otherwise); the
same :func:`make_executor` serves the first submission and the in-job resubmissions after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit import envvars
from kit.config import RunConfig
from kit.errors import ConfigError, DataError, KitError
from kit.faults import fault_point
from kit.jobs import chain as ch
from kit.jobs import slurmctl
from kit.ledger import LedgerWriter
from kit.rundir import RunDir

DEFAULT_SRUN_ARGS = ("--kill-on-bad-exit=1",)  # a task that dies ends the step instead of leaving it hung


class SubmitError(KitError):
    """The chain cannot be submitted (or attached to) as asked."""


# ------------------------------------------------------------------------------------ validation


def check_paths(cfg: RunConfig) -> None:
    """Image, binds and data must exist here (the login node sees the shared filesystem)."""
    if cfg.container.image and not Path(cfg.container.image).exists():
        raise ConfigError(f"container.image {cfg.container.image} does not exist; build it with `kit container` "
                          "or fix the path (nothing was submitted)")
    for b in cfg.container.binds:
        host_path = b.split(":")[0]
        if not Path(host_path).exists():
            raise ConfigError(f"container.binds: {host_path} does not exist on this machine (nothing was submitted)")
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).exists():
        raise DataError(f"data.tokenizer {cfg.data.tokenizer} does not exist (nothing was submitted)")
    prepared = Path(cfg.data.prepared) if cfg.data.prepared else cfg.run_dir / "data"
    if (prepared / "meta.json").exists():
        return  # data already prepared: the sources are no longer read
    for src in cfg.data.sources:
        pattern = any(c in src.path for c in "*?[")
        found = glob.glob(src.path) if pattern else [src.path] if Path(src.path).exists() else []
        if not found:
            raise DataError(f"data.sources[{src.name}].path {src.path} does not exist (nothing was submitted)")


def check_time_limit(cfg: RunConfig, rd: RunDir | None = None) -> tuple[float, int]:
    """(limit seconds, signal lead seconds); refuses a limit too short for one step and one save."""
    limit = ch.limit_seconds(cfg.slurm.time_limit)
    need = ch.min_time_limit_s(cfg, rd)
    if limit < need:
        raise ConfigError(f"slurm.time_limit {cfg.slurm.time_limit} ({limit:.0f} s) is too short for one step plus "
                          f"one save before the trainer's stop margin (~{need:.0f} s); raise it")
    lead = ch.signal_lead_s(cfg, rd)
    return limit, min(lead, int(limit))


def slurm_parameters(cfg: RunConfig, state: ch.ChainState, lead_s: int, delay_s: float = 0.0,
                     after: str = "") -> dict[str, Any]:
    """submitit AutoExecutor parameters for one job of the chain."""
    s = cfg.slurm
    limit = ch.limit_seconds(s.time_limit)
    extra: dict[str, Any] = {"requeue": True}
    # Same-named jobs run one after another: a second chain could never overlap the first.
    extra["dependency"] = f"afterany:{after},singleton" if after else "singleton"
    if s.reservation:
        extra["reservation"] = s.reservation
    if delay_s > 0:
        extra["begin"] = f"now+{math.ceil(delay_s)}"
    extra.update(s.sbatch_args)
    p: dict[str, Any] = {
        "name": f"kit-{cfg.run.name}",
        "timeout_min": max(1, math.ceil(limit / 60)),
        "nodes": s.nodes,
        "tasks_per_node": s.gpus_per_node or s.tasks_per_node or cfg.trainer.nproc,
        "cpus_per_task": s.cpus_per_task,
        "slurm_signal_delay_s": lead_s,
        "slurm_additional_parameters": extra,
        "slurm_srun_args": [*DEFAULT_SRUN_ARGS, *s.srun_args],
    }
    if s.gpus_per_node:
        p["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        p["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(s, key):
            p[f"slurm_{key}"] = getattr(s, key)
    exclude = sorted(set(s.exclude) | set(state.excluded_nodes))
    if exclude:
        p["slurm_exclude"] = ",".join(exclude)
    return p


def test_only_args(params: dict[str, Any]) -> list[str]:
    """The sbatch flags of :func:`slurm_parameters`, for ``sbatch --test-only``."""
    args = [f"--job-name={params['name']}", f"--time={params['timeout_min']}", f"--nodes={params['nodes']}",
            f"--ntasks-per-node={params['tasks_per_node']}", f"--cpus-per-task={params['cpus_per_task']}"]
    if "gpus_per_node" in params:
        args.append(f"--gpus-per-node={params['gpus_per_node']}")
    if "mem_gb" in params:
        args.append(f"--mem={int(params['mem_gb'] * 1024)}M")
    for key in ("partition", "account", "qos", "exclude"):
        if f"slurm_{key}" in params:
            args.append(f"--{key}={params[f'slurm_{key}']}")
    for k, v in params["slurm_additional_parameters"].items():
        if k in ("dependency", "begin"):
            continue
        flag = "--" + k.replace("_", "-")
        args.append(flag if v is True else f"{flag}={v}")
    return args


# ------------------------------------------------------------------------------------- executors


def use_slurm() -> bool:
    forced = os.environ.get(envvars.EXECUTOR, "")
    if forced:
        return forced == "slurm"
    return slurmctl.available()


def make_executor(cfg: RunConfig, rd: RunDir, state: ch.ChainState, delay_s: float = 0.0, after: str = "") -> Any:
    """A submitit AutoExecutor for the next job of this run's chain."""
    import submitit

    folder = rd.slurm / ch.SUBMITIT_DIR
    cluster = "slurm" if use_slurm() else "local"
    # slurm_max_num_timeout: submitit's own cap on time-out requeues (default 3) must not end a chain
    # that needs ~150 allocations; the chain counts segments itself (chain.max_segments).
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=cfg.chain.max_segments + 10)
    _, lead = check_time_limit(cfg, rd)
    params = slurm_parameters(cfg, state, lead, delay_s, after)
    if cluster == "local":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_") and k not in ("nodes", "mem_gb")}
        params["timeout_min"] = max(params["timeout_min"], 60 * 24 * 365)  # locally the chain loops in one job
    ex.update_parameters(**params)
    return ex


def resubmit(rd: RunDir, cfg: RunConfig, delay_s: float = 0.0, after: str = "") -> str:
    """From inside a job: submit the chain's next job (new id, backoff, current exclusions)."""
    job_id, _ = queue_job(cfg, rd, ch.load_state(rd, repair=True), delay_s, after, reload=True)
    return job_id


def queue_job(cfg: RunConfig, rd: RunDir, state: ch.ChainState, delay_s: float = 0.0, after: str = "",
              reload: bool = False) -> tuple[str, Any]:
    """Queue the chain's next job and record its id in chain.json, or leave nothing queued.

    Everything that can be checked is checked before (the executor's parameters are built first).
    Once the job may be queued, any failure (inside submitit after sbatch answered, or writing
    chain.json) cancels it: by the Job submitit returned, or, when submitit failed before returning
    one, by finding it in the queue: this run's job name, with its batch script in this run's submitit
    folder (never another run's job of the same name). Only if the cancel itself fails is the job id
    recorded as the chain's, so `kit cancel` can reach it. ``reload``: re-read chain.json after
    queueing (inside a job, the driver's own record may have moved on)."""
    from kit.jobs.driver import SegmentJob

    executor = make_executor(cfg, rd, state, delay_s, after)
    known = {state.job_id, *state.job_ids}
    job: Any = None
    try:
        job = executor.submit(SegmentJob(str(rd.path)))
        fault_point("submit.after_queue", 0, 0)
        if reload:
            state = ch.load_state(rd, repair=True)
        state.job_id = str(job.job_id)
        state.job_ids.append(state.job_id)
        state.state = ch.QUEUED
        ch.save_state(rd, state)
        return state.job_id, job
    except BaseException as e:
        note = _undo_queue(cfg, rd, job, known, e)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise SubmitError(f"submitting run {cfg.run.name} failed ({type(e).__name__}: {e}); {note}") from e


def _undo_queue(cfg: RunConfig, rd: RunDir, job: Any, known: set[str], error: BaseException) -> str:
    """After a failed submission: cancel what was queued, record it; returns what happened, for the
    operator. Never raises (the submission's own error is what the operator must see)."""
    local = job is not None and not use_slurm()
    if job is not None:
        queued = [str(job.job_id)]
    elif use_slurm():
        try:
            folder = str(rd.slurm / ch.SUBMITIT_DIR)
            queued = [j for j in slurmctl.queued_from(f"kit-{cfg.run.name}", folder) if j not in known]
        except KitError:
            queued = []
    else:
        queued = []
    cancelled, stuck = [], []
    for job_id in queued:
        try:
            if local:
                job.cancel(check=False)
            else:
                slurmctl.cancel(job_id)
            cancelled.append(job_id)
        except Exception:  # recorded below as still queued; the operator is told to cancel it
            stuck.append(job_id)
    try:
        state = ch.load_state(rd, repair=True)
        state.job_ids += [j for j in queued if j not in state.job_ids]
        if stuck:
            state.job_id, state.state = stuck[-1], ch.QUEUED
        else:
            state.state, state.end_reason = ch.ENDED, "submit_failed"
        ch.save_state(rd, state)
        with LedgerWriter(rd.path, f"submit-{os.getpid()}") as led:
            led.emit("chain_submit_failed", error=f"{type(error).__name__}: {error}", cancelled=cancelled,
                     still_queued=stuck)
    except Exception as e:  # the disk may be what failed: say so, and keep the submission's own error
        print(f"kit: note: could not record the failed submission in {rd.path} ({type(e).__name__}: {e})",
              file=sys.stderr)
    if stuck:
        return (f"job(s) {', '.join(stuck)} could not be cancelled and may run: recorded in chain.json, "
                f"cancel with `kit cancel {rd.path}`")
    if cancelled:
        return f"the queued job {', '.join(cancelled)} was cancelled: nothing runs; fix the cause and submit again"
    return "nothing was queued; fix the cause and submit again"


# -------------------------------------------------------------------------------------- submitting


@contextlib.contextmanager
def submit_lock(cfg: RunConfig) -> Iterator[None]:
    """One `kit submit` of a run at a time (the chain record is read, then written)."""
    runs = Path(cfg.run.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f".{cfg.run.name}.submit.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SubmitError(f"another `kit submit` of run {cfg.run.name} is in progress; wait for it") from None
        yield


@dataclass(frozen=True, slots=True)
class Submitted:
    job_id: str
    run_dir: Path
    attached: bool
    executor: str
    job: Any = None  # the submitit Job (None when attached)


def current_job(state: ch.ChainState) -> str:
    """The chain's job if it is still queued or running (Slurm's view, not just the record's)."""
    if not state.job_id or state.executor != "slurm":
        return ""
    return state.job_id if slurmctl.is_active(state.job_id) else ""


def submit(cfg: RunConfig, log: Any = print, amend: bool = False) -> Submitted:
    """Validate, create the run directory, start the chain, or attach to the one already running.

    An existing run whose frozen run.toml differs from ``cfg`` is refused, unless ``amend``: then the
    differences are applied as a recorded amendment (kit.amend) first, also when attaching."""
    check_paths(cfg)
    existing = RunDir(cfg.run_dir)
    _, lead = check_time_limit(cfg, existing if existing.exists() else None)
    slurm = use_slurm()
    if slurm:
        slurmctl.test_only(test_only_args(slurm_parameters(cfg, ch.ChainState(), lead)))
    with submit_lock(cfg):
        if existing.exists():
            if amend:
                from kit.amend import amend as apply_amendment

                apply_amendment(existing, cfg, who="kit submit", log=log)
            existing.check_frozen(cfg)
            state = ch.load_state(existing)
            live = current_job(state)
            if live:
                log(f"run {cfg.run.name} already has a chain: job {live} ({slurmctl.job_state(live).lower()}); "
                    "attached, nothing submitted (`kit status` follows it, `kit stop` ends it)")
                return Submitted(live, existing.path, True, state.executor)
            if state.active and state.executor == "local":
                raise SubmitError(f"run {cfg.run.name} has a local chain in progress (job {state.job_id}); "
                                  "wait for it or `kit cancel` it")
        from kit.launch import create_run

        rd = create_run(cfg, log=log)
        leftover = rd.consume("stop")
        state = ch.load_state(rd, repair=True)
        state.state, state.end_reason = ch.QUEUED, ""
        state.consecutive_crashes = state.no_progress = 0
        state.executor = "slurm" if slurm else "local"
        state.submitted = time.time()
        ch.save_state(rd, state)  # before submitting: the job's first act is to read it
        _, job = queue_job(cfg, rd, state)
        with LedgerWriter(rd.path, "submit") as led:
            if leftover is not None:
                led.emit("control_ack", switch="stop", step=-1, note="stale stop switch removed by kit submit")
            led.emit("chain_submitted", job_id=state.job_id, executor=state.executor, signal_lead_s=lead,
                     time_limit=cfg.slurm.time_limit, nodes=cfg.slurm.nodes, excluded=state.excluded_nodes)
        log(f"submitted run {cfg.run.name} as {state.executor} job {state.job_id}; run directory {rd.path}")
        return Submitted(state.job_id, rd.path, False, state.executor, job)

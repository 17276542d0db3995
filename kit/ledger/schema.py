"""The ledger's schema: every event kind with its typed fields, the step metrics, the segment-end reasons.

Why one module: the ledger is the contract between the job and every tool (monitor, status, chain
driver, stream, postmortem, goodput). Each of them used to restate field names, metric lists and end
reasons; now they read them from here, the writer checks events against it, the one reader
(kit.ledger.reader) coerces lines by it, and docs/run-directory.md's tables are generated from it
(``python -m kit.docgen --ledger``).

Field types (``Field.type``):

- ``int``: a JSON integer (a float with an integral value is accepted and made int) within int64;
- ``float``: a JSON number within float range; NaN and infinities only where ``nonfinite`` is set
  (a loss that went NaN is a fact worth keeping; a NaN step time is junk);
- ``str`` (at most ``MAX_STR`` characters), ``bool``;
- ``strs`` / ``ints`` / ``floats``: lists of those (every item checked);
- ``list`` / ``dict``: any JSON list or object nested at most ``MAX_DEPTH`` deep (checked by shape
  only; their items are read defensively by their consumers);
- ``json``: any JSON value nested at most ``MAX_DEPTH`` deep.

``null`` is always "missing": writers write None for "not available" (grad norm before the first
step, MFU without a known peak). A value of the wrong type, size or finiteness is made missing and
counted by the reader; an event whose *required* field is missing is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 2
"""2: the typed schema (fields checked by type; v1 files are read by the same rules)."""

MAX_STR = 8192
MAX_DEPTH = 12
SEVERITIES = ("info", "warning", "error", "critical")

TYPES = ("int", "float", "str", "bool", "strs", "ints", "floats", "list", "dict", "json")


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str
    doc: str
    required: bool = False
    nonfinite: bool = False  # float only: NaN/inf are values, not junk


def req(name: str, type_: str, doc: str, nonfinite: bool = False) -> Field:
    return Field(name, type_, doc, True, nonfinite)


def opt(name: str, type_: str, doc: str, nonfinite: bool = False) -> Field:
    return Field(name, type_, doc, False, nonfinite)


@dataclass(frozen=True, slots=True)
class EventSpec:
    kind: str
    doc: str
    writer: str  # who writes it (for the docs)
    fields: tuple[Field, ...]
    bulk: bool = False  # written at a high rate (steps, health, per-rank timings): indexed, read by columns

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.required)


ENVELOPE = (
    req("v", "int", "schema version of the writer (SCHEMA_VERSION)"),
    req("t", "float", "Unix time the event was written"),
    req("kind", "str", "the event kind"),
    opt("src", "str", "the writer: the ledger file's stem (train-r0, health-node12, chain, stream...)"),
    opt("seg", "str", "the chain segment: <Slurm job id>_<restart count>, or a local id"),
)

# ------------------------------------------------------------------------------------ step metrics


@dataclass(frozen=True, slots=True)
class Metric:
    """One field of the ``step`` event: what it is, how it is shown, written and aggregated."""

    name: str
    label: str  # short label on screen
    unit: str
    doc: str
    type: str = "float"  # float, int, bool, or enum (a str among ``choices``)
    tb_tag: str = ""  # TensorBoard scalar tag ("" = not written there)
    agg: str = "mean"  # over a bucket of steps: mean, last, sum, max
    plot: bool = False  # a curve in the monitor
    nonfinite: bool = False
    choices: tuple[str, ...] = ()


STEP_METRICS: tuple[Metric, ...] = (
    Metric("loss", "loss", "", "mean training loss of the step over every rank and micro-batch",
           tb_tag="train/loss", plot=True, nonfinite=True),
    Metric("grad_norm", "grad norm", "", "global gradient norm before clipping (DeepSpeed's)",
           tb_tag="train/grad_norm", plot=True, nonfinite=True),
    Metric("lr", "LR", "", "learning rate the step used", tb_tag="train/lr", agg="last", plot=True),
    Metric("tokens_per_s", "tokens/s", "tokens/s", "tokens of the global batch per second of step time",
           tb_tag="perf/tokens_per_s", plot=True),
    Metric("samples_per_s", "samples/s", "samples/s", "samples of the global batch per second",
           tb_tag="perf/samples_per_s", plot=True),
    Metric("step_time", "step time", "s", "wall time of the step (forward, backward, update, all-reduce)",
           tb_tag="perf/step_time_s", plot=True),
    Metric("tflops", "TFLOP/s/GPU", "TFLOP/s", "hardware FLOPs per second per device (recompute counted)",
           tb_tag="perf/tflops_per_device", plot=True),
    Metric("mfu", "MFU", "fraction", "model FLOPs utilisation: model FLOPs per second over the dense bf16 peak",
           tb_tag="perf/mfu", plot=True),
    Metric("consumed", "consumed", "samples", "global samples consumed before this step (the data position)",
           type="int", agg="last"),
    Metric("samples", "samples", "samples", "samples in the step's global batch", type="int", agg="sum"),
    Metric("tokens", "tokens", "tokens", "tokens in the step's global batch", type="int", agg="sum"),
    Metric("nonfinite", "non-finite", "", "the loss was NaN or infinite on some rank", type="bool", agg="max"),
    Metric("spike", "spike", "", "the spike detector flagged this step's loss or the previous step's grad norm",
           type="enum", agg="last", choices=("loss", "grad_norm")),
    Metric("action", "action", "", "what the spike policy did", type="enum", agg="last",
           choices=("log", "skip", "rollback", "give_up")),
)
METRICS = {m.name: m for m in STEP_METRICS}
PLOTTED = tuple(m.name for m in STEP_METRICS if m.plot)
TB_TAGS = {m.name: m.tb_tag for m in STEP_METRICS if m.tb_tag}


def _metric_type(m: Metric) -> str:
    return {"enum": "str"}.get(m.type, m.type)


# ------------------------------------------------------------------------------ segment-end reasons


@dataclass(frozen=True, slots=True)
class EndReason:
    """Why a training segment ended: its exit status and what the chain does about it.

    ``outcome``: ``finished`` (the chain ends: done, stop, give_up), ``clean`` (saved at an allocation
    boundary: requeue at once), ``hang``/``crash`` (resubmit with backoff, count towards the crash loop,
    implicate nodes), ``preflight`` (the node failed its preflight: exclude it, resubmit), ``disk_full``
    (a save found its filesystem full: end, excluding no node unless its own disk filled)."""

    name: str
    exit_code: int
    outcome: str
    doc: str

    @property
    def requeue(self) -> bool:
        return self.outcome == "clean"

    @property
    def crash(self) -> bool:
        return self.outcome in ("hang", "crash")


END_REASONS: tuple[EndReason, ...] = (
    EndReason("done", 0, "finished", "trainer.max_steps reached: the chain ends"),
    EndReason("stop", 0, "finished", "the operator's stop switch (kit stop, the monitor): saved, the chain ends"),
    EndReason("signal", 75, "clean", "Slurm's time-limit or preemption signal: saved, requeued"),
    EndReason("deadline", 75, "clean", "the allocation's end (or trainer.deadline) was near: saved, requeued"),
    EndReason("segment_limit", 75, "clean", "trainer.stop_after_steps (a simulated allocation boundary): saved"),
    EndReason("give_up", 78, "finished", "the trainer gave up (rollback cap, no checkpoint to roll back to)"),
    EndReason("hang", 77, "hang", "the hang watchdog ended the segment (stacks dumped, suspects named)"),
    EndReason("preflight", 76, "preflight", "the preflight (kit doctor) failed on a node before training"),
    EndReason("disk_full", 79, "disk_full", "a checkpoint save found its filesystem full (or over quota): the save "
              "abandoned on every rank, the previous checkpoint kept; the chain ends, no node blamed unless its own "
              "disk filled (kit.diskfull)"),
)
REASONS = {r.name: r for r in END_REASONS}
REQUEUE_REASONS = tuple(r.name for r in END_REASONS if r.requeue)
FINISHED_REASONS = tuple(r.name for r in END_REASONS if r.outcome == "finished")


def end_outcome(reason: str) -> str:
    """The chain's outcome for a segment-end reason ("crash" for anything unknown)."""
    r = REASONS.get(reason)
    return r.outcome if r else "crash"


# --------------------------------------------------------------------------------------- the kinds

_S = "the trainer (rank 0)"
_C = "the chain's driver (rank 0) or kit submit/stop/cancel"

SPECS: tuple[EventSpec, ...] = (
    # ---- the run and its chain
    EventSpec("run_created", "a run directory was created and its recipe frozen", "kit train/submit/demo", (
        req("name", "str", "run.name"), req("config_digest", "str", "hash of what determines the arithmetic"))),
    EventSpec("chain_submitted", "kit submit queued the chain's first job", _C, (
        req("job_id", "str", "Slurm (or local) job id"), opt("executor", "str", "slurm or local"),
        opt("signal_lead_s", "float", "seconds before the time limit Slurm signals the job"),
        opt("time_limit", "str", "slurm.time_limit"), opt("nodes", "int", "nodes per allocation"),
        opt("excluded", "strs", "nodes excluded from the job"))),
    EventSpec("segment_started", "a training segment finished its set-up and is about to train", _S, (
        req("world_size", "int", "ranks, all of them (tensor x pipeline x data)"),
        req("step", "int", "the step it resumes at"),
        opt("resumed_from", "str", "checkpoint tag ('' from scratch)"), opt("host", "str", "rank 0's host"),
        opt("pid", "int", "rank 0's pid"), opt("max_steps", "int", "trainer.max_steps"),
        opt("global_batch", "int", "samples per step"), opt("job_id", "str", "Slurm job id"),
        opt("restarts", "int", "SLURM_RESTART_COUNT"), opt("versions", "dict", "torch, deepspeed, transformers..."),
        opt("layout", "dict", "parallel layout: tensor, pipeline, data"),
        opt("startup", "dict", "Unix time at the end of each start-up phase: process (started), trainer (built, "
            "after the rendezvous), data (ready), engine (built), resumed (checkpoint loaded)"))),
    EventSpec("segment_signalled", "the job received Slurm's signal (time limit or preemption)", _C, (
        req("signal", "str", "signal name (SIGUSR2, SIGTERM)"), opt("job_id", "str", "Slurm job id"))),
    EventSpec("segment_ended", "a training segment ended (the trainer, or the hang watchdog)", _S, (
        req("reason", "str", "why: one of the segment-end reasons below"), req("step", "int", "last step trained"),
        opt("exit_code", "int", "the segment's exit status"), opt("signal", "str", "the signal that ended it"),
        opt("suspect_nodes", "strs", "a hang's suspects; disk_full: the nodes whose own disk filled"))),
    EventSpec("chain_requeued", "the chain continues: the same job requeued, or a new one submitted", _C, (
        req("job_id", "str", "the job that runs next"), req("reason", "str", "the previous segment's outcome"),
        opt("how", "str", "requeue or resubmit"), opt("delay_s", "float", "backoff before it may start"),
        opt("previous_job_id", "str", "the job it follows"))),
    EventSpec("chain_ended", "the chain ended", _C, (
        req("reason", "str", "done, stop, cancelled, crash_loop, max_segments, chain_deadline, give_up..."),
        opt("job_id", "str", "the last job"), opt("step", "int", "last step"), opt("note", "str", "why, in words"))),
    EventSpec("allocation_started", "an allocation of the chain began (before the trainer)", _C, (
        req("job_id", "str", "Slurm job id"), req("nodes", "strs", "its nodes"),
        opt("restarts", "int", "SLURM_RESTART_COUNT"), opt("world_size", "int", "ranks"),
        opt("gpus", "strs", "GPU names (NVML)"), opt("driver", "str", "NVIDIA driver"),
        opt("image", "str", "container image"), opt("executor", "str", "slurm or local"),
        opt("excluded", "strs", "excluded nodes"), opt("ckpt_step", "int", "newest checkpoint at start"),
        opt("job_end", "float", "Unix time Slurm ends the allocation"))),
    EventSpec("allocation_ended", "an allocation of the chain ended, with the chain's decision", _C, (
        req("job_id", "str", "Slurm job id"),
        req("outcome", "str", "clean, finished, crash, hang, preflight, disk_full, lost"),
        opt("reason", "str", "the trainer's reason or the crash detail"), opt("step", "int", "last step"),
        opt("ckpt_step", "int", "newest checkpoint at the end"), opt("exit_codes", "dict", "rank -> exit status"),
        opt("implicated", "strs", "nodes blamed"), opt("decision", "str", "end, requeue or resubmit"),
        opt("seg_ended", "str", "the segment a later allocation found lost"))),
    EventSpec("node_excluded", "a node implicated in a failure is excluded from later segments", _C, (
        req("node", "str", "node name"), req("reason", "str", "why"))),
    # ---- training
    EventSpec("step", "one optimizer step's metrics (every trainer.log_interval steps)", _S, (
        req("step", "int", "the optimizer step just completed"),
        *(Field(m.name, _metric_type(m), m.doc, m.name == "loss", m.nonfinite) for m in STEP_METRICS),
    ), bulk=True),
    EventSpec("data_ready", "the data is prepared (tokenizer and shards)", _S, (
        req("sources", "strs", "source names"), req("tokens", "int", "tokens in all shards"))),
    EventSpec("data_skipped", "the trainer jumped over a skip range of samples", _S, (
        req("step", "int", "the step about to run"), req("start", "int", "first sample skipped"),
        req("end", "int", "first sample not skipped"))),
    # ---- checkpoints
    EventSpec("ckpt_saved", "a checkpoint is complete (its manifest written)", _S, (
        req("step", "int", "step"), req("tag", "str", "folder name"), req("bytes", "int", "size of its files"),
        req("seconds", "float", "total time of the save"), opt("reason", "str", "interval, save-now, signal..."),
        opt("consumed", "int", "samples consumed"),
        opt("stall_s", "float", "how long the step loop paused for it (async saves: the wait for the previous "
            "save, if any, and the snapshot)"),
        opt("wait_s", "float", "of stall_s: waiting for the previous save still in flight"),
        opt("async", "bool", "written by the background writer (false: synchronously, at least partly)"))),
    EventSpec("ckpt_loaded", "a segment resumed from a checkpoint", _S, (
        req("step", "int", "its step"), req("tag", "str", "its tag"),
        opt("skipped", "strs", "newer checkpoints passed over, and why"),
        opt("seconds", "float", "DeepSpeed's load and the RNG states"))),
    EventSpec("ckpt_deleted", "retention (or the stream) deleted a checkpoint", "trainer, kit stream", (
        req("tag", "str", "tag"), opt("where", "str", "local or remote"), opt("url", "str", "remote URL"),
        opt("reason", "str", "why"))),
    EventSpec("ckpt_verified", "a checkpoint or export was checked against its manifest", "kit stream/convert", (
        req("tag", "str", "tag"), req("ok", "bool", "it matched"), opt("where", "str", "local, remote, export"),
        opt("url", "str", "remote URL"), opt("problems", "strs", "what did not match"),
        opt("hashes", "bool", "hashes checked (not only sizes)"),
        opt("weights_identical", "bool", "export: every weight equals the checkpoint's"),
        opt("differing_weights", "strs", "export: the first weights that differ"),
        opt("weights_compared", "int", "export: tensors compared"),
        opt("weights_compared_by", "dict", "export: how many by saved_crc32, crc32, bytes"),
        opt("bit_identical", "bool", "export: the first blocks' logits are bit-identical"),
        opt("max_abs_diff", "float", "export: largest logit difference", nonfinite=True),
        opt("atol", "float", "export: the tolerance"),
        opt("logits_layers", "int", "export: blocks in the logits check"),
        opt("reference", "str", "export: what it was compared with"), opt("dtype", "str", "export: bf16, fp32"),
        opt("batch", "ints", "export: the logits check's batch shape"))),
    EventSpec("ckpt_converted", "kit convert wrote a Hugging Face export", "kit convert", (
        req("tag", "str", "tag"), req("out", "str", "where"), opt("step", "int", "step"),
        opt("dtype", "str", "bf16, fp32"), opt("shards", "int", "safetensors files"),
        opt("bytes", "int", "weights' bytes"),
        opt("seconds", "float", "conversion time (before verification)"),
        opt("verified", "bool", "the verification passed (absent: --no-verify)"))),
    EventSpec("ckpt_uploaded", "a checkpoint or export reached its destination", "kit upload/stream", (
        req("tag", "str", "tag"), req("url", "str", "destination"), opt("step", "int", "step"),
        opt("sent", "int", "files sent"), opt("skipped", "int", "files already there"),
        opt("bytes", "int", "bytes sent"), opt("seconds", "float", "time"), opt("what", "str", "checkpoint, export"))),
    EventSpec("ckpt_reshaped", "kit reshape made a checkpoint resumable on another layout", "kit reshape", (
        req("tag", "str", "tag"), req("world_size", "int", "ranks of the new layout"),
        opt("from_world_size", "int", "old ranks"), opt("kept_as", "str", "where the original was kept"),
        opt("layout", "dict", "new layout: tensor, pipeline, data"), opt("from_layout", "dict", "old layout"),
        opt("grad_accum", "int", "batch.grad_accum of the new layout"))),
    # ---- health and incidents
    EventSpec("health", "a node's health sample: GPUs (NVML) and host (psutil)", "each node's sampler", (
        req("node", "str", "node name"), opt("gpus", "list", "one object per GPU (see health.md)"),
        opt("host", "dict", "cpu_pct, mem_pct, mem_used_gib, mem_avail_gib, load1, fs_free_gib, net_*"),
        opt("driver", "str", "NVIDIA driver version")), bulk=True),
    EventSpec("nvml_absent", "NVML is not available on a node (CPU nodes): GPU health is N/A", "each node's sampler", (
        req("node", "str", "node name"), req("reason", "str", "NVML's error"))),
    EventSpec("hang", "the hang watchdog found no progress within its bound", "the watchdog (reporting rank)", (
        opt("bound_s", "float", "the bound that was exceeded"), opt("stalled_s", "float", "time since progress"),
        opt("step", "int", "last completed step"), opt("phase", "str", "setup, step, save, rollback"),
        opt("suspect_ranks", "ints", "ranks whose stacks differ"), opt("suspect_nodes", "strs", "their nodes"),
        opt("missing_ranks", "ints", "ranks that dumped no stack"), opt("groups", "list", "stack groups"),
        opt("stacks", "str", "folder of the stack dumps"),
        opt("suspect_coords", "list", "each suspect's rank, node, tensor, pipeline, data (kit.parallel.layout)"))),
    EventSpec("straggler", "a rank is slower than the others", _S, (
        req("rank", "int", "global rank"), req("slowdown", "float", "fraction slower than the median"),
        opt("step", "int", "step"), opt("node", "str", "its node"), opt("gpu", "int", "its CUDA device (-1: none)"),
        opt("tensor", "int", "its tensor rank"), opt("pipeline", "int", "its pipeline stage"),
        opt("data", "int", "its data-parallel replica"),
        opt("local_rank", "int", "local rank"), opt("fwd_s", "float", "its forward time"),
        opt("median_fwd_s", "float", "the others' median"),
        opt("bar", "float", "the slowdown its recent mean had to exceed (kit.stragglers)"),
        opt("noise", "float", "the run's window-to-window timing noise behind the bar"),
        opt("incident", "str", "its alert's incident ('' before one is opened)"),
        opt("state", "str", "open, opened, escalated"))),
    EventSpec("rank_timings", "every rank's phase timings (every health.straggler_interval steps)", _S, (
        req("step", "int", "step"), req("ranks", "list", "one object per rank: rank, host, gpu, slowdown, fwd_s..."),
        opt("bar", "float", "the straggler bar at this gather"), opt("noise", "float", "the timing noise")),
        bulk=True),
    EventSpec("spike", "the spike detector flagged a step", _S, (
        req("step", "int", "the flagged step"), opt("loss", "float", "the loss of the step", nonfinite=True),
        opt("metric", "str", "loss or grad_norm"), opt("value", "float", "the value judged", nonfinite=True),
        opt("median", "float", "the prediction", nonfinite=True),
        opt("size", "float", "how far above the prediction (0.5 = 50%)", nonfinite=True),
        opt("score", "float", "robust deviations above"), opt("nonfinite", "bool", "the value was NaN/inf"),
        opt("action", "str", "log, skip, rollback, give_up"), opt("why", "str", "the decision in words"),
        opt("policy", "str", "spikes.policy"), opt("threshold", "float", "spikes.threshold"),
        opt("window", "int", "spikes.window"), opt("consumed", "int", "samples before the step"),
        opt("samples", "int", "global batch"), opt("lr", "float", "learning rate"))),
    EventSpec("rollback", "the spike policy reloaded an earlier checkpoint", _S, (
        req("from_step", "int", "where training was"), req("to_step", "int", "the checkpoint's step"),
        opt("spike_step", "int", "the spike"), opt("tag", "str", "checkpoint"),
        opt("skip_start", "int", "first sample skipped"), opt("skip_end", "int", "first sample not skipped"),
        opt("skip_batches", "int", "batches skipped"), opt("rollbacks", "int", "rollbacks so far"),
        opt("why", "str", "why"), opt("note", "str", "how the target was chosen"),
        opt("deleted", "strs", "checkpoints deleted"), opt("set_aside", "strs", "checkpoints set aside"))),
    EventSpec("alert", "something an operator should know", "any writer", (
        req("severity", "str", "info, warning, error, critical"), req("message", "str", "what happened, what to do"),
        opt("step", "int", "step"), opt("node", "str", "node"), opt("rank", "int", "rank"),
        opt("tensor", "int", "the rank's tensor rank"), opt("pipeline", "int", "its pipeline stage"),
        opt("data", "int", "its data-parallel replica"),
        opt("suspect_ranks", "ints", "a hang's suspects"), opt("suspect_nodes", "strs", "their nodes"),
        opt("suspect_coords", "list", "their rank, node, tensor, pipeline, data"),
        opt("tag", "str", "checkpoint"), opt("condition", "str", "the condition's name (xid, nonfinite...)"),
        opt("incident", "str", "one id per incident: escalations of one incident share it"),
        opt("escalated", "bool", "this alert raises an open incident's severity (kit.alerts)"),
        opt("source", "str", "the data source (validation-loss alerts of kit.evaluation)"))),
    EventSpec("alert_ack", "an operator acknowledged an alert (the monitor)", "kit monitor", (
        req("alert_t", "float", "the alert's t"), opt("by", "str", "user"), opt("message", "str", "its message"),
        opt("incident", "str", "the incident acknowledged"),
        opt("severity", "str", "the severity acknowledged: a later escalation asks again"))),
    EventSpec("control_ack", "the trainer consumed a control switch", _S, (
        req("switch", "str", "stop or save-now"), req("step", "int", "step it acted at"),
        opt("note", "str", "the switch file's text"))),
    EventSpec("doctor", "a node's preflight result", "kit doctor (every rank)", (
        req("ok", "bool", "every check passed"), req("checks", "list", "one object per check"),
        opt("node", "str", "this rank's node"), opt("rank", "int", "rank"), opt("world_size", "int", "ranks"),
        opt("failed_nodes", "strs", "nodes that failed"), opt("shared_failures", "strs", "checks failed on every node"),
        opt("slowest_node", "str", "the node the bandwidth test found slowest"),
        opt("busbw_gbps", "float", "all-reduce bus bandwidth"), opt("algbw_gbps", "float", "algorithm bandwidth"),
        opt("node_scores", "dict", "per node"), opt("node_measures", "dict", "per node"),
        opt("seconds", "float", "wall time of this rank's preflight (checks, rendezvous, all-reduce)"),
        opt("layout", "dict", "the recipe's layout at this world: tensor, pipeline, data (absent: data parallel)"),
        opt("groups", "list", "each tensor group's all-reduce and pipeline pair's send/recv: dim, name, "
            "ranks, nodes, time_ms, gbps, ratio to the median"))),
    # ---- added later (KIND_CODES: append only)
    EventSpec("amended", "the run's frozen run.toml was changed (kit amend, --amend on kit train/submit)",
              "kit amend/train/submit", (
                  req("changes", "list", "one object per key: key, old, new"), opt("by", "str", "which command"),
                  opt("reason", "str", "the operator's --reason"), opt("notes", "strs", "what follows from it"),
                  opt("config_digest", "str", "hash of what determines the arithmetic (unchanged)"))),
    EventSpec("chain_submit_failed", "a submission failed once a job may have been queued", "kit submit", (
        req("error", "str", "what failed"), opt("cancelled", "strs", "jobs cancelled"),
        opt("still_queued", "strs", "jobs that could not be cancelled (recorded as the chain's)"))),
    EventSpec("segment_first_step", "a segment completed its first step: the end of its start-up", _S, (
        req("step", "int", "the step"), opt("startup_s", "float", "seconds since rank 0's process started"),
        opt("setup_s", "float", "seconds since the trainer was built (after the rendezvous)"))),
    EventSpec("alert_cleared", "the condition behind an incident is over (kit.alerts)", "any writer", (
        req("incident", "str", "the incident"), opt("message", "str", "what ended"),
        opt("condition", "str", "the condition's name"), opt("step", "int", "step"), opt("node", "str", "node"),
        opt("rank", "int", "rank"), opt("gpu", "int", "GPU index"),
        opt("tensor", "int", "the rank's tensor rank"), opt("pipeline", "int", "its pipeline stage"),
        opt("data", "int", "its data-parallel replica"))),
    EventSpec("eval", "validation on the held-out data of every source (kit.evaluation, docs/eval.md)",
              "the trainer (rank 0); kit eval --record; kit stream --eval", (
        req("step", "int", "the step evaluated (after its update)"),
        req("sources", "dict", "per source: language, loss, ppl, tokens (predicted), sequences"),
        opt("by", "str", "live (the trainer), checkpoint or export (kit eval --record), stream (kit stream --eval)"),
        opt("loss", "float", "mean next-token loss over every source's tokens", nonfinite=True),
        opt("ppl", "float", "exp(loss)", nonfinite=True), opt("tokens", "int", "predicted tokens scored"),
        opt("seconds", "float", "wall time of the evaluation (rank 0; kit eval: the whole command)"),
        opt("eval_s", "float", "the slowest rank's scoring time"),
        opt("step_s", "float", "the slowest rank's mean step time since the last evaluation"),
        opt("fraction", "float", "eval_s over the training time of the interval (null: no step timed)"),
        opt("interval_steps", "int", "the interval from now on (eval.interval_steps x stretch)"),
        opt("stretch", "int", "the interval's multiple of eval.interval_steps (eval.max_fraction)"),
        opt("note", "str", "why the interval changed"), opt("dp", "int", "data-parallel ranks that scored it"),
        opt("incidents", "strs", "sources with an open validation-loss alert"),
        opt("recovered", "strs", "sources whose incident closed at this evaluation"),
        opt("tag", "str", "the checkpoint scored (kit eval, kit stream)"), opt("dtype", "str", "bf16 or fp32"),
        opt("live_max_abs_diff", "float", "largest absolute loss difference from the live evaluation of that step"))),
)

KINDS = {s.kind: s for s in SPECS}
BULK_KINDS = frozenset(s.kind for s in SPECS if s.bulk)
# kind -> required fields (beyond the envelope): the writer's check, and the compatibility name.
EVENTS: dict[str, tuple[str, ...]] = {s.kind: s.required for s in SPECS}
# Kind codes in the index files: append only (a code never changes meaning).
KIND_CODES: tuple[str, ...] = tuple(s.kind for s in SPECS)

"""Run recipes: one TOML file describes a whole run, loaded into typed, validated dataclasses.

Why dataclasses and not a dict: every component reads typed fields, a typo fails at load time with
the dotted key and the nearest valid one, and the resolved recipe is frozen into the run directory
(``run.toml``) so that every segment of a months-long chain runs the same thing.

Each section owns a ``@dataclass(kw_only=True, slots=True)`` with a docstring under every field and
its own checks in ``__post_init__``; cross-section checks live in :meth:`RunConfig.check`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kit import validation as rules
from kit.errors import ConfigError
from kit.recipe import (  # loading and writing recipes (re-exported: `from kit.config import load_recipe`)
    apply_override,
    builtin_recipe,
    builtin_recipes,
    describe_keys,
    dumps_toml,
    from_dict,
    load_recipe,
)
from kit.validation import show as _show

# ----------------------------------------------------------------------------------------- sections


@dataclass(kw_only=True, slots=True)
class RunSection:
    name: str = "tiny"
    """Run name: the run directory is ``<runs_dir>/<name>`` and the Slurm job name is ``kit-<name>``."""
    runs_dir: str = "runs"
    """Where run directories live (a shared filesystem on a cluster). Relative paths are relative to
    the current directory when the recipe is loaded, then frozen as absolute paths."""
    seed: int = 1234
    """Seed for model init (the same initial weights at every layout, docs/parallel.md), data order and
    dropout. Same seed + same world size = same run."""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ \t\n") or self.name.startswith("."):
            raise ConfigError(f"run.name must be a plain folder name (no spaces or slashes), got {self.name!r}")
        if not self.runs_dir.strip():
            raise ConfigError("run.runs_dir must not be empty (use \".\" for the current directory)")
        if self.seed < 0:
            raise ConfigError(f"run.seed must be >= 0, got {self.seed}")


@dataclass(kw_only=True, slots=True)
class ModelSection:
    """A BLOOM-architecture model (transformers' BloomForCausalLM), built from these shapes."""

    hidden_size: int = 64
    """Width of the model (BLOOM-176B: 14336)."""
    n_layer: int = 2
    """Number of transformer blocks (BLOOM-176B: 70)."""
    n_head: int = 4
    """Attention heads; hidden_size must be a multiple of it (BLOOM-176B: 112)."""
    seq_length: int = 32
    """Tokens per sample (BLOOM: 2048)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (BLOOM: 0.0)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (BLOOM: 0.0)."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    initializer_range: float = 0.02
    """Std of the normal init (BLOOM-176B used 0.0048)."""
    activation_checkpointing: bool = False
    """Recompute activations in backward (BLOOM did; costs ~33% more compute, counted in TFLOP/s)."""
    attn_implementation: str = "eager"
    """transformers attention kernel. Only "eager" exists for BLOOM in transformers 5 (its attention
    adds the alibi bias to materialised scores); "sdpa" is refused here rather than at model build."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "n_layer", "n_head", "seq_length"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be greater than 0, got {getattr(self, key)}")
        if self.hidden_size % self.n_head:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be a multiple of model.n_head ({self.n_head})"
            )
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        for key in ("layer_norm_epsilon", "initializer_range"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be greater than 0, got {getattr(self, key)}")
        if self.attn_implementation == "sdpa":
            raise ConfigError('model.attn_implementation = "sdpa" is not available: transformers has no SDPA '
                              'kernel for BLOOM (it refuses it when the model is built); use "eager"')
        if self.attn_implementation != "eager":
            raise ConfigError(f'model.attn_implementation must be "eager", got {self.attn_implementation!r}')


SOURCE_FORMATS = ("text", "jsonl", "parquet", "gettext")


@dataclass(kw_only=True, slots=True)
class SourceSection:
    """One data source of the mixture, with its language/source label."""

    name: str
    """Label used in the ledger, the postmortem and the shard file names."""
    path: str
    """File, folder or glob. For format "gettext", a locale folder such as /usr/share/locale."""
    format: str = "text"
    """text (documents separated by blank lines), jsonl (a "text" field per line), parquet (a
    "text" column) or gettext (the msgstr strings of compiled .mo catalogues)."""
    language: str = ""
    """Language code, for the mixture report and the spike postmortem ("mul" for mixed sources)."""
    weight: float = 0.0
    """Sampling weight. 0 means: derived from the source's size with data.alpha smoothing."""
    languages: list[str] = field(default_factory=list)
    """gettext only: restrict to these locale folders (empty = all)."""
    max_bytes: int = 0
    """Stop reading this source after this many bytes of text (0 = all)."""

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ConfigError(f"data.sources[{self.name}].format must be one of {SOURCE_FORMATS}, got {self.format!r}")
        if not self.name or any(c in self.name for c in "/\\") or self.name.strip() != self.name:
            raise ConfigError(f"data.sources[{self.name}].name must be a plain label (it names shard files), "
                              f"got {self.name!r}")
        if not self.path.strip():
            raise ConfigError(f"data.sources[{self.name}].path must not be empty")
        if self.weight < 0:
            raise ConfigError(f"data.sources[{self.name}].weight must be >= 0, got {self.weight}")
        if self.max_bytes < 0:
            raise ConfigError(f"data.sources[{self.name}].max_bytes must be >= 0 (0 = all), got {self.max_bytes}")
        if self.languages and self.format != "gettext":
            raise ConfigError(f"data.sources[{self.name}].languages only applies to format \"gettext\" "
                              f"(this source is {self.format!r}); remove it")


@dataclass(kw_only=True, slots=True)
class DataSection:
    sources: list[SourceSection] = field(default_factory=list)
    """The mixture: one entry per source ([[data.sources]] tables)."""
    tokenizer: str = ""
    """An existing tokenizer.json to reuse. Empty: train a byte-level BPE on the run's own data."""
    vocab_size: int = 1024
    """Vocabulary size of the BPE trained on the data (BLOOM: 250880). Also the model's vocab."""
    alpha: float = 0.3
    """Smoothing exponent for derived weights, p_i ~ size_i ** alpha (BigScience smoothed languages)."""
    prepared: str = ""
    """Where tokenized shards live. Empty: <run dir>/data (prepared once, reused by every segment)."""

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ConfigError(f"data.vocab_size must be at least 260 (256 bytes + specials), got {self.vocab_size}")
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"data.alpha must be in (0, 1], got {self.alpha}")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"data.sources: names must be unique, repeated: {', '.join(dupes)}")


@dataclass(kw_only=True, slots=True)
class OptimSection:
    lr: float = 1e-3
    """Peak learning rate after warm-up (BLOOM-176B: 6e-5)."""
    min_lr: float = 1e-4
    """Floor of the cosine decay (BLOOM-176B: 6e-6)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    decay_steps: int = 0
    """Cosine decay length in steps after warm-up; 0 = until trainer.max_steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (BLOOM: 0.1)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (BLOOM: 0.95)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0 = off)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be greater than 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps must be greater than 0, got {self.eps}")


@dataclass(kw_only=True, slots=True)
class BatchSection:
    micro_batch_size: int = 4
    """Samples per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step. Global batch = micro_batch_size * grad_accum * data-parallel ranks."""

    def __post_init__(self) -> None:
        if self.micro_batch_size <= 0:
            raise ConfigError(f"batch.micro_batch_size must be greater than 0, got {self.micro_batch_size}")
        if self.grad_accum <= 0:
            raise ConfigError(f"batch.grad_accum must be greater than 0, got {self.grad_accum}")


@dataclass(kw_only=True, slots=True)
class DeepSpeedSection:
    zero_stage: int = 1
    """ZeRO stage 0, 1, 2 or 3 (BLOOM-176B: 1, with tensor and pipeline parallelism)."""
    precision: str = "fp32"
    """bf16 or fp32 (fp16 is not supported: it needs loss scaling and is refused on CPU)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config merged last, for settings the kit does not model. Keys the recipe models
    (ZeRO stage, precision, batch sizes, clipping, optimizer, scheduler, tensor/pipeline parallelism)
    are refused here, with the recipe key to use instead (kit.validation.DEEPSPEED_MODELLED)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f'deepspeed.precision must be "bf16" or "fp32", got {self.precision!r}')
        rules.check_deepspeed_extra(self.extra)


@dataclass(kw_only=True, slots=True)
class ParallelSection:
    """The layout of the ranks: tensor x pipeline x data parallel, as BLOOM-176B ran (TP4 x PP12 x DP8).

    Data parallelism is what is left of the world: ``world = tensor * pipeline * data``. Ranks are
    laid out tensor-fastest (the tensor group shares a node's NVLink), then pipeline, then data."""

    tensor: int = 1
    """Tensor-parallel degree (DeepSpeed AutoTP): each block's matrices split over this many ranks.
    Must divide model.n_head; needs ZeRO 1 or 2; keep it within a node (BLOOM-176B: 4). docs/parallel.md"""
    pipeline: int = 1
    """Pipeline stages (DeepSpeed PipelineModule): the blocks split into this many consecutive
    stages. At most model.n_layer; needs ZeRO 0 or 1 and batch.grad_accum >= pipeline (BLOOM-176B: 12)."""

    def __post_init__(self) -> None:
        for key in ("tensor", "pipeline"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be at least 1, got {getattr(self, key)}")

    @property
    def model_parallel(self) -> int:
        """Ranks that hold one copy of the model between them (tensor x pipeline)."""
        return self.tensor * self.pipeline


# Named clusters for `kit plan` ([cluster] preset). Per GPU: dense bf16 peak (TFLOP/s), HBM size (GiB)
# and bandwidth (GB/s), NVLink bandwidth per direction (GB/s), the node's inter-node bandwidth divided
# by its GPUs (GB/s), GPUs per node, and the fraction of peak the training's matmuls reach.
# jean-zay-a100: A100-SXM4-80GB, 4 x 100 Gb/s Omni-Path per node (BLOOM paper, section 3.4).
# h100: H100-SXM5-80GB, NVLink4, 8 x 400 Gb/s InfiniBand per node (DGX H100 class).
# matmul_efficiency: docs/plan.md says where these come from (calibrated on a single-node
# Megatron-DeepSpeed measurement on Jean Zay, carried to H100 by the ratio of measured best matmuls).
CLUSTER_PRESETS: dict[str, dict[str, float]] = {
    "jean-zay-a100": {"peak_tflops": 312.0, "hbm_gib": 80.0, "hbm_gbps": 2039.0, "nvlink_gbps": 300.0,
                      "internode_gbps": 6.25, "gpus_per_node": 8, "matmul_efficiency": 0.57},
    "h100": {"peak_tflops": 989.0, "hbm_gib": 80.0, "hbm_gbps": 3350.0, "nvlink_gbps": 450.0,
             "internode_gbps": 50.0, "gpus_per_node": 8, "matmul_efficiency": 0.53},
}
CLUSTER_KEYS = ("peak_tflops", "hbm_gib", "hbm_gbps", "nvlink_gbps", "internode_gbps", "gpus_per_node",
                "matmul_efficiency")


@dataclass(kw_only=True, slots=True)
class ClusterSection:
    """The hardware `kit plan` models the run on: a named preset (jean-zay-a100, h100), with any key
    below set to override the preset's value (0 = the preset's). Training itself never reads it."""

    preset: str = "jean-zay-a100"
    """Named cluster: "jean-zay-a100" (A100-80GB, 8 a node, Omni-Path 6.25 GB/s per GPU), "h100" (H100-80GB,
    8 a node, InfiniBand 50 GB/s per GPU), or "" to describe the cluster entirely with the keys below."""
    peak_tflops: float = 0.0
    """Dense bf16 peak per GPU, TFLOP/s (A100: 312, H100 SXM: 989)."""
    hbm_gib: float = 0.0
    """GPU memory per GPU, GiB (what a layout must fit in)."""
    hbm_gbps: float = 0.0
    """GPU memory bandwidth, GB/s (A100-80GB: 2039, H100 SXM: 3350): the speed of the memory-bound ops."""
    nvlink_gbps: float = 0.0
    """Intra-node GPU-to-GPU bandwidth per GPU and direction, GB/s (A100 NVLink3: 300, H100 NVLink4: 450)."""
    internode_gbps: float = 0.0
    """Inter-node bandwidth per GPU, GB/s: the node's network bandwidth divided by its GPUs
    (Jean Zay: 4 x 100 Gb/s / 8 = 6.25; 8 x 400 Gb/s InfiniBand / 8 = 50)."""
    gpus_per_node: int = 0
    """GPUs per node (tensor groups stay inside a node)."""
    matmul_efficiency: float = 0.0
    """Fraction of peak the training's matmuls reach, kernel gaps included (docs/plan.md: 0.57 on A100,
    0.53 on H100)."""

    def __post_init__(self) -> None:
        if self.preset and self.preset not in CLUSTER_PRESETS:
            near = difflib.get_close_matches(self.preset, CLUSTER_PRESETS, n=1, cutoff=0.4)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"cluster.preset {self.preset!r} is not a known cluster{hint} "
                              f"(known: {', '.join(CLUSTER_PRESETS)}; or \"\" and every cluster key set)")
        for key in CLUSTER_KEYS:
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"cluster.{key} must be a finite number >= 0 (0 = the preset's), got {value}")
            if not self.preset and value == 0:
                raise ConfigError(f'cluster.{key} must be set (> 0) when cluster.preset is "" (no preset to take '
                                  "it from)")
        if self.matmul_efficiency > 1:
            raise ConfigError(f"cluster.matmul_efficiency is a fraction of peak, at most 1, "
                              f"got {self.matmul_efficiency}")

    def resolved(self) -> ClusterSection:
        """Every key set: the preset's values, then the keys given here (0 = not given)."""
        base = CLUSTER_PRESETS.get(self.preset, {})
        def pick(key: str) -> float:
            return float(getattr(self, key) or base[key])

        return ClusterSection(preset=self.preset, peak_tflops=pick("peak_tflops"), hbm_gib=pick("hbm_gib"),
                              hbm_gbps=pick("hbm_gbps"), nvlink_gbps=pick("nvlink_gbps"),
                              internode_gbps=pick("internode_gbps"), gpus_per_node=int(pick("gpus_per_node")),
                              matmul_efficiency=pick("matmul_efficiency"))


@dataclass(kw_only=True, slots=True)
class CheckpointSection:
    interval_steps: int = 20
    """Save every this many optimizer steps (and at the end, on stop, and before a deadline)."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints..."""
    keep_every: int = 0
    """...and every checkpoint whose step is a multiple of N (0 = none), as BigScience kept every 1k."""
    verify_on_resume: bool = False
    """Hash every file against the manifest before resuming (sizes are always checked)."""
    async_save: bool = True
    """Save without stopping training for the write: the loop pauses only to copy the state to host
    memory (pinned memory on GPUs), then a background thread writes DeepSpeed's files, fsyncs and hashes
    them, and rank 0 writes the manifest last. A save still in flight when the next is due, at a
    rollback or at the segment's end is waited for. Needs host memory for one copy of each rank's
    state (it uses at most half of what is free; beyond that a save is written synchronously, with a
    warning). false = DeepSpeed writes in the loop (the stall is the whole save)."""
    stream_hold_max: int = 2
    """While a live `kit stream` has not shipped them yet, keep up to this many more checkpoints than
    keep_last (its remote keep-every ones first; 0 = retention ignores the stream). Bounded, so a
    stalled upload cannot fill the filesystem: past it, unshipped ones are deleted with a warning."""

    def __post_init__(self) -> None:
        if self.stream_hold_max < 0:
            raise ConfigError(f"checkpoint.stream_hold_max must be >= 0, got {self.stream_hold_max}")
        if self.interval_steps <= 0:
            raise ConfigError(f"checkpoint.interval_steps must be greater than 0, got {self.interval_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be at least 1, got {self.keep_last}")
        if self.keep_every < 0:
            raise ConfigError(f"checkpoint.keep_every must be >= 0, got {self.keep_every}")


@dataclass(kw_only=True, slots=True)
class TrainerSection:
    max_steps: int = 60
    """Optimizer steps of the whole run (all segments together)."""
    log_interval: int = 1
    """Write step metrics to the ledger and TensorBoard every N steps."""
    nproc: int = 2
    """Local ranks when run without Slurm (`kit train`, `kit demo`)."""
    deadline: str = ""
    """Stop (saving first) before this time: ISO 8601, or empty. Under Slurm the job's end time is
    used too, whichever is earlier."""
    stop_margin_s: float = 30.0
    """Minimum margin before a deadline; the trainer adds measured step and save times to it."""
    stop_after_steps: int = 0
    """End this segment (saving first) after this many steps, as if its allocation ended (0 = off).
    Used by the demo and the tests to simulate allocation boundaries."""
    peak_tflops: float = 0.0
    """Accelerator's dense bf16 peak for MFU (A100: 312, H100 SXM: 989). 0 = from the GPU name."""
    threads: int = 1
    """OMP/MKL threads per rank (keep it fixed: a different count changes the arithmetic)."""
    progress_s: float = 10.0
    """Rank 0 prints a live step line (step, loss, tokens/s, s/step, ETA) at a segment's first step,
    then every this many seconds, and at the last step; 0 = off. In the job's log under Slurm."""
    control_check_s: float = 10.0
    """Seconds between two looks at the run's control/ folder for an operator's stop or save-now (rank 0,
    at a step boundary; the first look is at the first step). A switch is honoured within this plus one
    step. A look is a directory listing, milliseconds on a loaded parallel filesystem: looking every
    step (0) costs percents of short steps there, and 0.5% of 2 s steps at 10 ms a look (bench/switches.py)."""

    def __post_init__(self) -> None:
        if self.control_check_s < 0 or not math.isfinite(self.control_check_s):
            raise ConfigError(f"trainer.control_check_s must be a number of seconds >= 0, got {self.control_check_s}")
        if self.max_steps <= 0:
            raise ConfigError(f"trainer.max_steps must be greater than 0, got {self.max_steps}")
        if self.log_interval <= 0:
            raise ConfigError(f"trainer.log_interval must be greater than 0, got {self.log_interval}")
        if self.nproc <= 0:
            raise ConfigError(f"trainer.nproc must be greater than 0, got {self.nproc}")
        for key in ("stop_after_steps", "stop_margin_s", "peak_tflops"):
            if getattr(self, key) < 0:
                raise ConfigError(f"trainer.{key} must be >= 0 (0 = off), got {getattr(self, key)}")
        if self.threads < 1:
            raise ConfigError(f"trainer.threads must be at least 1, got {self.threads}")
        if self.progress_s < 0:
            raise ConfigError(f"trainer.progress_s must be >= 0 (0 = no step lines), got {self.progress_s}")
        if self.deadline:
            from datetime import datetime

            try:
                datetime.fromisoformat(self.deadline)
            except ValueError:
                raise ConfigError(
                    f"trainer.deadline must be an ISO 8601 time like 2026-12-01T06:00:00, got {self.deadline!r}"
                ) from None


@dataclass(kw_only=True, slots=True)
class SlurmSection:
    nodes: int = 1
    """Nodes per allocation (BLOOM-176B: 48)."""
    gpus_per_node: int = 0
    """GPUs per node; one task per GPU. 0 = CPU tasks (tasks_per_node)."""
    tasks_per_node: int = 0
    """Tasks per node when gpus_per_node is 0 (CPU runs); 0 = trainer.nproc."""
    cpus_per_task: int = 1
    """CPU cores per task."""
    mem_gb: float = 0
    """Memory per node in GB (0 = Slurm's default)."""
    partition: str = ""
    """Partition (empty = the cluster's default)."""
    account: str = ""
    """Account to charge."""
    qos: str = ""
    """Quality of service."""
    reservation: str = ""
    """Reservation name."""
    time_limit: str = "20:00:00"
    """Wall time of one allocation: [D-]HH:MM:SS, D-HH[:MM], MM:SS or minutes (sbatch --time). Jean Zay
    gave BLOOM 20 h."""
    exclude: list[str] = field(default_factory=list)
    """Nodes never to use (the chain adds nodes implicated in failures)."""
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    """Extra sbatch parameters, passed to submitit's slurm_additional_parameters (e.g. gres, constraint).
    Options the recipe models (time, nodes, tasks, cpus, mem, partition, account, qos, reservation,
    exclude, job name, signal) are refused, naming the key to use (kit.validation.SBATCH_MODELLED)."""
    srun_args: list[str] = field(default_factory=list)
    """Extra srun arguments."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"slurm.nodes must be at least 1, got {self.nodes}")
        for key in ("gpus_per_node", "tasks_per_node"):
            if getattr(self, key) < 0:
                zero = "CPU tasks" if key == "gpus_per_node" else "trainer.nproc"
                raise ConfigError(f"slurm.{key} must be >= 0 (0 = {zero}), got {getattr(self, key)}")
        if self.cpus_per_task < 1:
            raise ConfigError(f"slurm.cpus_per_task must be at least 1, got {self.cpus_per_task}")
        if self.mem_gb < 0:
            raise ConfigError(f"slurm.mem_gb must be >= 0 (0 = Slurm's default), got {self.mem_gb}")
        rules.check_time_limit("slurm.time_limit", self.time_limit)
        for key in ("partition", "account", "qos", "reservation"):
            rules.check_word(f"slurm.{key}", getattr(self, key))
        rules.check_names("slurm.exclude", self.exclude)
        rules.check_sbatch_args(self.sbatch_args)
        for i, arg in enumerate(self.srun_args):
            if not arg.strip():
                raise ConfigError(f"slurm.srun_args[{i}] is empty")

    @property
    def time_limit_s(self) -> float:
        """The time limit in seconds (validated when the recipe was loaded)."""
        return rules.check_time_limit("slurm.time_limit", self.time_limit)


@dataclass(kw_only=True, slots=True)
class ChainSection:
    max_segments: int = 200
    """Stop the chain after this many segments (a four-month run on 20 h needs ~150)."""
    deadline: str = ""
    """Do not start segments after this ISO 8601 time (empty = none)."""
    crash_loop_limit: int = 3
    """Stop with an alert after this many segments in a row end without progress."""
    backoff_s: float = 60.0
    """Delay before resubmitting after a crash, doubled per consecutive crash."""
    signal_lead_s: int = 0
    """Seconds before the time limit that Slurm signals the job; 0 = derived from save time."""

    def __post_init__(self) -> None:
        if self.max_segments < 1:
            raise ConfigError(f"chain.max_segments must be at least 1, got {self.max_segments}")
        if self.crash_loop_limit < 1:
            raise ConfigError(f"chain.crash_loop_limit must be at least 1, got {self.crash_loop_limit}")
        if self.backoff_s < 0 or self.signal_lead_s < 0:
            raise ConfigError("chain.backoff_s and chain.signal_lead_s must be >= 0")
        if self.deadline:
            from datetime import datetime

            try:
                datetime.fromisoformat(self.deadline)
            except ValueError:
                raise ConfigError(
                    f"chain.deadline must be an ISO 8601 time like 2026-12-01T06:00:00, got {self.deadline!r}"
                ) from None


@dataclass(kw_only=True, slots=True)
class ContainerSection:
    image: str = ""
    """Apptainer image (.sif) each segment runs in; empty = the host environment."""
    binds: list[str] = field(default_factory=list)
    """Bind mounts, "src[:dst[:opts]]" (scratch, checkpoint filesystems, /dev/infiniband)."""
    target: str = ""
    """Image target of containers/pins.toml (a100, h100) the preflight checks against."""

    def __post_init__(self) -> None:
        for i, b in enumerate(self.binds):
            if not b.split(":")[0].strip():
                raise ConfigError(f"container.binds[{i}] must be \"src[:dst[:opts]]\", got {b!r}")


@dataclass(kw_only=True, slots=True)
class HealthSection:
    enabled: bool = True
    """Sample GPU (NVML) and host (psutil) health on local rank 0 of each node."""
    period_s: float = 10.0
    """Seconds between health samples (thresholds are checked at every sample)."""
    record_every: int = 6
    """Write every Nth sample to the node's ledger file, and every sample that raised an alert
    (8 GPUs: ~5 KB a sample; at 10 s and N = 6, ~7 MB a node a day)."""
    gpu_temp_max_c: float = 85.0
    """Alert above this GPU temperature (C)."""
    hang_floor_s: float = 300.0
    """The hang watchdog never fires sooner than this after the last completed step."""
    hang_ceiling_s: float = 1800.0
    """...and always fires after this."""
    hang_factor: float = 10.0
    """Bound = clamp(factor * recent median step time, floor, ceiling)."""
    straggler_interval: int = 50
    """Gather per-rank timings every N steps (0 = off)."""
    straggler_threshold: float = 0.05
    """The smallest slowdown reported: a rank's forward time over the other ranks' median, minus one
    (BLOOM found a GPU 5% slow). A rank is a straggler when, over the last straggler_windows gathers,
    it is slower than this in straggler_persist of them and its mean slowdown is also more than
    straggler_noise_k standard errors of the run's own timing noise (kit.stragglers)."""
    straggler_noise_k: float = 5.0
    """How many standard errors of the run's measured window-to-window noise the mean slowdown over
    straggler_windows must exceed (5: noise alone practically never does)."""
    straggler_windows: int = 5
    """Gathers a straggler call looks back over (and the earliest gather it can be made at); an
    alert escalates to an error when its rank stays flagged for this many more."""
    straggler_persist: int = 3
    """Of straggler_windows gathers, how many must each show the slowdown (1: one slow gather is enough)."""
    watchdog: bool = True
    """Run the hang watchdog (one thread per rank); independent of ``enabled`` (the sampler)."""
    hang_grace_s: float = 30.0
    """After the watchdog fires, how long the reporting rank waits for the other ranks' stack dumps."""
    setup_timeout_s: float = 3600.0
    """The watchdog's bound from a segment's start to its first step: rendezvous, NCCL and DeepSpeed
    set-up, loading the checkpoint (BLOOM-176B's 2.3 TB took minutes; allow for a slow filesystem)."""
    exit_grace_s: float = 60.0
    """Once a segment has ended (``segment_ended``, or another rank's process exited), how long a rank's
    process may take to exit by itself before its launcher terminates it, then kills it 10 s later (a
    frozen rank never exits; waiting on it would hold the allocation and miss the next rendezvous)."""
    host_mem_max_pct: float = 95.0
    """Alert when the node's memory use is above this percentage."""
    disk_min_free_gib: float = 50.0
    """Alert when the run directory's filesystem (checkpoints) has less free space than this (GiB)."""

    def __post_init__(self) -> None:
        if self.record_every < 1:
            raise ConfigError(f"health.record_every must be at least 1, got {self.record_every}")
        for key in ("period_s", "hang_floor_s", "hang_factor", "hang_grace_s", "setup_timeout_s", "exit_grace_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"health.{key} must be greater than 0, got {getattr(self, key)}")
        if self.hang_ceiling_s < self.hang_floor_s:
            raise ConfigError(f"health.hang_ceiling_s ({self.hang_ceiling_s}) must be at least "
                              f"health.hang_floor_s ({self.hang_floor_s})")
        if self.straggler_interval < 0:
            raise ConfigError(f"health.straggler_interval must be >= 0, got {self.straggler_interval}")
        if self.straggler_threshold <= 0:
            raise ConfigError(f"health.straggler_threshold must be greater than 0, got {self.straggler_threshold}")
        if self.gpu_temp_max_c <= 0:
            raise ConfigError(f"health.gpu_temp_max_c must be greater than 0, got {self.gpu_temp_max_c}")
        if not 0 < self.host_mem_max_pct <= 100:
            raise ConfigError(f"health.host_mem_max_pct must be in (0, 100], got {self.host_mem_max_pct}")
        if self.disk_min_free_gib < 0:
            raise ConfigError(f"health.disk_min_free_gib must be >= 0, got {self.disk_min_free_gib}")
        if self.straggler_noise_k < 0:
            raise ConfigError(f"health.straggler_noise_k must be >= 0, got {self.straggler_noise_k}")
        if not 1 <= self.straggler_persist <= self.straggler_windows:
            raise ConfigError(f"health.straggler_persist must be between 1 and health.straggler_windows "
                              f"({self.straggler_windows}), got {self.straggler_persist}")


@dataclass(kw_only=True, slots=True)
class SpikesSection:
    policy: str = "log"
    """What to do on a loss spike: log, skip (no update for that batch) or rollback."""
    window: int = 50
    """Steps of history for the rolling median/MAD."""
    threshold: float = 6.0
    """A spike is a loss (or grad norm) more than this many robust deviations above its trend-aware
    prediction from the last ``window`` steps (docs/spikes.md)."""
    warmup_steps: int = 20
    """No detection before this many steps of history."""
    rollback_steps: int = 100
    """Roll back to the newest complete checkpoint at least this many steps before the spike."""
    skip_batches: int = 200
    """After a rollback, skip this many batches from the spike on (PaLM skipped 200-500)."""
    max_rollbacks: int = 5
    """Stop the chain with an alert after this many rollbacks."""
    min_rise: float = 0.05
    """...and at least this fraction above the prediction (0.05 = 5%): a floor for flat, quiet curves."""

    def __post_init__(self) -> None:
        if self.policy not in ("log", "skip", "rollback"):
            raise ConfigError(f'spikes.policy must be "log", "skip" or "rollback", got {self.policy!r}')
        for key in ("window", "warmup_steps", "skip_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"spikes.{key} must be at least 1, got {getattr(self, key)}")
        if self.window < 3:
            raise ConfigError(f"spikes.window must be at least 3 steps, got {self.window}")
        if self.threshold <= 0:
            raise ConfigError(f"spikes.threshold must be greater than 0, got {self.threshold}")
        if self.rollback_steps < 0 or self.max_rollbacks < 0 or self.min_rise < 0:
            raise ConfigError("spikes.rollback_steps, spikes.max_rollbacks and spikes.min_rise must be >= 0")


@dataclass(kw_only=True, slots=True)
class DoctorSection:
    enabled: bool = True
    """Run the preflight on every node at the start of every segment."""
    min_busbw_gbps: float = 0.0
    """Fail the preflight below this all-reduce bus bandwidth (GB/s; 0 = report only)."""
    min_free_checkpoints: float = 2.0
    """Require free space for this many checkpoints on the checkpoint filesystem."""
    allreduce_mib: float = 64.0
    """Size of the all-reduce buffer of the bandwidth test (MiB; nccl-tests saturates from ~64 MiB)."""
    allreduce_iters: int = 10
    """Timed all-reduce iterations (after 2 warm-ups)."""
    timeout_s: float = 300.0
    """Give up on the process-group rendezvous and collectives after this long (a dead node hangs them)."""
    probe_mib: float = 16.0
    """Size of the write+fsync probe on the checkpoint filesystem (MiB)."""
    min_write_mbps: float = 0.0
    """Fail when the probe's write+fsync throughput is below this (MB/s; 0 = report only)."""
    bad_gpu_uuids: list[str] = field(default_factory=list)
    """GPUs known to be bad (UUIDs, e.g. from an earlier Xid): a node that shows one fails the preflight."""

    def __post_init__(self) -> None:
        for key in ("min_busbw_gbps", "min_free_checkpoints", "min_write_mbps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"doctor.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("allreduce_mib", "timeout_s", "probe_mib"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"doctor.{key} must be greater than 0, got {getattr(self, key)}")
        if self.allreduce_iters < 1:
            raise ConfigError(f"doctor.allreduce_iters must be at least 1, got {self.allreduce_iters}")


@dataclass(kw_only=True, slots=True)
class EvalSection:
    """Validation on held-out documents of every source, during training and offline (kit.evaluation,
    docs/eval.md). BigScience watched validation loss per language: it, more than the training loss,
    tells whether a spike did lasting damage and whether the mixture is balanced."""

    enabled: bool = True
    """Evaluate during training every ``interval_steps`` (the held-out split is set aside either way)."""
    interval_steps: int = 100
    """Evaluate after every step that is a multiple of this (the schedule is by step number, so it
    survives segment boundaries and resumes)."""
    heldout_fraction: float = 0.02
    """Share of each source's documents set aside at data preparation and never trained on (at least
    one document when the source has two or more). Chosen from run.seed and each document's text, so
    a re-prepare picks the same ones; recorded in the data's meta.json. Changes the training data."""
    heldout_docs: int = 0
    """A fixed number of held-out documents per source instead of ``heldout_fraction`` (0 = use the
    fraction). At most all but one of a source's documents."""
    sequences: int = 16
    """Held-out sequences of model.seq_length tokens scored per source at each evaluation: always the
    same ones (evenly spaced over the source's held-out tokens), so evaluations compare over time."""
    micro_batch_size: int = 0
    """Sequences per forward pass of the evaluation (0 = batch.micro_batch_size). It fixes the batches
    every evaluation uses, live and `kit eval`, so their numbers are identical."""
    max_fraction: float = 0.05
    """Bound on the cost: evaluation time over training time of an interval. When a measured evaluation
    costs more, the interval is stretched (doubled until it fits, never shortened below
    ``interval_steps``) and the eval event says so. 0 = no bound (the interval is never stretched)."""
    alert_margin: float = 0.05
    """Alert when a source's validation loss is more than this fraction above its best of the last
    ``alert_window`` evaluations (a spike that did lasting damage); one alert per incident."""
    alert_window: int = 10
    """Evaluations of history behind the "recent best" of ``alert_margin``."""

    def __post_init__(self) -> None:
        for key in ("interval_steps", "sequences", "alert_window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be at least 1, got {getattr(self, key)}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"eval.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        for key in ("heldout_docs", "micro_batch_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ConfigError(f"eval.max_fraction must be in [0, 1] (0 = no bound), got {self.max_fraction}")
        if self.alert_margin <= 0:
            raise ConfigError(f"eval.alert_margin must be greater than 0, got {self.alert_margin}")

    @property
    def holds_out(self) -> bool:
        """Whether data preparation sets documents aside at all."""
        return self.heldout_docs > 0 or self.heldout_fraction > 0


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """The whole recipe. Sections map one-to-one to TOML tables."""

    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    batch: BatchSection = field(default_factory=BatchSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    chain: ChainSection = field(default_factory=ChainSection)
    container: ContainerSection = field(default_factory=ContainerSection)
    health: HealthSection = field(default_factory=HealthSection)
    spikes: SpikesSection = field(default_factory=SpikesSection)
    doctor: DoctorSection = field(default_factory=DoctorSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def check(self) -> None:
        """Checks that span sections."""
        if self.optim.warmup_steps >= self.trainer.max_steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be less than "
                f"trainer.max_steps ({self.trainer.max_steps})"
            )
        if not self.data.sources:
            raise ConfigError("data.sources is empty: add at least one [[data.sources]] table with a name and a path")
        if self.eval.enabled and not self.eval.holds_out:
            raise ConfigError("eval.enabled = true needs held-out documents: set eval.heldout_fraction > 0 or "
                              "eval.heldout_docs > 0, or eval.enabled = false")
        if self.deepspeed.precision == "bf16" and self.deepspeed.zero_stage == 0:
            # DeepSpeed's bf16 optimizer wrapper needs ZeRO >= 1 to keep fp32 master weights.
            raise ConfigError("deepspeed.precision = \"bf16\" needs deepspeed.zero_stage >= 1 (fp32 master weights)")
        self.check_layout(self.world_size(local=False), "the Slurm allocation (slurm.nodes x tasks per node)")

    def check_layout(self, world: int, where: str) -> None:
        """The parallel layout fits the model and ``world`` ranks (``where`` names what sets it)."""
        p, m = self.parallel, self.model
        if m.n_head % p.tensor:
            raise ConfigError(f"parallel.tensor ({p.tensor}) must divide model.n_head ({m.n_head}): "
                              "tensor parallelism splits the attention heads")
        if p.pipeline > m.n_layer:
            raise ConfigError(f"parallel.pipeline ({p.pipeline}) must be at most model.n_layer ({m.n_layer}): "
                              "every stage needs at least one block")
        if p.pipeline > 1 and self.deepspeed.zero_stage > 1:
            raise ConfigError(f"deepspeed.zero_stage = {self.deepspeed.zero_stage} cannot be used with "
                              f"parallel.pipeline = {p.pipeline}: DeepSpeed's pipeline engine takes ZeRO 0 or 1 "
                              "(BLOOM-176B used ZeRO-1)")
        if p.tensor > 1 and self.deepspeed.zero_stage > 2:
            raise ConfigError(f"deepspeed.zero_stage = 3 cannot be used with parallel.tensor = {p.tensor}: kit shards "
                              "the blocks with AutoTP over ZeRO 1 or 2 (BLOOM-176B used ZeRO-1)")
        if p.pipeline > 1 and self.batch.grad_accum < p.pipeline:
            raise ConfigError(f"batch.grad_accum ({self.batch.grad_accum}) must be at least parallel.pipeline "
                              f"({p.pipeline}): each step's micro-batches fill the pipeline's stages")
        if world % p.model_parallel:
            raise ConfigError(f"{where} has {world} ranks, not a multiple of parallel.tensor x parallel.pipeline "
                              f"= {p.tensor} x {p.pipeline} = {p.model_parallel}")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.runs_dir) / self.run.name

    def world_size(self, local: bool = True) -> int:
        """All ranks: trainer.nproc locally, nodes x tasks per node under Slurm."""
        if local:
            return self.trainer.nproc
        per_node = self.slurm.gpus_per_node or self.slurm.tasks_per_node or self.trainer.nproc
        return self.slurm.nodes * per_node

    def data_parallel(self, local: bool = True) -> int:
        """Data-parallel ranks: the world divided by tensor x pipeline."""
        return self.world_size(local) // self.parallel.model_parallel

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def digest(self) -> str:
        """Hash of what determines the arithmetic (model, data, optimizer, batch, seed, ZeRO)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ARITHMETIC_SECTIONS}
        keep["seed"] = d["run"]["seed"]
        # The held-out split decides which documents are trained on (kit.data): part of the arithmetic.
        keep["heldout"] = [d["eval"]["heldout_fraction"], d["eval"]["heldout_docs"]]
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: RunConfig) -> list[Change]:
        """Every dotted key whose value differs from ``other``'s (self is the old side), in key order;
        not run.name and run.runs_dir: a run directory is where it is (a run moved or restored to
        another filesystem keeps its old runs_dir in run.toml, and is the same run)."""
        mine, theirs = flatten(self.to_dict()), flatten(other.to_dict())
        return [Change(k, mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k) and k not in IDENTITY_KEYS]


# What RunConfig.digest covers: a frozen run never changes these (its checkpoints hold their arithmetic).
ARITHMETIC_SECTIONS = ("model", "data", "optim", "batch", "deepspeed")
ARITHMETIC_KEYS = ("run.seed",)
IDENTITY_KEYS = ("run.name", "run.runs_dir")  # where the run is: a change would be another run


@dataclass(frozen=True, slots=True)
class Change:
    """One recipe key of a frozen run and the value asked for instead."""

    key: str
    old: Any
    new: Any

    @property
    def arithmetic(self) -> bool:
        return self.key.split(".")[0] in ARITHMETIC_SECTIONS or self.key in ARITHMETIC_KEYS

    def __str__(self) -> str:
        return f"{self.key} {_show(self.old)} -> {_show(self.new)}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists (data.sources, exclude) stay whole values, and raw
    tables (deepspeed.extra, slurm.sbatch_args) are compared as one value each."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


__all__ = [
    "ARITHMETIC_KEYS", "ARITHMETIC_SECTIONS", "IDENTITY_KEYS", "Change", "RunConfig", "apply_override",
    "builtin_recipe", "builtin_recipes", "describe_keys", "dumps_toml", "flatten", "from_dict", "load_recipe",
]

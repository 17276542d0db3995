"""Checks of recipe values that need a table or a grammar: Slurm time limits, the DeepSpeed and sbatch
keys the recipe models itself, and raw tables (``deepspeed.extra``, ``slurm.sbatch_args``) that must
hold plain values.

Why apart from kit.config: the sections' ``__post_init__`` stay short, and these tables are the one
place that says which raw DeepSpeed or sbatch key belongs to which recipe key (docs/recipes.md quotes
them). Every error names the dotted key and the key to use instead.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from typing import Any

from kit.errors import ConfigError

INT_LIMIT = 2**63  # TOML integers are 64-bit; anything beyond is a typo, and breaks float arithmetic

# ------------------------------------------------------------------------------------------ time


_TIME_FORMS = (
    (re.compile(r"(\d+)"), ("m",)),  # minutes
    (re.compile(r"(\d+):(\d+)"), ("m", "s")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("h", "m", "s")),
    (re.compile(r"(\d+)-(\d+)"), ("d", "h")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("d", "h", "m")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("d", "h", "m", "s")),
)
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
TIME_LIMIT_FORMS = "[D-]HH:MM:SS, D-HH[:MM], MM:SS or minutes"


def parse_time_limit(text: str) -> float | None:
    """A Slurm time limit (sbatch --time: minutes, MM:SS, H:MM:SS, D-H, D-H:MM, D-H:MM:SS) in
    seconds; None when it is not one of those forms, or has minutes/seconds of 60 or more where a
    larger unit precedes them."""
    text = text.strip()
    for pattern, units in _TIME_FORMS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        values = [int(g) for g in m.groups()]
        for i, (unit, v) in enumerate(zip(units, values, strict=True)):
            if i > 0 and ((unit in "ms" and v >= 60) or (unit == "h" and units[0] == "d" and v >= 24)):
                return None
        return float(sum(v * _SECONDS[u] for u, v in zip(units, values, strict=True)))
    return None


def check_time_limit(key: str, text: str) -> float:
    seconds = parse_time_limit(text)
    if seconds is None:
        raise ConfigError(f"{key} must be a Slurm time limit ({TIME_LIMIT_FORMS}), e.g. \"20:00:00\" or "
                          f"\"2-00:00:00\", got {text!r}")
    if seconds <= 0:
        raise ConfigError(f"{key} must be longer than 0, got {text!r}")
    return seconds


# ---------------------------------------------------------------------------------- plain values


def check_number(key: str, value: Any) -> None:
    """Every number of a recipe is finite and fits in 64 bits (TOML's own integer range)."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        raise ConfigError(f"{key} is out of range (more than 64 bits): {value}")


def check_plain(key: str, value: Any) -> None:
    """A raw table's value is what JSON can say (DeepSpeed's config and sbatch flags are JSON and
    text): strings, finite numbers, booleans, lists and tables; TOML dates and times are refused."""
    if isinstance(value, (_dt.date, _dt.time)):
        raise ConfigError(f"{key} must be a string, number, boolean, list or table, found the TOML "
                          f"{type(value).__name__} {value}; quote it if a string is meant")
    if isinstance(value, dict):
        for k, v in value.items():
            check_plain(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_plain(f"{key}[{i}]", v)
    else:
        check_number(key, value)


# ----------------------------------------------------------------------- what the recipe models

# DeepSpeed config keys (dotted) that kit.engine derives from the recipe, and the recipe key to use.
# deepspeed.extra may not set them: DeepSpeed would run one thing while the recipe, the checkpoint
# manifests and the converter say another (extra zero_optimization.stage = 3 ran ZeRO-3 under a
# recipe that says 2).
DEEPSPEED_MODELLED: dict[str, str] = {
    "train_batch_size": "batch.micro_batch_size and batch.grad_accum (the global batch is derived)",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16": "deepspeed.precision",
    "bfloat16": "deepspeed.precision",
    "fp16": "deepspeed.precision (fp16 is not supported)",
    "amp": "deepspeed.precision",
    "optimizer": "the [optim] section (kit builds torch's AdamW itself, for bit-exact resume)",
    "scheduler": "optim.warmup_steps, optim.decay_steps and optim.min_lr",
    "tensor_parallel": "parallel.tensor",
    "pipeline": "parallel.pipeline",
    "checkpoint.load_universal": "`kit reshape` (it marks the checkpoint; the trainer loads it as universal)",
    "seed": "run.seed",
}


def check_deepspeed_extra(extra: dict[str, Any]) -> None:
    """Refuse raw DeepSpeed keys that the recipe models (DEEPSPEED_MODELLED), naming the recipe key."""
    check_plain("deepspeed.extra", extra)
    for dotted in _dotted_keys(extra):
        for modelled, instead in DEEPSPEED_MODELLED.items():
            if dotted == modelled or dotted.startswith(modelled + "."):
                raise ConfigError(f"deepspeed.extra.{dotted} is set by the recipe: use {instead} instead "
                                  "(deepspeed.extra is for DeepSpeed settings the kit does not model)")


def _dotted_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out += _dotted_keys(v, f"{prefix}{k}.")
    return out


# sbatch options (submitit's spelling, with "-" or "_") that the chain sets from the recipe.
SBATCH_MODELLED: dict[str, str] = {
    "time": "slurm.time_limit", "t": "slurm.time_limit",
    "nodes": "slurm.nodes", "N": "slurm.nodes",
    "ntasks_per_node": "slurm.gpus_per_node or slurm.tasks_per_node",
    "ntasks": "slurm.nodes with slurm.gpus_per_node or slurm.tasks_per_node",
    "gpus_per_node": "slurm.gpus_per_node",
    "cpus_per_task": "slurm.cpus_per_task", "c": "slurm.cpus_per_task",
    "mem": "slurm.mem_gb",
    "partition": "slurm.partition", "p": "slurm.partition",
    "account": "slurm.account", "A": "slurm.account",
    "qos": "slurm.qos",
    "reservation": "slurm.reservation",
    "exclude": "slurm.exclude", "x": "slurm.exclude",
    "job_name": "run.name (the job is kit-<run.name>)", "J": "run.name (the job is kit-<run.name>)",
    "signal": "chain.signal_lead_s",
    "requeue": "nothing: the chain always asks for requeue",
    "dependency": "nothing: the chain sets it (one job of a run at a time)",
    "output": "nothing: submitit writes the logs under <run>/slurm/",
    "error": "nothing: submitit writes the logs under <run>/slurm/",
}


def check_sbatch_args(args: dict[str, Any]) -> None:
    check_plain("slurm.sbatch_args", args)
    for k, v in args.items():
        name = k.lstrip("-").replace("-", "_")
        if not name or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise ConfigError(f"slurm.sbatch_args: {k!r} is not an sbatch option name (e.g. gres = \"gpu:8\")")
        instead = SBATCH_MODELLED.get(name)
        if instead:
            raise ConfigError(f"slurm.sbatch_args.{k} is set by the recipe: use {instead} instead")
        if isinstance(v, (dict, list)):
            raise ConfigError(f"slurm.sbatch_args.{k} must be a string, number or boolean, found {type(v).__name__}")


def check_names(key: str, values: list[str]) -> None:
    """Node names and similar: not empty, no spaces or commas (Slurm's list separator)."""
    for i, v in enumerate(values):
        if not v or any(c.isspace() or c == "," for c in v):
            raise ConfigError(f"{key}[{i}] must be one name without spaces or commas, got {v!r}")


def check_word(key: str, value: str) -> None:
    """A Slurm name (partition, account, qos, reservation): empty or without spaces."""
    if any(c.isspace() for c in value):
        raise ConfigError(f"{key} must not contain spaces, got {value!r}")


def show(value: Any) -> str:
    """A value for an error message, cut short when long (a 400-digit number, a pasted file)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"

"""The one place that builds the command line of a training segment, container included.

Apptainer cannot be installed on the development machines, so this module is pure: it returns an
argv list, and tests/test_chain_command.golden pins it (regenerate with
``KIT_UPDATE_GOLDEN=1 pytest tests/test_chain_units.py -k golden``).

Inside the image, ``python`` is the image's interpreter, with the kit installed in the image (the
containers/ definition files do that). The run directory's filesystem is always bound, at the same
path, so that the paths frozen in run.toml mean the same thing inside and outside.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kit.config import RunConfig


def binds(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Bind mounts: the recipe's, then the runs folder and the data folders it needs (deduplicated)."""
    out: list[str] = []
    for b in cfg.container.binds:
        if b not in out:
            out.append(b)
    needed = [str(Path(cfg.run.runs_dir)), str(run_dir.parent)]
    if cfg.data.prepared:
        needed.append(str(Path(cfg.data.prepared)))
    if cfg.data.tokenizer:
        needed.append(str(Path(cfg.data.tokenizer).parent))
    bound = {b.split(":")[0] for b in out}
    for path in needed:
        if not any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound):
            out.append(path)
            bound.add(path)
    return out


def segment_command(cfg: RunConfig, run_dir: Path, seg: str, python: str = "") -> list[str]:
    """argv of one rank's trainer: ``[apptainer exec --nv --bind ... IMAGE] python -m kit.jobs.segment_entry RUN``."""
    interpreter = python or ("python" if cfg.container.image else sys.executable)
    inner = [interpreter, "-m", "kit.jobs.segment_entry", str(run_dir), "--seg", seg]
    if not cfg.container.image:
        return inner
    cmd = ["apptainer", "exec"]
    if cfg.slurm.gpus_per_node > 0:
        cmd.append("--nv")  # the host's NVIDIA driver libraries and /dev/nvidia* inside the container
    for b in binds(cfg, run_dir):
        cmd += ["--bind", b]
    # The host environment passes through (RANK, MASTER_ADDR, NCCL_*, SLURM_*): no --cleanenv.
    return [*cmd, cfg.container.image, *inner]

"""Where this process sits in the job: rank, world size, master address, from the environment.

Three launchers, one answer:
- torchrun (``kit train``, ``kit demo``): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are set;
- Slurm via submitit (``kit submit``): the chain sets them from submitit's
  TorchDistributedEnvironment (SLURM_PROCID etc.) before the trainer starts;
- a bare single process (tests, tools): rank 0 of 1 on a free loopback port.
Backend: NCCL when CUDA is there, gloo otherwise.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def from_environ(env: dict[str, str] | None = None) -> DistEnv:
    """Read (and complete, for a bare single process) the torch.distributed environment."""
    e = os.environ if env is None else env
    if "RANK" not in e and "SLURM_PROCID" in e and "MASTER_ADDR" in e:
        # Under srun with a master already chosen (the chain does this through submitit).
        e["RANK"] = e["SLURM_PROCID"]
        e["WORLD_SIZE"] = e["SLURM_NTASKS"]
        e["LOCAL_RANK"] = e.get("SLURM_LOCALID", "0")
        e["LOCAL_WORLD_SIZE"] = e.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    if "RANK" not in e:
        e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"] = "0", "1", "0", "1"
        e.setdefault("MASTER_ADDR", "127.0.0.1")
        e.setdefault("MASTER_PORT", str(free_port()))
    return DistEnv(
        rank=int(e["RANK"]),
        world_size=int(e["WORLD_SIZE"]),
        local_rank=int(e.get("LOCAL_RANK", "0")),
        local_world_size=int(e.get("LOCAL_WORLD_SIZE", "1")),
        master_addr=e.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(e.get("MASTER_PORT", "29500")),
    )


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init(env: DistEnv) -> None:
    """Initialise torch.distributed through DeepSpeed (which also picks its accelerator)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if backend() == "gloo" else "cuda")
    # A dead rank must end the job, not hang it (NCCL's asynchronous error handling).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    import deepspeed
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)

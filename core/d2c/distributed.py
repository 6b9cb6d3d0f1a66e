"""The process group: rank and world from torchrun's or SLURM's variables (submitit sets the
SLURM ones), NCCL on CUDA and gloo on CPU.  Alone, nothing is initialised."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_env():
    """(rank, world, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) alone."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                int(os.environ.get("SLURM_LOCALID", 0)))
    return 0, 1, 0


def init_distributed(device: torch.device):
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, local

"""The process group: rank and world from torchrun's or SLURM's variables (submitit sets the
SLURM ones), NCCL on CUDA and gloo on CPU.  Alone, nothing is initialised.
Under plain `srun` (no torchrun, no submitit) the rendezvous is the job's first node (SLURM's
node list) on a port derived from the job id, so that every node of the job meets there."""
from __future__ import annotations

import os
import re

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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[07-09,12],cpu1" -> "gpu07"; every bracket of a
    name, e.g. "rack[1-2]-n[01-04]" -> "rack1-n01"; zero padding as written)."""
    head = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not head:
        raise ValueError(f"SLURM node list {nodelist!r}: no host name in it")
    return re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", head.group(0))


def rendezvous() -> tuple[str, str]:
    """(MASTER_ADDR, MASTER_PORT): the environment's when set (torchrun, submitit), else the first
    node of a SLURM job and 10000 + job id mod 20000 (two jobs sharing a node do not collide),
    else this host and 29500."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    job = os.environ.get("SLURM_JOB_ID")
    addr = os.environ.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1")
    port = os.environ.get("MASTER_PORT") or (str(10000 + int(job) % 20000) if job and job.isdigit() else "29500")
    return addr, port


def local_device() -> torch.device:
    """This rank's device: its own GPU (torchrun's / SLURM's local rank) if there is one, else CPU."""
    return torch.device("cuda", dist_env()[2]) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device: torch.device):
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = rendezvous()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, local


WAIT_POLL_S = 5.0


def finish_once(finish, finished, parts_done, *, rank: int, world: int, wait: bool = True,
                waiting: str = "") -> bool:
    """The step after every rank wrote its parts of a shared output (token-cache shards, sample
    batches): `finish()` runs once.  In a process group of `world` ranks: rank 0 after a barrier,
    and a failure there reaches every rank (they raise too, instead of waiting forever).  Without
    one: the rank that sees `parts_done()`; the others poll `finished()` (printing `waiting`
    once), or return False at once with wait=False.  Returns whether the output is finished."""
    import sys
    import time

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world:
        dist.barrier()
        error = None
        if rank == 0 and not finished():
            try:
                finish()
            except Exception as e:    # re-raised below, after the other ranks know
                error = e
        flag = torch.tensor([error is not None], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.broadcast(flag, src=0)
        if error is not None:
            raise error
        if flag.item():
            raise RuntimeError(f"rank 0 failed to complete the shared output (its log has the error); {waiting}")
        return True
    if parts_done():
        if not finished():
            finish()
        return True
    if not wait:
        return False
    if waiting:
        print(f"rank {rank}: {waiting}", file=sys.stderr, flush=True)
    while not finished():
        time.sleep(WAIT_POLL_S)
    return True

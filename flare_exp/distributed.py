"""Data parallel for one run (``torchrun --nproc_per_node N run.py ...`` or ``accelerate launch``):
process-group set-up and the few collective steps the pipeline needs. Single-process runs pass
through unchanged."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(number of processes, this process's rank)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def setup() -> tuple[int, int]:
    """Join the process group a launcher describes through WORLD_SIZE (NCCL on GPUs, gloo else)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world()


def broadcast(value):
    """Rank 0's ``value`` on every rank."""
    if world()[0] == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if world()[0] > 1:
        dist.barrier()

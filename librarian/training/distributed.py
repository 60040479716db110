"""Data parallelism under torchrun: the process group, and the few collective calls training makes.

With one process (the default) every function here is a no-op or the identity, so the training
loop reads the same either way.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Rank 0, the one process that writes, before the process group exists (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def wrap(net: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """DistributedDataParallel around `net` when there are several processes: gradients averaged."""
    if world == 1:
        return net
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)


def mean(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of `value` over the processes (gloo has no AVG: a sum, then a division)."""
    if world == 1:
        return value
    dist.all_reduce(value)
    return value / world


def sum_(value: torch.Tensor, world: int) -> torch.Tensor:
    """`value` summed over the processes, in place."""
    if world > 1:
        dist.all_reduce(value)
    return value


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()

"""Data parallelism under torchrun: the process group, and the few collective calls training makes.

With one process (the default) every function here is a no-op or the identity, so the training
loop reads the same either way.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """The processes of the run: torchrun's WORLD_SIZE, 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its machine: which GPU it takes (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun, with the backend of
    the device the run trains on (nccl for CUDA, gloo otherwise: train.device: cpu on a CUDA machine
    must not hand CPU tensors to nccl). The caller has set the CUDA device first: nccl binds to it."""
    world = world_size()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def gather(obj, world: int) -> list:
    """Every process's `obj`, in rank order (each process gets the list)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def is_main_process() -> bool:
    """Rank 0, the one process that writes, before the process group exists (torchrun sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def wrap(net: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """DistributedDataParallel around `net` when there are several processes: gradients averaged."""
    if world == 1:
        return net
    # broadcast_buffers=False: the model's buffers (the causal mask, the RoPE tables) are constants,
    # the same on every rank; broadcasting them is a collective a step for nothing.
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                                     broadcast_buffers=False)


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

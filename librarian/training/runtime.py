"""Where and how a training run executes: which process it is, on which device, in which precision.

Set up once, before data and model, and handed to the Trainer: the Trainer never asks the
environment itself, so a test or a fine-tuning run can give it any runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from librarian.core.config import TrainParams
from librarian.core.environment import make_deterministic
from librarian.core.errors import LibrarianError
from librarian.core.precision import Precision, resolve_precision
from librarian.training import distributed


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    precision: Precision  # librarian/core/precision.py: what train.amp resolves to on this device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, curves and outputs; the others only compute."""
        return self.rank == 0

    def autocast(self):
        return self.precision.autocast()

    def grad_scaler(self) -> torch.amp.GradScaler:
        # bf16 needs no loss scaling; fp16 does.
        return torch.amp.GradScaler("cuda" if self.device.type == "cuda" else "cpu",
                                    enabled=self.precision.loss_scaling)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device train.device names (auto: cuda, then mps, then cpu); under torchrun, each process's own GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[name]:
        raise LibrarianError(f"train.device is {name}, but this machine has no {name}; use train.device: auto or cpu")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def setup_runtime(tp: TrainParams) -> Runtime:
    """Pick the device, join the process group (under torchrun) with that device's backend, set
    threads, fix determinism."""
    device = pick_device(tp.device, distributed.local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: nccl binds each process to its GPU
    rank, world = distributed.init(device)
    if tp.threads:
        torch.set_num_threads(tp.threads)
    make_deterministic(device, tp.deterministic, compiled=tp.compile)
    return Runtime(rank, world, device, resolve_precision(device, tp.amp))

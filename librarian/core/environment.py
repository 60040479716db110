"""What a run ran on: recorded beside its outputs, since results can differ across versions and devices."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch

from librarian import CUBLAS_DETERMINISTIC
from librarian.core.errors import LibrarianError

PACKAGES = ("torch", "numpy", "tokenizers", "safetensors", "pyarrow", "dvc")


def make_deterministic(device: torch.device, deterministic: bool, compiled: bool = False) -> None:
    """Ask torch for deterministic kernels, or let CUDA pick the fastest ones.

    On the CPU every kernel we use is deterministic already. On CUDA, determinism costs speed:
    cuDNN may not autotune, and cuBLAS needs a fixed workspace (set before CUDA starts).
    """
    if deterministic and device.type == "cuda":
        check_cublas_workspace()
    use_deterministic_algorithms(deterministic, compiled)
    torch.backends.cudnn.benchmark = not deterministic and device.type == "cuda"
    torch.backends.cudnn.deterministic = deterministic


def check_cublas_workspace() -> None:
    """Refuse a CUBLAS_WORKSPACE_CONFIG with which cuBLAS is not deterministic: torch would stop the
    run at its first matmul with a RuntimeError; this says what to change before anything runs."""
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value not in CUBLAS_DETERMINISTIC:
        raise LibrarianError(
            f"CUBLAS_WORKSPACE_CONFIG is {value!r}, with which cuBLAS is not deterministic; set it to "
            f"{' or '.join(CUBLAS_DETERMINISTIC)} (or unset it) before the process starts, or set train.deterministic: false")


def use_deterministic_algorithms(mode: bool, compiled: bool) -> None:
    """torch.use_deterministic_algorithms(mode), without importing Inductor unless it compiles.

    torch's function sets two things: the kernels' flag, and Inductor's `deterministic` config, for
    which it imports torch._inductor.config and with it the whole compiler stack: 1.5 s of every
    train and finetune start on a 2-core EPYC, most of the time a stage with a bad input takes to
    say so. Inductor reads that config only when it compiles, so it is set when the run compiles
    (train.compile) or Inductor is loaded already; the kernels' flag is set alike in every case.
    """
    if compiled or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode)
    else:
        torch._C._set_deterministic_algorithms(mode, warn_only=False)


def describe(device: torch.device) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "packages": versions,
        "platform": f"{sys.platform}-{platform.machine()}",
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or None,
        "torch_threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }

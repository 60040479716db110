"""Which precision a run computes in: one policy, by device, for every consumer.

`train.amp: true` (and `eval.amp: true`) mean the card's "mixed precision where it pays":

- a CPU with native bf16 (AVX512-BF16 or AMX on x86, the BF16 extension on Arm): bf16 autocast;
- a CPU without it: float32. bf16 there is emulated: on an AVX2-only EPYC (Zen 3) a one-thread
  matmul ran at 0.4 GFLOP/s in bf16 against 9.7 in float32, and the card's training step at 0.08x
  of float32 (issue 31). One line on stderr says so;
- CUDA: bf16 autocast from compute capability 8.0 (Ampere) on, fp16 with loss scaling before it;
- MPS: bf16 autocast, as before this policy.

`amp: false` is float32 everywhere. The choice reads the hardware's capability, never a timing, so
the same params on the same kind of machine still give the same bytes. The resolved device and
precision are recorded in what training writes (train.json, metrics/train/metrics.json) and in the
training state's fingerprint: a state saved under another precision is another run.

LIBRARIAN_CPU_BF16=1 or 0 overrides the CPU's answer (a bf16 machine can show the float32 path's
speed; the tests force either side); unset, the hardware decides.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from dataclasses import dataclass

import torch

from librarian.core.errors import LibrarianError

CPU_BF16_ENV = "LIBRARIAN_CPU_BF16"
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CUDA_BF16_CAPABILITY = (8, 0)  # Ampere: native bf16 tensor cores


@dataclass(frozen=True)
class Precision:
    device_type: str  # "cpu", "cuda", "mps"
    dtype: torch.dtype  # the autocast dtype; float32 = no autocast
    # Why mixed precision was asked for but not used ("" when it was used or not asked for).
    fallback: str = ""

    @property
    def name(self) -> str:
        """"bf16", "fp16" or "fp32": what train.json and the curves' summary record."""
        return NAMES[self.dtype]

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients underflow without a GradScaler; bf16 has float32's range and needs none."""
        return self.dtype == torch.float16

    @property
    def tag(self) -> str:
        """Device and precision together ("cpu/bf16"): what a training state must match."""
        return f"{self.device_type}/{self.name}"

    def autocast(self):
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def explain(self, stage: str, activity: str) -> str | None:
        """The one line a stage prints when mixed precision was asked for and not used."""
        return f"{stage}: {self.fallback}; {activity} in float32, since bf16 would be many times slower here" \
            if self.fallback else None

    def announce(self, stage: str, activity: str) -> None:
        line = self.explain(stage, activity)
        if line:
            print(line, file=sys.stderr, flush=True)


def cpu_capability() -> str:
    """torch's name for the CPU's vector unit: "AVX2", "AVX512", "DEFAULT" (Arm: "SVE256", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def hardware_cpu_bf16() -> bool:
    """Whether the CPU computes bf16 natively (not by converting to float32 and back)."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        # mkldnn's own bf16 check accepts any AVX512 CPU, which converts bf16 in software; the
        # instructions that pay are AVX512-BF16 (Cooper Lake, Zen 4) and AMX (Sapphire Rapids).
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: the BF16 extension


def cpu_has_native_bf16() -> bool:
    """The hardware's answer, or LIBRARIAN_CPU_BF16's (1 or 0) where it is set."""
    forced = os.environ.get(CPU_BF16_ENV)
    if forced is None or forced == "":
        return hardware_cpu_bf16()
    if forced not in ("0", "1"):
        raise LibrarianError(f"{CPU_BF16_ENV} is {forced!r}; set it to 1 (treat the CPU as having native bf16), "
                             "0 (as having none), or unset it to let the hardware decide")
    return forced == "1"


def cuda_has_native_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= CUDA_BF16_CAPABILITY


def resolve_precision(device: torch.device | str, amp: bool) -> Precision:
    """The precision a run on `device` computes in, given the amp setting (train.amp, eval.amp)."""
    device = torch.device(device)
    kind = device.type
    if kind == "meta" or not amp:
        return Precision(kind, torch.float32)
    if kind == "cuda":
        return Precision(kind, torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16)
    if kind == "cpu" and not cpu_has_native_bf16():
        return Precision(kind, torch.float32, fallback=f"this CPU ({cpu_capability()}) has no native bf16")
    return Precision(kind, torch.bfloat16)

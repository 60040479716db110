"""The precision policy (librarian/core/precision.py): what amp resolves to on each kind of hardware,
the line a CPU without native bf16 gets, what training records, and resume across precisions."""

import pytest
import torch

from librarian.core import precision as policy
from librarian.core.errors import LibrarianError
from librarian.core.precision import CPU_BF16_ENV, resolve_precision


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what the hardware check answers (the environment's override cleared)."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)

    def set_native(native: bool, capability: str = "AVX2"):
        monkeypatch.setattr(policy, "hardware_cpu_bf16", lambda: native)
        monkeypatch.setattr(policy, "cpu_capability", lambda: capability)

    return set_native


def test_a_cpu_with_native_bf16_trains_in_bf16(cpu_bf16):
    cpu_bf16(True, "AVX512")
    p = resolve_precision("cpu", amp=True)
    assert (p.dtype, p.name, p.tag, p.mixed, p.loss_scaling) == (torch.bfloat16, "bf16", "cpu/bf16", True, False)
    assert p.explain("train", "training") is None
    with p.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_a_cpu_without_native_bf16_trains_in_float32_and_says_why(cpu_bf16, capsys):
    cpu_bf16(False, "AVX2")
    p = resolve_precision("cpu", amp=True)
    assert (p.dtype, p.name, p.tag, p.mixed) == (torch.float32, "fp32", "cpu/fp32", False)
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")
    p.announce("train", "training")
    assert capsys.readouterr().err == ("train: this CPU (AVX2) has no native bf16; training in float32, since bf16 "
                                       "would be many times slower here\n")


@pytest.mark.parametrize("native", [True, False])
def test_amp_false_is_float32_everywhere_without_a_word(cpu_bf16, native, capsys):
    cpu_bf16(native)
    p = resolve_precision("cpu", amp=False)
    assert p.name == "fp32" and not p.mixed and p.explain("train", "training") is None
    p.announce("train", "training")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("capability", "name", "scaled"), [((8, 0), "bf16", False), ((9, 0), "bf16", False),
                                                            ((7, 5), "fp16", True), ((6, 1), "fp16", True)])
def test_cuda_uses_bf16_from_ampere_and_fp16_with_loss_scaling_before(monkeypatch, capability, name, scaled):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = resolve_precision(torch.device("cuda", 0), amp=True)
    assert (p.name, p.loss_scaling, p.tag) == (name, scaled, f"cuda/{name}")
    assert resolve_precision(torch.device("cuda", 0), amp=False).name == "fp32"


def test_the_environment_forces_either_side(monkeypatch):
    monkeypatch.setattr(policy, "hardware_cpu_bf16", lambda: True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("cpu", amp=True).name == "fp32"
    monkeypatch.setattr(policy, "hardware_cpu_bf16", lambda: False)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("cpu", amp=True).name == "bf16"
    monkeypatch.setenv(CPU_BF16_ENV, "")  # empty: as if unset
    assert resolve_precision("cpu", amp=True).name == "fp32"


def test_a_bad_override_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(LibrarianError, match=r"LIBRARIAN_CPU_BF16 is 'yes'; set it to 1 .* or unset it"):
        resolve_precision("cpu", amp=True)


def test_the_hardware_check_matches_the_cpu_flags():
    """On x86 native bf16 means the avx512_bf16 or amx_bf16 flag, not AVX512 as such (mkldnn's check)."""
    import platform
    from pathlib import Path

    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists():
        pytest.skip("reads x86 flags from /proc/cpuinfo")
    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split(":", 1)[1].split())
    assert policy.hardware_cpu_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})

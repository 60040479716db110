"""benchmarks/gpu_check.py, the GPU check: CI has no GPU, so it runs here on the CPU, briefly, to keep it working.

On a GPU it is run by hand (docs/training.md#gpu); its figures are in docs/LOG.md.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = ["train_twice", "kill_resume", "eval_devices", "sampling", "serve_engine", "export"]


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("gpu_check")


def test_every_check_passes_on_the_cpu_one_line_each(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "6", "--bench-steps", "1",
                          "--bench-rounds", "1", "--no-compile", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert [line.split(":")[0] for line in lines if not line.startswith("INFO")] == \
        [f"PASS {name}" for name in CHECKS] + ["PASS gpu_check"]
    assert "killed at step" in run.stdout and "resumed from step" in run.stdout
    assert sum(line.startswith("INFO tokens/s") for line in lines) == 2  # eager and fused loss (no compile asked)
    assert (tmp_path / "details.log").stat().st_size > 0  # what the library printed went there, not to the console


def test_a_failed_or_crashed_check_is_named_and_the_run_exits_1(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "prepare_data", lambda work, params: (work / "tokens", work / "tokenizer.json"))
    monkeypatch.setattr(gpu_check.Generator, "load", staticmethod(lambda *a, **k: None))
    for name in ("train_twice", "eval", "sampling", "serve_engine", "export"):
        monkeypatch.setattr(gpu_check, f"check_{name}", lambda *a: (True, "fine"))
    monkeypatch.setattr(gpu_check, "check_kill_resume", lambda *a: (False, "weights DIFFERENT"))

    def crash(*a):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(gpu_check, "check_export", crash)
    monkeypatch.setattr(gpu_check, "tokens_per_s", crash)
    assert gpu_check.main(["--device", "cpu", "--work", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL kill_resume: weights DIFFERENT" in out
    assert "FAIL export: RuntimeError: CUDA error: an illegal memory access" in out
    assert "INFO tokens/s eager: not measured (RuntimeError" in out
    assert out.splitlines()[-1] == "FAIL gpu_check: 4/6 checks passed on cpu"


def test_without_a_gpu_it_says_so_in_one_line(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sees no CUDA GPU" in err and "--device cpu" in err

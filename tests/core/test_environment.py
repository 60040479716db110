"""librarian/core/environment.py: determinism is set without loading the compiler stack it does not use."""

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from librarian.core.environment import make_deterministic
make_deterministic(torch.device("cpu"), {mode}, compiled={compiled})
loaded = "torch._inductor.config" in sys.modules
print(torch.are_deterministic_algorithms_enabled(), loaded, loaded and torch._inductor.config.deterministic)
"""


@pytest.mark.parametrize("mode", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_deterministic_mode_is_set_and_inductor_loads_only_for_a_compiled_run(mode, compiled):
    # A fresh process: whether Inductor is imported is a fact of the whole interpreter.
    out = subprocess.run([sys.executable, "-c", PROBE.format(mode=mode, compiled=compiled)],
                         capture_output=True, text=True, check=True).stdout.split()
    # Compiled: Inductor's own `deterministic` config is set as torch.use_deterministic_algorithms sets it.
    assert out == [str(mode), str(compiled), str(mode if compiled else False)]


CUBLAS_PROBE = "import os, librarian; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"


@pytest.mark.parametrize(("given", "kept"), [(None, ":4096:8"), (":16:8", ":16:8"), (":0:0", ":0:0")])
def test_importing_librarian_sets_the_cublas_workspace_unless_the_user_did(given, kept):
    """Set on import, before any CUDA work of the process: a stage's set-up would come too late for a notebook."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if given:
        env["CUBLAS_WORKSPACE_CONFIG"] = given
    out = subprocess.run([sys.executable, "-c", CUBLAS_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == kept


def test_a_deterministic_cuda_run_refuses_a_cublas_workspace_that_cannot_be(monkeypatch):
    import torch

    from librarian.core.environment import make_deterministic
    from librarian.core.errors import LibrarianError

    was = torch.are_deterministic_algorithms_enabled()
    try:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        with pytest.raises(LibrarianError, match=r"CUBLAS_WORKSPACE_CONFIG is ':0:0', with which cuBLAS is not "
                                                 r"deterministic; set it to :4096:8 or :16:8 .* train.deterministic: false"):
            make_deterministic(torch.device("cuda"), True)
        make_deterministic(torch.device("cuda"), False)  # not asked to be deterministic: any value will do
        make_deterministic(torch.device("cpu"), True)  # the CPU has no cuBLAS
        for value in (":4096:8", ":16:8"):
            monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", value)
            make_deterministic(torch.device("cuda"), True)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False

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

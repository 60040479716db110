"""Librarian: a data-versioned, reproducible pipeline that trains a small GPT on TinyStories."""

import os

__version__ = "0.1.0"

# cuBLAS reads its workspace setting once, when the process first uses it: set in a stage's run-time
# set-up, it comes too late for a process that ran a CUDA matmul before (a notebook, a benchmark
# loop). Set here, on the package's import, unless the user set it; a value with which cuBLAS cannot
# be deterministic is refused when a deterministic run starts (librarian/core/environment.py).
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC[0])

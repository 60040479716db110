"""How many CPU threads inference runs on: one rule for generate, chat, samples and evaluate.

torch's default is a thread per core, each op split evenly over them. A decoding step's ops are
tiny, so a second thread does not pay even on an idle machine, and when another job holds a core
it collapses: every op waits for the thread that shares that core (a 100-token `generate` of the
card's model took 9 s with one core busy, against 0.1 s on one thread, which simply runs on the
free core). Evaluation instead gives each thread whole batches (librarian/evaluation/evaluate.py): that
scales with the cores at any model size, and a busy core only slows its own thread's share.

Measured on the 2-core AMD EPYC, idle unless said (benchmarks/*_throughput.py --sweep-widths):
decoding on 2 threads ran at 0.90-1.08x one thread for widths 128 to 2048 (76 M parameters), and
at 0.23x with one core busy (card model); scoring on 2 threads ran at 1.62-1.69x one thread for
widths 128 to 1024, and at 1.3x one idle thread with one core busy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from librarian.core.errors import LibrarianError
from librarian.core.process import available_cores

DECODE_ONE_THREAD_UP_TO = 2048  # d_model; wider models were not measured and get a thread per core
MAX_AUTO_THREADS = 8


def auto_threads(d_model: int, batched: bool = False) -> int:
    """The fastest thread count for a model of width d_model: decoding, or `batched` scoring."""
    if not batched and d_model <= DECODE_ONE_THREAD_UP_TO:
        return 1
    return min(available_cores(), MAX_AUTO_THREADS)


def resolve_threads(requested: int, d_model: int, what: str = "threads", batched: bool = False) -> int:
    """`requested` threads, or the auto choice for 0; `what` names the setting in an error."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise LibrarianError(f"{what} must be a whole number >= 0 (0 = auto), got {requested!r}")
    return requested or auto_threads(d_model, batched)


@contextlib.contextmanager
def using_threads(n: int) -> Iterator[int]:
    """Run the block on n torch threads, then restore the count it had (library calls leave no trace)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)

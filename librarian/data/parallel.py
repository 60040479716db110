"""Process pools for the data stages: pure-Python work on every core, results in input order.

The workers are fresh interpreters ('spawn'), not forks: the stage already runs threads (pyarrow's
pools, the launcher watch of librarian.core.process), and a fork copies their locks in whatever state
they are. No worker outlives the stage:
- Ctrl-C reaches the whole process group; workers ignore it, and the stage, unwinding, ends them.
- SIGTERM or any error in the stage ends them the same way, on the way out of `worker_pool`.
- If the stage is killed outright (kill -9), the kernel sends each worker SIGKILL (PR_SET_PDEATHSIG).

A spawned worker imports the main module of the stage first (as multiprocessing always does): a
script that runs a parallel stage function needs the `if __name__ == "__main__":` guard, as the
stage scripts have. Only standard-library imports here.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from librarian.core.errors import LibrarianError
from librarian.core.process import available_cores as available_cores  # re-exported: clean takes it from here
from librarian.core.process import set_parent_death_signal

Item = TypeVar("Item")
Result = TypeVar("Result")

# Tasks in flight per worker: one running, one queued so that it never waits for the stage; more
# would only hold more batches in memory.
TASKS_PER_WORKER = 2


def _worker_start(stage_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The worker imported the stage's script as its main module, which set stop handlers that speak
    # for the stage: a worker just ends.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != stage_pid:  # the stage died before the signal was armed
        os._exit(1)


class Workers:
    """`count` worker processes that map a function over items, in order; with a count of 1, the
    caller's own process does the work (no pool is started)."""

    def __init__(self, count: int):
        self.count = max(count, 1)
        self._pool = None
        if self.count > 1:
            self._pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_start, initargs=(os.getpid(),))

    def map(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        """fn(item) for each item, in the items' order.

        At most TASKS_PER_WORKER items a worker are taken from `items` ahead of the result the
        caller is at: a stage that streams its input stays bounded in memory (Executor.map would
        read it all first). `fn` and the items must pickle.
        """
        if self._pool is None:
            yield from map(fn, items)
            return
        pending = deque()
        try:
            for item in items:
                pending.append(self._pool.submit(fn, item))
                if len(pending) >= TASKS_PER_WORKER * self.count:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise LibrarianError(
                "a worker process died (killed, out of memory, or started from a script with no "
                "`if __name__ == \"__main__\":` guard); rerun, or run in one process with `taskset -c 0`"
            ) from None

    def close(self) -> None:
        """Let the workers finish what they were given, then wait for them to exit."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def end_now(self) -> None:
        """Stop the workers mid-task: a stage on its way out keeps none of their results."""
        if self._pool is None:
            return
        terminate = getattr(self._pool, "terminate_workers", None)  # Python 3.14
        if terminate is not None:
            terminate()
            return
        # Before shutdown, which lets go of the list.
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join()


@contextlib.contextmanager
def worker_pool(count: int) -> Iterator[Workers]:
    """Workers for the block; on the way out all of them are gone: joined after a normal end,
    ended at once after an error, Ctrl-C or SIGTERM."""
    workers = Workers(count)
    try:
        yield workers
    except BaseException:
        workers.end_now()
        raise
    workers.close()

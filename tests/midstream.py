"""Run a stage as DVC does (`python -m stages.<name> ARGS`), and kill it with SIGKILL at the K-th
call of a hooked function: kill -9 in the middle of a stream, at a point a test chooses.

    python tests/midstream.py COUNT_FILE K MODULE:ATTR[,MODULE:ATTR...] stages.clean ARGS...

A hook is a function or method (`librarian.core.io:StoryWriter.write`); when it returns an iterator,
each item it yields is a call. K = 0 only counts: the number of calls goes to COUNT_FILE at exit,
so that a test can pick K in the middle. Before the kill, the pids of the stage's child processes
go to COUNT_FILE.children: a test checks that none outlives it.

Streams are made to take many steps on the fixture: READ_BATCH_STORIES stories a batch and text
shards read TEXT_BLOCK_BYTES at a time (neither changes any output byte).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import inspect
import os
import runpy
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

READ_BATCH_STORIES = 4
TEXT_BLOCK_BYTES = 4096


class Counter:
    def __init__(self, count_file: Path, kill_at: int):
        self.count_file, self.kill_at, self.calls = count_file, kill_at, 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls == self.kill_at:
            import psutil

            children = [str(p.pid) for p in psutil.Process().children(recursive=True)]
            Path(f"{self.count_file}.children").write_text(" ".join(children))
            os.kill(os.getpid(), signal.SIGKILL)

    def save(self) -> None:
        if not self.kill_at:
            self.count_file.write_text(str(self.calls))


def hooked(function, counter: Counter):
    @functools.wraps(function)
    def call(*args, **kwargs):
        result = function(*args, **kwargs)
        if inspect.isgenerator(result) or isinstance(result, Iterator):  # pyarrow's iter_batches: an iterator, not a generator
            return _counted(result, counter)
        counter.tick()
        return result

    return call


def _counted(items, counter: Counter):
    for item in items:
        counter.tick()
        yield item


def install(target: str, counter: Counter) -> None:
    module_name, _, path = target.partition(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module_name)
    for part in owners:
        owner = getattr(owner, part)
    setattr(owner, name, hooked(getattr(owner, name), counter))


def main() -> None:
    count_file, kill_at, targets, module, *args = sys.argv[1:]
    sys.path.insert(0, os.getcwd())  # as `python -m` puts it: the project's librarian/ and stages/
    import librarian.core.io
    import librarian.data.shards

    librarian.core.io.READ_BATCH_STORIES = READ_BATCH_STORIES
    librarian.data.shards.TEXT_BLOCK_BYTES = TEXT_BLOCK_BYTES
    counter = Counter(Path(count_file), int(kill_at))
    for target in targets.split(","):
        install(target, counter)
    atexit.register(counter.save)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

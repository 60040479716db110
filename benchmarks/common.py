"""What the benchmarks share: the machine's name, medians over interleaved rounds on a shared machine,
process-tree memory, children that die with their benchmark, and a training step that cycles
through a small split.

A module of its own, imported as `from common import ...` (a benchmark's folder is on sys.path
when it runs), so that no benchmark imports another benchmark's script for a helper. Heavy
imports (torch, most of librarian) are made inside the functions that need them: the data benchmarks
measure memory and start-up, and should not pay for torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from librarian.core.process import set_parent_death_signal

ROOT = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"
# A round during which other processes used more CPU than this (in cores) is run again, up to
# RETRIES times: the machine is shared, and a figure should say what this code does, not them.
QUIET = 0.25
RETRIES = 4


# --- the machine ---------------------------------------------------------------------------------


def cpu_precision() -> dict:
    """What every report says of the CPU's precision: torch's capability name, whether the policy
    (librarian/core/precision.py) finds native bf16, and LIBRARIAN_CPU_BF16 when it forces the answer."""
    import os

    import torch

    from librarian.core.precision import CPU_BF16_ENV, cpu_has_native_bf16, hardware_cpu_bf16

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": hardware_cpu_bf16(),
            "policy_cpu_bf16": cpu_has_native_bf16(), "forced": os.environ.get(CPU_BF16_ENV) or None}


def cpu_name() -> str:
    """The CPU's model name as lscpu shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def card_config(vocab_size: int = 8000, **overrides):
    """The model of params.yaml (the card's) at `vocab_size`, with `overrides`: a GPTConfig."""
    from librarian.core.config import load_params
    from librarian.model.gpt import GPTConfig

    model = load_params(ROOT / "params.yaml").model
    return GPTConfig(**{**model.model_dump(), "vocab_size": vocab_size, **overrides})


# --- timing on a shared machine ------------------------------------------------------------------


def at(n: int, run):
    """run() on n torch threads."""
    from librarian.core.threads import using_threads

    with using_threads(n):
        return run()


@contextlib.contextmanager
def busy_core(core: int | None = None):
    """A child process spinning on one core (the last one this process may use) for the block's duration."""
    cores = sorted(os.sched_getaffinity(0))
    core = cores[-1] if core is None else core
    child = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        os.sched_setaffinity(child.pid, {core})
        time.sleep(0.2)  # let it settle on its core
        yield core
    finally:
        child.terminate()
        child.wait()


def others_cores(run) -> tuple[float, float]:
    """run()'s result, and the CPU other processes used meanwhile, in cores (ours and our children's excluded)."""
    me = psutil.Process()

    def own() -> float:
        times = [me.cpu_times()] + [child.cpu_times() for child in me.children(recursive=True)]
        return sum(t.user + t.system for t in times)

    start, busy_before, own_before = time.perf_counter(), busy_cpu_s(), own()
    value = run()
    wall = time.perf_counter() - start
    return value, max(0.0, (busy_cpu_s() - busy_before) - (own() - own_before)) / wall


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot, every process's (guest time is within user)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def medians(runs: dict, repeats: int, report: dict | None = None) -> dict:
    """Each named run's median over `repeats` interleaved rounds (one warm-up round first).

    With `report`, also records each run's median CPU use by other processes (cores) under "others_cores".
    """
    for run in runs.values():
        run()
    values, others = {name: [] for name in runs}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            for _ in range(RETRIES):
                value, load = others_cores(run)
                if load <= QUIET:
                    break
            values[name].append(value)
            others[name].append(load)
    if report is not None:
        load = {str(name): round(statistics.median(o), 2) for name, o in others.items()}
        report.setdefault("others_cores", {}).update(load)
    return {name: statistics.median(v) for name, v in values.items()}


# --- child processes -----------------------------------------------------------------------------

POLL_S = 0.05  # how often run_watched samples the memory of the process tree
_running: subprocess.Popen | None = None  # run_watched's command while it runs, for stop_running


def die_with_us() -> None:
    """In the child before exec (Popen's preexec_fn): SIGTERM when this script dies, however it dies (even kill -9)."""
    set_parent_death_signal(signal.SIGTERM)


def tree_rss(root: psutil.Process, skip_root: bool) -> int:
    """Resident bytes of `root` and all its descendants (without root itself with `skip_root`)."""
    procs = [] if skip_root else [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_watched(args: list[str], skip_root: bool = False, **popen) -> tuple[subprocess.Popen, float, int]:
    """Run a command to its end, in a session of its own (a Ctrl-C in the terminal reaches only us,
    and stop_running stops the group) that dies with us; returns the finished process, its wall
    seconds and the peak RSS of its process tree (bytes, polled; without the root with `skip_root`,
    e.g. /usr/bin/time's). `popen`: Popen's other arguments (cwd, env, stdout, ...)."""
    global _running
    started, peak = time.perf_counter(), 0
    _running = proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=die_with_us, **popen)
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_rss(root, skip_root=skip_root))
            time.sleep(POLL_S)
    finally:
        if proc.poll() is not None:  # done; after an interrupt it may still run, and stop_running needs it
            _running = None
    return proc, time.perf_counter() - started, peak


def stop_running(timeout: float = 15.0) -> None:
    """Stop run_watched's command, if one runs, and its process group: SIGTERM (it unwinds, deleting
    its temporary files), then SIGKILL after `timeout` seconds."""
    proc = _running
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass



@contextlib.contextmanager
def stopping_on_interrupt(then=None):
    """Ctrl-C (or SIGTERM, turned into one) stops run_watched's running command and exits 130 with one
    line; on any exit, that command is stopped first (it never outlives the benchmark), then `then()`
    cleans up."""
    try:
        yield
    except KeyboardInterrupt:
        stop_running()
        print("interrupted; the running stage was stopped", file=sys.stderr)
        sys.exit(130)
    finally:
        stop_running()
        if then is not None:
            then()

# --- training steps ------------------------------------------------------------------------------


def cycled_step(trainer, order) -> tuple[float, int]:
    """One optimizer step of a librarian Trainer through its own Trainer.step (the training loop's
    step and accounting), over a split that is only a few batches long: when the epoch's windows
    run out, its first batch comes again. Returns the step's loss and the tokens it actually took:
    during a batch warmup (train.batch_warmup_tokens) fewer than the full batch's."""
    progress = trainer.progress
    if not trainer.epoch_has_room():  # the same window order again, as a next epoch would start
        progress.windows_in_epoch = 0
    before = progress.tokens_seen
    loss = trainer.step(order)
    trainer.settle_losses()  # the loop's read of the loss, here every step: on a GPU, the step has ended
    return loss.item(), progress.tokens_seen - before

"""Process hygiene: how a stage stops, and what it never shares with another process.

- SIGTERM, what `timeout`, CI runners, systemd and `docker stop` send, is handled like Ctrl-C: it
  raises an exception in the main thread, so atomic writes unwind and delete their temporary files.
- A stage stops (by the same path) when the process that launched it dies: DVC killed mid-stage
  must not leave an orphan training on, beside the next `dvc repro`'s run.
- One process at a time writes a folder such as the training state (`lock_folder`).

Only the standard library here: stages/__init__.py imports this before anything heavy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

from librarian.core.errors import LibrarianError

# The parent when this module is first imported, as early as a stage can look: if it has changed
# by the time the parent-death signal is armed, the parent died in between and no signal will come.
_PARENT_AT_START = os.getppid()
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2  # <linux/prctl.h>
_SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}
_STOPS = (signal.SIGINT, signal.SIGTERM)
_watching = False
_launcher_watch: threading.Event | None = None  # set, the thread watching the `sh -c` wrapper ends


class Terminated(BaseException):
    """SIGTERM, raised wherever the main thread is.

    A BaseException like KeyboardInterrupt, so that only clean-up code (`except BaseException`,
    `finally`) sees it; but not a KeyboardInterrupt, which chat takes as "cancel this reply".
    """


def exit_code(signum: int) -> int:
    """What a shell reports for a process stopped by `signum`: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signum


def launched_with_dash_m() -> bool:
    """Whether the package importing this is the parent of the module `python -m` is starting.

    Python sets sys.argv[0] to "-m" only while it locates that module, which imports its parent
    packages; a later import (a test's `from stages.x import main`) sees a script path or "-c".
    """
    return sys.argv[:1] == ["-m"]


def while_starting() -> None:
    """From a stage script's first line until run_stage takes over: imports take a second or two.

    A Ctrl-C or SIGTERM then means one line and an exit (nothing has been written yet), not a
    traceback from deep inside an import. For a process that is a stage only: it never gives
    these handlers back.
    """
    signal.signal(signal.SIGINT, _stop_while_starting)
    signal.signal(signal.SIGTERM, _stop_while_starting)
    stop_with_launcher()


def _stop_while_starting(signum, frame):
    ignore_stops()
    name = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
    say(f"error: {name} while starting; nothing was written, rerun the stage to start again")
    # Not sys.exit: unwinding through a half-done `import torch` and finalising the interpreter
    # after it can abort in torch's C++ teardown (SIGABRT, "terminate called ..."). Nothing has
    # been written yet, so there is nothing to unwind: leave at once.
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    os._exit(exit_code(signum))


def while_running() -> None:
    """Ctrl-C raises KeyboardInterrupt, SIGTERM raises Terminated: atomic writes unwind and tidy up."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    stop_with_launcher()


def _raise_terminated(signum, frame):
    # One is enough: a second (the parent-death signal, after a kill of the whole process group)
    # must not cut the clean-up of the first short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


class StopRequest:
    """A Ctrl-C or SIGTERM noted, not raised: the loop that asked stops at its next safe point.

    Training checks it between optimizer steps, saves its state there, then raises the stop, so
    a resumed run continues from the very step it was stopped at. A second signal raises at once.
    """

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _note(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            _raise_stop(signum)
        self.signum = signum

    def raise_now(self) -> None:
        if self.signum is not None:
            _raise_stop(self.signum)


def _raise_stop(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    _raise_terminated(signum, None)


@contextlib.contextmanager
def deferred_stops(enabled: bool = True):
    """Within the block, Ctrl-C and SIGTERM only set the yielded StopRequest (main thread only)."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return
    before = {signum: signal.signal(signum, request._note) for signum in _STOPS}
    try:
        yield request
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def restored_afterwards():
    """Ctrl-C and SIGTERM handling and the parent-death signal as they were before the block.

    For a stage called in-process (a test, a notebook): what it arms is for its own run and must
    not stay behind in the caller, such as a pytest worker left ignoring Ctrl-C and SIGTERM.
    """
    handlers = {signum: signal.getsignal(signum) for signum in _STOPS}
    watching, death_signal = _watching, _parent_death_signal()
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:  # None: installed outside Python, cannot be put back from here
                signal.signal(signum, handler)
        if not watching:
            _stop_watching_launcher(death_signal)


def ignore_stops() -> None:
    """The outputs are in place, or the stage is already on its way out: signals change nothing now."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def say(line: str) -> None:
    """One line on stderr, even when whoever read it is gone: the exit code must still come out right."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


# --- stopping with the launcher (Linux) ---------------------------------------------------------


def stop_with_launcher() -> None:
    """Get SIGTERM when the process that launched this one dies (once per process; Linux only).

    The launcher is the parent, except behind a `sh -c` wrapper: DVC runs a stage's command through
    `$SHELL -c` (`/bin/sh` when $SHELL is unset, as in CI), and dash forks the command instead of
    exec'ing it, so killing DVC orphans the shell, which keeps waiting: the parent-death signal
    alone would never come. A thread watches for the wrapper losing its parent instead.

    Not armed under `nohup` straight from a shell: that asks to outlive the shell.
    """
    global _watching, _launcher_watch
    if _watching or not sys.platform.startswith("linux"):
        return
    _watching = True
    launcher, wrapper = _launcher()
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN and _is_shell(_cmdline(launcher)):
        return
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != _PARENT_AT_START:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    if wrapper is not None:
        _launcher_watch = threading.Event()
        threading.Thread(target=_watch, args=(wrapper, launcher, _launcher_watch), name="launcher-watch",
                         daemon=True).start()


def _stop_watching_launcher(death_signal: int | None) -> None:
    """Undo stop_with_launcher: the parent-death signal back to `death_signal`, the watch thread ended."""
    global _watching, _launcher_watch
    if _launcher_watch is not None:
        _launcher_watch.set()
        _launcher_watch = None
    if death_signal is not None:
        set_parent_death_signal(death_signal)
    _watching = False


def _parent_death_signal() -> int | None:
    """The signal this process gets when its parent dies (0: none); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    signum = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_PDEATHSIG, ctypes.byref(signum), 0, 0, 0)
    return signum.value


def set_parent_death_signal(signum: int) -> None:
    """Get `signum` when the parent dies (0: nothing); Linux only, the caller checks."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _launcher() -> tuple[int, int | None]:
    """(the launcher's PID, the PID of the `sh -c` wrapper between it and us, if any)."""
    parent = os.getppid()
    argv = _cmdline(parent)
    if _is_shell(argv) and "-c" in argv[1:]:
        launcher = _parent_of(parent)
        if launcher is not None:
            return launcher, parent
    return parent, None


def _watch(wrapper: int, launcher: int, stop: threading.Event) -> None:
    while _parent_of(wrapper) == launcher:
        if stop.wait(0.5):  # no longer wanted: the in-process stage that armed it has returned
            return
    os.kill(os.getpid(), signal.SIGTERM)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_shell(argv: list[str]) -> bool:
    return bool(argv) and Path(argv[0]).name.lstrip("-") in _SHELLS  # "-bash": a login shell


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, then ppid


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --- one process per folder ---------------------------------------------------------------------


def lock_path(folder: Path) -> Path:
    """The lock beside `folder`, not in it: atomic_dir replaces the folder whole, lock included."""
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def lock_folder(folder: str | Path, user: str):
    """Hold `folder` for this process alone while the block runs; else LibrarianError naming the holder.

    An flock, which the kernel drops when its process dies (kill -9 included): a lock file left
    behind by a crash never blocks. The holder's PID is written in the file for the message.
    """
    folder = Path(folder)
    if os.name == "nt":  # no flock on Windows: not locked there
        yield
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, folder, user)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        # Deleted while still held: whoever opened it meanwhile finds, once it has the lock, that
        # its file is no longer the one at `path`, and starts over (see _acquire).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _acquire(path: Path, folder: Path, user: str) -> int:
    import fcntl  # POSIX only

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            who = f"another {user} (PID {holder})" if holder else f"another {user}"
            stop = f"stop it (`kill {holder}`)" if holder else "stop it"
            raise LibrarianError(f"{folder} is in use by {who}; wait for it to finish, or {stop} and rerun") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder deleted the file as it let go: lock the one at `path` now


def _holder(fd: int) -> int | None:
    """The PID the holder wrote; it may still be writing it, so look a few times."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None

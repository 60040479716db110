"""A stage's signal handling is its own: armed when it runs as a program, given back when called in-process.

A stage run as `python -m stages.<name>` takes Ctrl-C and SIGTERM from its first line (one line, exit
130 or 143, even in the middle of importing torch) and gets SIGTERM when its launcher dies. A test that
imports a stage and calls its main must find its own handlers, and its parent-death signal, as they were.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from librarian.core.errors import LibrarianError
from librarian.core.stage import run_stage
from tests.helpers import ROOT

LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
STOPS = (signal.SIGINT, signal.SIGTERM)


def _parent_death_signal() -> int:
    signum = ctypes.c_int(-1)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(signum), 0, 0, 0)  # PR_GET_PDEATHSIG
    return signum.value


def _caller_handler(signum, frame):
    """What the caller had installed: a handler of its own, neither a default nor SIG_IGN."""


@pytest.fixture
def caller_handlers():
    """The caller's own handlers in place (so that a stage leaving its own behind shows), then put back."""
    before = {signum: signal.signal(signum, _caller_handler) for signum in STOPS}
    yield {signum: _caller_handler for signum in STOPS}
    for signum, handler in before.items():
        signal.signal(signum, handler)


def _handlers() -> dict:
    return {signum: signal.getsignal(signum) for signum in STOPS}


@run_stage
def _finishes(argv=None):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the stage's own while it runs


@run_stage
def _fails(argv=None):
    raise LibrarianError("the input is missing; make it and rerun")


def test_an_in_process_stage_gives_the_handlers_back(caller_handlers):
    _finishes([])
    assert _handlers() == caller_handlers


def test_an_in_process_stage_gives_the_handlers_back_after_an_error_exit(caller_handlers, capsys):
    with pytest.raises(SystemExit) as stop:
        _fails([])
    assert stop.value.code == 1 and capsys.readouterr().err == "error: the input is missing; make it and rerun\n"
    assert _handlers() == caller_handlers


def test_a_real_stage_main_gives_the_handlers_back(caller_handlers, tmp_path, capsys):
    from stages.subsample import main

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "data" / "raw"), str(tmp_path / "data" / "subsample"), "--params", str(params)])
    assert stop.value.code == 1 and capsys.readouterr().err.startswith("error: "), "the raw folder is missing"
    assert _handlers() == caller_handlers


@LINUX_ONLY
def test_an_in_process_stage_gives_the_parent_death_signal_back(caller_handlers):
    before = _parent_death_signal()
    _finishes([])
    assert _parent_death_signal() == before
    with pytest.raises(SystemExit):
        _fails([])
    assert _parent_death_signal() == before


def test_importing_a_stage_changes_no_handler():
    """In a fresh interpreter: in this one, the stages may have been imported already."""
    check = textwrap.dedent("""
        import ctypes, signal, sys
        def state():
            death = ctypes.c_int(-1)
            if sys.platform.startswith("linux"):
                ctypes.CDLL(None).prctl(2, ctypes.byref(death), 0, 0, 0)
            return [signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), death.value]
        before = state()
        import stages.subsample, stages.evaluate
        assert state() == before, (before, state())
    """)
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# A stage run as a program, held in the middle of its imports (as in the second or two of importing
# torch) until the test has signalled it: the import of librarian.core.stage waits for the signal.
_HOLD_IMPORTS = """
import pathlib, sys, time

class Hold:
    def find_spec(self, name, path=None, target=None):
        if name == "librarian.core.stage":
            pathlib.Path({marker!r}).write_text("importing")
            time.sleep(60)
        return None

sys.meta_path.insert(0, Hold())
"""


@pytest.mark.parametrize("signum,code,name", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                              (signal.SIGINT, 130, "interrupted")])
def test_a_stage_run_as_a_program_stops_with_one_line_while_importing(tmp_path, signum, code, name):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    marker = tmp_path / "importing"
    (hooks / "sitecustomize.py").write_text(_HOLD_IMPORTS.format(marker=str(marker)))
    env = {**os.environ, "PYTHONPATH": f"{hooks}:{ROOT}"}
    with subprocess.Popen([sys.executable, "-m", "stages.subsample", "data/raw", "data/subsample"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as stage:
        try:
            _wait_for(marker, stage)
            stage.send_signal(signum)
            out, err = stage.communicate(timeout=60)
        finally:
            stage.kill()
    assert stage.returncode == code, err
    assert err == f"error: {name} while starting; nothing was written, rerun the stage to start again\n"


def _wait_for(marker, stage) -> None:
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert stage.poll() is None, f"the stage ended before importing librarian.core.stage: {stage.stderr.read()}"
        assert time.monotonic() < deadline, "the stage never got to import librarian.core.stage"
        time.sleep(0.02)

"""What every stage script shares: argument parsing, params loading and one-line error reports."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import traceback
from pathlib import Path

from librarian.core import process
from librarian.core.config import DEFAULT_PARAMS, Params, load_params
from librarian.core.errors import LibrarianError
from librarian.core.io import is_disk_full
from librarian.core.paths import check_output

# What a stopped stage leaves, and what to do about it: the same after Ctrl-C and SIGTERM.
_STOPPED = "no partial output was left: rerun the stage to finish (training resumes from its last checkpoint)"


def parse(description: str, inputs: dict[str, str], outputs: dict[str, str], argv=None) -> tuple[argparse.Namespace, Params]:
    """Parse the stage's input then output paths (name -> help) and --params; validate params once.

    Outputs must lie inside the project's data/ or metrics/ (the folder of the params file), with
    no symlink on the way: a stage never writes anywhere else.
    """
    parser = argparse.ArgumentParser(description=description)
    for name, help_text in {**inputs, **outputs}.items():
        parser.add_argument(name, type=Path, help=help_text)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    for name in outputs:
        check_output(getattr(args, name), args.params.parent)
    return args, params


def run_stage(main):
    """Run a stage's main(argv), turning any failure into one line on stderr and a non-zero exit.

    The traceback is printed only with LIBRARIAN_DEBUG=1: users should see what to fix, not our
    call stack. Outputs are written atomically, so a failed stage leaves nothing behind. Ctrl-C
    (exit 130) and SIGTERM (exit 143, also sent when the launcher dies) unwind the same way.
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        if _called_from_main_module():
            _run(main, argv)
            return
        # In-process (a test): as the process of a stage would, but give the caller's handling back.
        with process.restored_afterwards():
            _run(main, argv)

    return wrapper


def _called_from_main_module() -> bool:
    """Whether run_stage's wrapper was called by the program's own script (`python -m stages.x`, the
    `librarian` command): it then holds the process to its end, and the handling it sets stays."""
    return sys._getframe(2).f_globals.get("__name__") == "__main__"


def _run(main, argv) -> None:
    try:
        process.while_running()  # inside: it raises Terminated if the launcher is already gone
        main(argv)
        # The outputs are in place: a Ctrl-C while the interpreter shuts down changes nothing.
        process.ignore_stops()
    except LibrarianError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        process.ignore_stops()
        process.say(f"error: interrupted; {_STOPPED}")
        sys.exit(process.exit_code(signal.SIGINT))
    except process.Terminated:
        process.say(f"error: terminated (SIGTERM); {_STOPPED}")
        sys.exit(process.exit_code(signal.SIGTERM))
    except Exception as exc:  # noqa: BLE001 - the last line of defence for a clear message
        _fail(_unexpected(exc))


def _fail(message: str) -> None:
    """One line and exit 1; the traceback of the exception being handled only with LIBRARIAN_DEBUG=1."""
    if os.environ.get("LIBRARIAN_DEBUG") == "1":
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _unexpected(exc: Exception) -> str:
    reason = (str(exc).splitlines() or [""])[0]
    if is_disk_full(exc):  # a full disk can strike in a library's own files, outside our writers
        return f"the disk is full or a file-size limit was reached ({reason}); free some disk space and rerun"
    return f"unexpected {type(exc).__name__}: {reason} (set LIBRARIAN_DEBUG=1 for the traceback)"

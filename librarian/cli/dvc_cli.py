"""DVC's command line as a data source: `dvc ... --json`, its documented output, parsed."""

from __future__ import annotations

import json
import subprocess
import sys

from librarian.core.errors import LibrarianError

IN_PROJECT = "run this in the project folder (the one with dvc.yaml)"


def dvc_command(*args: str) -> list[str]:
    """This interpreter's DVC (the one the project pins, whatever `dvc` is first on PATH).

    With -P: `python -m` would put the current folder first on sys.path, and run from stages/,
    stages/tokenize.py would shadow the standard library's tokenize (a circular-import error).
    """
    return [sys.executable, "-P", "-m", "dvc", *args]


def dvc_json(*args: str, fix: str = IN_PROJECT):
    """The parsed output of `dvc ARGS --json` run here; a failure becomes one LibrarianError line ending in `fix`."""
    command = f"dvc {' '.join(args)}"
    result = subprocess.run(dvc_command(*args, "--json"), capture_output=True, text=True)
    if result.returncode != 0:
        reason = next((line.strip() for line in reversed(result.stderr.splitlines()) if line.strip()), "no message")
        raise LibrarianError(f"`{command}` failed ({reason}); {fix}")
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        raise LibrarianError(f"`{command} --json` printed no JSON; check that `{command}` works here") from None


def dotted(tree: dict, prefix: str = "") -> dict:
    """A nested params tree by DVC's names for its leaves (`model.n_layer`), in file order."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat

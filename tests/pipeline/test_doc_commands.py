"""Every shell command in the ```bash blocks of README.md and docs/ is checked, so that a renamed flag, param or script
fails the suite, not a reader.

- `librarian …` commands run, in the order the docs give them, in a fresh copy of the project after the README's
  `librarian demo` (tests/cli/test_demo.py, which runs the demo once for both), except PARSE_ONLY's, which cannot run
  there and are parsed by `librarian`'s own argument parser here instead.
- `dvc exp run -S key=value` overrides must name keys of params.yaml; `python benchmarks/….py` scripts and
  `-m stages.…` modules must exist. These commands are not run: they need the hub, the full data, a remote, or an hour.
- Install lines (`python3 -m venv`, activating it, `pip install`) are the only ones skipped, and SKIPPED lists them
  all: a new kind of command fails `test_every_command_is_checked` until it is given a check here.
"""

import shlex

import pytest
import yaml

from librarian.cli.dvc_cli import dotted
from librarian.cli.main import build_parser
from tests.doc_commands import LIBRARIAN_COMMANDS, NOT_RUN, PARSE_ONLY, RUN, SKIPPED, commands
from tests.helpers import ROOT

def test_every_command_is_checked():
    skipped = {c for c in commands() if c in SKIPPED or c.startswith(("pip install", "python3 -m venv"))}
    assert skipped == SKIPPED  # install lines only, each named above
    others = {shlex.split(c)[0] for c in commands() if c not in SKIPPED and not c.startswith("librarian ")}
    assert others <= set(NOT_RUN), f"give these commands a check here: {others - set(NOT_RUN)}"
    assert set(PARSE_ONLY) <= set(LIBRARIAN_COMMANDS)  # none left over from a command the docs dropped
    assert LIBRARIAN_COMMANDS.count("librarian demo") == 1 and len(RUN) >= 8


def test_the_readme_quickstart_is_what_ci_runs():
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(line for line in readme.splitlines() if line.endswith("pip install -q -e '.[test]' && pytest"))
    assert command in ci.splitlines()


@pytest.mark.parametrize("command", sorted(PARSE_ONLY))
def test_commands_that_cannot_run_here_parse(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.command == shlex.split(command)[1]


def test_dvc_overrides_name_params_and_scripts_exist():
    keys = set(dotted(yaml.safe_load((ROOT / "params.yaml").read_text())))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for command in commands():
        words = shlex.split(command)
        if words[:3] == ["dvc", "exp", "run"]:
            overrides = [words[i + 1].split("=")[0] for i, w in enumerate(words) if w == "-S"]
            assert set(overrides) <= keys, command
        if words[0] == "python" and words[1].startswith("benchmarks/"):
            assert (ROOT / words[1]).is_file(), command
        if words[0] == "torchrun":
            module = words[words.index("-m") + 1]
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), command
            # The stage's own arguments, as dvc.yaml runs it: a documented command with one too few fails.
            stage_args = {shlex.split(stage["cmd"])[2]: shlex.split(stage["cmd"])[3:] for stage in stages.values()}
            assert words[words.index("-m") + 2:] == stage_args[module], command


def test_the_speedrun_command_the_benchmark_prints_is_the_one_the_docs_show(monkeypatch):
    """`python benchmarks/speedrun.py --command speedrun` once left out data.source and data.fraction:
    run after the demo, it trained on the 370-story fixture. Same settings, values read as DVC reads them."""
    import importlib

    from librarian.core.config import read_yaml

    def settings(command: str) -> dict:
        words = shlex.split(command)
        pairs = [words[i + 1].partition("=") for i, word in enumerate(words) if word == "-S"]
        return {key: read_yaml(value) for key, _, value in pairs}

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    printed = importlib.import_module("speedrun").dvc_command("speedrun")
    documented = [c for c in commands() if c.startswith("dvc exp run -n speedrun ")]
    assert len(documented) == 1
    assert settings(printed) == settings(documented[0])
    assert settings(printed)["data.source"] == "../shared/data/tinystories"

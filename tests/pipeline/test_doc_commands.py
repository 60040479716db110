"""Every shell command in the ```bash blocks of README.md and docs/ is checked, so that a renamed flag, param or script
fails the suite, not a reader.

- `librarian …` commands run, in the order the docs give them, in a fresh copy of the project after the README's
  `librarian demo` (run here exactly as the README writes it), except PARSE_ONLY's, which cannot run there and are
  parsed by `librarian`'s own argument parser instead.
- `dvc exp run -S key=value` overrides must name keys of params.yaml; `python benchmarks/….py` scripts and
  `-m stages.…` modules must exist. These commands are not run: they need the hub, the full data, a remote, or an hour.
- Install lines (`python3 -m venv`, activating it, `pip install`) are the only ones skipped, and SKIPPED lists them
  all: a new kind of command fails `test_every_command_is_checked` until it is given a check here.
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from librarian.cli.main import build_parser
from tests.cli.test_demo import librarian
from tests.dvc_project import make_project
from tests.helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A fenced bash block, indented (inside a list item) or not.
FENCE = re.compile(r"^([ \t]*)```bash\n(.*?)^\1```", re.M | re.S)

SKIPPED = {"python3 -m venv .venv", ". .venv/bin/activate", "pip install -q -e .", "pip install -q -e '.[test]'",
           "pip install -e '.[serve]'"}
PARSE_ONLY = {
    "librarian serve": "a server: it runs until stopped (tests/inference/test_serve.py runs it)",
    "librarian serve --port 8080 --api-key '$(openssl rand -hex 16)' --model data/model/model.safetensors":
        "a server: it runs until stopped",
    "librarian plots HEAD lr-high": "needs the lr-high experiment of the docs' example, which trains on the hub's data",
}
# Commands the docs give that this module does not run, by program, and why (see the module's docstring).
NOT_RUN = {"dvc": "the hub, the full data, a remote or an hour; -S keys checked",
           "git": "a clone and a remote", "cd": "part of a clone", "curl": "a running server",
           "pytest": "the suite itself (.ci/run runs the README's command)",
           "python": "benchmarks: minutes to hours; the scripts must exist",
           "torchrun": "distributed training; the module must exist"}
CHAT_INPUT = "Tell me a story about a dog.\n/quit\n"


def commands() -> list[str]:
    """Every command of every bash block, in the docs' order: `a && b` gives two, a comment none."""
    found = []
    for path in DOCS:
        for match in FENCE.finditer(path.read_text(encoding="utf-8")):
            for line in re.sub(r"\\\n", " ", match.group(2)).splitlines():
                words = shlex.split(line, comments=True)
                segments = [[]]
                for word in words:
                    segments.append([]) if word == "&&" else segments[-1].append(word)
                found += [shlex.join(s) for s in segments if s]
    return found


def unique(items):
    return list(dict.fromkeys(items))


LIBRARIAN_COMMANDS = unique(c for c in commands() if c.startswith("librarian "))
RUN = [c for c in LIBRARIAN_COMMANDS if c not in PARSE_ONLY and c != "librarian demo"]


def params_keys(raw: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in raw.items():
        keys |= params_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


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
    keys = params_keys(yaml.safe_load((ROOT / "params.yaml").read_text()))
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


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory) -> Path:
    """A fresh copy of the project after the README's `librarian demo`, with results/ for `librarian compare`."""
    project = make_project(tmp_path_factory.mktemp("docs") / "clone", tiny=False)
    (project / "results").mkdir()
    (project / "results/reference.json").write_bytes((ROOT / "results/reference.json").read_bytes())
    demo = librarian("demo", cwd=project)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    return project


@pytest.mark.parametrize("command", RUN, ids=RUN)
def test_librarian_commands_of_the_docs_run_on_the_demo(demo_project, command):
    args = shlex.split(command)[1:]
    result = librarian(*args, cwd=demo_project, stdin=CHAT_INPUT if args[0] == "chat" else "")
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip()

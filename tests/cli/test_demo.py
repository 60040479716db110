"""The README's one-minute offline demo, run exactly as a newcomer would: `librarian demo`, then
`librarian generate` and `librarian chat` on its result, in a fresh copy with the committed params.

The demo runs once for this module (about a minute and a half on 2 cores), and every `librarian` command
the docs give (tests/doc_commands.py) runs on its result here too, so the suite pays for one demo.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.doc_commands import CHAT_INPUT, RUN
from tests.dvc_project import dvc, make_project, tool_env
from tests.helpers import ROOT

LIBRARIAN = Path(sys.executable).parent / "librarian"


def librarian(*args, cwd, stdin=""):
    return subprocess.run([str(LIBRARIAN), *args], cwd=cwd, env=tool_env(), input=stdin, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A fresh copy of the project (committed params, results/ for `librarian compare`) after `librarian demo`."""
    project = make_project(tmp_path_factory.mktemp("demo") / "clone", tiny=False)
    (project / "results").mkdir()
    (project / "results/reference.json").write_bytes((ROOT / "results/reference.json").read_bytes())
    committed = yaml.safe_load((project / "params.yaml").read_text())
    assert committed["data"]["source"].startswith("hf:")  # the demo, not the test, points at the fixture
    return project, librarian("demo", cwd=project)


def test_demo_runs_the_pipeline_offline(demo):
    project, run = demo
    assert run.returncode == 0, run.stdout + run.stderr
    for stage in ("download", "clean", "train", "evaluate", "samples"):
        assert f"Running stage '{stage}'" in run.stdout + run.stderr
    assert "generate> Once upon a time" in run.stdout and "chat> User:" in run.stdout

    # The experiment used demo.yaml's settings, and the model learnt something: far below the
    # perplexity of guessing uniformly among the 1024 tokens.
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["data"]["source"] == "tests/fixtures/tinystories" and params["train"]["max_tokens"] == 1_000_000
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert metrics["perplexity"] < 150  # 58 measured
    assert "demo" in dvc("exp", "list", "--name-only", cwd=project).split()


def test_the_demo_model_generates_and_chats(demo):
    project, run = demo
    assert run.returncode == 0, run.stdout + run.stderr
    story = librarian("generate", "--prompt", "Once upon a time", "--max-new-tokens", "30", "--seed", "1", cwd=project)
    assert story.returncode == 0, story.stderr
    assert story.stdout.startswith("Once upon a time") and len(story.stdout.split()) > 6

    chat = librarian("chat", "--max-new-tokens", "30", "--seed", "1", cwd=project,
                     stdin="Tell me a story about a dog.\n/quit\n")
    assert chat.returncode == 0, chat.stderr
    assert "Tell me a story about a dog." in chat.stdout


@pytest.mark.parametrize("command", RUN, ids=RUN)
def test_librarian_commands_of_the_docs_run_on_the_demo(demo, command):
    project, run = demo
    assert run.returncode == 0, run.stdout + run.stderr
    args = shlex.split(command)[1:]
    result = librarian(*args, cwd=project, stdin=CHAT_INPUT if args[0] == "chat" else "")
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip()


def test_demo_outside_the_project_is_one_line(tmp_path):
    result = librarian("demo", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "run `librarian demo` from the Librarian project folder" in result.stderr
    assert not any(tmp_path.iterdir())

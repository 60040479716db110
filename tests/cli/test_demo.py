"""The README's one-minute offline demo, run exactly as a newcomer would: `librarian demo`, then
`librarian generate` and `librarian chat` on its result, in a fresh copy with the committed params."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.dvc_project import dvc, make_project, tool_env

LIBRARIAN = Path(sys.executable).parent / "librarian"


def librarian(*args, cwd, stdin=""):
    return subprocess.run([str(LIBRARIAN), *args], cwd=cwd, env=tool_env(), input=stdin, capture_output=True,
                          text=True, timeout=900)


def test_demo_runs_the_pipeline_offline_then_generates_and_chats(tmp_path):
    project = make_project(tmp_path / "clone", tiny=False)
    committed = yaml.safe_load((project / "params.yaml").read_text())
    assert committed["data"]["source"].startswith("hf:")  # the demo, not the test, points at the fixture

    demo = librarian("demo", cwd=project)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    for stage in ("download", "clean", "train", "evaluate", "samples"):
        assert f"Running stage '{stage}'" in demo.stdout + demo.stderr
    assert "generate> Once upon a time" in demo.stdout and "chat> User:" in demo.stdout

    # The experiment used demo.yaml's settings, and the model learnt something: far below the
    # perplexity of guessing uniformly among the 1024 tokens.
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["data"]["source"] == "tests/fixtures/tinystories" and params["train"]["max_tokens"] == 1_000_000
    metrics = json.loads((project / "metrics/metrics.json").read_text())
    assert metrics["perplexity"] < 150  # 58 measured
    assert "demo" in dvc("exp", "list", "--name-only", cwd=project).split()

    story = librarian("generate", "--prompt", "Once upon a time", "--max-new-tokens", "30", "--seed", "1", cwd=project)
    assert story.returncode == 0, story.stderr
    assert story.stdout.startswith("Once upon a time") and len(story.stdout.split()) > 6

    chat = librarian("chat", "--max-new-tokens", "30", "--seed", "1", cwd=project,
                     stdin="Tell me a story about a dog.\n/quit\n")
    assert chat.returncode == 0, chat.stderr
    assert "Tell me a story about a dog." in chat.stdout


def test_demo_outside_the_project_is_one_line(tmp_path):
    result = librarian("demo", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "run `librarian demo` from the Librarian project folder" in result.stderr
    assert not any(tmp_path.iterdir())

"""A temporary git+dvc copy of the project, for tests that drive the real `dvc` command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT, TINY_ARCH, set_dotted

STAGES = ["download", "subsample", "clean", "train_tokenizer", "tokenize", "train", "evaluate", "samples",
          "chat_data", "chat_tokens", "finetune", "evaluate_chat", "chat_samples"]
# A tiny model and a few steps: the pipeline's machinery at full, the compute at a minimum.
TINY = {**{f"model.{k}": v for k, v in TINY_ARCH.items()}, "model.context_length": 32,
        "train.stride": 32, "eval.stride": 16, "train.batch_size": 8, "train.max_steps": 12, "train.max_epochs": 2,
        "train.lr": 3.0e-3, "train.threads": 1,
        "finetune.stride": 32, "finetune.batch_size": 8, "finetune.max_steps": 12, "finetune.max_epochs": 2,
        "evaluate_chat.requests": 4, "evaluate_chat.max_new_tokens": 24, "evaluate_chat.threads": 1,
        "chat_samples.max_new_tokens": 24, "chat_samples.threads": 1}


def tool_env() -> dict:
    """The environment DVC and the stages run in: this venv's python and dvc first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def code_env() -> dict:
    """tool_env() running this checkout's code from any folder (a test's tmp_path outside the project)."""
    return {**tool_env(), "PYTHONPATH": str(ROOT)}


def run(cmd, cwd, stdout_only: bool = False, **kw):
    """`cmd`'s output (stdout then stderr; with `stdout_only`, stdout alone), asserting it succeeded."""
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def dvc(*args, cwd):
    return run([sys.executable, "-m", "dvc", *args], cwd)


def dvc_json(*args, cwd):
    """The JSON a `dvc ... --json` command prints on stdout: a library's warning on stderr (asyncssh's
    CryptographyDeprecationWarning, say) must not break the parse."""
    return json.loads(run([sys.executable, "-m", "dvc", *args], cwd, stdout_only=True))


def ran(output):
    """The stages that did work in a `dvc repro`'s output. check_params, which reruns on any params
    change and refuses bad params before DVC removes outputs, is left out: test_pipeline.py checks it."""
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def set_params(project: Path, **overrides):
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def make_project(dest: Path, tiny: bool = True) -> Path:
    """A git+dvc copy of the project; with `tiny`, reading the shipped fixture with a tiny model.

    Without `tiny` the params are the committed ones, as in a fresh clone.
    """
    for name in ["librarian", "stages", "tests/fixtures/tinystories"]:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["dvc.yaml", "params.yaml", "demo.yaml", ".gitignore", ".dvcignore"]:
        shutil.copy(ROOT / name, dest / name)
    (dest / "metrics").mkdir()
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "t@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    dvc("init", "-q", "--force", cwd=dest)
    dvc("config", "core.analytics", "false", cwd=dest)
    if tiny:
        set_params(dest, **{"data.source": "tests/fixtures/tinystories", "data.fraction": 1.0,
                            "tokenizer.vocab_size": 1000, "tokenize.chunk_stories": 50, **TINY})
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "fixture project"], dest)
    return dest


def copy_built(built: Path, dest: Path, up_to_date: bool = False) -> Path:
    """A copy of the session's reproduced fixture project (conftest.built_project), its cache and
    run-cache included: tests change the copy, never the shared original. With `up_to_date`, checks
    that the copy is the reproduced baseline (`dvc repro` reruns nothing), for tests that build on it."""
    shutil.copytree(built, dest, symlinks=True)
    if up_to_date:
        assert ran(dvc("repro", cwd=dest)) == []
    return dest


def lock_outputs(project: Path) -> dict:
    """Every output path in dvc.lock and its md5."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def files_under(project: Path, path: str) -> dict[str, bytes]:
    """The bytes of an output: the file itself, or every file below the folder."""
    root = project / path
    if root.is_file():
        return {path: root.read_bytes()}
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

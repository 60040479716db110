"""End to end: `dvc repro` of the data stages in a temporary git+dvc copy of the project."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

STAGES = ["download", "subsample", "clean", "train_tokenizer", "tokenize"]


def run(cmd, cwd, **kw):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def dvc(*args, cwd):
    return run([sys.executable, "-m", "dvc", *args], cwd)


def ran(output):
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def set_params(project: Path, **overrides):
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = raw
        for key in parents:
            section = section[key]
        section[leaf] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def make_project(dest: Path) -> Path:
    """A git+dvc copy of the project that reads the shipped fixture instead of the hub."""
    for name in ["librarian", "stages", "tests/fixtures/tinystories"]:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"]:
        shutil.copy(ROOT / name, dest / name)
    (dest / "metrics").mkdir()
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "t@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    dvc("init", "-q", "--force", cwd=dest)
    dvc("config", "core.analytics", "false", cwd=dest)
    set_params(dest, **{"data.source": "tests/fixtures/tinystories", "data.fraction": 1.0,
                        "tokenizer.vocab_size": 1000, "tokenize.chunk_stories": 50})
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "fixture project"], dest)
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("e2e"))
    out = dvc("repro", cwd=project)
    assert ran(out) == STAGES
    return project


def test_repro_builds_every_artifact(project):
    data = project / "data"
    assert sorted(p.name for p in (data / "raw").iterdir()) == ["manifest.json", "train.parquet", "validation.parquet"]
    assert sorted(p.name for p in (data / "clean").iterdir()) == [
        "official_validation.parquet", "test.parquet", "train.parquet", "val.parquet"]
    report = json.loads((project / "metrics" / "clean.json").read_text())
    assert report["train_pool"]["stories_in"] == 370 and report["train_pool"]["changed"]["mojibake"] == 33
    for split in ["train", "val", "test", "official_validation"]:
        meta = json.loads((data / "tokens" / f"{split}.json").read_text())
        ids = np.fromfile(data / "tokens" / f"{split}.bin", dtype=np.uint16)
        assert meta["tokens"] == len(ids) > 0 and meta["stories"] == report["splits"][split]
        assert int(ids.max()) < meta["vocab_size"] == 1000


def test_second_repro_runs_nothing_and_dag_shows_the_chain(project):
    assert ran(dvc("repro", cwd=project)) == []
    assert "up to date" in dvc("status", cwd=project)
    mermaid = dvc("dag", "--md", cwd=project)
    names = dict(re.findall(r'(node\d+)\["(\w+)"\]', mermaid))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", mermaid)}
    assert edges == {("download", "subsample"), ("subsample", "clean"), ("clean", "train_tokenizer"),
                     ("clean", "tokenize"), ("train_tokenizer", "tokenize")}


def test_metrics_show_reads_clean_report(project):
    shown = dvc("metrics", "show", "--json", cwd=project)
    assert "stories_in" in shown


def test_a_param_change_reruns_only_what_depends_on_it(project):
    before = (project / "data" / "clean" / "train.parquet").read_bytes()
    set_params(project, **{"tokenizer.vocab_size": 900})
    assert ran(dvc("repro", cwd=project)) == ["train_tokenizer", "tokenize"]
    assert (project / "data" / "clean" / "train.parquet").read_bytes() == before
    assert json.loads((project / "data" / "tokens" / "train.json").read_text())["vocab_size"] == 900
    set_params(project, **{"clean.min_chars": 500})
    assert ran(dvc("repro", cwd=project)) == ["clean", "train_tokenizer", "tokenize"]


def test_rerun_from_scratch_gives_identical_artifacts(project, tmp_path):
    """Same params and data, a fresh copy: every output hash in dvc.lock is the same."""
    set_params(project, **{"tokenizer.vocab_size": 1000, "clean.min_chars": 100})
    dvc("repro", cwd=project)
    other = make_project(tmp_path / "other")
    dvc("repro", cwd=other)
    lock_a = yaml.safe_load((project / "dvc.lock").read_text())
    lock_b = yaml.safe_load((other / "dvc.lock").read_text())
    outs = lambda lock: {s: [(o["path"], o["md5"]) for o in v.get("outs", [])] for s, v in lock["stages"].items()}
    assert outs(lock_a) == outs(lock_b)

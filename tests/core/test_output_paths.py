"""A stage never writes outside the project's data/ and metrics/, whatever `..` or symlink its output
path holds; `data.source` is only read, through `..` and symlinks alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from librarian.core.errors import LibrarianError


# --- paths: writes stay inside data/ and metrics/ ---------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path):
    """A project folder with a params.yaml, and a folder beside it that must never be written."""
    import yaml

    from tests.helpers import FIXTURE_CORPUS, ROOT

    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    (outside / "raw").mkdir(parents=True)
    (outside / "raw" / "keep.txt").write_text("a user's file\n")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(source=str(FIXTURE_CORPUS), fraction=1.0)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return project, outside


OUTPUT_CASES = {
    "dotdot out of the project": lambda project, outside: "../outside/raw",
    "dotdot out of data/": lambda project, outside: "data/../../outside/raw",
    "inside the project, not in data/": lambda project, outside: "data/../elsewhere/raw",
    "data/ itself": lambda project, outside: "data",
    "a symlinked output folder": lambda project, outside: _link(project, "data/raw", outside / "raw"),
    "a symlinked data/": lambda project, outside: _link(project, "data", outside) + "/raw",
    "a symlink to a file": lambda project, outside: _link(project, "metrics/raw", outside / "raw" / "keep.txt"),
}


def _link(project: Path, relative: str, target: Path) -> str:
    (project / relative).parent.mkdir(parents=True, exist_ok=True)
    (project / relative).symlink_to(target)
    return relative


@pytest.mark.parametrize("case", OUTPUT_CASES)
def test_an_output_path_outside_data_and_metrics_is_refused(sandbox, case, capsys, monkeypatch):
    from stages.download import main as download

    project, outside = sandbox
    monkeypatch.chdir(project)  # as DVC runs stages: from the project root, with relative paths
    out = OUTPUT_CASES[case](project, outside)
    before, inside_before = snapshot(outside), snapshot(project)
    with pytest.raises(SystemExit) as exit_info:
        download([out])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and err.startswith(f"error: output path {out} ")
    assert "outside the project's data/ and metrics/" in err or "goes through the symlink" in err
    assert snapshot(outside) == before and snapshot(project) == inside_before
    assert not (project / "elsewhere").exists() and not (project.parent / "elsewhere").exists()


def test_outputs_inside_data_and_metrics_are_written(sandbox, monkeypatch):
    from stages.download import main as download

    project, outside = sandbox
    monkeypatch.chdir(project)
    download(["data/sub/../raw"])  # a `..` that stays inside data/ is fine
    assert (project / "data" / "raw" / "manifest.json").exists()


def test_the_source_is_read_through_dotdot_and_symlinks_and_never_written(sandbox, monkeypatch):
    import yaml

    from stages.download import main as download
    from tests.helpers import FIXTURE_CORPUS

    project, outside = sandbox
    corpus = project.parent / "corpus-link"
    corpus.symlink_to(FIXTURE_CORPUS, target_is_directory=True)
    before = snapshot(FIXTURE_CORPUS)
    monkeypatch.chdir(project)
    download(["data/direct"])
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["source"] = "../corpus-link"  # relative to the project folder, through a symlink
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    download(["data/linked"])
    manifest = {name: json.loads((project / "data" / name / "manifest.json").read_text()) for name in ("direct", "linked")}
    assert manifest["direct"]["splits"] == manifest["linked"]["splits"]
    stories = {name: {k: v for k, v in snapshot(project / "data" / name).items() if k.endswith(".parquet")}
               for name in ("direct", "linked")}
    assert stories["direct"] == stories["linked"] and stories["direct"]
    assert snapshot(FIXTURE_CORPUS) == before


LOCK = """schema: '2.0'
stages:
  train:
    cmd: python -m stages.train data/tokens data/chat_tokens data/model metrics/train metrics/train_speed data/train_state
    outs:
    - path: data/model
      hash: md5
      md5: 94b4dcffd826418b454228d52bfc3fca.dir
  evaluate:
    cmd: python -m stages.evaluate data/model/model.safetensors data/tokens metrics/metrics.json
    outs:
    - path: metrics/metrics.json
      hash: md5
      md5: 907d91cb0000000000000000000000aa
"""


def test_a_missing_output_that_dvc_lock_records_is_one_checkout_away(tmp_path, monkeypatch):
    """DVC deletes a stage's outputs before it runs it: after a failed run the model is missing from the
    workspace but whole in the cache. generate, chat, serve and export (read_metadata), and compare say so."""
    from librarian.cli.results import compare
    from librarian.model.checkpoint import read_metadata

    (tmp_path / "dvc.lock").write_text(LOCK)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LibrarianError) as model:
        read_metadata("data/model/model.safetensors")
    assert "`dvc checkout data/model` brings back" in str(model.value) and "`dvc repro train`" in str(model.value)
    with pytest.raises(LibrarianError) as metrics:
        compare("metrics/metrics.json")
    assert "`dvc checkout metrics/metrics.json`" in str(metrics.value)


def test_a_missing_file_no_dvc_lock_records_gets_the_stage_to_run(tmp_path, monkeypatch):
    from librarian.data.tokenizer import load_tokenizer
    from librarian.model.checkpoint import read_metadata

    (tmp_path / "dvc.lock").write_text(LOCK)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LibrarianError) as outside:
        read_metadata("elsewhere/model.safetensors")
    assert "dvc checkout" not in str(outside.value) and "`dvc repro train`" in str(outside.value)
    with pytest.raises(LibrarianError) as tokenizer:
        load_tokenizer("data/tokenizer.json")  # not in this lock
    assert "dvc checkout" not in str(tokenizer.value) and "dvc repro train_tokenizer" in str(tokenizer.value)

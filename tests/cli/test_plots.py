"""`librarian plots`: the curves of a real training run, drawn by DVC's plot definitions, with no network."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from librarian.core.errors import LibrarianError
from librarian.cli.plots import check_replaceable, render
from librarian.training.train import TrainPaths, train
from tests.helpers import ROOT, TINY_MODEL, VOCAB, network_off, stories, write_tokens
from tests.dvc_project import code_env, dvc

CODE_ENV = code_env()
CURVES = ["loss", "train_loss", "val_loss", "lr", "tokens_seen", "tokens_per_s", "elapsed_s"]


@pytest.fixture
def project(tmp_path, make_params):
    """A DVC project (no git) holding the curves of a 3-epoch training run, as the train stage writes them."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ["dvc.yaml", "params.yaml"]:
        shutil.copy(ROOT / name, project / name)
    dvc("init", "-q", "--no-scm", cwd=project)
    tokens = tmp_path / "tokens"
    write_tokens(tokens, "train", stories(150, seed=1), VOCAB)
    write_tokens(tokens, "val", stories(30, seed=2), VOCAB)
    params = make_params(**{**TINY_MODEL, "train.max_epochs": 3, "train.log_every": 4, "train.schedule": "cosine",
                            "train.warmup_steps": 10, "train.min_lr": 1e-4})
    train(params, tokens, TrainPaths(model=tmp_path / "model", curves=project / "metrics" / "train",
                                     speed=project / "metrics" / "train_speed", state=tmp_path / "state"))
    return project


def drawn(png: Path) -> tuple[int, int]:
    """How many pixel columns and rows hold a saturated colour: the curves (axes, grid and text are grey)."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    coloured = rgb.max(axis=2) - rgb.min(axis=2) > 60
    return int(coloured.any(axis=0).sum()), int(coloured.any(axis=1).sum())


def test_plots_render_offline(project):
    cmd = network_off([sys.executable, "-m", "librarian.cli.main", "plots", "--out", "offline"])
    result = subprocess.run(cmd, cwd=project, env=CODE_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = project / "offline"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{c}.png" for c in CURVES), "index.html"])

    # Each curve runs across its plot (a point every 4 steps) and up or down it: many columns and rows.
    for curve in ["loss", "train_loss", "lr", "tokens_seen"]:
        columns, rows = drawn(out / f"{curve}.png")
        assert columns > 400 and rows > 150, (curve, columns, rows)  # the plot area is 600 x 600 pixels at scale 2
    columns, rows = drawn(out / "val_loss.png")  # three epochs: a line through three points
    assert columns > 400 and rows > 150, (columns, rows)

    # The page carries Vega itself and loads nothing: it draws with the network off too.
    page = (out / "index.html").read_text()
    assert "window.vegaEmbed=" in page and len(page) > 500_000
    assert "<script src" not in page and "<link" not in page
    steps = [int(line.split("\t")[0]) for line in
             (project / "metrics/train/plots/metrics/train_loss.tsv").read_text().splitlines()[1:]]
    assert steps[:3] == [4, 8, 12] and json.dumps({"step": "8"})[1:-1] in page  # the per-step points are in it
    check_replaceable(out)  # a rerun may replace its own output (and only that: see below)


def test_plots_never_replace_a_folder_they_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LibrarianError, match="was not written by `librarian plots`"):
        render([], mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_plots_outside_a_project_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "librarian.cli.main", "plots"], cwd=tmp_path, env=CODE_ENV,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: DVC found no curves"), result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "dvc_plots").exists()


def test_plot_files_are_named_by_the_plot_and_its_stage_where_names_clash():
    from librarian.cli.plots import file_names

    ids = ["loss", "finetune_loss", "metrics/train_speed/plots/metrics/lr.tsv",
           "metrics/finetune_speed/plots/metrics/lr.tsv", "metrics/train/plots/metrics/tokens_seen.tsv"]
    assert file_names(ids) == {"loss": "loss.png", "finetune_loss": "finetune_loss.png",
                               "metrics/train_speed/plots/metrics/lr.tsv": "train_speed_lr.png",
                               "metrics/finetune_speed/plots/metrics/lr.tsv": "finetune_speed_lr.png",
                               "metrics/train/plots/metrics/tokens_seen.tsv": "tokens_seen.png"}


def test_runs_and_plots_work_from_the_stages_folder(tmp_path, built_project):
    """`librarian runs` started in stages/: DVC must not find stages/tokenize.py as the standard tokenize."""
    from tests.dvc_project import copy_built, tool_env

    project = copy_built(built_project, tmp_path / "p")
    librarian = Path(sys.executable).with_name("librarian")
    outputs = []
    for command in (["runs"], ["plots", "--out", str(tmp_path / "curves")]):
        result = subprocess.run([str(librarian), *command], cwd=project / "stages", env=tool_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "Traceback" not in result.stderr, (command, result.stderr)
        outputs.append(result.stdout)
    assert "workspace" in outputs[0]
    assert {p.name for p in (tmp_path / "curves").iterdir()} >= {"loss.png", "train_lr.png", "finetune_lr.png",
                                                            "train_speed_tokens_per_s.png", "index.html"}

"""A new machine: push to a local-directory remote, clone elsewhere with an empty cache, pull.

Also the run-cache (a clone reproduces without training) and determinism (`dvc repro -f` twice
gives the same dvc.lock, every hash, model weights included).
"""

import shutil
from pathlib import Path

import pytest

from tests.dvc_project import STAGES, copy_built, dvc, files_under, lock_outputs, ran, run


@pytest.fixture(scope="module")
def machine_one(built_project, tmp_path_factory):
    """Machine one: repro, commit dvc.lock, push (run-cache included) to a local-directory remote."""
    base = tmp_path_factory.mktemp("remote")
    project = base / "one"
    copy_built(built_project, project, up_to_date=True)
    dvc("remote", "add", "-d", "storage", str(base / "storage"), cwd=project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "run"], project)
    dvc("push", "--run-cache", cwd=project)
    return project


def fresh_clone(source: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", str(source), str(dest)], dest.parent)
    assert not (dest / ".dvc" / "cache").exists()  # its own, empty cache
    return dest


def test_clone_and_pull_bring_back_every_artifact(machine_one, tmp_path):
    two = fresh_clone(machine_one, tmp_path / "two")
    dvc("pull", cwd=two)
    assert lock_outputs(two) == lock_outputs(machine_one)
    for path in lock_outputs(machine_one):
        assert files_under(two, path) == files_under(machine_one, path), path
    assert "up to date" in dvc("status", cwd=two)
    assert ran(dvc("repro", cwd=two)) == []
    assert (two / "metrics" / "metrics.json").read_bytes() == (machine_one / "metrics" / "metrics.json").read_bytes()


def test_run_cache_reproduces_without_training(machine_one, tmp_path):
    """Without dvc.lock, `dvc repro --pull` restores every stage from the run-cache instead of running it."""
    two = fresh_clone(machine_one, tmp_path / "two")
    (two / "dvc.lock").unlink()
    out = dvc("repro", "--pull", cwd=two)
    assert ran(out) == [], out
    for stage in STAGES:
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in out, stage
    assert lock_outputs(two) == lock_outputs(machine_one)
    model = "data/model"
    assert files_under(two, model) == files_under(machine_one, model)


def test_repro_force_twice_gives_the_same_lock(machine_one, tmp_path):
    """The fixture project's `dvc repro` (machine one's lock), then `dvc repro -f` over it: the same dvc.lock."""
    project = tmp_path / "again"
    shutil.copytree(machine_one, project)
    first = (project / "dvc.lock").read_text()
    assert ran(dvc("repro", "-f", cwd=project)) == STAGES  # every stage really ran again
    assert (project / "dvc.lock").read_text() == first
    assert lock_outputs(project) == lock_outputs(machine_one)

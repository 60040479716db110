"""DVC experiments on the pipeline: `dvc exp run -S`, the queue, `exp show`, `metrics/params/plots diff`, `exp apply`.

One temporary git+dvc copy of the project (tests/dvc_project.py) for the whole module: the baseline
is the session's reproduced fixture project (conftest.built_project), copied and committed once;
each experiment only changes train.lr, so it reruns train, evaluate and samples, and the data
stages come from the cache.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from librarian.core.precision import resolve_precision
from tests.dvc_project import copy_built, dvc, ran, run

QUEUE_TIMEOUT_S = 300
RERUN = ["train", "evaluate", "samples", "finetune", "evaluate_chat", "chat_samples"]


def project_processes(project: Path) -> list:
    """Processes working inside the project (queue workers, experiment runs in .dvc/tmp/exps)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cwd = proc.info.get("cwd")
        if cwd and (cwd == str(project) or cwd.startswith(f"{project}/")):
            found.append(proc)
    return found


def stop_the_queue(project: Path) -> None:
    """Stop the queue's workers (and any task still running); wait for every process of ours to end."""
    import psutil

    subprocess.run([sys.executable, "-m", "dvc", "queue", "stop", "--kill"], cwd=project,
                   capture_output=True, text=True, timeout=120)
    left = project_processes(project)
    _, alive = psutil.wait_procs(left, timeout=30)
    for proc in alive:  # started by this module's `dvc queue start`, inside its temporary project
        proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory):
    """A copy of the session's reproduced fixture project (its cache and run-cache included), the run committed."""
    project = tmp_path_factory.mktemp("experiments") / "project"
    copy_built(built_project, project, up_to_date=True)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    yield project
    stop_the_queue(project)


def head(project: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], project).strip()


def show(project: Path) -> dict:
    """`dvc exp show --json` as {name: {"rev", "lr", "metrics"}}; the committed baseline is "baseline"."""
    out = dvc("exp", "show", "--json", cwd=project)
    rows = {}
    for entry in json.loads(out):
        if entry["rev"] == "workspace":
            continue
        if entry["rev"] == head(project):
            rows["baseline"] = entry["data"]
        for exp in entry.get("experiments") or []:
            tip = exp["revs"][0]
            rows[exp["name"] or tip["rev"]] = tip["data"]
    return {name: {"rev": data["rev"],
                   "lr": data["params"]["params.yaml"]["data"]["train"]["lr"],
                   "metrics": data["metrics"].get("metrics/metrics.json", {}).get("data")}
            for name, data in rows.items()} | {"_raw": out}


def restore_baseline(project: Path) -> None:
    run(["git", "checkout", "--", "."], project)
    dvc("checkout", cwd=project)
    assert run(["git", "status", "--porcelain"], project) == ""


@pytest.fixture(scope="module")
def lr_high(project):
    """`dvc exp run` in the workspace: its results land there; recorded, then the baseline is restored."""
    out = dvc("exp", "run", "-n", "lr-high", "-S", "train.lr=0.001", cwd=project)
    result = {"output": out,
              "params_text": (project / "params.yaml").read_text(),
              "metrics": json.loads((project / "metrics" / "metrics.json").read_text()),
              "status": run(["git", "status", "--porcelain"], project)}
    restore_baseline(project)
    return result


def queue_status(project: Path) -> tuple[dict, str]:
    """`dvc queue status` as {experiment name: status} and the raw text."""
    out = dvc("queue", "status", cwd=project)
    status = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 3 and words[-1] in {"Queued", "Running", "Success", "Failed"}:
            status[words[1]] = words[-1]
    return status, out


@pytest.fixture(scope="module")
def queued(project, lr_high):
    """Two experiments queued, then run by one background worker, in temporary workspaces."""
    outputs = [dvc("exp", "run", "--queue", "-n", "q1", "-S", "train.lr=0.002", cwd=project),
               dvc("exp", "run", "--queue", "-n", "q2", "-S", "train.lr=5e-4", cwd=project)]
    status, text = queue_status(project)
    assert status == {"q1": "Queued", "q2": "Queued"}, text
    assert run(["git", "status", "--porcelain"], project) == "", "queueing must leave the workspace alone"
    outputs.append(dvc("queue", "start", "-j", "1", cwd=project))
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        status, text = queue_status(project)
        if "Failed" in status.values():
            logs = {name: subprocess.run([sys.executable, "-m", "dvc", "queue", "logs", name], cwd=project,
                                         capture_output=True, text=True, timeout=60).stdout[-3000:]
                    for name in status}
            pytest.fail(f"a queued experiment failed:\n{text}\n{logs}")
        if status == {"q1": "Success", "q2": "Success"}:
            break
        assert time.monotonic() < deadline, f"queue not done after {QUEUE_TIMEOUT_S} s:\n{text}\n{outputs}"
        time.sleep(2)
    return {"outputs": outputs, "status_text": text}


def test_exp_run_sets_the_param_and_exp_show_lists_it(project, lr_high):
    out = lr_high["output"]
    assert ran(out) == RERUN, out  # the data stages are cached; only what reads train.lr reruns
    assert "Ran experiment(s): lr-high" in out, out
    # -S writes a plain float (strict validation in librarian/core/config.py would refuse a string)
    assert yaml.safe_load(lr_high["params_text"])["train"]["lr"] == 0.001, lr_high["params_text"]
    assert " M params.yaml" in lr_high["status"] and " M dvc.lock" in lr_high["status"], lr_high["status"]

    shown = show(project)
    assert {"baseline", "lr-high"} <= set(shown), shown["_raw"]
    base, exp = shown["baseline"], shown["lr-high"]
    assert (base["lr"], exp["lr"]) == (0.003, 0.001)
    assert exp["metrics"] == lr_high["metrics"], shown["_raw"]
    for key in ["loss", "perplexity", "top1_accuracy"]:
        assert key in base["metrics"] and key in exp["metrics"], shown["_raw"]
    assert exp["metrics"]["loss"] != base["metrics"]["loss"]
    assert exp["metrics"]["perplexity"] != base["metrics"]["perplexity"]

    table = dvc("exp", "show", "--csv", cwd=project)
    assert "lr-high" in table and "perplexity" in table.splitlines()[0], table


def test_metrics_and_params_diff_against_the_experiment(project, lr_high):
    shown = show(project)
    base, exp = shown["baseline"]["metrics"], shown["lr-high"]["metrics"]
    out = dvc("metrics", "diff", "HEAD", "lr-high", "--json", cwd=project)
    loss = json.loads(out)["metrics/metrics.json"]["loss"]
    assert (loss["old"], loss["new"]) == (base["loss"], exp["loss"]) and loss["diff"] != 0, out
    # the full experiment commit works as well as the name
    out = dvc("metrics", "diff", "HEAD", shown["lr-high"]["rev"], "--json", cwd=project)
    assert json.loads(out)["metrics/metrics.json"]["loss"]["diff"] == pytest.approx(loss["diff"]), out

    out = dvc("params", "diff", "HEAD", "lr-high", "--json", cwd=project)
    assert list(json.loads(out)) == ["params.yaml"] and list(json.loads(out)["params.yaml"]) == ["train.lr"], out
    lr = json.loads(out)["params.yaml"]["train.lr"]
    assert (lr["old"], lr["new"], lr["diff"]) == (0.003, 0.001, pytest.approx(-0.002)), out


def test_plots_diff_draws_both_revisions(project, lr_high, tmp_path):
    out = dvc("plots", "diff", "HEAD", "lr-high", "--json", cwd=project)
    plots = json.loads(out)["data"]
    for curve in ["train_loss", "val_loss", "lr"]:
        [plot] = plots[f"metrics/train/plots/metrics/{curve}.tsv"]
        assert plot["revisions"] == ["HEAD", "lr-high"], out
        values = plot["content"]["data"]["values"]
        by_rev = {rev: [float(v[curve]) for v in values if v["rev"] == rev] for rev in ["HEAD", "lr-high"]}
        assert by_rev["HEAD"] and by_rev["lr-high"] and by_rev["HEAD"] != by_rev["lr-high"], values
    assert "metrics/train_speed/plots/metrics/tokens_per_s.tsv" in plots, out  # the top-level plot, from git

    dvc("plots", "diff", "HEAD", "lr-high", "-o", str(tmp_path / "plots"), cwd=project)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "val_loss" in html and "HEAD" in html and "lr-high" in html


def test_queued_experiments_run_in_the_background(project, queued):
    shown = show(project)
    assert {"lr-high", "q1", "q2"} <= set(shown), shown["_raw"]
    assert (shown["q1"]["lr"], shown["q2"]["lr"]) == (0.002, 0.0005)  # 5e-4 on the command line: a float
    losses = {name: shown[name]["metrics"]["loss"] for name in ["baseline", "lr-high", "q1", "q2"]}
    assert len(set(losses.values())) == 4, losses
    logs = dvc("queue", "logs", "q1", cwd=project)
    assert ran(logs) == RERUN, logs
    assert run(["git", "status", "--porcelain"], project) == "", "the queue runs outside the workspace"
    for name in ["q1", "q2", "lr-high"]:  # an experiment commits params, lock and curves; never data
        committed = run(["git", "ls-tree", "-r", "--name-only", shown[name]["rev"]], project).split()
        assert not [f for f in committed if f.startswith("data/")], committed

    # The worker exits on its own once the queue is empty: nothing is left running.
    deadline = time.monotonic() + 60
    while project_processes(project) or "0 active, 0 idle" not in queue_status(project)[1]:
        assert time.monotonic() < deadline, (queue_status(project)[1],
                                             [p.info["cmdline"] for p in project_processes(project)])
        time.sleep(1)


def test_librarian_runs_shows_test_metrics_and_the_param_that_differs(project, queued):
    shown = show(project)
    out = run([sys.executable, "-m", "librarian.cli.main", "runs"], project)
    header, *lines = out.splitlines()
    # The test metrics and where the model was trained come first, then only train.lr: the one param
    # the experiments changed.
    assert header.split() == ["run", "loss", "ppl", "top-1", "top-5", "top-10", "bits/byte", "precision",
                              "train.lr"], out
    amp = yaml.safe_load((project / "params.yaml").read_text())["train"]["amp"]
    trained_in = resolve_precision("cpu", amp).tag  # as this machine's policy resolves train.amp
    rows = {line.split()[0]: line.split()[1:] for line in lines}
    assert {"workspace", "lr-high", "q1", "q2"} <= set(rows), out
    for name in ["baseline", "lr-high", "q1", "q2"]:
        row = rows["workspace" if name == "baseline" else name]  # the workspace is the committed baseline here
        metrics = shown[name]["metrics"]
        assert row[:2] == [f"{metrics['loss']:.4f}", f"{metrics['perplexity']:.3f}"], (name, out)
        assert row[2] == f"{metrics['top1_accuracy']:.2%}" and row[-1] == str(shown[name]["lr"]), (name, out)
        assert row[6] == trained_in, (name, out)


def test_exp_apply_brings_an_experiment_into_the_workspace(project, queued):
    shown = show(project)
    out = dvc("exp", "apply", "q1", cwd=project)
    assert "q1" in out, out
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["lr"] == 0.002
    assert json.loads((project / "metrics" / "metrics.json").read_text()) == shown["q1"]["metrics"]
    status = run(["git", "status", "--porcelain"], project)
    assert " M params.yaml" in status and " M dvc.lock" in status, status
    # The outputs come from the cache: the workspace is exactly q1's run, nothing to reproduce.
    lock = yaml.safe_load(run(["git", "show", f"{shown['q1']['rev']}:dvc.lock"], project))
    assert yaml.safe_load((project / "dvc.lock").read_text()) == lock
    assert "up to date" in dvc("status", cwd=project)
    assert ran(dvc("repro", cwd=project)) == []

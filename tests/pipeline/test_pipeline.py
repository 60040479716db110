"""End to end: `dvc repro` of the whole pipeline in a temporary git+dvc copy of the project."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.dvc_project import copy_built, dvc, dvc_json, files_under, make_project, ran, run, set_params, tool_env


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory):
    return copy_built(built_project, tmp_path_factory.mktemp("e2e") / "project")


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
    assert edges == {("check_params", "download"), ("download", "subsample"), ("subsample", "clean"), ("clean", "train_tokenizer"),
                     ("clean", "tokenize"), ("train_tokenizer", "tokenize"), ("tokenize", "train"),
                     ("train", "evaluate"), ("tokenize", "evaluate"), ("train", "samples"),
                     ("train_tokenizer", "samples"),
                     # chat fine-tuning
                     ("clean", "chat_data"), ("chat_data", "finetune"), ("train", "finetune"),
                     # conversations in pretraining (train.chat_share; a manifest only at share 0)
                     ("chat_data", "chat_tokens"), ("train_tokenizer", "chat_tokens"), ("chat_tokens", "train"),
                     ("train_tokenizer", "finetune"), ("train", "evaluate_chat"), ("finetune", "evaluate_chat"),
                     ("chat_data", "evaluate_chat"), ("tokenize", "evaluate_chat"),
                     ("train_tokenizer", "evaluate_chat"), ("finetune", "chat_samples"),
                     ("train_tokenizer", "chat_samples")}


def test_metrics_json_has_every_metric(project):
    metrics = json.loads((project / "metrics" / "metrics.json").read_text())
    keys = {"loss", "perplexity", "top1_accuracy", "top5_accuracy", "top10_accuracy", "bits_per_byte"}
    assert keys <= set(metrics) and keys <= set(metrics["val"]) and keys <= set(metrics["official_validation"])
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-5)
    assert 0 <= metrics["top1_accuracy"] <= metrics["top5_accuracy"] <= metrics["top10_accuracy"] <= 1
    assert metrics["loss"] < np.log(1000)  # a dozen steps already beat a uniform guess
    summary = json.loads((project / "data" / "model" / "train.json").read_text())
    assert metrics["n_params"] == summary["n_params"] and summary["global_step"] == 12
    shown = dvc_json("metrics", "show", "--json", cwd=project)
    assert "stories_in" in json.dumps(shown) and "top5_accuracy" in json.dumps(shown)


def test_samples_are_written_for_every_prompt(project):
    samples = (project / "metrics" / "samples.md").read_text()
    for prompt in yaml.safe_load((project / "params.yaml").read_text())["samples"]["prompts"]:
        assert prompt.splitlines()[0] in samples


def test_plots_render_the_training_curves(project):
    out = dvc("plots", "show", "--json", cwd=project)
    for curve in ["train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]:
        assert f"{curve}.tsv" in out


def test_metrics_diff_shows_a_param_change(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run"], project)
    set_params(project, **{"train.lr": 1.0e-3})
    assert ran(dvc("repro", cwd=project)) == ["train", "evaluate", "samples", "finetune", "evaluate_chat",
                                              "chat_samples"]
    assert "metrics/samples.md" in json.dumps(dvc_json("diff", "--json", cwd=project)["modified"])
    diff = dvc_json("metrics", "diff", "--json", cwd=project)
    changed = diff["metrics/metrics.json"]
    assert changed["loss"]["diff"] != 0 and changed["top1_accuracy"]["old"] != changed["top1_accuracy"]["new"]
    # The chat metrics of both models, side by side in the same diff.
    chat = diff["metrics/chat.json"]
    assert chat["base.story_loss"]["diff"] != 0 and chat["finetuned.reply_loss"]["diff"] != 0
    params_diff = dvc_json("params", "diff", "--json", cwd=project)
    assert (params_diff["params.yaml"]["train.lr"]["old"], params_diff["params.yaml"]["train.lr"]["new"]) == (0.003, 0.001)
    run(["git", "checkout", "--", "."], project)
    dvc("checkout", cwd=project)


def test_a_param_change_reruns_only_what_depends_on_it(project):
    before = (project / "data" / "clean" / "train.parquet").read_bytes()
    set_params(project, **{"tokenizer.vocab_size": 900})
    chat_model = ["finetune", "evaluate_chat", "chat_samples"]  # everything downstream of the base model
    # chat_tokens reads the tokenizer, but at train.chat_share 0 writes the same manifest: train reruns for its tokens.
    assert ran(dvc("repro", cwd=project)) == ["train_tokenizer", "tokenize", "train", "evaluate", "samples",
                                              "chat_tokens", *chat_model]
    assert (project / "data" / "clean" / "train.parquet").read_bytes() == before
    assert json.loads((project / "data" / "tokens" / "train.json").read_text())["vocab_size"] == 900
    set_params(project, **{"clean.min_chars": 500})
    assert ran(dvc("repro", cwd=project)) == ["clean", "train_tokenizer", "tokenize", "train", "evaluate", "samples",
                                              "chat_data", "chat_tokens", *chat_model]
    set_params(project, **{"eval.stride": 8})
    assert ran(dvc("repro", cwd=project)) == ["evaluate", "evaluate_chat"]


REFUSED = [("train.batch_size", 0, "train.batch_size"), ("train.device", "cuda", "train.device is cuda"),
           ("model.dropout", 1.5, "model.dropout"), ("train.max_epochs", "ten", "train.max_epochs"),
           ("train.lr", -1.0e-4, "train.lr"), ("train.schedule", "cosin", "train.schedule"),
           ("model.context_length", 100000000, "model.context_length"),
           ("data.source", "no/such/folder", "data.source 'no/such/folder' does not exist")]


@pytest.mark.parametrize("key, value, named", REFUSED, ids=[case[0] for case in REFUSED])
def test_a_refused_param_leaves_the_last_outputs_in_place(project, key, value, named):
    """DVC deletes a stage's outputs before it runs it: a stage that refused its params left the user
    without data/model. check_params refuses them first, and every output stays as it was."""
    if key == "train.device":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU: train.device cuda is valid here")
    before = {path: files_under(project, path) for path in ("data/model", "data/raw", "data/chat_model")}
    original = (project / "params.yaml").read_text()
    set_params(project, **{key: value})
    try:
        failed = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=tool_env(),
                                capture_output=True, text=True, timeout=600)
    finally:
        (project / "params.yaml").write_text(original)
    assert failed.returncode != 0
    assert "Running stage 'check_params'" in failed.stdout and ran(failed.stdout) == []
    assert named in failed.stdout + failed.stderr and "Traceback" not in failed.stdout + failed.stderr
    assert {path: files_under(project, path) for path in before} == before
    # The params fixed: the check passes with the same bytes, and nothing downstream reruns.
    assert ran(dvc("repro", cwd=project)) == []


def test_rerun_from_scratch_gives_identical_artifacts(project, tmp_path):
    """Same params and data, a fresh copy: dvc.lock is the same, every hash, model weights included."""
    dvc("repro", cwd=project)
    other = make_project(tmp_path / "other")
    shutil.copy(project / "params.yaml", other / "params.yaml")
    dvc("repro", cwd=other)
    assert (other / "dvc.lock").read_text() == (project / "dvc.lock").read_text()


def model_hash(project: Path) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "data/model")


def is_train_stage(cmdline: list[str]) -> bool:
    """The stage's python process, not the shell DVC may start it from.

    Without $SHELL (as in CI), DVC runs `/bin/sh -c CMD`, and dash forks CMD instead of exec'ing it:
    killing that shell would orphan a training run that goes on and finishes by itself.
    """
    shell = bool(cmdline) and Path(cmdline[0]).name in {"sh", "dash", "bash", "zsh"}
    return not shell and "stages.train" in " ".join(cmdline)


def test_killed_training_resumes_under_dvc_repro_bit_identical(project):
    """kill -9 the train stage mid-run; the next `dvc repro` resumes and ends with the same weights."""
    import psutil

    set_params(project, **{"train.max_steps": 90, "train.checkpoint_every": 5})
    repro = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=tool_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = project / "data" / "train_state" / "state.pt"

    def cmdline(process) -> list[str]:
        # A stage that has just ended (check_params runs in 0.6 s) may be a zombie, or gone, while we look.
        try:
            return process.cmdline()
        except psutil.Error:
            return []

    stage = None
    try:
        for _ in range(6000):  # up to 60 s for the stage to write its first checkpoint
            stage = stage or next((p for p in psutil.Process(repro.pid).children(recursive=True)
                                   if is_train_stage(cmdline(p))), None)
            if stage and state.exists():
                break
            assert repro.poll() is None, "the stage finished before it could be killed"
            time.sleep(0.01)
        stage.kill()  # SIGKILL: no handler runs, nothing gets tidied up
        output, _ = repro.communicate(timeout=120)
    finally:  # a failed look must not leave `dvc repro` running, holding the project's lock for the next test
        if repro.poll() is None:
            repro.kill()
            repro.communicate()
    swapped_out = state.parent.with_name(".train_state.old") / "state.pt"  # a kill between the swap's two renames
    assert repro.returncode != 0 and (state.exists() or swapped_out.exists()), output

    resumed = dvc("repro", cwd=project)
    assert "train: resuming at epoch 1, step" in resumed
    assert not state.parent.exists() and not swapped_out.parent.exists()
    after_kill = model_hash(project)
    dvc("repro", "-f", "-s", "train", cwd=project)  # the same run, uninterrupted
    assert model_hash(project) == after_kill


def test_a_finetune_param_reruns_only_the_chat_stages(project):
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "baseline run", "--allow-empty"], project)
    set_params(project, **{"finetune.lr": 3.0e-3})
    try:
        assert ran(dvc("repro", cwd=project)) == ["finetune", "evaluate_chat", "chat_samples"]
        chat = dvc_json("metrics", "diff", "--json", cwd=project)["metrics/chat.json"]
        assert "base.reply_loss" not in chat and chat["finetuned.reply_loss"]["diff"] != 0
        # Issue 34's keys, free and guided, side by side in `dvc metrics diff` (a perplexity always moves).
        assert chat["finetuned.reply_fluency"]["diff"] != 0 and chat["finetuned.reply_fluency_guided"]["diff"] != 0
    finally:
        run(["git", "checkout", "--", "."], project)
        dvc("checkout", cwd=project)


def test_chat_data_reruns_train_only_when_train_uses_conversations(project):
    """chat_share 0: a new chat_data (more variants) reruns chat_data and chat_tokens, whose manifest
    stays the same bytes, and nothing else; with a share, the conversations are training data."""
    from tests.dvc_project import lock_outputs

    dvc("repro", cwd=project)
    before = lock_outputs(project)
    set_params(project, **{"chat_data.variants": 3})
    assert ran(dvc("repro", cwd=project)) == ["chat_data", "chat_tokens"]
    after = lock_outputs(project)
    assert {k for k in before if before[k] != after[k]} == {"data/chat", "metrics/chat_data.json"}
    set_params(project, **{"train.chat_share": 0.5})
    mixed = ran(dvc("repro", cwd=project))
    assert mixed[:1] == ["train"] and "chat_tokens" in mixed and "chat_data" not in mixed
    assert lock_outputs(project)["data/model"] != after["data/model"]
    variants = sorted(p.name for p in (project / "data" / "chat_tokens").iterdir() if p.name.startswith("variant-"))
    assert len(variants) == 3 * 4  # tokens, mask, conversation starts, reply spans of each variant
    assert ran(dvc("repro", cwd=project)) == []
    set_params(project, **{"chat_data.variants": 2})
    assert ran(dvc("repro", cwd=project))[:1] == ["train"]  # now the conversations are train's data
    set_params(project, **{"chat_data.variants": 1, "train.chat_share": 0.0})
    dvc("repro", cwd=project)
    assert lock_outputs(project)["data/model"] == before["data/model"]  # back to the plain run, byte for byte

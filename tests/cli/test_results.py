"""The published reference runs and `librarian compare`."""

import json
import subprocess
import sys

import pytest

from librarian.core.errors import LibrarianError
from librarian.cli.results import COLUMNS, compare, load_reference
from tests.helpers import ROOT


def test_the_committed_reference_file_is_complete():
    data = json.loads((ROOT / "results" / "reference.json").read_text())
    runs = data["runs"]
    assert {"card", "card-config", "best-recipe"} <= set(runs)
    for name, run in runs.items():
        assert set(COLUMNS) <= set(run["metrics"]), name
        assert run["metrics"]["perplexity"] == pytest.approx(2.718281828 ** run["metrics"]["loss"], rel=2e-3), name
        if name != "card":  # our runs: exact params, data fingerprint, what the training cost
            assert run["params"]["model"] == runs["card-config"]["params"]["model"] | {
                k: run["params"]["model"][k] for k in ("dropout", "attention")}
            assert run["data"] == data["data"]["fingerprint"] and run["n_params"] == 1_305_600
            assert run["training"]["tokens_seen"] > 0 and run["training"]["wall_time_s"] > 0
    assert runs["best-recipe"]["metrics"]["perplexity"] <= runs["card"]["metrics"]["perplexity"]
    # The data fingerprint names every shard by hash, never a path outside the project.
    assert all(len(shard["sha256"]) == 64 for shard in data["data"]["fingerprint"]["shards"])


def test_the_chat_runs_hold_their_story_and_chat_metrics_and_their_size():
    """Issue 21's chat runs: RoPE and other depths, so their size is their own, computed from their params."""
    from librarian.core.config import GPTConfig
    from librarian.model.gpt import GPT

    data = json.loads((ROOT / "results" / "reference.json").read_text())
    runs = data["chat_runs"]
    assert "chat-recipe" in runs and "chat-plain-512" in runs
    chat_keys = {"words_recall", "words_all", "character_recall", "words_recall_unseen", "character_recall_unseen",
                 "multi_turn_recall", "story_perplexity", "reply_perplexity"}
    for name, run in runs.items():
        assert set(COLUMNS) <= set(run["metrics"]), name
        assert chat_keys <= set(run["chat"]["base"]) and chat_keys <= set(run["chat"]["finetuned"]), name
        assert run["n_params"] == GPT(GPTConfig(vocab_size=8000, **run["params"]["model"])).n_params(), name
        assert run["params"]["data"]["source"] == "../shared/data/tinystories" and run["training"]["tokens_seen"] > 0
    # The recipe's story model is compared with a plain run of the same tokens and architecture.
    recipe, plain = runs["chat-recipe"], runs["chat-plain-512"]
    assert recipe["params"]["model"] == plain["params"]["model"] and plain["params"]["train"]["chat_share"] == 0


def test_compare_prints_every_reference_run_and_the_differences(tmp_path):
    reference = load_reference(ROOT / "results" / "reference.json")
    metrics = {**reference["card"], "loss": reference["card"]["loss"] + 0.5}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    table = compare(tmp_path / "metrics.json", ROOT / "results" / "reference.json")
    lines = table.splitlines()
    assert lines[0].split() == ["run", "loss", "ppl", "top-1", "top-5", "top-10", "bits/byte"]
    assert [line.split()[0] for line in lines[1:len(reference) + 1]] == list(reference)
    card_delta = next(line for line in lines if line.startswith("this run - card "))
    assert card_delta.split()[4] == "+0.5000" and card_delta.split()[6] == "+0.00pt"


def test_compare_refuses_missing_or_broken_files_in_one_line(tmp_path):
    with pytest.raises(LibrarianError, match="run the pipeline first"):
        compare(tmp_path / "none.json", ROOT / "results" / "reference.json")
    (tmp_path / "ref.json").write_text('{"runs": {"x": 3}}')
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(LibrarianError, match="has no runs with metrics"):
        compare(tmp_path / "m.json", tmp_path / "ref.json")
    result = subprocess.run([sys.executable, "-m", "librarian.cli.main", "compare", "--metrics", str(tmp_path / "x.json")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.startswith("error: metrics file") and len(result.stderr.splitlines()) == 1


def test_compare_refuses_a_metrics_file_without_test_metrics(tmp_path):
    """A JSON object, but not the evaluate stage's: one error line, not a table of dashes."""
    (tmp_path / "train.json").write_text(json.dumps({"train_loss": 2.1, "step": 120, "loss": "n/a"}))
    command = [sys.executable, "-m", "librarian.cli.main", "compare", "--metrics", str(tmp_path / "train.json")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert result.stderr.startswith(f"error: metrics file {tmp_path / 'train.json'} holds none of the test metrics")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    # One metric is enough to compare: the others show as dashes.
    (tmp_path / "some.json").write_text(json.dumps({"perplexity": 12.5}))
    assert "12.500" in compare(tmp_path / "some.json", ROOT / "results" / "reference.json")

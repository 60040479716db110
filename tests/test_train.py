import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from librarian.checkpoint import load_weights
from librarian.errors import LibrarianError
from librarian.train import Trainer, lr_at, train
from tests.conftest import TINY_MODEL, write_tokens

VOCAB = 64


def stories(n_stories: int, seed: int) -> np.ndarray:
    """Learnable token stories: counting runs from a random start, each ended by <|endoftext|> (0)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_stories):
        start, length = rng.integers(1, VOCAB - 20), rng.integers(8, 20)
        out.extend(range(start, start + length))
        out.append(0)
    return np.array(out)


@pytest.fixture
def tokens_dir(tmp_path):
    d = tmp_path / "tokens"
    write_tokens(d, "train", stories(150, seed=1), VOCAB)
    write_tokens(d, "val", stories(30, seed=2), VOCAB)
    return d


@pytest.fixture
def tiny(make_params):
    def make(**overrides):
        return make_params(**{**TINY_MODEL, **overrides})

    return make


def run(params, tokens_dir, root):
    return train(params, tokens_dir, root / "model", root / "state", root / "live", root / "speed")


def weights(path):
    return {k: v.clone() for k, v in load_weights(path).state_dict().items()}


def test_loss_falls_on_a_tiny_overfit_set(tiny, tokens_dir, tmp_path):
    progress = run(tiny(**{"train.max_epochs": 8, "model.dropout": 0.0}), tokens_dir, tmp_path)
    losses = [r["train_loss"] for r in progress.history]
    assert losses[-1] < 0.6 * losses[0]
    assert progress.history[-1]["val_loss"] < progress.history[0]["val_loss"]
    assert losses[0] < math.log(VOCAB) + 0.5  # starts near chance, not somewhere odd


def test_outputs_and_curves(tiny, tokens_dir, tmp_path):
    progress = run(tiny(**{"train.max_epochs": 2}), tokens_dir, tmp_path)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["last.safetensors", "model.safetensors", "train.json"]
    summary = json.loads((tmp_path / "model" / "train.json").read_text())
    assert summary["epoch"] == 2 and summary["stop_reason"] == "max_epochs"
    assert summary["n_params"] == load_weights(tmp_path / "model" / "model.safetensors").n_params()
    env = summary["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["device"] == "cpu" and env["deterministic"] is True
    assert env["torch_threads"] == 1  # TINY_MODEL sets train.threads: 1
    for folder, names in (("live", ["train_loss", "val_loss", "lr", "tokens_seen"]), ("speed", ["tokens_per_s", "elapsed_s"])):
        for name in names:
            lines = (tmp_path / folder / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
            assert lines[0] == f"step\t{name}" and len(lines) == 3  # header + one row per epoch
    assert not (tmp_path / "state").exists()  # the resumable state is dropped once the run is done
    assert progress.best_epoch in (1, 2)


def test_same_seed_same_weights_other_seed_differs(tiny, tokens_dir, tmp_path):
    run(tiny(**{"train.max_epochs": 1}), tokens_dir, tmp_path / "a")
    run(tiny(**{"train.max_epochs": 1}), tokens_dir, tmp_path / "b")
    run(tiny(**{"train.max_epochs": 1, "seed": 7}), tokens_dir, tmp_path / "c")
    a, b, c = (weights(tmp_path / x / "model" / "last.safetensors") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "model" / "last.safetensors").read_bytes() == (tmp_path / "b" / "model" / "last.safetensors").read_bytes()


def test_early_stopping_when_val_loss_stops_improving(tiny, tokens_dir, tmp_path):
    # A learning rate this high makes the validation loss stop improving quickly.
    progress = run(tiny(**{"train.max_epochs": 40, "train.patience": 2, "train.lr": 0.3}), tokens_dir, tmp_path)
    assert progress.stop_reason == "early_stopping"
    assert progress.epoch == progress.best_epoch + 2 < 40
    vals = [r["val_loss"] for r in progress.history]
    assert min(vals) == vals[progress.best_epoch - 1] and all(v >= min(vals) for v in vals[progress.best_epoch:])
    best = weights(tmp_path / "model" / "model.safetensors")
    last = weights(tmp_path / "model" / "last.safetensors")
    assert not all(torch.equal(best[k], last[k]) for k in best)


@pytest.mark.parametrize("interrupt_after,checkpoint_every", [(5, 0), (23, 4), (37, 0)])
def test_resume_is_bit_identical(tiny, tokens_dir, tmp_path, monkeypatch, interrupt_after, checkpoint_every):
    """Kill training after some optimizer step, rerun: the final weights equal an uninterrupted run's."""
    params = tiny(**{"train.max_epochs": 3, "train.checkpoint_every": checkpoint_every})
    run(params, tokens_dir, tmp_path / "straight")

    real_step, calls = Trainer.train_step, {"n": 0}

    def dying_step(self, order):
        calls["n"] += 1
        if calls["n"] > interrupt_after:
            raise KeyboardInterrupt  # what Ctrl-C raises; kill -9 is tested through the stage below
        return real_step(self, order)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(params, tokens_dir, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "state" / "state.pt").exists() or interrupt_after < 15
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = run(params, tokens_dir, tmp_path / "resumed")
    for name in ["last.safetensors", "model.safetensors"]:
        assert (tmp_path / "straight" / "model" / name).read_bytes() == (tmp_path / "resumed" / "model" / name).read_bytes()
    straight_curve = (tmp_path / "straight" / "live" / "plots" / "metrics" / "val_loss.tsv").read_text()
    assert (tmp_path / "resumed" / "live" / "plots" / "metrics" / "val_loss.tsv").read_text() == straight_curve
    assert resumed.global_step == 3 * resumed.history[0]["step"]


def test_kill_between_the_two_renames_of_a_checkpoint_loses_nothing(tiny, tokens_dir, tmp_path, monkeypatch, capsys):
    """Replacing the state folder takes two renames; a kill between them must not lose the state."""
    import librarian.io

    params = tiny(**{"train.max_epochs": 2, "train.checkpoint_every": 4})
    run(params, tokens_dir, tmp_path / "straight")
    real_replace, swaps = os.replace, {"n": 0}

    def dying_replace(src, dst):
        if Path(dst).name == "state" and Path(src).name.endswith(".tmp"):
            swaps["n"] += 1
            if swaps["n"] == 3:  # the old state is already renamed away, the new one not yet in
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(librarian.io.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run(params, tokens_dir, tmp_path / "resumed")
    monkeypatch.setattr(librarian.io.os, "replace", real_replace)
    assert not (tmp_path / "resumed" / "state").exists() and (tmp_path / "resumed" / ".state.old" / "state.pt").exists()
    capsys.readouterr()
    run(params, tokens_dir, tmp_path / "resumed")
    assert "train: resuming at epoch 1, step 8/" in capsys.readouterr().out  # the second checkpoint's state
    for name in ["last.safetensors", "model.safetensors"]:
        assert (tmp_path / "straight" / "model" / name).read_bytes() == (tmp_path / "resumed" / "model" / name).read_bytes()
    assert not (tmp_path / "resumed" / "state").exists() and not (tmp_path / "resumed" / ".state.old").exists()


def test_state_from_other_params_is_not_resumed(tiny, tokens_dir, tmp_path, monkeypatch):
    params = tiny(**{"train.max_epochs": 2})
    real_step, calls = Trainer.train_step, {"n": 0}

    def dying_step(self, order):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real_step(self, order)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(params, tokens_dir, tmp_path)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    other = run(tiny(**{"train.max_epochs": 2, "train.lr": 1e-3}), tokens_dir, tmp_path)
    assert other.history[0]["epoch"] == 1 and len(other.history) == 2


def test_caps_on_steps_and_tokens(tiny, tokens_dir, tmp_path):
    by_steps = run(tiny(**{"train.max_steps": 7}), tokens_dir, tmp_path / "s")
    assert by_steps.global_step == 7 and by_steps.stop_reason == "max_steps"
    by_tokens = run(tiny(**{"train.max_tokens": 8 * 16 * 5}), tokens_dir, tmp_path / "t")
    assert by_tokens.tokens_seen == 8 * 16 * 5 and by_tokens.stop_reason == "max_tokens"


def test_grad_accum_and_options_run(tiny, tokens_dir, tmp_path):
    options = {"train.grad_accum": 2, "train.batch_size": 4, "train.schedule": "cosine", "train.warmup_steps": 3,
               "train.min_lr": 1e-4, "train.grad_clip": 1.0, "train.decay_matrices_only": True, "train.amp": True,
               "model.attention": "sdpa", "model.position": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu",
               "train.max_epochs": 1, "train.fused_loss": True}
    progress = run(tiny(**options), tokens_dir, tmp_path)
    assert math.isfinite(progress.best_val_loss)


def test_schedule_shapes(tiny):
    cosine = tiny(**{"train.schedule": "cosine", "train.warmup_steps": 10, "train.min_lr": 1e-4}).train
    assert lr_at(0, cosine, 100) == pytest.approx(cosine.lr / 10)
    assert lr_at(9, cosine, 100) == pytest.approx(cosine.lr)
    assert lr_at(55, cosine, 100) == pytest.approx((cosine.lr + 1e-4) / 2)
    assert lr_at(100, cosine, 100) == pytest.approx(1e-4)
    constant = tiny().train
    assert {lr_at(s, constant, 100) for s in (0, 50, 99)} == {constant.lr}


def test_too_little_data_is_a_clear_error(tiny, tmp_path):
    d = tmp_path / "tokens"
    write_tokens(d, "train", stories(2, seed=1), VOCAB)
    write_tokens(d, "val", stories(2, seed=2), VOCAB)
    with pytest.raises(LibrarianError, match="fewer than one optimizer step"):
        run(tiny(), d, tmp_path)


def test_fused_loss_trains_like_the_plain_loss(tiny, tokens_dir, tmp_path):
    """Same maths: in fp32 the two paths follow the same curve to float rounding."""
    plain = run(tiny(**{"train.max_epochs": 2}), tokens_dir, tmp_path / "plain")
    fused = run(tiny(**{"train.max_epochs": 2, "train.fused_loss": True}), tokens_dir, tmp_path / "fused")
    for a, b in zip(plain.history, fused.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)


def test_compiled_training_runs(tiny, tokens_dir, tmp_path):
    progress = run(tiny(**{"train.max_steps": 3, "train.compile": True, "train.fused_loss": True}), tokens_dir, tmp_path)
    assert progress.global_step == 3 and math.isfinite(progress.best_val_loss)

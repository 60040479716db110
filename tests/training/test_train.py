import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from librarian.model.checkpoint import load_weights
from librarian.core.errors import LibrarianError
from librarian.core.precision import CPU_BF16_ENV
from librarian.training.optimizer import lr_at
from librarian.core.process import Terminated
from librarian.training.train import TrainPaths, Trainer, train
from tests.helpers import TINY_MODEL, VOCAB, stories, write_tokens
from tests.dvc_project import files_under, make_project

def run(params, tokens_dir, root):
    return train(params, tokens_dir, TrainPaths(model=root / "model", curves=root / "live", speed=root / "speed",
                                                state=root / "state"))


def weights(path):
    return {k: v.clone() for k, v in load_weights(path).state_dict().items()}


def test_loss_falls_on_a_tiny_overfit_set(tiny_params, tokens_dir, tmp_path):
    progress = run(tiny_params(**{"train.max_epochs": 8, "model.dropout": 0.0}), tokens_dir, tmp_path)
    losses = [r["train_loss"] for r in progress.history]
    assert losses[-1] < 0.6 * losses[0]
    assert progress.history[-1]["val_loss"] < progress.history[0]["val_loss"]
    assert losses[0] < math.log(VOCAB) + 0.5  # starts near chance, not somewhere odd


def curve(folder: Path, name: str) -> dict[int, float]:
    """A curve file as {step: value}."""
    lines = (folder / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0] == f"step\t{name}"
    return {int(step): float(value) for step, value in (line.split("\t") for line in lines[1:])}


def test_outputs_and_curves(tiny_params, tokens_dir, tmp_path):
    params = tiny_params(**{"train.max_epochs": 2, "train.log_every": 5, "train.schedule": "cosine", "train.warmup_steps": 4})
    progress = run(params, tokens_dir, tmp_path)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["last.safetensors", "model.safetensors", "train.json"]
    summary = json.loads((tmp_path / "model" / "train.json").read_text())
    assert summary["epoch"] == 2 and summary["stop_reason"] == "max_epochs"
    assert summary["n_params"] == load_weights(tmp_path / "model" / "model.safetensors").n_params()
    assert "points" not in summary and "point_loss_sum" not in summary  # curves are in metrics/train, not here
    env = summary["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["device"] == "cpu" and env["deterministic"] is True
    assert env["torch_threads"] == 1  # TINY_MODEL sets train.threads: 1
    assert not (tmp_path / "state").exists()  # the resumable state is dropped once the run is done
    assert progress.best_epoch in (1, 2)

    # Train loss, lr and tokens seen every log_every steps and at the last step; x = optimizer step.
    live, last = tmp_path / "live", progress.global_step
    epoch_ends = [r["step"] for r in progress.history]
    assert last % 5 and epoch_ends == [last // 2, last]  # an epoch is not a multiple of log_every here
    every = [*range(5, last + 1, 5), last]
    for name in ["train_loss", "lr", "tokens_seen"]:
        assert list(curve(live, name)) == every, name
    assert curve(live, "tokens_seen") == {s: s * 8 * 16 for s in every}
    assert curve(live, "lr") == pytest.approx({s: lr_at(s - 1, params.train, last) for s in every})
    assert curve(live, "lr")[5] != curve(live, "lr")[last]  # the warmup and cosine are visible
    # Each point is the mean loss of the steps since the previous one: weighted, they add up to the epochs' means.
    losses = curve(live, "train_loss")
    windows = [b - a for a, b in zip([0, *every], every)]
    assert sum(losses[s] * n for s, n in zip(every, windows)) == pytest.approx(
        sum(r["train_loss"] * (last // 2) for r in progress.history), rel=1e-9)
    # Validation loss at the last step of each epoch, on the same step axis; speed curves likewise.
    assert curve(live, "val_loss") == {r["step"]: pytest.approx(r["val_loss"]) for r in progress.history}
    for name in ["tokens_per_s", "elapsed_s"]:
        assert list(curve(tmp_path / "speed", name)) == epoch_ends
    assert json.loads((live / "metrics.json").read_text()) == {
        "train_loss": pytest.approx(losses[last]), "lr": pytest.approx(curve(live, "lr")[last]),
        "tokens_seen": last * 8 * 16, "val_loss": pytest.approx(progress.history[-1]["val_loss"]), "step": last,
        "device": "cpu", "precision": "fp32"}  # tiny_params: train.amp false


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "step/s" in line]  # tqdm's rate: every redraw has it


@pytest.mark.parametrize("cap", [{"train.max_steps": 7}, {"train.max_tokens": 8 * 16 * 5}, {"train.max_epochs": 2}])
def test_progress_bar_runs_to_the_planned_steps(tiny_params, tokens_dir, tmp_path, capfd, cap):
    progress = run(tiny_params(**cap), tokens_dir, tmp_path)
    planned = progress.global_step
    expected = {"train.max_steps": 7, "train.max_tokens": 5}.get(next(iter(cap)), 2 * progress.history[0]["step"])
    assert planned == expected
    last = progress_lines(capfd.readouterr().err)[-1]
    assert "100%" in last and f"| {planned}/{planned} [" in last, last
    assert last.startswith(f"epoch {progress.epoch}/{progress.epoch}:"), last


def test_progress_in_a_log_is_a_line_every_few_seconds(tiny_params, tokens_dir, tmp_path, capfd):
    """stderr is not a terminal here (as under DVC or CI): plain lines, at most one per LOG_INTERVAL_S."""
    from librarian.core.progress import LOG_INTERVAL_S

    started = time.monotonic()
    progress = run(tiny_params(**{"train.max_epochs": 6}), tokens_dir, tmp_path)
    elapsed = time.monotonic() - started
    err = capfd.readouterr().err
    assert progress.global_step > 150 and "\r" not in err, err[-2000:]
    lines = progress_lines(err)
    assert 2 <= len(lines) <= 2 + elapsed / LOG_INTERVAL_S, lines  # the start, the end, one per interval between
    assert f"{progress.global_step}/{progress.global_step}" in lines[-1]


def test_same_seed_same_weights_other_seed_differs(tiny_params, tokens_dir, tmp_path):
    run(tiny_params(**{"train.max_epochs": 1}), tokens_dir, tmp_path / "a")
    run(tiny_params(**{"train.max_epochs": 1}), tokens_dir, tmp_path / "b")
    run(tiny_params(**{"train.max_epochs": 1, "seed": 7}), tokens_dir, tmp_path / "c")
    a, b, c = (weights(tmp_path / x / "model" / "last.safetensors") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "model" / "last.safetensors").read_bytes() == (tmp_path / "b" / "model" / "last.safetensors").read_bytes()


def test_early_stopping_when_val_loss_stops_improving(tiny_params, tokens_dir, tmp_path):
    # A learning rate this high makes the validation loss stop improving quickly.
    progress = run(tiny_params(**{"train.max_epochs": 40, "train.patience": 2, "train.lr": 0.3}), tokens_dir, tmp_path)
    assert progress.stop_reason == "early_stopping"
    assert progress.epoch == progress.best_epoch + 2 < 40
    vals = [r["val_loss"] for r in progress.history]
    assert min(vals) == vals[progress.best_epoch - 1] and all(v >= min(vals) for v in vals[progress.best_epoch:])
    best = weights(tmp_path / "model" / "model.safetensors")
    last = weights(tmp_path / "model" / "last.safetensors")
    assert not all(torch.equal(best[k], last[k]) for k in best)


MUON_WSD = {"train.optimizer": "muon", "train.schedule": "wsd", "train.decay_fraction": 0.5, "train.init": "zero_proj"}
# The tiny data's epoch is ~1,900 tokens: the batch grows 2, 4, 6, 8 over most of the first one.
BATCH_WARMUP = {"train.batch_start": 2, "train.batch_warmup_tokens": 1500}


@pytest.mark.parametrize("interrupt_after,checkpoint_every,options",
                         [(5, 0, {}), (23, 4, {}), (37, 0, {}), (23, 4, MUON_WSD), (13, 5, BATCH_WARMUP),
                          (60, 0, BATCH_WARMUP)])
def test_resume_is_bit_identical(tiny_params, tokens_dir, tmp_path, monkeypatch, interrupt_after, checkpoint_every, options):
    """Kill training after some optimizer step, rerun: the final weights equal an uninterrupted run's."""
    # log_every 3 with checkpoints every 4 steps: states saved mid-way between two curve points.
    params = tiny_params(**{"train.max_epochs": 3, "train.checkpoint_every": checkpoint_every, "train.log_every": 3,
                     **options})
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
    # The curves, per-step points included, are replayed from the saved state: the same files.
    straight, again = (files_under(tmp_path / x, "live") for x in ("straight", "resumed"))
    assert straight == again and len(straight) == 5  # four curves and metrics.json
    assert len(resumed.history) == 3 and resumed.global_step == resumed.history[-1]["step"]
    if not options:  # three epochs of the same steps (a batch warmup makes the first one longer)
        assert resumed.global_step == 3 * resumed.history[0]["step"]
    last = [resumed.global_step] if resumed.global_step % 3 else []  # a point at the last step too
    assert list(curve(tmp_path / "resumed" / "live", "train_loss")) == [*range(3, resumed.global_step + 1, 3), *last]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_state_at_that_step_and_the_rerun_resumes_bit_identical(
        tiny_params, tokens_dir, tmp_path, monkeypatch, capsys, signum):
    """Ctrl-C or SIGTERM mid-epoch (no step checkpoints): the state of that very step is saved."""
    params = tiny_params(**{"train.max_epochs": 2, "train.log_every": 3})
    run(params, tokens_dir, tmp_path / "straight")
    real_step, calls = Trainer.train_step, {"n": 0}

    def signalled_step(self, order):
        calls["n"] += 1
        if calls["n"] == 7:  # the signal arrives during the 7th step: it finishes, then training stops
            os.kill(os.getpid(), signum)
        return real_step(self, order)

    monkeypatch.setattr(Trainer, "train_step", signalled_step)
    stopped = KeyboardInterrupt if signum == signal.SIGINT else Terminated
    with pytest.raises(stopped):
        run(params, tokens_dir, tmp_path / "resumed")
    assert calls["n"] == 7 and "stopped at step 7; the training state is saved" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is not None  # the deferring handlers are gone again
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = run(params, tokens_dir, tmp_path / "resumed")
    assert "resuming at epoch 1, step 7/" in capsys.readouterr().out
    for name in ["last.safetensors", "model.safetensors"]:
        assert (tmp_path / "straight" / "model" / name).read_bytes() == (tmp_path / "resumed" / "model" / name).read_bytes()
    assert files_under(tmp_path / "straight", "live") == files_under(tmp_path / "resumed", "live")
    assert resumed.global_step == 2 * resumed.history[0]["step"]


def test_kill_between_the_two_renames_of_a_checkpoint_loses_nothing(tiny_params, tokens_dir, tmp_path, monkeypatch, capsys):
    """Replacing the state folder takes two renames; a kill between them must not lose the state."""
    import librarian.core.io

    params = tiny_params(**{"train.max_epochs": 2, "train.checkpoint_every": 4})
    run(params, tokens_dir, tmp_path / "straight")
    real_replace, swaps = os.replace, {"n": 0}

    def dying_replace(src, dst):
        if Path(dst).name == "state" and Path(src).name.endswith(".tmp"):
            swaps["n"] += 1
            if swaps["n"] == 3:  # the old state is already renamed away, the new one not yet in
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(librarian.core.io.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run(params, tokens_dir, tmp_path / "resumed")
    monkeypatch.setattr(librarian.core.io.os, "replace", real_replace)
    assert not (tmp_path / "resumed" / "state").exists() and (tmp_path / "resumed" / ".state.old" / "state.pt").exists()
    capsys.readouterr()
    run(params, tokens_dir, tmp_path / "resumed")
    assert "train: resuming at epoch 1, step 8/" in capsys.readouterr().out  # the second checkpoint's state
    for name in ["last.safetensors", "model.safetensors"]:
        assert (tmp_path / "straight" / "model" / name).read_bytes() == (tmp_path / "resumed" / "model" / name).read_bytes()
    assert not (tmp_path / "resumed" / "state").exists() and not (tmp_path / "resumed" / ".state.old").exists()


def test_state_from_other_params_is_not_resumed(tiny_params, tokens_dir, tmp_path, monkeypatch):
    params = tiny_params(**{"train.max_epochs": 2})
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
    other = run(tiny_params(**{"train.max_epochs": 2, "train.lr": 1e-3}), tokens_dir, tmp_path)
    assert other.history[0]["epoch"] == 1 and len(other.history) == 2


def test_caps_on_steps_and_tokens(tiny_params, tokens_dir, tmp_path):
    by_steps = run(tiny_params(**{"train.max_steps": 7}), tokens_dir, tmp_path / "s")
    assert by_steps.global_step == 7 and by_steps.stop_reason == "max_steps"
    by_tokens = run(tiny_params(**{"train.max_tokens": 8 * 16 * 5}), tokens_dir, tmp_path / "t")
    assert by_tokens.tokens_seen == 8 * 16 * 5 and by_tokens.stop_reason == "max_tokens"


def test_grad_accum_and_options_run(tiny_params, tokens_dir, tmp_path):
    options = {"train.grad_accum": 2, "train.batch_size": 4, "train.schedule": "cosine", "train.warmup_steps": 3,
               "train.min_lr": 1e-4, "train.grad_clip": 1.0, "train.decay_matrices_only": True, "train.amp": True,
               "model.attention": "sdpa", "model.position": "rope", "model.norm": "rmsnorm", "model.mlp": "swiglu",
               "train.max_epochs": 1, "train.fused_loss": True}
    progress = run(tiny_params(**options), tokens_dir, tmp_path)
    assert math.isfinite(progress.best_val_loss)


def test_batch_warmup_grows_the_batch_in_multiples_of_batch_start(tiny_params):
    from librarian.training.batches import batch_at

    tp = tiny_params(**{"train.batch_size": 32, "train.batch_start": 8, "train.batch_warmup_tokens": 3000}).train
    sizes = {tokens: batch_at(tokens, tp) for tokens in (0, 999, 1000, 1999, 2000, 2999, 3000, 10**9)}
    assert sizes == {0: 8, 999: 8, 1000: 16, 1999: 16, 2000: 24, 2999: 24, 3000: 32, 10**9: 32}
    off = tiny_params(**{"train.batch_size": 32}).train
    assert off.batch_warmup_tokens == 0 and {batch_at(t, off) for t in (0, 5, 10**9)} == {32}
    with pytest.raises(LibrarianError, match=r"batch_start \(12\) must divide batch_size \(32\)"):
        tiny_params(**{"train.batch_size": 32, "train.batch_start": 12, "train.batch_warmup_tokens": 3000})


@pytest.mark.parametrize("caps", [{}, {"train.max_steps": 7}, {"train.max_steps": 1000},
                                  {"train.max_tokens": 3333}, {"train.max_tokens": 10**6}, {"train.max_epochs": 1}])
@pytest.mark.parametrize("options", [{}, BATCH_WARMUP, {**BATCH_WARMUP, "train.batch_warmup_tokens": 5000},
                                     {"train.grad_accum": 2, "train.batch_size": 4}])
def test_the_planned_steps_and_tokens_are_the_ones_the_loop_takes(tiny_params, tokens_dir, tmp_path, caps, options):
    """plan_run (the lr schedule's and the progress bar's total) against a real run's steps, tokens
    and epochs, per step: the batch warmup's growing batches, epoch ends and caps included."""
    from librarian.training.batches import batch_at
    from librarian.training.train import build_trainer

    taken = []

    def hook(trainer):
        taken.append(trainer.progress.tokens_seen)

    params = tiny_params(**{"train.max_epochs": 3, "train.patience": 10, "model.dropout": 0.0, **options, **caps})
    paths = TrainPaths(model=tmp_path / "model", curves=tmp_path / "live", speed=tmp_path / "speed",
                       state=tmp_path / "state")
    trainer = build_trainer(params, tokens_dir, paths, after_step=hook)
    plan = trainer.plan
    progress = trainer.run()
    assert (progress.global_step, progress.tokens_seen, progress.epoch) == (plan.steps, plan.tokens, plan.epochs)
    ctx, accum = params.model.context_length, params.train.grad_accum
    batches = [(b - a) // (ctx * accum) for a, b in zip([0, *taken], taken)]
    assert batches == [batch_at(tokens, params.train) for tokens in [0, *taken[:-1]]]
    if params.train.batch_warmup_tokens and not caps:
        assert sorted(set(batches)) == [2, 4, 6, 8] and batches == sorted(batches)


def test_schedule_shapes(tiny_params):
    cosine = tiny_params(**{"train.schedule": "cosine", "train.warmup_steps": 10, "train.min_lr": 1e-4}).train
    assert lr_at(0, cosine, 100) == pytest.approx(cosine.lr / 10)
    assert lr_at(9, cosine, 100) == pytest.approx(cosine.lr)
    assert lr_at(55, cosine, 100) == pytest.approx((cosine.lr + 1e-4) / 2)
    assert lr_at(100, cosine, 100) == pytest.approx(1e-4)
    constant = tiny_params().train
    assert {lr_at(s, constant, 100) for s in (0, 50, 99)} == {constant.lr}
    wsd = tiny_params(**{"train.schedule": "wsd", "train.warmup_steps": 10, "train.min_lr": 1e-4,
                  "train.decay_fraction": 0.2}).train
    assert lr_at(0, wsd, 100) == pytest.approx(wsd.lr / 10)
    assert {lr_at(s, wsd, 100) for s in (9, 50, 79)} == {wsd.lr}  # stable until the last 20 steps
    assert lr_at(89, wsd, 100) == pytest.approx(wsd.lr + (1e-4 - wsd.lr) * 10 / 20)  # linear decay
    assert lr_at(99, wsd, 100) == pytest.approx(1e-4)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_params):
    """Muon updates exactly the blocks' 2-D weights, at muon_lr under the same schedule; AdamW the rest."""
    from librarian.model.gpt import GPT, GPTConfig
    from librarian.training.optimizer import build_optimizer, set_lr

    params = tiny_params(**{"train.optimizer": "muon", "train.muon_lr": 0.05, "train.decay_matrices_only": True})
    model = GPT(GPTConfig.from_params(params.model, vocab_size=VOCAB))
    optimizer = build_optimizer(model, params.train)
    adamw, muon = optimizer.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert in_muon | in_adamw == set(names.values()) and not in_muon & in_adamw
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "blocks.0.attn.qkv.bias"} <= in_adamw
    set_lr(optimizer, params.train.lr / 2)
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(0.025)]
    assert {g["lr"] for g in adamw.param_groups} == {params.train.lr / 2}


def test_zero_proj_init_starts_the_residual_projections_at_zero(tiny_params, tokens_dir, tmp_path):
    """init zero_proj: the projections into the residual stream are zero, every other weight as gpt2's."""
    def weights(**options):
        paths = TrainPaths(model=tmp_path / "m", curves=tmp_path / "c", speed=tmp_path / "s", state=tmp_path / "t")
        from librarian.training.train import build_trainer
        return dict(build_trainer(tiny_params(**options), tokens_dir, paths).model.named_parameters())

    gpt2, zero = weights(), weights(**{"train.init": "zero_proj"})
    projections = [n for n in gpt2 if n.endswith("proj.weight")]
    assert len(projections) == 2 * TINY_MODEL["model.n_layer"]
    for name in gpt2:
        if name in projections:
            assert not zero[name].any() and gpt2[name].any()
        else:
            assert torch.equal(zero[name], gpt2[name])


def test_an_after_step_hook_sees_every_step_and_can_end_the_run(tiny_params, tokens_dir, tmp_path):
    """benchmarks/speedrun.py stops at a target through this hook: it is called once per optimizer
    step, with the step counted, and a stop_reason it sets ends the run there (outputs published)."""
    from librarian.training.train import build_trainer

    seen = []

    def hook(trainer):
        seen.append((trainer.progress.global_step, trainer.step_seconds))
        if trainer.progress.global_step == 7:
            trainer.progress.stop_reason = "target"

    paths = TrainPaths(model=tmp_path / "model", curves=tmp_path / "live", speed=tmp_path / "speed",
                       state=tmp_path / "state")
    progress = build_trainer(tiny_params(**{"train.max_epochs": 5}), tokens_dir, paths, after_step=hook).run()
    assert [step for step, _ in seen] == list(range(1, 8))
    assert progress.stop_reason == "target" and progress.global_step == 7
    seconds = [s for _, s in seen]
    assert seconds[0] > 0 and all(b > a for a, b in zip(seconds, seconds[1:]))  # train_step time, accumulated
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_speedrun_options_train_and_keep_the_parameter_count(tiny_params, tokens_dir, tmp_path):
    """Muon, WSD, zero_proj and the ReLU-squared MLP: training runs, learns, and n_params stays the card's formula's."""
    options = {**MUON_WSD, "model.mlp": "relu2", "train.max_epochs": 2}
    progress = run(tiny_params(**options), tokens_dir, tmp_path / "new")
    run(tiny_params(**{"train.max_epochs": 2}), tokens_dir, tmp_path / "card")
    assert progress.best_val_loss < math.log(VOCAB) - 0.5  # well below a uniform guess: it learns
    summary = [json.loads((tmp_path / x / "model" / "train.json").read_text()) for x in ("new", "card")]
    assert summary[0]["n_params"] == summary[1]["n_params"]


def test_too_little_data_is_a_clear_error(tiny_params, tmp_path):
    d = tmp_path / "tokens"
    write_tokens(d, "train", stories(2, seed=1), VOCAB)
    write_tokens(d, "val", stories(2, seed=2), VOCAB)
    with pytest.raises(LibrarianError, match="fewer than one optimizer step"):
        run(tiny_params(), d, tmp_path)


def test_fused_loss_trains_like_the_plain_loss(tiny_params, tokens_dir, tmp_path):
    """Same maths: in fp32 the two paths follow the same curve to float rounding."""
    plain = run(tiny_params(**{"train.max_epochs": 2}), tokens_dir, tmp_path / "plain")
    fused = run(tiny_params(**{"train.max_epochs": 2, "train.fused_loss": True}), tokens_dir, tmp_path / "fused")
    for a, b in zip(plain.history, fused.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)


def test_compiled_training_runs(tiny_params, tokens_dir, tmp_path):
    progress = run(tiny_params(**{"train.max_steps": 3, "train.compile": True, "train.fused_loss": True}), tokens_dir, tmp_path)
    assert progress.global_step == 3 and math.isfinite(progress.best_val_loss)


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_training_inside_a_dvc_project_leaves_no_file_open(tiny_params, tokens_dir, tmp_path, monkeypatch):
    """dvclive opens the DVC repository around the working folder (git packs, DVC's SQLite state)
    and never closes it: a process that trained many times ran out of file descriptors."""
    monkeypatch.chdir(make_project(tmp_path / "project"))
    params = tiny_params(**{"train.max_steps": 2})
    run(params, tokens_dir, tmp_path / "warm")  # imports and thread pools open what they keep for good
    before = open_files()
    for i in range(3):
        run(params, tokens_dir, tmp_path / f"run{i}")
    assert open_files() == before


def test_train_state_round_trips_through_one_state_dict(make_params, tmp_path):
    """TrainState saves what resume needs (weights, optimizer, scaler, RNG, progress) and loads it back."""
    from librarian.model.checkpoint import TrainState
    from librarian.model.gpt import GPT, GPTConfig
    from librarian.training.optimizer import build_optimizer
    from librarian.training.train import Progress

    params = make_params(**TINY_MODEL)

    def fresh(seed):
        torch.manual_seed(seed)
        model = GPT(GPTConfig.from_params(params.model, vocab_size=64))
        return model, build_optimizer(model, params.train), torch.amp.GradScaler("cuda", enabled=False)

    model, optimizer, scaler = fresh(0)
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    optimizer.step()
    progress = Progress(epoch=1, global_step=7, tokens_seen=896, history=[{"epoch": 1, "val_loss": 3.5}])
    saved = TrainState(model, optimizer, scaler, progress, "run-a", torch.device("cpu"), "cpu/fp32")
    saved.save(tmp_path / "state", tokenizer_sha256=None)
    rng_then = torch.get_rng_state()
    torch.rand(5)  # moves the RNG on: loading must put it back

    other = TrainState(*fresh(1), Progress(), "run-b", torch.device("cpu"), "cpu/fp32")
    assert other.load(tmp_path / "state") == "other run" and other.progress == Progress()
    loaded = TrainState(*fresh(1), Progress(), "run-a", torch.device("cpu"), "cpu/fp32")
    assert loaded.load(tmp_path / "state") == ""
    assert loaded.progress == progress and torch.equal(torch.get_rng_state(), rng_then)
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    assert str(loaded.optimizer.state_dict()) == str(optimizer.state_dict())
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["last.safetensors", "state.pt"]
    assert TrainState(*fresh(2), Progress(), "run-a", torch.device("cpu"), "cpu/fp32").load(tmp_path / "nothing") == "none"
    # Saved on another device or in another precision: named, so the run can say why it starts afresh.
    bf16 = TrainState(*fresh(3), Progress(), "run-c", torch.device("cpu"), "cpu/bf16")
    assert bf16.load(tmp_path / "state") == "other precision: cpu/fp32" and bf16.progress == Progress()


def test_progress_counts_steps_and_caps():
    from librarian.training.train import Progress

    p = Progress()
    for _ in range(2):
        p.count_step(tokens=100, windows=4)
    p.add_losses([4.0, 3.0])
    assert (p.global_step, p.step_in_epoch, p.windows_in_epoch, p.tokens_seen, p.epoch_loss_sum,
            p.point_loss_count) == (2, 2, 8, 200, 7.0, 2)
    assert p.cap_reached(max_steps=0, max_tokens=0) == ""
    assert p.cap_reached(max_steps=2, max_tokens=0) == "max_steps"
    assert p.cap_reached(max_steps=3, max_tokens=150) == "max_tokens"


def test_early_stopping_after_patience_epochs_without_a_better_val_loss():
    from librarian.training.train import Progress

    p = Progress()
    improved = [p.end_epoch(val, patience=2) for val in (3.0, 2.5, 2.6, 2.5)]
    assert improved == [True, True, False, False] and p.stop_reason == "early_stopping"
    assert (p.epoch, p.best_epoch, p.best_val_loss, p.bad_epochs, p.step_in_epoch) == (4, 2, 2.5, 2, 0)
    capped = Progress(stop_reason="max_steps")
    capped.end_epoch(3.0, patience=1)
    capped.end_epoch(3.1, patience=1)
    assert capped.stop_reason == "max_steps"  # a cap that ended the run stays its reason


def test_a_trainer_starts_from_given_weights_and_resumes_only_its_own_state(tiny_params, tokens_dir, tmp_path):
    """Fine-tuning's entry: the same Trainer, built from objects, with initial weights."""
    from librarian.data.windows import load_train_val
    from librarian.training.runtime import setup_runtime
    from librarian.training.train import fingerprint

    params = tiny_params(**{"train.max_steps": 1})
    run(params, tokens_dir, tmp_path / "first")
    trained = load_weights(tmp_path / "first" / "model" / "last.safetensors")
    train_split, val_split = load_train_val(tokens_dir)
    paths = TrainPaths(model=tmp_path / "m", curves=tmp_path / "c", speed=tmp_path / "s", state=tmp_path / "st")
    trainer = Trainer(params, setup_runtime(params.train), train_split, val_split, paths, init=trained)
    for ours, given in zip(trainer.model.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(ours, given)
    scratch = Trainer(params, setup_runtime(params.train), train_split, val_split, paths)
    assert not torch.equal(scratch.model.tok_emb.weight, trained.tok_emb.weight)
    metas = [train_split.meta, val_split.meta]
    tag = trainer.runtime.precision.tag
    assert trainer.fingerprint == fingerprint(params, metas, tag, trained) != fingerprint(params, metas, tag)


# --- training follows the precision policy (librarian/core/precision.py) and records it --------------------------------------------------


@pytest.mark.parametrize(("forced", "expected"), [("0", "fp32"), ("1", "bf16")])
def test_training_records_its_device_and_precision(tiny_params, tokens_dir, tmp_path, monkeypatch, capfd,
                                                   forced, expected):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    run(tiny_params(**{"train.amp": True, "train.max_steps": 3}), tokens_dir, tmp_path)
    summary = json.loads((tmp_path / "model" / "train.json").read_text())
    assert summary["precision"] == expected and summary["environment"]["device"] == "cpu"
    curves = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert (curves["device"], curves["precision"]) == ("cpu", expected)
    err = capfd.readouterr().err
    fallback = "has no native bf16; training in float32, since bf16 would be many times slower here"
    assert (fallback in err) == (expected == "fp32")


def test_a_state_saved_in_another_precision_starts_afresh_with_one_line(tiny_params, tokens_dir, tmp_path,
                                                                        monkeypatch, capsys):
    params = tiny_params(**{"train.amp": True, "train.max_epochs": 2, "train.checkpoint_every": 5})
    real_step, calls = Trainer.train_step, {"n": 0}

    def dying_step(self, order):
        calls["n"] += 1
        if calls["n"] > 12:  # past the checkpoint of step 10
            raise KeyboardInterrupt
        return real_step(self, order)

    monkeypatch.setenv(CPU_BF16_ENV, "1")
    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(params, tokens_dir, tmp_path)
    assert (tmp_path / "state" / "state.pt").exists()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()

    monkeypatch.setenv(CPU_BF16_ENV, "0")
    progress = run(params, tokens_dir, tmp_path)
    out = capsys.readouterr().out
    assert out.count("saved training state ran on cpu/bf16, this run computes on cpu/fp32: another run, not "
                     "resumed; starting afresh") == 1
    assert [r["epoch"] for r in progress.history] == [1, 2]  # from the start, not resumed at epoch 2
    assert json.loads((tmp_path / "model" / "train.json").read_text())["precision"] == "fp32"

"""Details of the Trainer: where its time is banked, the paths it is given, the files it publishes."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from librarian.model.checkpoint import TrainState
from librarian.training import train as train_module
from librarian.training.train import Progress, TrainPaths, _Clock, build_trainer, train

ROOT = Path(__file__).resolve().parents[2]


def paths(root) -> TrainPaths:
    return TrainPaths(model=root / "model", curves=root / "curves", speed=root / "speed", state=root / "state")


def test_train_paths_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        TrainPaths(tmp_path / "model", tmp_path / "curves", tmp_path / "speed", tmp_path / "state")
    assert [f.name for f in dataclasses.fields(TrainPaths)] == ["model", "curves", "speed", "state"]


def test_the_trainer_names_the_curves_folder_curves(tiny_params, tokens_dir, tmp_path):
    trainer = build_trainer(tiny_params(), tokens_dir, paths(tmp_path))
    assert trainer.curves_dir == tmp_path / "curves"
    assert not hasattr(trainer, "live_dir")


@pytest.mark.parametrize("stage", ["train", "finetune"])
def test_the_stages_call_the_curves_argument_curves_dir(stage):
    run = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    usage = run.stdout
    assert "curves_dir" in usage and "live_dir" not in usage
    # The positional order is dvc.yaml's: the model's folder, the curves, the speed, the state.
    assert usage.index("out_dir") < usage.index("curves_dir") < usage.index("speed_dir") < usage.index("state_dir")


class FakeTime:
    """time.perf_counter that only moves when told to."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


def test_the_clock_banks_time_since_its_mark_and_marks_again(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(train_module, "time", clock_time)
    progress = Progress(tokens_seen=1000, elapsed_s=5.0)
    clock = _Clock(progress)
    clock_time.now += 2.0
    progress.tokens_seen += 300
    assert clock.tokens_per_s() == 150.0
    assert clock.bank() == 150.0
    assert progress.elapsed_s == 7.0
    clock_time.now += 4.0
    progress.tokens_seen += 100
    assert clock.tokens_per_s() == 25.0  # since the new mark, not since the clock started
    assert clock.bank() == 25.0
    assert progress.elapsed_s == 11.0


def test_elapsed_time_covers_the_training_steps_with_checkpoints_between(tiny_params, tokens_dir, tmp_path,
                                                                        monkeypatch):
    """With a checkpoint every step, each step's time is still banked once: elapsed_s at the end of
    an epoch is the time of its steps (and checkpoints), no more."""
    clock_time = FakeTime()
    monkeypatch.setattr(train_module, "time", clock_time)
    real_train_step = train_module.Trainer.train_step

    def one_second_step(trainer, order):
        clock_time.now += 1.0
        return real_train_step(trainer, order)

    monkeypatch.setattr(train_module.Trainer, "train_step", one_second_step)
    progress = train(tiny_params(**{"train.max_epochs": 2, "train.checkpoint_every": 1}), tokens_dir, paths(tmp_path))
    first, second = progress.history
    assert first["elapsed_s"] == first["step"]  # one second a step, banked once each
    assert second["elapsed_s"] == second["step"]


def test_the_best_weights_are_published_under_train_states_name(tiny_params, tokens_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(TrainState, "BEST", "best-renamed.safetensors")
    train(tiny_params(**{"train.max_epochs": 1}), tokens_dir, paths(tmp_path))
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_the_loop_reads_the_losses_every_log_every_steps_not_every_step(tiny_params, tokens_dir, tmp_path,
                                                                     monkeypatch):
    """On a GPU each read of a loss makes the host wait for that step: the loop reads them in groups
    of train.log_every (and before it saves or reports), and the curves get the same points."""
    reads = []
    real_settle = train_module.Trainer.settle_losses

    def settle(trainer):
        if trainer._unsettled:
            reads.append(len(trainer._unsettled))
        real_settle(trainer)

    monkeypatch.setattr(train_module.Trainer, "settle_losses", settle)
    params = tiny_params(**{"train.max_epochs": 1, "train.max_steps": 12, "train.log_every": 4})
    progress = train(params, tokens_dir, paths(tmp_path))
    assert progress.global_step == 12 and reads == [4, 4, 4]
    assert [point["step"] for point in progress.points] == [4, 8, 12]
    assert progress.history[0]["train_loss"] == pytest.approx(sum(point["train_loss"] for point in progress.points) / 3)

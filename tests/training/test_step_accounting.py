"""One step accounting for the training loop and the benchmarks: Trainer.step.

benchmarks/train_throughput.py once repeated the loop's bookkeeping without Progress.count_step:
tokens_seen never advanced, so under a batch warmup every timed step took train.batch_start
windows while tokens/s was credited at the full batch.
"""

import importlib
from pathlib import Path

import pytest

from librarian.training.batches import batch_at
from librarian.training.train import Trainer, TrainPaths, build_trainer, train

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
CONTEXT = 16  # TINY_MODEL's model.context_length
# batch 8 from batch_start 2 over the first 400 tokens: 2, 2, ... then 4, 6, 8 windows a step.
WARMUP = {"train.batch_size": 8, "train.batch_start": 2, "train.batch_warmup_tokens": 400}


@pytest.fixture
def benchmark(monkeypatch):
    """benchmarks/train_throughput.py as a module (it imports its sibling benchmarks/common.py)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("train_throughput")


def paths(root: Path) -> TrainPaths:
    return TrainPaths(model=root / "model", curves=root / "curves", speed=root / "speed", state=root / "state")


def batches_taken(tp, steps: int) -> list[int]:
    """The windows of each of the first `steps` steps of a run, as the batch warmup grows them."""
    taken, tokens = [], 0
    for _ in range(steps):
        taken.append(batch_at(tokens, tp) * tp.grad_accum)
        tokens += taken[-1] * CONTEXT
    return taken


def test_the_benchmark_step_advances_tokens_seen_by_the_batch_it_took(benchmark, tiny_params, tokens_dir, tmp_path):
    params = tiny_params(**WARMUP)
    run = benchmark.Run(benchmark.Setup("warmup"), params, tokens_dir, tmp_path, default_threads=1)
    progress = run.trainer.progress
    expected = batches_taken(params.train, 6)
    assert expected[0] == 2 and expected[-1] > expected[0]  # the warmup grows the batch within these steps

    loss, tokens = run.step()
    assert loss > 0
    assert tokens == expected[0] * CONTEXT  # batch_start's windows, not the full batch's
    assert tokens < run.tokens_per_step
    assert (progress.global_step, progress.tokens_seen) == (1, tokens)

    seconds, timed_tokens = run.time_steps(4)  # one untimed step first, then 4 timed ones
    assert seconds > 0
    assert timed_tokens == sum(expected[2:6]) * CONTEXT
    assert progress.tokens_seen == sum(expected) * CONTEXT
    assert progress.global_step == 6


def test_the_benchmark_and_the_loop_step_through_trainer_step(benchmark, tiny_params, tokens_dir, tmp_path,
                                                              monkeypatch):
    calls = []
    real_step = Trainer.step

    def spy(trainer, order):
        calls.append(trainer.progress.global_step)
        return real_step(trainer, order)

    monkeypatch.setattr(Trainer, "step", spy)
    params = tiny_params(**WARMUP, **{"train.max_steps": 5})
    run = benchmark.Run(benchmark.Setup("spy"), params, tokens_dir, tmp_path / "bench", default_threads=1)
    run.step()
    assert calls == [0]

    calls.clear()
    progress = train(params, tokens_dir, paths(tmp_path / "loop"))
    assert calls == list(range(progress.global_step)) and progress.global_step == 5


def test_the_loop_counts_the_tokens_of_the_batches_it_took(tiny_params, tokens_dir, tmp_path):
    params = tiny_params(**WARMUP, **{"train.max_steps": 6})
    progress = train(params, tokens_dir, paths(tmp_path))
    assert progress.tokens_seen == sum(batches_taken(params.train, 6)) * CONTEXT


def test_trainer_step_counts_one_step_of_its_batch(tiny_params, tokens_dir, tmp_path):
    trainer = build_trainer(tiny_params(**WARMUP), tokens_dir, paths(tmp_path))
    order = trainer.train_windows.order(0, 0)
    before = trainer.step_seconds
    loss = trainer.step(order)
    p = trainer.progress
    assert (p.global_step, p.step_in_epoch, p.windows_in_epoch, p.tokens_seen) == (1, 1, 2, 2 * CONTEXT)
    # The loss reaches the progress when the loop reads it (every train.log_every steps, or to save):
    # on a GPU, reading it each step would make the host wait for each step.
    assert (p.epoch_loss_count, p.point_loss_count) == (0, 0)
    trainer.settle_losses()
    assert (p.epoch_loss_sum, p.point_loss_sum, p.epoch_loss_count) == (loss.item(), loss.item(), 1)
    assert trainer.step_seconds > before


def test_the_evaluate_benchmark_credits_the_batch_taken(monkeypatch, tiny_params, tokens_dir, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    common = importlib.import_module("common")
    trainer = build_trainer(tiny_params(**WARMUP), tokens_dir, paths(tmp_path))
    order = trainer.train_windows.order(0, 0)
    taken = [common.cycled_step(trainer, order)[1] for _ in range(3)]
    assert taken == [n * CONTEXT for n in batches_taken(trainer.tp, 3)]

"""The train stage: AdamW over sliding windows, validation every epoch, early stopping, resume.

The defaults are the card's: AdamW at lr 1e-4, batch 32, no accumulation, mixed precision where
the hardware has it (librarian/core/precision.py: bf16 autocast on a CPU with native bf16, float32 on
one without; bf16 or fp16 with a GradScaler on CUDA), early stopping after 5 epochs without a better validation loss,
the last and the best checkpoint kept.

With train.chat_share, a share of every epoch's windows are the train split's conversations
(librarian/training/mixture.py, from the chat_tokens stage): the same loop, checkpoints and resume.

Resume: the training state (weights, optimizer, GradScaler, RNG, data position, history) is saved
atomically to a state folder that is *not* a DVC output, so DVC's clean-up before a rerun does not
delete it. A rerun with the same params and data continues from it; on CPU it ends with weights
bit-identical to an uninterrupted run. The state is deleted once the run has finished.

Scale out: under `torchrun`, each rank takes its share of every global batch (gloo on CPU, nccl
on CUDA), DDP averages the gradients, and only rank 0 writes anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from librarian.core.config import Params
from librarian.core.environment import describe
from librarian.core.errors import LibrarianError
from librarian.core.io import atomic_dir, remove_dir, write_json
from librarian.core.precision import Precision
from librarian.core.process import deferred_stops, lock_folder
from librarian.core.progress import progress_bar
from librarian.data.chat_tokens import ChatTokens, load_chat_tokens, sha256_of
from librarian.data.windows import IGNORE, TokenFile, Windows, load_train_val, to_device, window_nats
from librarian.model.checkpoint import TrainState, rng_state, save_weights
from librarian.model.fused_loss import linear_cross_entropy
from librarian.model.gpt import GPT, GPTConfig
from librarian.training import distributed
from librarian.training.batches import batch_at, cap_reason, plan_run
from librarian.training.mixture import Mixture, chat_windows
from librarian.training.optimizer import build_optimizer, lr_at, set_lr
from librarian.training.runtime import Runtime, setup_runtime

# Keys that change how a run is carried out but not its result: a state saved under other values
# of these is still resumable.
_RESUME_NEUTRAL = ("checkpoint_every",)
_ACTIVITY = {"train": "training", "finetune": "fine-tuning"}  # a stage's name -> what its precision line says it does


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    windows_in_epoch: int = 0  # training windows those steps took (the next batch starts there)
    global_step: int = 0
    tokens_seen: int = 0
    epoch_loss_sum: float = 0.0  # running train loss of the current epoch
    epoch_loss_count: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    elapsed_s: float = 0.0
    stop_reason: str = ""
    history: list = field(default_factory=list)  # one record per finished epoch
    # The curves' points every train.log_every steps, and the running train loss since the last
    # one: saved with the rest, so that a resumed run replays (and goes on with) the same curves.
    points: list = field(default_factory=list)
    point_loss_sum: float = 0.0
    point_loss_count: int = 0

    def count_step(self, tokens: int, windows: int) -> None:
        """One optimizer step done, on `windows` windows of `tokens` tokens (its loss comes in add_losses)."""
        self.step_in_epoch += 1
        self.windows_in_epoch += windows
        self.global_step += 1
        self.tokens_seen += tokens

    def add_losses(self, losses: list[float]) -> None:
        """The train losses of the steps counted since the last call, in step order."""
        for loss in losses:
            self.epoch_loss_sum += loss
            self.point_loss_sum += loss
        self.epoch_loss_count += len(losses)
        self.point_loss_count += len(losses)

    def cap_reached(self, max_steps: int, max_tokens: int) -> str:
        """Why training must stop now ("max_steps", "max_tokens"), or "" (0 = no cap)."""
        return cap_reason(self.global_step, self.tokens_seen, max_steps, max_tokens)

    def end_epoch(self, val_loss: float, patience: int) -> bool:
        """Close the epoch with its validation loss; True when it is the best so far.

        Early stopping: after `patience` epochs in a row without a better validation loss, the
        stop reason becomes "early_stopping" (unless a cap already ended the run).
        """
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch + 1, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= patience and not self.stop_reason:
                self.stop_reason = "early_stopping"
        self.epoch += 1
        self.step_in_epoch, self.windows_in_epoch, self.epoch_loss_sum, self.epoch_loss_count = 0, 0, 0.0, 0
        return improved


# --- setup -------------------------------------------------------------------------------------


def fingerprint(params: Params, metas: list[dict], precision: str, init: GPT | None = None) -> str:
    """What a resumable state must match: every param that shapes the result, the data, the device
    and precision it computes in ("cpu/bf16": train.amp alone does not say which), and the starting
    weights when training does not start from scratch."""
    train = {k: v for k, v in params.train.model_dump().items() if k not in _RESUME_NEUTRAL}
    blob = json.dumps([params.seed, params.model.model_dump(), train, metas, precision], sort_keys=True)
    digest = hashlib.sha256(blob.encode())
    if init is not None:
        for name, tensor in sorted(init.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TrainingLoss(torch.nn.Module):
    """What a training step differentiates: the model's mean cross-entropy on a batch.

    A module of its own so that DDP and torch.compile wrap exactly this. With `fused`, the output
    head and the loss are computed chunk by chunk (librarian/model/fused_loss.py): same maths, faster.
    """

    def __init__(self, model: GPT, fused: bool, compile: bool):
        super().__init__()
        self.model, self.fused, self.compiled = model, fused, compile
        body = model.hidden if fused else model
        self.body = _compiled(body) if compile else body

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return linear_cross_entropy(self.body(x), self.model.lm_head.weight, y, compiled=self.compiled)
        return self.body(x, y)[1]


def _compiled(fn):
    # Dropout masks from ATen's bernoulli_: on the CPU, Inductor's own random kernel is slower.
    return torch.compile(fn, options={"fallback_random": True})


# --- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TrainPaths:
    """Where a run writes. Keyword-only, so that no two callers can pass them in different orders."""

    model: Path  # data/model: model.safetensors (best), last.safetensors, train.json
    curves: Path  # metrics/train: loss and learning-rate curves (a DVC output)
    speed: Path  # metrics/train_speed: tokens/s and elapsed time (not in dvc.lock)
    state: Path  # data/train_state: the resumable state; not a DVC output


class Trainer:
    """One training run: the loop, validation, checkpoints and resume, over data it is given.

    Everything is built before: the runtime (process, device, precision), the token files, and
    optionally the starting weights (fine-tuning); the Trainer builds only what it owns, the
    model's copy, the optimizer and the loss, from params.
    """

    def __init__(self, params: Params, runtime: Runtime, train: TokenFile, val: TokenFile, paths: TrainPaths,
                 init: GPT | None = None, name: str = "train", after_step: Callable[[Trainer], None] | None = None,
                 chats: list[ChatTokens] = ()):
        self.params, self.tp, self.runtime, self.paths = params, params.train, runtime, paths
        self.name = name  # the stage, as its log lines say
        # Called after every optimizer step; it may end the run by setting progress.stop_reason
        # (benchmarks/speedrun.py stops at a target perplexity so).
        self.after_step = after_step
        self._unsettled: list[torch.Tensor] = []  # the losses of steps whose loss the host has not read yet
        self.step_seconds = 0.0  # wall time inside train_step in this process: training alone
        self.rank, self.world, self.device = runtime.rank, runtime.world, runtime.device
        self.out_dir, self.state_dir, self.curves_dir, self.speed_dir = (
            Path(paths.model), Path(paths.state), Path(paths.curves), Path(paths.speed))
        self.tokenizer_sha256 = train.meta.get("tokenizer_sha256")
        self.fingerprint = fingerprint(params, [train.meta, val.meta] + [sha256_of(c.tokens, c.loss_mask) for c in chats],
                                       runtime.precision.tag, init)
        ctx = params.model.context_length
        self.train_windows = self._train_windows(train, chats)
        self.val_windows = Windows(val.tokens, ctx, ctx, val.loss_mask, val.plan)
        if self.tp.batch_size % self.world or (self.tp.batch_warmup_tokens and self.tp.batch_start % self.world):
            raise LibrarianError(f"train.batch_size ({self.tp.batch_size}) and, with a batch warmup, train.batch_start "
                                 f"({self.tp.batch_start}) must be divisible by the {self.world} processes")
        self.steps_per_epoch = len(self.train_windows) // (self.tp.batch_size * self.tp.grad_accum)
        if self.steps_per_epoch == 0:
            raise LibrarianError(
                f"the train split has {len(self.train_windows)} windows, fewer than one optimizer step "
                f"(train.batch_size x train.grad_accum = {self.tp.batch_size * self.tp.grad_accum}); use more data or a smaller batch"
            )
        self.tokens_per_step = self.tp.batch_size * self.tp.grad_accum * ctx  # after any batch warmup
        torch.manual_seed(params.seed)
        self.model = GPT(GPTConfig.from_params(params.model, vocab_size=train.vocab_size)).to(self.device)
        if init is not None:
            self.model.load_state_dict(init.state_dict())
        elif self.tp.init == "zero_proj":
            self.model.zero_projections()
        if self.rank:
            # Each process its own dropout masks: rank r > 0 draws from seed + r. Rank 0 goes on
            # with the stream the initialisation started, a single process's, whose bytes stay as they were.
            torch.manual_seed(params.seed + self.rank)
        self.optimizer = build_optimizer(self.model, self.tp)
        self.scaler = runtime.grad_scaler()
        net = TrainingLoss(self.model, fused=self.tp.fused_loss, compile=self.tp.compile)
        self.net = distributed.wrap(net, self.device, self.world)
        self.progress = Progress()
        self.plan = plan_run(len(self.train_windows), self.tp, ctx)
        self.total_steps = self.plan.steps

    def _train_windows(self, train: TokenFile, chats: list[ChatTokens]) -> Windows | Mixture:
        """The story windows, or with train.chat_share a mixture of them and the conversations'."""
        ctx, tp = self.params.model.context_length, self.tp
        stories = Windows(train.tokens, ctx, tp.stride, train.loss_mask, train.plan)
        if tp.chat_share == 0:
            return stories
        if not chats:
            raise LibrarianError(f"train.chat_share is {tp.chat_share:g} but no conversations were given; run "
                                 "`dvc repro chat_tokens` (or set train.chat_share to 0)")
        eot = int(train.meta.get("eot_id", train.tokens[-1]))  # every token file ends with <|endoftext|>
        return Mixture(stories, [chat_windows(c, ctx, tp, eot) for c in chats], tp.chat_share)

    # --- checkpoints ---

    def _state(self, rngs: list[dict] | None = None) -> TrainState:
        return TrainState(self.model, self.optimizer, self.scaler, self.progress, self.fingerprint, self.device,
                          self.runtime.precision.tag, self.rank, rngs)

    def resume(self) -> bool:
        state = self._state()
        why_not = state.load(self.state_dir)
        if why_not == "other run":
            self._log("saved training state is for other params or data; starting afresh")
        elif why_not.startswith("other precision"):
            saved = why_not.split(": ", 1)[1]
            self._log(f"saved training state ran on {saved}, this run computes on {state.precision}: "
                      "another run, not resumed; starting afresh")
        if why_not:
            return False
        self.progress = p = state.progress
        self._log(f"resuming at epoch {p.epoch + 1}, step {p.step_in_epoch}/{self.steps_per_epoch} ({p.global_step} steps done)")
        return True

    def checkpoint(self) -> None:
        """Save the whole training state atomically: rank 0 writes it, every rank's RNG state included."""
        self.settle_losses()
        rngs = distributed.gather(rng_state(self.device), self.world)
        if self.rank == 0:
            state = self._state(rngs)
            state.save(self.state_dir, self.tokenizer_sha256)
        self._barrier()

    # --- steps ---

    def step_windows(self) -> int:
        """The windows the next optimizer step takes: its batch (train.batch_size, or the batch
        warmup's at the tokens seen so far) times grad_accum."""
        return batch_at(self.progress.tokens_seen, self.tp) * self.tp.grad_accum

    def epoch_has_room(self) -> bool:
        """Whether the next step's batch fits in what is left of this epoch's windows."""
        return self.progress.windows_in_epoch + self.step_windows() <= len(self.train_windows)

    def step(self, order: np.ndarray) -> float:
        """One optimizer step (train_step) and its accounting: the windows and tokens of the batch it
        actually took, the time it took, its loss. The loop steps through here, and so does
        benchmarks/train_throughput.py: counting on its own, it once credited every step with the full
        batch during a batch warmup and never advanced tokens_seen."""
        windows = self.step_windows()  # before the step: the batch depends on the tokens seen so far
        started = time.perf_counter()
        loss = self.train_step(order)
        self.step_seconds += time.perf_counter() - started
        self.progress.count_step(windows * self.params.model.context_length, windows)
        self._unsettled.append(loss)
        return loss

    def settle_losses(self) -> None:
        """Bring the losses of the steps since the last call to the host, into the progress. On a GPU
        reading a loss waits for its step to finish; the loop calls this every train.log_every steps
        (and before it saves or reports), so the host queues steps ahead instead of waiting each one.
        The floats, and their order of summing, are those of reading each step at once."""
        if self._unsettled:
            self.progress.add_losses(torch.stack(self._unsettled).tolist())
            self._unsettled.clear()

    def train_step(self, order: np.ndarray) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns the mean micro-batch loss, a 0-d
        float32 tensor on the device (read it and the host waits for the step)."""
        p, tp = self.progress, self.tp
        set_lr(self.optimizer, lr_at(p.global_step, tp, self.total_steps))
        batch = batch_at(p.tokens_seen, tp)
        share = batch // self.world
        micro_batches = [self.train_windows.batch(order[start : start + share])
                         for start in (p.windows_in_epoch + micro * batch + self.rank * share
                                       for micro in range(tp.grad_accum))]
        weights = self._micro_weights([y for _, y in micro_batches])
        losses = []
        for micro, (x, y) in enumerate(micro_batches):
            x, y = to_device(x, self.device), to_device(y, self.device)
            sync = micro == tp.grad_accum - 1 or self.world == 1
            with self._no_sync(not sync), self.runtime.autocast():
                loss = self.net(x, y)
            self.scaler.scale(loss / tp.grad_accum if weights is None else loss * weights[micro]).backward()
            losses.append(loss.detach())
        if tp.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tp.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # The step's loss as its gradient weighs it: the mean over its scored targets.
        mean = torch.stack(losses).mean() if weights is None else sum(part * w for part, w in zip(losses, weights))
        return distributed.mean(mean, self.world).detach()

    def _micro_weights(self, targets: list[torch.Tensor]) -> list[float] | None:
        """What each micro-batch's mean loss is scaled by, so that the step's gradient is the mean
        over all its scored targets, across micro-batches and processes (DDP averages the processes').

        With a loss mask (fine-tuning, conversations with train.chat_mask: replies) micro-batches
        score different numbers of targets, and a plain mean of their means would weigh a target of
        a sparse batch more. Unmasked batches all score the same number, so dividing by grad_accum
        (None) is exact; it is kept there, and for a single batch, so those runs keep their bits.
        """
        if not self.train_windows.masked or len(targets) * self.world == 1:
            return None
        counts = torch.tensor([float((y != IGNORE).sum()) for y in targets], dtype=torch.float64)
        total = distributed.sum_(counts.sum().to(self.device), self.world).item()
        return [float(n) * self.world / max(total, 1.0) for n in counts]

    @torch.no_grad()
    def val_loss(self) -> float:
        """Mean cross-entropy over the validation windows' scored targets, in float32."""
        self.model.eval()
        total = window_nats(self.model, self.val_windows, self.params.eval.batch_size, self.rank, self.world,
                            self.device)
        distributed.sum_(total, self.world)
        self.model.train()
        return (total[0] / total[1]).item()

    def run(self) -> Progress:
        if self.rank == 0:
            self.runtime.precision.announce(self.name, _ACTIVITY.get(self.name, "training"))
        self.resume()
        curves = _Curves(self.curves_dir, self.speed_dir, self.progress) if self.rank == 0 else None
        try:
            self._fit(curves)
        finally:  # on an interrupt too
            if curves:
                curves.close()
        return self.progress

    def _fit(self, curves) -> None:
        p = self.progress
        planned_epochs = self.plan.epochs
        # One bar for the whole run, to the planned steps (max_steps, max_tokens); early stopping ends it sooner.
        bar = progress_bar(self.total_steps, p.global_step, f"epoch {p.epoch + 1}/{planned_epochs}",
                           disable=self.rank != 0)
        self.model.train()
        # Ctrl-C and SIGTERM wait for the end of the step: the state is saved there, and the rerun
        # resumes from that very step. (Under torchrun every rank would have to agree: not deferred.)
        with deferred_stops(enabled=self.world == 1) as stop:
            self._epochs(curves, bar, planned_epochs, stop)
        bar.close()
        if not p.stop_reason:
            p.stop_reason = "max_epochs"
        self.settle_losses()
        if p.point_loss_count:  # the steps since the last point: the curve runs to the last step
            self._add_point(curves)
        self._finish()
        if curves:
            curves.end(p.global_step, self.runtime.precision)

    def _epochs(self, curves, bar, planned_epochs: int, stop) -> None:
        """The training loop proper: epochs of optimizer steps until a cap, early stopping or a stop request."""
        p, tp = self.progress, self.tp
        while p.epoch < tp.max_epochs and not p.stop_reason:
            order = self.train_windows.order(self.params.seed, p.epoch)
            clock = _Clock(p)
            bar.set_description(f"epoch {p.epoch + 1}/{planned_epochs}", refresh=False)
            while self.epoch_has_room() and not p.stop_reason:
                loss = self.step(order)
                p.stop_reason = p.cap_reached(tp.max_steps, tp.max_tokens)
                if self.after_step:
                    self.settle_losses()
                    self.after_step(self)
                if p.global_step % tp.log_every == 0:
                    self._add_point(curves)
                    # refresh=False: the bar redraws at its own pace (tqdm's mininterval), not every step.
                    bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{clock.tokens_per_s():,.0f}", refresh=False)
                bar.update(1)
                if stop and not p.stop_reason:
                    clock.bank()
                    self.checkpoint()
                    self._log(f"stopped at step {p.global_step}; the training state is saved: rerun to "
                              "resume from this step")
                    stop.raise_now()
                if tp.checkpoint_every and p.global_step % tp.checkpoint_every == 0 and not p.stop_reason:
                    clock.bank()
                    self.checkpoint()
            self._end_epoch(clock.bank(), curves)
            stop.raise_now()  # a stop during validation: _end_epoch has just saved the state

    def _add_point(self, curves) -> None:
        """A point of the step curves: the mean train loss since the last point, the learning rate of this step."""
        self.settle_losses()
        p = self.progress
        point = {"step": p.global_step, "train_loss": p.point_loss_sum / p.point_loss_count,
                 "lr": lr_at(p.global_step - 1, self.tp, self.total_steps), "tokens_seen": p.tokens_seen}
        p.points.append(point)
        p.point_loss_sum, p.point_loss_count = 0.0, 0
        if curves:
            curves.log_point(point)

    def _end_epoch(self, tokens_per_s: float, curves) -> None:
        self.settle_losses()
        p = self.progress
        val = self.val_loss()
        if not math.isfinite(val):
            raise LibrarianError(f"training diverged at epoch {p.epoch + 1} (val loss {val}); lower train.lr or set train.grad_clip")
        record = {
            "epoch": p.epoch + 1, "step": p.global_step, "tokens_seen": p.tokens_seen,
            "train_loss": p.epoch_loss_sum / max(1, p.epoch_loss_count), "val_loss": val,
            "lr": lr_at(max(0, p.global_step - 1), self.tp, self.total_steps),
            "tokens_per_s": tokens_per_s, "elapsed_s": p.elapsed_s,
        }
        p.history.append(record)
        if p.end_epoch(val, self.tp.patience) and self.rank == 0:
            save_weights(self.model, self.state_dir / TrainState.BEST, self.tokenizer_sha256)
        if curves:
            curves.log_epoch(record)
        self._log(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, val loss {val:.4f}"
                  f"{' (best)' if p.best_epoch == record['epoch'] else ''}, {tokens_per_s:,.0f} tokens/s")
        self.checkpoint()

    def _finish(self) -> None:
        """Publish the best and last weights and a summary as the stage's outputs; drop the state."""
        if self.rank == 0:
            p = self.progress
            running = ("history", "points", "elapsed_s", "step_in_epoch", "windows_in_epoch", "epoch_loss_sum",
                       "epoch_loss_count",
                       "point_loss_sum", "point_loss_count")
            summary = {k: v for k, v in asdict(p).items() if k not in running}
            summary.update(n_params=self.model.n_params(), steps_per_epoch=self.steps_per_epoch,
                           precision=self.runtime.precision.name,
                           config=self.model.config.to_dict(), environment=describe(self.device))
            with atomic_dir(self.out_dir) as tmp:
                shutil.copyfile(self.state_dir / TrainState.BEST, tmp / "model.safetensors")
                save_weights(self.model, tmp / "last.safetensors", self.tokenizer_sha256)
                write_json(tmp / "train.json", summary)
            remove_dir(self.state_dir)
        self._barrier()

    def _no_sync(self, skip_sync: bool):
        return self.net.no_sync() if skip_sync and hasattr(self.net, "no_sync") else contextlib.nullcontext()

    def _barrier(self) -> None:
        distributed.barrier(self.world)

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"{self.name}: {message}", flush=True)


class _Clock:
    """The wall time and tokens of the loop since its last mark: the epoch's start or the last
    checkpoint. Banking is the one place where training time goes into progress.elapsed_s (which
    leaves out validation, and the checkpoint a stop request saves)."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self._mark()

    def _mark(self) -> None:
        self.started, self.tokens_before = time.perf_counter(), self.progress.tokens_seen

    def tokens_per_s(self) -> float:
        """Training tokens a second since the mark."""
        return (self.progress.tokens_seen - self.tokens_before) / max(time.perf_counter() - self.started, 1e-9)

    def bank(self) -> float:
        """Add the time since the mark to progress.elapsed_s and mark again; returns the tokens/s since the old mark."""
        seconds = time.perf_counter() - self.started
        tokens_per_s = (self.progress.tokens_seen - self.tokens_before) / max(seconds, 1e-9)
        self.progress.elapsed_s += seconds
        self._mark()
        return tokens_per_s


class _Curves:
    """The training curves through dvclive, on one x axis: the optimizer step.

    Two folders: the result curves are a DVC output and identical for identical runs: train loss,
    learning rate and tokens seen every train.log_every steps (and at the last step), the validation
    loss at the last step of every epoch. The speed curves (tokens/s, elapsed time, per epoch) differ
    from run to run, so they are kept out of dvc.lock, or no two runs could have the same lock file.
    DVC deletes its outputs before a rerun, so a resumed run writes the curves again from the saved
    progress: the files come out as if the run had never stopped.
    """

    POINT = ("train_loss", "lr", "tokens_seen")
    EPOCH = ("val_loss",)
    SPEED = ("tokens_per_s", "elapsed_s")

    def __init__(self, curves_dir: Path, speed_dir: Path, progress: Progress):
        from dvclive import Live

        self.results, self.speed = (Live(str(d), dvcyaml=None, save_dvc_exp=False, report=None)
                                    for d in (curves_dir, speed_dir))
        for point in progress.points:
            self.log_point(point)
        for record in progress.history:
            self.log_epoch(record)

    def log_point(self, point: dict) -> None:
        self._log(self.results, point, self.POINT)

    def log_epoch(self, record: dict) -> None:
        self._log(self.results, record, self.EPOCH)
        self._log(self.speed, record, self.SPEED)

    @staticmethod
    def _log(live, record: dict, names: tuple) -> None:
        live.step = record["step"]
        for name in names:
            # No timestamps: they would make identical runs produce different files.
            live.log_metric(name, record[name], timestamp=False)

    def end(self, step: int, precision: Precision) -> None:
        """Write each folder's metrics.json (the last value of every curve, and where the results
        were computed: `dvc metrics diff` and `dvc exp show` show it beside the loss) and close."""
        computed = {"device": precision.device_type, "precision": precision.name}
        for live, names, extra in ((self.results, self.POINT + self.EPOCH, computed), (self.speed, self.SPEED, {})):
            # A fixed key order: a replayed run logs in another order than an uninterrupted one.
            live.summary = {name: live.summary[name] for name in names if name in live.summary} | {"step": step} | extra
            live.step = step
            live.end()

    def close(self) -> None:
        """Release the DVC repository each Live opened (git pack files, DVC's SQLite state). dvclive
        never closes it, so a process that trains again and again (a notebook, the tests, a
        benchmark) would otherwise gain some 70 open files a run, until it can open no more."""
        for live in (self.results, self.speed):
            repo, live._dvc_repo = live._dvc_repo, None
            if repo is not None:
                repo.close()


def train(params: Params, tokens_dir: str | Path, paths: TrainPaths, chat_tokens_dir: str | Path | None = None) -> Progress:
    """Train on tokens_dir's train and val splits (and, with train.chat_share, chat_tokens_dir's conversations)."""
    return run_locked(paths, lambda: build_trainer(params, tokens_dir, paths, chat_tokens_dir=chat_tokens_dir))


def run_locked(paths: TrainPaths, build: Callable[[], Trainer]) -> Progress:
    """Build a Trainer and run it, holding the state folder for this run alone: two trainers on
    one state would overwrite each other's checkpoints. The train and finetune stages both run so.

    Under torchrun only rank 0 writes the state, so only it takes the lock.
    """
    held = lock_folder(paths.state, "training run") if distributed.is_main_process() else contextlib.nullcontext()
    with held:
        return build().run()


def build_trainer(params: Params, tokens_dir: str | Path, paths: TrainPaths,
                  after_step: Callable[[Trainer], None] | None = None,
                  chat_tokens_dir: str | Path | None = None) -> Trainer:
    """setup, then data, then the Trainer: what the train stage runs (the benchmarks time the same)."""
    runtime = setup_runtime(params.train)
    train_split, val_split = load_train_val(tokens_dir)
    chats = []
    if params.train.chat_share > 0:
        if chat_tokens_dir is None:
            raise LibrarianError(f"train.chat_share is {params.train.chat_share:g} but no chat tokens folder was "
                                 "given (data/chat_tokens); set train.chat_share to 0 or pass it")
        chats = load_chat_tokens(chat_tokens_dir, train_split.meta.get("tokenizer_sha256"), train_split.vocab_size)
    return Trainer(params, runtime, train_split, val_split, paths, after_step=after_step, chats=chats)

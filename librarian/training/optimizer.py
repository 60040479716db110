"""What a training step updates the weights with: the optimizer and the learning-rate schedule.

- `adamw` (the card): torch's AdamW on every parameter; with train.decay_matrices_only, biases and
  norm gains are not decayed.
- `muon`: torch.optim.Muon (momentum, then Newton-Schulz orthogonalisation of the update) on the
  transformer blocks' 2-D weight matrices, and AdamW on the rest (the tied embedding/head, the
  positions, norms and biases), as modded-nanogpt splits them: Muon is only defined for matrices,
  and the embedding's rows are looked up, not multiplied, so orthogonalising their update is wrong.

Every parameter group carries `lr_ratio`, its peak learning rate over train.lr: the schedule sets
each group's lr to lr_at(step) x lr_ratio, so Muon's groups follow the same warmup and decay. An
AdamW group's ratio is exactly 1.0, so its lr is bit for bit the schedule's.
"""

from __future__ import annotations

import math

import torch

from librarian.core.config import LearningRateSchedule, TrainParams
from librarian.model.gpt import GPT


class Optimizers:
    """Several torch optimizers stepped as one: what the Trainer, the GradScaler and the training
    state need of an optimizer (param_groups, step, zero_grad, state_dict, load_state_dict)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self, closure=None) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


def muon_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The parameters Muon updates: the blocks' 2-D weights (attention and MLP projections)."""
    return [p for p in model.blocks.parameters() if p.dim() == 2]


def build_optimizer(model: GPT, tp: TrainParams) -> torch.optim.Optimizer | Optimizers:
    """The optimizer train.optimizer names, its groups tagged with their lr_ratio."""
    matrices = {id(p) for p in muon_matrices(model)} if tp.optimizer == "muon" else set()
    rest = [p for p in model.parameters() if id(p) not in matrices]
    if tp.decay_matrices_only:
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": tp.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": rest, "weight_decay": tp.weight_decay}]
    # foreach: one multi-tensor kernel per step of the update instead of a loop over the parameters;
    # the same arithmetic in the same order, so the same weights bit for bit as foreach=False.
    adamw = torch.optim.AdamW([group | {"lr_ratio": 1.0} for group in groups], lr=tp.lr,
                              betas=(tp.beta1, tp.beta2), foreach=True)
    if not matrices:
        return adamw
    muon = torch.optim.Muon([{"params": muon_matrices(model), "lr_ratio": tp.muon_lr / tp.lr}], lr=tp.muon_lr,
                            weight_decay=tp.weight_decay, momentum=tp.muon_momentum, adjust_lr_fn="original")
    return Optimizers(adamw, muon)


def set_lr(optimizer, lr: float) -> None:
    """Every group at the schedule's lr times its own ratio."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_ratio"]


def lr_at(step: int, schedule: LearningRateSchedule, total_steps: int) -> float:
    """Learning rate of optimizer step `step`: linear warmup, then constant, cosine to min_lr, or
    warmup-stable-decay (constant, then linear to min_lr over the last decay_fraction of the steps)."""
    s = schedule
    if s.warmup_steps and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return s.lr
    if s.schedule == "wsd":
        decay_steps = max(1, round(s.decay_fraction * total_steps))
        done = step - (total_steps - decay_steps) + 1  # decay steps taken, this one included
        if done <= 0:
            return s.lr
        return s.lr + (s.min_lr - s.lr) * min(1.0, done / decay_steps)
    span = max(1, total_steps - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + 0.5 * (s.lr - s.min_lr) * (1 + math.cos(math.pi * progress))

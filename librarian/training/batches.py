"""How many windows each optimizer step trains on, and how many steps a run plans.

Without a warmup every step takes train.batch_size windows (x grad_accum). With
train.batch_warmup_tokens, the batch grows linearly in training tokens from train.batch_start to
train.batch_size, in whole multiples of batch_start: early in training the gradient noise is small
against the gradient itself, so a small batch buys as much progress per step as a big one for a
fraction of the tokens (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"; GPT-3
ramps its batch so). Whole multiples keep the batch shapes few (8, 16, 24, 32 for 8 -> 32), which
matters to torch.compile, and every batch divisible by batch_start, which DDP's shares need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from librarian.core.config import TrainParams


def batch_at(tokens_seen: int, tp: TrainParams) -> int:
    """The windows per micro-batch of the optimizer step that starts after `tokens_seen` tokens."""
    if tokens_seen >= tp.batch_warmup_tokens:  # also when the warmup is off (0)
        return tp.batch_size
    grown = (tp.batch_size - tp.batch_start) * tokens_seen // tp.batch_warmup_tokens
    return tp.batch_start + grown // tp.batch_start * tp.batch_start


@dataclass(frozen=True)
class RunPlan:
    """A run to its caps (max_epochs, max_steps, max_tokens); early stopping may end it sooner."""

    steps: int
    epochs: int  # the epochs those steps reach into
    tokens: int


def plan_run(n_windows: int, tp: TrainParams, context_length: int) -> RunPlan:
    """The optimizer steps, epochs and tokens of a run over `n_windows` training windows per epoch.

    The warmup's steps are walked one by one (their batches depend on the tokens seen, and an epoch
    ends when the next batch no longer fits); the steps after it all take the same batch, so they
    are counted in closed form, however many epochs a run allows.
    """
    steps = tokens = used = epoch = 0  # `used`: windows taken in the current epoch
    while tokens < tp.batch_warmup_tokens:
        if cap_reason(steps, tokens, tp.max_steps, tp.max_tokens):
            return RunPlan(steps, epoch + 1, tokens)
        windows = batch_at(tokens, tp) * tp.grad_accum
        if used + windows > n_windows:
            epoch, used = epoch + 1, 0
            if epoch == tp.max_epochs:
                return RunPlan(steps, epoch, tokens)
            continue
        used, tokens, steps = used + windows, tokens + windows * context_length, steps + 1
    full = tp.batch_size * tp.grad_accum
    per_epoch, left_in_epoch = n_windows // full, (n_windows - used) // full
    after = left_in_epoch + per_epoch * (tp.max_epochs - epoch - 1)  # steps after the warmup, uncapped
    if tp.max_steps:
        after = min(after, max(0, tp.max_steps - steps))
    if tp.max_tokens:
        after = min(after, max(0, math.ceil((tp.max_tokens - tokens) / (full * context_length))))
    epochs = epoch + 1 + (math.ceil((after - left_in_epoch) / per_epoch) if after > left_in_epoch else 0)
    return RunPlan(steps + after, epochs, tokens + after * full * context_length)


def cap_reason(steps: int, tokens: int, max_steps: int, max_tokens: int) -> str:
    """Why a run that has taken `steps` steps over `tokens` tokens must stop ("max_steps",
    "max_tokens"), or "" (a cap of 0 is no cap)."""
    if max_steps and steps >= max_steps:
        return "max_steps"
    if max_tokens and tokens >= max_tokens:
        return "max_tokens"
    return ""

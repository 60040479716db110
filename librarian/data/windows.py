"""Token files as training and evaluation data: memory-mapped, checked against their sidecar.

Two windowings score a split, on purpose. Windows (here) makes the train stage's batches and its
validation loss: the val split in windows of model.context_length placed end to end (stride =
context_length), float32. The evaluate stage slides its own windows (window_plan in
librarian/evaluation/evaluate.py) eval.stride tokens at a time, each scoring only the targets the
previous ones did not reach, the last one aligned to the split's end, the trunk in eval.amp's precision.
So the val loss in metrics/train (and train.json's best_val_loss) is not the evaluate stage's loss
on the same val split (metrics.json's "val"), and on real text it is usually higher: in end-to-end
windows a target sees on average half a window of context, under evaluate's stride every target
past the first window sees at least context_length - eval.stride (the more a model uses long
context, the wider the gap); the last targets of the split that do not fill a whole window (fewer
than context_length) are left out here; and bf16 moves evaluate's figures by up to 1e-3. The val
loss is a signal for early stopping and the best checkpoint, cheap every epoch and comparable from
epoch to epoch and run to run; the evaluate stage's figures are the model's reported quality.
Making one use the other's windowing would change every train curve and early-stopping decision
(or every metrics.json) already recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from librarian.core.errors import LibrarianError
from librarian.core.rng import rng_for
from librarian.data.tokens import DTYPE

# The target id cross-entropy skips (torch's ignore_index): what a loss mask turns targets into.
IGNORE = -100


@dataclass(frozen=True)
class TokenFile:
    tokens: np.ndarray  # read-only uint16 memmap
    meta: dict
    # Which tokens count as training targets (1) and which not (0), aligned with `tokens`; None:
    # all. Fine-tuning scores only the replies: the requests are context, never targets.
    loss_mask: np.ndarray | None = None
    # Where the windows lie; None: every `stride` tokens, scoring all their targets (pretraining).
    plan: "WindowPlan | None" = None

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def load_tokens(path: str | Path) -> TokenFile:
    """Memory-map `split.bin`, refusing a file that disagrees with its `split.json` sidecar."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.exists() or not sidecar.exists():
        raise LibrarianError(f"token file {path} or its sidecar {sidecar.name} is missing; run `dvc repro tokenize`")
    try:
        meta = json.loads(sidecar.read_text())
        expected = int(meta["tokens"])
    except (ValueError, KeyError, TypeError):
        raise LibrarianError(f"sidecar {sidecar} is unreadable; rerun `dvc repro -f tokenize`") from None
    size = path.stat().st_size
    if size % np.dtype(DTYPE).itemsize:
        raise LibrarianError(f"token file {path} has an odd byte length ({size}), so it is truncated; rerun `dvc repro -f tokenize`")
    if size // 2 != expected:
        raise LibrarianError(
            f"token file {path} holds {size // 2} tokens but its sidecar says {expected}; rerun `dvc repro -f tokenize`"
        )
    if expected == 0:
        raise LibrarianError(f"token file {path} is empty; the split needs stories")
    vocab_size = meta.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise LibrarianError(f"sidecar {sidecar} has no valid vocab_size; rerun `dvc repro -f tokenize`")
    tokens = np.memmap(path, dtype=DTYPE, mode="r")
    # An id beyond the vocab would crash the embedding lookup mid-run (an IndexError, or a CUDA
    # assert), so a damaged or mismatched file is refused here; one pass over the file is cheap.
    top = int(tokens.max())
    if top >= vocab_size:
        raise LibrarianError(
            f"token file {path} holds token id {top}, beyond its sidecar's vocab of {vocab_size}; "
            "rerun `dvc repro -f tokenize`"
        )
    return TokenFile(tokens, meta)


def check_vocab(split: TokenFile, path: str | Path, vocab_size: int, what: str, fix: str) -> None:
    """Refuse a split tokenized with another vocabulary than `what`'s: its ids would mean other text."""
    if split.vocab_size != vocab_size:
        raise LibrarianError(f"{path} was tokenized with a vocab of {split.vocab_size} but {what} has {vocab_size}; {fix}")


def load_train_val(tokens_dir: str | Path) -> tuple[TokenFile, TokenFile]:
    """The train and val token files, checked to come from one tokenizer.

    The model's vocab comes from train's sidecar: val ids from another vocab would be scored
    against the wrong embedding rows (or crash the lookup).
    """
    tokens_dir = Path(tokens_dir)
    train, val = load_tokens(tokens_dir / "train.bin"), load_tokens(tokens_dir / "val.bin")
    retokenize = "they come from different tokenizers; rerun `dvc repro -f tokenize`"
    check_vocab(val, tokens_dir / "val.bin", train.vocab_size, "train.bin", retokenize)
    if val.meta.get("tokenizer_sha256") != train.meta.get("tokenizer_sha256"):
        raise LibrarianError(
            f"{tokens_dir}/val.bin and train.bin were encoded by different tokenizers (sidecar sha256 "
            f"differs); rerun `dvc repro -f tokenize`"
        )
    return train, val


@dataclass(frozen=True)
class WindowPlan:
    """Windows placed one by one (fine-tuning: librarian/data/chat_tokens.py), each scoring a range of targets.

    Window i reads tokens starts[i] .. starts[i] + context_length and scores only the targets at
    positions score_from[i] <= p < score_to[i] (and the loss mask's): windows may overlap, a target
    is scored by one window only.
    """

    starts: np.ndarray
    score_from: np.ndarray
    score_to: np.ndarray


class Windows:
    """Autoregressive windows of context_length + 1 tokens: input x and target y.

    Every `stride` tokens by default; at the starts of a WindowPlan when one is given.
    """

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, loss_mask: np.ndarray | None = None,
                 plan: WindowPlan | None = None):
        if loss_mask is not None and len(loss_mask) != len(tokens):
            raise LibrarianError(f"a loss mask of {len(loss_mask)} entries does not match {len(tokens)} tokens")
        self.tokens, self.context_length, self.stride, self.loss_mask = tokens, context_length, stride, loss_mask
        self.plan = plan
        if len(tokens) < context_length + 1:
            raise LibrarianError(
                f"a split of {len(tokens)} tokens is shorter than one window of model.context_length + 1 "
                f"({context_length + 1}); use more data or a shorter context"
            )
        if plan is None:
            self.n = (len(tokens) - context_length - 1) // stride + 1
        else:
            self.n = len(plan.starts)
            if self.n and plan.starts.max() + context_length >= len(tokens):
                raise LibrarianError(f"a window plan reaches past the {len(tokens)} tokens it was made for; rebuild it "
                                     f"for context {context_length}")
        self._offsets = np.arange(context_length + 1)

    def __len__(self) -> int:
        return self.n

    @property
    def masked(self) -> bool:
        """Whether windows score only some of their targets, so batches differ in scored targets."""
        return self.loss_mask is not None or self.plan is not None

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's windows in training order (librarian/training/mixture.py's Mixture has the same interface)."""
        return epoch_order(self.n, seed, epoch)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y (B, context_length); targets a window does not score are IGNORE."""
        indices = np.asarray(indices)
        starts = indices * self.stride if self.plan is None else self.plan.starts[indices]
        positions = starts[:, None] + self._offsets
        rows = torch.from_numpy(self.tokens[positions].astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:]
        keep = None
        if self.loss_mask is not None:
            keep = self.loss_mask[positions[:, 1:]].astype(bool)
        if self.plan is not None:
            targets = positions[:, 1:]
            in_range = (targets >= self.plan.score_from[indices, None]) & (targets < self.plan.score_to[indices, None])
            keep = in_range if keep is None else keep & in_range
        if keep is not None:
            y = y.masked_fill(~torch.from_numpy(keep), IGNORE)
        return x, y


def to_device(batch: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch built on the host, on `device`. To a GPU it goes from pinned memory without blocking,
    so the host builds the next batch while the copy runs; a pageable copy would wait for it."""
    device = torch.device(device)
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def window_nats(model, windows: Windows, batch_size: int, first: int = 0, step: int = 1,
                device: str | torch.device | None = None) -> torch.Tensor:
    """float64 [summed nats, scored targets] of the model over windows first, first + step, ... in batches.

    The model in float32 and eval mode is the caller's to set. `first`/`step` split the windows
    between the processes of a distributed run. The batches go to `device`, by default the model's.
    """
    device = device or next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    n = len(windows)
    for start in range(first * batch_size, n, batch_size * step):
        x, y = (to_device(t, device) for t in windows.batch(np.arange(start, min(start + batch_size, n))))
        logits, _ = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        total += torch.stack([nats.double(), (y != IGNORE).sum().double()])
    return total


def epoch_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The window order of one epoch: a fresh seeded shuffle that a resumed run can recompute."""
    return rng_for(seed, f"epoch-{epoch}").permutation(n_windows)

"""The evaluate stage: the trained model's loss, perplexity, top-k accuracy and bits per byte.

Every token of a split but the first is predicted exactly once, by a sliding window of
model.context_length tokens moved `eval.stride` at a time: the first window scores all its
targets, each later one only the targets the previous windows did not reach. So no token is
counted twice or skipped, and every token past the first window sees at least
context_length - stride tokens of context: a smaller stride costs more compute and gives a
(slightly) lower, fairer loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from librarian.checkpoint import check_same_tokenizer, load_weights, read_tokenizer_sha256
from librarian.config import Params
from librarian.data import TokenFile, load_tokens
from librarian.errors import LibrarianError

TOP_K = (1, 5, 10)
SPLITS = ("test", "val", "official_validation")  # test gives the flat keys; the others are nested
OPTIONAL_SPLITS = {"official_validation"}
SIGNIFICANT_DIGITS = 6


def window_plan(n_tokens: int, context_length: int, stride: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Window length, window starts, and how many of each window's last targets are new.

    A window starting at b reads inputs b .. b+length-1 and predicts targets b+1 .. b+length.
    Windows all have the same length so they stack into one batch; the tail window is aligned to
    the end of the split rather than cut short, which gives its new targets more context.
    """
    if n_tokens < 2:
        raise LibrarianError(f"a split of {n_tokens} token(s) has nothing to predict; it needs at least 2 tokens")
    if not 1 <= stride <= context_length:
        raise LibrarianError(
            f"eval.stride ({stride}) must be between 1 and the model's context length ({context_length}), "
            "or tokens would be skipped; lower eval.stride"
        )
    n_targets = n_tokens - 1
    length = min(context_length, n_targets)
    starts = np.arange(0, n_targets - length + 1, stride, dtype=np.int64)
    if starts[-1] + length < n_targets:
        starts = np.append(starts, n_targets - length)
    # Targets 1 .. end are covered once a window ending at `end` has run, so the new ones are the
    # difference of consecutive ends (all `length` of them for the first window).
    new = np.diff(starts + length, prepend=0)
    return length, starts, new


def scored_batches(
    tokens: np.ndarray, context_length: int, stride: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of (inputs, targets, keep): keep marks the targets this window scores for the first time."""
    length, starts, new = window_plan(len(tokens), context_length, stride)
    offsets = np.arange(length + 1)
    positions = torch.arange(length)
    for i in range(0, len(starts), batch_size):
        # Fancy indexing a memmap reads only these rows, so memory is bounded by the batch.
        rows = torch.from_numpy(tokens[starts[i : i + batch_size, None] + offsets].astype(np.int64))
        keep = positions[None, :] >= torch.from_numpy(length - new[i : i + batch_size])[:, None]
        yield rows[:, :-1], rows[:, 1:], keep


def score_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    context_length: int,
    stride: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    desc: str | None = None,
) -> dict:
    """Sums over every predicted token: nats of cross-entropy, the token count and top-k hits."""
    counts = {"nats": 0.0, "tokens": 0, **{f"top{k}": 0 for k in TOP_K}}
    n_windows = len(window_plan(len(tokens), context_length, stride)[1])
    batches = scored_batches(tokens, context_length, stride, batch_size)
    was_training = model.training
    model.eval()  # no dropout; restored below so a training loop can call this mid-run
    try:
        with torch.inference_mode():
            total = math.ceil(n_windows / batch_size)
            for x, y, keep in tqdm(batches, total=total, unit="batch", desc=desc, disable=desc is None):
                logits, _ = model(x.to(device))
                mask = keep.to(device)
                add_counts(counts, logits[mask].float(), y.to(device)[mask])
    finally:
        model.train(was_training)
    return counts


def add_counts(counts: dict, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one batch's (M, vocab) float32 logits and (M,) targets to the running sums."""
    # Per-token losses in float32 (log-softmax inside cross_entropy), summed in float64 so that
    # millions of tokens do not lose precision.
    nats = F.cross_entropy(logits, targets, reduction="none")
    counts["nats"] += nats.double().sum().item()
    counts["tokens"] += targets.numel()
    # topk is deterministic on equal inputs; exact ties between float logits are vanishingly rare.
    top = torch.topk(logits, min(max(TOP_K), logits.size(-1)), dim=-1).indices
    hits = top == targets[:, None]
    for k in TOP_K:
        counts[f"top{k}"] += int(hits[:, :k].any(dim=-1).sum())


def metrics_from_counts(counts: dict, utf8_bytes: int) -> dict:
    """Per-token metrics from the sums; bits per byte makes tokenizers of any vocab comparable."""
    n = counts["tokens"]
    if n == 0 or utf8_bytes <= 0:
        raise LibrarianError(f"cannot compute metrics over {n} tokens and {utf8_bytes} bytes; the split is empty")
    loss = counts["nats"] / n
    metrics = {
        "loss": loss,
        "perplexity": math.exp(loss),
        **{f"top{k}_accuracy": counts[f"top{k}"] / n for k in TOP_K},
        "bits_per_byte": counts["nats"] / math.log(2) / utf8_bytes,
    }
    # Rounding hides last-bit float noise (batch size, thread count), so equal runs give equal JSON.
    return {**{key: round_significant(value) for key, value in metrics.items()}, "tokens": n}


def round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    return float(f"{value:.{digits}g}")


def check_split(split: TokenFile, path: Path, vocab_size: int) -> None:
    """Refuse token ids the model cannot score: an embedding lookup would fail or mean nothing."""
    if split.vocab_size != vocab_size:
        raise LibrarianError(
            f"{path} was tokenized with a vocab of {split.vocab_size} but the model has {vocab_size}; "
            "retrain the model on these tokens (`dvc repro train`)"
        )
    top = int(split.tokens.max())
    if top >= vocab_size:
        raise LibrarianError(
            f"{path} holds token id {top}, beyond the model's vocab of {vocab_size}; "
            "rerun `dvc repro -f tokenize` and retrain"
        )
    if not isinstance(split.meta.get("utf8_bytes"), int):
        raise LibrarianError(f"sidecar of {path} lacks utf8_bytes; rerun `dvc repro -f tokenize`")


def evaluate_split(model, path: Path, params: Params, device, model_path: Path, trained_with: str | None) -> dict:
    split = load_tokens(path)
    check_split(split, path, model.config.vocab_size)
    check_same_tokenizer(model_path, trained_with, split.meta.get("tokenizer_sha256"), f"token file {path}")
    # The checkpoint's own context length, not params': a model is evaluated as it was trained.
    counts = score_tokens(
        model, split.tokens, model.config.context_length, params.eval.stride, params.eval.batch_size, device, path.stem
    )
    return metrics_from_counts(counts, split.meta["utf8_bytes"])


def evaluate_model(model_path: str | Path, tokens_dir: str | Path, params: Params, device="cpu") -> dict:
    """Test metrics as flat keys, val (and official_validation, if tokenized) nested, plus n_params."""
    model = load_weights(model_path, device)
    trained_with = read_tokenizer_sha256(model_path)  # read once, checked against every split
    context_length = model.config.context_length
    if params.eval.stride > context_length:
        raise LibrarianError(
            f"eval.stride ({params.eval.stride}) exceeds the model's context length ({context_length}), "
            "so tokens would be skipped; lower eval.stride"
        )
    tokens_dir = Path(tokens_dir)
    result = {}
    for name in SPLITS:
        path = tokens_dir / f"{name}.bin"
        if name in OPTIONAL_SPLITS and not path.exists():
            continue
        metrics = evaluate_split(model, path, params, device, Path(model_path), trained_with)
        if name == "test":
            result.update(metrics)
        else:
            result[name] = metrics
    result["n_params"] = model.n_params()
    return result

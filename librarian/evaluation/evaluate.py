"""The evaluate stage: the trained model's loss, perplexity, top-k accuracy and bits per byte.

Every token of a split but the first is predicted exactly once, by a sliding window of
model.context_length tokens moved `eval.stride` at a time: the first window scores all its
targets, each later one only the targets the previous windows did not reach. So no token is
counted twice or skipped, and every token past the first window sees at least
context_length - stride tokens of context: a smaller stride costs more compute and gives a
(slightly) lower, fairer loss.

Not the train stage's validation loss: training scores the val split in end-to-end windows
(librarian.data.windows.Windows, stride = context_length, float32), where a target sees half a
window of context on average and the split's last partial window is left out. Its val loss is
therefore not this stage's "val" loss on the same split (on real text, usually higher); it serves
early stopping and the choice of the best checkpoint, these figures report the model
(librarian/data/windows.py says more).

Speed (benchmarks/evaluate_throughput.py: ~3x training's tokens/s on 2 cores, against ~1x before):
scoring runs under inference mode, the transformer trunk in eval.amp's precision (bf16 autocast where
the hardware has native bf16, librarian/core/precision.py; float32 elsewhere), and the output head
only on the positions a window scores, a chunk of rows at a time: with eval.stride 64 and context
128, half of each window's positions are context only, and the head is most of the model's work.
The head and everything after it stay float32: with bf16 logits, near-ties reorder the top-k and
the accuracies move by up to 3e-3 on the test fixture; with the bf16 trunk every metric stays
within 1e-3 of a float32 run (tests/evaluation/test_evaluate.py). eval.threads threads score whole batches in
parallel (librarian/core/threads.py), and the sums do not depend on how many.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from librarian.core.config import Params
from librarian.core.errors import LibrarianError
from librarian.core.precision import Precision, resolve_precision
from librarian.core.progress import progress_bar
from librarian.core.threads import resolve_threads, using_threads
from librarian.data.windows import TokenFile, check_vocab, load_tokens
from librarian.model.checkpoint import check_same_tokenizer, load_weights, read_tokenizer_sha256
from librarian.model.gpt import GPT

TOP_K = (1, 5, 10)
SPLITS = ("test", "val", "official_validation")  # test gives the flat keys; the others are nested
OPTIONAL_SPLITS = {"official_validation"}
SIGNIFICANT_DIGITS = 6
HEAD_CHUNK = 512  # scored rows whose logits exist at once (16 MB of float32 at vocab 8000)


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
    model: GPT,
    tokens: np.ndarray,
    context_length: int,
    stride: int,
    batch_size: int,
    device: str | torch.device | None = None,
    desc: str | None = None,
    precision: Precision | None = None,
    threads: int = 1,
) -> dict:
    """Sums over every predicted token: nats of cross-entropy, the token count and top-k hits.

    `model` needs GPT's hidden() and lm_head; the trunk runs in `precision` (None: float32), the
    head in float32 always. Batches are scored `threads` at a time, each on one torch thread (see in_order).
    """
    device = device or next(model.parameters()).device  # by default, where the model is
    precision = precision or resolve_precision(device, amp=False)
    counts = {"nats": 0.0, "tokens": 0, **{f"top{k}": 0 for k in TOP_K}}
    n_windows = len(window_plan(len(tokens), context_length, stride)[1])
    batches = scored_batches(tokens, context_length, stride, batch_size)
    score = functools.partial(batch_counts, model, device=device, precision=precision)
    was_training = model.training
    model.eval()  # no dropout; restored below so a training loop can call this mid-run
    try:
        with using_threads(1):
            total = math.ceil(n_windows / batch_size)
            with progress_bar(total, desc=desc or "", unit="batch", disable=desc is None) as bar:
                for batch in in_order(score, batches, threads):
                    for key, value in batch.items():
                        counts[key] += value
                    bar.update(1)
    finally:
        model.train(was_training)
    return counts


def batch_counts(model: GPT, batch: tuple[torch.Tensor, ...], device, precision: Precision) -> dict:
    """One batch's sums (nats, tokens, top-k hits)."""
    x, y, keep = (t.to(device) for t in batch)
    counts = {"nats": 0.0, "tokens": 0, **{f"top{k}": 0 for k in TOP_K}}
    with torch.inference_mode():  # entered on the thread that runs the batch: the mode is thread-local
        for logits, targets in scored_logits(model, x, y, keep, precision):
            add_counts(counts, logits, targets)
    return counts


def in_order(fn, items: Iterator, threads: int) -> Iterator:
    """fn(item) for each item, computed `threads` at a time, yielded in the items' order.

    Whole batches in parallel, rather than each op split over threads: no op waits for a thread
    whose core another job holds (torch's per-op split collapses then), and every batch is computed
    the same way on any thread count, so the sums, added in order, are too. At most 2 x threads
    items are read ahead, so memory stays bounded by the batch.
    """
    if threads == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def scored_logits(
    model: GPT, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, precision: Precision
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """float32 logits and targets of the scored positions only, HEAD_CHUNK rows at a time.

    Every position runs through the trunk (each is context for the later ones), but only the
    scored ones need the head, its (rows x vocab) logits and their softmax.
    """
    with precision.autocast():  # entered on the scoring thread: autocast is thread-local
        hidden = model.hidden(x)
    rows, targets = hidden[keep].float(), y[keep]
    head = model.lm_head.weight.float()
    # One buffer for every chunk: a fresh 16 MB tensor a chunk costs ~30% of the matmul in page faults.
    logits = rows.new_empty(min(HEAD_CHUNK, len(rows)), head.size(0))
    for start in range(0, len(rows), HEAD_CHUNK):
        chunk = rows[start : start + HEAD_CHUNK]
        yield torch.mm(chunk, head.T, out=logits[: len(chunk)]), targets[start : start + HEAD_CHUNK]


def add_counts(counts: dict, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add one batch's (M, vocab) float32 logits and (M,) targets to the running sums.

    Overwrites the logits: they are a scratch buffer of the caller's.
    """
    # Per-token losses in float32 (log-softmax inside cross_entropy), summed in float64 so that
    # millions of tokens do not lose precision.
    nats = F.cross_entropy(logits, targets, reduction="none")
    counts["nats"] += nats.double().sum().item()
    counts["tokens"] += targets.numel()
    # The target is in the top k when fewer than k logits beat it (a tie, vanishingly rare in
    # float32, counts for the target). Counted as a float sum of sign(max(logit - target's, 0)), in
    # place: 3x faster than summing a bool comparison, and no sort as torch.topk would do.
    beaten_by = logits.sub_(logits.gather(1, targets[:, None])).clamp_(min=0).sign_().sum(-1)
    for k in TOP_K:
        counts[f"top{k}"] += int((beaten_by < k).sum())


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
    check_vocab(split, path, vocab_size, "the model", "retrain the model on these tokens (`dvc repro train`)")
    top = int(split.tokens.max())
    if top >= vocab_size:
        raise LibrarianError(
            f"{path} holds token id {top}, beyond the model's vocab of {vocab_size}; "
            "rerun `dvc repro -f tokenize` and retrain"
        )
    if not isinstance(split.meta.get("utf8_bytes"), int):
        raise LibrarianError(f"sidecar of {path} lacks utf8_bytes; rerun `dvc repro -f tokenize`")


def evaluate_split(model, path: Path, params: Params, device, model_path: Path, trained_with: str | None,
                   precision: Precision) -> dict:
    return score_split(model, checked_split(model, path, model_path, trained_with), path, params, device, precision)


def checked_split(model, path: Path, model_path: Path, trained_with: str | None) -> TokenFile:
    """The token file at `path`, refused if the model cannot score it (ids beyond its vocab, another tokenizer)."""
    split = load_tokens(path)
    check_split(split, path, model.config.vocab_size)
    check_same_tokenizer(model_path, trained_with, split.meta.get("tokenizer_sha256"), f"token file {path}")
    return split


def score_split(model, split: TokenFile, path: Path, params: Params, device, precision: Precision) -> dict:
    # The checkpoint's own context length, not params': a model is evaluated as it was trained.
    threads = resolve_threads(params.eval.threads, model.config.d_model, "eval.threads", batched=True)
    counts = score_tokens(
        model, split.tokens, model.config.context_length, params.eval.stride, params.eval.batch_size, device, path.stem,
        precision=precision, threads=threads,
    )
    return metrics_from_counts(counts, split.meta["utf8_bytes"])


def scoring_precision(device, params: Params, stage: str) -> Precision:
    """eval.amp resolved on `device`, with the stage's one line when the CPU has no native bf16."""
    precision = resolve_precision(device, params.eval.amp)
    precision.announce(stage, "scoring")
    return precision


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
    # Every split checked before the precision line: bad input gets its one line and nothing else.
    splits = {name: checked_split(model, tokens_dir / f"{name}.bin", Path(model_path), trained_with)
              for name in SPLITS if name not in OPTIONAL_SPLITS or (tokens_dir / f"{name}.bin").exists()}
    precision = scoring_precision(device, params, "evaluate")
    result = {}
    for name, split in splits.items():
        metrics = score_split(model, split, tokens_dir / f"{name}.bin", params, device, precision)
        if name == "test":
            result.update(metrics)
        else:
            result[name] = metrics
    result["n_params"] = model.n_params()
    return result

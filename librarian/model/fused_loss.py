"""The output head and its cross-entropy, fused and computed a chunk of rows at a time.

Mathematically `F.cross_entropy(h @ W.T, targets)`, but the (tokens x vocab) logits never exist
whole: at vocab 8000 and 4096 tokens a step they are 131 MB of fp32 that the plain path writes,
copies, normalises and zero-fills again in its backward pass. Here each chunk of rows is scored
while it sits in cache, and its gradients (softmax - one_hot, times the weights or inputs) are
made in the same pass, so the backward pass only scales them. On the 2-core CPU this makes a
training step of the card's model about 1.7x faster (benchmarks/train_throughput.py).

With train.compile, a chunk's softmax, loss and gradient are one Inductor kernel (the same maths
written without in-place steps, `softmax_grad`) instead of ten passes of eager ops over its
(rows x vocab) logits.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from librarian.data.windows import IGNORE

# Devices whose tensors the host reads without waiting: there, the loss asks whether a mask drops
# anything, and the unmasked path keeps its bits. Elsewhere each such read would stall the step.
HOST_DEVICES = ("cpu",)


def cross_entropy_grad(logits: torch.Tensor, targets: torch.Tensor, scale: float | torch.Tensor,
                       keep: torch.Tensor | None = None):
    """Summed cross-entropy of rows of logits (in fp32), and its gradient times scale, in logits' dtype.

    `scale` is a 0-d tensor where reading it on the host would wait for the device.
    `keep` (rows,) drops the rows whose target is IGNORE from both (their targets must be valid ids
    here). Works on the logits in place: they are a temporary of the caller's.
    """
    dtype, logits = logits.dtype, logits.float()
    top = logits.amax(-1, keepdim=True)
    target_logit = logits.gather(1, targets[:, None])
    exp = logits.sub_(top).exp_()
    total = exp.sum(-1, keepdim=True)
    row_loss = total.log() + top - target_logit
    minus_scale = torch.full_like(target_logit, -1.0).mul_(scale)  # exact: a float or a 0-d tensor
    # reciprocal, then scale: what `float / tensor` computes, so a 0-d tensor scale gives the same bits.
    grad = exp.mul_(total.reciprocal().mul_(scale)).scatter_add_(1, targets[:, None], minus_scale)
    if keep is not None:
        # Boolean indexing asks the device how many rows are kept: a host read, so only on the host.
        row_loss = row_loss[keep] if keep.device.type in HOST_DEVICES else torch.where(keep[:, None], row_loss, 0.0)
        grad = grad.mul_(keep[:, None])
    return row_loss.sum(), grad.to(dtype)


def softmax_grad(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor):
    """cross_entropy_grad's maths, out of place, for Inductor to fuse: (summed loss, gradient).

    `scale` is a 0-d tensor and `keep` (rows,) a bool tensor that is all True without a loss mask,
    so that one compiled kernel serves every batch.
    """
    x = logits.float()
    top = x.amax(-1, keepdim=True)
    exp = (x - top).exp()
    total = exp.sum(-1, keepdim=True)
    row_loss = total.log() + top - x.gather(1, targets[:, None])
    target = torch.arange(x.size(1), device=x.device) == targets[:, None]
    grad = exp * (scale / total) - torch.where(target, scale, 0.0)
    row_loss = torch.where(keep[:, None], row_loss, 0.0)
    grad = torch.where(keep[:, None], grad, 0.0)
    return row_loss.sum(), grad.to(logits.dtype)


@functools.cache
def compiled_softmax_grad():
    # One compile per chunk shape (the full chunks, and the last one when it is shorter).
    return torch.compile(softmax_grad, dynamic=False)


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy(h @ weight.T, targets), gradients included, `chunk` rows at a time."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, compute_dtype: torch.dtype, compiled: bool = False):
        # Targets a loss mask left out (IGNORE) count neither in the mean nor in the gradients.
        keep = targets != IGNORE
        if h.device.type in HOST_DEVICES:
            masked = not bool(keep.all())
            n = int(keep.sum()) if masked else h.size(0)
            scale = 1.0 / max(n, 1)
        else:
            masked, n = True, keep.sum()
            scale = 1.0 / n.clamp(min=1).to(torch.float32)
        if masked:
            targets = targets.clamp(min=0)
        # fp16's smallest normal is 6e-5: softmax / n (about 3e-8 for the card's vocab and batch) would
        # flush to zero in the gradient before the GradScaler's factor arrives, silently. So in fp16
        # the chunk's gradient is the unscaled softmax - one_hot (at most 1 in size), and 1/n is
        # applied to the float32 sums after the matmuls. bf16 has float32's range: it keeps its path.
        after = compute_dtype == torch.float16
        chunk_scale = 1.0 if after else scale
        h_c, w_c = h.to(compute_dtype), weight.to(compute_dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        if compiled:
            fused = compiled_softmax_grad()
            chunk_scale = torch.as_tensor(chunk_scale, dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk):  # every row: the kept ones can be anywhere
            rows = slice(start, start + chunk)
            if compiled:
                chunk_loss, g = fused(h_c[rows] @ w_c.T, targets[rows], chunk_scale, keep[rows])
            else:
                chunk_loss, g = cross_entropy_grad(h_c[rows] @ w_c.T, targets[rows], chunk_scale,
                                                   keep[rows] if masked else None)
            loss += chunk_loss
            grad_h[rows] = g @ w_c
            grad_w += g.T @ h_c[rows]
        if after:
            grad_h.mul_(scale)
            grad_w.mul_(scale)
        ctx.save_for_backward(grad_h, grad_w)
        if isinstance(n, torch.Tensor):
            return loss / n  # nothing to score: 0 / 0, nan, as F.cross_entropy gives
        return loss / n if n else loss.fill_(float("nan"))

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 256,
                         compiled: bool = False) -> torch.Tensor:
    """Fused head + loss for hidden states h (..., d) and targets (...); bf16 matmuls under autocast.
    With `compiled`, each chunk's softmax and gradient run as one torch.compile'd kernel."""
    kind = h.device.type
    autocast = torch.amp.is_autocast_available(kind)  # not on `meta`, where tests trace the device paths
    compute_dtype = torch.get_autocast_dtype(kind) if autocast and torch.is_autocast_enabled(kind) else h.dtype
    with torch.autocast(kind, enabled=False) if autocast else contextlib.nullcontext():
        return LinearCrossEntropy.apply(h.flatten(0, -2).float(), weight, targets.reshape(-1), chunk, compute_dtype,
                                        compiled)

"""The speed options of training keep its maths (README "Training throughput").

- Under train.compile, dropout masks come from a counter-based hash (librarian.model.gpt.dropout): the
  masks must be Bernoulli(1 - p), independent across elements, calls and keys, identical between
  eager and compiled evaluation, and the backward pass must use the forward pass's mask.
- With train.compile and train.fused_loss, each chunk's softmax and gradient is one compiled
  kernel (librarian.model.fused_loss.softmax_grad): the same loss and gradients as the eager chunk.
- A compiled training run ends where eager runs end, within the noise of the dropout masks.
- AdamW runs with foreach=True: the same weights, bit for bit, as the per-parameter loop.
"""

import math

import pytest
import torch

from librarian.model.gpt import dropout, dropout_keep
from librarian.training.train import TrainPaths, build_trainer



KEYS = torch.tensor([0x1234567, -0x2345678], dtype=torch.int32)


# --- the hashed dropout masks ----------------------------------------------------------------------


def test_hashed_masks_keep_one_minus_p_of_the_elements_independently():
    n = 1 << 22
    for p in (0.1, 0.2, 0.5):
        keep = dropout_keep(torch.Size([n]), p, KEYS).double()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(keep.mean().item() - (1 - p)) < 5 * sigma, p
    keep = dropout_keep(torch.Size([n]), 0.2, KEYS).double() - 0.8
    variance, bound = 0.16, 5 / math.sqrt(n)  # correlations of independent masks are ~N(0, 1/n)
    for lag in (1, 2, 16, 128, 4096):  # neighbours: within a row, across rows, heads and batches
        assert abs((keep[lag:] * keep[:-lag]).mean().item() / variance) < bound, lag
    # Other keys (each call draws two fresh ones): no copy of this mask, nor a shifted one. A call
    # that drew the same second key would get this mask with its elements permuted (i -> i ^ delta):
    # a chance of 2**-32 per pair of calls.
    generator = torch.Generator().manual_seed(0)
    others = [KEYS + torch.tensor([0, 1], dtype=torch.int32),
              torch.randint(-(2**31), 2**31, (2,), dtype=torch.int32, generator=generator)]
    for keys in others:
        other = dropout_keep(torch.Size([n]), 0.2, keys).double() - 0.8
        for shifted in range(0, 5):
            assert abs((keep[shifted:] * other[: n - shifted]).mean().item() / variance) < bound, (keys, shifted)


def test_hashed_masks_are_the_same_bits_eager_and_compiled():
    shape = torch.Size([3, 4, 128, 128])
    compiled = torch.compile(lambda keys: dropout_keep(shape, 0.2, keys), fullgraph=True)
    assert torch.equal(compiled(KEYS), dropout_keep(shape, 0.2, KEYS))


def compiled_dropout(p: float):
    return torch.compile(lambda x: dropout(x, p, True), fullgraph=True, options={"fallback_random": True})


def test_compiled_dropout_scales_the_kept_values_and_uses_the_same_mask_backward():
    torch.manual_seed(0)
    x = (torch.rand(64, 4, 32, 32) + 0.5).requires_grad_()  # no zeros: a zero output is a dropped element
    weights = torch.randn_like(x)
    y = compiled_dropout(0.25)(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(y[kept], x[kept] * (1 / 0.75), rtol=0, atol=0)  # as F.dropout scales
    (y * weights).sum().backward()
    torch.testing.assert_close(x.grad, torch.where(kept, weights * (1 / 0.75), 0.0), rtol=1e-6, atol=0)


def test_compiled_dropout_masks_follow_the_torch_seed():
    x = torch.ones(1 << 16)
    drop = compiled_dropout(0.2)
    torch.manual_seed(7)
    first, second = drop(x), drop(x)
    torch.manual_seed(7)
    assert torch.equal(drop(x), first) and torch.equal(drop(x), second)  # repeatable (and resumable)
    assert not torch.equal(first, second)  # a fresh mask at every call
    agree = ((first != 0) == (second != 0)).double().mean().item()
    assert abs(agree - (0.8**2 + 0.2**2)) < 0.01  # the two masks are independent


def test_eager_dropout_is_still_torchs():
    """The card's eager path is untouched: the same masks as F.dropout from the same seed."""
    x = torch.ones(1 << 12)
    torch.manual_seed(3)
    ours = dropout(x, 0.2, True)
    torch.manual_seed(3)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.2, True))
    assert torch.equal(dropout(x, 0.2, False), x)


# --- the compiled chunk of the fused loss ----------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_compiled_softmax_grad_equals_the_eager_chunk(masked):
    from librarian.model.fused_loss import compiled_softmax_grad, cross_entropy_grad

    torch.manual_seed(0)
    logits, targets = torch.randn(64, 300) * 3, torch.randint(0, 300, (64,))
    keep = torch.rand(64) > 0.3 if masked else torch.ones(64, dtype=torch.bool)
    scale = 1 / int(keep.sum())
    loss, grad = compiled_softmax_grad()(logits.clone(), targets, torch.tensor(scale), keep)
    expected_loss, expected_grad = cross_entropy_grad(logits.clone(), targets, scale, keep if masked else None)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


# --- whole runs ------------------------------------------------------------------------------------


def paths(root) -> TrainPaths:
    return TrainPaths(model=root / "model", curves=root / "live", speed=root / "speed", state=root / "state")


def val_loss_after(params, tokens_dir, root, stream: int) -> float:
    """Train with `params`; the dropout masks' random stream is reseeded to `stream` after the
    model is built, so runs of one params differ in their masks only."""
    trainer = build_trainer(params, tokens_dir, paths(root))
    torch.manual_seed(stream)
    return trainer.run().history[-1]["val_loss"]


def test_compiled_training_without_dropout_follows_the_eager_run(tiny_params, tokens_dir, tmp_path):
    common = {"train.max_epochs": 2, "model.dropout": 0.0, "train.fused_loss": True}
    eager = val_loss_after(tiny_params(**common), tokens_dir, tmp_path / "eager", 0)
    compiled = val_loss_after(tiny_params(**common, **{"train.compile": True}), tokens_dir, tmp_path / "compiled", 0)
    assert compiled == pytest.approx(eager, rel=1e-4)  # no randomness: the same run to float rounding


def test_compiled_training_with_dropout_ends_within_the_eager_runs_noise(tiny_params, tokens_dir, tmp_path):
    """Same maths: the loss after two epochs of compiled training (hashed masks, compiled loss
    chunks) is where eager runs with other dropout masks end."""
    common = {"train.max_epochs": 2, "model.dropout": 0.2, "train.fused_loss": True}
    eager = [val_loss_after(tiny_params(**common), tokens_dir, tmp_path / f"eager{s}", s) for s in range(4)]
    compiled = [val_loss_after(tiny_params(**common, **{"train.compile": True}), tokens_dir, tmp_path / f"compiled{s}", s)
                for s in range(2)]
    mean = sum(eager) / len(eager)
    spread = max(eager) - min(eager)
    assert spread > 0  # the masks do change the run: the noise is real
    for loss in compiled:
        assert abs(loss - mean) <= 2 * spread, (compiled, eager)
    assert compiled[0] != compiled[1]  # the compiled masks follow the stream too


# --- the optimizer ---------------------------------------------------------------------------------


def test_adamw_foreach_gives_the_weights_of_the_per_parameter_loop(tiny_params, tokens_dir, tmp_path, monkeypatch):
    from librarian.training import optimizer

    params = tiny_params(**{"train.max_epochs": 2})
    trainer = build_trainer(params, tokens_dir, paths(tmp_path / "a"))
    assert trainer.optimizer.defaults["foreach"] is True
    trainer.run()

    real = torch.optim.AdamW
    monkeypatch.setattr(optimizer.torch.optim, "AdamW", lambda *a, **kw: real(*a, **{**kw, "foreach": False}))
    loop = build_trainer(params, tokens_dir, paths(tmp_path / "b"))
    assert loop.optimizer.defaults["foreach"] is False
    loop.run()
    for name in ("last.safetensors", "model.safetensors"):
        assert (tmp_path / "a" / "model" / name).read_bytes() == (tmp_path / "b" / "model" / name).read_bytes()

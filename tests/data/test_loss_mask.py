"""A per-token loss mask (fine-tuning scores replies, not requests): masked targets count neither
in the loss nor in any gradient, through the plain loss and the fused head alike."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from librarian.data.windows import IGNORE, TokenFile, Windows
from librarian.model.fused_loss import linear_cross_entropy
from librarian.training.train import TrainPaths, Trainer
from tests.helpers import TINY_MODEL, VOCAB, stories, write_tokens


def test_windows_turn_masked_targets_into_ignore():
    tokens = np.arange(20, dtype=np.uint16)
    mask = (np.arange(20) % 3 == 0).astype(np.uint8)
    x, y = Windows(tokens, 4, 4, mask).batch([0, 1])
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[IGNORE, IGNORE, 3, IGNORE], [IGNORE, 6, IGNORE, IGNORE]]
    assert Windows(tokens, 4, 4).batch([0])[1].tolist() == [[1, 2, 3, 4]]  # no mask: every target


@pytest.mark.parametrize("fused", [False, True])
def test_masked_targets_change_neither_loss_nor_gradients(fused):
    torch.manual_seed(0)
    h = torch.randn(2, 8, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (2, 8))
    keep = torch.rand(2, 8) < 0.5
    keep[0, 0] = True

    def loss_for(t):
        h.grad = weight.grad = None
        masked = t.masked_fill(~keep, IGNORE)
        loss = linear_cross_entropy(h, weight, masked) if fused else F.cross_entropy((h @ weight.T).view(-1, 40), masked.view(-1))
        loss.backward()
        return loss.detach(), h.grad.clone(), weight.grad.clone()

    loss, grad_h, grad_w = loss_for(targets)
    other = targets.clone()
    other[~keep] = (other[~keep] + 7) % 40  # other ids where the mask says "not a target"
    loss2, grad_h2, grad_w2 = loss_for(other)
    assert torch.equal(loss, loss2) and torch.equal(grad_h, grad_h2) and torch.equal(grad_w, grad_w2)
    assert grad_h[~keep].abs().max() == 0  # masked positions get no gradient
    expected = F.cross_entropy((h @ weight.T)[keep], targets[keep])  # the mean over kept targets only
    assert torch.allclose(loss, expected, atol=1e-5)


def test_the_fused_loss_scores_kept_targets_in_any_chunk():
    """Kept targets far past the first chunk (a reply late in a long batch): the fused loss and its
    gradients still equal the plain loss's, and nothing is nan."""
    torch.manual_seed(0)
    h = torch.randn(4, 300, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (4, 300))
    keep = torch.zeros(4, 300, dtype=torch.bool)
    keep[:, 250:] = True  # 200 kept rows, all in the last chunks of 256
    masked = targets.masked_fill(~keep, IGNORE)
    fused = linear_cross_entropy(h, weight, masked, chunk=64)
    fused.backward()
    grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    plain = F.cross_entropy((h @ weight.T).view(-1, 40), masked.view(-1))
    plain.backward()
    assert torch.allclose(fused, plain, atol=1e-5)
    assert torch.allclose(grads[0], h.grad, atol=1e-6) and torch.allclose(grads[1], weight.grad, atol=1e-5)


def test_a_trainer_trains_on_the_kept_targets_only(make_params, tmp_path):
    train_tokens, val_tokens = stories(150, seed=1), stories(30, seed=2)
    write_tokens(tmp_path / "tokens", "train", train_tokens, VOCAB)
    write_tokens(tmp_path / "tokens", "val", val_tokens, VOCAB)
    from librarian.data.windows import load_train_val
    from librarian.training.runtime import setup_runtime

    train, val = load_train_val(tmp_path / "tokens")
    half = lambda n: (np.arange(n) % 2).astype(np.uint8)  # noqa: E731 - every other token is a target
    train = TokenFile(train.tokens, train.meta, half(len(train.tokens)))
    val = TokenFile(val.tokens, val.meta, half(len(val.tokens)))
    params = make_params(**{**TINY_MODEL, "train.max_epochs": 2})
    paths = TrainPaths(model=tmp_path / "m", curves=tmp_path / "c", speed=tmp_path / "s", state=tmp_path / "st")
    trainer = Trainer(params, setup_runtime(params.train), train, val, paths)
    before = trainer.val_loss()
    progress = trainer.run()
    assert progress.history[-1]["val_loss"] < before and all(np.isfinite(r["train_loss"]) for r in progress.history)

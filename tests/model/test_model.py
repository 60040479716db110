import pytest
import torch

from librarian.model.gpt import GPT, GPTConfig
from tests.helpers import gpt_config

TINY = dict(vocab_size=50, context_length=12, n_layer=2, n_head=2, d_model=16, d_ff=24, dropout=0.0)


def test_default_model_is_the_card_size():
    model = GPT(gpt_config())
    assert model.n_params() == 1_305_600
    assert model.lm_head.weight is model.tok_emb.weight  # tied: one matrix, counted once


def test_config_comes_from_params(make_params):
    config = GPTConfig.from_params(make_params().model, vocab_size=8000)
    # The committed params.yaml is the card; the model's schema is params.yaml's plus the vocab.
    assert config.to_dict() == {"vocab_size": 8000, "context_length": 128, "n_layer": 2, "n_head": 4, "d_model": 128,
                                "d_ff": 256, "dropout": 0.2, "position": "learned", "norm": "layernorm", "mlp": "gelu",
                                "attention": "manual"}
    with pytest.raises(ValueError, match="d_model"):  # the same rules as params.yaml's model section
        GPTConfig(**{**config.to_dict(), "n_head": 3})


@pytest.mark.parametrize("options", [{}, {"attention": "sdpa"}, {"position": "rope"}, {"norm": "rmsnorm"},
                                     {"mlp": "swiglu"}, {"position": "rope", "mlp": "swiglu", "norm": "rmsnorm"}])
def test_causality_future_tokens_never_change_earlier_logits(options):
    torch.manual_seed(0)
    model = GPT(gpt_config(**TINY, **options)).eval()
    x = torch.randint(0, 50, (3, 12))
    logits, _ = model(x)
    for t in range(11):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randint(0, 50, (3, 11 - t))
        later, _ = model(changed)
        assert torch.equal(later[:, : t + 1], logits[:, : t + 1]), f"position {t} saw the future"
        assert not torch.allclose(later[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_sdpa_equals_manual_attention_forward_and_gradients(position):
    torch.manual_seed(0)
    manual = GPT(gpt_config(**TINY, position=position))
    fused = GPT(gpt_config(**TINY, position=position, attention="sdpa"))
    fused.load_state_dict(manual.state_dict())
    x = torch.randint(0, 50, (4, 12))
    y = torch.randint(0, 50, (4, 12))
    logits_m, loss_m = manual(x, y)
    logits_f, loss_f = fused(x, y)
    torch.testing.assert_close(logits_f, logits_m, rtol=1e-5, atol=1e-5)
    loss_m.backward()
    loss_f.backward()
    for (name, pm), (_, pf) in zip(manual.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pf.grad, pm.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = GPT(gpt_config(**{**TINY, "dropout": 0.5}))
    x = torch.randint(0, 50, (2, 12))
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])


def test_sequences_longer_than_the_context_are_refused():
    model = GPT(gpt_config(**TINY))
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_any_depth_width_and_context():
    model = GPT(gpt_config(vocab_size=100, context_length=64, n_layer=5, n_head=8, d_model=64, d_ff=96, dropout=0.1))
    logits, loss = model(torch.randint(0, 100, (2, 64)), torch.randint(0, 100, (2, 64)))
    assert logits.shape == (2, 64, 100) and loss.item() > 0


@pytest.mark.parametrize("amp", [False, True])
def test_fused_loss_equals_head_plus_cross_entropy(amp):
    from librarian.model.fused_loss import linear_cross_entropy

    torch.manual_seed(0)
    model = GPT(gpt_config(**{**TINY, "vocab_size": 300}))
    x, y = torch.randint(0, 300, (3, 12)), torch.randint(0, 300, (3, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        _, plain = model(x, y)
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        fused = linear_cross_entropy(model.hidden(x), model.lm_head.weight, y, chunk=7)  # chunks that do not divide
    fused.backward()
    tolerance = dict(rtol=2e-2, atol=1e-4) if amp else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused, plain, **tolerance)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], **tolerance, msg=name)


def test_next_logits_equal_the_head_and_follow_new_weights():
    """Decoding's head reads a transposed copy of the tied weight: it must never go stale."""
    torch.manual_seed(0)
    model = GPT(gpt_config(**TINY)).eval()
    hidden = model.hidden(torch.randint(0, 50, (1, 5)))[0, -1]
    assert torch.allclose(model.next_logits(hidden), model.lm_head(hidden), atol=1e-6)
    with torch.no_grad():
        model.tok_emb.weight.mul_(-2.0)  # an optimizer step: the weight changes in place
    assert torch.allclose(model.next_logits(hidden), model.lm_head(hidden), atol=1e-6)
    model.load_state_dict(GPT(gpt_config(**TINY)).state_dict())  # new weights loaded into the same model
    assert torch.allclose(model.next_logits(hidden), model.lm_head(hidden), atol=1e-6)

import pytest
import torch

from librarian.data.windows import IGNORE
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


def test_fused_loss_keeps_small_head_gradients_under_fp16():
    """fp16 (CUDA before compute capability 8.0) flushes softmax / n, about 1e-7 here, to zero before
    the GradScaler's factor arrives: the head rows of tokens absent from the batch were off by ~200 %,
    with nothing inf for the scaler to see. Against a float64 reference, the median error stays < 1 %."""
    import torch.nn.functional as F

    from librarian.model.fused_loss import linear_cross_entropy

    torch.manual_seed(0)
    rows, vocab, seen = 1024, 8000, 500
    h, w = torch.randn(rows, 128), torch.randn(vocab, 128) * 0.02
    t = torch.randint(0, seen, (rows,))  # tokens >= `seen` never appear: their rows get only softmax / n
    reference = [h.double().requires_grad_(), w.double().requires_grad_()]
    F.cross_entropy(reference[0] @ reference[1].T, t).backward()
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        linear_cross_entropy(hh, ww, t).backward()

    def median_error(grad, ref):
        return ((grad.double() - ref).norm(dim=1) / ref.norm(dim=1)).median().item()

    assert median_error(ww.grad[seen:], reference[1].grad[seen:]) < 0.01
    assert median_error(hh.grad, reference[0].grad) < 0.01


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_fused_loss_off_the_cpu_never_reads_the_device_and_computes_the_same(monkeypatch, masked, compiled):
    """On an accelerator, `bool(keep.all())` and `int(keep.sum())` each waited for the device every
    step. Off the CPU the loss keeps n as a 0-d tensor: the same numbers, bit for bit (checked by
    taking that path on the CPU; the masked loss sums its rows in another order), and no host read at all (on `meta`, any read raises)."""
    from librarian.model import fused_loss
    from librarian.model.fused_loss import linear_cross_entropy

    if compiled:
        pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(50, 16)
    t = torch.randint(0, 50, (40,))
    if masked:
        t[::3] = IGNORE

    def run():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hh, ww, t, chunk=16, compiled=compiled)
        loss.backward()
        return loss, hh.grad, ww.grad

    on_host = run()
    monkeypatch.setattr(fused_loss, "HOST_DEVICES", ())
    loss, *grads = run()
    torch.testing.assert_close(loss, on_host[0], rtol=1e-6, atol=0)  # masked: the kept rows summed in another order
    assert all(torch.equal(a, b) for a, b in zip(grads, on_host[1:]))
    meta = [x.to("meta") for x in (h, w)]
    loss = linear_cross_entropy(meta[0].requires_grad_(), meta[1], t.to("meta"), chunk=16)
    assert loss.device.type == "meta"


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

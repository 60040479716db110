"""Sliding-window evaluation: hand-computed metrics, exactly-once scoring, context, end to end."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from librarian.model.checkpoint import save_weights
from librarian.core.errors import LibrarianError
from librarian.core.precision import Precision, resolve_precision
from librarian.evaluation.evaluate import (add_counts, evaluate_model, metrics_from_counts, score_tokens, scored_batches,
                                window_plan)
from librarian.model.gpt import GPT
from stages.evaluate import main as evaluate_stage
from tests.helpers import set_dotted, tiny_config, write_tokens

TINY = tiny_config(context_length=16, dropout=0.0)
METRIC_KEYS = {"loss", "perplexity", "top1_accuracy", "top5_accuracy", "top10_accuracy", "bits_per_byte", "tokens"}


# (n_tokens, context_length, stride): stride == ctx, stride 1, lengths not aligned to the stride,
# a split of exactly one window, and splits shorter than one window.
PLANS = [(50, 8, 8), (50, 8, 1), (50, 8, 3), (51, 8, 5), (9, 8, 8), (9, 8, 3), (5, 8, 4), (2, 8, 1), (100, 16, 7)]


class Logits(nn.Module):
    """A test "model" in GPT's interface whose hidden states are its logits: lm_head is the identity."""

    def __init__(self, vocab: int):
        super().__init__()
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        nn.init.eye_(self.lm_head.weight)


class RankTable(Logits):
    """A bigram "model": the previous token alone fixes the logits, and token v's rank after p is
    (v - p - 1) mod V, with logit -rank. So the target's rank, hence its loss, is known exactly."""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        v = torch.arange(vocab)
        self.table = -((v[None, :] - v[:, None] - 1) % vocab).float()

    def hidden(self, idx):
        return self.table[idx]


class ContextProbe(Logits):
    """For tokens = arange(N), predicts target t right only if it saw at least `need(t)` tokens."""

    def __init__(self, vocab: int, need):
        super().__init__(vocab)
        self.vocab, self.need = vocab, need

    def hidden(self, idx):
        seen = torch.arange(1, idx.size(1) + 1).expand_as(idx)  # input j has j + 1 tokens of context
        target = idx + 1
        ok = seen >= self.need(target)
        guess = torch.where(ok, target, (target + 1) % self.vocab)
        return nn.functional.one_hot(guess, self.vocab).float() * 5.0


def test_hand_computed_metrics():
    vocab = 12
    ranks = [0, 4, 9, 11, 0, 2]  # top-1 hits: 2; top-5: 4 (0, 4, 0, 2); top-10: 5 (all but 11)
    tokens = [0]
    for r in ranks:
        tokens.append((tokens[-1] + 1 + r) % vocab)
    tokens = np.array(tokens, dtype=np.uint16)
    # A target of rank r has loss logsumexp(0, -1, ..., -(V-1)) + r.
    log_z = math.log(sum(math.exp(-k) for k in range(vocab)))
    nats = len(ranks) * log_z + sum(ranks)

    for ctx, stride in [(3, 3), (3, 1), (4, 3), (10, 2)]:  # a bigram does not care about context
        counts = score_tokens(RankTable(vocab), tokens, ctx, stride, batch_size=2)
        assert counts["tokens"] == 6
        assert (counts["top1"], counts["top5"], counts["top10"]) == (2, 4, 5)
        assert counts["nats"] == pytest.approx(nats, rel=1e-6)

    m = metrics_from_counts(counts, utf8_bytes=10)
    assert m == {
        "loss": pytest.approx(nats / 6, rel=1e-5),
        "perplexity": pytest.approx(math.exp(nats / 6), rel=1e-5),
        "top1_accuracy": pytest.approx(2 / 6, rel=1e-5),
        "top5_accuracy": pytest.approx(4 / 6, rel=1e-5),
        "top10_accuracy": pytest.approx(5 / 6, rel=1e-5),
        "bits_per_byte": pytest.approx(nats / math.log(2) / 10, rel=1e-5),
        "tokens": 6,
    }


@pytest.mark.parametrize("n, ctx, stride", PLANS)
def test_every_target_scored_once_with_enough_context(n, ctx, stride):
    tokens = np.arange(n, dtype=np.uint16)  # a token's id is its position
    targets, contexts = [], []
    for x, y, keep in scored_batches(tokens, ctx, stride, batch_size=3):
        assert x.shape[1] == min(ctx, n - 1)
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        rows, cols = keep.nonzero(as_tuple=True)
        targets += y[rows, cols].tolist()
        contexts += (cols + 1).tolist()
    assert targets == list(range(1, n))  # each once, in order
    for t, seen in zip(targets, contexts, strict=True):
        if t <= ctx:
            assert seen == t  # the start of the split: all the context there is
        else:
            assert seen >= ctx - stride + 1


@pytest.mark.parametrize("n, ctx, stride", PLANS)
def test_score_tokens_counts_every_target_with_its_context(n, ctx, stride):
    tokens = np.arange(n, dtype=np.uint16)
    probe = ContextProbe(n + 1, need=lambda t: torch.clamp(t, max=ctx - stride + 1))
    counts = score_tokens(probe, tokens, ctx, stride, batch_size=4)
    assert counts["tokens"] == n - 1
    assert counts["top1"] == n - 1  # every prediction had the context it needed
    # The same probe demanding full context everywhere fails wherever stride > 1 gives less.
    strict = ContextProbe(n + 1, need=lambda t: torch.clamp(t, max=ctx))
    full = score_tokens(strict, tokens, ctx, stride, batch_size=4)["top1"]
    assert (full == n - 1) == (stride == 1 or n - 1 <= ctx)


def test_window_plan_refuses_bad_strides_and_tiny_splits():
    with pytest.raises(LibrarianError, match="eval.stride"):
        window_plan(50, 8, 9)
    with pytest.raises(LibrarianError, match="eval.stride"):
        window_plan(50, 8, 0)
    with pytest.raises(LibrarianError, match="at least 2 tokens"):
        window_plan(1, 8, 1)


def test_stride_one_matches_naive_full_context_and_batching_is_invisible():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 45).astype(np.int64)
    ctx = TINY.context_length
    # Reference: every target with the longest context the model takes. The model is causal, so
    # one pass over the first ctx tokens serves targets 1..ctx; each later target gets its own row.
    with torch.no_grad():
        head = torch.log_softmax(model(torch.from_numpy(tokens[None, :ctx]))[0][0], -1)
        rows = np.stack([tokens[t - ctx : t] for t in range(ctx + 1, len(tokens))])
        tail = torch.log_softmax(model(torch.from_numpy(rows))[0][:, -1], -1)
    ref = -sum(head[t - 1, tokens[t]].item() for t in range(1, ctx + 1))
    ref -= sum(tail[i, tokens[t]].item() for i, t in enumerate(range(ctx + 1, len(tokens))))
    tokens = tokens.astype(np.uint16)
    one = score_tokens(model, tokens, ctx, 1, batch_size=64)  # no precision given: float32, the reference's
    assert one["nats"] == pytest.approx(ref, rel=1e-5)
    batched = score_tokens(model, tokens, ctx, 1, batch_size=5)
    assert metrics_from_counts(batched, 100) == metrics_from_counts(one, 100)


def full_head_counts(model, tokens, ctx, stride, batch_size) -> dict:
    """Scoring as it was before the head skipped unscored positions: logits everywhere, then the mask."""
    counts = {"nats": 0.0, "tokens": 0, "top1": 0, "top5": 0, "top10": 0}
    with torch.no_grad():
        for x, y, keep in scored_batches(tokens, ctx, stride, batch_size):
            logits = model(x)[0]
            add_counts(counts, logits[keep].float(), y[keep])
    return counts


@pytest.mark.parametrize("stride", [1, 5, 8, 16])
def test_head_on_scored_positions_only_gives_the_full_heads_metrics(stride):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, 200).astype(np.uint16)
    ours = score_tokens(model, tokens, TINY.context_length, stride, batch_size=7)
    full = full_head_counts(model, tokens, TINY.context_length, stride, batch_size=7)
    assert ours["nats"] == pytest.approx(full["nats"], rel=1e-6)
    assert metrics_from_counts(ours, 400) == metrics_from_counts(full, 400)


def test_bf16_metrics_are_within_1e3_of_float32_on_the_fixture(built_project):
    """The evaluate stage's bf16 trunk against float32 everywhere, on the fixture's trained model and real tokens."""
    from librarian.model.checkpoint import load_weights
    from librarian.data.windows import load_tokens

    model = load_weights(built_project / "data" / "model" / "model.safetensors")
    params = yaml.safe_load((built_project / "params.yaml").read_text())["eval"]
    for split in ["test", "val", "official_validation"]:
        tokens = load_tokens(built_project / "data" / "tokens" / f"{split}.bin")
        fp32, bf16 = (metrics_from_counts(score_tokens(model, tokens.tokens, model.config.context_length,
                                                       params["stride"], params["batch_size"],
                                                       precision=Precision("cpu", dtype)),
                                          tokens.meta["utf8_bytes"]) for dtype in (torch.float32, torch.bfloat16))
        assert bf16["tokens"] == fp32["tokens"] > 4000
        for key in ["loss", "top1_accuracy", "top5_accuracy", "top10_accuracy", "bits_per_byte"]:
            assert bf16[key] == pytest.approx(fp32[key], abs=1e-3), (split, key)
        # perplexity = exp(loss): 1e-3 relative (an absolute 1e-3 at perplexity ~560 would be 2e-6 relative)
        assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=1e-3), split


@pytest.mark.parametrize(("native", "amp", "expected"), [(True, True, "bf16"), (False, True, "fp32"),
                                                         (True, False, "fp32")])
def test_the_evaluate_stage_scores_in_the_policys_precision(make_params, monkeypatch, capsys, native, amp, expected):
    """eval.amp resolves as train.amp does: the bf16 trunk only where the CPU has native bf16, with
    one line where it was asked for and not used."""
    from librarian.core import precision as policy
    from librarian.evaluation import evaluate

    monkeypatch.delenv(policy.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(policy, "hardware_cpu_bf16", lambda: native)
    monkeypatch.setattr(policy, "cpu_capability", lambda: "AVX2")
    used = []
    real = evaluate.scored_logits

    def spy(model, x, y, keep, precision):
        used.append(precision.name)
        return real(model, x, y, keep, precision)

    monkeypatch.setattr(evaluate, "scored_logits", spy)
    p = evaluate.scoring_precision("cpu", make_params(**{"eval.amp": amp}), "evaluate")
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, 200).astype(np.uint16)
    score_tokens(model, tokens, TINY.context_length, 8, batch_size=7, precision=p, threads=2)
    assert p.name == expected and set(used) == {expected}
    line = "evaluate: this CPU (AVX2) has no native bf16; scoring in float32, since bf16 would be many times slower here\n"
    assert capsys.readouterr().err == (line if (amp and not native) else "")


def test_score_tokens_restores_training_mode():
    model = GPT(TINY).train()
    score_tokens(model, np.arange(20, dtype=np.uint16), 16, 8, 2)
    assert model.training


def test_metrics_refuse_empty_counts():
    with pytest.raises(LibrarianError, match="empty"):
        metrics_from_counts({"nats": 0.0, "tokens": 0, "top1": 0, "top5": 0, "top10": 0}, 10)


# --- evaluate_model end to end on a tiny real GPT -------------------------------------------------


def write_split(tokens_dir, split, tokens, vocab_size=64, utf8_bytes=None):
    write_tokens(tokens_dir, split, tokens, vocab_size, utf8_bytes)


@pytest.fixture
def setup(tmp_path, make_params):
    torch.manual_seed(0)
    model = GPT(TINY)
    save_weights(model, tmp_path / "model.safetensors")
    rng = np.random.default_rng(1)
    for split, n in [("train", 80), ("val", 40), ("test", 60)]:
        write_split(tmp_path / "tokens", split, rng.integers(0, 64, n))
    params = make_params(**{"model.context_length": 16, "eval.stride": 8, "train.stride": 16, "eval.batch_size": 4})
    return tmp_path, model, params


def test_evaluate_model_end_to_end(setup):
    tmp_path, model, params = setup
    result = evaluate_model(tmp_path / "model.safetensors", tmp_path / "tokens", params)
    assert set(result) == METRIC_KEYS | {"val", "n_params"}
    assert set(result["val"]) == METRIC_KEYS
    assert result["n_params"] == model.n_params() == sum(p.numel() for p in model.parameters())
    assert (result["tokens"], result["val"]["tokens"]) == (59, 39)
    # An untrained model is close to uniform over the 64 ids.
    assert result["loss"] == pytest.approx(math.log(64), rel=0.05)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-5)
    assert 0 <= result["top1_accuracy"] <= result["top5_accuracy"] <= result["top10_accuracy"] <= 1
    counts = score_tokens(model, np.fromfile(tmp_path / "tokens" / "test.bin", np.uint16), 16, 8, 4,
                          precision=resolve_precision("cpu", params.eval.amp))  # the stage's precision
    assert {k: result[k] for k in METRIC_KEYS} == metrics_from_counts(counts, 4 * 60)
    again = evaluate_model(tmp_path / "model.safetensors", tmp_path / "tokens", params)
    assert json.dumps(again, sort_keys=True) == json.dumps(result, sort_keys=True)

    write_split(tmp_path / "tokens", "official_validation", np.arange(30) % 64)
    result = evaluate_model(tmp_path / "model.safetensors", tmp_path / "tokens", params)
    assert set(result["official_validation"]) == METRIC_KEYS
    assert result["official_validation"]["tokens"] == 29


def test_evaluate_model_refuses_mismatched_tokens(setup):
    tmp_path, _, params = setup
    model_path, tokens_dir = tmp_path / "model.safetensors", tmp_path / "tokens"
    write_split(tokens_dir, "test", np.arange(30), vocab_size=100)
    with pytest.raises(LibrarianError, match="vocab of 100 but the model has 64"):
        evaluate_model(model_path, tokens_dir, params)
    write_split(tokens_dir, "test", np.arange(30) + 50)
    with pytest.raises(LibrarianError, match="token id 79"):
        evaluate_model(model_path, tokens_dir, params)


def test_evaluate_model_uses_the_checkpoints_context(setup, make_params):
    tmp_path, _, _ = setup
    # params may say context 32, but this checkpoint has 16: a stride of 24 would skip tokens.
    params = make_params(**{"model.context_length": 32, "eval.stride": 24, "train.stride": 32})
    with pytest.raises(LibrarianError, match="exceeds the model's context length"):
        evaluate_model(tmp_path / "model.safetensors", tmp_path / "tokens", params)


def test_stage_writes_sorted_json(setup, raw_params, capsys):
    tmp_path, _, _ = setup
    for dotted, value in {"model.context_length": 16, "eval.stride": 8, "train.stride": 16}.items():
        set_dotted(raw_params, dotted, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    out = tmp_path / "metrics" / "metrics.json"
    params_file = tmp_path / "params.yaml"
    evaluate_stage(
        [str(tmp_path / "model.safetensors"), str(tmp_path / "tokens"), str(out), "--params", str(params_file)]
    )
    text = out.read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert "evaluate: test loss" in capsys.readouterr().out
    evaluate_stage(
        [str(tmp_path / "model.safetensors"), str(tmp_path / "tokens"), str(out), "--params", str(params_file)]
    )
    assert out.read_text() == text  # same inputs, same bytes


@pytest.mark.parametrize("setting", [2, 0])
def test_stage_scores_on_eval_threads(setup, raw_params, monkeypatch, setting):
    import librarian.evaluation.evaluate
    from librarian.core.threads import MAX_AUTO_THREADS, available_cores

    tmp_path, _, _ = setup
    overrides = {"model.context_length": 16, "eval.stride": 8, "train.stride": 16, "eval.threads": setting}
    for dotted, value in overrides.items():
        set_dotted(raw_params, dotted, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    seen, real = [], librarian.evaluation.evaluate.score_tokens

    def spy(*args, threads, **kwargs):
        seen.append(threads)
        return real(*args, threads=threads, **kwargs)

    monkeypatch.setattr(librarian.evaluation.evaluate, "score_tokens", spy)
    evaluate_stage([str(tmp_path / "model.safetensors"), str(tmp_path / "tokens"),
                    str(tmp_path / "metrics" / "metrics.json"), "--params", str(tmp_path / "params.yaml")])
    # auto: whole batches in parallel pay at any model size, so one thread per core
    expected = setting or min(available_cores(), MAX_AUTO_THREADS)
    assert seen == [expected, expected]  # test and val


def test_scoring_threads_change_neither_the_sums_nor_the_process_threads():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, 900).astype(np.uint16)
    before = torch.get_num_threads()
    one = score_tokens(model, tokens, TINY.context_length, 8, batch_size=3, threads=1)
    for threads in (2, 5):
        assert score_tokens(model, tokens, TINY.context_length, 8, batch_size=3, threads=threads) == one
    assert torch.get_num_threads() == before

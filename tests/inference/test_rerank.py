"""Best of n, ranked by the request: the likelihood ratio, and chat's --best-of."""

import io
from dataclasses import replace

import pytest
import torch

from librarian.core.errors import LibrarianError
from librarian.inference.chat import ChatSession, run_chat, strip_controls
from librarian.inference.generate import GenerationOptions, Generator, nth_seed
from librarian.inference.rerank import best_by_request, log_likelihood, request_gain
from tests.helpers import tiny_config

SAMPLING = GenerationOptions(temperature=1.0, max_new_tokens=10, seed=11)


@pytest.fixture(scope="module")
def wide(tiny):
    """The tiny tokenizer with a context of 128 tokens and random weights."""
    from librarian.model.gpt import GPT

    gen = Generator.load(*tiny)
    torch.manual_seed(0)
    return Generator(GPT(tiny_config(vocab_size=gen.model.config.vocab_size, context_length=128)).eval(),
                     gen.tokenizer)


def step_by_step(model, prompt, continuation) -> float:
    """log p(continuation | prompt), one token at a time: a pass per token, the last position's logits."""
    total = 0.0
    with torch.no_grad():
        for i, token in enumerate(continuation):
            logits, _ = model(torch.tensor([prompt + continuation[:i]]))
            total += logits[0, -1].float().log_softmax(-1)[token].item()
    return total


def test_log_likelihood_is_the_sum_of_each_tokens_log_probability(wide):
    prompt, continuation = wide.encode("User: Tell me a story.\nAssistant:"), wide.encode(" Once there was a cat.")
    assert log_likelihood(wide.model, prompt, continuation) == pytest.approx(
        step_by_step(wide.model, prompt, continuation), abs=1e-3)
    with pytest.raises(ValueError, match="cannot be scored"):
        log_likelihood(wide.model, prompt, [])


def test_request_gain_is_the_ratio_on_the_same_reply_tokens(wide):
    model = wide.model
    prompt, negative = wide.encode("User: Tell me a story about Tom.\nAssistant:"), wide.encode("User: Hi.\nAssistant:")
    reply = wide.encode(" Tom went to the park.")
    assert request_gain(model, prompt, negative, reply) == pytest.approx(
        step_by_step(model, prompt, reply) - step_by_step(model, negative, reply), abs=1e-3)
    # A reply too long for the context is cut to what fits after the longer prompt, for both.
    long = reply * 40
    room = model.config.context_length - len(prompt)
    assert request_gain(model, prompt, negative, long) == pytest.approx(
        request_gain(model, prompt, negative, long[:room]), abs=1e-4)


def test_best_by_request_keeps_the_highest_gain_and_the_first_on_a_tie(wide, monkeypatch):
    import librarian.inference.rerank as rerank

    gains = iter([0.5, 2.0, 2.0, -1.0])
    monkeypatch.setattr(rerank, "request_gain", lambda *args: next(gains))
    assert best_by_request(wide.model, [1], [2], [[3]] * 4) == 1


def test_best_of_one_is_the_plain_reply(wide):
    plain = ChatSession(wide, SAMPLING)
    best = ChatSession(wide, SAMPLING)
    assert best.best_reply("Tell me a story about Tom.", 1) == "".join(plain.reply("Tell me a story about Tom."))
    assert best.history == plain.history and best.replies == plain.replies == 1


def test_best_of_n_keeps_the_candidate_the_request_explains_best(wide):
    message = "Tell me a story about Tom."
    session = ChatSession(wide, SAMPLING)
    session.best_reply("Hi.", 2)  # a first turn: the second reply's seed and prompt carry it
    history, seed = list(session.history), nth_seed(SAMPLING.seed, session.replies)
    best = session.best_reply(message, 3)

    prompt = wide.encode(session_prompt(wide, history, message))
    negative = wide.encode(session_prompt(wide, history, "Tell me a story."))
    candidates = [wide.complete(wide.decode(prompt), replace(SAMPLING, seed=nth_seed(seed, j)), ("User:",))
                  for j in range(3)]
    gains = [request_gain(wide.model, prompt, negative, wide.encode(c)) for c in candidates]
    assert len(set(candidates)) > 1  # random weights at temperature 1: three different replies
    assert best == candidates[gains.index(max(gains))]
    assert session.history[-1].assistant == best.strip() and session.replies == 2


def session_prompt(gen, history, message):
    session = ChatSession(gen, SAMPLING)
    session.history = list(history)
    return session.build_prompt(message)[0]


@pytest.mark.parametrize("n", [0, -2, True, 1.5])
def test_best_of_must_be_a_whole_number_of_one_or_more(wide, n):
    with pytest.raises(LibrarianError, match=r"--best-of must be a whole number >= 1"):
        ChatSession(wide, SAMPLING, best_of=n)


def test_chat_shows_the_best_reply_whole(wide):
    out = io.StringIO()
    lines = iter(["Tell me a story about Tom."])

    def input_fn(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert run_chat(wide, SAMPLING, input_fn=input_fn, output=out, best_of=3) == 0
    expected = strip_controls(ChatSession(wide, SAMPLING).best_reply("Tell me a story about Tom.", 3)).strip()
    assert "best of 3 by the request" in out.getvalue()
    assert f"Assistant: {expected}\n" in out.getvalue()

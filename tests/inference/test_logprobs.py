"""librarian/inference/logprobs.py on its own: token bytes, texts and offsets against the tokenizer's own decoding."""

from __future__ import annotations

import random

import pytest
import torch

from librarian.inference.logprobs import TokenLog, TokenTexts, token_scores, token_text
from tests.helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("logprobs") / "tokenizer.json")


@pytest.fixture(scope="module")
def texts(tokenizer):
    return TokenTexts(tokenizer)


def test_every_tokens_bytes_decode_as_the_tokenizer_decodes_it(tokenizer, texts):
    ids = list(range(tokenizer.get_vocab_size()))
    assert len(set(texts.bytes)) == len(ids)  # distinct tokens, distinct bytes: completions' top_logprobs keys
    assert len(set(texts.texts)) == len(ids)
    for i in ids:
        alone = tokenizer.decode([i], skip_special_tokens=False)
        assert texts.bytes[i].decode("utf-8", errors="replace") == alone, i
        assert texts.texts[i] == (alone if "\ufffd" not in alone else token_text(texts.bytes[i]))
    split = next(i for i in ids if texts.texts[i].startswith("bytes:"))
    assert texts.texts[split] == "bytes:" + "".join(f"\\x{b:02x}" for b in texts.bytes[split])


def test_offsets_count_the_characters_of_the_decoded_text_before_each_token(tokenizer, texts):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randrange(1, 12))]
        log = TokenLog([(0.0, [])] * len(ids), texts)
        for token in ids:
            log.push(token)
        for i, entry in enumerate(log.take()):
            first = texts.bytes[ids[i]][:1]
            if first and not 0x80 <= first[0] <= 0xBF:  # it begins a character (or a byte that is none)
                assert entry.offset == len(tokenizer.decode(ids[:i], skip_special_tokens=False)), (ids, i)


def test_take_hands_out_each_token_once_and_only_those_before_a_point():
    texts = type("Texts", (), {"bytes": [b"ab", b"c", b"de"]})()
    log = TokenLog([(-1.0, []), (-2.0, []), (-3.0, [])], texts)
    for token in (0, 1, 2):
        log.push(token)
    assert [e.offset for e in log.take(3)] == [0, 2]
    assert log.take(3) == [] and [e.logprob for e in log.take()] == [-3.0]


def test_scores_are_the_raw_logits_log_softmax_and_the_likeliest_first():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    logprob, top = token_scores(logits, 2, 3)
    expected = torch.log_softmax(logits, -1)
    assert logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in top] == [1, 2, 0] and [v for _, v in top] == pytest.approx(expected[[1, 2, 0]].tolist())
    assert token_scores(logits, 0, 0)[1] == []

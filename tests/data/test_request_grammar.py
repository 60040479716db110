"""The request grammar: hundreds of well-formed phrasings, and held-out families no train request uses."""

from __future__ import annotations

import re
import string

import pytest

import librarian.data.chat_data as chat_data
from librarian.data import request_grammar
from librarian.data.chat_data import HELD_OUT, TEMPLATES, disjoint, phrased_by
from librarian.data.request_grammar import FIRST, TRAIN, asking, phrasings

FIELDS = {"words": {"words"}, "character": {"name", "a", "kind"}, "opening": {"opening"}, "plain": set()}


def test_the_grammar_makes_hundreds_of_phrasings():
    assert sum(map(len, TEMPLATES.values())) >= 300
    assert sum(map(len, HELD_OUT.values())) >= 200
    assert len(TEMPLATES["words"]) == len(TRAIN.openers) * len(TRAIN.forms) * (
        len(TRAIN.words_inline) + len(TRAIN.words_sentence))
    for templates in (TEMPLATES, HELD_OUT):
        for kind, phrased in templates.items():
            assert len(set(phrased)) == len(phrased), kind


def test_each_kind_starts_with_the_issues_own_phrasing():
    assert {kind: TEMPLATES[kind][0] for kind in TEMPLATES} == FIRST


@pytest.mark.parametrize("which", ["train", "held_out"])
def test_every_phrasing_is_a_well_formed_request(which):
    templates = TEMPLATES if which == "train" else HELD_OUT
    for kind, phrased in templates.items():
        for template in phrased:
            fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
            assert fields <= FIELDS[kind], template
            assert kind == "plain" or fields, template  # a request that asks for something names it
            assert template[0].isupper() or template.startswith("{"), template
            assert re.search(r"[.?!]$|\{opening\}$", template), template
            assert "  " not in template and " ," not in template and " ." not in template, template


def test_held_out_families_share_no_opener_and_no_listing_or_naming_form_with_train():
    held = request_grammar.HELD_OUT
    for family in ("openers", "words_inline", "words_sentence", "character_inline", "character_sentence", "opening"):
        assert not set(getattr(TRAIN, family)) & set(getattr(held, family)), family
    # And no opener's start is another's: a held-out request never begins like a train one.
    starts = {o.split("{")[0] for o in TRAIN.openers}
    assert not any(o.split("{")[0].startswith(s) or s.startswith(o.split("{")[0]) for o in held.openers for s in starts)


def test_no_held_out_phrasing_reads_as_a_train_one():
    assert disjoint()
    probe = {"words": "w1, w2 and w3", "name": "Name", "a": "a", "kind": "cat", "opening": "It began."}
    for kind in TEMPLATES:
        filled = [t.format(**probe) for t in HELD_OUT[kind]]
        assert not any(phrased_by(r, TEMPLATES) for r in filled), kind


def test_the_disjointness_check_fails_when_a_held_out_family_leaks_into_train(monkeypatch):
    leaked = {**TEMPLATES, "words": (*TEMPLATES["words"], HELD_OUT["words"][5])}
    monkeypatch.setattr(chat_data, "TEMPLATES", leaked)
    assert not disjoint()


def test_a_held_out_request_keeps_what_it_asks_for():
    import numpy as np

    rng = np.random.default_rng(3)
    for _ in range(50):
        request = chat_data.held_out_request("words", ["ball", "jump", "happy"], None, rng)
        assert all(w in request for w in ("ball", "jump", "happy")) and phrased_by(request, HELD_OUT)
        named = chat_data.held_out_request("character", [], ("Max", "dog"), rng)
        assert "Max" in named and not phrased_by(named, TEMPLATES)


def test_asking_puts_the_detail_in_the_sentence_or_after_it():
    grammar = request_grammar.Families(openers=("Tell me {what}.",), forms=("a tale",), words_inline=("with {words}",),
                                       words_sentence=("Use {words}.",), character_inline=(), character_sentence=(),
                                       opening=())
    assert asking(grammar, grammar.words_inline, grammar.words_sentence) == [
        "Tell me a tale with {words}.", "Tell me a tale. Use {words}."]
    assert phrasings(grammar)["plain"] == ("Tell me a tale.",)

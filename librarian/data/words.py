"""The lexicon: which words of a story are nouns, verbs and adjectives, and whether a text mentions a word.

TinyStories' own generation prompts asked for a story that uses one given noun, one verb and one
adjective; the chat data's `words` requests ask the same of the fine-tuned model, with words drawn
from the story that answers them, and evaluate_chat checks the model's replies with `mentions`.

The lexicon is lemminflect's (its tables ship in its wheel: no network, no model): a word's parts of
speech and lemmas (getAllLemmas), and the inflections of a lemma (getAllInflections).
"""

from __future__ import annotations

import re
from functools import lru_cache

import lemminflect

NOUN, VERB, ADJECTIVE = "NOUN", "VERB", "ADJ"
PARTS_OF_SPEECH = (NOUN, VERB, ADJECTIVE)

# Words: runs of ASCII letters, so "dog's" holds "dog" and "ball-shaped" "ball".
_WORD = re.compile(r"[A-Za-z]+")
MIN_LETTERS = 3

# Lemmas lemminflect tags unambiguously but that do grammar rather than carry a story: a request for
# them tests nothing. The verbs of speech and motion every story uses ("said", "went", "got"),
# "named", which introduces nearly every character, determiner-like nouns and adjectives ("other",
# "same", "lot", "way"), and "day", which "One day" puts in most stories. (be, have, do, can, will
# are also tagged AUX, so the one-part-of-speech rule skips them already.)
STOP_LEMMAS = frozenset({
    "be", "have", "do", "say", "get", "go", "make", "let", "name",
    "other", "own", "such", "same", "few", "able", "lot", "way", "thing", "nothing", "day",
})


def tokens(text: str) -> list[str]:
    """The words of `text`, as written."""
    return _WORD.findall(text)


@lru_cache(maxsize=None)
def word_forms(word: str) -> frozenset[str]:
    """`word` lowercased, its lemmas and every inflection of those lemmas: "jumped" -> {jump, jumps, jumped, ...}.

    A word lemminflect does not know is only itself.
    """
    word = word.lower()
    forms = {word}
    for lemmas in lemminflect.getAllLemmas(word).values():
        for lemma in lemmas:
            forms.add(lemma.lower())
            for inflections in lemminflect.getAllInflections(lemma).values():
                forms.update(form.lower() for form in inflections)
    return frozenset(forms)


def mentions(text: str, word: str) -> bool:
    """True when any form of `word` occurs in `text` as a whole word, in any case ("Jumped" for "jump",
    not "ballet" for "ball")."""
    return not word_forms(word).isdisjoint(_WORD.findall(text.lower()))


@lru_cache(maxsize=None)
def content_lemma(word: str) -> tuple[str, str] | None:
    """(part of speech, lemma) of a lowercase word that is unambiguously one noun, verb or adjective, else None.

    Unambiguous means lemminflect gives it exactly one part of speech, of all it knows (so "play",
    noun and verb, and "very", adjective and adverb, are skipped: a request must name a word whose
    part is clear), exactly one lemma, and the lemma has inflections of that part: lemminflect's
    lemma table also lists pronouns and determiners ("they", "something") as nouns, its inflection
    table does not.
    """
    if len(word) < MIN_LETTERS or not (word.isalpha() and word.isascii() and word.islower()):
        return None
    parts = lemminflect.getAllLemmas(word)
    if len(parts) != 1:
        return None
    ((part, lemmas),) = parts.items()
    if part not in PARTS_OF_SPEECH or len(lemmas) != 1:
        return None
    lemma = lemmas[0].lower()
    if lemma in STOP_LEMMAS or not lemminflect.getAllInflections(lemma, upos=part):
        return None
    # A request for the lemma is checked with mentions(): the story's own form must count for it.
    if word not in word_forms(lemma):
        return None
    return part, lemma


def can_be_noun(word: str) -> bool:
    """True when lemminflect knows `word` as a noun, among other parts it may be ("cat", "dog")."""
    return NOUN in lemminflect.getAllLemmas(word)


def content_words(text: str) -> dict[str, list[str]]:
    """The lemmas of `text`'s unambiguous nouns, verbs and adjectives, each list sorted (a stable order to draw from).

    Only words written in lowercase count, and none whose capitalised form is a name in the text
    (written capitalised mid-sentence): "Lily" is a name, not a flower. A lemma found as two parts
    (from two of its forms) is ambiguous in this text and left out. mentions(text, lemma) holds for each.
    """
    names = {token.lower() for token in capitalised_mid_sentence(text)}
    found: dict[str, set[str]] = {part: set() for part in PARTS_OF_SPEECH}
    for word in set(tokens(text)) - names:
        tagged = content_lemma(word)
        if tagged:
            found[tagged[0]].add(tagged[1])
    twice = {lemma for part in PARTS_OF_SPEECH for other in PARTS_OF_SPEECH if part < other
             for lemma in found[part] & found[other]}
    return {part: sorted(lemmas - twice) for part, lemmas in found.items()}


# A capitalised word right after a lowercase letter, a digit or , ; : (and spaces): not the start of a sentence.
_MID_SENTENCE_CAPITAL = re.compile(r"(?<=[a-z0-9,;:])\s+([A-Z][a-z]+)\b")


def capitalised_mid_sentence(text: str) -> list[str]:
    """Capitalised words where no sentence starts: names ("said Tom", "Lily and Tom", "Hi, Sue")."""
    return _MID_SENTENCE_CAPITAL.findall(text)

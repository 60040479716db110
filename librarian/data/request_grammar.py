"""Requests in any words: the small grammar that phrases chat requests, and the families it holds out.

A request is an opener, the frame around what is asked for ("Tell me {what}.", "Could you make up
{what}?"), and what is asked for: a form ("a story", "a tale", ...) and, for words and character
requests, how the words are listed or the character named, either in the same sentence ("... with
the words X, Y and Z in it", "... starring a dog called Max") or in a second one ("Use the words X, Y
and Z."). Openings have frames of their own around the story's first sentence.

Two sets of families, disjoint: train conversations are phrased from TRAIN only, and the held-out
tables (val_unseen, test_unseen) from HELD_OUT only, so a held-out request has an opener *and* a
listing or naming form that no train request ever used. `*_unseen` then measures phrasings the model
never met, not near neighbours of the trained ones. A test checks that no held-out phrasing, filled
in, reads as a train one.

Why a grammar: a model fine-tuned on three ways to ask for words learns those three ways. Multiplied
out, the families give hundreds of phrasings (counts in docs/chat.md).
"""

from __future__ import annotations

from dataclasses import dataclass

# The request every kind's list starts with (the issue's own phrasings): chat_template's
# NEUTRAL_REQUEST is the first plain one, and the docs quote these.
FIRST = {
    "words": "Write a story that uses the words {words}.",
    "character": "Tell me a story about {name}.",
    "opening": "Continue this story: {opening}",
    "plain": "Tell me a story.",
}


@dataclass(frozen=True)
class Families:
    """One set of phrasing families. {what} is the form and its detail; the fields of chat_data fill the rest."""

    openers: tuple[str, ...]
    forms: tuple[str, ...]
    words_inline: tuple[str, ...]  # after the form, in the opener's sentence
    words_sentence: tuple[str, ...]  # a second sentence after the opener's
    character_inline: tuple[str, ...]
    character_sentence: tuple[str, ...]
    opening: tuple[str, ...]  # whole requests around {opening}


FORMS = ("a story", "a short story", "a little story", "a tale")

TRAIN = Families(
    openers=("Tell me {what}.", "Write {what}.", "Can you tell me {what}?", "Can you write {what}?",
             "Please write {what}.", "I would like {what}.", "Write me {what}, please."),
    forms=FORMS,
    words_inline=("that uses the words {words}", "with the words {words} in it", "using the words {words}",
                  "with these words: {words}"),
    words_sentence=("Use the words {words}.", "It should have the words {words} in it."),
    character_inline=("about {name}", "about {a} {kind} named {name}", "starring {name}",
                      "starring {a} {kind} called {name}"),
    character_sentence=("It should be about {name}.",),
    opening=("Continue this story: {opening}", "Continue this tale: {opening}", "Finish this story: {opening}",
             "Here is the start of a story: {opening} Please go on.",
             "Here is the start of a tale: {opening} Please finish it."),
)

HELD_OUT = Families(
    openers=("Could you make up {what}?", "I'd love {what}.", "Hey, tell me {what}!", "How about {what}?",
             "Invent {what}, please."),
    forms=FORMS,
    words_inline=("where {words} all show up", "featuring {words}", "that includes {words}"),
    words_sentence=("Make sure {words} are in it.", "Please work in {words}."),
    character_inline=("whose main character is {name}", "where the hero is {a} {kind} called {name}",
                      "in which {name} is the hero"),
    character_sentence=("The hero should be {name}.", "Make {name} the main character."),
    opening=("Go on with this story: {opening}", "Keep going with this tale: {opening}",
             "Here is how my story begins: {opening} What happens next?",
             "Pick up this story where it stops: {opening}"),
)


def _framed(opener: str, what: str) -> str:
    # replace, not format: `what` holds the fields ({words}) that chat_data fills later.
    return opener.replace("{what}", what)


def asking(families: Families, inline: tuple[str, ...], sentence: tuple[str, ...]) -> list[str]:
    """Every opener x form x detail, the detail in the opener's sentence or in a second one."""
    return [*(_framed(o, f"{form} {detail}") for o in families.openers for form in families.forms for detail in inline),
            *(f"{_framed(o, form)} {s}" for o in families.openers for form in families.forms for s in sentence)]


def _own_first(kind: str, phrasings: list[str]) -> tuple[str, ...]:
    first = FIRST[kind]
    return (first, *(p for p in phrasings if p != first)) if first in phrasings else tuple(phrasings)


def phrasings(families: Families) -> dict[str, tuple[str, ...]]:
    """Every phrasing of every kind the families make, in chat_data's REQUEST_KINDS order."""
    made = {
        "words": asking(families, families.words_inline, families.words_sentence),
        "character": asking(families, families.character_inline, families.character_sentence),
        "opening": list(families.opening),
        "plain": [_framed(o, form) for o in families.openers for form in families.forms],
    }
    return {kind: _own_first(kind, list(dict.fromkeys(made[kind]))) for kind in made}

"""The chat_data stage: conversations built from the clean stories, every reply a real story.

Each story of a split answers exactly one request, of a kind dealt by the seed with the shares of
params.chat_data.mix:

- words: "Write a story that uses the words ball, jump and happy.": one noun, one verb and one
  adjective drawn from the story (librarian/data/words.py), as TinyStories' own prompts asked;
- character: "Tell me a story about Tom." (or "... about a cat named Tom." when the story says so);
- opening: "Continue this story: <its first sentence>", answered by the rest of the story;
- plain: "Tell me a story."

Each kind gets its share of the split's stories (rounded), drawn at random among the stories that
can carry it: not without a name, without a noun, a verb and an adjective to ask for, or without a
second sentence (see assign_kinds). Only when too few stories can carry a kind do the realised
counts fall short of the mix; metrics/chat_data.json holds them. A kind with a share that gets no
story in some split (a tiny share of a small split) is an error: fine-tuning and evaluation expect it.

A share params.chat_data.multi_turn of the conversations has two turns: first another story of the
same split with its own request, then this story's. Splits are built from their own stories only,
each with its own seeded stream, so no story crosses into another split's conversations.

**Variants.** With params.chat_data.variants = V > 1, the train split is built V times from its own
stories, each time with a seeded stream of its own: other kinds, other words, other phrasings and
other pairs of turns. train.parquet is variant 0 (fine-tuning's data, the same bytes whatever V);
train-v1.parquet ... train-v{V-1}.parquet are the others. Pretraining on conversations
(train.chat_share, librarian/data/chat_tokens.py) uses variant epoch mod V in each epoch, so the model
never sees one fixed request per story.

**Held-out phrasings.** val_unseen.parquet and test_unseen.parquet hold the val and test
conversations row for row, with every request phrased by a template of HELD_OUT instead: phrasings
that no train conversation uses, so that evaluate_chat measures whether the model follows a request
rather than recognising a template.

**Memory.** The stage streams: at no point does it hold a split's stories, requests or table. Pass 1
reads the split a batch at a time (io.READ_BATCH_STORIES) and keeps what each story offers each
kind on disk, and in memory only which kinds it can carry; the kinds are then dealt, and each table
(a split, or a train variant) is built in story order, as the seeded stream must draw, and spilled;
an external sort (librarian/data/external_sort.py) puts its rows into conversation order, SORT_BUCKET_ROWS
at a time, into the parquet writer. Memory is a batch, a bucket and some 40 bytes a story (the kinds
each story can carry, its kind in each table, its place in the table being built). The temporary
files live in the output's atomic_dir: a failure or a kill leaves nothing behind. build_split is the
same table built in memory from a list of stories.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import string
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from librarian.core.config import REQUEST_KINDS, ChatDataParams, Params
from librarian.core.errors import LibrarianError
from librarian.core.io import atomic_dir, open_stories, story_batches, write_json
from librarian.core.rng import rng_for
from librarian.data import request_grammar, words
from librarian.data.external_sort import PositionSort, Spill, table_writer
from librarian.data.request_grammar import phrasings

SPLITS = ("train", "val", "test")

# Every phrasing of every kind, from the request grammar (librarian/data/request_grammar.py): a
# template is used only when the story gives all its fields ({kind}: the story says "a cat named Tom").
# Train conversations are phrased by TEMPLATES; the *_unseen tables by HELD_OUT, families of openers
# and of listing and naming forms that no train request uses.
TEMPLATES: dict[str, tuple[str, ...]] = phrasings(request_grammar.TRAIN)
HELD_OUT: dict[str, tuple[str, ...]] = phrasings(request_grammar.HELD_OUT)
UNSEEN = "_unseen"  # val_unseen.parquet, test_unseen.parquet
HELD_OUT_SPLITS = ("val", "test")

# The table's columns, in this order and with these types: the same inputs give the same bytes.
SCHEMA = pa.schema([
    ("conversation", pa.int64()),
    ("turn", pa.int64()),
    ("kind", pa.string()),
    ("request", pa.string()),
    ("reply", pa.string()),
    ("words", pa.list_(pa.string())),
    ("character", pa.string()),
    ("story", pa.int64()),
])


@dataclass(frozen=True)
class Request:
    """A request and the reply that truly answers it."""

    kind: str
    request: str
    reply: str
    words: list[str] = field(default_factory=list)  # words requests: in the order the request names them
    character: str = ""  # character requests: the name


@functools.cache
def _fields(template: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


@functools.cache
def _usable(kind: str, given: frozenset[str], held_out: bool) -> tuple[str, ...]:
    # Cached: a few hundred templates, asked of for every story of every table.
    return tuple(t for t in (HELD_OUT if held_out else TEMPLATES)[kind] if _fields(t) <= given)


def _phrase(kind: str, rng: np.random.Generator, /, held_out: bool = False, **values: str) -> str:
    """One of the kind's templates (HELD_OUT's if `held_out`) whose fields are all given, drawn by `rng`, filled in."""
    usable = _usable(kind, frozenset(values), held_out)
    return usable[rng.integers(len(usable))].format(**values)


@functools.cache
def template_pattern(template: str) -> re.Pattern:
    """A regex that matches exactly the requests `template` can phrase, whatever fills its fields."""
    parts = [re.escape(literal) + ("(.+)" if name else "")
             for literal, name, _, _ in string.Formatter().parse(template)]
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def phrased_by(request: str, templates: dict[str, tuple[str, ...]]) -> bool:
    """Whether some template of `templates` phrases `request`."""
    return any(template_pattern(t).match(request) for kind in templates for t in templates[kind])


def disjoint() -> bool:
    """No held-out template's filled-in text can be a training template's (with any field values), nor the
    reverse. A test checks it: at some 100,000 regex matches it costs too much at every import."""
    probe = {"words": "w1, w2 and w3", "name": "Name", "a": "a", "kind": "cat", "opening": "It began."}
    return not any(phrased_by(t.format(**probe), other) for one, other in ((HELD_OUT, TEMPLATES), (TEMPLATES, HELD_OUT))
                   for kind in one for t in one[kind] if _fields(t) <= probe.keys())


assert tuple(HELD_OUT) == tuple(TEMPLATES)


# --- what a story offers each kind ---------------------------------------------------------------

# "a cat named Tom", "A little girl named Lily", "the old man named Joe": the noun right before
# "named" is what the character is.
_NAMED = re.compile(r"\b(?:[Aa]n?|[Tt]he)\s+(?:[a-z]+,?\s+){0,3}?([a-z]+)\s+named\s+([A-Z][a-z]+)\b")
# Capitalised mid-sentence, yet roles rather than names: "said Mom" is not a story about someone named Mom.
TITLES = frozenset({"Mom", "Mommy", "Mum", "Mummy", "Mama", "Dad", "Daddy", "Papa", "Grandma", "Grandpa",
                    "Granny", "Mr", "Mrs", "Ms", "Miss", "Sir", "God"})
# A name seen once is a passing mention ("at Ben's house"), not whom the story is about.
MIN_NAME_COUNT = 2


def _count(story: str, name: str) -> int:
    return len(re.findall(rf"\b{re.escape(name)}\b", story))


def main_character(story: str) -> tuple[str, str] | None:
    """(name, what the character is, or "") of the story's main character, or None if it has none.

    "named X" is the strongest evidence: the story introduces X. Without it, a name is a capitalised
    word seen mid-sentence ("said Tom", "Lily and Tom"), never written in lowercase in the story, not
    a role such as Mom, and seen at least twice. Of several, the most frequent is the main character
    (the earliest on a tie).
    """
    named: dict[str, str] = {}
    for match in _NAMED.finditer(story):
        kind, name = match.groups()
        if name not in TITLES and words.can_be_noun(kind):
            named.setdefault(name, kind)
    if named:
        candidates = list(named)
    else:
        lowercase = {token for token in words.tokens(story) if token.islower()}
        candidates = [name for name in dict.fromkeys(words.capitalised_mid_sentence(story))
                      if name not in TITLES and name.lower() not in lowercase and _count(story, name) >= MIN_NAME_COUNT]
    if not candidates:
        return None
    name = max(candidates, key=lambda n: (_count(story, n), -story.find(n)))
    return name, named.get(name, "")


# The first sentence: on the first line, ending in . ! ? (with a closing quote, if any) where the next
# sentence starts with a capital or a quote, and not at a title's dot ("Mr. Brown").
_FIRST_SENTENCE = re.compile(
    r"""([^\n]*?(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)[.!?]+["']?)\s+(?=["'A-Z])(.+)""", re.DOTALL)


def split_opening(story: str) -> tuple[str, str] | None:
    """(first sentence, rest of the story), or None for a story of one sentence."""
    match = _FIRST_SENTENCE.match(story)
    if not match:
        return None
    opening, rest = match.group(1).strip(), match.group(2).strip()
    return (opening, rest) if opening and rest else None


def story_words(story: str, within: int = 0) -> dict[str, list[str]] | None:
    """The story's nouns, verbs and adjectives to ask for, or None if it lacks one of the three.

    With `within`, only words its first `within` words mention: a model with a short context
    writes the start of a story while the request is still in view, and learns from these
    conversations to use the words there (parts of speech are still judged on the whole story).
    """
    found = words.content_words(story)
    if within:
        head = " ".join(story.split()[:within])
        found = {part: [lemma for lemma in lemmas if words.mentions(head, lemma)] for part, lemmas in found.items()}
    return found if all(found[part] for part in words.PARTS_OF_SPEECH) else None


def offers(story: str, words_within: int = 0) -> dict[str, object]:
    """What the story gives each kind of request to ask for; None where it cannot carry that kind."""
    return {"words": story_words(story, words_within), "character": main_character(story),
            "opening": split_opening(story), "plain": story}


# --- requests -----------------------------------------------------------------------------------


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def listed(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} and {names[-1]}"


def character_fields(character: tuple[str, str]) -> dict[str, str]:
    name, kind = character
    return {"name": name, "kind": kind, "a": article(kind)} if kind else {"name": name}


def words_request(story: str, found: dict[str, list[str]], rng: np.random.Generator) -> Request:
    """One noun, one verb and one adjective of the story, named in random order."""
    chosen = [found[part][rng.integers(len(found[part]))] for part in words.PARTS_OF_SPEECH]
    ordered = [chosen[i] for i in rng.permutation(len(chosen))]
    return Request("words", _phrase("words", rng, words=listed(ordered)), story, words=ordered)


def character_request(story: str, character: tuple[str, str], rng: np.random.Generator) -> Request:
    return Request("character", _phrase("character", rng, **character_fields(character)), story,
                   character=character[0])


def opening_request(story: str, parts: tuple[str, str], rng: np.random.Generator) -> Request:
    opening, rest = parts
    return Request("opening", _phrase("opening", rng, opening=opening), rest)


def plain_request(story: str, _: object, rng: np.random.Generator) -> Request:
    return Request("plain", _phrase("plain", rng), story)


def held_out_request(kind: str, asked_words: list[str], offer: object, rng: np.random.Generator) -> str:
    """The same request (the same words, character or opening) in a held-out phrasing."""
    values = {"words": lambda: {"words": listed(list(asked_words))}, "character": lambda: character_fields(offer),
              "opening": lambda: {"opening": offer[0]}, "plain": dict}[kind]()
    return _phrase(kind, rng, held_out=True, **values)


BUILDERS = {"words": words_request, "character": character_request, "opening": opening_request,
            "plain": plain_request}
assert tuple(BUILDERS) == REQUEST_KINDS == tuple(TEMPLATES)


# --- kinds --------------------------------------------------------------------------------------


def kind_quotas(stories: int, shares: np.ndarray) -> np.ndarray:
    """How many stories each kind gets: stories x share, rounded so the counts add up (largest remainders first)."""
    exact = stories * shares
    quotas = np.floor(exact).astype(int)
    short = stories - quotas.sum()
    quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    return quotas


def assign_kinds(can: np.ndarray, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each story's kind (an index into REQUEST_KINDS), given which kinds each story can carry (can[story, kind]).

    Dealt by quota rather than drawn one story at a time: the mix holds exactly, and a small split
    (the fixture's 18 test stories) gets its one or two openings for sure, not with some luck. The
    kind fewest stories can carry relative to its quota chooses first, at random among its carriers:
    a third of TinyStories' stories name no character, so the character quota must not find those
    already taken. Stories left over (a kind with fewer carriers than its quota) draw among the kinds
    they can carry, by share, and get plain if none has a share: every story answers "Tell me a story."
    """
    kinds = np.full(len(can), -1)
    quotas = kind_quotas(len(can), shares)
    wanted = [k for k in range(len(shares)) if quotas[k] > 0]
    for k in sorted(wanted, key=lambda k: can[:, k].sum() / quotas[k]):
        free = np.flatnonzero((kinds < 0) & can[:, k])
        kinds[rng.permutation(free)[:quotas[k]]] = k
    for story in np.flatnonzero(kinds < 0):
        weights = can[story] * shares
        total = weights.sum()
        kinds[story] = rng.choice(len(shares), p=weights / total) if total > 0 else REQUEST_KINDS.index("plain")
    return kinds


# --- conversations ------------------------------------------------------------------------------


def two_turn_count(stories: int, multi_turn: float) -> int:
    """m such that m of the (stories - m) conversations, a share multi_turn, have two turns."""
    return min(round(stories * multi_turn / (1 + multi_turn)), stories // 2)


def conversation_plan(stories: int, multi_turn: float, rng: np.random.Generator) -> pd.DataFrame:
    """Which story is which turn of which conversation: columns story, conversation, turn.

    Random pairs of stories make the two-turn conversations; conversations are numbered in the order
    of their last story, so the table follows the split's order.
    """
    m = two_turn_count(stories, multi_turn)
    order = rng.permutation(stories)
    last = np.concatenate([order[m:2 * m], order[2 * m:]])  # each conversation's own story
    first = np.concatenate([order[:m], np.full(stories - 2 * m, -1)])  # its first turn's, or -1
    numbering = np.argsort(last, kind="stable")
    last, first = last[numbering], first[numbering]
    ids = np.arange(len(last))
    two = first >= 0
    plan = pd.DataFrame({
        "story": np.concatenate([first[two], last]),
        "conversation": np.concatenate([ids[two], ids]),
        "turn": np.concatenate([np.zeros(two.sum(), dtype=np.int64), two.astype(np.int64)]),
    })
    return plan.sort_values(["conversation", "turn"], ignore_index=True)


def turn_places(stories: int, multi_turn: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """conversation_plan without its table: each story's conversation, turn and row in the table sorted
    by (conversation, turn), as three arrays indexed by story. The same draws give the same plan."""
    m = two_turn_count(stories, multi_turn)
    order = rng.permutation(stories)
    first, partner = order[:m], order[m:2 * m]  # first turns, and the stories whose conversations they open
    last = np.ones(stories, dtype=bool)
    last[first] = False
    conversation = np.cumsum(last) - 1  # numbered by their last story: its rank among the last stories
    turn = np.zeros(stories, dtype=np.int8)
    turn[partner] = 1
    # A last story's row: one per conversation before its own, one per first turn up to its own.
    row = conversation + np.cumsum(turn)
    conversation[first], row[first] = conversation[partner], row[partner] - 1
    return conversation, turn, row


def can_carry(offer: dict) -> list[bool]:
    """Which kinds a story can carry, in REQUEST_KINDS' order, given its offers."""
    return [offer[kind] is not None for kind in REQUEST_KINDS]


def carriers(can: np.ndarray) -> dict[str, int]:
    return dict(zip(REQUEST_KINDS, can.sum(axis=0).tolist(), strict=True))


def mix_shares(params: ChatDataParams) -> np.ndarray:
    return np.array([getattr(params.mix, kind) for kind in REQUEST_KINDS])


def build_split(stories: list[str], params: ChatDataParams, rng: np.random.Generator,
                offered: list[dict] | None = None) -> tuple[pd.DataFrame, dict]:
    """The split's conversations, one row per turn, sorted by (conversation, turn), and how many
    stories could carry each kind. `offered`: the stories' offers, if already known.

    Built in memory from a list of stories; the stage streams the same rows (build_chat_data)."""
    offered = offered if offered is not None else [offers(story, params.words_within) for story in stories]
    can = np.array([can_carry(offer) for offer in offered],
                   dtype=bool).reshape(-1, len(REQUEST_KINDS))  # (0, 4) for an empty split, not (0,)
    kinds = [REQUEST_KINDS[k] for k in assign_kinds(can, mix_shares(params), rng)]
    requests = pd.DataFrame([asdict(BUILDERS[kind](story, offer[kind], rng))
                             for story, offer, kind in zip(stories, offered, kinds, strict=True)],
                            columns=["kind", "request", "reply", "words", "character"])
    plan = conversation_plan(len(stories), params.multi_turn, rng)
    table = plan.join(requests, on="story")
    return table[SCHEMA.names], carriers(can)


def held_out_table(table: pd.DataFrame, offered: list[dict], rng: np.random.Generator) -> pd.DataFrame:
    """`table` row for row, every request re-phrased with a HELD_OUT template."""
    unseen = table.copy()
    unseen["request"] = [held_out_request(row.kind, row.words, offered[row.story][row.kind], rng)
                         for row in table.itertuples()]
    return unseen


def split_counts(table: pd.DataFrame) -> dict[str, int]:
    turns = table.groupby("conversation").size()
    kinds = table["kind"].value_counts()
    return {"conversations": len(turns), "turns": len(table), "multi_turn": int((turns == 2).sum()),
            **{kind: int(kinds.get(kind, 0)) for kind in REQUEST_KINDS}}


def dealt_counts(kinds: np.ndarray, multi_turn: float) -> dict[str, int]:
    """split_counts of the table that `kinds` (one per story) will make, known before it is built."""
    two_turn = two_turn_count(len(kinds), multi_turn)
    per_kind = np.bincount(kinds, minlength=len(REQUEST_KINDS))
    return {"conversations": len(kinds) - two_turn, "turns": len(kinds), "multi_turn": two_turn,
            **{kind: int(per_kind[k]) for k, kind in enumerate(REQUEST_KINDS)}}


def check_kinds(split: str, counts: dict[str, int], carriers: dict[str, int], params: ChatDataParams) -> None:
    """A kind asked for (share > 0) must occur in every split: fine-tuning and evaluation both expect it."""
    for kind in REQUEST_KINDS:
        share = getattr(params.mix, kind)
        if share > 0 and counts[kind] == 0:
            why = (f"{carriers[kind]} of its {counts['turns']} stories can carry one" if carriers[kind] == 0
                   else f"{share:g} of its {counts['turns']} stories rounds to none")
            more = "data.fraction" if split == "train" else f"data.fraction, data.{split}_fraction"
            raise LibrarianError(
                f"the {split} split has no {kind} conversation although chat_data.mix.{kind} is {share:g}: {why}; "
                f"use more data ({more}) or set chat_data.mix.{kind} to 0"
            )


def to_arrow(table: pd.DataFrame) -> pa.Table:
    # No pandas metadata (it records the library's version) and no index column: only the data.
    return pa.Table.from_pandas(table, schema=SCHEMA, preserve_index=False).replace_schema_metadata(None)


# --- the stage: streamed ---------------------------------------------------------------------------

# Rows the sort into conversation order holds at a time (librarian/data/external_sort.py): at about a
# kilobyte a row, what bounds the stage's memory with a batch of stories (io.READ_BATCH_STORIES).
# Tests make both tiny.
SORT_BUCKET_ROWS = 1 << 14
# The temporaries' folder inside the output's atomic_dir, removed before the output appears.
WORK = ".build"

# What pass 1 keeps of each story's offers for the request builders (the text stays in the clean
# split): the words found of each part of speech and the main character, null where it has none.
OFFERS_SCHEMA = pa.schema([*((part, pa.list_(pa.string())) for part in words.PARTS_OF_SPEECH),
                           ("name", pa.string()), ("name_kind", pa.string())])
# A table's requests in story order, and what its held-out phrasings need of the offer.
REQUEST_SCHEMA = pa.schema([*(SCHEMA.field(name) for name in ("kind", "request", "reply", "words", "character")),
                            ("character_kind", pa.string()), ("opening", pa.string())])
# A request placed in its conversation.
PLACED_SCHEMA = pa.schema([*(SCHEMA.field(name) for name in ("conversation", "turn", "story")), *REQUEST_SCHEMA])


def table_streams(split: str, variants: int) -> dict[str, str]:
    """The split's tables, each with its seeded stream. Variant 0 keeps the split's own stream: its
    bytes do not depend on chat_data.variants."""
    return {split: f"chat_data/{split}"} | ({f"{split}-v{v}": f"chat_data/{split}/variant-{v}"
                                             for v in range(1, variants)} if split == "train" else {})


def _unreadable(path: Path, exc: BaseException) -> LibrarianError:
    return LibrarianError(f"{path} is not a readable clean split with a 'text' column ({type(exc).__name__}); "
                          "rerun `dvc repro -f clean`")


def clean_split(clean_dir: Path, split: str) -> Path:
    """The split's file, checked to be there and readable before any work starts."""
    path = clean_dir / f"{split}.parquet"
    if not path.is_file():
        raise LibrarianError(f"{path} not found; run `dvc repro clean` first")
    try:
        open_stories(path).close()
    except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
        raise _unreadable(path, exc) from None
    return path


def clean_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The split's stories, io.READ_BATCH_STORIES at a time."""
    try:
        yield from story_batches(path)
    except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
        raise _unreadable(path, exc) from None


def spilled_offers(offer: dict | None) -> dict:
    """A row of OFFERS_SCHEMA: what `offer` gives the words and character builders."""
    found, character = (offer["words"], offer["character"]) if offer else (None, None)
    return {**{part: found[part] if found else None for part in words.PARTS_OF_SPEECH},
            "name": character[0] if character else None, "name_kind": character[1] if character else None}


def offer_split(path: Path, words_within: int, spill: Spill) -> np.ndarray:
    """Pass 1: what each story offers, spilled for the builders. Returns can[story, kind].

    A chat reply must be a story: an empty one is an error, named after the whole split is read."""
    can, start, first_empty, empty = [], 0, None, 0
    for batch in clean_batches(path):
        stories = batch.column(0).to_pylist()
        blank = [story is None or not story.strip() for story in stories]
        if any(blank):
            first_empty = start + blank.index(True) if first_empty is None else first_empty
            empty += sum(blank)
        offered = [None if b else offers(story, words_within) for story, b in zip(stories, blank, strict=True)]
        can.append(np.array([can_carry(o) if o else [False] * len(REQUEST_KINDS) for o in offered], dtype=bool))
        spill.write(pa.RecordBatch.from_pylist([spilled_offers(o) for o in offered], schema=OFFERS_SCHEMA))
        start += len(stories)
    if empty:
        raise LibrarianError(f"{path}: story {first_empty} is empty ({empty} in all); rerun `dvc repro -f clean`, "
                             "which drops empty stories")
    return np.concatenate(can).reshape(-1, len(REQUEST_KINDS)) if can else np.zeros((0, len(REQUEST_KINDS)), bool)


def offer_of(kind: str, story: str, spilled: dict) -> object:
    """The story's offer for `kind` (as offers gives it), from pass 1's spill. An opening is found
    again: one regex costs less than spilling the story's text."""
    if kind == "words":
        return {part: spilled[part] for part in words.PARTS_OF_SPEECH}
    if kind == "character":
        return spilled["name"], spilled["name_kind"]
    return split_opening(story) if kind == "opening" else story


def request_row(kind: str, story: str, spilled: dict, rng: np.random.Generator) -> dict:
    """A row of REQUEST_SCHEMA: the story's request of `kind`, drawn from `rng`."""
    offer = offer_of(kind, story, spilled)
    # vars, not asdict: the row is spilled at once, so its lists need no deep copy.
    return {**vars(BUILDERS[kind](story, offer, rng)), "character_kind": offer[1] if kind == "character" else "",
            "opening": offer[0] if kind == "opening" else ""}


def spill_requests(path: Path, offered: Spill, kinds: np.ndarray, rng: np.random.Generator, out: Spill) -> None:
    """Pass 2: every story's request, in story order, drawn from `rng` as build_split draws them."""
    start = 0
    for batch, spilled in zip(clean_batches(path), offered.batches(), strict=True):
        stories = batch.column(0).to_pylist()
        dealt = kinds[start:start + len(stories)]
        out.write(pa.RecordBatch.from_pylist(
            [request_row(REQUEST_KINDS[k], story, offer, rng)
             for story, offer, k in zip(stories, spilled.to_pylist(), dealt, strict=True)], schema=REQUEST_SCHEMA))
        start += len(stories)


def place_requests(requests: Spill, plan: tuple[np.ndarray, ...], folder: Path) -> PositionSort:
    """Pass 3: every request with its conversation and turn, spilled to the bucket of its row."""
    conversation, turn, row = plan
    sort = PositionSort(folder, PLACED_SCHEMA, len(row), SORT_BUCKET_ROWS)
    start = 0
    for batch in requests.batches():
        story = np.arange(start, start + batch.num_rows)
        placed = [pa.array(conversation[story]), pa.array(turn[story].astype(np.int64)), pa.array(story)]
        sort.add(pa.RecordBatch.from_arrays([*placed, *batch.columns], schema=PLACED_SCHEMA), row[story])
        start += batch.num_rows
    requests.remove()
    return sort


def held_out_requests(table: pa.Table, rng: np.random.Generator) -> pa.Table:
    """held_out_table of a piece of a table: the same draws, one per row in table order."""
    columns = [table.column(name).to_pylist() for name in ("kind", "words", "character", "character_kind", "opening")]
    requests = [held_out_request(kind, asked, (name, name_kind) if kind == "character" else (opening,), rng)
                for kind, asked, name, name_kind, opening in zip(*columns, strict=True)]
    return table.set_column(table.schema.get_field_index("request"), "request", pa.array(requests, pa.string()))


def write_table(sort: PositionSort, path: Path, held_out: tuple[Path, np.random.Generator] | None) -> None:
    """Pass 4: the table in conversation order, a bucket at a time, and its held-out phrasings row for row."""
    with contextlib.ExitStack() as files:
        table = files.enter_context(table_writer(path, SCHEMA))
        unseen = files.enter_context(table_writer(held_out[0], SCHEMA)) if held_out else None
        for rows in sort.tables():
            table.write(rows.select(SCHEMA.names))
            if unseen:
                unseen.write(held_out_requests(rows, held_out[1]).select(SCHEMA.names))


def build_chat_data(clean_dir: str | Path, out_dir: str | Path, metrics_path: str | Path, params: Params) -> dict:
    """Write out_dir/{train,val,test}.parquet (and the variants and held-out tables) and the
    per-table counts to metrics_path.

    Every table's kinds are dealt and checked before any table is built, and everything is written
    inside an atomic_dir: a failure leaves no output.
    """
    clean_dir, settings = Path(clean_dir), params.chat_data
    paths = {split: clean_split(clean_dir, split) for split in SPLITS}
    metrics, dealt, offered = {}, {}, {}
    with atomic_dir(out_dir) as tmp:
        work = tmp / WORK
        work.mkdir()
        for split in SPLITS:
            offered[split] = Spill(work / f"{split}-offers.arrow", OFFERS_SCHEMA)
            can = offer_split(paths[split], settings.words_within, offered[split])
            for name, stream in table_streams(split, settings.variants).items():
                rng = rng_for(params.seed, stream)
                kinds = assign_kinds(can, mix_shares(settings), rng).astype(np.int8)
                metrics[name] = dealt_counts(kinds, settings.multi_turn)
                check_kinds(split, metrics[name], carriers(can), settings)
                dealt[name] = split, kinds, rng
        for name, (split, kinds, rng) in dealt.items():
            requests = Spill(work / f"{name}-requests.arrow", REQUEST_SCHEMA)
            spill_requests(paths[split], offered[split], kinds, rng, requests)
            sort = place_requests(requests, turn_places(len(kinds), settings.multi_turn, rng), work / name)
            held_out = ((tmp / f"{name}{UNSEEN}.parquet", rng_for(params.seed, f"chat_data/{split}/unseen"))
                        if name in HELD_OUT_SPLITS else None)
            write_table(sort, tmp / f"{name}.parquet", held_out)
        shutil.rmtree(work)
    write_json(metrics_path, metrics)
    return metrics

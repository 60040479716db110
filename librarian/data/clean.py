"""The clean stage: normalise story text, drop unusable stories, dedup, and split by story.

Normalising rules run in order on every story; each counts the stories it changed. Filters then
drop stories, each counted under the first filter that rejects it. Both counts go to
metrics/clean.json so a change in the data shows up in `dvc metrics diff`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import ftfy
import numpy as np
import pyarrow as pa
import regex

from librarian.core.config import CleanParams, Params
from librarian.core.errors import LibrarianError
from librarian.core.io import (
    STORY_SCHEMA,
    StoryWriter,
    atomic_dir,
    open_stories,
    story_batches,
    story_writer,
    write_json,
)
from librarian.core.rng import rng_for
from librarian.data.parallel import Workers, available_cores, worker_pool

# --- normalising rules -------------------------------------------------------------------------

# Every character that windows-1252 shows for a UTF-8 continuation byte (0x80-0xBF). In the hub's
# parquet, "”" (E2 80 9D) turned into "â€" plus 0x9D, which windows-1252 cannot show and which was
# lost; so "â€" followed by anything that is not such a character can only have been "”".
_CP1252_CONTINUATIONS = "".join(bytes([b]).decode("cp1252", errors="ignore") for b in range(0x80, 0xC0))
_LOST_CLOSING_QUOTE = re.compile("â€(?![" + re.escape(_CP1252_CONTINUATIONS) + "])")
# Letters that start nearly every UTF-8-read-as-latin-1/cp1252 sequence; a cheap test before ftfy.
_MOJIBAKE_HINT = re.compile("[ÂÃâð]")

_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
        "\u00ab": '"', "\u00bb": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
        "\u2212": "-",
        "\u2026": "...",
    }
)

# C0/C1 controls except tab and newline (handled as whitespace), zero-width and bidi marks, BOM.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_LINE_BREAK_CHARS = ("\r", "\u2028", "\u2029", "\x85")


def repair_mojibake(text: str) -> str:
    # isascii() is a flag CPython keeps on every string: a free test, true of 99 % of stories.
    if text.isascii() or not _MOJIBAKE_HINT.search(text):
        return text
    return ftfy.fix_encoding(_LOST_CLOSING_QUOTE.sub("\u201d", text))


def nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def ascii_punctuation(text: str) -> str:
    return text if text.isascii() else text.translate(_TYPOGRAPHY)  # every key of _TYPOGRAPHY is non-ASCII


def strip_invisible(text: str) -> str:
    return _INVISIBLE.sub("", text)


def normalise_whitespace(text: str) -> str:
    """One space between words, one newline between paragraphs, nothing at either end.

    TinyStories' text files put one newline between paragraphs, the hub's parquet two; settling on
    one makes both copies of a story identical, so dedup can see them.
    """
    # str.split() and re's \s agree on what whitespace is (str.isspace); splitting and joining is
    # 4.6x faster than the regular expressions that did this (collapse runs of whitespace other
    # than newline, then turn every run holding a newline into one), with the same result.
    if any(char in text for char in _LINE_BREAK_CHARS):
        text = _LINE_BREAKS.sub("\n", text)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# Order matters: mojibake first (its output is typographic), then NFKC, which would otherwise
# take "…" before the punctuation rule can count it.
RULES = (
    ("mojibake", repair_mojibake),
    ("ascii_punctuation", ascii_punctuation),
    ("nfkc", nfkc),
    ("invisible_chars", strip_invisible),
    ("whitespace", normalise_whitespace),
)

# --- filters -----------------------------------------------------------------------------------

# A story ends properly with a character that ends sentences in any script: the Unicode property
# Sentence_Terminal (. ! ? 。 ！ ？ । ؟ ။ ...; `regex` knows it, `unicodedata` does not), or a closing
# quote or bracket (general categories Pe and Pf, and the straight quotes the ascii_punctuation rule
# leaves): a story may end in dialogue, `"Thank you"`, and 」 follows 。 in Japanese. This keeps every
# story the earlier ASCII-only rule (. ! ? " ' ) at the end) kept.
_ENDING = regex.compile(r"""[\p{Sentence_Terminal}\p{Pe}\p{Pf}"']""")
_THE_END = re.compile(r"the end\W*$", re.IGNORECASE)


def is_fragment(text: str) -> bool:
    """A story cut off mid-sentence: it ends with neither closing punctuation nor "The End"."""
    # Only the last character is matched: a search for an end anchor would walk the whole story.
    return not (_ENDING.fullmatch(text[-1:]) or _THE_END.search(text))


def rejection(text: str, params: CleanParams) -> str | None:
    """The first filter that drops `text`, or None to keep it."""
    if not text:
        return "empty"
    if len(text) < params.min_chars:
        return "too_short"
    if len(text) > params.max_chars:
        return "too_long"
    if params.drop_fragments and is_fragment(text):
        return "fragment"
    return None


# --- the stage ---------------------------------------------------------------------------------


@dataclass
class CleanReport:
    stories_in: int = 0
    changed: Counter = field(default_factory=lambda: Counter({name: 0 for name, _ in RULES}))
    dropped: Counter = field(
        default_factory=lambda: Counter(dict.fromkeys(["empty", "too_short", "too_long", "fragment", "duplicate"], 0))
    )
    stories_out: int = 0

    def merge(self, other: CleanReport) -> None:
        """Add `other`'s counts: the report of a split is the sum of its batches' reports."""
        self.stories_in += other.stories_in
        self.changed.update(other.changed)
        self.dropped.update(other.dropped)
        self.stories_out += other.stories_out

    def as_dict(self) -> dict:
        return {
            "stories_in": self.stories_in,
            "changed": dict(self.changed),
            "dropped": dict(self.dropped),
            "stories_out": self.stories_out,
        }


# One pass can expose work for an earlier rule (NFKC makes "\ufe31" a dash the punctuation rule
# then folds; a stripped zero-width space lets an accent compose), so passes repeat until nothing
# changes: normalise(normalise(x)) == normalise(x). Real text settles in one pass, fuzz in three.
MAX_PASSES = 4


def normalise(text: str, report: CleanReport | None = None) -> str:
    changed = set()
    for _ in range(MAX_PASSES):
        before = text
        for name, rule in RULES:
            fixed = rule(text)
            if fixed != text:
                changed.add(name)
            text = fixed
        if text == before:
            break
    if report is not None:
        for name in changed:
            report.changed[name] += 1
    return text


def story_key(text: str) -> bytes:
    """What dedup remembers of a story: 16 bytes of BLAKE2b instead of its text (~800 characters).

    In a Python set that is about 80 bytes a story (the bytes object and its slot): 170 MB for the
    2.1 M stories of TinyStories, where their texts took 4 GB. Two different stories share a key
    with a chance of about n² / 2^129, 10^-26 at that size: exact dedup in all but name.
    """
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass
class Screened:
    """A batch after the per-story work, before dedup: what a worker process sends back."""

    texts: list[str] | pa.Array  # the normalised stories that pass the filters, in order
    keys: list[bytes]  # their story_key
    report: CleanReport  # stories_in, the rules' changes and the filters' drops


def screen(stories, params: CleanParams) -> Screened:
    """Normalise, filter and key every story of a batch: the work that needs no other batch."""
    report = CleanReport()
    texts = []
    for story in stories:
        report.stories_in += 1
        text = normalise(story, report)
        reason = rejection(text, params)
        if reason:
            report.dropped[reason] += 1
        else:
            texts.append(text)
    return Screened(texts, [story_key(text) for text in texts], report)


def screen_batch(batch: pa.RecordBatch, params: CleanParams) -> Screened:
    """screen() for a batch read from a story file, its texts as the Arrow array a writer takes.

    Run on a worker, which also does the conversion: the stage's own process only dedups and
    writes. Both ways, a record batch and an Arrow array pickle as their buffers, cheaper than
    lists of str.
    """
    screened = screen(batch.column(0).to_pylist(), params)
    screened.texts = pa.array(screened.texts, type=STORY_SCHEMA.field("text").type)
    return screened


def first_occurrences(screened: Screened, seen: set[bytes], report: CleanReport) -> list[bool]:
    """For each screened story, whether its key is new to `seen`; the new keys join it.

    Done in the stage's own process, batch after batch in corpus order, so the first occurrence is
    kept whichever worker screened it. `report` adds up the batch's counts.
    """
    report.merge(screened.report)
    keep = []
    for key in screened.keys:
        new = key not in seen
        seen.add(key)
        keep.append(new)
    kept = sum(keep)
    report.dropped["duplicate"] += len(keep) - kept
    report.stories_out += kept
    return keep


def clean_batch(stories, params: CleanParams, seen: set[bytes], report: CleanReport) -> list[str]:
    """The stories of `stories` that survive normalising, the filters and dedup, in order.

    A story whose key is in `seen` is a duplicate; each kept story's key is added to it, so batch
    after batch of a split keep first occurrences only. `report` adds up what happened.
    """
    screened = screen(stories, params)
    keep = first_occurrences(screened, seen, report)
    return [text for text, new in zip(screened.texts, keep) if new]


def clean_stories(stories, params: CleanParams, seen: set[str] | None = None) -> tuple[list[str], CleanReport]:
    """Normalise, filter and exact-dedup `stories`, keeping first occurrences in order.

    Stories already in `seen` count as duplicates too: that is how the official validation split
    is kept free of stories that also appear in training data.
    """
    report = CleanReport()
    kept = clean_batch(stories, params, {story_key(text) for text in seen or ()}, report)
    return kept, report


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded split of n clean stories by whole story: the (unsorted) indices of each split."""
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    for name, size, key in (("val", n_val, "val_fraction"), ("test", n_test, "test_fraction")):
        if size == 0:
            raise LibrarianError(
                f"data.{key} of {n} clean stories leaves the {name} split empty; raise data.{key} or use more data"
            )
    if n - n_val - n_test <= 0:
        raise LibrarianError(f"{n} clean stories leave no train split; lower data.val_fraction/test_fraction")
    order = rng_for(seed, "split").permutation(n)
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def split_stories(stories: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded split by whole story; each split keeps the corpus order."""
    parts = split_indices(len(stories), val_fraction, test_fraction, seed)
    return {name: [stories[i] for i in np.sort(idx)] for name, idx in parts.items()}


SPLITS = ("train", "val", "test")
OFFICIAL_VALIDATION = "official_validation"
# The clean train pool between the two passes, inside the stage's temporary folder; removed before
# that folder becomes data/clean, whose every *.parquet is a split.
POOL = "pool.parquet"


def clean_split(parquet: Path, writer: StoryWriter, params: CleanParams, seen: set[bytes],
                workers: Workers | None = None) -> CleanReport:
    """Clean a split file batch by batch into `writer`; `seen` holds the key of every story kept.

    The batches are screened on `workers` (here, without), deduplicated and written here, in order:
    the same bytes and counts whatever the number of workers.
    """
    report = CleanReport()
    screen_here = functools.partial(screen_batch, params=params)
    for screened in (workers or Workers(1)).map(screen_here, story_batches(parquet)):
        keep = pa.array(first_occurrences(screened, seen, report), type=pa.bool_())
        writer.write(pa.table({"text": screened.texts.filter(keep)}))
    return report


# Below this many stories (train and validation) the clean stage runs in one process. Workers cost
# about 2 CPU seconds to start and warm up (a fresh interpreter each importing pyarrow, ftfy, numpy,
# and pyarrow's first conversion), plus the batches' trips to them, while a story takes about
# 15 us to screen. benchmarks/data_parallel.py (2-core Xeon): before the whitespace rule was made
# faster, 2 workers ran at 0.80x one process at 20 k stories, 1.11x at 40 k, 1.42x at 150 k on an
# idle machine; screening is now 2.4x cheaper, so the break-even moves to about 75 k. With one core
# busy with another job, 2 workers were slower at every size measured (0.54-0.63x at 40-150 k).
# On an idle 2-core AMD EPYC (2026-12-06) 2 workers ran at 0.95x one process at 150 k (docs/scale.md):
# where the break-even lies depends on the CPU; the outputs are the same bytes either way.
PARALLEL_MIN_STORIES = 100_000


def clean_workers(parquets: list[Path]) -> int:
    """How many processes clean these split files: one per core for a large corpus, else one."""
    stories = 0
    for path in parquets:
        with open_stories(path) as source:  # a file that is not one fails as reading it would
            stories += source.metadata.num_rows
    return available_cores() if stories >= PARALLEL_MIN_STORIES else 1


def split_labels(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[tuple[str, ...], np.ndarray]:
    """split_indices as the names of the splits and, for each of the n pool stories, the position of
    its split among them: 1 byte a story, where the indices take 8."""
    parts = split_indices(n, val_fraction, test_fraction, seed)
    labels = np.empty(n, dtype=np.uint8)
    for label, idx in enumerate(parts.values()):
        labels[idx] = label
    return tuple(parts), labels


def write_splits(pool: Path, labels: np.ndarray, writers: list[StoryWriter]) -> None:
    """Stream the pool into the writers of its splits (`labels` indexes `writers`), in corpus order."""
    start = 0
    for batch in story_batches(pool):
        batch_labels = labels[start : start + batch.num_rows]
        for label, writer in enumerate(writers):
            writer.write(batch.filter(pa.array(batch_labels == label)))
        start += batch.num_rows


def clean_corpus(in_dir: str | Path, out_dir: str | Path, report_path: str | Path, params: Params,
                 workers: int | None = None) -> dict:
    """Clean the sampled train split into train/val/test, and the official validation split if any.

    In two passes, one batch of stories in memory at a time: the train pool is cleaned into a
    temporary file while counted, which is all the seeded split needs; then that file is streamed
    into the splits. Besides a batch, memory holds a key a story (see story_key) and, for the
    split, 9 bytes a pool story (its permutation index and its split's label).

    `workers` processes screen the stories (None: clean_workers' choice); the outputs are the same
    bytes for any number.
    """
    in_dir = Path(in_dir)
    # pyarrow's own error for a missing file is a traceback-worthy OSError; say which stage makes it.
    if not (in_dir / "train.parquet").is_file():
        raise LibrarianError(f"{in_dir} has no train.parquet; run `dvc repro subsample` first")
    official_path = in_dir / "validation.parquet"
    if workers is None:
        workers = clean_workers([path for path in (in_dir / "train.parquet", official_path) if path.exists()])
    with atomic_dir(out_dir) as tmp, worker_pool(workers) as pool_workers:
        seen: set[bytes] = set()
        with story_writer(tmp / POOL) as pool:
            pool_report = clean_split(in_dir / "train.parquet", pool, params.clean, seen, pool_workers)
        if not pool.stories:
            # Otherwise the split would blame data.val_fraction for what the filters did.
            dropped = ", ".join(f"{n} {reason}" for reason, n in pool_report.dropped.items() if n) or "none"
            raise LibrarianError(
                f"no story is left after cleaning {pool_report.stories_in} (dropped: {dropped}); "
                "check clean.min_chars / clean.max_chars / clean.drop_fragments and data.source"
            )
        names, labels = split_labels(pool.stories, params.data.val_fraction, params.data.test_fraction, params.seed)
        report = {"train_pool": pool_report.as_dict()}
        with contextlib.ExitStack() as stack:
            writers = {name: stack.enter_context(story_writer(tmp / f"{name}.parquet")) for name in names}
            write_splits(tmp / POOL, labels, list(writers.values()))
        (tmp / POOL).unlink()
        if official_path.exists():
            # `seen` holds the whole train pool by now: its stories count as duplicates here, so
            # none leaks into evaluation.
            with story_writer(tmp / f"{OFFICIAL_VALIDATION}.parquet") as official:
                official_report = clean_split(official_path, official, params.clean, seen, pool_workers)
            writers[OFFICIAL_VALIDATION] = official
            report[OFFICIAL_VALIDATION] = official_report.as_dict()
        report["splits"] = {name: writer.stories for name, writer in writers.items()}
    write_json(report_path, report)
    return report

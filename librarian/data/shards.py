"""One shard of a local source, read in bounded pieces: READ_BATCH_STORIES stories at a time.

The full TinyStories is 2.1 M stories (1.9 GB of text): read whole, a shard's stories took about
five times their size in memory. Here a text shard is read TEXT_BLOCK_BYTES at a time and a
parquet shard a row group at a time, so memory is one batch, not the corpus.

A shard that turns out bad partway through raises a LibrarianError that names it and the row;
download writes into a temporary folder (atomic_dir), so nothing of it is left. The checks a
whole-file read made keep their order: for a text shard a read error (a cut gzip) anywhere comes
first, then NUL bytes anywhere, then the first invalid UTF-8, then the bad lines of a .jsonl. Once a
shard is known to be bad, the rest of it is still read, to tell which of those to report.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import librarian.core.io
from librarian.core.errors import LibrarianError
from librarian.core.io import STORY_SCHEMA
from librarian.data.tokenizer import EOT  # the separator of TinyStories-train.txt is the tokenizer's end-of-text

TEXT_FIELDS = ("text", "story")
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
# Bytes of a text shard read at a time, cut back to the last newline (a JSONL line, a paragraph of
# a .txt, and a UTF-8 character never span one). Tests make it tiny so lines and stories span blocks.
TEXT_BLOCK_BYTES = 1 << 20


def shard_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The stories of one shard, in order, as batches of at most READ_BATCH_STORIES (STORY_SCHEMA)."""
    if path.name.endswith(".parquet"):
        return _parquet_batches(path)
    parser = _JsonlStories() if path.name.endswith((".jsonl", ".jsonl.gz")) else _TxtStories()
    return _batched(_text_stories(path, parser))


def read_shard(path: Path) -> list[str]:
    """All the stories of a shard, in memory: for benchmarks and tests on small corpora."""
    return [story for batch in shard_batches(path) for story in batch.column(0).to_pylist()]


def text_field(names, where: str) -> str:
    column = next((n for n in TEXT_FIELDS if n in names), None)
    if column is None:
        raise LibrarianError(f"{where} has columns {list(names)}; it needs a 'text' or 'story' column")
    return column


def _as_batch(stories: list[str] | pa.Array) -> pa.RecordBatch:
    return pa.record_batch([pa.array(stories, type=pa.large_string())], schema=STORY_SCHEMA)


# --- parquet ---------------------------------------------------------------------------------


def _parquet_batches(path: Path) -> Iterator[pa.RecordBatch]:
    try:
        # Without pre_buffer a row group is read when needed, not every one ahead (see open_stories).
        source = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise LibrarianError(f"{path} is not a readable parquet file ({exc}); re-download or re-export it") from None
    with source:
        schema = source.schema_arrow
        column = text_field(schema.names, str(path))
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise LibrarianError(f"{path} column {column!r} is {kind}, not text; it must hold strings")
        first = 1  # the row group's first row, counted from 1 as a user counts stories
        for group in range(source.num_row_groups):
            yield from _row_group_batches(source, path, group, column, first)
            first += source.metadata.row_group(group).num_rows


def _row_group_batches(source: pq.ParquetFile, path: Path, group: int, column: str,
                       first: int) -> Iterator[pa.RecordBatch]:
    last = first + source.metadata.row_group(group).num_rows - 1
    try:
        for batch in source.iter_batches(batch_size=librarian.core.io.READ_BATCH_STORIES, row_groups=[group],
                                         columns=[column]):
            # A null is no story (the hub's exports have none; other tools may write them).
            yield _as_batch(batch.column(0).drop_null())
    except (pa.ArrowException, OSError) as exc:
        raise LibrarianError(
            f"{path} rows {first}-{last} (row group {group + 1} of {source.num_row_groups}) cannot be read "
            f"({first_line(exc)}); re-download or re-export it"
        ) from None


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# --- text: .txt and .jsonl, plain or gzip ----------------------------------------------------


def _batched(stories: Iterator[str]) -> Iterator[pa.RecordBatch]:
    while batch := list(itertools.islice(stories, librarian.core.io.READ_BATCH_STORIES)):
        yield _as_batch(batch)


def _text_stories(path: Path, parser: _TxtStories | _JsonlStories) -> Iterator[str]:
    for text in _decoded(path, _line_blocks(path), parser):
        yield from parser.feed(text)
    yield from parser.finish(path)


def _line_blocks(path: Path) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of a text shard, uncompressed, in blocks that end at a newline."""
    try:
        with gzip.open(path) if path.name.endswith(".gz") else path.open("rb") as f:
            offset, carry = 0, b""
            while block := f.read(TEXT_BLOCK_BYTES):
                block = carry + block
                cut = block.rfind(b"\n") + 1
                if cut:
                    yield offset, block[:cut]
                    offset += cut
                carry = block[cut:]
            if carry:
                yield offset, carry
    except (OSError, EOFError) as exc:
        raise LibrarianError(f"cannot read {path}: {exc}; is it a complete, valid file?") from None


def _decoded(path: Path, blocks: Iterator[tuple[int, bytes]], parser) -> Iterator[str]:
    """Each block as text; at the first NUL byte or invalid UTF-8, the error of the whole shard."""
    for offset, block in blocks:
        binary = b"\x00" in block
        if not binary:
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad_byte = f"offset {offset + exc.start}, {parser.row(block[: exc.start].decode('utf-8'))}"
            else:
                yield text
                continue
        # Read the rest, all of it: a read error there, else a NUL byte anywhere, is what to report.
        if any([b"\x00" in rest for _, rest in blocks]) or binary:
            raise LibrarianError(f"{path} holds binary data (NUL bytes), not text; point data.source at text files")
        raise LibrarianError(f"{path} is not valid UTF-8 (bad byte at {bad_byte}); re-encode it as UTF-8")


class _TxtStories:
    """The stories of a .txt shard from its text in pieces: they sit between <|endoftext|>
    separators; the blank piece after the last separator is no story."""

    def __init__(self):
        self.stories = 0
        self._open = ""  # the text since the last separator: the story being read

    def feed(self, text: str) -> list[str]:
        *done, self._open = (self._open + text).split(EOT)
        return self._kept(done)

    def finish(self, path: Path) -> list[str]:
        return self._kept([self._open])

    def _kept(self, pieces: Iterable[str]) -> list[str]:
        stories = [story for story in map(str.strip, pieces) if story]
        self.stories += len(stories)
        return stories

    def row(self, before: str) -> str:
        """Where a bad byte right after `before`, the text of its block up to it, sits."""
        *done, _ = (self._open + before).split(EOT)
        return f"story {self.stories + sum(1 for piece in done if piece.strip()) + 1}"


class _JsonlStories:
    """The stories of a .jsonl shard from its text in pieces of whole lines; every bad line is
    reported at once, at the end, so one edit fixes them all."""

    def __init__(self):
        self.lines = 0
        self.bad = _BadLines()

    def feed(self, text: str) -> list[str]:
        stories = []
        for line in text.splitlines():
            self.lines += 1
            if not line.strip():
                continue
            story, problem = _jsonl_story(line)
            if problem:
                self.bad.add(self.lines, problem)
            elif not self.bad.count:  # a shard with a bad line is not written: keep none of it
                stories.append(story)
        return stories

    def finish(self, path: Path) -> list[str]:
        if self.bad.count:
            raise LibrarianError(self.bad.message(path))
        return []

    def row(self, before: str) -> str:
        # A character after `before` makes its last line the one that holds the bad byte.
        return f"line {self.lines + len((before + '.').splitlines())}"


_JSONL_LINE = 'each line must be a JSON object with a string "text" or "story"'
_NUMBERED, _EXPLAINED = 10, 3  # line numbers and kinds of problem shown: the message stays one short line


class _BadLines:
    """How many lines are bad, the first line numbers and the first line of each kind of problem:
    only what the message shows is kept, however many lines are bad."""

    def __init__(self):
        self.count = 0
        self.numbers: list[int] = []
        self.first_of_kind: dict[str, int] = {}  # in order of first appearance; one more than shown

    def add(self, number: int, problem: str) -> None:
        self.count += 1
        if len(self.numbers) < _NUMBERED:
            self.numbers.append(number)
        if problem not in self.first_of_kind and len(self.first_of_kind) <= _EXPLAINED:
            self.first_of_kind[problem] = number

    def message(self, path: Path) -> str:
        if self.count == 1:
            (problem, number), = self.first_of_kind.items()
            return f"{path} line {number} {problem}; fix or remove that line ({_JSONL_LINE})"
        numbers = ", ".join(map(str, self.numbers)) + (", ..." if self.count > _NUMBERED else "")
        kinds = list(self.first_of_kind.items())
        why = ", ".join(f"line {number} {problem}" for problem, number in kinds[:_EXPLAINED])
        why += ", ..." if len(kinds) > _EXPLAINED else ""
        return f"{path} has {self.count} bad lines ({numbers}): {why}; fix or remove them ({_JSONL_LINE})"


def _jsonl_story(line: str) -> tuple[str | None, str | None]:
    """(the story, None) from one JSONL line, or (None, what is wrong with it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return None, "is not a JSON object"
    key = next((k for k in TEXT_FIELDS if k in record), None)
    if key is None:
        return None, "has no field 'text' or 'story'"
    if not isinstance(record[key], str):
        return None, f"has {json.dumps(key)}: {json.dumps(record[key])[:20]}"
    return record[key], None

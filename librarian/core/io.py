"""Atomic writes: an output either appears whole or not at all.

DVC and the next stage pick up whatever sits at an output path, so a crash, a Ctrl-C or a full
disk must never leave a half-written file there. Everything is written to a temporary sibling and
renamed into place; rename is atomic within a filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from librarian.core.errors import LibrarianError


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_error(exc, path)
        raise


def _swapped_out(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def remove_leftovers(path: Path) -> None:
    """Delete the temporary siblings of `path` that an earlier, killed writer left (kill -9, power loss).

    Only names our writers make (`.NAME.<random>.tmp`): a user's own files beside it stay. No other
    process is writing `path` now: DVC runs one stage at a time, the training state is locked.
    """
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]+\.tmp")
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not ours.fullmatch(sibling.name):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def recover_dir(path: str | Path) -> None:
    """Finish a directory swap that a kill interrupted between its two renames.

    Replacing a non-empty directory takes two renames (old out, new in). A SIGKILL between them
    leaves no `path`, only the complete previous version beside it: put that one back.
    """
    path = Path(path)
    old = _swapped_out(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)


def remove_dir(path: str | Path) -> None:
    """Delete a directory written with atomic_dir, with any swapped-out copy a kill left beside it."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(_swapped_out(path), ignore_errors=True)


def ordinary_mode(directory: bool = False) -> int:
    """The mode `mkdir` (0777) or `open` (0666) gives a new entry under the process umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    # os.umask can only read the mask by setting it, briefly changing it for every thread: read it
    # from /proc where there is one.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, ordinary_mode(directory=True))  # mkdtemp's 0700 would lock others out of the published folder
        if path.exists():
            old = _swapped_out(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_error(exc, path)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    """Write JSON with sorted keys and a trailing newline, so equal data gives equal bytes."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


# Readers stream one row group at a time, so its size, not the file's, bounds their memory.
ROW_GROUP_STORIES = 4096
STORY_COMPRESSION = "zstd"
# What write_stories makes of a list of stories.
STORY_SCHEMA = pa.schema([("text", pa.large_string())])
# Stories a streaming stage (subsample, clean) reads at a time: with a row group per writer, what
# bounds its memory. Tests make it tiny so that every stage goes through many batches.
READ_BATCH_STORIES = 8192


def write_stories(path: str | Path, stories: list[str] | pa.Table) -> None:
    """Stories as a one-column (`text`) parquet file: the format of every split under data/."""
    table = stories if isinstance(stories, pa.Table) else pa.table({"text": pa.array(stories, type=pa.large_string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=STORY_COMPRESSION, row_group_size=ROW_GROUP_STORIES)


def read_stories(path: str | Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def open_stories(path: str | Path) -> pq.ParquetFile:
    """A parquet file of stories, opened to be streamed.

    A file that is not one fails as pq.read_table(path, columns=["text"]) fails, with which the
    stages read whole files before they streamed them: the same first line, naming the problem.
    """
    try:
        # pyarrow's default pre_buffer reads every row group's compressed pages ahead, memory that
        # grows with the file (43 MB for 154 K stories); without it a row group is read when needed.
        source = pq.ParquetFile(path, pre_buffer=False)
    except pa.ArrowInvalid as exc:
        raise pa.ArrowInvalid(f"Could not open Parquet input source '{path}': {exc}") from exc
    if "text" not in source.schema_arrow.names:
        source.close()
        # iter_batches would quietly yield batches without columns.
        raise pa.ArrowInvalid(f"No match for FieldRef.Name(text) in {source.schema_arrow}")
    return source


def story_batches(path: str | Path) -> Iterator[pa.RecordBatch]:
    """The `text` column of a parquet file, READ_BATCH_STORIES rows at a time, in file order."""
    with open_stories(path) as source:
        yield from source.iter_batches(batch_size=READ_BATCH_STORIES, columns=["text"])


def story_schema(path: str | Path) -> pa.Schema:
    """The schema of `path`'s text column as pq.read_table reads it: the `text` field (string or
    large_string) and the file's metadata (the hub's `huggingface` key), which a table keeps."""
    with open_stories(path) as source:
        schema = source.schema_arrow
    return pa.schema([schema.field("text")], metadata=schema.metadata)


class StoryWriter:
    """Appends stories to a parquet file: the same bytes as write_stories of all of them at once,
    with only a row group's worth of them held.

    Rows are buffered and written ROW_GROUP_STORIES at a time, each row group copied into one
    contiguous array: the parquet writer cuts pages by the arrays it is given, so the row groups
    of write_table's single table are only matched by arrays laid out as its slices are.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema = schema
        self.stories = 0
        self._file = pq.ParquetWriter(path, schema, compression=STORY_COMPRESSION)
        # Rows not yet in a row group: the pieces given to write(), not a copy of them.
        self._pending = schema.empty_table()

    def write(self, stories: list[str] | pa.Table | pa.RecordBatch) -> None:
        if isinstance(stories, list):
            stories = pa.array(stories, type=self.schema.field("text").type)
        else:
            stories = stories.column(0)
        table = pa.Table.from_arrays([stories], schema=self.schema)
        self._pending = pa.concat_tables([self._pending, table])
        self.stories += table.num_rows
        while self._pending.num_rows >= ROW_GROUP_STORIES:
            self._write_row_group(ROW_GROUP_STORIES)

    def _write_row_group(self, n: int) -> None:
        self._file.write_table(self._pending.slice(0, n).combine_chunks(), row_group_size=ROW_GROUP_STORIES)
        self._pending = self._pending.slice(n)

    def finish(self) -> None:
        """Write the last, shorter row group and the footer. No stories at all make one empty row
        group, as write_table writes for an empty table."""
        if self._pending.num_rows or not self.stories:
            self._write_row_group(self._pending.num_rows)
        self._file.close()

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def story_writer(path: str | Path, schema: pa.Schema = STORY_SCHEMA):
    """Yield a StoryWriter for `path`, written atomically (see atomic_path)."""
    with atomic_path(path) as tmp, finished(StoryWriter(tmp, schema)) as writer:
        yield writer


@contextlib.contextmanager
def finished(writer: StoryWriter):
    """Yield `writer`; finish it when the block succeeds, else only close it."""
    try:
        yield writer
        writer.finish()
    except BaseException:
        # Only to let go of the file: the error that brought us here is the one to report.
        with contextlib.suppress(Exception):
            writer.close()
        raise


# How a full disk (or a quota, or a file-size limit) shows up: errno where the writer keeps it, else
# only the message: numpy's short write, SQLite (DVC's state, opened by dvclive).
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"no space left|file too large|disk quota|disk i/o error|database or disk is full"
                             r"|\d+ requested and \d+ written", re.IGNORECASE)


def _public(path: Path) -> Path:
    """The path a user knows: data/raw/train.parquet, not data/.raw.x1y2.tmp/train.parquet."""
    return Path(*(re.sub(r"^\.(.+)\.[a-z0-9_]+\.tmp$", r"\1", part) for part in path.parts))


def is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in _DISK_FULL_ERRNOS or bool(_DISK_FULL_TEXT.search(str(exc)))


def _raise_if_disk_error(exc: BaseException, path: Path) -> None:
    """Turn the write failures a user can fix into a one-line LibrarianError."""
    if isinstance(exc, LibrarianError):  # already says what to do, for the innermost path
        return
    if is_disk_full(exc):  # OSError from most writers; safetensors raises its own error type
        raise LibrarianError(f"no space left on the device (or a file-size limit) while writing {_public(path)}; "
                             "free some disk space and rerun") from exc
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        raise LibrarianError(f"cannot write {path}: {exc.strerror}; check the folder's permissions") from exc

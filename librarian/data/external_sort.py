"""Tables larger than memory, put in order on disk and written as parquet a bucket at a time.

A stage that must write rows in another order than it makes them in (chat_data: conversations are
numbered by their last story, but a first turn is any story of the split) keeps only a batch in
memory: it spills the rows to files, then reads them back in order. Every row's place in the output
is known when it is spilled, so this is a bucket sort without a merge: bucket b holds output rows
b * bucket_rows ... (b + 1) * bucket_rows - 1, and reading a bucket back puts its rows in place.

The files are Arrow IPC streams, lz4-compressed (quick to write and read back; they live only
until the output is written). Callers keep them in a folder inside their atomic_dir, so a failure
or a kill leaves none behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

import librarian.core.io
from librarian.core.io import StoryWriter, finished

SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
POSITION = "__position"  # each spilled row's place in the output, a column of the bucket files only


class Spill:
    """Record batches appended to a file, then read back in the order written, a batch at a time."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = Path(path), schema
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema, options=SPILL_OPTIONS)

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        self._writer.write(batch)

    def close(self) -> None:
        if not self._sink.closed:
            self._writer.close()
            self._sink.close()

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The batches written, in order (closing the file for writing first). Read from the file, not
        memory-mapped: mapped pages would count in the process's resident memory."""
        self.close()
        with pa.OSFile(str(self.path), "rb") as source:
            yield from pa.ipc.open_stream(source)

    def read_all(self) -> pa.Table:
        return pa.Table.from_batches(list(self.batches()), schema=self.schema)

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class PositionSort:
    """Rows spilled with the place each takes in the output, read back in that order, one bucket of
    `bucket_rows` consecutive places at a time: what bounds memory."""

    def __init__(self, folder: Path, schema: pa.Schema, rows: int, bucket_rows: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.rows, self.bucket_rows = rows, bucket_rows
        spilled = schema.append(pa.field(POSITION, pa.int64()))
        self._buckets = [Spill(folder / f"bucket-{b}.arrow", spilled) for b in range(-(-rows // bucket_rows))]

    def add(self, batch: pa.RecordBatch, positions: np.ndarray) -> None:
        """Spill `batch`, whose row i goes to output row positions[i]."""
        bucket = positions // self.bucket_rows
        order = np.argsort(bucket, kind="stable")
        batch = batch.append_column(POSITION, pa.array(positions, pa.int64())).take(order)
        bounds = np.searchsorted(bucket[order], np.arange(len(self._buckets) + 1))
        for b in np.flatnonzero(np.diff(bounds)):
            self._buckets[b].write(batch.slice(bounds[b], bounds[b + 1] - bounds[b]))

    def tables(self) -> Iterator[pa.Table]:
        """Every bucket's rows in output order, bucket after bucket: all rows, each once, in place."""
        for b, bucket in enumerate(self._buckets):
            table = bucket.read_all()
            bucket.remove()
            expected = min(self.bucket_rows, self.rows - b * self.bucket_rows)
            order = np.full(expected, -1)
            places = table.column(POSITION).to_numpy() - b * self.bucket_rows
            if len(places) == expected:
                order[places] = np.arange(expected)
            if len(places) != expected or (order < 0).any():
                raise AssertionError(f"bucket {b} of {self._buckets[b].path.parent} got {len(places)} rows for "
                                     f"{expected} places, not one each")
            in_order = table.drop_columns([POSITION]).take(order)
            del table  # one copy of the bucket held, not two
            yield in_order

    def close(self) -> None:
        for bucket in self._buckets:
            bucket.close()


class TableWriter(StoryWriter):
    """StoryWriter for a table of any columns: rows appended a piece at a time make the same bytes
    as pq.write_table of all of them at once (compression="zstd", row_group_size=ROW_GROUP_STORIES)."""

    def write(self, table: pa.Table) -> None:
        self._pending = pa.concat_tables([self._pending, pa.Table.from_arrays(table.columns, schema=self.schema)])
        self.stories += table.num_rows
        while self._pending.num_rows >= librarian.core.io.ROW_GROUP_STORIES:  # read here, as tests set it
            self._write_row_group(librarian.core.io.ROW_GROUP_STORIES)


@contextlib.contextmanager
def table_writer(path: Path, schema: pa.Schema):
    """Yield a TableWriter for `path` (inside the caller's atomic_dir); finished on success."""
    with finished(TableWriter(path, schema)) as writer:
        yield writer

"""The subsample stage: a seeded random share of the train split, in corpus order."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from librarian.core.errors import LibrarianError
from librarian.core.io import StoryWriter, atomic_dir, open_stories, story_batches, story_schema, story_writer
from librarian.core.rng import rng_for


def pick(n_stories: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n) stories drawn without replacement."""
    keep = round(n_stories * fraction)
    if keep == 0:
        raise LibrarianError(
            f"data.fraction {fraction} of {n_stories} train stories keeps none; raise data.fraction"
        )
    return np.sort(rng_for(seed, "subsample").choice(n_stories, size=keep, replace=False))


def write_chosen(train: Path, chosen: np.ndarray, writer: StoryWriter) -> None:
    """Stream `train` batch by batch into `writer`, keeping the rows whose indices are in `chosen` (sorted)."""
    start = 0
    for batch in story_batches(train):
        first, end = np.searchsorted(chosen, [start, start + batch.num_rows])
        # Arrow's take() copies only the chosen rows: the train split never becomes Python strings.
        writer.write(batch.take(chosen[first:end] - start))
        start += batch.num_rows


def subsample(raw_dir: str | Path, out_dir: str | Path, fraction: float, seed: int) -> dict:
    """Write out_dir/train.parquet (the sample) and copy the official validation split as it is.

    The choice needs only the number of stories, from the file's footer; the stories are then
    streamed a batch at a time, so memory holds one batch and the chosen indices (8 bytes each).
    """
    raw_dir = Path(raw_dir)
    train = raw_dir / "train.parquet"
    if not train.is_file():
        raise LibrarianError(f"{raw_dir} has no train.parquet; run `dvc repro download` first")
    with open_stories(train) as source:
        n_stories = source.metadata.num_rows
    chosen = pick(n_stories, fraction, seed)
    with atomic_dir(out_dir) as tmp:
        # The sample keeps the raw file's schema, as a table read from it would (the hub's metadata).
        with story_writer(tmp / "train.parquet", story_schema(train)) as sample:
            write_chosen(train, chosen, sample)
        if (raw_dir / "validation.parquet").exists():
            shutil.copyfile(raw_dir / "validation.parquet", tmp / "validation.parquet")
    return {"stories_in": n_stories, "stories_out": sample.stories}

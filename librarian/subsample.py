"""The subsample stage: a seeded random share of the train split, in corpus order."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from librarian.errors import LibrarianError
from librarian.io import atomic_dir, write_stories
from librarian.rng import rng_for


def pick(n_stories: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n) stories drawn without replacement."""
    keep = round(n_stories * fraction)
    if keep == 0:
        raise LibrarianError(
            f"data.fraction {fraction} of {n_stories} train stories keeps none; raise data.fraction"
        )
    return np.sort(rng_for(seed, "subsample").choice(n_stories, size=keep, replace=False))


def subsample(raw_dir: str | Path, out_dir: str | Path, fraction: float, seed: int) -> dict:
    """Write out_dir/train.parquet (the sample) and copy the official validation split as it is."""
    raw_dir = Path(raw_dir)
    if not (raw_dir / "train.parquet").is_file():
        raise LibrarianError(f"{raw_dir} has no train.parquet; run `dvc repro download` first")
    # Arrow's take() copies only the chosen rows: the full 2 GB train split never becomes Python strings.
    table = pq.read_table(raw_dir / "train.parquet", columns=["text"])
    sample = table.take(pick(table.num_rows, fraction, seed))
    with atomic_dir(out_dir) as tmp:
        write_stories(tmp / "train.parquet", sample)
        if (raw_dir / "validation.parquet").exists():
            shutil.copyfile(raw_dir / "validation.parquet", tmp / "validation.parquet")
    return {"stories_in": table.num_rows, "stories_out": sample.num_rows}

"""Seeded random streams: one independent, reproducible generator per purpose."""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """A generator for `purpose` derived from the global seed.

    Keying by purpose keeps streams independent: changing how the split draws numbers never changes
    which stories the subsample picks.
    """
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])

"""Fixtures of the training tests: token files of learnable stories and the tiny model's params."""

import pytest

from tests.helpers import TINY_MODEL, VOCAB, stories, write_tokens


@pytest.fixture
def tokens_dir(tmp_path):
    d = tmp_path / "tokens"
    write_tokens(d, "train", stories(150, seed=1), VOCAB)
    write_tokens(d, "val", stories(30, seed=2), VOCAB)
    return d


@pytest.fixture
def tiny_params(make_params):
    """Params of the tiny model (TINY_MODEL) with overrides: tiny_params(**{"train.max_epochs": 2})."""
    def make(**overrides):
        return make_params(**{**TINY_MODEL, **overrides})

    return make

import pytest

from librarian.errors import LibrarianError
from librarian.io import read_stories, write_stories
from librarian.subsample import pick, subsample


@pytest.fixture
def raw(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    write_stories(d / "train.parquet", [f"Story {i}." for i in range(5000)])
    write_stories(d / "validation.parquet", ["Val story."])
    return d


def test_same_seed_same_bytes(raw, tmp_path):
    subsample(raw, tmp_path / "a", 0.02, seed=3)
    subsample(raw, tmp_path / "b", 0.02, seed=3)
    subsample(raw, tmp_path / "c", 0.02, seed=4)
    a, b, c = ((tmp_path / x / "train.parquet").read_bytes() for x in "abc")
    assert a == b and a != c
    stories = read_stories(tmp_path / "a" / "train.parquet")
    assert len(stories) == 100 and len(set(stories)) == 100
    assert stories == sorted(stories, key=lambda s: int(s.split()[1][:-1]))  # corpus order
    assert read_stories(tmp_path / "a" / "validation.parquet") == ["Val story."]


def test_fraction_one_keeps_everything(raw, tmp_path):
    subsample(raw, tmp_path / "all", 1.0, seed=3)
    assert read_stories(tmp_path / "all" / "train.parquet") == read_stories(raw / "train.parquet")


def test_fraction_that_keeps_nothing_is_an_error(tmp_path):
    with pytest.raises(LibrarianError, match="data.fraction 0.02 of 10 train stories keeps none"):
        pick(10, 0.02, seed=0)


def test_missing_raw_split_is_a_clear_error(tmp_path):
    with pytest.raises(LibrarianError, match="has no train.parquet; run `dvc repro download` first"):
        subsample(tmp_path / "raw", tmp_path / "out", 0.5, seed=1)
    assert not (tmp_path / "out").exists()

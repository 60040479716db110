import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from librarian.core.errors import LibrarianError
from librarian.core.io import read_stories, write_stories
from librarian.data.subsample import pick, subsample
from tests.helpers import fixture_stories


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


# --- streaming: READ_BATCH_STORIES stories at a time, whatever the corpus' size ---------------------

ONE_BATCH = 10**9


def many_stories():
    """Numbered copies of the fixture's stories: a sample of them fills whole row groups of
    ROW_GROUP_STORIES (4096), whose pages show how the rows reached the parquet writer."""
    stories = fixture_stories()
    return [f"{story} Copy {i}." for i in range(14) for story in stories]


def write_raw(directory, stories):
    directory.mkdir(exist_ok=True)
    write_stories(directory / "train.parquet", stories)
    write_stories(directory / "validation.parquet", fixture_stories("validation-sample.txt.gz"))
    return directory


def subsample_in_memory(raw, out, fraction, seed):
    """What subsample wrote before it streamed: the chosen rows taken from the whole table."""
    table = pq.read_table(raw / "train.parquet", columns=["text"])
    write_stories(out, table.take(pick(table.num_rows, fraction, seed)))


def outputs(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_subsample_in_tiny_batches_writes_the_bytes_of_one_batch(tmp_path, monkeypatch):
    monkeypatch.setattr("librarian.core.io.ROW_GROUP_STORIES", 16)  # raw and sample in many row groups
    raw = write_raw(tmp_path / "raw", fixture_stories())
    runs = {}
    for batch in (3, 7, ONE_BATCH):
        monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", batch)
        counts = subsample(raw, tmp_path / str(batch), 0.3, seed=5)
        runs[batch] = counts, outputs(tmp_path / str(batch))
    assert runs[3] == runs[7] == runs[ONE_BATCH]
    assert runs[3][0] == {"stories_in": 370, "stories_out": 111}
    assert runs[3][1]["validation.parquet"] == (raw / "validation.parquet").read_bytes()


def test_the_sample_is_the_choice_of_pick_in_corpus_order(tmp_path, monkeypatch):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)
    raw = write_raw(tmp_path / "raw", fixture_stories())
    subsample(raw, tmp_path / "out", 0.25, seed=11)
    assert read_stories(tmp_path / "out" / "train.parquet") == [fixture_stories()[i] for i in pick(370, 0.25, seed=11)]


def test_subsample_writes_what_the_in_memory_subsample_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)
    raw = write_raw(tmp_path / "raw", many_stories())
    subsample(raw, tmp_path / "out", 0.9, seed=2)
    subsample_in_memory(raw, tmp_path / "expected.parquet", 0.9, seed=2)
    assert (tmp_path / "out" / "train.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()


def test_a_sample_of_a_hub_download_keeps_its_schema(tmp_path, monkeypatch):
    """The hub's train.parquet (written by `datasets`) has `string` text and a `huggingface` key."""
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)
    schema = pa.schema([("text", pa.string())], metadata={"huggingface": '{"info": {"features": {"text": {}}}}'})
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"text": many_stories()}, schema=schema), raw / "train.parquet", row_group_size=1000)
    subsample(raw, tmp_path / "out", 0.9, seed=2)
    subsample_in_memory(raw, tmp_path / "expected.parquet", 0.9, seed=2)
    assert (tmp_path / "out" / "train.parquet").read_bytes() == (tmp_path / "expected.parquet").read_bytes()
    assert pq.read_schema(tmp_path / "out" / "train.parquet").equals(schema, check_metadata=True)


@pytest.mark.parametrize("table,message", [
    (None, r"^Could not open Parquet input source '.*train.parquet': Parquet magic bytes not found"),
    (pa.table({"story": ["A story."]}), r"^No match for FieldRef.Name\(text\) in story: string"),
])
def test_a_broken_raw_split_fails_as_before(tmp_path, table, message):
    """The first line, which the stage prints, of pq.read_table's error, by which subsample read it."""
    raw = tmp_path / "raw"
    raw.mkdir()
    if table is None:
        (raw / "train.parquet").write_text("not parquet")
    else:
        pq.write_table(table, raw / "train.parquet")
    with pytest.raises(pa.ArrowInvalid, match=message):
        subsample(raw, tmp_path / "out", 0.5, seed=1)
    assert not (tmp_path / "out").exists()

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from librarian.core.errors import LibrarianError
from librarian.core.io import read_stories
from librarian.data.sources import download, read_local, shard_split
from tests.helpers import FIXTURE_CORPUS, ROOT, fixture_stories

STORIES = ["Once upon a time there was a cat.\nThe End.", "Lily liked \u201cred\u201d apples. She ate one!", "  Tom ran.  "]


def as_txt(stories):
    return "".join(f"{s}\n<|endoftext|>\n" for s in stories)


@pytest.fixture
def formats(tmp_path):
    """The same three stories in every supported local format."""
    (tmp_path / "s.txt").write_text(as_txt(STORIES), encoding="utf-8")
    (tmp_path / "s.txt.gz").write_bytes(gzip.compress(as_txt(STORIES).encode()))
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in STORIES) + "\n\n")
    (tmp_path / "story.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps({"story": s}) for s in STORIES).encode()))
    pq.write_table(pa.table({"text": STORIES, "id": [1, 2, 3]}), tmp_path / "s.parquet")
    pq.write_table(pa.table({"story": STORIES}), tmp_path / "story.parquet")
    return tmp_path


@pytest.mark.parametrize("name", ["s.txt", "s.txt.gz", "s.jsonl", "story.jsonl.gz", "s.parquet", "story.parquet"])
def test_each_local_format_reads_the_same_stories(formats, name):
    corpus = read_local(formats / name)
    expected = [s.strip() for s in STORIES] if ".txt" in name else STORIES
    assert corpus.splits == {"train": expected}
    assert corpus.manifest["shards"][0]["stories"] == 3 and len(corpus.manifest["shards"][0]["sha256"]) == 64


def test_folder_of_shards_keeps_validation_apart(tmp_path):
    (tmp_path / "b-train.txt").write_text(as_txt(["B"]))
    (tmp_path / "a-train.jsonl").write_text(json.dumps({"text": "A"}))
    (tmp_path / "TinyStories-valid.txt").write_text(as_txt(["V"]))
    (tmp_path / "notes.md").write_text("ignored")
    corpus = read_local(tmp_path)
    assert corpus.splits == {"train": ["A", "B"], "validation": ["V"]}  # shards in name order


@pytest.mark.parametrize(
    "name,split",
    [("TinyStories-valid.txt", "validation"), ("validation-00000-of-00001.parquet", "validation"),
     ("train-00000-of-00004.parquet", "train"), ("unknown-part-001-czhou578-val.txt.gz", "train"),
     ("TinyStories-train.txt", "train")],
)
def test_shard_split_by_name(tmp_path, name, split):
    assert shard_split(tmp_path / name) == split


def test_download_writes_parquet_and_manifest(tmp_path):
    out = tmp_path / "raw"
    manifest = download(str(FIXTURE_CORPUS), out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train.parquet", "validation.parquet"]
    assert read_stories(out / "train.parquet") == fixture_stories()
    assert manifest["splits"] == {"train": {"stories": 370}, "validation": {"stories": 40}}
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_relative_source_resolves_against_root(tmp_path):
    download("tests/fixtures/tinystories", tmp_path / "raw", root=ROOT)
    assert (tmp_path / "raw" / "train.parquet").exists()


_SEVERAL_BAD_LINES = ['{"text": "ok"}', '{"text": null}', '{"text": null}', '{"text": "ok"}', "{broken", "[1]",
                      '{"story": 5}'] + ['{"text": null}'] * 20
# kind -> (file name, its content: text, bytes, or a parquet table)
_BAD_FILES = {
    "empty file": ("empty.txt", ""),
    "binary garbage": ("garbage.txt", os.urandom(4096) + b"\x00"),
    "invalid utf-8": ("latin1.txt", "Once upon a time, caf\u00e9.".encode("latin-1")),
    "bad gzip": ("cut.txt.gz", gzip.compress(as_txt(STORIES * 50).encode())[:-20]),
    "wrong parquet schema": ("s.parquet", pa.table({"body": ["a"]})),
    "non-text parquet column": ("s.parquet", pa.table({"text": [1, 2]})),
    "not parquet": ("s.parquet", "hello"),
    "bad jsonl line": ("s.jsonl", '{"text": "ok"}\n{"text": broken\n'),
    "jsonl without text": ("s.jsonl", '{"title": "x"}\n'),
    "jsonl null text": ("s.jsonl", '{"text": null}\n{"text": "ok"}\n'),
    "several bad jsonl lines": ("s.jsonl", "\n".join(_SEVERAL_BAD_LINES) + "\n"),
    "unsupported suffix": ("s.csv", "text\nhello\n"),
}


def bad_source(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nowhere.txt"
    if kind in _BAD_FILES:
        name, content = _BAD_FILES[kind]
        p = tmp_path / name
        if isinstance(content, pa.Table):
            pq.write_table(content, p)
        elif isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p
    p = tmp_path / "src"
    p.mkdir()
    if kind == "folder without shards":
        (p / "readme.md").write_text("nothing here")
    elif kind == "only validation":
        (p / "validation.txt").write_text(as_txt(["V"]))
    return p


BAD_KINDS = {
    "missing": "does not exist",
    "empty file": "holds no train stories",
    "binary garbage": "binary data",
    "invalid utf-8": "not valid UTF-8",
    "bad gzip": "cannot read",
    "wrong parquet schema": "needs a 'text' or 'story' column",
    "non-text parquet column": "not text",
    "not parquet": "not a readable parquet file",
    "bad jsonl line": "line 2 is not valid JSON",
    "jsonl without text": "line 1 has no field 'text' or 'story'; fix or remove that line",
    "jsonl null text": 'line 1 has "text": null; fix or remove that line',
    # every bad line at once: the count, the first line numbers, the first line of each kind of problem
    "several bad jsonl lines": ('has 25 bad lines (2, 3, 5, 6, 7, 8, 9, 10, 11, 12, ...): line 2 has "text": null, '
                                "line 5 is not valid JSON (Expecting property name enclosed in double quotes), "
                                "line 6 is not a JSON object, ...; fix or remove them"),
    "unsupported suffix": "unsupported format",
    "folder without shards": "has no shard files",
    "only validation": "holds no train stories",
}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_source_gives_one_line_error_and_no_output(tmp_path, kind):
    out = tmp_path / "raw"
    with pytest.raises(LibrarianError) as info:
        download(str(bad_source(tmp_path, kind)), out)
    assert BAD_KINDS[kind] in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]  # no temp leftovers


# --- streaming: bounded batches, the same bytes, a shard bad halfway through ---------------------

def write_shard(path, stories, row_group_size=50):
    """`stories` as a shard of the format `path`'s name says; parquet in small row groups, as a
    string column (the hub's type), with a null (no story)."""
    if path.name.endswith(".parquet"):
        table = pa.table({"text": pa.array(stories + [None], type=pa.string())})
        pq.write_table(table, path, row_group_size=row_group_size)
    elif ".jsonl" in path.name:
        path.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in stories), encoding="utf-8")
    else:
        path.write_text(as_txt(stories), encoding="utf-8")


def sharded_source(tmp_path, suffix):
    """The fixture's stories (and STORIES) in two train shards and a validation shard; the stories
    each split should hold."""
    train, validation = STORIES + fixture_stories(), fixture_stories("validation-sample.txt.gz")
    source = tmp_path / "src"
    source.mkdir()
    write_shard(source / f"train-0{suffix}", train[:200])
    write_shard(source / f"train-1{suffix}", train[200:])
    write_shard(source / f"validation{suffix}", validation)
    expected = [s.strip() for s in train] if ".txt" in suffix else train
    return source, {"train": expected, "validation": validation}


def raw_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".txt"])
def test_tiny_batches_write_the_bytes_of_one_batch(tmp_path, monkeypatch, suffix):
    """Read 3 stories (or 5 bytes of text) at a time, or every shard in one batch: the same
    data/raw, byte for byte, and the same bytes as write_stories of all the stories at once."""
    import librarian.core.io
    import librarian.data.shards

    source, expected = sharded_source(tmp_path, suffix)
    monkeypatch.setattr(librarian.core.io, "ROW_GROUP_STORIES", 7)  # many row groups in each split
    runs = {}
    for name, stories, text_bytes in (("one", 10**6, 1 << 30), ("tiny", 3, 5)):
        monkeypatch.setattr(librarian.core.io, "READ_BATCH_STORIES", stories)
        monkeypatch.setattr(librarian.data.shards, "TEXT_BLOCK_BYTES", text_bytes)
        download(str(source), tmp_path / name)
        runs[name] = raw_bytes(tmp_path / name)
    assert runs["tiny"] == runs["one"]
    for split, stories in expected.items():
        librarian.core.io.write_stories(tmp_path / f"{split}.parquet", stories)
        assert runs["one"][f"{split}.parquet"] == (tmp_path / f"{split}.parquet").read_bytes()
    manifest = json.loads(runs["one"]["manifest.json"])
    assert manifest["splits"] == {split: {"stories": len(s)} for split, s in expected.items()}


def count_writes(monkeypatch) -> list:
    """The batches download appends to its outputs, from now on."""
    import librarian.core.io

    written, write = [], librarian.core.io.StoryWriter.write
    monkeypatch.setattr(librarian.core.io.StoryWriter, "write", lambda self, batch: written.append(write(self, batch)))
    return written


def assert_fails_with_nothing_written(tmp_path, source, *words):
    out = tmp_path / "raw"
    with pytest.raises(LibrarianError) as info:
        download(str(source), out)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert "\n" not in str(info.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]


@pytest.mark.parametrize("name", ["s.txt", "s.txt.gz", "s.jsonl", "s.jsonl.gz"])
def test_invalid_utf8_deep_in_a_shard_names_the_story(tmp_path, monkeypatch, name):
    """Invalid UTF-8 in the 10,000th story, after many batches were written: one line with the
    story (a .jsonl's line) and the byte offset, and no output."""
    import librarian.core.io
    import librarian.data.shards

    monkeypatch.setattr(librarian.core.io, "READ_BATCH_STORIES", 1000)
    monkeypatch.setattr(librarian.data.shards, "TEXT_BLOCK_BYTES", 4096)  # the shard (400 KB) in many blocks
    written = count_writes(monkeypatch)
    stories = [f"Story {i}: Tom ran to the park." for i in range(1, 10_001)]
    write_shard(tmp_path / "s.jsonl" if ".jsonl" in name else tmp_path / "s.txt", stories)
    data = (tmp_path / name.removesuffix(".gz")).read_bytes()
    offset = data.index(b"Story 10000:") + len("Story 10000: Tom")
    data = data[:offset] + "\u00e9".encode("latin-1") + data[offset + 1:]
    (tmp_path / name.removesuffix(".gz")).unlink()
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    row = "line 10000" if ".jsonl" in name else "story 10000"
    assert_fails_with_nothing_written(tmp_path, tmp_path / name,
                                      f"is not valid UTF-8 (bad byte at offset {offset}, {row})", "re-encode it as UTF-8")
    assert len(written) >= 9


def test_a_corrupt_row_group_names_its_rows(tmp_path, monkeypatch):
    """A parquet shard whose 6th row group (of 11) is damaged, after a good shard and five good
    row groups were written: one line with the rows, and no output."""
    import librarian.core.io

    monkeypatch.setattr(librarian.core.io, "READ_BATCH_STORIES", 3)
    written = count_writes(monkeypatch)
    source = tmp_path / "src"
    source.mkdir()
    write_shard(source / "train-0.parquet", STORIES)
    write_shard(source / "train-1.parquet", [f"Story {i}: Lily sang." for i in range(100)], row_group_size=10)
    chunk = pq.ParquetFile(source / "train-1.parquet").metadata.row_group(5).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    with open(source / "train-1.parquet", "r+b") as f:  # its pages' headers and data become zeros
        f.seek(start)
        f.write(bytes(chunk.total_compressed_size))
    assert_fails_with_nothing_written(tmp_path, source, "train-1.parquet rows 51-60 (row group 6 of 11) cannot be read",
                                      "re-download or re-export it")
    assert len(written) >= 1 + 5 * 4

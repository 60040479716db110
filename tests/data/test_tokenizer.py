import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from librarian.data.clean import clean_stories
from librarian.core.errors import LibrarianError
from librarian.core.io import write_stories
from librarian.data.tokenizer import EOT, PAD, load_tokenizer, save_tokenizer, train_tokenizer, train_tokenizer_on_split
from librarian.data.tokens import DTYPE, check_vocab_fits, tokenize_corpus
from tests.helpers import fixture_stories
from tests.dvc_project import code_env


@pytest.fixture(scope="module")
def corpus():
    from librarian.core.config import load_params
    from tests.helpers import ROOT

    params = load_params(ROOT / "params.yaml")
    stories, _ = clean_stories(fixture_stories(), params.clean)
    return stories


@pytest.fixture(scope="module")
def tokenizer_params():
    from librarian.core.config import load_params
    from tests.helpers import ROOT

    return load_params(ROOT / "params.yaml").tokenizer.model_copy(update={"vocab_size": 1000})


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, corpus, tokenizer_params):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer(corpus, tokenizer_params), path)
    return path


def test_training_is_byte_identical_across_runs(tmp_path, corpus, tokenizer_params, tokenizer_file):
    again = tmp_path / "again.json"
    save_tokenizer(train_tokenizer(iter(corpus), tokenizer_params, n_stories=len(corpus)), again)
    assert again.read_bytes() == tokenizer_file.read_bytes()


def test_training_streamed_from_the_split_equals_training_on_the_whole_list(tmp_path, corpus, tokenizer_params,
                                                                           tokenizer_file, monkeypatch):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)  # many batches, a short last one
    write_stories(tmp_path / "train.parquet", corpus)
    save_tokenizer(train_tokenizer_on_split(tmp_path / "train.parquet", tokenizer_params), tmp_path / "streamed.json")
    assert (tmp_path / "streamed.json").read_bytes() == tokenizer_file.read_bytes()


def test_training_on_a_missing_split_says_what_makes_it(tmp_path, tokenizer_params):
    with pytest.raises(LibrarianError, match="train.parquet not found; run `dvc repro clean` first"):
        train_tokenizer_on_split(tmp_path / "train.parquet", tokenizer_params)


def test_vocab_and_special_token_ids(tokenizer_file):
    tok = load_tokenizer(tokenizer_file)
    assert tok.get_vocab_size() == 1000
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(PAD) == 1
    assert tok.token_to_id("<|user|>") == 2 and tok.token_to_id("<|assistant|>") == 3


@pytest.mark.parametrize("text", ["Once upon a time, Lily said \"hi\".\nThe End.", "  leading and trailing  ",
                                  "Emoji 🐱 and ünïcödé, 中文, tabs\tand\r\nCRLF", ""])
def test_round_trip_is_exact(tokenizer_file, text):
    tok = load_tokenizer(tokenizer_file)
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_round_trip_on_every_fixture_story(tokenizer_file, corpus):
    tok = load_tokenizer(tokenizer_file)
    for story, enc in zip(corpus, tok.encode_batch(corpus)):
        assert tok.decode(enc.ids) == story


def test_invalid_and_truncated_tokenizer_files(tmp_path, tokenizer_file):
    cut = tmp_path / "cut.json"
    cut.write_bytes(tokenizer_file.read_bytes()[:5000])
    with pytest.raises(LibrarianError, match="invalid or truncated"):
        load_tokenizer(cut)
    with pytest.raises(LibrarianError, match="not found"):
        load_tokenizer(tmp_path / "none.json")
    bare = tmp_path / "bare.json"
    Tokenizer(models.BPE()).save(str(bare))
    with pytest.raises(LibrarianError, match=r"lacks the special tokens <\|endoftext\|>, <pad>"):
        load_tokenizer(bare)


def test_vocab_beyond_uint16_is_refused():
    tok = Tokenizer(models.BPE())
    tok.add_tokens([f"tok{i}" for i in range(65537)])
    with pytest.raises(LibrarianError, match="does not fit uint16"):
        check_vocab_fits(tok)


@pytest.fixture
def clean_dir(tmp_path, corpus):
    d = tmp_path / "clean"
    d.mkdir()
    write_stories(d / "train.parquet", corpus[:300])
    write_stories(d / "val.parquet", corpus[300:])
    return d


@pytest.mark.parametrize("chunk", [1, 7, 100000])
def test_chunked_tokenization_equals_whole_corpus_encoding(tmp_path, clean_dir, tokenizer_file, corpus, chunk):
    out = tmp_path / f"tokens-{chunk}"
    tokenize_corpus(clean_dir, tokenizer_file, out, chunk_stories=chunk)
    tok = load_tokenizer(tokenizer_file)
    whole = tok.encode("".join(f"{s}{EOT}" for s in corpus[:300])).ids
    assert np.fromfile(out / "train.bin", dtype=DTYPE).tolist() == whole


def test_token_files_and_sidecars(tmp_path, clean_dir, tokenizer_file, corpus):
    import hashlib

    out = tmp_path / "tokens"
    tokenize_corpus(clean_dir, tokenizer_file, out, chunk_stories=64)
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "train.json", "val.bin", "val.json"]
    for split, stories in (("train", corpus[:300]), ("val", corpus[300:])):
        ids = np.fromfile(out / f"{split}.bin", dtype=DTYPE)
        meta = json.loads((out / f"{split}.json").read_text())
        assert (out / f"{split}.bin").stat().st_size == 2 * meta["tokens"] == 2 * len(ids)
        assert meta["stories"] == len(stories) == int((ids == 0).sum())  # one <|endoftext|> per story
        assert ids[-1] == meta["eot_id"] == 0
        assert int(ids.max()) < meta["vocab_size"] == 1000
        assert meta["utf8_bytes"] == sum(len(s.encode()) for s in stories)
        assert meta["tokenizer_sha256"] == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()


# The tokenize stage's encoding with the tokenizers thread pool at the size in argv[1].
TOKENIZE_ON_THREADS = """
import os, sys
os.environ["RAYON_NUM_THREADS"] = sys.argv[1]  # before the pool starts, at the first encode
from librarian.data.tokens import tokenize_corpus
tokenize_corpus(sys.argv[2], sys.argv[3], sys.argv[4], chunk_stories=64)
"""


def test_tokenize_on_one_and_two_threads_writes_the_same_bytes(tmp_path, clean_dir, tokenizer_file):
    outputs = {}
    for threads in ("1", "2"):
        out = tmp_path / f"tokens-{threads}"
        subprocess.run([sys.executable, "-c", TOKENIZE_ON_THREADS, threads, str(clean_dir), str(tokenizer_file), str(out)],
                       env={**code_env(), "TOKENIZERS_PARALLELISM": "true"}, check=True, timeout=120)
        outputs[threads] = {path.name: path.read_bytes() for path in sorted(out.iterdir())}
    assert sorted(outputs["1"]) == ["train.bin", "train.json", "val.bin", "val.json"]
    assert outputs["1"] == outputs["2"]

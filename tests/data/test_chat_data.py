"""The chat_data stage and its lexicon: conversations from the fixture's clean stories, every request
answered by its reply, seeded and byte-stable, no story crossing splits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import librarian.data.chat_data as chat_data
import librarian.core.io
from librarian.data import words
from librarian.data.chat_data import (SPLITS, TEMPLATES, assign_kinds, build_chat_data, build_split, kind_quotas,
                                 main_character, offers, phrased_by, split_opening)
from librarian.data.external_sort import PositionSort
from librarian.core.config import REQUEST_KINDS, load_params
from librarian.core.errors import LibrarianError
from librarian.core.io import read_stories, write_stories
from librarian.core.rng import rng_for
from tests.helpers import ROOT, fixture_stories, set_dotted

EXPECTED_SCHEMA = pa.schema([("conversation", pa.int64()), ("turn", pa.int64()), ("kind", pa.string()),
                             ("request", pa.string()), ("reply", pa.string()), ("words", pa.list_(pa.string())),
                             ("character", pa.string()), ("story", pa.int64())])


def params_file(folder: Path, **overrides) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        set_dotted(raw, dotted, value)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def params(tmp: Path, **overrides):
    return load_params(params_file(tmp, **overrides))


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    """The fixture corpus through the clean stage (in-process), as data/clean."""
    from librarian.data.clean import clean_corpus

    root = tmp_path_factory.mktemp("clean")
    write_stories(root / "subsample" / "train.parquet", fixture_stories())
    clean_corpus(root / "subsample", root / "clean", root / "clean.json", load_params(ROOT / "params.yaml"))
    return root / "clean"


@pytest.fixture(scope="module")
def clean(clean_dir) -> dict[str, list[str]]:
    return {split: read_stories(clean_dir / f"{split}.parquet") for split in SPLITS}


@pytest.fixture(scope="module")
def built(clean_dir, tmp_path_factory) -> Path:
    """A project folder with data/chat and metrics/chat_data.json built from the fixture, with the committed params."""
    root = tmp_path_factory.mktemp("built")
    build_chat_data(clean_dir, root / "data" / "chat", root / "metrics" / "chat_data.json", params(root))
    return root


@pytest.fixture(scope="module")
def tables(built) -> dict[str, pd.DataFrame]:
    return {split: pd.read_parquet(built / "data" / "chat" / f"{split}.parquet") for split in SPLITS}


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in [*(root / "data" / "chat").glob("*.parquet"), root / "metrics" / "chat_data.json"]}


# --- the table --------------------------------------------------------------------------------------


def test_schema_order_and_numbering(built, tables):
    for split, table in tables.items():
        schema = pq.read_schema(built / "data" / "chat" / f"{split}.parquet")
        assert schema.remove_metadata().equals(EXPECTED_SCHEMA, check_metadata=False), schema
        assert schema.metadata is None  # no pandas metadata: nothing in the file but the data
        assert list(table.columns) == EXPECTED_SCHEMA.names
        conv, turn = table["conversation"].to_numpy(), table["turn"].to_numpy()
        assert list(zip(conv, turn)) == sorted(zip(conv, turn))
        assert sorted(set(conv)) == list(range(conv.max() + 1))
        for _, group in table.groupby("conversation"):
            assert list(group["turn"]) == list(range(len(group)))
        assert set(table["kind"]) <= set(REQUEST_KINDS)


def test_two_builds_are_byte_identical_and_another_seed_draws_other_requests(clean_dir, built, tables, tmp_path):
    again = tmp_path / "again"
    build_chat_data(clean_dir, again / "data" / "chat", again / "metrics" / "chat_data.json", params(tmp_path))
    assert files(again) == files(built)

    other = tmp_path / "other"
    build_chat_data(clean_dir, other / "data" / "chat", other / "metrics" / "chat_data.json", params(tmp_path, seed=7))
    reseeded = pd.read_parquet(other / "data" / "chat" / "train.parquet")
    assert list(reseeded["request"]) != list(tables["train"]["request"])
    assert list(reseeded["story"]) != list(tables["train"]["story"])  # another pairing into conversations


def test_the_stage_script_writes_the_same_bytes_in_another_process(clean_dir, built, tmp_path):
    """Run as DVC runs it (another process, so another string hash seed): the same files as in-process."""
    (tmp_path / "metrics").mkdir()
    result = subprocess.run([sys.executable, "-m", "stages.chat_data", str(clean_dir), "data/chat",
                             "metrics/chat_data.json", "--params", str(params_file(tmp_path))],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "123"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("chat_data: train ") and "conversations" in result.stdout
    assert files(tmp_path) == files(built)


# --- no leakage, each story once --------------------------------------------------------------------


def test_every_story_of_a_split_is_one_reply_of_that_split_only(tables, clean):
    for split, table in tables.items():
        stories = clean[split]
        assert sorted(table["story"]) == list(range(len(stories)))  # each story exactly once
        others = {s for other in SPLITS if other != split for s in clean[other]}
        for row in table.itertuples():
            story = stories[row.story]
            if row.kind == "opening":
                assert story.endswith(row.reply) and row.reply != story
            else:
                assert row.reply == story
            assert row.reply not in others


# --- every request is answered ----------------------------------------------------------------------


def test_every_request_is_answered_by_its_reply(tables, clean):
    seen = set()
    for split, table in tables.items():
        for row in table.itertuples():
            seen.add(row.kind)
            assert phrased_by(row.request, {row.kind: TEMPLATES[row.kind]}), row.request
            assert (list(row.words) != []) == (row.kind == "words")
            assert (row.character != "") == (row.kind == "character")
            if row.kind == "words":
                assert len(row.words) == 3 and len(set(row.words)) == 3
                assert all(words.mentions(row.reply, w) for w in row.words), (row.words, row.reply)
                # Named in the request in the column's order.
                positions = [re.search(rf"\b{w}\b", row.request).start() for w in row.words]
                assert positions == sorted(positions), row.request
                found = words.content_words(row.reply)
                # One noun, one verb, one adjective of the story.
                parts = sorted(part for w in row.words for part in words.PARTS_OF_SPEECH if w in found[part])
                assert parts == sorted(words.PARTS_OF_SPEECH), (row.words, found)
                names = {n.lower() for n in words.capitalised_mid_sentence(row.reply)}
                assert not names & set(row.words), (row.words, names)
            elif row.kind == "character":
                assert re.search(rf"\b{re.escape(row.character)}\b", row.reply)
                assert re.search(rf"\b{re.escape(row.character)}\b", row.request)
            elif row.kind == "opening":
                story = clean[split][row.story]
                opening = story[: len(story) - len(row.reply)].strip()
                assert re.search(r"[.!?][\"']?$", opening), opening
                assert row.request.count(opening) == 1 and "\n" not in opening
                assert row.reply and row.reply == row.reply.strip()
    assert seen == set(REQUEST_KINDS)


def test_the_shares_roughly_hold_and_two_turn_conversations_pair_two_stories(built, tables):
    metrics = json.loads((built / "metrics" / "chat_data.json").read_text())
    mix = load_params(ROOT / "params.yaml").chat_data
    train = metrics["train"]
    assert train["turns"] == len(tables["train"]) > 300
    for kind in REQUEST_KINDS:
        # Dealt by quota: the mix to the story.
        assert train[kind] == round(train["turns"] * getattr(mix.mix, kind)), (kind, train)
    assert abs(train["multi_turn"] / train["conversations"] - mix.multi_turn) < 0.01
    for split, table in tables.items():
        sizes = table.groupby("conversation").size()
        assert metrics[split]["conversations"] == len(sizes) and metrics[split]["multi_turn"] == (sizes == 2).sum() > 0
        assert set(sizes) == {1, 2}
        assert metrics[split]["turns"] == sum(metrics[split][k] for k in REQUEST_KINDS)
        counts = table["kind"].value_counts()
        assert all(metrics[split][k] == counts.get(k, 0) for k in REQUEST_KINDS)


def test_a_single_kind_mix_gives_that_kind_wherever_a_story_carries_it(clean, tmp_path):
    stories = clean["train"]
    only_words, _ = build_split(stories, params(tmp_path, **{"chat_data.mix": {"words": 1.0, "character": 0.0,
                                                                             "opening": 0.0, "plain": 0.0},
                                                         "chat_data.multi_turn": 0.0}).chat_data, rng_for(0, "t"))
    within = params(tmp_path).chat_data.words_within
    carries = [offers(s, within)["words"] is not None for s in stories]
    assert list(only_words.sort_values("story")["kind"]) == ["words" if c else "plain" for c in carries]
    assert only_words["conversation"].nunique() == len(stories)


@pytest.mark.parametrize("within", [12, 40])
def test_requested_words_come_from_the_start_of_the_story_when_asked(clean, tmp_path, within):
    """words_within: the words a model with a short context can write while it still sees the request."""
    table, _ = build_split(clean["train"], params(tmp_path, **{"chat_data.words_within": within}).chat_data,
                           rng_for(0, "t"))
    asked = table[table["kind"] == "words"]
    assert len(asked) > 10
    for row in asked.itertuples():
        head = " ".join(row.reply.split()[:within])
        assert all(words.mentions(head, word) for word in row.words), (row.words, head)
    anywhere, _ = build_split(clean["train"], params(tmp_path, **{"chat_data.words_within": 0}).chat_data,
                              rng_for(0, "t"))
    late = [row for row in anywhere[anywhere["kind"] == "words"].itertuples()
            if not all(words.mentions(" ".join(row.reply.split()[:within]), w) for w in row.words)]
    assert late, "without the limit some words come from later in the story"


# --- the kinds a story can carry ----------------------------------------------------------------------


def test_what_a_one_sentence_story_without_a_name_can_carry():
    offered = offers("Once upon a time a happy girl jumped over a fence with her friend and found a bone.")
    assert offered["opening"] is None and offered["character"] is None
    # dog, fence, bone: nouns and verbs; found: the past of find or the verb to found. Ambiguous all.
    assert offered["words"] == {"NOUN": ["friend", "girl"], "VERB": ["jump"], "ADJ": ["happy"]}
    assert offered["plain"] is not None


def test_kinds_are_dealt_by_quota_among_the_stories_that_can_carry_them():
    # Half the stories can carry a character request (every other one); all can carry words and plain.
    can = np.array([[1, 1, 0, 1], [1, 0, 0, 1]] * 50, dtype=bool)
    kinds = assign_kinds(can, np.array([0.5, 0.3, 0.0, 0.2]), np.random.default_rng(0))
    assert list(np.bincount(kinds, minlength=4)) == [50, 30, 0, 20]  # the mix, exactly
    assert can[np.arange(100), kinds].all()  # never a kind a story cannot carry
    # The scarce kind chooses first: all 50 character carriers are needed for a share of 0.5.
    kinds = assign_kinds(can, np.array([0.5, 0.5, 0.0, 0.0]), np.random.default_rng(0))
    assert list(np.bincount(kinds, minlength=4)) == [50, 50, 0, 0]
    # More than the stories can carry: the rest go to the kinds they can carry, else plain.
    kinds = assign_kinds(can, np.array([0.0, 0.8, 0.2, 0.0]), np.random.default_rng(0))
    assert list(np.bincount(kinds, minlength=4)) == [0, 50, 0, 50]
    assert list(kind_quotas(18, np.array([0.45, 0.3, 0.1, 0.15]))) == [8, 5, 2, 3]  # sums to 18


@pytest.mark.parametrize("story,expected", [
    ("Once upon a time, there was a little girl named Lily. Lily had a cat. Tom said hi to Lily.", ("Lily", "girl")),
    ("An old owl named Hoot lived in a tree. A boy named Sam came by. Hoot said hello. Hoot smiled.", ("Hoot", "owl")),
    ('Tom and Sue went out. Tom saw a dog. "Look, Sue!" said Tom.', ("Tom", "")),
    ("The cat sat on the mat. Mom said hi to the cat. Mom left.", None),  # a role, not a name
    ("Suddenly the dog ran. Suddenly it stopped.", None),  # capitalised only where sentences start
    ("The girl went to see Ben. She had fun.", None),  # a passing mention
])
def test_main_character(story, expected):
    assert main_character(story) == expected


@pytest.mark.parametrize("story,expected", [
    ("Mr. Brown had a dog. It ran away.", ("Mr. Brown had a dog.", "It ran away.")),
    ('"Hello!" said Tom. Then he left.', ('"Hello!" said Tom.', "Then he left.")),
    ('She said, "Come here." Tom came.', ('She said, "Come here."', "Tom came.")),
    ("The Big Day\nOnce upon a time. The end.", None),  # a title line is no sentence
    ("Only one sentence here.", None),
])
def test_split_opening(story, expected):
    assert split_opening(story) == expected


# --- the lexicon --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,word,expected", [
    ("The frog Jumped high.", "jump", True), ("She was jumping.", "jump", True), ("He ran home.", "run", True),
    ("Two balls rolled.", "ball", True), ("She felt happier.", "happy", True), ("The happiest day.", "happy", True),
    ("She loves ballet.", "ball", False), ("a jumper", "jump", False), ("unhappy", "happy", False),
    ("The dog's bone.", "dog", True), ("A zorblat!", "zorblat", True), ("", "cat", False),
])
def test_mentions(text, word, expected):
    assert words.mentions(text, word) is expected


def test_word_forms_join_a_lemma_and_its_inflections():
    assert words.word_forms("jumped") == words.word_forms("jump") >= {"jump", "jumps", "jumped", "jumping"}
    assert {"happy", "happier", "happiest"} <= words.word_forms("Happier")
    assert {"ball", "balls"} <= words.word_forms("ball") and "ballet" not in words.word_forms("ball")
    assert words.word_forms("zorblat") == {"zorblat"}


def test_content_words_are_lemmas_of_unambiguous_lowercase_words():
    story = ("Tom gave Lily a lily. Lily jumped over the fence with her friend. She was happier than ever "
             "and played all day. It was very big. They said goodbye.")
    found = words.content_words(story)
    assert "jump" in found["VERB"] and "jumped" not in found["VERB"]  # the lemma is asked for
    assert "happy" in found["ADJ"] and "big" in found["ADJ"]
    assert "friend" in found["NOUN"]
    assert "lily" not in found["NOUN"]  # a name in this story, even when written in lowercase
    assert "very" not in found["ADJ"]  # adjective and adverb: ambiguous
    assert "fence" not in found["NOUN"]  # noun and verb ("to fence"): ambiguous
    assert "they" not in found["NOUN"] and "day" not in found["NOUN"] and "say" not in found["VERB"]


# --- bad input ----------------------------------------------------------------------------------------


def write_clean(folder: Path, splits: dict[str, list[str]]) -> Path:
    for split, stories in splits.items():
        write_stories(folder / f"{split}.parquet", stories)
    return folder


def assert_nothing_written(root: Path):
    assert not (root / "data" / "chat").exists()
    assert not (root / "metrics" / "chat_data.json").exists()
    leftovers = [p.name for folder in (root / "data", root / "metrics") if folder.exists() for p in folder.iterdir()]
    assert not leftovers, leftovers


def test_a_kind_with_a_share_but_no_conversation_in_a_split_is_an_error(clean, tmp_path):
    nameless = [f"Once upon a time a happy girl jumped with her friend. She was glad, time {i}." for i in range(20)]
    folder = write_clean(tmp_path / "clean", {"train": clean["train"], "val": nameless, "test": clean["test"]})
    with pytest.raises(LibrarianError) as error:
        build_chat_data(folder, tmp_path / "data" / "chat", tmp_path / "metrics" / "chat_data.json", params(tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert message == ("the val split has no character conversation although chat_data.mix.character is 0.3: "
                       "0 of its 20 stories can carry one; use more data (data.fraction, data.val_fraction) "
                       "or set chat_data.mix.character to 0")
    assert_nothing_written(tmp_path)
    # With that share set to 0, the same data is fine.
    build_chat_data(folder, tmp_path / "data" / "chat", tmp_path / "metrics" / "chat_data.json",
                    params(tmp_path, **{"chat_data.mix.character": 0.0, "chat_data.mix.plain": 0.45}))


def test_a_tiny_share_on_a_tiny_split_is_an_error(clean, tmp_path):
    folder = write_clean(tmp_path / "clean", {"train": clean["train"], "val": clean["val"][:3], "test": clean["test"]})
    with pytest.raises(LibrarianError, match=re.escape(
            "the val split has no opening conversation although chat_data.mix.opening is 0.01: 0.01 of its 3 stories "
            "rounds to none; use more data (data.fraction, data.val_fraction) or set chat_data.mix.opening to 0")):
        build_chat_data(folder, tmp_path / "data" / "chat", tmp_path / "metrics" / "chat_data.json",
                        params(tmp_path, **{"chat_data.mix.opening": 0.01, "chat_data.mix.plain": 0.24}))
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("break_it,words_in_message", [
    (lambda folder: (folder / "test.parquet").unlink(), ["test.parquet not found", "dvc repro clean"]),
    (lambda folder: (folder / "val.parquet").write_text("not parquet"), ["val.parquet is not a readable clean split",
                                                                         "dvc repro -f clean"]),
    (lambda folder: write_stories(folder / "val.parquet", ["A fine story. It ends.", "  "]),
     ["val.parquet: story 1 is empty", "dvc repro -f clean"]),
])
def test_broken_clean_splits_are_one_line_errors(clean, tmp_path, break_it, words_in_message):
    folder = write_clean(tmp_path / "clean", clean)
    break_it(folder)
    with pytest.raises(LibrarianError) as error:
        build_chat_data(folder, tmp_path / "data" / "chat", tmp_path / "metrics" / "chat_data.json", params(tmp_path))
    assert "\n" not in str(error.value)
    for word in words_in_message:
        assert word in str(error.value)
    assert_nothing_written(tmp_path)


# --- variants and held-out phrasings ----------------------------------------------------------------


@pytest.fixture(scope="module")
def varied(clean_dir, tmp_path_factory) -> Path:
    """data/chat built with chat_data.variants 3."""
    root = tmp_path_factory.mktemp("varied")
    build_chat_data(clean_dir, root / "data" / "chat", root / "metrics" / "chat_data.json",
                    params(root, **{"chat_data.variants": 3}))
    return root / "data" / "chat"


def test_variants_draw_other_requests_from_the_same_train_stories(varied, built, clean):
    chat = built / "data" / "chat"
    assert sorted(p.name for p in varied.glob("*.parquet")) == sorted(
        ["train.parquet", "train-v1.parquet", "train-v2.parquet", "val.parquet", "test.parquet",
         "val_unseen.parquet", "test_unseen.parquet"])
    # Variant 0 is the train split of one variant: fine-tuning's data does not depend on chat_data.variants.
    assert (varied / "train.parquet").read_bytes() == (chat / "train.parquet").read_bytes()
    base = pd.read_parquet(varied / "train.parquet")
    for v in (1, 2):
        variant = pd.read_parquet(varied / f"train-v{v}.parquet")
        by_story = dict(zip(base["story"], base["request"])), dict(zip(variant["story"], variant["request"]))
        differ = sum(by_story[0][s] != by_story[1][s] for s in by_story[0])
        assert differ > 0.6 * len(by_story[0]), f"variant {v}: only {differ} requests differ"
        # Never across splits: every reply of a variant is a train story (or, for openings, the rest of one).
        train = clean["train"]
        assert all(reply in train[story] for reply, story in zip(variant["reply"], variant["story"], strict=True))
        assert set(variant["story"]) == set(range(len(train)))
    metrics = json.loads((varied.parent.parent / "metrics" / "chat_data.json").read_text())
    assert set(metrics) == {"train", "train-v1", "train-v2", "val", "test"}


def test_held_out_phrasings_never_occur_in_train_conversations(varied):
    from librarian.data.chat_data import HELD_OUT, TEMPLATES, phrased_by

    for path in varied.glob("train*.parquet"):
        requests = pd.read_parquet(path)["request"]
        assert not any(phrased_by(r, HELD_OUT) for r in requests), path.name
        assert all(phrased_by(r, TEMPLATES) for r in requests), path.name
    for split in ("val", "test"):
        seen, unseen = (pd.read_parquet(varied / f"{split}{suffix}.parquet") for suffix in ("", "_unseen"))
        same = [c for c in seen.columns if c != "request"]
        assert seen[same].equals(unseen[same])  # row for row the same conversations
        assert all(phrased_by(r, HELD_OUT) and not phrased_by(r, TEMPLATES) for r in unseen["request"])
        # The same ask: the words and the character named by the request are still in it.
        for row in unseen.itertuples():
            assert all(word in row.request for word in row.words) and row.character in row.request


def test_variants_below_one_are_refused(tmp_path):
    with pytest.raises(LibrarianError, match=r"chat_data.variants: input should be greater than or equal to 1"):
        params(tmp_path, **{"chat_data.variants": 0})


# --- streamed: a batch and a bucket at a time, the in-memory build's bytes -----------------------------


def in_memory_chat_data(clean_dir: Path, out_dir: Path, metrics_path: Path, params) -> None:
    """The stage as it was before it streamed, every split and table held whole: the oracle."""
    from librarian.data.chat_data import HELD_OUT_SPLITS, UNSEEN, held_out_table, split_counts, to_arrow

    settings, tables, metrics = params.chat_data, {}, {}
    for split in SPLITS:
        stories = read_stories(clean_dir / f"{split}.parquet")
        offered = [offers(story, settings.words_within) for story in stories]
        streams = {split: f"chat_data/{split}"} | ({f"{split}-v{v}": f"chat_data/{split}/variant-{v}"
                                                    for v in range(1, settings.variants)} if split == "train" else {})
        for name, stream in streams.items():
            tables[name], _ = build_split(stories, settings, rng_for(params.seed, stream), offered)
            metrics[name] = split_counts(tables[name])
        if split in HELD_OUT_SPLITS:
            tables[split + UNSEEN] = held_out_table(tables[split], offered, rng_for(params.seed, f"chat_data/{split}/unseen"))
    out_dir.mkdir(parents=True)
    for name, table in tables.items():
        pq.write_table(to_arrow(table), out_dir / f"{name}.parquet", compression="zstd",
                       row_group_size=librarian.core.io.ROW_GROUP_STORIES)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def streamed_files(clean_dir: Path, root: Path, p, monkeypatch, batch: int, bucket: int) -> dict[str, bytes]:
    monkeypatch.setattr(librarian.core.io, "READ_BATCH_STORIES", batch)
    monkeypatch.setattr(chat_data, "SORT_BUCKET_ROWS", bucket)
    build_chat_data(clean_dir, root / "data" / "chat", root / "metrics" / "chat_data.json", p)
    assert sorted(q.name for q in (root / "data" / "chat").iterdir()) == sorted(
        q.name for q in (root / "data" / "chat").glob("*.parquet"))  # no temporaries left in the output
    return files(root)


@pytest.mark.parametrize("overrides", [{}, {"chat_data.variants": 2}, {"chat_data.multi_turn": 0.0},
                                       {"chat_data.multi_turn": 0.5}], ids=["default", "variants-2", "multi-0", "multi-0.5"])
def test_tiny_batches_and_buckets_give_the_in_memory_builds_bytes(clean_dir, tmp_path, monkeypatch, overrides):
    monkeypatch.setattr(librarian.core.io, "ROW_GROUP_STORIES", 16)  # every table in many row groups
    p = params(tmp_path, **overrides)
    in_memory_chat_data(clean_dir, tmp_path / "memory" / "data" / "chat",
                        tmp_path / "memory" / "metrics" / "chat_data.json", p)
    oracle = files(tmp_path / "memory")
    assert len(oracle) == 5 + overrides.get("chat_data.variants", 1)  # 4 val/test tables, metrics, train(s)
    # 7-story batches with a short last one, 5-row buckets; one batch and one bucket for all.
    assert streamed_files(clean_dir, tmp_path / "tiny", p, monkeypatch, 7, 5) == oracle
    assert streamed_files(clean_dir, tmp_path / "whole", p, monkeypatch, 100_000, 100_000) == oracle


def test_the_committed_params_give_the_in_memory_bytes_at_the_real_row_group_size(clean_dir, built, tmp_path):
    in_memory_chat_data(clean_dir, tmp_path / "data" / "chat", tmp_path / "metrics" / "chat_data.json", params(tmp_path))
    assert files(tmp_path) == files(built)


def test_the_sort_holds_one_bucket_of_rows_at_a_time(clean_dir, tmp_path, monkeypatch):
    """What bounds memory: the sort yields SORT_BUCKET_ROWS rows at a time, and the stories are read in batches."""
    held, batches = [], []
    tables, iter_batches = PositionSort.tables, pq.ParquetFile.iter_batches

    def counted_tables(self):
        for table in tables(self):
            held.append(table.num_rows)
            yield table

    def counted_batches(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(PositionSort, "tables", counted_tables)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted_batches)
    streamed_files(clean_dir, tmp_path, params(tmp_path), monkeypatch, 7, 5)
    stories = sum(pq.ParquetFile(clean_dir / f"{split}.parquet").metadata.num_rows for split in SPLITS)
    assert max(held) == 5 and sum(held) == stories  # each of train, val, test: every row once, 5 at a time
    assert max(batches) == 7 and sum(batches) == 2 * stories  # pass 1 and pass 2 read every story once each


@pytest.mark.parametrize("stories", [0, 1, 2, 3, 10, 101])
@pytest.mark.parametrize("multi_turn", [0.0, 0.2, 0.5, 1.0])
def test_turn_places_is_the_conversation_plan_per_story(stories, multi_turn):
    from librarian.data.chat_data import conversation_plan, turn_places

    plan = conversation_plan(stories, multi_turn, np.random.default_rng(stories))
    conversation, turn, row = turn_places(stories, multi_turn, np.random.default_rng(stories))
    assert list(plan["story"]) == list(np.argsort(row))
    assert list(plan["conversation"]) == list(conversation[plan["story"]])
    assert list(plan["turn"]) == list(turn[plan["story"]])


@pytest.mark.parametrize("bucket", [1, 3, 64])
def test_position_sort_puts_every_row_in_its_place(tmp_path, bucket):
    rows = 50
    places = np.random.default_rng(bucket).permutation(rows)
    sort = PositionSort(tmp_path / "sort", pa.schema([("value", pa.int64())]), rows, bucket)
    for piece in np.array_split(np.arange(rows), 7):
        sort.add(pa.RecordBatch.from_arrays([pa.array(piece * 10)], names=["value"]), places[piece])
    out = pa.concat_tables(list(sort.tables()))
    assert out.column("value").to_pylist() == list(np.argsort(places) * 10)
    assert not list((tmp_path / "sort").iterdir())  # each bucket's file goes once it is read


def test_a_failure_midway_leaves_no_output_and_keeps_the_previous_one(clean_dir, tmp_path, monkeypatch):
    """An error while writing the last table (train and val done): neither a new output, nor a temporary,
    nor a damaged old output."""
    write_table = chat_data.write_table

    def fail_at_test(sort, path, held_out):
        write_table(sort, path, held_out)
        if path.name == "test.parquet":
            raise OSError("the disk caught fire")

    monkeypatch.setattr(chat_data, "write_table", fail_at_test)
    with pytest.raises(OSError, match="caught fire"):
        build_chat_data(clean_dir, tmp_path / "data" / "chat", tmp_path / "metrics" / "chat_data.json", params(tmp_path))
    assert_nothing_written(tmp_path)

    monkeypatch.setattr(chat_data, "write_table", write_table)
    before = streamed_files(clean_dir, tmp_path, params(tmp_path), monkeypatch, 7, 5)
    monkeypatch.setattr(chat_data, "write_table", fail_at_test)
    with pytest.raises(OSError, match="caught fire"):
        build_chat_data(clean_dir, tmp_path / "data" / "chat", tmp_path / "metrics" / "chat_data.json",
                        params(tmp_path, seed=7))
    assert files(tmp_path) == before
    assert sorted(q.name for q in (tmp_path / "data").iterdir()) == ["chat"]  # no .chat.*.tmp beside it

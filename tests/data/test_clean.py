import json
import random
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from librarian.data.clean import (
    OFFICIAL_VALIDATION,
    SPLITS,
    clean_corpus,
    clean_stories,
    clean_workers,
    is_fragment,
    normalise,
    normalise_whitespace,
    repair_mojibake,
    split_stories,
)
from librarian.core.errors import LibrarianError
from librarian.core.io import read_stories, write_stories
from tests.helpers import ROOT, fixture_stories
from tests.dvc_project import code_env

# Real lines from the hub's parquet (TinyStories v1 train, as shipped in tests/fixtures).
REAL_MOJIBAKE = [
    ("He said, â€œPlease help me move the big stone, I want to try to do it.â€ \n\nBut the",
     'He said, "Please help me move the big stone, I want to try to do it."\nBut the'),
    ("it is very expensive. Itâ€™s taking us to a magical place.\" \n\nShe",
     'it is very expensive. It\'s taking us to a magical place."\nShe'),
    ("Bear said to her, â€œBunny, sometimes we canâ€™t be brave",
     'Bear said to her, "Bunny, sometimes we can\'t be brave'),
]


@pytest.mark.parametrize("broken,fixed", REAL_MOJIBAKE)
def test_real_mojibake_is_repaired(broken, fixed):
    assert normalise(broken) == fixed


def test_every_fixture_mojibake_story_is_repaired():
    broken = [s for s in fixture_stories() if "â€" in s]
    assert len(broken) == 33
    for story in broken:
        text = normalise(story)
        assert "â" not in text and "€" not in text, text


def test_lost_closing_quote_before_newline_and_end():
    assert repair_mojibake("â€œHi!â€\nBye.") == "\u201cHi!\u201d\nBye."
    assert repair_mojibake("â€œHi!â€") == "\u201cHi!\u201d"
    assert repair_mojibake("Clean text, no change.") == "Clean text, no change."


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("\u201cHi,\u201d she said \u2014 \u2018twice\u2019\u2026", "\"Hi,\" she said - 'twice'..."),
        ("ﬁsh and ｆｕｌｌ width", "fish and full width"),  # NFKC
        ("zero\u200bwidth\ufeff and soft\u00adhyphen\x07", "zerowidth and softhyphen"),
        ("  many   spaces\there \r\n\r\n\n next\u2028line  ", "many spaces here\nnext\nline"),
    ],
)
def test_normalising_rules(raw, expected):
    assert normalise(raw) == expected


def test_counts_each_rule_and_filter(make_params):
    params = make_params(**{"clean.min_chars": 20, "clean.max_chars": 200})
    long_story = "A cat sat. " * 30
    stories = [
        "Once upon a time, a \u201cbig\u201d dog ran home.",  # punctuation
        "Once upon a time, a \u201cbig\u201d dog ran home.",  # duplicate after cleaning
        "Once upon a time, a \"big\" dog ran home.",  # duplicate of the normalised form
        "   ",  # empty after whitespace
        "Too short.",
        long_story,
        "Once upon a time, a girl went to the",  # fragment
        "Once upon a time, Ben said hi.\nThe End",  # "The End" is a proper ending
    ]
    kept, report = clean_stories(stories, params.clean)
    assert kept == ['Once upon a time, a "big" dog ran home.', "Once upon a time, Ben said hi.\nThe End"]
    assert report.dropped == {"empty": 1, "too_short": 1, "too_long": 1, "fragment": 1, "duplicate": 2}
    assert report.changed["ascii_punctuation"] == 2 and report.changed["whitespace"] == 2
    assert report.stories_in == 8 and report.stories_out == 2


@pytest.mark.parametrize("text,fragment", [("He ran.", False), ('"Yes!"', False), ("Why?", False),
                                           ("The End", False), ("the end!", False), ("and then", True),
                                           ("They hugged each", True)])
def test_fragments(text, fragment):
    assert is_fragment(text) is fragment


@pytest.mark.parametrize("text", ["猫が来た。", "「行こう！」と言った。", "「本当？」", "他很高兴。", "राम घर गया।",
                                  "هل أنت بخير؟", "ကလေး အိပ်သည်။", "Он ушёл.»"])
def test_sentence_ends_of_other_scripts_are_no_fragment(text):
    assert is_fragment(text) is False


# A Japanese and a Chinese story, as written: full-width ！ and ？ (NFKC makes them ASCII), 。 and 」.
JAPANESE = "ある日、小さな猫が公園に行きました。猫は赤いボールを見つけました！「これは何？」と猫は言いました。"
CHINESE = "从前，有一只小狗叫小白。小白很喜欢在花园里玩。有一天，它找到了一个红色的球！“真好玩！”它说。"


def test_chinese_and_japanese_stories_are_kept_and_their_cut_copies_dropped(make_params):
    params = make_params(**{"clean.min_chars": 5})
    stories = [JAPANESE, JAPANESE + "「ありがとう」", JAPANESE + "「行こう！」", CHINESE, "故事完了吗？",
               JAPANESE[:30], CHINESE[:25]]  # the last two are cut mid-sentence
    kept, report = clean_stories(stories, params.clean)
    assert kept == [normalise(s) for s in stories[:5]]
    assert kept[0].endswith("と猫は言いました。") and kept[2].endswith("「行こう!」")
    assert report.dropped["fragment"] == 2 and report.stories_out == 5


def test_drop_fragments_false_keeps_fragments(make_params):
    stories = ["Once upon a time, a girl went to the", "Tom ran home.", "ある日、小さな猫が"]
    kept, report = clean_stories(stories, make_params(**{"clean.min_chars": 5, "clean.drop_fragments": False}).clean)
    assert kept == stories and report.dropped["fragment"] == 0
    kept, report = clean_stories(stories, make_params(**{"clean.min_chars": 5}).clean)
    assert kept == ["Tom ran home."] and report.dropped["fragment"] == 2


def test_clean_corpus_without_the_fragment_filter_counts_no_fragment(tmp_path, make_params):
    src = tmp_path / "subsample"
    src.mkdir()
    write_stories(src / "train.parquet", fixture_stories())
    report = clean_corpus(src, tmp_path / "clean", tmp_path / "clean.json", make_params(**{"clean.drop_fragments": False}))
    pool = report["train_pool"]
    assert pool["dropped"]["fragment"] == 0 and pool["dropped"]["too_short"] == 1
    assert pool["stories_out"] == 370 - 1 - pool["dropped"]["duplicate"]  # the 9 fragments of the fixture are kept


def test_split_is_disjoint_complete_and_seeded():
    stories = [f"Story number {i}." for i in range(1000)]
    a = split_stories(stories, 0.1, 0.05, seed=7)
    b = split_stories(stories, 0.1, 0.05, seed=7)
    c = split_stories(stories, 0.1, 0.05, seed=8)
    assert a == b and a != c
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (850, 100, 50)
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(stories)
    assert a["val"] == sorted(a["val"], key=stories.index)  # corpus order kept


def test_split_refuses_an_empty_split():
    with pytest.raises(LibrarianError, match="leaves the val split empty"):
        split_stories(["a.", "b.", "c."], 0.05, 0.4, seed=1)


def test_clean_corpus_on_the_fixture(tmp_path, make_params):
    params = make_params()
    src = tmp_path / "subsample"
    src.mkdir()
    write_stories(src / "train.parquet", fixture_stories())
    # The official validation split shares two stories with train: they must not leak into it.
    validation = fixture_stories("validation-sample.txt.gz")
    write_stories(src / "validation.parquet", validation + fixture_stories()[:2])
    report = clean_corpus(src, tmp_path / "clean", tmp_path / "clean.json", params)
    assert json.loads((tmp_path / "clean.json").read_text()) == report
    pool = report["train_pool"]
    assert pool["stories_in"] == 370 and pool["changed"]["mojibake"] == 33
    assert pool["dropped"]["fragment"] == 9 and pool["dropped"]["too_short"] == 1
    assert report["official_validation"]["dropped"]["duplicate"] == 2
    splits = {name: read_stories(tmp_path / "clean" / f"{name}.parquet") for name in report["splits"]}
    assert sorted(splits) == ["official_validation", "test", "train", "val"]
    assert sum(len(splits[k]) for k in ("train", "val", "test")) == pool["stories_out"]
    train = set(splits["train"])
    assert not train & set(splits["val"]) and not train & set(splits["test"]) and not train & set(splits["official_validation"])


# --- streaming: READ_BATCH_STORIES stories at a time, whatever the corpus' size ---------------------

ONE_BATCH = 10**9


def write_subsample(directory, train, validation=None):
    directory.mkdir(exist_ok=True)
    write_stories(directory / "train.parquet", train)
    if validation is not None:
        write_stories(directory / "validation.parquet", validation)
    return directory


def fixture_with_duplicates(directory):
    """The fixture's splits, with copies far behind their first occurrences: in train a verbatim one
    and one that only normalising makes equal; in validation two train stories and one of its own."""
    train, validation = fixture_stories(), fixture_stories("validation-sample.txt.gz")
    copies = [train[3], train[5].replace(" ", "  ")]
    return write_subsample(directory, train + copies, validation + [train[0], train[100], validation[4]])


def clean_in_memory(src, params):
    """What clean_corpus made before it streamed: every split built whole from lists of stories."""
    pool, pool_report = clean_stories(read_stories(src / "train.parquet"), params.clean)
    splits = split_stories(pool, params.data.val_fraction, params.data.test_fraction, params.seed)
    official, official_report = clean_stories(read_stories(src / "validation.parquet"), params.clean, seen=set(pool))
    splits[OFFICIAL_VALIDATION] = official
    return splits, {"train_pool": pool_report.as_dict(), OFFICIAL_VALIDATION: official_report.as_dict(),
                    "splits": {name: len(stories) for name, stories in splits.items()}}


def clean_outputs(src, out, params, monkeypatch, batch, workers=None):
    """Every byte clean_corpus writes, file by file, reading `batch` stories at a time."""
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", batch)
    report = clean_corpus(src, out / "clean", out / "clean.json", params, workers=workers)
    return report, {path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


def test_clean_corpus_in_tiny_batches_writes_the_bytes_of_one_batch(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr("librarian.core.io.ROW_GROUP_STORIES", 16)  # every split in many row groups
    src, params = fixture_with_duplicates(tmp_path / "subsample"), make_params()
    runs = {batch: clean_outputs(src, tmp_path / str(batch), params, monkeypatch, batch) for batch in (3, 7, ONE_BATCH)}
    assert runs[3] == runs[7] == runs[ONE_BATCH]
    report, files = runs[3]
    # The temporary train pool is gone: the folder holds the splits only.
    splits = sorted(f"clean/{name}.parquet" for name in report["splits"])
    assert sorted(str(path) for path in files) == ["clean.json", *splits]
    assert report["train_pool"]["dropped"]["duplicate"] == 2
    assert report[OFFICIAL_VALIDATION]["dropped"]["duplicate"] == 3


def test_clean_corpus_writes_what_the_in_memory_clean_wrote(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)
    # Numbered copies of the fixture, so that train fills a whole row group of ROW_GROUP_STORIES
    # (4096): only then do its pages show how the rows reached the parquet writer.
    stories = fixture_stories()
    train = [f"{story} Copy {i}." for i in range(12) for story in stories]
    src = write_subsample(tmp_path / "subsample", train + train[:9], fixture_stories("validation-sample.txt.gz"))
    params = make_params()
    report = clean_corpus(src, tmp_path / "clean", tmp_path / "clean.json", params)
    splits, expected = clean_in_memory(src, params)
    assert report == expected and json.loads((tmp_path / "clean.json").read_text()) == expected
    for name, stories in splits.items():
        write_stories(tmp_path / "expected.parquet", stories)  # as the in-memory clean wrote each split
        written = (tmp_path / "clean" / f"{name}.parquet").read_bytes()
        assert written == (tmp_path / "expected.parquet").read_bytes(), name


def test_a_duplicate_in_a_later_batch_is_dropped_and_its_first_occurrence_kept(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)
    params = make_params()
    stories = fixture_stories()[:40]
    # Batch 0 holds the first occurrences, batch 5 their copies (one only equal once normalised).
    src = write_subsample(tmp_path / "subsample", stories + [stories[3], "  " + stories[5].replace(" ", "  ")])
    report = clean_corpus(src, tmp_path / "clean", tmp_path / "clean.json", params)
    assert report["train_pool"]["dropped"]["duplicate"] == 2
    # The splits of the corpus without the copies, in its order: the first occurrences were kept.
    expected = split_stories(clean_stories(stories, params.clean)[0], params.data.val_fraction,
                             params.data.test_fraction, params.seed)
    assert {name: read_stories(tmp_path / "clean" / f"{name}.parquet") for name in SPLITS} == \
        {name: expected[name] for name in SPLITS}


def test_official_validation_in_batches_keeps_no_train_pool_story(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 3)
    params = make_params()
    train, validation = fixture_stories(), fixture_stories("validation-sample.txt.gz")
    # Two train stories (of the pool's first batch and of a later one), and a repeat of validation's
    # own fifth story twelve batches after it.
    src = write_subsample(tmp_path / "subsample", train, validation[:10] + [train[0], train[100]] + validation[10:]
                          + [validation[4]])
    report = clean_corpus(src, tmp_path / "clean", tmp_path / "clean.json", params)
    assert report[OFFICIAL_VALIDATION]["dropped"]["duplicate"] == 3
    official = read_stories(tmp_path / "clean" / f"{OFFICIAL_VALIDATION}.parquet")
    assert official == clean_stories(validation, params.clean)[0]


@pytest.mark.parametrize("overrides,message", [
    ({"clean.min_chars": 5000}, "no story is left after cleaning 370 "),
    ({"data.val_fraction": 0.001}, "data.val_fraction of 360 clean stories leaves the val split empty"),
])
def test_clean_corpus_in_batches_fails_as_before_and_writes_nothing(tmp_path, make_params, monkeypatch, overrides,
                                                                    message):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)
    src = write_subsample(tmp_path / "subsample", fixture_stories(), fixture_stories("validation-sample.txt.gz"))
    with pytest.raises(LibrarianError, match=message):
        clean_corpus(src, tmp_path / "clean", tmp_path / "clean.json", make_params(**overrides))
    assert [path.name for path in tmp_path.iterdir()] == ["subsample"]  # no output, no temporary folder


# --- workers: the stories screened in other processes, dedup here ----------------------------------


def workers_of_this_process() -> set[int]:
    """The pids of this process's children, except multiprocessing's resource tracker: started with
    the first pool, it stays until this process exits (it outlives no stage)."""
    return {child.pid for child in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(child.cmdline())}


@pytest.mark.parametrize("batch", [3, 64])
def test_two_workers_write_the_bytes_and_counts_of_one(tmp_path, make_params, monkeypatch, batch):
    monkeypatch.setattr("librarian.core.io.ROW_GROUP_STORIES", 16)
    src, params = fixture_with_duplicates(tmp_path / "subsample"), make_params()
    before = workers_of_this_process()
    one = clean_outputs(src, tmp_path / "one", params, monkeypatch, batch, workers=1)
    two = clean_outputs(src, tmp_path / "two", params, monkeypatch, batch, workers=2)
    assert two == one  # report and every file, byte for byte
    report = two[0]
    assert report["train_pool"]["dropped"]["duplicate"] == 2 and report[OFFICIAL_VALIDATION]["dropped"]["duplicate"] == 3
    assert report["train_pool"]["stories_in"] == 372 and report["train_pool"]["changed"]["mojibake"] > 0
    assert workers_of_this_process() == before  # the pool is gone with the stage


def test_a_failing_clean_on_workers_leaves_no_worker(tmp_path, make_params, monkeypatch):
    monkeypatch.setattr("librarian.core.io.READ_BATCH_STORIES", 7)
    src = write_subsample(tmp_path / "subsample", fixture_stories(), fixture_stories("validation-sample.txt.gz"))
    before = workers_of_this_process()
    with pytest.raises(LibrarianError, match="no story is left after cleaning 370 "):
        clean_corpus(src, tmp_path / "clean", tmp_path / "clean.json", make_params(**{"clean.min_chars": 5000}), workers=2)
    assert workers_of_this_process() == before
    assert [path.name for path in tmp_path.iterdir()] == ["subsample"]


def test_workers_for_a_large_corpus_only(tmp_path, monkeypatch):
    src = write_subsample(tmp_path / "subsample", fixture_stories(), fixture_stories("validation-sample.txt.gz"))
    splits = [src / "train.parquet", src / "validation.parquet"]
    monkeypatch.setattr("librarian.data.clean.available_cores", lambda: 2)
    assert clean_workers(splits) == 1  # the fixture: starting workers would cost more than they save
    monkeypatch.setattr("librarian.data.clean.PARALLEL_MIN_STORIES", 370 + 10)  # train + validation
    assert clean_workers(splits) == 2
    assert clean_workers(splits[:1]) == 1
    monkeypatch.setattr("librarian.data.clean.available_cores", lambda: 1)
    assert clean_workers(splits) == 1


# The clean stage with its workers forced on the fixture, stopped in its third batch by the signal
# in argv[1] (sent to its whole process group for SIGINT, as Ctrl-C is). The pids of its workers go
# to argv[2] first.
STOPPED_STAGE = """
import os, signal, sys
import psutil
import librarian.data.clean as clean
import librarian.core.io
from stages.clean import main

librarian.core.io.READ_BATCH_STORIES = 7
clean.PARALLEL_MIN_STORIES, clean.available_cores = 0, lambda: 2
signum, pids = signal.Signals[sys.argv[1]], sys.argv[2]
first_occurrences, calls = clean.first_occurrences, []

def stop_in_the_third_batch(*args):
    calls.append(1)
    if len(calls) == 3:
        workers = [p.pid for p in psutil.Process().children() if "resource_tracker" not in " ".join(p.cmdline())]
        open(pids, "w").write(" ".join(map(str, workers)))
        os.killpg(0, signum) if signum == signal.SIGINT else os.kill(os.getpid(), signum)
    return first_occurrences(*args)

clean.first_occurrences = stop_in_the_third_batch
main(sys.argv[3:])
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("signum,code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGKILL", -9)])
def test_a_stopped_clean_leaves_no_worker_and_no_output(tmp_path, signum, code):
    (tmp_path / "data").mkdir()
    src = write_subsample(tmp_path / "data" / "subsample", fixture_stories(), fixture_stories("validation-sample.txt.gz"))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    pids = tmp_path / "workers.txt"
    args = [str(src), str(tmp_path / "data" / "clean"), str(tmp_path / "metrics" / "clean.json"),
            "--params", str(tmp_path / "params.yaml")]
    # A session of its own: its SIGINT reaches its process group, as Ctrl-C does, and not pytest.
    run = subprocess.run([sys.executable, "-c", STOPPED_STAGE, signum, str(pids), *args], cwd=ROOT, env=code_env(),
                         capture_output=True, text=True, timeout=120, start_new_session=True)
    assert run.returncode == code, run.stderr
    workers = [int(pid) for pid in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 10  # after kill -9 the kernel signals them: it may take a moment
    while not all(gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(pid) for pid in workers)
    assert "Traceback" not in run.stderr  # no worker speaks up
    assert not (tmp_path / "data" / "clean").exists() and not (tmp_path / "metrics").exists()
    if code > 0:  # unwound: the temporary folder is gone too (after kill -9, the next run removes it)
        assert run.stderr.strip().splitlines()[-1].startswith(("error: interrupted", "error: terminated"))
        assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["subsample"]


def old_normalise_whitespace(text: str) -> str:
    """The whitespace rule as regular expressions, as it was written before it was made faster."""
    text = re.sub(r"\r\n?|[\u2028\u2029\x85]", "\n", text)
    text = re.sub(r"[^\S\n]+", " ", text)
    return re.sub(r"\s*\n\s*", "\n", text).strip()


def test_the_whitespace_rule_equals_its_regular_expressions():
    # Every character Python counts as whitespace, line breaks of every kind, and a few others.
    spaces = [chr(i) for i in range(0x3001) if chr(i).isspace()] + ["\r\n", "\u200b", "\ufeff"]
    alphabet = spaces * 3 + ["a", "b", ".", "é", "中"]
    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert normalise_whitespace(text) == old_normalise_whitespace(text), repr(text)
    for story in fixture_stories():
        assert normalise_whitespace(story) == old_normalise_whitespace(story)

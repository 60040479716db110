"""evaluate_chat: recall arithmetic on replies we control, the request selection, reproducible JSON
for both models, and one-line errors for bad inputs. Tiny random models: speed, not quality."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import librarian.evaluation.evaluate_chat as evaluate_chat
from librarian.inference.chat import Turn
from librarian.inference.generate import GenerationOptions
from librarian.evaluation.evaluate_chat import Request, character_scores, names, select_multi_turn, select_requests, words_scores
from librarian.data.tokenizer import file_sha256, load_tokenizer
from stages.evaluate_chat import main as evaluate_chat_stage
from tests.helpers import ROOT, build_tiny, set_dotted, tiny_model, write_tokens

# (conversation, turn, kind, request, reply, words, character): a two-turn conversation among them
CONVERSATIONS = [
    (0, 0, "words", "Write a story that uses the words ball, jump and happy.",
     "Tom had a red ball. He jumped with it and was happy.", ["ball", "jump", "happy"], ""),
    (1, 0, "character", "Tell me a story about Tom.", "Tom was a little cat. Tom liked milk.", [], "Tom"),
    (2, 0, "plain", "Tell me a story.", "Once upon a time there was a big tree.", [], ""),
    (2, 1, "words", "Write a story that uses the words dog, run and big.",
     "A big dog liked to run in the park.", ["dog", "run", "big"], ""),
    (3, 0, "opening", "Continue this story: Lily found a box.", "Inside it was a small toy.", [], ""),
    (4, 0, "character", "Tell me a story about a girl named Lily.", "Lily played in the sun.", [], "Lily"),
    (5, 0, "words", "Write a story that uses the words cat, sleep and soft.",
     "The cat slept on a soft bed.", ["cat", "sleep", "soft"], ""),
]
N_WORDS, N_CHARACTER = 3, 2
# Each request as test_unseen.parquet phrases it, with templates no training conversation uses.
UNSEEN = dict(zip((row[3] for row in CONVERSATIONS), (
    "Can you make up a tale that has ball, jump and happy in it?",
    "Could you make up a tale about Tom?",
    "Make up a tale for me, please.",
    "Make up a story for me where dog, run and big all show up.",
    "Go on with this tale: Lily found a box.",
    "I'd like a story where someone named Lily goes on an adventure.",
    "I want a short story. Please put cat, sleep and soft in it.",
), strict=True))
COLUMNS = ["conversation", "turn", "kind", "request", "reply", "words", "character"]
MULTI_TURN_ROW = 3  # the words request of the two-turn conversation: also the second words request
SCHEMA = pa.schema([("conversation", pa.int64()), ("turn", pa.int64()), ("kind", pa.string()),
                    ("request", pa.string()), ("reply", pa.string()), ("words", pa.list_(pa.string())),
                    ("character", pa.string()), ("story", pa.int64())])
MODEL_KEYS = {"reply_loss", "reply_perplexity", "reply_tokens", "story_loss", "story_perplexity", "words_recall",
              "words_all", "words_requests", "character_recall", "character_requests", "words_recall_unseen",
              "words_all_unseen", "character_recall_unseen", "multi_turn_recall", "multi_turn_requests",
              "multi_turn_history_kept", "reply_fluency", "repetition",
              # the same, of replies sampled with guidance (evaluate_chat.guidance)
              "words_recall_guided", "words_all_guided", "character_recall_guided", "words_recall_guided_unseen",
              "words_all_guided_unseen", "character_recall_guided_unseen", "reply_fluency_guided", "repetition_guided"}
SMALL = {"model.context_length": 32, "eval.stride": 16, "eval.batch_size": 8, "train.stride": 32,
         "evaluate_chat.max_new_tokens": 12, "evaluate_chat.threads": 1}


def write_chat(folder: Path, rows=CONVERSATIONS, unseen: bool = True) -> Path:
    """A chat test split in chat_data's schema, and (with `unseen`) its held-out phrasings, row for row."""
    folder.mkdir(parents=True, exist_ok=True)
    write_table(folder / "test.parquet", rows)
    if unseen:
        write_table(folder / "test_unseen.parquet", held_out_rows(rows))
    return folder


def held_out_rows(rows):
    return [(*row[:3], UNSEEN[row[3]], *row[4:]) for row in rows]


def write_table(path: Path, rows) -> None:
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(7)]
    stories = list(range(len(rows)))
    pq.write_table(pa.table([*map(list, columns), stories], schema=SCHEMA), path)


@dataclass(frozen=True)
class Inputs:
    base: Path
    finetuned: Path
    tokenizer: Path
    chat: Path
    tokens: Path
    vocab: int


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    """Two tiny models (different weights) of one tokenizer, the story test tokens and a chat test split."""
    import numpy as np

    root = tmp_path_factory.mktemp("chat_eval")
    base, tokenizer = build_tiny(root, record_tokenizer=True)
    sha, vocab = file_sha256(tokenizer), load_tokenizer(tokenizer).get_vocab_size()
    finetuned = tiny_model(root / "chat_model" / "model.safetensors", vocab, seed=1, tokenizer_sha256=sha)
    write_tokens(root / "tokens", "test", np.random.default_rng(0).integers(1, vocab, 300), vocab)
    meta = json.loads((root / "tokens" / "test.json").read_text())
    (root / "tokens" / "test.json").write_text(json.dumps({**meta, "tokenizer_sha256": sha}))
    return Inputs(base, finetuned, tokenizer, write_chat(root / "chat"), root / "tokens", vocab)


@pytest.fixture(scope="module")
def long_context(inputs, tmp_path_factory) -> tuple[Path, Path]:
    """A base and a fine-tuned model whose 256-token context holds a two-turn conversation whole."""
    root, sha = tmp_path_factory.mktemp("long_context"), file_sha256(inputs.tokenizer)
    return tuple(tiny_model(root / name / "model.safetensors", inputs.vocab, context_length=256, seed=seed,
                            tokenizer_sha256=sha) for seed, name in ((2, "model"), (3, "chat_model")))


@pytest.fixture
def run(inputs, raw_params, tmp_path):
    """run(**overrides, finetuned=..., chat=..., base=...): the stage in-process; returns the output path."""

    def go(finetuned: Path | None = None, chat: Path | None = None, base: Path | None = None, **overrides) -> Path:
        for dotted, value in {**SMALL, **overrides}.items():
            set_dotted(raw_params, dotted, value)
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump(raw_params))
        out = tmp_path / "metrics" / "chat.json"
        evaluate_chat_stage([str(base or inputs.base), str(finetuned or inputs.finetuned), str(inputs.tokenizer),
                             str(chat or inputs.chat), str(inputs.tokens), str(out), "--params", str(params)])
        return out

    return go


def request(row: int, words=(), character="") -> Request:
    return Request(row, "words" if words else "character", "a request", (), tuple(words), character)


# --- recall arithmetic -------------------------------------------------------------------------------


def test_words_recall_counts_any_inflection_and_each_missing_word():
    asked = [request(0, ["ball", "jump", "happy"]), request(1, ["dog", "run", "big"])]
    full = ["The happy girl jumped over the ball.", "A big dog was running."]
    assert words_scores(asked, full) == {"words_recall": 1.0, "words_all": 1.0, "words_requests": 2}
    # One word fewer in one reply: recall falls by exactly 1 / (3 N), and that reply is no longer complete.
    missing = ["The happy girl jumped over the wall.", full[1]]
    scores = words_scores(asked, missing)
    assert scores["words_recall"] == pytest.approx(1 - 1 / 6, abs=1e-6)
    assert (scores["words_all"], scores["words_requests"]) == (0.5, 2)
    assert words_scores(asked, ["", ""])["words_recall"] == 0.0


def test_character_recall_needs_the_name_as_a_whole_word():
    assert names("Tom's hat was red.", "Tom") and names("Then Tom ran.", "Tom")
    assert not names("Tommy ran to the tomato.", "Tom")
    assert not names("She picked a lily.", "Lily")  # the flower, not the girl
    asked = [request(0, character="Tom"), request(1, character="Lily"), request(2, character="Max")]
    replies = ["Tom was a cat.", "Lily sang.", "The dog ran."]
    scores = character_scores(asked, replies)
    assert scores["character_recall"] == pytest.approx(2 / 3, abs=1e-6) and scores["character_requests"] == 3
    assert character_scores(asked, ["Tom was a cat.", "Lily sang.", "Max ran."])["character_recall"] == 1.0


def test_requests_come_in_table_order_with_their_conversation_as_history():
    import pandas as pd

    table = pd.DataFrame(CONVERSATIONS, columns=COLUMNS)
    words = select_requests(table, "words", 10)
    assert [r.row for r in words] == [0, 3, 6]
    assert words[1].words == ("dog", "run", "big")
    assert words[1].history == (Turn("Tell me a story.", "Once upon a time there was a big tree."),)
    assert words[0].history == () and words[2].history == ()
    assert [r.character for r in select_requests(table, "character", 10)] == ["Tom", "Lily"]
    assert [r.row for r in select_requests(table, "words", 2)] == [0, 3]  # N caps the count


def test_the_stage_scores_the_replies_the_models_give(run, inputs, monkeypatch):
    """End to end with replies we control: the fine-tuned "model" leaves one word out of one reply;
    the base one answers nothing that was asked."""
    import torch

    from librarian.model.checkpoint import load_weights

    tuned_embedding = load_weights(inputs.finetuned).tok_emb.weight

    def answer(generator, options, req, best_of=1):
        if not torch.equal(generator.model.tok_emb.weight, tuned_embedding):
            return "Someone smiled."
        if req.character:
            return f"{req.character} smiled."
        return " ".join(req.words[:2] if req.row == 3 else req.words)  # row 3: the second words request

    monkeypatch.setattr(evaluate_chat, "answer", answer)
    metrics = json.loads(run().read_text())
    tuned, base = metrics["finetuned"], metrics["base"]
    assert tuned["words_recall"] == pytest.approx(1 - 1 / (3 * N_WORDS), abs=1e-6)
    assert tuned["words_all"] == pytest.approx(2 / 3, abs=1e-6)
    assert tuned["character_recall"] == 1.0
    assert base["words_recall"] == base["words_all"] == base["character_recall"] == 0.0
    assert (tuned["words_requests"], tuned["character_requests"]) == (N_WORDS, N_CHARACTER)


# --- the metrics file --------------------------------------------------------------------------------


def test_both_models_same_keys_reproducible_bytes_on_any_thread_count(run, inputs, make_params, capsys):
    out = run()
    first = out.read_bytes()
    metrics = json.loads(first)
    assert set(metrics) == {"base", "finetuned", "story_perplexity_change"}
    assert set(metrics["base"]) == set(metrics["finetuned"]) == MODEL_KEYS
    assert metrics["base"] != metrics["finetuned"]  # two models, two sets of figures
    assert metrics["story_perplexity_change"] == pytest.approx(
        metrics["finetuned"]["story_perplexity"] / metrics["base"]["story_perplexity"] - 1, rel=1e-5)
    assert "evaluate_chat (base -> fine-tuned): words recall" in capsys.readouterr().out
    assert run().read_bytes() == first
    assert run(**{"evaluate_chat.threads": 2}).read_bytes() == first


def test_story_metrics_are_the_evaluate_stage_s(run, inputs, make_params):
    from librarian.model.checkpoint import load_weights, read_tokenizer_sha256
    from librarian.core.precision import resolve_precision
    from librarian.evaluation.evaluate import evaluate_split

    metrics = json.loads(run().read_text())
    params = make_params(**SMALL)
    for name, path in (("base", inputs.base), ("finetuned", inputs.finetuned)):
        expected = evaluate_split(load_weights(path), inputs.tokens / "test.bin", params, "cpu", path,
                                  read_tokenizer_sha256(path), resolve_precision("cpu", params.eval.amp))
        assert (metrics[name]["story_loss"], metrics[name]["story_perplexity"]) == (expected["loss"],
                                                                                    expected["perplexity"])


def test_a_cpu_without_native_bf16_scores_in_float32_and_says_so_once(run, monkeypatch, capsys):
    """The story scores of both models follow eval.amp as the precision policy resolves it: one line, not one a model."""
    from librarian.core.precision import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "0")
    run(**{"eval.amp": True})
    said = [line for line in capsys.readouterr().err.splitlines() if "no native bf16" in line]
    assert len(said) == 1 and said[0].startswith("evaluate_chat: this CPU (") and "scoring in float32" in said[0]


def test_a_reply_depends_on_its_request_alone(inputs, make_params):
    """Seed + row, a fresh session each: the same reply alone, after other requests, on 2 threads."""
    import pandas as pd

    from librarian.inference.generate import Generator

    generator = Generator.load(inputs.base, inputs.tokenizer)
    options = GenerationOptions.of(make_params(**SMALL).evaluate_chat)
    table = pd.read_parquet(inputs.chat / "test.parquet")
    asked = select_requests(table, "words", 10) + select_requests(table, "character", 10)
    together = evaluate_chat.answer_all(generator, options, asked, 1, "all")
    assert evaluate_chat.answer_all(generator, options, asked[::-1], 2, "reversed") == together[::-1]
    assert [evaluate_chat.answer(generator, options, r) for r in asked[-1:]] == together[-1:]
    assert len(set(together)) > 1  # the requests do get different replies


def test_a_request_is_asked_as_chat_asks_it(inputs, make_params, monkeypatch, tmp_path):
    """The prompt is chat's: the earlier turns of the conversation, then the request; seed + row."""
    import pandas as pd

    from librarian.inference.chat import STOP_STRINGS, render_prompt
    from librarian.inference.generate import Generator

    # A context the whole history fits in (chat drops the turns that do not fit, as it should).
    model = tiny_model(tmp_path / "model.safetensors", inputs.vocab, context_length=256)
    generator = Generator.load(model, inputs.tokenizer)
    options = GenerationOptions.of(make_params(**SMALL).evaluate_chat)
    asked = []

    def stream(prompt, options, stop_strings):
        asked.append((prompt, options.seed, stop_strings))
        yield " Once upon a time."

    monkeypatch.setattr(generator, "stream", stream)
    second_turn = select_requests(pd.read_parquet(inputs.chat / "test.parquet"), "words", 10)[1]
    assert evaluate_chat.answer(generator, options, second_turn) == " Once upon a time."
    history = [Turn("Tell me a story.", "Once upon a time there was a big tree.")]
    assert asked == [(render_prompt(history, second_turn.message), options.seed + 3, STOP_STRINGS)]


def test_multi_turn_requests_are_second_turns_after_their_first():
    import pandas as pd

    table = pd.DataFrame(CONVERSATIONS, columns=COLUMNS)
    first_turn = Turn("Tell me a story.", "Once upon a time there was a big tree.")
    assert select_multi_turn(table, 10) == [select_requests(table, "words", 10)[1]]
    assert select_multi_turn(table, 10)[0].history == (first_turn,)
    # A character request as a second turn counts too, in table order with the words ones.
    rows = [*CONVERSATIONS[:5], (3, 1, "character", "Tell me a story about Max.", "Max ran.", [], "Max"),
            *CONVERSATIONS[5:]]
    table = pd.DataFrame(rows, columns=COLUMNS)
    assert [(r.row, r.kind) for r in select_multi_turn(table, 10)] == [(3, "words"), (5, "character")]
    assert [r.row for r in select_multi_turn(table, 1)] == [3]  # N caps the count


# --- held-out phrasings and multi-turn requests, through replies we control ------------------------------

# The replies a fake model gives: every word or the name for a seen request, nothing asked for otherwise.
ANSWERS = {row[3]: " ".join(row[5]) or f"{row[6]} smiled." for row in CONVERSATIONS if row[2] in ("words", "character")}


def record_replies(monkeypatch, answers=ANSWERS, guided: dict | None = None, guided_answers=None) -> dict:
    """Generator.stream replaced: {generator: [(prompt, seed), ...]} of the free replies, each reply
    answers[message]; the guided ones go to `guided` as (prompt, seed, options), answered from
    `guided_answers` (default: `answers`)."""
    from librarian.inference.generate import Generator

    calls: dict = {}

    def stream(self, prompt, options, stop_strings=()):
        message = prompt.rpartition("User: ")[2].removesuffix("\nAssistant:")
        if options.guided:
            if guided is not None:
                guided.setdefault(self, []).append((prompt, options.seed, options))
            yield (guided_answers or answers).get(message, "Someone smiled.")
            return
        calls.setdefault(self, []).append((prompt, options.seed))
        yield answers.get(message, "Someone smiled.")

    monkeypatch.setattr(Generator, "stream", stream)
    return calls


def prompts(table: Path, seed: int, n: int = 10) -> list[tuple[str, int]]:
    """(chat's prompt with the whole history, seed + row) of the selected words and character requests of `table`."""
    import pandas as pd

    from librarian.inference.chat import render_prompt

    return [(render_prompt(list(r.history), r.message), seed + r.row)
            for kind in ("words", "character") for r in select_requests(pd.read_parquet(table), kind, n)]


def held_out(prompt: str) -> str:
    """`prompt` with every request, the earlier turns' too, phrased as test_unseen.parquet phrases it."""
    for seen, unseen in UNSEEN.items():
        prompt = prompt.replace(f"User: {seen}\n", f"User: {unseen}\n")
    return prompt


def test_held_out_phrasings_ask_the_same_rows_with_the_same_seeds(run, inputs, long_context, make_params,
                                                                   monkeypatch):
    calls = record_replies(monkeypatch)
    metrics = json.loads(run(long_context[1], base=long_context[0]).read_text())
    seen = prompts(inputs.chat / "test.parquet", make_params(**SMALL).evaluate_chat.seed)
    unseen = [(held_out(prompt), seed) for prompt, seed in seen]
    assert set(unseen).isdisjoint(seen)
    assert len(calls) == 2
    for asked in calls.values():  # each model: the seen requests, then the same rows phrased otherwise
        assert asked == seen + unseen
    for name in ("base", "finetuned"):
        scores = metrics[name]
        assert (scores["words_recall"], scores["words_all"], scores["character_recall"]) == (1.0, 1.0, 1.0)
        assert (scores["words_recall_unseen"], scores["words_all_unseen"], scores["character_recall_unseen"]) == (
            0.0, 0.0, 0.0)


def test_multi_turn_answers_after_the_first_turn_and_reuses_replies_already_sampled(run, inputs, long_context,
                                                                                    make_params, monkeypatch):
    from librarian.inference.chat import render_prompt

    seed = make_params(**SMALL).evaluate_chat.seed
    first_turn = Turn("Tell me a story.", "Once upon a time there was a big tree.")
    second_turn = CONVERSATIONS[MULTI_TURN_ROW][3]
    multi_turn = (render_prompt([first_turn], second_turn), seed + MULTI_TURN_ROW)
    # Two of its three words: multi_turn_recall is that reply's.
    calls = record_replies(monkeypatch, {**ANSWERS, second_turn: "The dog ran."})
    metrics = json.loads(run(long_context[1], base=long_context[0]).read_text())
    for asked in calls.values():  # row 3 is the second words request already: asked once, not twice
        assert len(asked) == 2 * (N_WORDS + N_CHARACTER) and asked.count(multi_turn) == 1
    for name in ("base", "finetuned"):
        assert metrics[name]["multi_turn_recall"] == pytest.approx(2 / 3, abs=1e-6)
        assert (metrics[name]["multi_turn_requests"], metrics[name]["multi_turn_history_kept"]) == (1, 1.0)

    # One request of each kind: row 3 is not among them, so it is the one extra reply.
    calls.clear()
    one = json.loads(run(long_context[1], base=long_context[0], **{"evaluate_chat.requests": 1}).read_text())
    for asked in calls.values():
        assert len(asked) == 2 * 2 + 1 and asked.count(multi_turn) == 1
    assert one["finetuned"]["multi_turn_recall"] == pytest.approx(2 / 3, abs=1e-6)


def test_multi_turn_history_is_kept_only_where_the_context_holds_both_turns(run, inputs, long_context):
    """Real sampling: the 32-token base model drops the first turn, the 256-token one keeps it."""
    metrics = json.loads(run(long_context[1]).read_text())
    assert metrics["base"]["multi_turn_history_kept"] < 1
    assert metrics["finetuned"]["multi_turn_history_kept"] == 1.0
    assert metrics["base"]["multi_turn_requests"] == metrics["finetuned"]["multi_turn_requests"] == 1


def test_a_split_without_two_turn_requests_has_no_multi_turn_recall(run, tmp_path):
    one_turn = write_chat(tmp_path / "one_turn", [row for row in CONVERSATIONS if row[0] != 2])
    metrics = json.loads(run(chat=one_turn).read_text())
    assert {key: value for key, value in metrics["finetuned"].items() if key.startswith("multi_turn")} == {
        "multi_turn_requests": 0}


def test_requests_caps_the_number_answered(run):
    one = json.loads(run(**{"evaluate_chat.requests": 1}).read_text())
    assert (one["base"]["words_requests"], one["base"]["character_requests"]) == (1, 1)
    many = json.loads(run(**{"evaluate_chat.requests": 1000}).read_text())
    assert (many["finetuned"]["words_requests"], many["finetuned"]["character_requests"]) == (N_WORDS, N_CHARACTER)


# --- bad input: one line, nothing written -------------------------------------------------------------


def _other_vocab(tmp_path, inputs):
    return tiny_model(tmp_path / "v64" / "model.safetensors", 64, tokenizer_sha256=file_sha256(inputs.tokenizer))


def _other_tokenizer(tmp_path, inputs):
    return tiny_model(tmp_path / "other" / "model.safetensors", inputs.vocab, tokenizer_sha256="0" * 64)


def _without(kind):
    return lambda tmp_path, inputs: write_chat(tmp_path / f"no_{kind}", [r for r in CONVERSATIONS if r[2] != kind])


def _misaligned(change):
    """A chat folder whose test_unseen.parquet is the held-out table changed by `change(rows)`."""
    def make(tmp_path, inputs):
        folder = write_chat(tmp_path / "misaligned")
        write_table(folder / "test_unseen.parquet", change(held_out_rows(CONVERSATIONS)))
        return folder
    return make


def _other(row: int, column: str, value):
    """_misaligned: row `row` of the held-out table with another `column`."""
    at = COLUMNS.index(column)
    return _misaligned(lambda rows: [(*r[:at], value, *r[at + 1:]) if i == row else r for i, r in enumerate(rows)])


BAD = [
    ("fine-tuned model missing", {"finetuned": lambda t, i: t / "chat_model" / "model.safetensors"},
     ["fine-tuned model", "not found", "run `dvc repro finetune`"]),
    ("vocab differs", {"finetuned": _other_vocab}, ["has a vocab of 64 but base model", "dvc repro finetune"]),
    ("tokenizer differs", {"finetuned": _other_tokenizer},
     ["comes from another tokenizer (sha256 0000000000000000)", "use the matching files"]),
    ("chat folder missing", {"chat": lambda t, i: t / "nope"}, ["nope/test.parquet not found", "dvc repro chat_data"]),
    ("no words requests", {"chat": _without("words")},
     ["no words requests", "raise data.test_fraction or chat_data.mix.words", "dvc repro chat_data"]),
    ("no character requests", {"chat": _without("character")}, ["no character requests", "chat_data.mix.character"]),
    ("held-out table missing", {"chat": lambda t, i: write_chat(t / "seen_only", unseen=False)},
     ["seen_only/test_unseen.parquet not found; rerun `dvc repro chat_data`"]),
    ("held-out table of another reply", {"chat": _other(1, "reply", "Max ran.")},
     ["test_unseen.parquet does not line up with test.parquet: row 1 has another reply",
      "; rerun `dvc repro chat_data`"]),
    ("held-out table of other words", {"chat": _other(0, "words", ["ball"])},
     ["row 0 has another words", "; rerun `dvc repro chat_data`"]),
    ("held-out table of another kind", {"chat": _other(6, "kind", "plain")}, ["row 6 has another kind"]),
    ("held-out table a row short", {"chat": _misaligned(lambda rows: rows[:-1])},
     ["test_unseen.parquet has 6 rows but test.parquet has 7", "; rerun `dvc repro chat_data`"]),
]


@pytest.mark.parametrize("paths,words", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_fails_in_one_line_and_writes_nothing(run, inputs, tmp_path, capsys, paths, words):
    with pytest.raises(SystemExit) as exit_:
        run(**{key: make(tmp_path, inputs) for key, make in paths.items()})
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    metrics = tmp_path / "metrics"
    assert not metrics.exists() or not list(metrics.iterdir())  # no chat.json, no temporary sibling


def test_a_zero_share_is_named_as_the_fix(run, inputs, tmp_path, capsys):
    mix = {"chat_data.mix.words": 0.0, "chat_data.mix.plain": 0.6}
    with pytest.raises(SystemExit):
        run(chat=_without("words")(tmp_path, inputs), **mix)
    assert "give chat_data.mix.words a share above 0" in capsys.readouterr().err


def test_guided_replies_answer_the_same_requests_with_guidance_and_chats_negative_prompt(
        run, inputs, long_context, make_params, monkeypatch):
    """The *_guided keys: the same rows and seeds as the free replies, sampled at evaluate_chat.guidance
    with `librarian chat`'s negative prompt (the conversation, its last request replaced by a neutral one)."""
    from librarian.data.chat_template import NEUTRAL_REQUEST
    from librarian.inference.chat import render_prompt

    guided: dict = {}
    perfect = {row[3]: row[4] for row in CONVERSATIONS} | {UNSEEN[row[3]]: row[4] for row in CONVERSATIONS}
    record_replies(monkeypatch, guided=guided, guided_answers=perfect)
    metrics = json.loads(run(long_context[1], base=long_context[0], **{"evaluate_chat.guidance": 2.5}).read_text())
    seen = prompts(inputs.chat / "test.parquet", make_params(**SMALL).evaluate_chat.seed)
    unseen = [(render_prompt([], UNSEEN[prompt.rpartition("User: ")[2].removesuffix("\nAssistant:")]), seed)
              if prompt.count("User:") == 1 else None for prompt, seed in seen]
    assert len(guided) == 2
    for generator, asked in guided.items():
        assert [(prompt, seed) for prompt, seed, _ in asked][: len(seen)] == seen
        for prompt, _, options in asked:
            assert options.guidance == 2.5
            history = prompt.rsplit("User: ", 1)[0]
            assert generator.decode(list(options.negative)) == history + render_prompt([], NEUTRAL_REQUEST)
    assert all(u is None or u in [(p, s) for p, s, _ in asked] for u in unseen)
    for name in ("base", "finetuned"):
        scores = metrics[name]
        assert (scores["words_recall_guided"], scores["words_all_guided"], scores["character_recall_guided"],
                scores["words_recall_guided_unseen"], scores["character_recall_guided_unseen"]) == (1, 1, 1, 1, 1)
        assert (scores["words_recall"], scores["character_recall_unseen"]) == (1.0, 0.0)  # free: ANSWERS as before
        assert scores["reply_fluency_guided"] > 1 and 0 <= scores["repetition_guided"] < 1


def test_fluency_scores_replies_given_the_plain_request_and_repetition_counts_repeated_trigrams(inputs):
    import math

    import torch
    import torch.nn.functional as F

    from librarian.data.chat_template import NEUTRAL_REQUEST
    from librarian.evaluation.evaluate_chat import fluency, repeated_trigrams
    from librarian.inference.chat import render_prompt
    from librarian.inference.generate import Generator

    generator = Generator.load(inputs.base, inputs.tokenizer)
    prompt = generator.encode(render_prompt([], NEUTRAL_REQUEST))
    reply = generator.encode(" The cat sat.")
    x = torch.tensor([prompt + reply])
    logits, _ = generator.model(x[:, :-1])
    expected = F.cross_entropy(logits[0, len(prompt) - 1 :], x[0, len(prompt) :]).item()
    assert fluency(generator, [" The cat sat."]) == pytest.approx(math.exp(expected), rel=1e-5)
    assert repeated_trigrams(["the cat sat and the cat sat", "one two"]) == (1, 5)  # "the cat sat" again


def test_the_guidance_sweep_reports_each_scale_and_best_of_n(built_project, tmp_path):
    """benchmarks/guidance_sweep.py on the fixture's models: a row per scale and per best-of n, the free
    row equal to what evaluate_chat measured with the same rows and seeds."""
    import json
    import subprocess
    import sys

    out = tmp_path / "sweep.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "guidance_sweep.py"), "--scales", "1,2", "--best-of", "2",
         "--out", str(out)], cwd=built_project, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["scales"]
    assert set(rows) == {"1", "2", "1, best of 2"}
    chat = json.loads((built_project / "metrics" / "chat.json").read_text())["finetuned"]
    for key in ("words_recall", "character_recall", "words_recall_unseen", "reply_fluency", "repetition"):
        assert rows["1"][key] == chat[key], key
    assert "| 1, best of 2 |" in run.stdout

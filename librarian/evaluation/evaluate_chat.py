"""The evaluate_chat stage: does fine-tuning make the model answer requests, and at what cost to its stories?

Both models, the base one and the fine-tuned one, get the same measurements on the chat test
conversations (data/chat/test.parquet), so `dvc metrics diff` lines them up key by key:

- reply_loss / reply_perplexity: cross-entropy over the assistant's tokens only (each reply and
  its end marker), the requests being context (librarian/data/chat_tokens.py);
- words_recall: over the first evaluate_chat.requests `words` requests, the share of requested
  words the sampled reply mentions in any inflection ("jumped" for "jump", librarian/data/words.py);
  words_all: the share of those replies that mention all of them;
- character_recall: over the first evaluate_chat.requests `character` requests, the share of
  replies that name the character;
- words_recall_unseen, words_all_unseen, character_recall_unseen: the same requests (same rows,
  same seeds) as data/chat/test_unseen.parquet phrases them, with templates that no training
  conversation uses (chat_data's HELD_OUT): does the model follow the request or recognise a template?
- multi_turn_recall: over the second turns of two-turn conversations asking for words or a
  character (the first evaluate_chat.requests), answered after their first turn, the mean per-request
  recall (the share of its words mentioned; 1 if the character is named, else 0);
  multi_turn_requests: their count; multi_turn_history_kept: the share of them whose prompt kept
  the whole first turn (chat drops the history that does not fit the context);
- story_loss / story_perplexity: the evaluate stage's test metrics on data/tokens/test.bin, so
  what fine-tuning costs the story model shows as the difference (story_perplexity_change);
- reply_fluency: the perplexity of the sampled replies (to the words and character requests) under
  the same model, unguided, given the plain request "Tell me a story.": how natural the text is as
  a story, whatever was asked; repetition: the share of the replies' word 3-grams that repeat one
  earlier in the same reply;
- the *_guided keys: words_recall, words_all, character_recall (and their _unseen forms),
  reply_fluency and repetition of replies sampled with classifier-free guidance at
  evaluate_chat.guidance (librarian/inference/generate.py, guided_logits), the negative prompt
  being `librarian chat`'s: the conversation with its last request replaced by a neutral one. The
  same requests, rows and seeds as the free replies; words_recall and the other unsuffixed keys
  stay free sampling.

Replies are sampled as `librarian chat` answers: the conversation's earlier turns are the history,
and a reply ends at <|endoftext|> or at the next `User:`. Request i of the test table (its row)
samples with seed evaluate_chat.seed + i, with both models and both phrasings, whatever the thread
that answers it and whatever was answered before: a reply depends on its request and the model
alone, so a multi-turn request already answered as a words or character request is not sampled
again. Requests are answered evaluate_chat.threads at a time, each on one torch thread, as evaluate
scores batches.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from librarian.core.config import Params
from librarian.core.errors import LibrarianError
from librarian.core.precision import Precision
from librarian.core.progress import progress_bar
from librarian.core.threads import resolve_threads, using_threads
from librarian.data.chat_template import NEUTRAL_REQUEST, Turn, render_prompt
from librarian.data.chat_tokens import chat_token_file, read_chat, reply_nats
from librarian.data.windows import TokenFile
from librarian.data.words import mentions
from librarian.evaluation.evaluate import checked_split, in_order, round_significant, score_split, scoring_precision
from librarian.inference.chat import ChatSession
from librarian.inference.generate import GenerationOptions, Generator, nth_seed
from librarian.inference.rerank import log_likelihood
from librarian.model.checkpoint import check_same_tokenizer, read_config, read_tokenizer_sha256

MODELS = ("base", "finetuned")
KINDS = ("words", "character")  # the request kinds whose replies can be checked
REDO_CHAT_DATA = "rerun `dvc repro chat_data`"
UNSEEN = "test_unseen"  # the test split phrased by held-out templates
# What the held-out table must share with the test table, row for row: all but the request.
ALIGNED = ("conversation", "turn", "kind", "reply", "words", "character")


@dataclass(frozen=True)
class Request:
    """One request of the test table to answer, with what its reply is checked for."""

    row: int  # its row in the test table: it samples with seed + row
    kind: str
    message: str
    history: tuple[Turn, ...]  # the conversation's earlier turns, with their reference replies
    words: tuple[str, ...]  # words requests: the words asked for
    character: str  # character requests: the name asked for


# --- the test conversations ----------------------------------------------------------------------


def read_test_requests(chat_dir: str | Path, split: str = "test") -> pd.DataFrame:
    """The chat test split, checked to hold what the requests are scored against as well."""
    table = read_chat(chat_dir, split)
    missing = [name for name in KINDS if name not in table.columns]
    if missing:
        raise LibrarianError(f"{Path(chat_dir) / f'{split}.parquet'} lacks the column(s) {', '.join(missing)}; "
                             f"{REDO_CHAT_DATA}")
    return table.reset_index(drop=True)


def read_unseen_requests(chat_dir: str | Path, seen: pd.DataFrame) -> pd.DataFrame:
    """test_unseen.parquet, checked to be the test table `seen` row for row but for the requests."""
    path = Path(chat_dir) / f"{UNSEEN}.parquet"
    # A chat_data output older than the held-out phrasings has none: rerunning it, not running it, is the fix.
    if not path.exists():
        raise LibrarianError(f"{path} not found; {REDO_CHAT_DATA}")
    unseen = read_test_requests(chat_dir, UNSEEN)
    if len(unseen) != len(seen):
        raise LibrarianError(f"{path} has {len(unseen)} rows but test.parquet has {len(seen)}; {REDO_CHAT_DATA}")
    for column in ALIGNED:
        differ = [row for row, (a, b) in enumerate(zip(cells(seen, column), cells(unseen, column))) if a != b]
        if differ:
            raise LibrarianError(f"{path} does not line up with test.parquet: row {differ[0]} has another {column} "
                                 f"({len(differ)} rows in all); {REDO_CHAT_DATA}")
    return unseen


def cells(table: pd.DataFrame, column: str) -> list:
    """The column's values, comparable with ==: a words list (an array once read) as a tuple."""
    return [tuple(value) if column == "words" else value for value in table[column]]


def select_requests(table: pd.DataFrame, kind: str, n: int) -> list[Request]:
    """The first n requests of `kind` in table order (all of them if fewer), each with its history."""
    rows = [int(i) for i in (table["kind"] == kind).to_numpy().nonzero()[0][:n]]
    turns = [Turn(str(request), str(reply)) for request, reply in zip(table["request"], table["reply"], strict=True)]
    requests = []
    for row in rows:
        conversation, turn = table["conversation"].iat[row], int(table["turn"].iat[row])
        # Rows are sorted by (conversation, turn), so the earlier turns are the `turn` rows just above.
        earlier = range(row - turn, row)
        if turn < 0 or row - turn < 0 or any(table["conversation"].iat[i] != conversation for i in earlier):
            raise LibrarianError(f"row {row} of the chat test table is turn {turn} of conversation {conversation}, "
                                 f"but its earlier turns are not the rows above it; {REDO_CHAT_DATA}")
        request = Request(row, kind, turns[row].user, tuple(turns[i] for i in earlier),
                          tuple(str(w) for w in table["words"].iat[row]), str(table["character"].iat[row]))
        if kind == "words" and not request.words or kind == "character" and not request.character:
            raise LibrarianError(f"row {row} of the chat test table is a {kind} request without its {kind}; "
                                 f"{REDO_CHAT_DATA}")
        requests.append(request)
    return requests


def select_multi_turn(table: pd.DataFrame, n: int) -> list[Request]:
    """The first n second turns (in table order) that ask for words or a character, their first turn as history."""
    second_turns = [request for kind in KINDS for request in select_requests(table, kind, len(table))
                    if len(request.history) == 1]
    return sorted(second_turns, key=lambda request: request.row)[:n]


@dataclass(frozen=True)
class Asked:
    """What each model answers: the selected requests in both phrasings, and the multi-turn ones."""

    words: list[Request]
    character: list[Request]
    words_unseen: list[Request]  # the same rows as `words`, phrased by held-out templates
    character_unseen: list[Request]
    multi_turn: list[Request]  # may share rows with `words` and `character`

    @classmethod
    def select(cls, seen: pd.DataFrame, unseen: pd.DataFrame, n: int) -> Asked:
        # The tables line up row for row, so both phrasings select the same rows.
        return cls(*(select_requests(table, kind, n) for table in (seen, unseen) for kind in KINDS),
                   select_multi_turn(seen, n))


def check_requests(requests: list[Request], kind: str, params: Params) -> None:
    """Refuse a test split without requests of `kind`: its recall would be 0/0."""
    if requests:
        return
    share = getattr(params.chat_data.mix, kind)
    fix = (f"give chat_data.mix.{kind} a share above 0" if share == 0 else
           f"the test split is too small for a share of {share:g}: raise data.test_fraction or chat_data.mix.{kind}")
    raise LibrarianError(f"the chat test split has no {kind} requests, so {kind} recall cannot be measured; "
                         f"{fix} and {REDO_CHAT_DATA}")


# --- sampling replies ------------------------------------------------------------------------------


def session_for(generator: Generator, options: GenerationOptions, request: Request) -> ChatSession:
    """A `librarian chat` session at the request's point of its conversation, seeded by the request's row."""
    # A fresh session per request: its first reply samples with the seed given, so no reply
    # depends on the replies sampled before it (ChatSession adds the replies so far to the seed).
    session = ChatSession(generator, replace(options, seed=nth_seed(options.seed, request.row)))
    session.history = list(request.history)
    return session


def answer(generator: Generator, options: GenerationOptions, request: Request, best_of: int = 1) -> str:
    """The reply `librarian chat` (with --best-of) gives to the request after its conversation's earlier turns."""
    session = session_for(generator, options, request)
    session.best_of = best_of
    return "".join(session.respond(request.message))


def keeps_history(generator: Generator, options: GenerationOptions, request: Request) -> bool:
    """Whether chat's prompt for the request keeps all its earlier turns (chat drops those with no room)."""
    _, kept, _ = session_for(generator, options, request).build_prompt(request.message)
    return kept == len(request.history)


def answer_all(generator: Generator, options: GenerationOptions, requests: list[Request], threads: int,
               desc: str, best_of: int = 1) -> list[str]:
    """The replies to `requests`, in their order, answered `threads` at a time."""
    replies = []
    with using_threads(1), progress_bar(len(requests), desc=desc, unit="request") as bar:
        for reply in in_order(functools.partial(answer, generator, options, best_of=best_of), iter(requests), threads):
            replies.append(reply)
            bar.update(1)
    return replies


def answer_groups(generator: Generator, options: GenerationOptions, groups: list[list[Request]], threads: int,
                  desc: str, best_of: int = 1) -> list[list[str]]:
    """The replies to each group of requests, all answered together so the threads stay busy."""
    replies = iter(answer_all(generator, options, [request for group in groups for request in group], threads, desc,
                              best_of))
    return [[next(replies) for _ in group] for group in groups]


# --- scoring replies -------------------------------------------------------------------------------


def names(text: str, name: str) -> bool:
    """Whether `text` names `name` as a whole word: "Tom" or "Tom's", not "Tommy" or "tom".

    Case-sensitive on purpose: the names chat_data asks for are capitalised, and many are common
    words too (Lily, Rose, Max, Joy, Sunny), which a story may use in lower case without naming anyone.
    """
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def words_mentioned(request: Request, reply: str) -> int:
    return sum(mentions(reply, word) for word in request.words)


def recall(request: Request, reply: str) -> float:
    """One request's recall: the share of its words the reply mentions, or 1 if it names the character."""
    if request.kind == "words":
        return words_mentioned(request, reply) / len(request.words)
    return float(names(reply, request.character))


def words_scores(requests: list[Request], replies: list[str]) -> dict:
    """words_recall (share of requested words mentioned), words_all (share of replies with all of them)."""
    asked = mentioned = complete = 0
    for request, reply in zip(requests, replies, strict=True):
        hits = words_mentioned(request, reply)
        asked, mentioned = asked + len(request.words), mentioned + hits
        complete += hits == len(request.words)
    return {"words_recall": round_significant(mentioned / asked),
            "words_all": round_significant(complete / len(requests)), "words_requests": len(requests)}


def character_scores(requests: list[Request], replies: list[str]) -> dict:
    """character_recall: the share of replies that name the character asked for."""
    named = sum(names(reply, request.character) for request, reply in zip(requests, replies, strict=True))
    return {"character_recall": round_significant(named / len(requests)), "character_requests": len(requests)}


def unseen(scores: dict) -> dict:
    """The recalls of `scores` named as the held-out phrasings' (`_unseen`); the counts are the seen ones'."""
    return {f"{key}_unseen": value for key, value in scores.items() if not key.endswith("_requests")}


def multi_turn_scores(requests: list[Request], replies: list[str], kept: list[bool]) -> dict:
    """multi_turn_recall (mean per-request recall), multi_turn_history_kept (share with the whole first turn)."""
    if not requests:  # a test split without two-turn words or character conversations: nothing to average
        return {"multi_turn_requests": 0}
    recalls = [recall(request, reply) for request, reply in zip(requests, replies, strict=True)]
    return {"multi_turn_recall": round_significant(sum(recalls) / len(requests)),
            "multi_turn_history_kept": round_significant(sum(kept) / len(requests)),
            "multi_turn_requests": len(requests)}


def repeated_trigrams(replies: list[str]) -> tuple[int, int]:
    """(word 3-grams that repeat one earlier in their reply, all word 3-grams), over `replies`."""
    repeated = total = 0
    for reply in replies:
        words = re.findall(r"\w+", reply.lower())
        seen = set()
        for gram in zip(words, words[1:], words[2:]):
            repeated += gram in seen
            seen.add(gram)
        total += max(0, len(words) - 2)
    return repeated, total


def fluency(generator: Generator, replies: list[str]) -> float:
    """The replies' perplexity under the model, unguided, each given the plain request "Tell me a
    story.": what guidance costs the text as a story (the replies are cut to fit the context)."""
    prompt = generator.encode(render_prompt([], NEUTRAL_REQUEST))
    room = generator.model.config.context_length - len(prompt)
    nats, count = 0.0, 0
    for reply in replies:
        ids = generator.encode(reply)[:room]
        if ids:
            nats -= log_likelihood(generator.model, prompt, ids)
            count += len(ids)
    return math.exp(nats / max(count, 1))


def text_scores(generator: Generator, replies: list[str]) -> dict:
    """reply_fluency and repetition of the replies (see the module's docstring)."""
    repeated, total = repeated_trigrams(replies)
    return {"reply_fluency": round_significant(fluency(generator, replies)),
            "repetition": round_significant(repeated / max(total, 1))}


def guided(scores: dict) -> dict:
    """The keys of `scores` named as the guided replies' (`_guided`, before any `_unseen`); counts left out."""
    return {key.replace("_unseen", "_guided_unseen") if key.endswith("_unseen") else f"{key}_guided": value
            for key, value in scores.items() if not key.endswith("_requests")}


def guided_metrics(generator: Generator, options: GenerationOptions, asked: Asked, threads: int, desc: str) -> dict:
    """The recalls, fluency and repetition of replies sampled with guidance (options.guidance)."""
    words, character, words_unseen, character_unseen = answer_groups(
        generator, options, [asked.words, asked.character, asked.words_unseen, asked.character_unseen],
        threads, desc)
    return guided({**words_scores(asked.words, words), **character_scores(asked.character, character),
                   **unseen(words_scores(asked.words_unseen, words_unseen)),
                   **unseen(character_scores(asked.character_unseen, character_unseen)),
                   **text_scores(generator, words + character)})


def sampled_metrics(generator: Generator, options: GenerationOptions, asked: Asked, threads: int, desc: str) -> dict:
    """The recalls of one model's replies to `asked`."""
    # A multi-turn row already selected is the same request, so it would get the same reply: reuse it.
    selected = asked.words + asked.character
    extra = [request for request in asked.multi_turn if request not in selected]
    words, character, words_unseen, character_unseen, extra_replies = answer_groups(
        generator, options, [asked.words, asked.character, asked.words_unseen, asked.character_unseen, extra],
        threads, desc)
    reply_of = dict(zip([request.row for request in selected + extra], words + character + extra_replies, strict=True))
    multi_turn = [reply_of[request.row] for request in asked.multi_turn]
    kept = [keeps_history(generator, options, request) for request in asked.multi_turn]
    return {**words_scores(asked.words, words), **character_scores(asked.character, character),
            **unseen(words_scores(asked.words_unseen, words_unseen)),
            **unseen(character_scores(asked.character_unseen, character_unseen)),
            **multi_turn_scores(asked.multi_turn, multi_turn, kept), **text_scores(generator, words + character)}


def reply_metrics(generator: Generator, tokens: TokenFile, params: Params) -> dict:
    """Cross-entropy of the model over the reference replies of the test conversations (`tokens`)."""
    nats, count = reply_nats(generator.model, tokens, params.eval.batch_size)
    if count == 0:
        raise LibrarianError(f"the chat test split has no reply tokens to score; {REDO_CHAT_DATA}")
    loss = nats / count
    return {"reply_loss": round_significant(loss), "reply_perplexity": round_significant(math.exp(loss)),
            "reply_tokens": count}


def story_split(generator: Generator, model_path: Path, tokens_dir: Path) -> TokenFile:
    """The story test token file, checked against the model (its vocab, its tokenizer)."""
    return checked_split(generator.model, tokens_dir / "test.bin", model_path, read_tokenizer_sha256(model_path))


def story_metrics(generator: Generator, split: TokenFile, tokens_dir: Path, params: Params,
                  precision: Precision) -> dict:
    """The evaluate stage's test loss and perplexity on the story token file, in its precision."""
    metrics = score_split(generator.model, split, tokens_dir / "test.bin", params, "cpu", precision)
    return {"story_loss": metrics["loss"], "story_perplexity": metrics["perplexity"]}


# --- the stage -------------------------------------------------------------------------------------


def check_models(base_path: Path, finetuned_path: Path) -> None:
    """Refuse a fine-tuned model that is missing, or not fine-tuned from a model of the base's tokenizer."""
    if not finetuned_path.exists():
        raise LibrarianError(f"fine-tuned model {finetuned_path} not found; run `dvc repro finetune`")
    base, finetuned = read_config(base_path), read_config(finetuned_path)
    if base.vocab_size != finetuned.vocab_size:
        raise LibrarianError(
            f"fine-tuned model {finetuned_path} has a vocab of {finetuned.vocab_size} but base model {base_path} "
            f"has {base.vocab_size}; fine-tune this base model (`dvc repro finetune`)"
        )
    check_same_tokenizer(base_path, read_tokenizer_sha256(base_path), read_tokenizer_sha256(finetuned_path),
                         f"fine-tuned model {finetuned_path}")


def evaluate_chat(base_path: str | Path, finetuned_path: str | Path, tokenizer_path: str | Path,
                  chat_dir: str | Path, tokens_dir: str | Path, params: Params) -> dict:
    """metrics/chat.json's content: {"base": {...}, "finetuned": {...}, "story_perplexity_change": ...}."""
    paths = {"base": Path(base_path), "finetuned": Path(finetuned_path)}
    check_models(paths["base"], paths["finetuned"])
    generators = {name: Generator.load(path, tokenizer_path) for name, path in paths.items()}
    table = read_test_requests(chat_dir)
    settings = params.evaluate_chat
    asked = Asked.select(table, read_unseen_requests(chat_dir, table), settings.requests)
    for kind in KINDS:
        check_requests(getattr(asked, kind), kind, params)

    # The cheap scores first: they check the token files before the long sampling starts.
    splits = {name: story_split(generators[name], paths[name], Path(tokens_dir)) for name in MODELS}
    # After the checks (bad input gets its one line alone); resolved, and its line said, once.
    precision = scoring_precision("cpu", params, "evaluate_chat")
    result = {name: story_metrics(generators[name], splits[name], Path(tokens_dir), params, precision)
              for name in MODELS}
    # Tokenized once per context length (both models, as fine-tuned, share one): not once per model.
    chat_files: dict[int, TokenFile] = {}
    for name in MODELS:
        generator = generators[name]
        ctx = generator.model.config.context_length
        if ctx not in chat_files:
            chat_files[ctx] = chat_token_file(table, generator.tokenizer, ctx, params.eval.stride)
        result[name].update(reply_metrics(generator, chat_files[ctx], params))
    options = GenerationOptions.of(settings)
    for name in MODELS:
        generator = generators[name]
        threads = resolve_threads(settings.threads, generator.model.config.d_model, "evaluate_chat.threads",
                                  batched=True)
        result[name].update(sampled_metrics(generator, options, asked, threads, f"{name} replies"))
        result[name].update(guided_metrics(generator, replace(options, guidance=settings.guidance), asked, threads,
                                           f"{name} guided replies"))
    change = result["finetuned"]["story_perplexity"] / result["base"]["story_perplexity"] - 1
    return {**result, "story_perplexity_change": round_significant(change)}

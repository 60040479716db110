"""Conversations as training data: the chat format's tokens, a loss mask and the windows.

The text is exactly what `librarian chat` renders (librarian/data/chat_template.py), one conversation after the
other:

    User: {request}\\nAssistant: {reply}\\n   (per turn)   then <|endoftext|>

**Loss mask.** Only the assistant's tokens are targets: each reply (from the space after
`Assistant:`) with its end marker, the newline that ends a turn and, after the last turn,
`<|endoftext|>`, where chat stops a reply. The requests and the `User:`/`Assistant:` labels are
context only: the model must learn to answer, not to write requests.

**Windows.** A conversation is usually longer than the context (a TinyStories story is ~200
tokens, the card's context 128), so it is cut into windows, chosen so that a reply is learnt the
way chat produces it:

- The *first* window of every reply starts at the conversation's start, or, when the history is
  long (a second turn), half a context before the reply: the request, and as much history as fits,
  are in view while the model learns to start answering, and at least half the window is reply.
- The rest of the reply follows in windows that each score `stride` new tokens after
  `context - stride` tokens of the reply before them (stride = context: no overlap, as in
  pretraining; a smaller stride gives later tokens more context for more compute).

Every reply token is scored by exactly one window, so the mean over windows is the mean over
reply tokens: the chat val loss that early stopping watches, and evaluate_chat's reply loss.

**The chat_tokens stage** tokenizes the train split's conversations, every variant of them
(chat_data.variants), for pretraining on a mixture of stories and conversations (train.chat_share,
librarian/training/mixture.py). With train.chat_share 0 it writes only a manifest that says so, the same
bytes whatever the conversations: a change of chat_data then reruns this stage, but not train.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer

from librarian.core.errors import LibrarianError
from librarian.core.io import atomic_dir, write_json
from librarian.data.chat_template import ASSISTANT, USER, Turn, render_turn
from librarian.data.tokenizer import EOT, file_sha256, load_tokenizer
from librarian.data.tokens import DTYPE
from librarian.data.windows import TokenFile, WindowPlan, Windows, window_nats

SPLITS = ("train", "val", "test")
COLUMNS = ("conversation", "turn", "kind", "request", "reply")


def read_chat(chat_dir: str | Path, split: str) -> pd.DataFrame:
    """A split of the chat_data stage's conversations: one row per turn, in conversation order."""
    path = Path(chat_dir) / f"{split}.parquet"
    if not path.exists():
        raise LibrarianError(f"{path} not found; run `dvc repro chat_data` first")
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise LibrarianError(f"{path} is not a readable parquet file ({type(exc).__name__}); rerun "
                             "`dvc repro -f chat_data`") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise LibrarianError(f"{path} lacks the column(s) {', '.join(missing)}; rerun `dvc repro -f chat_data`")
    if table.empty:
        raise LibrarianError(f"{path} holds no conversations; the {split} split needs stories")
    return table.sort_values(["conversation", "turn"], kind="stable")


def conversations(table: pd.DataFrame) -> list[list[Turn]]:
    """The table's conversations, each a list of turns in order."""
    return [[Turn(r.request, r.reply) for r in group.itertuples()]
            for _, group in table.groupby("conversation", sort=True)]


def render_conversation(turns: list[Turn]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character span of each reply with its end marker."""
    text, spans = "", []
    for turn in turns:
        rendered = render_turn(turn)
        # The reply begins right after "Assistant:" (with its leading space) and runs to the end of the turn.
        reply_start = len(text) + len(f"{USER} {turn.user}\n{ASSISTANT}")
        text += rendered
        spans.append((reply_start, len(text)))
    spans[-1] = (spans[-1][0], len(text) + len(EOT))  # <|endoftext|> ends the last reply
    return text + EOT, spans


@dataclass(frozen=True)
class ChatTokens:
    """A split's conversations as one token stream, the assistant mask and where each reply lies."""

    tokens: np.ndarray  # uint16
    loss_mask: np.ndarray  # uint8: 1 on assistant tokens
    conversation_starts: np.ndarray  # first token of the conversation of each reply
    reply_spans: np.ndarray  # (replies, 2): first and one-past-last token of each reply


def encode_conversations(tokenizer: Tokenizer, convs: list[list[Turn]]) -> ChatTokens:
    """Tokenize each conversation whole (BPE merges never cross a join it would not cross in chat)
    and mark as assistant tokens those whose first character lies in a reply's span."""
    rendered = [render_conversation(turns) for turns in convs]
    encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    tokens, masks, conv_starts, spans = [], [], [], []
    at = 0
    for (_, reply_spans), encoding in zip(rendered, encodings):
        starts = np.array([start for start, _ in encoding.offsets], dtype=np.int64)
        mask = np.zeros(len(starts), dtype=np.uint8)
        for lo, hi in reply_spans:
            first, last = np.searchsorted(starts, [lo, hi])
            mask[first:last] = 1
            spans.append((at + first, at + last))
            conv_starts.append(at)
        tokens.append(np.asarray(encoding.ids, dtype=DTYPE))
        masks.append(mask)
        at += len(starts)
    return ChatTokens(np.concatenate(tokens), np.concatenate(masks), np.asarray(conv_starts, dtype=np.int64),
                      np.asarray(spans, dtype=np.int64).reshape(-1, 2))


def reply_windows(chat: ChatTokens, context_length: int, stride: int, first_only: bool = False) -> WindowPlan:
    """Windows that score every reply token once, each reply's first one with its request in view;
    with `first_only`, only those first windows."""
    if not 1 <= stride <= context_length:
        raise LibrarianError(f"finetune.stride ({stride}) must be between 1 and the model's context length "
                             f"({context_length}); lower finetune.stride")
    starts, score_from, score_to = [], [], []
    for conv_start, (first, end) in zip(chat.conversation_starts, chat.reply_spans):
        # A window starting at s predicts the targets s+1 .. s+context_length.
        start = max(int(conv_start), int(first) - context_length // 2)
        target = start + context_length + 1  # the first target past this window
        starts.append(start), score_from.append(first), score_to.append(min(end, target))
        while target < end and not first_only:
            starts.append(target + stride - 1 - context_length)
            score_from.append(target), score_to.append(min(end, target + stride))
            target += stride
    return WindowPlan(*(np.asarray(a, dtype=np.int64) for a in (starts, score_from, score_to)))


def chat_token_file(table: pd.DataFrame, tokenizer: Tokenizer, context_length: int, stride: int,
                    tokenizer_sha256: str | None = None, first_only: bool = False) -> TokenFile:
    """The conversations of `table` as a TokenFile the Trainer and reply_nats take: tokens, the
    assistant mask and the reply windows (`first_only`: each reply's first window only). The stream
    ends with a context of <|endoftext|> padding (never scored), so the last reply's windows are whole."""
    chat = encode_conversations(tokenizer, conversations(table))
    eot = tokenizer.token_to_id(EOT)
    tokens = np.concatenate([chat.tokens, np.full(context_length + 1, eot, dtype=DTYPE)])
    mask = np.concatenate([chat.loss_mask, np.zeros(context_length + 1, dtype=np.uint8)])
    plan = reply_windows(chat, context_length, stride, first_only)
    meta = {"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "tokens": len(tokens),
            "reply_tokens": int(mask.sum()), "conversations": int(table["conversation"].nunique()),
            "windows": len(plan.starts), "sha256": sha256_of(tokens, mask, plan.starts, plan.score_from, plan.score_to),
            "tokenizer_sha256": tokenizer_sha256}
    return TokenFile(tokens, meta, mask, plan)


def sha256_of(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.tobytes())
    return digest.hexdigest()


@torch.no_grad()
def reply_nats(model, token_file: TokenFile, batch_size: int) -> tuple[float, int]:
    """Summed cross-entropy (nats, float32 model) over the reply tokens, and their number."""
    was_training = model.training
    model.eval()
    try:
        windows = Windows(token_file.tokens, model.config.context_length, model.config.context_length,
                          token_file.loss_mask, token_file.plan)
        nats, count = window_nats(model, windows, batch_size).tolist()
    finally:
        model.train(was_training)
    return nats, int(count)


# --- the chat_tokens stage: conversations for pretraining ----------------------------------------

MANIFEST = "chat_tokens.json"
# Each variant's arrays: file suffix -> dtype. Raw little-endian arrays, no pickle.
ARRAYS = {"tokens": DTYPE, "loss_mask": np.uint8, "conversation_starts": np.int64, "reply_spans": np.int64}
REDO = "rerun `dvc repro chat_tokens`"


def variant_tables(chat_dir: str | Path) -> list[Path]:
    """train.parquet (variant 0), then train-v1.parquet, train-v2.parquet ... as chat_data wrote them."""
    chat_dir = Path(chat_dir)
    others = sorted(chat_dir.glob("train-v*.parquet"), key=lambda p: int(p.stem.removeprefix("train-v")))
    expected = [f"train-v{v}.parquet" for v in range(1, len(others) + 1)]
    if [p.name for p in others] != expected:
        raise LibrarianError(f"{chat_dir} holds the variants {', '.join(p.name for p in others)}, not "
                             f"{', '.join(expected)}; rerun `dvc repro -f chat_data`")
    return [chat_dir / "train.parquet", *others]


def build_chat_tokens(chat_dir: str | Path, tokenizer_path: str | Path, out_dir: str | Path, share: float) -> dict:
    """Write every train variant's conversations as token arrays and a manifest (only the manifest at share 0)."""
    if share == 0:
        manifest = {"variants": [], "note": "train.chat_share is 0: training reads no conversations"}
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / MANIFEST, manifest)
        return manifest
    tokenizer = load_tokenizer(tokenizer_path)
    tables = variant_tables(chat_dir)
    chats = [encode_conversations(tokenizer, conversations(read_chat(path.parent, path.stem))) for path in tables]
    return write_chat_tokens(out_dir, chats, [path.name for path in tables], file_sha256(tokenizer_path),
                             tokenizer.get_vocab_size(with_added_tokens=True))


def write_chat_tokens(out_dir: str | Path, chats: list[ChatTokens], tables: list[str], tokenizer_sha256: str,
                      vocab_size: int) -> dict:
    """The variants' arrays and their manifest, atomically: what load_chat_tokens reads."""
    manifest = {"variants": [], "tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size}
    with atomic_dir(out_dir) as tmp:
        for v, (chat, table) in enumerate(zip(chats, tables, strict=True)):
            for name in ARRAYS:
                getattr(chat, name).tofile(tmp / f"variant-{v}.{name}.bin")
            manifest["variants"].append({"table": table, "tokens": len(chat.tokens),
                                         "reply_tokens": int(chat.loss_mask.sum()), "replies": len(chat.reply_spans),
                                         "sha256": chat_sha256(chat)})
        write_json(tmp / MANIFEST, manifest)
    return manifest


def chat_sha256(chat: ChatTokens) -> str:
    """The digest of a variant's arrays, as its manifest records it."""
    return sha256_of(*(getattr(chat, name) for name in ARRAYS))


def load_chat_tokens(tokens_dir: str | Path, tokenizer_sha256: str | None, vocab_size: int) -> list[ChatTokens]:
    """The chat_tokens stage's variants, checked against their manifest and the story tokens' tokenizer."""
    tokens_dir = Path(tokens_dir)
    try:
        manifest = json.loads((tokens_dir / MANIFEST).read_text())
        variants = manifest["variants"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LibrarianError(f"{tokens_dir / MANIFEST} is missing or unreadable; run `dvc repro chat_tokens`") from None
    if not variants:
        raise LibrarianError(f"{tokens_dir} holds no conversations (it was built with train.chat_share 0); {REDO}")
    if manifest.get("tokenizer_sha256") != tokenizer_sha256 or manifest.get("vocab_size") != vocab_size:
        raise LibrarianError(f"{tokens_dir} was tokenized with another tokenizer than the story tokens; {REDO}")
    loaded = []
    for v, meta in enumerate(variants):
        arrays = {}
        for name, dtype in ARRAYS.items():
            path = tokens_dir / f"variant-{v}.{name}.bin"
            if not path.is_file():
                raise LibrarianError(f"{path} not found; {REDO}")
            arrays[name] = np.fromfile(path, dtype=dtype)
        arrays["reply_spans"] = arrays["reply_spans"].reshape(-1, 2)
        chat = ChatTokens(**arrays)
        if (chat_sha256(chat) != meta.get("sha256") or not len(chat.tokens)
                or int(chat.tokens.max()) >= vocab_size) or len(chat.tokens) != len(chat.loss_mask):
            raise LibrarianError(f"variant {v} in {tokens_dir} does not match its manifest (damaged or partly "
                                 f"replaced); {REDO}")
        loaded.append(chat)
    return loaded

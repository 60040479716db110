"""Log-probabilities of generated tokens (`logprobs` in `librarian serve`), in OpenAI's two response shapes.

A token's log-probability is the log-softmax of the model's raw logits at the step that produced it
(float32, before temperature, top-k and top-p), so a reply's log-probabilities sum to the model's
own log-likelihood of the reply given its prompt, whatever the sampling settings. The batch engine
scores a token from the logits it already has (token_scores), so asking costs a log-softmax and a
top-k per token, no extra forward pass.

Shapes (OpenAI's):
  chat         choices[i].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}
  completions  choices[i].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

import torch

# (the token's log-probability, [(id, log-probability) of the likeliest tokens, likeliest first])
Scores = tuple[float, list[tuple[int, float]]]


def token_scores(logits: torch.Tensor, token: int, top: int) -> Scores:
    """The log-probability of `token` under one step's raw logits (V,), and the `top` likeliest tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, min(top, logprobs.size(-1)))  # sorted, likeliest first
    return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, read backwards: the byte each character of a token's name stands for.

    The byte-level BPE names a token by one printable character per byte (printable ASCII and
    Latin-1 as themselves, the other bytes as the characters from U+0100 on), so its raw bytes,
    which `bytes` reports and which a token ending mid-character needs, come from its name.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class TokenTexts:
    """Every token's raw bytes and the text OpenAI's `token` field shows for it, made once per server."""

    def __init__(self, tokenizer):
        decoder = byte_decoder()
        self.bytes = []
        for i in range(tokenizer.get_vocab_size()):
            name = tokenizer.id_to_token(i) or ""
            # A special token (<|endoftext|>) is named by its own text: any character off the table is itself.
            self.bytes.append(b"".join(bytes([decoder[c]]) if c in decoder else c.encode() for c in name))
        self.texts = [token_text(b) for b in self.bytes]


def token_text(raw: bytes) -> str:
    """The token's text, or `bytes:\\xe2\\x80` for one that is not whole UTF-8 (OpenAI's spelling): distinct
    tokens then have distinct texts, which completions' top_logprobs needs as keys."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass(frozen=True)
class Entry:
    """One generated token, scored: where its text starts in the reply's raw text, in characters."""

    token: int
    logprob: float
    top: list[tuple[int, float]]
    offset: int


class TokenLog:
    """A choice's tokens with their scores, handed out with the text they make.

    `scores` is the engine's Job.scores: it holds token i's scores before token i is emitted.
    Offsets count the characters of the decoded reply before each token, as the tokenizer decodes
    it (bytes that are not UTF-8 become U+FFFD, the same way in Python as in tokenizers'
    from_utf8_lossy); a token that completes a character split over several starts where that
    character does.
    """

    def __init__(self, scores: list[Scores], texts: TokenTexts):
        self.scores, self.texts = scores, texts
        self.entries: list[Entry] = []
        self.given = 0  # entries handed out
        self.chars = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> None:
        logprob, top = self.scores[len(self.entries)]
        held = self.decoder.getstate()[0]  # the start of a character, from the tokens before
        text = self.decoder.decode(self.texts.bytes[token])
        start = self.chars
        if held and text.startswith("\ufffd"):  # they were no character after all: their mark comes first
            start += len(held.decode("utf-8", errors="replace"))
        self.entries.append(Entry(token, logprob, top, start))
        self.chars += len(text)

    def take(self, before: int | None = None) -> list[Entry]:
        """The entries not yet handed out whose text starts before character `before` (None: all)."""
        end = self.given
        while end < len(self.entries) and (before is None or self.entries[end].offset < before):
            end += 1
        taken, self.given = self.entries[self.given : end], end
        return taken

    # --- OpenAI's shapes ---

    def _item(self, token: int, logprob: float) -> dict:
        return {"token": self.texts.texts[token], "logprob": logprob, "bytes": list(self.texts.bytes[token])}

    def chat(self, entries: list[Entry]) -> dict:
        return {"content": [{**self._item(e.token, e.logprob), "top_logprobs": [self._item(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}

    def completion(self, entries: list[Entry]) -> dict:
        texts = self.texts.texts
        return {"tokens": [texts[e.token] for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{texts[t]: lp for t, lp in e.top} for e in entries],
                "text_offset": [e.offset for e in entries]}

"""Text generation: the card's sampling controls, a KV cache, a sliding window and streaming.

Sampling: temperature (0 = greedy), top-k and top-p (nucleus), composable; seeded. All the options of
one generation travel together as one validated GenerationOptions.

Past the context: the model sees a window of at most context_length tokens. When the window is
full it jumps forward by half a context, so every token is predicted from at least half a
context of text; the KV cache is then refilled once, not every step. The uncached path uses the
very same windows, so both give the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from librarian.errors import LibrarianError
from librarian.model import GPT
from librarian.tokenizer import EOT


@dataclass(frozen=True)
class GenerationOptions:
    """How to continue a prompt, validated once here for every caller (CLI, chat, samples, demo).

    Frozen: a change (chat's /temp, a per-sample seed) is a new object, made with dataclasses.replace,
    which validates again. Stop tokens and stop strings are not options: the tokenizer and the chat
    format fix them, not the user.
    """

    temperature: float = 1.0  # 0: greedy, deterministic
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    max_new_tokens: int = 200
    seed: int | None = None  # None: a different continuation every time
    use_cache: bool = True  # False: recompute the whole window each step (same tokens, slower)

    @classmethod
    def of(cls, sampling) -> "GenerationOptions":
        """The options of a params section that samples (config.SamplingParams: samples, chat_samples, evaluate_chat)."""
        return cls(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                   max_new_tokens=sampling.max_new_tokens, seed=sampling.seed)

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise LibrarianError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise LibrarianError(f"top-k must be a whole number >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LibrarianError(f"top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise LibrarianError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def filter_logits(logits: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """Temperature-scaled logits (..., V) with everything outside top-k and top-p set to -inf."""
    # Shifted so the largest logit is 0: a tiny temperature then gives -inf, never inf - inf = nan.
    logits = (logits.float() - logits.float().max(-1, keepdim=True).values) / options.temperature
    if options.top_k and options.top_k < logits.size(-1):
        kth = torch.topk(logits, options.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches p: drop a token once the mass before it does.
        drop = probs.cumsum(-1) - probs >= options.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> int:
    """One token id from the logits (V,) of the last position."""
    if options.temperature == 0:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, options).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def window_start(length: int, start: int, context_length: int) -> int:
    """Where the model's window begins: unchanged until it is full, then half a context back from the end."""
    return start if length - start <= context_length else length - context_length // 2


@torch.inference_mode()
def generate_ids(
    model: GPT,
    prompt: list[int],
    options: GenerationOptions = GenerationOptions(),
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield new token ids one by one; stop after options.max_new_tokens or at a stop id (not yielded)."""
    if not prompt:
        raise LibrarianError("the prompt is empty; give at least one token (or some text)")
    model.eval()
    ctx = model.config.context_length
    device = model.tok_emb.weight.device
    seed = options.seed
    generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt[-ctx:])  # a prompt longer than the context keeps its end
    start, cache = 0, None
    for _ in range(options.max_new_tokens):
        new_start = window_start(len(ids), start, ctx)
        if options.use_cache:
            if cache is None or new_start != start:
                cache = model.new_cache()
                feed = ids[new_start:]
            else:
                feed = ids[-1:]
            hidden = model.hidden(torch.tensor([feed], device=device), cache)
        else:
            hidden = model.hidden(torch.tensor([ids[new_start:]], device=device))
        start = new_start
        # Only the last position's logits are needed: skip the output head everywhere else.
        token = next_token(model.next_logits(hidden[0, -1]).cpu(), options, generator)
        if token in stop_ids:
            return
        ids.append(token)
        yield token


class TextStream:
    """Turn a stream of token ids into text pieces, safe at UTF-8 and stop-string boundaries.

    A byte-level BPE token can end mid-character, and a stop string ("User:") can arrive over
    several tokens: a piece is only released once neither can still change it. Each push decodes
    the whole reply so far: quadratic, but microseconds at the lengths a reply has.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...] = ()):
        self.decode, self.stop_strings = decode, stop_strings
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        for stop in self.stop_strings:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                return self._release(text, at)
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text) - 1  # an unfinished character
        for stop in self.stop_strings:  # hold back a tail that could still grow into a stop string
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    safe = min(safe, len(text) - n)
                    break
        return self._release(text, safe)

    def finish(self) -> str:
        """Whatever was held back, once generation has ended without a stop string."""
        if self.stopped:
            return ""
        text = self.decode(self.ids)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        piece = text[self.released : max(end, self.released)]
        self.released = max(end, self.released)
        return piece


class Generator:
    """A trained model and its tokenizer, ready to continue text."""

    def __init__(self, model: GPT, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.eot = tokenizer.token_to_id(EOT)

    @classmethod
    def load(cls, model_path: str | Path, tokenizer_path: str | Path, device: str = "cpu") -> "Generator":
        from librarian.checkpoint import check_same_tokenizer, load_weights, read_tokenizer_sha256
        from librarian.tokenizer import file_sha256, load_tokenizer

        tokenizer = load_tokenizer(tokenizer_path)
        model = load_weights(model_path, device=device)
        check_same_tokenizer(model_path, read_tokenizer_sha256(model_path), file_sha256(tokenizer_path),
                             f"tokenizer {tokenizer_path}")
        if tokenizer.get_vocab_size() != model.config.vocab_size:
            raise LibrarianError(
                f"tokenizer {tokenizer_path} has {tokenizer.get_vocab_size()} tokens but model {model_path} "
                f"expects {model.config.vocab_size}; use the tokenizer the model was trained with"
            )
        return cls(model, tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def stream(
        self, prompt: str, options: GenerationOptions = GenerationOptions(), stop_strings: tuple[str, ...] = ()
    ) -> Iterator[str]:
        """Yield the continuation of `prompt` piece by piece, as it is generated; it ends at <|endoftext|>."""
        text = TextStream(self.decode, stop_strings)
        ids = generate_ids(self.model, self.encode(prompt), options, (self.eot,))
        for token in ids:
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return
        tail = text.finish()
        if tail:
            yield tail

    def complete(
        self, prompt: str, options: GenerationOptions = GenerationOptions(), stop_strings: tuple[str, ...] = ()
    ) -> str:
        return "".join(self.stream(prompt, options, stop_strings))

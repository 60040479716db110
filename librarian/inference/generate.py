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

from librarian.core.errors import LibrarianError
from librarian.data.tokenizer import EOT
from librarian.model.gpt import GPT

# torch's generator takes a 64-bit seed; a signed one is what every caller (and JSON) can carry.
MAX_SEED = 2**63 - 1


def nth_seed(seed: int | None, i: int) -> int | None:
    """The seed of sample (reply, choice) i of a run seeded with `seed`: seed + i, wrapped to stay a valid seed."""
    return None if seed is None else (seed + i) % (MAX_SEED + 1)


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
    # Classifier-free guidance (see guided_logits): 1 is plain sampling; above 1 leans toward what the
    # prompt adds over `negative`, the negative prompt's token ids (empty: the prompt's last token alone).
    guidance: float = 1.0
    negative: tuple[int, ...] = ()

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
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise LibrarianError(f"--seed must be a whole number from 0 to {MAX_SEED} (2**63 - 1), got {self.seed}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) \
                or not 0 < self.guidance <= MAX_GUIDANCE:
            raise LibrarianError(f"guidance must be a number above 0 and at most {MAX_GUIDANCE} (1 = off), "
                                 f"got {self.guidance!r}")

    @property
    def guided(self) -> bool:
        return self.guidance != 1


MAX_GUIDANCE = 20.0  # beyond it the guided distribution is the difference alone: no text
NUCLEUS_CANDIDATES = 256  # top-p looks among the likeliest 256 tokens first: sorting all 8000 costs ~20x more


def filter_logits(logits: torch.Tensor, options: GenerationOptions) -> torch.Tensor:
    """Temperature-scaled logits (..., V) with everything outside top-k and top-p set to -inf."""
    # Shifted so the largest logit is 0: a tiny temperature then gives -inf, never inf - inf = nan.
    logits = (logits.float() - logits.float().max(-1, keepdim=True).values) / options.temperature
    size = logits.size(-1)
    top_k = options.top_k if 0 < options.top_k < size else 0
    if not top_k and options.top_p == 1:
        return logits
    # The likeliest tokens, sorted: top-k's, or those among which the nucleus most likely lies.
    values, order = torch.topk(logits, top_k or min(size, NUCLEUS_CANDIDATES), dim=-1)
    if top_k:
        logits = logits.masked_fill(logits < values[..., -1:], float("-inf"))
    if options.top_p < 1:
        probs = logits.softmax(-1).gather(-1, order)
        if not top_k and values.size(-1) < size and bool((probs.sum(-1) < options.top_p).any()):
            values, order = torch.sort(logits, descending=True, dim=-1)  # a flat distribution: sort it all
            probs = values.softmax(-1)
        # Keep the smallest prefix whose mass reaches p: drop a token once the mass before it does.
        keep = probs.cumsum(-1) - probs < options.top_p
        logits = logits.masked_fill(~torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep), float("-inf"))
    return logits


def guided_logits(logits: torch.Tensor, negative: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Sanchez et al. 2024, "Stay on topic with Classifier-Free Guidance";
    transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor does the same):

        log p(w | negative) + guidance * (log p(w | prompt) - log p(w | negative))

    over the vocabulary, from the two passes' raw logits (..., V), before temperature, top-k and
    top-p, which then apply to the result as to plain logits."""
    negative = negative.float().log_softmax(-1)
    return negative + guidance * (logits.float().log_softmax(-1) - negative)


def next_token(logits: torch.Tensor, options: GenerationOptions, generator: torch.Generator | None) -> int:
    """One token id from the logits (V,) of the last position."""
    return choose(logits.unsqueeze(0), [options], [generator])[0]


def choose(logits: torch.Tensor, options: list[GenerationOptions], generators: list[torch.Generator | None]) -> list[int]:
    """One token id per row of logits (B, V), each row with its own options and random generator.

    Rows that share their sampling settings are filtered as one tensor (the batch engine's rows
    would otherwise pay the ops' overhead each); every step of the filter is row by row, so a row
    gets the same token in a batch as alone. A row draws one uniform number from its own generator:
    the first token whose cumulative probability exceeds it (torch.multinomial does the same job
    about ten times slower at this vocabulary size, and sampling is a large part of a decoding step).
    """
    tokens: list[int] = [0] * len(options)
    groups: dict[tuple, list[int]] = {}
    for row, o in enumerate(options):
        groups.setdefault((o.temperature, o.top_k, o.top_p), []).append(row)
    for rows in groups.values():
        chosen = logits[rows] if len(rows) < len(options) else logits
        if options[rows[0]].temperature == 0:
            picks = chosen.argmax(-1).tolist()
        else:
            cdf = filter_logits(chosen, options[rows[0]]).softmax(-1).cumsum(-1)
            picks = []
            for r, row in enumerate(rows):
                u = torch.rand(1, generator=generators[row], dtype=cdf.dtype) * cdf[r, -1]
                # right=True: a token of probability 0 has the cdf of the one before it, so it is never the first past u.
                picks.append(int(torch.searchsorted(cdf[r], u, right=True).clamp_max(cdf.size(-1) - 1)))
        for row, token in zip(rows, picks):
            tokens[row] = token
    return tokens


def window_start(length: int, start: int, context_length: int) -> int:
    """Where the model's window begins: unchanged until it is full, then half a context back from the
    end, and at least the last token (a context of 1 keeps no half)."""
    return start if length - start <= context_length else length - max(1, context_length // 2)


FINISH_STOP, FINISH_LENGTH = "stop", "length"  # why a sequence ended: a stop token, or max_new_tokens


class Window:
    """The ids of one sequence the model reads, and where its window begins (see window_start)."""

    def __init__(self, ids: list[int], context_length: int):
        self.ids, self.context_length = list(ids[-context_length:]), context_length  # a longer prompt keeps its end
        self.start = 0
        self._primed = False

    def refill(self) -> list[int] | None:
        """The window to run from an empty cache on this step (the first step, or the window slid), or None:
        then only the last token is fed, on top of the cache."""
        start = window_start(len(self.ids), self.start, self.context_length)
        if self._primed and start == self.start:
            return None
        self._primed, self.start = True, start
        return self.ids[start:]


class Decoding:
    """One sequence being decoded: its window of ids, its sampler and its stop rules; under guidance,
    also the negative prompt's window, which takes every token the sequence takes.

    The single-sequence loop (generate_ids) and the batch engine (librarian/inference/batching.py) both drive
    it, so a sequence takes the same steps, and draws the same random numbers, in either.
    """

    def __init__(self, prompt: list[int], options: GenerationOptions, stop_ids: tuple[int, ...], context_length: int):
        if not prompt:
            raise LibrarianError("the prompt is empty; give at least one token (or some text)")
        self.options, self.stop_ids, self.context_length = options, stop_ids, context_length
        seed = options.seed
        self.generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        self.window = Window(prompt, context_length)
        # The unconditional pass of guidance without a negative prompt: the prompt's last token, as transformers'.
        self.negative = Window(list(options.negative) or prompt[-1:], context_length) if options.guided else None
        self.prompt_tokens = len(self.window.ids)
        self.produced = 0  # tokens sampled, the stop token included
        self.finish_reason: str | None = None

    @property
    def ids(self) -> list[int]:
        return self.window.ids

    @property
    def start(self) -> int:
        return self.window.start

    def refill(self) -> list[int] | None:
        return self.window.refill()

    def accept(self, token: int) -> int | None:
        """Take the next token (sampled with self.options and self.generator); None if it ends the sequence."""
        self.produced += 1
        if token in self.stop_ids:
            self.finish_reason = FINISH_STOP
            return None
        self.window.ids.append(token)
        if self.negative is not None:
            self.negative.ids.append(token)
        if self.produced >= self.options.max_new_tokens:
            self.finish_reason = FINISH_LENGTH
        return token


@torch.inference_mode()
def generate_ids(
    model: GPT,
    prompt: list[int],
    options: GenerationOptions = GenerationOptions(),
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield new token ids one by one; stop after options.max_new_tokens or at a stop id (not yielded)."""
    model.eval()
    seq = Decoding(prompt, options, stop_ids, model.config.context_length)
    passes = [_Pass(model, seq.window, options.use_cache)]
    if seq.negative is not None:  # guidance: a second pass, over the negative prompt, with its own cache
        passes.append(_Pass(model, seq.negative, options.use_cache))
    while seq.finish_reason is None:
        logits = [p.next_logits() for p in passes]
        if seq.negative is not None:
            logits[0] = guided_logits(logits[0], logits[1], options.guidance)
        token = seq.accept(next_token(logits[0], options, seq.generator))
        if token is not None:
            yield token


class _Pass:
    """generate_ids' forward passes over one window: the cached path (its own KV cache, refilled when
    the window slides) or the uncached one (the whole window every step)."""

    def __init__(self, model: GPT, window: Window, use_cache: bool):
        self.model, self.window, self.use_cache = model, window, use_cache
        self.device = model.tok_emb.weight.device
        self.cache = None

    def next_logits(self) -> torch.Tensor:
        """The logits (V,) of the token after the window's last, on the CPU."""
        refill = self.window.refill()
        if not self.use_cache:
            hidden = self.model.hidden(torch.tensor([self.window.ids[self.window.start :]], device=self.device))
        elif refill is not None:
            self.cache = self.model.new_cache()
            hidden = self.model.hidden(torch.tensor([refill], device=self.device), self.cache)
        else:
            hidden = self.model.hidden(torch.tensor([self.window.ids[-1:]], device=self.device), self.cache)
        # Only the last position's logits are needed: skip the output head everywhere else.
        return self.model.next_logits(hidden[0, -1]).cpu()


class TextStream:
    """Turn a stream of token ids into text pieces, safe at UTF-8 and stop-string boundaries.

    A byte-level BPE token can end mid-character, and a stop string ("User:") can arrive over
    several tokens: a piece is only released once neither can still change it. Tokens are decoded
    incrementally: the ids up to the last whole character are decoded once and kept as text (a
    byte-level BPE decodes a concatenation to the concatenation of the decodings), so a push
    decodes only the token or two since then; `librarian serve` pushes every token of every stream.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...] = ()):
        self.decode, self.stop_strings = decode, stop_strings
        self.ids: list[int] = []
        self.done_text, self.done_ids = "", 0  # the text of ids[:done_ids], which ends with a whole character
        self.released = 0  # characters of the decoded text already handed out
        self.stopped = False

    def _text(self) -> str:
        tail = self.decode(self.ids[self.done_ids :])
        if not tail.endswith("\ufffd"):
            self.done_text, self.done_ids = self.done_text + tail, len(self.ids)
            return self.done_text
        return self.done_text + tail

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._text()
        for stop in self.stop_strings:
            at = text.find(stop, max(0, self.released - len(stop)))
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
        text = self._text()
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
        from librarian.data.tokenizer import file_sha256, load_tokenizer
        from librarian.model.checkpoint import check_same_tokenizer, load_weights, read_tokenizer_sha256

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

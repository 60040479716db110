"""A chat session in the card's format, testable without a terminal.

The model sees the dialogue as plain text, one line per speaker:

    User: <message>
    Assistant: <reply>
    User: <message>
    Assistant:

and continues it after the last `Assistant:`; the reply ends where the model starts the next
`User:` turn, at `<|endoftext|>`, or after max_new_tokens. The history is carried as far as the
context allows: the oldest turns are dropped first, measured in tokens, and the current message is
always kept (its end, if it alone is too long). A quarter of the context (at most max_new_tokens)
is left free for the reply, so the model can answer before its window has to slide past the start
of the prompt.

Keys: Ctrl-C during a reply cancels that reply (the history stays as it was before it); Ctrl-C at
the prompt discards the line and gives a new prompt; Ctrl-D (end of input) or /quit ends the
session with exit code 0.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TextIO

from librarian.core.errors import LibrarianError
from librarian.data.chat_template import ASSISTANT, NEUTRAL_REQUEST, USER, Turn, render_prompt
from librarian.inference.generate import GenerationOptions, Generator, nth_seed
from librarian.inference.rerank import best_by_request

STOP_STRINGS = (USER,)  # <|endoftext|> is a stop token in Generator.stream already
PROMPT = f"{USER} "
REPLY_LABEL = f"{ASSISTANT} "

# C0 and C1 control characters, DEL included; tab and newline are text.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

COMMANDS = {
    "/reset": "forget the conversation so far",
    "/temp X": "sampling temperature, X >= 0 (0 = greedy)",
    "/topk N": "sample from the N likeliest tokens only, N >= 0 (0 = off)",
    "/topp P": "sample from the smallest set of tokens holding probability P, 0 < P <= 1 (1 = off)",
    "/guide G": "guidance toward the request, 0 < G <= 20 (1 = off; 2 follows the request more closely)",
    "/help": "show this list",
    "/quit": "leave (Ctrl-D does too)",
}

# command -> (GenerationOptions field, value type, example value)
SETTINGS = {"/temp": ("temperature", float, "0.8"), "/topk": ("top_k", int, "50"), "/topp": ("top_p", float, "0.95"),
            "/guide": ("guidance", float, "2")}


def strip_controls(text: str) -> str:
    """`text` without C0/C1 control characters (tab and newline kept)."""
    return _CONTROLS.sub("", text)


def one_line(text: str) -> str:
    """A message as the card's format holds it: one line, no control characters."""
    return " ".join(strip_controls(text).split())


Encode = Callable[[str], list[int]]
Decode = Callable[[list[int]], str]


def crop_message(message: str, budget: int, encode: Encode, decode: Decode) -> str:
    """The end of `message`, as much as fits in a prompt of `budget` tokens without any history."""
    ids = encode(message)
    keep = min(len(ids), budget - len(encode(render_prompt([], ""))))
    while keep > 1:
        # A cut can fall inside a character: drop its leftover bytes.
        text = decode(ids[-keep:]).lstrip("\ufffd")
        if len(encode(render_prompt([], text))) <= budget:
            return text
        keep -= 1
    return decode(ids[-1:]).lstrip("\ufffd")  # a context too small for the format: keep the very end


def fit_prompt(
    history: list[Turn],
    message: str,
    budget: int,
    encode: Encode,
    decode: Decode,
) -> tuple[str, int, str]:
    """(prompt, number of history turns kept, message as used) for a prompt of at most `budget` tokens.

    The newest turns are kept, as many as fit with the whole message; the message is always kept,
    cropped to its end if it alone is too long (then no history fits).
    """
    if len(encode(render_prompt([], message))) > budget:
        message = crop_message(message, budget, encode, decode)
        return render_prompt([], message), 0, message
    kept = 0
    # Measure the whole prompt, not the sum of its parts: BPE merges across the joins may differ.
    while kept < len(history) and len(encode(render_prompt(history[-kept - 1 :], message))) <= budget:
        kept += 1
    return render_prompt(history[len(history) - kept :], message), kept, message


def negative_prompt(history: list[Turn], budget: int, encode: Encode, decode: Decode,
                    request: str = NEUTRAL_REQUEST) -> str:
    """Guidance's negative prompt in a chat: the same conversation, its last request replaced by a
    neutral one. Guidance then leans toward what the request asks for, and away from what any story
    would have. `history` is the turns the reply's own prompt kept."""
    prompt, _, _ = fit_prompt(history, request, budget, encode, decode)
    return prompt


def prompt_budget(context_length: int, max_new_tokens: int) -> int:
    """Tokens the prompt may use; the rest of the context is left for the reply."""
    reply_room = max(1, min(max_new_tokens, context_length // 4))
    return max(1, context_length - reply_room)


class ChatSession:
    """The state of one conversation: history, generation options and the commands that change them."""

    def __init__(self, generator: Generator, options: GenerationOptions = GenerationOptions(),
                 neutral_request: str = NEUTRAL_REQUEST, best_of: int = 1):
        check_best_of(best_of)
        self.generator, self.options, self.neutral_request = generator, options, neutral_request
        self.best_of = best_of  # above 1: respond() gives best_reply(message, best_of)
        self.history: list[Turn] = []
        self.replies = 0  # replies started: reply i samples with seed + i, so a seeded session repeats

    @property
    def context_length(self) -> int:
        return self.generator.model.config.context_length

    @property
    def prompt_budget(self) -> int:
        return prompt_budget(self.context_length, self.options.max_new_tokens)

    def build_prompt(self, message: str) -> tuple[str, int, str]:
        """(prompt, history turns kept, message as used): see fit_prompt."""
        return fit_prompt(self.history, message, self.prompt_budget, self.generator.encode, self.generator.decode)

    def reply(self, message: str) -> Iterator[str]:
        """Stream the reply to `message`; the turn joins the history only once the reply is complete.

        If the caller stops early (Ctrl-C), the history is left as it was.
        """
        prompt, kept, used = self.build_prompt(message)
        options = replace(self.options, seed=nth_seed(self.options.seed, self.replies))
        if options.guided:
            options = replace(options, negative=tuple(self.negative_ids(kept)))
        self.replies += 1
        stream = self.generator.stream(prompt, options, STOP_STRINGS)
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:
            stream.close()
        self.add_turn(kept, used, "".join(pieces))

    def best_reply(self, message: str, n: int) -> str:
        """Best of n, ranked by the request (librarian/inference/rerank.py): n replies sampled as reply()
        samples them, the j-th with the reply's seed + j (so the first is reply()'s own), and the one the
        request explains best, against guidance's negative prompt, kept and joined to the history."""
        check_best_of(n)
        prompt, kept, used = self.build_prompt(message)
        negative = self.negative_ids(kept)
        seed = nth_seed(self.options.seed, self.replies)
        self.replies += 1
        replies = []
        for j in range(n):
            options = replace(self.options, seed=nth_seed(seed, j))
            if options.guided:
                options = replace(options, negative=tuple(negative))
            replies.append(self.generator.complete(prompt, options, STOP_STRINGS))
        encode = self.generator.encode
        best = replies[best_by_request(self.generator.model, encode(prompt), negative, [encode(r) for r in replies])]
        self.add_turn(kept, used, best)
        return best

    def respond(self, message: str) -> Iterator[str]:
        """The reply as chat shows it: streamed, or, with best_of above 1, whole once all its candidates are in."""
        if self.best_of == 1:
            yield from self.reply(message)
        else:
            yield self.best_reply(message, self.best_of)

    def negative_ids(self, kept: int) -> list[int]:
        """Guidance's negative prompt for a reply whose prompt kept the last `kept` turns, as token ids."""
        kept_turns = self.history[len(self.history) - kept :]
        return self.generator.encode(negative_prompt(kept_turns, self.prompt_budget, self.generator.encode,
                                                     self.generator.decode, self.neutral_request))

    def add_turn(self, kept: int, message: str, reply: str) -> None:
        # The turns left out of this prompt will never fit again: forget them.
        self.history = self.history[len(self.history) - kept :] + [Turn(message, reply.strip())]

    def command(self, line: str) -> tuple[str, bool]:
        """Run a /command: (what to print, whether to quit)."""
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/quit", "/exit"):
            return "bye", True
        if name == "/help":
            return help_text(), False
        if name == "/reset":
            self.history = []
            return "(history cleared)", False
        if name not in SETTINGS:
            return f"unknown command {name}; type /help for the list of commands", False
        field, kind, example = SETTINGS[name]
        keeping = f"keeping {describe(self.options, only=field)}"
        try:
            value = kind(arg)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            return f"error: {name} needs {what}, e.g. {name} {example}; {keeping}", False
        try:
            self.options = replace(self.options, **{field: value})
        except LibrarianError as exc:
            return f"error: {exc}; {keeping}", False
        return f"now {describe(self.options)}", False


def check_best_of(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LibrarianError(f"--best-of must be a whole number >= 1 (1 = off), got {n!r}")


def describe(options: GenerationOptions, only: str | None = None) -> str:
    """The sampling settings as the user names them: "temperature 0 (greedy), top-k 50, top-p 1 (off)"."""
    parts = {
        "temperature": "temperature " + ("0 (greedy)" if options.temperature == 0 else f"{options.temperature:g}"),
        "top_k": f"top-k {options.top_k}" + ("" if options.top_k else " (off)"),
        "top_p": f"top-p {options.top_p:g}" + ("" if options.top_p < 1 else " (off)"),
        "guidance": f"guidance {options.guidance:g}" + ("" if options.guided else " (off)"),
    }
    return parts[only] if only else ", ".join(parts.values())


def help_text() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {c.ljust(width)}  {what}" for c, what in COMMANDS.items()]
    return "\n".join(["commands:", *lines, "  Ctrl-C stops a reply (or clears the line); Ctrl-D leaves"])


def banner(session: ChatSession) -> str:
    return (
        "Librarian chat: a small story model continuing a User:/Assistant: dialogue.\n"
        f"{describe(session.options)}, up to {session.options.max_new_tokens} tokens a reply"
        f"{f', best of {session.best_of} by the request' if session.best_of > 1 else ''}, "
        f"context {session.context_length} tokens.\n"
        "Commands: /reset /temp X /topk N /topp P /guide G /help /quit. Ctrl-C stops a reply; Ctrl-D or /quit leaves."
    )


def run_chat(
    generator: Generator,
    options: GenerationOptions = GenerationOptions(),
    input_fn: Callable[[str], str] = input,
    output: TextIO = sys.stdout,
    neutral_request: str = NEUTRAL_REQUEST,
    best_of: int = 1,
) -> int:
    """Read messages with `input_fn` until /quit or end of input; stream replies to `output`. Returns 0."""
    session = ChatSession(generator, options, neutral_request, best_of)

    def say(text: str = "", end: str = "\n") -> None:
        output.write(text + end)
        output.flush()

    say(banner(session))
    while True:
        try:
            line = input_fn(PROMPT)
        except EOFError:  # Ctrl-D, or the end of piped input
            say()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, ask again
            say("\n(Ctrl-D or /quit to leave)")
            continue
        message = strip_controls(line).strip()
        if not message:
            continue
        if message.startswith("/"):
            text, quit_ = session.command(message)
            say(text)
            if quit_:
                return 0
            continue
        _, _, used = session.build_prompt(message)
        if used != message:
            say(f"(your message is too long for the model's {session.context_length}-token context: "
                f"it sees only its last {len(used)} characters)")
        say(REPLY_LABEL, end="")
        pieces = display(session.respond(message))
        try:
            for piece in pieces:
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:  # Ctrl-C during a reply: cancel it, keep the session
            pieces.close()
            say("\n(interrupted)")
            continue
        say()


class ReplyTrim:
    """A reply's pieces as shown: no control characters, no whitespace before its start or after its end.

    Whitespace is held back until text follows it, so a reply that ends with a newline before the
    next `User:` does not print a blank line. `librarian chat` and `librarian serve` both show replies so.
    """

    def __init__(self):
        self.started, self.pending = False, ""

    def push(self, piece: str) -> str:
        piece = strip_controls(piece)
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = piece.rstrip()
        if not body:
            self.pending += piece
            return ""
        shown, self.pending = self.pending + body, piece[len(body) :]
        return shown


def display(pieces: Iterator[str]) -> Iterator[str]:
    """The reply as shown (ReplyTrim), piece by piece."""
    trim = ReplyTrim()
    try:
        for piece in pieces:
            shown = trim.push(piece)
            if shown:
                yield shown
    finally:
        close = getattr(pieces, "close", None)
        if close:
            close()

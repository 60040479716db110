import io
import re
from dataclasses import replace

import pytest
import torch

import librarian.inference.generate as generate_module
from librarian.inference.chat import (
    COMMANDS,
    ChatSession,
    Turn,
    display,
    fit_prompt,
    render_prompt,
    run_chat,
    strip_controls,
)
from librarian.inference.generate import GenerationOptions, Generator
from tests.helpers import TINY_CONTEXT, build_tiny, tiny_config

CTX = TINY_CONTEXT


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def gen(files):
    """The saved model: a small context (32 tokens), where the history has to be cut."""
    return Generator.load(*files)


@pytest.fixture(scope="module")
def wide(gen):
    """The same tokenizer with a context of 128 tokens: room for a few turns of history."""
    from librarian.model.gpt import GPT

    torch.manual_seed(0)
    config = tiny_config(vocab_size=gen.model.config.vocab_size, context_length=128)
    return Generator(GPT(config), gen.tokenizer)


class Script:
    """A stand-in for generate_ids: "generates" the tokens of a fixed text, recording each prompt.

    With interrupt_after=n it raises KeyboardInterrupt after n tokens, as Ctrl-C would mid-reply.
    """

    def __init__(self, gen, text, interrupt_after=None):
        self.gen, self.ids, self.interrupt_after = gen, gen.encode(text), interrupt_after
        self.prompts, self.options = [], []

    def __call__(self, model, prompt, options, *args, **kwargs):
        self.prompts.append(self.gen.decode(prompt))
        self.options.append(options)
        interrupt, self.interrupt_after = self.interrupt_after, None  # only the first reply
        for i, token in enumerate(self.ids[: options.max_new_tokens]):
            if interrupt is not None and i == interrupt:
                raise KeyboardInterrupt
            yield token


def feed(*lines):
    """An input function returning `lines` in turn, then end of input (Ctrl-D)."""
    lines = list(lines)

    def input_fn(prompt):
        if not lines:
            raise EOFError
        line = lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line

    return input_fn


def chat(gen, *lines, **options) -> tuple[int, str]:
    """run_chat on `lines`; `options` are GenerationOptions fields (default: greedy, 12 tokens a reply)."""
    out = io.StringIO()
    code = run_chat(gen, GenerationOptions(**{"temperature": 0, "max_new_tokens": 12, **options}),
                    input_fn=feed(*lines), output=out)
    return code, out.getvalue()


def tokens(gen, text):
    return len(gen.encode(text))


# --- the prompt -----------------------------------------------------------------------------


def test_prompt_is_the_cards_dialogue_format():
    history = [Turn("Hi", "Hello! How are you?"), Turn("Tell me a story", "")]
    assert render_prompt(history, "About a cat") == (
        "User: Hi\nAssistant: Hello! How are you?\nUser: Tell me a story\nAssistant:\nUser: About a cat\nAssistant:"
    )


def test_history_drops_the_oldest_turns_first_to_fit_the_context(gen):
    history = [Turn(f"turn {i}", f"reply {i}") for i in range(10)]
    budget = tokens(gen, render_prompt(history[-3:], "and now?")) + 2  # room for 3 turns, not 4
    prompt, kept, used = fit_prompt(history, "and now?", budget, gen.encode, gen.decode)
    assert used == "and now?" and kept == 3
    assert prompt == render_prompt(history[-kept:], "and now?")
    assert tokens(gen, prompt) <= budget
    assert tokens(gen, render_prompt(history[-kept - 1 :], "and now?")) > budget  # one more would not fit
    everything = fit_prompt(history, "and now?", 10_000, gen.encode, gen.decode)
    assert everything[1] == len(history)


def test_session_forgets_turns_that_no_longer_fit(wide, monkeypatch):
    monkeypatch.setattr(generate_module, "generate_ids", Script(wide, " Fine."))
    session = ChatSession(wide, GenerationOptions(0, max_new_tokens=8))
    assert session.prompt_budget == 128 - 8
    for i in range(8):
        list(session.reply(f"message number {i}"))
        prompt, _, _ = session.build_prompt("next")
        assert tokens(wide, prompt) <= session.prompt_budget
    assert 1 < len(session.history) < 8
    assert session.history[-1] == Turn("message number 7", "Fine.")


def test_a_message_longer_than_the_context_keeps_its_end(gen):
    message = " ".join(f"word{i}" for i in range(200)) + " the end"
    prompt, kept, used = fit_prompt([Turn("old", "turn")], message, 24, gen.encode, gen.decode)
    assert kept == 0 and message.endswith(used) and used.endswith("the end")
    assert prompt == render_prompt([], used) and tokens(gen, prompt) <= 24


def test_a_long_non_ascii_message_is_cut_cleanly(gen):
    message = "🐱日本語" * 50
    _, _, used = fit_prompt([], message, 24, gen.encode, gen.decode)
    assert used and message.endswith(used) and "\ufffd" not in used


def test_a_context_too_small_for_the_format_still_keeps_the_message_end(gen):
    _, _, used = fit_prompt([], "a long story about a cat", 3, gen.encode, gen.decode)
    assert used and "a long story about a cat".endswith(used)


# --- the reply ------------------------------------------------------------------------------


def test_reply_stops_at_the_next_user_turn_and_is_stored_stripped(wide, monkeypatch):
    script = Script(wide, " Hello, friend!\nUser: and more\nAssistant: no")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    session = ChatSession(wide, GenerationOptions(0, max_new_tokens=50))
    assert "".join(session.reply("Hi")).strip() == "Hello, friend!"
    assert session.history == [Turn("Hi", "Hello, friend!")]
    list(session.reply("Again"))
    assert script.prompts[-1] == "User: Hi\nAssistant: Hello, friend!\nUser: Again\nAssistant:"


def test_run_chat_streams_the_reply_and_prints_it_once(wide, monkeypatch):
    monkeypatch.setattr(generate_module, "generate_ids", Script(wide, " Once upon a time.\nUser: x"))
    code, out = chat(wide, "Hi", max_new_tokens=50)
    assert code == 0
    assert "Assistant: Once upon a time.\n" in out and "User: x" not in out


def test_display_trims_the_reply_and_removes_control_characters():
    assert "".join(display(iter([" ", "\n Hi", " there", "\n", " ", "\x1b[2Jyou", "\n\n"]))) == "Hi there\n [2Jyou"


def test_real_generator_replies_and_a_seeded_session_repeats(gen):
    lines = ("Hello", "How are you?", "/reset", "Hello")
    first = chat(gen, *lines, temperature=0.8, top_k=50, top_p=0.95, seed=3)
    assert first == chat(gen, *lines, temperature=0.8, top_k=50, top_p=0.95, seed=3)
    assert first[0] == 0 and first[1].count("\nAssistant:") == 3


# --- commands -------------------------------------------------------------------------------


def test_reset_clears_the_history(wide, monkeypatch):
    script = Script(wide, " Yes.")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    session = ChatSession(wide, GenerationOptions(0, max_new_tokens=8))
    list(session.reply("first"))
    assert session.history
    text, quit_ = session.command("/reset")
    assert session.history == [] and not quit_ and "cleared" in text
    list(session.reply("second"))
    assert script.prompts[-1] == "User: second\nAssistant:"


@pytest.mark.parametrize("line,field,value", [("/temp 0", "temperature", 0.0), ("/temp 1.3", "temperature", 1.3),
                                              ("/topk 5", "top_k", 5), ("/topk 0", "top_k", 0),
                                              ("/topp 0.5", "top_p", 0.5), ("/TOPP 1", "top_p", 1.0),
                                              ("/guide 2", "guidance", 2.0), ("/guide 1", "guidance", 1.0)])
def test_sampling_commands_change_the_setting(wide, line, field, value):
    before = GenerationOptions(0.8, 50, 0.95, max_new_tokens=30, seed=7, use_cache=False)
    session = ChatSession(wide, before)
    text, quit_ = session.command(line)
    assert session.options == replace(before, **{field: value}) and not quit_  # the other options kept
    assert "\n" not in text and not text.startswith("error")


@pytest.mark.parametrize("line,message", [("/temp -1", "temperature must be >= 0"), ("/temp abc", "needs a number"),
                                          ("/temp", "needs a number"), ("/temp nan", "temperature must be >= 0"),
                                          ("/topk -1", "top-k must be a whole number"),
                                          ("/topk 1.5", "needs a whole number"),
                                          ("/topp 0", r"top-p must be in \(0, 1\]"),
                                          ("/topp 1.5", r"top-p must be in \(0, 1\]"),
                                          ("/guide 0", "guidance must be a number above 0"),
                                          ("/guide 25", "at most 20"), ("/guide x", "needs a number")])
def test_bad_sampling_values_keep_the_old_setting(wide, line, message):
    before = GenerationOptions(0.8, 50, 0.95)
    session = ChatSession(wide, before)
    text, quit_ = session.command(line)
    assert session.options == before and not quit_
    assert text.startswith("error: ") and "keeping" in text and "\n" not in text
    assert re.search(message, text)


def test_help_lists_every_command_and_unknown_commands_get_a_hint(gen):
    session = ChatSession(gen)
    text, quit_ = session.command("/help")
    assert not quit_ and all(command.split()[0] in text for command in COMMANDS)
    text, quit_ = session.command("/bogus 3")
    assert not quit_ and "unknown command /bogus" in text and "/help" in text and "\n" not in text


def test_quit_ends_the_session_with_exit_code_0(wide, monkeypatch):
    script = Script(wide, " ok")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    code, out = chat(wide, "/quit", "never read")
    assert code == 0 and script.prompts == []
    assert "/help" in out.splitlines()[2]  # the banner names the commands


def test_commands_in_a_session(wide, monkeypatch):
    script = Script(wide, " ok")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    code, out = chat(wide, "/temp -1", "/topk x", "/topp 0.9", "/nope", "/help", "hi")
    assert code == 0
    assert "error: temperature must be >= 0" in out and "error: /topk needs a whole number" in out
    assert "now temperature 0 (greedy), top-k 0 (off), top-p 0.9" in out
    assert "unknown command /nope" in out and "Assistant: ok" in out


# --- input handling -------------------------------------------------------------------------


def test_empty_and_blank_input_just_prompts_again(wide, monkeypatch):
    script = Script(wide, " ok")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    code, out = chat(wide, "", "   ", "\t", "\x00\x1b\x07")
    assert code == 0 and script.prompts == [] and "\nAssistant:" not in out


def test_control_characters_are_stripped_before_use(wide, monkeypatch):
    assert strip_controls("he\x00l\x1blo\tworld\x7f\x85\u009f\r\nnext") == "hello\tworld\nnext"
    assert strip_controls("café 🐱") == "café 🐱"
    script = Script(wide, " ok")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    chat(wide, "\x1b[31mred\x1b[0m cat\x08")
    assert script.prompts == ["User: [31mred[0m cat\nAssistant:"]


def test_emoji_and_non_ascii_input(wide):
    session = ChatSession(wide, GenerationOptions(0, max_new_tokens=10))
    reply = "".join(session.reply("Hi 🐱! Ça va? 日本語 ñ"))
    assert isinstance(reply, str)
    assert session.history[0].user == "Hi 🐱! Ça va? 日本語 ñ"
    prompt, _, _ = session.build_prompt("🐶")
    assert wide.decode(wide.encode(prompt)) == prompt  # byte-level BPE: nothing is lost
    code, out = chat(wide, "Hi 🐱", "日本語")
    assert code == 0 and out.count("\nAssistant:") == 2


def test_very_long_input_is_cropped_with_a_note(gen, monkeypatch):
    script = Script(gen, " ok")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    code, out = chat(gen, "blah " * 5000 + "THE END", max_new_tokens=8)
    assert code == 0 and "too long" in out and "Assistant: ok" in out
    assert script.prompts[0].endswith("THE END\nAssistant:") and tokens(gen, script.prompts[0]) <= CTX - 8


def test_ctrl_c_during_a_reply_cancels_it_and_keeps_the_session(wide, monkeypatch):
    script = Script(wide, " a long, long reply that goes on and on", interrupt_after=3)
    monkeypatch.setattr(generate_module, "generate_ids", script)
    code, out = chat(wide, "first", "second", max_new_tokens=50)
    assert code == 0
    assert "\n(interrupted)\n" in out
    assert out.count("\nAssistant:") == 2
    assert script.prompts[1] == "User: second\nAssistant:"  # the cancelled turn left no trace


def test_ctrl_c_while_the_reply_is_being_printed(wide, monkeypatch):
    monkeypatch.setattr(generate_module, "generate_ids", Script(wide, " one two three four five six"))
    session = ChatSession(wide, GenerationOptions(0, max_new_tokens=50))
    pieces = session.reply("hi")
    next(pieces)
    pieces.close()  # what run_chat does when Ctrl-C lands in its own code
    assert session.history == []

    class Terminal(io.StringIO):
        """Ctrl-C lands while the third piece of the first reply is being written."""

        writes_after_label = None

        def write(self, text):
            if text == "Assistant: " and self.writes_after_label is None:
                self.writes_after_label = 0
            elif self.writes_after_label is not None and self.writes_after_label >= 0:
                self.writes_after_label += 1
                if self.writes_after_label == 3:
                    self.writes_after_label = -1
                    raise KeyboardInterrupt
            return super().write(text)

    out = Terminal()
    assert run_chat(wide, GenerationOptions(0, max_new_tokens=50), input_fn=feed("hi", "again"), output=out) == 0
    text = out.getvalue()
    assert "(interrupted)" in text and text.count("\nAssistant:") == 2
    assert text.endswith("Assistant: one two three four five six\n\n")


def test_ctrl_c_at_the_prompt_gives_a_new_prompt(wide, monkeypatch):
    script = Script(wide, " ok")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    code, out = chat(wide, KeyboardInterrupt(), "hi")
    assert code == 0 and "/quit to leave" in out and len(script.prompts) == 1


def test_end_of_input_exits_cleanly(gen):
    assert chat(gen)[0] == 0
    assert chat(gen, "hello")[0] == 0


def test_guidances_negative_prompt_is_the_conversation_with_a_neutral_last_request(wide, monkeypatch):
    """Guided, a reply's negative prompt is the same kept history, the user's request replaced by
    "Tell me a story." (or --negative-prompt's); unguided, there is none."""
    from librarian.data.chat_template import NEUTRAL_REQUEST

    script = Script(wide, " Fine.")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    session = ChatSession(wide, GenerationOptions(0, max_new_tokens=8, seed=3))
    list(session.reply("hello there"))
    assert script.options[-1].negative == () and not script.options[-1].guided
    session.command("/guide 2.5")
    list(session.reply("a story about a red ball"))
    history = [Turn("hello there", "Fine.")]
    assert script.prompts[-1] == render_prompt(history, "a story about a red ball")
    assert wide.decode(list(script.options[-1].negative)) == render_prompt(history, NEUTRAL_REQUEST)
    assert script.options[-1].guidance == 2.5 and script.options[-1].seed == 4  # reply 1: seed + 1, as unguided

    other = ChatSession(wide, GenerationOptions(0, max_new_tokens=8, guidance=2.0), neutral_request="Hi.")
    list(other.reply("a story about a dog"))
    assert wide.decode(list(script.options[-1].negative)) == render_prompt([], "Hi.")


def test_the_neutral_request_is_the_first_plain_phrasing_of_the_chat_data():
    from librarian.data.chat_data import TEMPLATES
    from librarian.data.chat_template import NEUTRAL_REQUEST

    assert TEMPLATES["plain"][0] == NEUTRAL_REQUEST


def test_guidance_one_replies_as_today(gen):
    plain = GenerationOptions(1.0, 0, 1.0, max_new_tokens=20, seed=9)
    one = replace(plain, guidance=1.0, negative=(1, 2, 3))
    assert gen.complete("Once upon a time", one) == gen.complete("Once upon a time", plain)
    assert gen.complete("Once upon a time", replace(plain, guidance=3.0)) != gen.complete("Once upon a time", plain)

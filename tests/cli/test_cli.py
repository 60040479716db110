import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from librarian.cli.main import build_parser, main
from tests.helpers import ROOT
from tests.helpers import build_tiny

TIMEOUT = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def model_args(files):
    return ["--model", str(files[0]), "--tokenizer", str(files[1])]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1"}


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "librarian.cli.main", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env(), cwd=ROOT, timeout=TIMEOUT)


def run(capsys, *argv) -> str:
    """Run the CLI in-process (fast: no interpreter or torch start-up); returns stdout."""
    main(list(argv))
    return capsys.readouterr().out


def fails(capsys, *argv) -> str:
    """Run a command that must fail: exit code 1, one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


# --- generate -------------------------------------------------------------------------------


def test_generate_prints_the_prompt_then_streams_the_continuation(model_args, monkeypatch):
    class Terminal:
        def __init__(self):
            self.writes, self.flushes = [], 0

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            self.flushes += 1

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    main(["generate", "--prompt", "Once upon a time", *model_args, "--max-new-tokens", "30", "--seed", "1"])
    text = "".join(terminal.writes)
    assert text.startswith("Once upon a time") and text.endswith("\n") and len(text) > len("Once upon a time\n")
    assert len(terminal.writes) > 5 and terminal.flushes >= len(terminal.writes) - 1  # piece by piece, flushed


def test_greedy_twice_gives_the_same_text_and_cache_changes_nothing(model_args, capsys):
    greedy = ["generate", "--prompt", "The dog", *model_args, "--temperature", "0", "--max-new-tokens", "40"]
    first = run(capsys, *greedy)
    assert run(capsys, *greedy) == first
    assert run(capsys, *greedy, "--no-cache") == first


def test_same_seed_same_text(model_args, capsys):
    sample = ["generate", "--prompt", "Lily", *model_args, "--max-new-tokens", "40"]
    assert run(capsys, *sample, "--seed", "7") == run(capsys, *sample, "--seed", "7")
    assert run(capsys, *sample, "--seed", "7") != run(capsys, *sample, "--seed", "8")


def test_num_samples_are_separated_and_use_seed_plus_i(model_args, capsys):
    sample = ["generate", "--prompt", "Tom", *model_args, "--max-new-tokens", "20", "--temperature", "1"]
    both = run(capsys, *sample, "--seed", "5", "--num-samples", "2")
    first, second = both.split("\n--- sample 2 ---\n")
    assert first == run(capsys, *sample, "--seed", "5")
    assert second == run(capsys, *sample, "--seed", "6")
    assert first.startswith("Tom") and second.startswith("Tom")


def test_guidance_1_is_todays_text_and_a_guided_one_follows_its_flags(model_args, capsys):
    sample = ["generate", "--prompt", "Lily", *model_args, "--max-new-tokens", "30", "--temperature", "1",
              "--seed", "4"]
    plain = run(capsys, *sample)
    assert run(capsys, *sample, "--guidance", "1") == plain
    guided = run(capsys, *sample, "--guidance", "3")
    assert guided != plain and guided.startswith("Lily")
    assert run(capsys, *sample, "--guidance", "3", "--negative-prompt", "Tom and the dog") not in (guided, plain)


@pytest.mark.parametrize("bad,message", [(["--temperature", "-1"], "temperature must be >= 0"),
                                         (["--top-p", "0"], "top-p must be in (0, 1]"),
                                         (["--top-k", "-1"], "top-k must be a whole number >= 0"),
                                         (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                                         (["--num-samples", "0"], "--num-samples must be >= 1"),
                                         (["--guidance", "0"], "guidance must be a number above 0"),
                                         (["--guidance", "21"], "at most 20")])
def test_bad_generation_settings_are_one_line_errors(model_args, capsys, bad, message):
    assert message in fails(capsys, "generate", "--prompt", "Once", *model_args, *bad)


def test_chat_best_of_below_one_is_a_one_line_error(model_args, capsys):
    assert "--best-of must be a whole number >= 1 (1 = off), got 0" in fails(capsys, "chat", *model_args,
                                                                            "--best-of", "0")


@pytest.mark.parametrize("prompt", ["", "   ", "\x00\x01\x1b"])
def test_an_empty_prompt_is_an_error_with_a_hint(model_args, capsys, prompt):
    assert '--prompt "Once upon a time"' in fails(capsys, "generate", "--prompt", prompt, *model_args)


def test_missing_files_are_one_line_errors(files, tmp_path, capsys):
    err = fails(capsys, "generate", "--prompt", "Hi", "--model", str(tmp_path / "none.safetensors"),
                "--tokenizer", str(files[1]))
    assert "none.safetensors not found" in err
    assert "not found" in fails(capsys, "chat", "--model", str(files[0]), "--tokenizer", str(tmp_path / "no.json"))


def test_a_folder_given_for_a_file_is_one_line_naming_the_file_inside(files, tmp_path, capsys):
    model, tokenizer = files
    err = fails(capsys, "generate", "--prompt", "Hi", "--model", str(tmp_path), "--tokenizer", str(tokenizer))
    assert err == f"error: model file {tmp_path} is a folder, not a file; give the path of a .safetensors file in it\n"
    # the folder of both files (like the pipeline's data/model/): name the file the user meant
    err = fails(capsys, "chat", "--model", str(model.parent), "--tokenizer", str(tokenizer))
    assert err == f"error: model file {model.parent} is a folder, not a file; did you mean {model}?\n"
    err = fails(capsys, "generate", "--prompt", "Hi", "--model", str(model), "--tokenizer", str(tokenizer.parent))
    assert err == f"error: tokenizer {tokenizer.parent} is a folder, not a file; did you mean {tokenizer}?\n"
    err = fails(capsys, "export", str(tmp_path / "hf"), "--model", str(model), "--tokenizer", str(tmp_path))
    assert "is a folder, not a file" in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("command,stream", [("chat", "stdin"), ("chat", "stdout"), ("generate", "stdout")])
def test_a_closed_standard_stream_is_one_line(model_args, capsys, monkeypatch, command, stream):
    monkeypatch.setattr(sys, stream, None)  # what Python makes of `<&-` and `>&-`
    prompt = ["--prompt", "Hi"] if command == "generate" else []
    assert fails(capsys, command, *prompt, *model_args).startswith(f"error: {stream} is closed; {command} ")


def test_outside_the_project_the_defaults_say_where_to_run(files, model_args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = fails(capsys, "generate", "--prompt", "Hi")
    assert err == (f"error: no Librarian project here ({tmp_path}: no dvc.yaml or params.yaml); run from the project "
                   "folder, the one with dvc.yaml, or pass --model and --tokenizer\n")
    assert "or pass --tokenizer\n" in fails(capsys, "chat", "--model", str(files[0]))
    # explicit paths work from anywhere
    assert run(capsys, "generate", "--prompt", "Hi", *model_args, "--max-new-tokens", "3").startswith("Hi")
    # from a folder inside the project, name the project folder
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert f"run from the project folder ({tmp_path}) or pass --model" in fails(capsys, "export", "out")
    # inside the project before any run: how to make a model; one default missing: its loader's "not found"
    monkeypatch.chdir(tmp_path)
    assert "no trained model here yet" in fails(capsys, "generate", "--prompt", "Hi")
    assert "not found; train a model first" in fails(capsys, "generate", "--prompt", "Hi", "--tokenizer", str(files[1]))


def test_a_malformed_command_line_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "Hi", "--temperature", "hot"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "librarian generate --help" in err


def test_errors_in_a_real_process_have_no_traceback(model_args):
    result = cli("generate", "--prompt", "Hi", *model_args, "--top-p", "0")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "error: top-p must be in (0, 1] (1 = off), got 0.0\n"


# --- chat -----------------------------------------------------------------------------------


def test_chat_through_piped_stdin(model_args):
    result = cli("chat", *model_args, "--seed", "1", "--max-new-tokens", "20", stdin="Hello\n/temp 0\nHi 🐱\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "User: Hello\nAssistant: " in out and "User: Hi 🐱\nAssistant: " in out  # piped input is echoed
    assert "temperature 0 (greedy)" in out and out.rstrip().endswith("bye")


def test_chat_guides_by_default_and_generate_does_not(model_args):
    """chat's default guidance is the measured CHAT_GUIDANCE (docs/LOG.md); --guidance 1 is free sampling."""
    from librarian.cli.main import CHAT_GUIDANCE, build_parser

    parser = build_parser()
    assert parser.parse_args(["chat"]).guidance == CHAT_GUIDANCE == 3.0
    assert parser.parse_args(["generate", "--prompt", "x"]).guidance == 1.0
    guided = cli("chat", *model_args, "--seed", "1", "--max-new-tokens", "12", stdin="Tell me a story about Tom.\n")
    explicit = cli("chat", *model_args, "--seed", "1", "--max-new-tokens", "12", "--guidance", "3",
                   stdin="Tell me a story about Tom.\n")
    free = cli("chat", *model_args, "--seed", "1", "--max-new-tokens", "12", "--guidance", "1",
               stdin="Tell me a story about Tom.\n")
    assert "guidance 3," in guided.stdout and "guidance 1 (off)" in free.stdout
    assert guided.stdout == explicit.stdout
    assert guided.stdout.split("Assistant:")[-1] != free.stdout.split("Assistant:")[-1]


def test_chat_exits_0_at_the_end_of_piped_input(model_args):
    result = cli("chat", *model_args, "--max-new-tokens", "5", stdin="Hello\n")
    assert result.returncode == 0 and result.stderr == "" and "\nAssistant: " in result.stdout


class Pty:
    """The chat in a real pseudo-terminal: Ctrl-C there is the terminal's SIGINT, as a user sends it."""

    def __init__(self, argv):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the CLI
            try:
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "-m", "librarian.cli.main", *argv], env())
            finally:
                os._exit(127)
        self.seen = b""
        # poll, not select: select() refuses descriptors above 1023, which a long run can reach.
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def readable(self, timeout: float) -> bool:
        return bool(self.poller.poll(max(timeout, 0) * 1000))

    def expect(self, text: str, timeout: float = TIMEOUT) -> None:
        """Read until `text` appears after what was matched before."""
        deadline = time.monotonic() + timeout
        wanted = text.encode()
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; saw {self.seen[-500:]!r}")
            if self.readable(left):
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the chat ended while waiting for {text!r}; saw {self.seen[-500:]!r}")
                self.seen += chunk
        self.seen = self.seen[self.seen.index(wanted) + len(wanted) :]

    def read_at_least(self, n: int, timeout: float = TIMEOUT) -> None:
        """Read until `n` more bytes have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < n:
            if time.monotonic() > deadline or not self.readable(deadline - time.monotonic()):
                raise AssertionError(f"timed out waiting for output; saw {self.seen[-500:]!r}")
            self.seen += os.read(self.fd, 65536)
        self.seen = b""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def alive(self) -> bool:
        return os.waitpid(self.pid, os.WNOHANG) == (0, 0)

    def wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # keep draining, so the child never blocks on a full terminal
                if self.readable(0.05):
                    os.read(self.fd, 65536)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        raise AssertionError("the chat did not exit")

    def close(self) -> None:
        try:
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.fd)


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_ctrl_c_in_a_real_terminal_stops_the_reply_and_keeps_the_chat(files, model_args):
    from librarian.inference.chat import STOP_STRINGS, render_prompt
    from librarian.inference.generate import GenerationOptions, Generator

    # Greedy decoding of this untrained model loops on a few tokens: a reply that does not end by itself.
    message = "Hello there"
    greedy = GenerationOptions(0, max_new_tokens=1000)
    long_reply = Generator.load(*files).stream(render_prompt([], message), greedy, stop_strings=STOP_STRINGS)
    assert sum(1 for _ in long_reply) > 100, "the test model's greedy reply ends early; pick another message"
    term = Pty(["chat", *model_args, "--temperature", "0", "--max-new-tokens", "1000000"])
    try:
        term.expect("/quit leaves.")
        term.expect("User: ")
        term.send(f"{message}\r")
        term.expect("Assistant: ")
        term.read_at_least(50)  # the reply is streaming
        term.send("\x03")  # Ctrl-C
        term.expect("(interrupted)")
        term.expect("User: ")
        assert term.alive()
        term.send("/quit\r")
        term.expect("bye")
        assert term.wait() == 0
    finally:
        term.close()


# --- export ---------------------------------------------------------------------------------


def test_export_parses():
    args = build_parser().parse_args(["export", "--format", "hf", "out/hf", "--model", "m.safetensors"])
    assert (args.command, args.format, str(args.out), str(args.model)) == ("export", "hf", "out/hf", "m.safetensors")
    assert str(args.tokenizer) == "data/tokenizer.json"


def test_export_calls_export_hf(model_args, tmp_path, capsys, monkeypatch):
    try:
        import librarian.inference.export as export
    except ImportError as exc:
        pytest.skip(f"librarian.inference.export cannot be imported yet ({exc})")
    calls = []
    monkeypatch.setattr(export, "export_hf", lambda *args, **kwargs: calls.append((args, kwargs)) or args[2])
    out = run(capsys, "export", "--format", "hf", str(tmp_path / "hf"), *model_args)
    assert calls == [((Path(model_args[1]), Path(model_args[3]), tmp_path / "hf"), {"force": False})]
    assert str(tmp_path / "hf") in out


def test_export_refuses_an_unknown_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--format", "onnx", "out"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


# --- the samples stage ----------------------------------------------------------------------


def test_samples_stage_writes_the_same_bytes_twice(files, tmp_path, raw_params, monkeypatch):
    from stages.samples import main as samples

    raw_params["samples"]["max_new_tokens"] = 25
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for path in files:
        os.link(path, tmp_path / "data" / path.name)
    argv = ["data/model.safetensors", "data/tokenizer.json", "metrics/samples.md"]
    samples(argv)
    first = (tmp_path / "metrics" / "samples.md").read_bytes()
    samples(argv)
    assert (tmp_path / "metrics" / "samples.md").read_bytes() == first
    text = first.decode()
    assert text.startswith("# Samples\n") and "`data/model.safetensors`" in text and str(tmp_path) not in text
    settings = raw_params["samples"]
    assert (f"temperature {settings['temperature']:g}, top-k {settings['top_k']}, top-p {settings['top_p']:g}, "
            f"seed {settings['seed']} for every prompt, up to 25 new tokens") in text
    for prompt in raw_params["samples"]["prompts"]:
        assert f"```text\n{prompt}\n```" in text
    assert text.count("## Sample ") == len(raw_params["samples"]["prompts"])


def test_samples_name_an_absolute_model_path_by_its_file_name_only(files, tmp_path, make_params):
    from librarian.evaluation.samples import fenced, write_samples

    params = make_params(**{"samples.max_new_tokens": 5}).samples
    text = write_samples(files[0], files[1], tmp_path / "samples.md", params)
    assert "`model.safetensors`" in text and str(files[0].parent) not in text
    assert fenced("a ```b``` c").startswith("````text\n")


# --- the chat_samples stage -----------------------------------------------------------------


def chat_samples_project(files, tmp_path, raw_params, monkeypatch, **settings) -> list[str]:
    """tmp_path as a project holding `files` as the chat model and tokenizer; the stage's argv."""
    from tests.helpers import set_dotted

    for dotted, value in settings.items():
        set_dotted(raw_params["chat_samples"], dotted, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "chat_model").mkdir(parents=True)
    os.link(files[0], tmp_path / "data" / "chat_model" / "model.safetensors")
    os.link(files[1], tmp_path / "data" / "tokenizer.json")
    return ["data/chat_model/model.safetensors", "data/tokenizer.json", "metrics/chat_samples.md"]


def test_chat_samples_send_each_request_as_a_chat_turn_and_stop_at_the_next_user_turn(
        files, tmp_path, raw_params, monkeypatch):
    import librarian.inference.generate as generate_module
    from librarian.inference.generate import Generator
    from stages.chat_samples import main as chat_samples
    from tests.inference.test_chat import Script

    argv = chat_samples_project(files, tmp_path, raw_params, monkeypatch)
    # A model that answers every request the same way, then starts the next turn itself.
    script = Script(Generator.load(*files), " Once upon a time, Tom found a ball.\nUser: another one")
    monkeypatch.setattr(generate_module, "generate_ids", script)
    chat_samples(argv)
    requests = raw_params["chat_samples"]["prompts"]
    assert script.prompts == [f"User: {request}\nAssistant:" for request in requests]
    text = (tmp_path / "metrics" / "chat_samples.md").read_text()
    reply = "Reply:\n\n```text\nOnce upon a time, Tom found a ball.\n```"  # stripped, cut before `User:`
    assert text.count(reply) == len(requests) and "another one" not in text
    for i, request in enumerate(requests, start=1):
        assert f"## Sample {i}\n\nRequest:\n\n```text\n{request}\n```\n\n{reply}" in text


def test_chat_samples_stage_writes_the_same_bytes_twice(files, tmp_path, raw_params, monkeypatch):
    from librarian.data.tokenizer import file_sha256
    from stages.chat_samples import main as chat_samples

    argv = chat_samples_project(files, tmp_path, raw_params, monkeypatch, max_new_tokens=25)
    chat_samples(argv)
    first = (tmp_path / "metrics" / "chat_samples.md").read_bytes()
    chat_samples(argv)
    assert (tmp_path / "metrics" / "chat_samples.md").read_bytes() == first
    text = first.decode()
    settings = raw_params["chat_samples"]
    assert text.startswith("# Chat samples\n\n- model: `data/chat_model/model.safetensors` (sha256 "
                           f"`{file_sha256(files[0])[:16]}`)\n- tokenizer: `data/tokenizer.json` (sha256 "
                           f"`{file_sha256(files[1])[:16]}`)\n")
    assert (f"temperature {settings['temperature']:g}, top-k {settings['top_k']}, top-p {settings['top_p']:g}, "
            f"seed {settings['seed']} for every request, up to 25 new tokens "
            "(ends early at `<|endoftext|>` or `User:`)") in text
    assert str(tmp_path) not in text and text.count("\nReply:\n") == len(settings["prompts"])

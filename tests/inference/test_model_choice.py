"""Which model `librarian generate`, `chat` and `export` use: the chat fine-tuned model once the
finetune stage has made it, else the base model; `--model` chooses explicitly. Each says which."""

import io
import shutil
import sys

import pytest

from librarian.cli.main import BASE_MODEL, CHAT_MODEL, main
from librarian.data.tokenizer import file_sha256
from tests.helpers import tiny_model, tiny_tokenizer

BASE_LINE = f"model: {BASE_MODEL} (base model; `dvc repro finetune` makes the chat model, {CHAT_MODEL})\n"
CHAT_LINE = f"model: {CHAT_MODEL} (chat fine-tuned; --model {BASE_MODEL} for the base model)\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tokenizer and two tiny models of other weights (seeds 0 and 1): the base and the chat one."""
    folder = tmp_path_factory.mktemp("models")
    vocab = tiny_tokenizer(folder / "tokenizer.json").get_vocab_size()
    sha = file_sha256(folder / "tokenizer.json")
    base = tiny_model(folder / "base.safetensors", vocab, seed=0, tokenizer_sha256=sha)
    chat = tiny_model(folder / "chat.safetensors", vocab, seed=1, tokenizer_sha256=sha)
    return folder / "tokenizer.json", base, chat


def project(root, models, chat: bool = True, base: bool = True):
    """A project folder after `dvc repro` as the CLI sees it: the markers, the tokenizer and the models."""
    tokenizer, base_model, chat_model = models
    root.mkdir(exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text("seed: 0\n")
    (root / "data").mkdir()
    shutil.copy(tokenizer, root / "data" / "tokenizer.json")
    for wanted, source, target in ((base, base_model, BASE_MODEL), (chat, chat_model, CHAT_MODEL)):
        if wanted:
            (root / target).parent.mkdir(parents=True)
            shutil.copy(source, root / target)
    return root


GREEDY = ["--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "30"]


def generate(capsys, *argv) -> tuple[str, str]:
    main(["generate", *GREEDY, *argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_generate_uses_the_chat_model_when_there_is_one_and_says_so_on_stderr(tmp_path, models, capsys, monkeypatch):
    monkeypatch.chdir(project(tmp_path, models))
    out, err = generate(capsys)
    assert err == CHAT_LINE
    assert out.startswith("Once upon a time") and "model:" not in out  # stdout: the text only
    # The same text as the chat model named explicitly, and not the base model's.
    assert generate(capsys, "--model", str(CHAT_MODEL))[0] == out
    base_out, base_err = generate(capsys, "--model", str(BASE_MODEL))
    assert base_out != out, "the two test models write the same greedy text: pick other seeds"
    assert base_err == f"model: {BASE_MODEL} (base model)\n"  # the chat model exists: no hint to make it


def test_generate_falls_back_to_the_base_model(tmp_path, models, capsys, monkeypatch):
    monkeypatch.chdir(project(tmp_path, models, chat=False))
    out, err = generate(capsys)
    assert err == BASE_LINE
    assert generate(capsys, "--model", str(BASE_MODEL))[0] == out
    # Any other file: named as the one --model gave.
    other = tmp_path / "elsewhere.safetensors"
    shutil.copy(models[2], other)
    other_out, other_err = generate(capsys, "--model", str(other))
    assert other_err == f"model: {other} (given by --model)\n" and other_out != out


def chat(capsys, monkeypatch, *argv) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/quit\n"))
    main(["chat", "--temperature", "0", "--max-new-tokens", "20", *argv])
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def test_chat_says_which_model_before_its_banner(tmp_path, models, capsys, monkeypatch):
    monkeypatch.chdir(project(tmp_path, models))
    default = chat(capsys, monkeypatch)
    assert default.startswith(CHAT_LINE + "Librarian chat: ")
    assert chat(capsys, monkeypatch, "--model", str(CHAT_MODEL)) == default
    base = chat(capsys, monkeypatch, "--model", str(BASE_MODEL))
    assert base.startswith(f"model: {BASE_MODEL} (base model)\nLibrarian chat: ")
    reply = default.split("User: Hello\nAssistant: ")[1]
    assert base.split("User: Hello\nAssistant: ")[1] != reply, "the two test models reply alike: pick other seeds"


def test_chat_without_a_chat_model_uses_the_base_one(tmp_path, models, capsys, monkeypatch):
    monkeypatch.chdir(project(tmp_path, models, chat=False))
    assert chat(capsys, monkeypatch).startswith(BASE_LINE + "Librarian chat: ")


def test_export_exports_the_chat_model_by_default(tmp_path, models, capsys, monkeypatch):
    import librarian.inference.export as export

    calls = []
    monkeypatch.setattr(export, "export_hf", lambda model, tokenizer, out, force: calls.append(model) or out)
    monkeypatch.chdir(project(tmp_path / "project", models))
    main(["export", str(tmp_path / "hf")])
    assert calls == [CHAT_MODEL] and capsys.readouterr().out.startswith(CHAT_LINE)
    main(["export", str(tmp_path / "hf"), "--model", str(BASE_MODEL)])
    assert calls[-1] == BASE_MODEL and capsys.readouterr().out.startswith(f"model: {BASE_MODEL} (base model)\n")


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_with_no_model_at_all_the_loader_says_to_train_one(tmp_path, models, capsys, monkeypatch):
    monkeypatch.chdir(project(tmp_path, models, chat=False, base=False))
    err = fails(capsys, "generate", "--prompt", "Hi")
    assert err == f"error: model file {BASE_MODEL} not found; train a model first (`dvc repro train`)\n"
    assert "model:" not in err  # nothing said about a model before the error: one line only


def test_outside_a_project_the_chat_model_default_still_says_where_to_run(tmp_path, models, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # beside a project with both models, not in it
    err = fails(capsys, "chat", "--tokenizer", str(models[0]))
    assert err.startswith(f"error: no Librarian project here ({tmp_path}") and err.endswith("or pass --model\n")
    # a chat model path given explicitly from elsewhere is a default path too: same advice
    err = fails(capsys, "chat", "--tokenizer", str(models[0]), "--model", str(CHAT_MODEL))
    assert err.endswith("or pass --model\n")

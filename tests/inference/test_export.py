import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from librarian.model.checkpoint import save_weights  # noqa: E402
from librarian.cli.main import main  # noqa: E402
from librarian.core.errors import LibrarianError  # noqa: E402
from librarian.inference.export import INSTALL_HINT, MARKER, export_hf  # noqa: E402
from librarian.model.gpt import GPT  # noqa: E402
from librarian.data.tokenizer import file_sha256, save_tokenizer, train_tokenizer  # noqa: E402
from tests.helpers import ROOT, gpt_config  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it too; exporting must never need the hub

STORIES = [
    "Once upon a time there was a little cat named Tom.",
    "Tom liked to play in the garden with his red ball.",
    "One day Lily saw a big dog. She was scared, but the dog was kind.",
    "They ate cake and drank milk. \"Thank you!\" said Lily.",
] * 4
TEXTS = [
    "Once upon a time, Tom saw a dog.",
    "<|user|> Tell me a story.<|assistant|> Once upon a time<|endoftext|><pad>",
    "Zoë ate crème brûlée in Kyōto: 猫 and 🐈!",
    "  two spaces,\ttab\nnew line ,  . end ",
]


def small_gpt(vocab_size: int, **options) -> GPT:
    torch.manual_seed(0)
    model = GPT(gpt_config(vocab_size=vocab_size, context_length=32, n_layer=2, n_head=4, d_model=32, d_ff=64,
                          dropout=0.1, **options))
    # The init sets LayerNorm to (1, 0) and biases to 0, which would hide a mix-up of those tensors.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    return model


@pytest.fixture
def tokenizer(make_params):
    params = make_params().tokenizer.model_copy(update={"vocab_size": 300})
    return train_tokenizer(STORIES, params)


@pytest.fixture
def exported(tmp_path, tokenizer):
    # Tiny text trains fewer than 300 tokens; the model's vocab follows the tokenizer's, as in the pipeline.
    model = small_gpt(tokenizer.get_vocab_size())
    save_weights(model, tmp_path / "model.safetensors")
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    out = export_hf(tmp_path / "model.safetensors", tmp_path / "tokenizer.json", tmp_path / "hf")
    return model.eval(), out


def test_logits_match_ours(exported):
    model, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for length in (1, 5, 17, 32):
        idx = torch.randint(0, model.config.vocab_size, (3, length), generator=gen)
        with torch.no_grad():
            ours, _ = model(idx)
            theirs = hf_model(idx).logits
        assert theirs.shape == ours.shape
        worst = max(worst, (theirs - ours).abs().max().item())
    assert worst < 1e-4, worst


def test_weights_are_tied_and_stored_as_safetensors(exported):
    _, out = exported
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    from safetensors.torch import load_file

    assert "transformer.wte.weight" in load_file(out / "model.safetensors")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    head, wte = hf_model.lm_head.weight, hf_model.transformer.wte.weight
    assert head is wte or head.data_ptr() == wte.data_ptr()


def test_config_uses_exact_gelu_and_our_token_ids(exported, tokenizer):
    model, out = exported
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.activation_function == "gelu"
    assert (config.n_embd, config.n_layer, config.n_head, config.n_inner, config.n_positions, config.vocab_size) == (
        32, 2, 4, 64, 32, model.config.vocab_size)
    assert config.layer_norm_epsilon == 1e-5 and config.tie_word_embeddings
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    assert config.bos_token_id == config.eos_token_id == tokenizer.token_to_id("<|endoftext|>") == 0
    assert config.pad_token_id == tokenizer.token_to_id("<pad>") == 1
    # "gelu" must be the erf GELU, not a tanh approximation such as GPT-2's default "gelu_new".
    x = torch.linspace(-6, 6, 1001)
    assert torch.equal(transformers.activations.ACT2FN[config.activation_function](x), F.gelu(x, approximate="none"))


def test_tokenizer_matches_ours(exported, tokenizer):
    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast) and hf_tok.is_fast
    assert (hf_tok.eos_token, hf_tok.bos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<pad>")
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1)
    assert {"<|user|>", "<|assistant|>"} <= set(hf_tok.all_special_tokens)
    for text in TEXTS:
        ours = tokenizer.encode(text).ids
        # No BOS/EOS is added: the ids are exactly the ones our model was trained on.
        assert hf_tok.encode(text) == ours, text
        assert hf_tok(text)["input_ids"] == ours, text
        assert hf_tok.decode(ours) == tokenizer.decode(ours, skip_special_tokens=False) == text


def test_generate_runs_from_the_folder(exported):
    _, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_tok("Once upon a time", return_tensors="pt")
    new = hf_model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert new.shape == (1, ids["input_ids"].shape[1] + 5)


@pytest.mark.parametrize("option", [{"position": "rope"}, {"norm": "rmsnorm"}, {"mlp": "swiglu"}])
def test_refuses_what_gpt2_cannot_express(tmp_path, tokenizer, option):
    save_weights(small_gpt(tokenizer.get_vocab_size(), **option), tmp_path / "model.safetensors")
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    [(field, value)] = option.items()
    with pytest.raises(LibrarianError, match=f"{field}={value}.*only the default") as err:
        export_hf(tmp_path / "model.safetensors", tmp_path / "tokenizer.json", tmp_path / "hf")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "tokenizer.json"]


def test_sdpa_attention_exports(tmp_path, tokenizer):
    model = small_gpt(tokenizer.get_vocab_size(), attention="sdpa").eval()
    save_weights(model, tmp_path / "model.safetensors")
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    out = export_hf(tmp_path / "model.safetensors", tmp_path / "tokenizer.json", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf_model(idx).logits - model(idx)[0]).abs().max().item() < 1e-4


def test_failed_write_leaves_no_folder(tmp_path, tokenizer, monkeypatch):
    save_weights(small_gpt(tokenizer.get_vocab_size()), tmp_path / "model.safetensors")
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")

    def fail(self, *args, **kwargs):
        raise OSError("disk trouble")

    # The model is written first, so this fails with the folder half done.
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk trouble"):
        export_hf(tmp_path / "model.safetensors", tmp_path / "tokenizer.json", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "tokenizer.json"]


def test_missing_transformers_names_the_extra_as_the_docs_do(tmp_path, tokenizer, monkeypatch):
    save_weights(small_gpt(tokenizer.get_vocab_size()), tmp_path / "model.safetensors")
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    # The command that works from a clone (there is no `librarian` package on PyPI to take the extra from).
    with pytest.raises(LibrarianError, match=r"install it with `pip install -e '\.\[export\]'`"):
        export_hf(tmp_path / "model.safetensors", tmp_path / "tokenizer.json", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert f"With the `export` extra (`{INSTALL_HINT}`)" in (ROOT / "docs" / "export.md").read_text()


# --- where the export may write -------------------------------------------------------------------


def write_inputs(folder: Path, tokenizer, vocab_size: int | None = None, seed: int = 0) -> list[str]:
    """A model (recording its tokenizer's hash, as the pipeline's do) and its tokenizer: --model/--tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    model = small_gpt(vocab_size or tokenizer.get_vocab_size())
    with torch.no_grad():
        model.tok_emb.weight.add_(seed)  # another seed, other weights: tells two exports apart
    save_weights(model, folder / "model.safetensors", tokenizer_sha256=file_sha256(folder / "tokenizer.json"))
    return ["--model", str(folder / "model.safetensors"), "--tokenizer", str(folder / "tokenizer.json")]


def export_fails(capsys, *argv) -> str:
    """`librarian export ...` in-process must fail: exit code 1, one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *map(str, argv)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def export_ok(capsys, *argv) -> None:
    main(["export", *map(str, argv)])
    assert "model written to" in capsys.readouterr().out


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry below folder: a file's bytes, None for a folder."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def users_folder(path: Path) -> Path:
    (path / "drafts").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "drafts" / "story.md").write_text("Once upon a time")
    return path


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "--force"])
def test_a_folder_with_other_files_is_refused_and_its_files_survive(tmp_path, tokenizer, capsys, force):
    inputs = write_inputs(tmp_path / "in", tokenizer)
    mine = users_folder(tmp_path / "mine")
    before = snapshot(mine)
    line = export_fails(capsys, *force, *inputs, mine)
    assert f"error: {mine} is not empty and is not a Librarian export" in line and "notes.txt" in line, line
    assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "mine"]  # no temporary sibling either


def test_force_replaces_an_earlier_export_and_nothing_else(tmp_path, tokenizer, capsys):
    out = tmp_path / "hf"
    export_ok(capsys, *write_inputs(tmp_path / "a", tokenizer, seed=0), out)
    first = snapshot(out)
    assert json.loads((out / MARKER).read_text())["files"] == sorted(set(first) - {MARKER})
    newer = write_inputs(tmp_path / "b", tokenizer, seed=1)
    # Without --force an earlier export is kept too: the user may not know the folder is taken.
    line = export_fails(capsys, *newer, out)
    assert line == f"error: {out} holds an earlier Librarian export; add --force to replace it, or choose another folder"
    assert snapshot(out) == first
    export_ok(capsys, "--force", *newer, out)
    assert snapshot(out)["model.safetensors"] != first["model.safetensors"]
    assert json.loads((out / MARKER).read_text())["model_sha256"] == file_sha256(tmp_path / "b" / "model.safetensors")
    # A file the export did not write makes the folder a user's again: --force keeps it whole.
    (out / "README.md").write_text("my model card")
    before = snapshot(out)
    assert "not a Librarian export (it holds README.md)" in export_fails(capsys, "--force", *newer, out)
    assert snapshot(out) == before


def test_an_empty_existing_folder_is_exported_into(tmp_path, tokenizer, capsys):
    (tmp_path / "hf").mkdir()
    export_ok(capsys, *write_inputs(tmp_path / "in", tokenizer), tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / MARKER).is_file()


@pytest.mark.parametrize("empty", [True, False], ids=["empty cwd", "cwd with files"])
def test_the_current_folder_is_refused_in_one_line(tmp_path, tokenizer, capsys, monkeypatch, empty):
    inputs = write_inputs(tmp_path / "in", tokenizer)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if not empty:
        (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    for out in (".", "..", str(cwd)):
        line = export_fails(capsys, *inputs, out)
        assert line.startswith(f"error: export folder {out} is the current folder or contains it"), line
    assert cwd.is_dir() and len(list(cwd.iterdir())) == (0 if empty else 1)


def a_project(root: Path, tokenizer) -> Path:
    """A DVC project after `dvc repro`, as far as the export can tell: dvc.yaml and the trained model."""
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    write_inputs(root / "data", tokenizer)
    (root / "data" / "model").mkdir()
    (root / "data" / "model.safetensors").rename(root / "data" / "model" / "model.safetensors")
    return root


@pytest.mark.parametrize("out", ["data/model", "data/tokens", "data/model/hf", "data", "metrics/hf",
                                 "metrics/samples.md", "."])
def test_the_pipelines_outputs_are_refused_and_the_model_survives(tmp_path, tokenizer, capsys, monkeypatch, out):
    project = a_project(tmp_path / "project", tokenizer)
    before = snapshot(project)
    monkeypatch.chdir(project)
    for force in ([], ["--force"]):
        line = export_fails(capsys, *force, "--format", "hf", out)  # the default model and tokenizer: the pipeline's
        assert f"error: export folder {out} " in line, line
    assert snapshot(project) == before


def test_the_chat_model_is_exported_by_default_and_model_picks_the_base_one(tmp_path, tokenizer, capsys,
                                                                            monkeypatch):
    project = a_project(tmp_path / "project", tokenizer)
    write_inputs(project / "data" / "chat_model", tokenizer, seed=1)  # the finetune stage's model: other weights
    chat, base = (project / "data" / folder / "model.safetensors" for folder in ("chat_model", "model"))
    monkeypatch.chdir(project)
    out = tmp_path / "hf"
    main(["export", str(out)])
    said = capsys.readouterr().out
    assert said.startswith("model: data/chat_model/model.safetensors (chat fine-tuned; --model "
                           "data/model/model.safetensors for the base model)\n") and "model written to" in said
    assert json.loads((out / MARKER).read_text())["model_sha256"] == file_sha256(chat)
    main(["export", "--force", "--model", "data/model/model.safetensors", str(out)])
    assert capsys.readouterr().out.startswith("model: data/model/model.safetensors (base model)\n")
    assert json.loads((out / MARKER).read_text())["model_sha256"] == file_sha256(base) != file_sha256(chat)


def test_a_dvc_output_outside_data_is_refused(tmp_path, tokenizer, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "dvc.yaml").write_text("stages:\n  train:\n    cmd: train\n    outs:\n      - models/best:\n"
                                      "          cache: false\n    plots:\n      - curves/loss.csv\n")
    inputs = write_inputs(tmp_path / "in", tokenizer)
    refusals = {"models/best": "models/best", "models/best/hf": "models/best", "curves": "curves/loss.csv"}
    for out, declared in refusals.items():
        line = export_fails(capsys, *inputs, project / out)
        assert f"is in (or holds) {declared}, which the DVC pipeline of {project} writes" in line, line
    assert sorted(p.name for p in project.iterdir()) == ["dvc.yaml"]
    export_ok(capsys, *inputs, project / "exports" / "hf")  # elsewhere in the project is fine


def test_a_folder_holding_the_inputs_or_a_symlink_is_refused(tmp_path, tokenizer, capsys):
    inputs = write_inputs(tmp_path / "in", tokenizer)
    assert "holds the input model" in export_fails(capsys, *inputs, tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert "is a symlink" in export_fails(capsys, *inputs, tmp_path / "link")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "link"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], ids=oct)
def test_the_folder_gets_mkdirs_permissions(tmp_path, tokenizer, capsys, umask):
    inputs = write_inputs(tmp_path / "in", tokenizer)
    old = os.umask(umask)
    try:
        export_ok(capsys, *inputs, tmp_path / "hf")
        (tmp_path / "hf2").mkdir()  # what the user would get from mkdir
    finally:
        os.umask(old)
    mode = (tmp_path / "hf").stat().st_mode & 0o777
    assert mode == 0o777 & ~umask == (tmp_path / "hf2").stat().st_mode & 0o777, oct(mode)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()} == {
        p.name: 0o666 & ~umask for p in (tmp_path / "hf").iterdir()}


# --- the model and tokenizer must belong together ---------------------------------------------------


def test_a_tokenizer_of_another_hash_is_refused(tmp_path, tokenizer, capsys):
    inputs = write_inputs(tmp_path / "in", tokenizer)
    # The same tokenizer saved with other whitespace: it loads fine, but is not the model's file.
    other = tmp_path / "other.json"
    other.write_text(json.dumps(json.loads((tmp_path / "in" / "tokenizer.json").read_text()), indent=1))
    line = export_fails(capsys, *inputs[:2], "--tokenizer", other, tmp_path / "hf")
    assert "comes from another tokenizer" in line and "use the matching files" in line, line
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("extra", [8, -8], ids=["model larger", "tokenizer larger"])
def test_a_vocabulary_size_mismatch_is_refused(tmp_path, tokenizer, capsys, extra):
    vocab = tokenizer.get_vocab_size() + extra
    line = export_fails(capsys, *write_inputs(tmp_path / "in", tokenizer, vocab_size=vocab), tmp_path / "hf")
    assert f"has {tokenizer.get_vocab_size()} tokens but model" in line and f"expects {vocab}" in line, line
    assert not (tmp_path / "hf").exists()


# --- generation in transformers stays within the context ------------------------------------------


def test_generation_config_caps_generation_at_the_context(exported, tokenizer):
    model, out = exported
    saved = json.loads((out / "generation_config.json").read_text())
    assert (saved["max_length"], saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (
        model.config.context_length, 0, 0, 1)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = transformers.AutoTokenizer.from_pretrained(out)("Once upon a time", return_tensors="pt")
    # <|endoftext|> suppressed, so only the cap can stop it; without the cap it would stop at 20 new tokens
    # or, with a longer default, index past the position table (IndexError).
    for sample in (False, True):
        new = hf_model.generate(**prompt, do_sample=sample, suppress_tokens=[0])
        assert new.shape[1] == model.config.context_length == hf_model.config.n_positions


def test_asking_for_more_than_the_context_fails_in_transformers_as_documented(exported):
    """An explicit max_new_tokens overrides any file's cap: transformers then indexes past the positions.

    No file in the folder can prevent it, so the README says to keep prompt + max_new_tokens within the
    context. Should transformers start stopping at n_positions, this test fails: update the README.
    """
    _, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = transformers.AutoTokenizer.from_pretrained(out)("Once upon a time", return_tensors="pt")
    fits = hf_model.config.n_positions - prompt["input_ids"].shape[1]
    full = hf_model.generate(**prompt, max_new_tokens=fits, suppress_tokens=[0])
    assert full.shape[1] == hf_model.config.n_positions
    with pytest.raises(IndexError):
        hf_model.generate(**prompt, max_new_tokens=200, suppress_tokens=[0])

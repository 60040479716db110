import os
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from librarian.checkpoint import save_weights  # noqa: E402
from librarian.errors import LibrarianError  # noqa: E402
from librarian.export import export_hf  # noqa: E402
from librarian.model import GPT, GPTConfig  # noqa: E402
from librarian.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402

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
    model = GPT(GPTConfig(vocab_size=vocab_size, context_length=32, n_layer=2, n_head=4, d_model=32, d_ff=64,
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


def test_missing_transformers_names_the_extra(tmp_path, tokenizer, monkeypatch):
    save_weights(small_gpt(tokenizer.get_vocab_size()), tmp_path / "model.safetensors")
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(LibrarianError, match=r"pip install 'librarian\[export\]'"):
        export_hf(tmp_path / "model.safetensors", tmp_path / "tokenizer.json", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

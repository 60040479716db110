"""Export a trained model and its tokenizer as a Hugging Face `transformers` folder.

Librarian's default GPT is GPT-2's architecture exactly (pre-LayerNorm blocks, exact GELU, learned
positions, a head tied to the token embedding), so the export is a GPT2LMHeadModel with the same
weights: `AutoModelForCausalLM.from_pretrained(folder)` then gives the same logits as Librarian.
The options GPT-2 has no switch for (RoPE, RMSNorm, SwiGLU) are refused rather than approximated.

transformers is an optional dependency (`pip install 'librarian[export]'`), imported only here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from librarian.checkpoint import load_weights, read_config
from librarian.config import REQUIRED_SPECIAL_TOKENS
from librarian.errors import LibrarianError
from librarian.io import atomic_dir
from librarian.model import GPT, GPTConfig
from librarian.tokenizer import load_tokenizer

EOT, PAD = REQUIRED_SPECIAL_TOKENS
# The only value of each option that GPT-2 can express.
EXPORTABLE = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}
# Our names for a block's Linear layers and GPT-2's for the same maths; GPT-2 keeps them as Conv1D.
LINEAR_NAMES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def export_hf(model_path: str | Path, tokenizer_path: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers folder (GPT-2 weights in safetensors, config, tokenizer) to `out_dir`."""
    out_dir = Path(out_dir)
    # Refuse cheaply, before loading anything, and before touching out_dir.
    config = read_config(model_path)
    check_exportable(config)
    transformers = import_transformers()
    if out_dir.exists() and not out_dir.is_dir():
        raise LibrarianError(f"{out_dir} is a file, not a folder; choose another output path for the export")
    model = load_weights(model_path).eval()
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise LibrarianError(
            f"tokenizer {tokenizer_path} has {tokenizer.get_vocab_size()} tokens but the model only "
            f"{config.vocab_size}; export the tokenizer the model was trained with"
        )
    hf_model = to_gpt2(model, tokenizer, transformers)
    hf_tokenizer = to_fast_tokenizer(tokenizer, config, transformers)
    # Both writers create files one by one; atomic_dir makes the folder appear whole or not at all.
    with atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp)
        hf_tokenizer.save_pretrained(tmp)
    return out_dir


def check_exportable(config: GPTConfig) -> None:
    options = config.to_dict()
    unsupported = [f"{field}={options[field]}" for field, ok in EXPORTABLE.items() if options[field] != ok]
    if unsupported:
        raise LibrarianError(
            f"cannot export a model with {', '.join(unsupported)}: GPT-2 cannot express it; only the default "
            "position=learned, norm=layernorm, mlp=gelu models can be exported"
        )


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise LibrarianError(
            "exporting needs transformers, which is not installed; install it with `pip install 'librarian[export]'`"
        ) from None
    return transformers


def gpt2_config(config: GPTConfig, tokenizer, transformers):
    return transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.d_model,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.d_ff,
        # "gelu" is the exact erf GELU, as in our MLP; GPT-2's own default "gelu_new" is the tanh approximation.
        activation_function="gelu",
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default, which our blocks use
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        tie_word_embeddings=True,
        # Every story starts after and ends with <|endoftext|>, so it is both GPT-2-style bos and eos.
        bos_token_id=tokenizer.token_to_id(EOT),
        eos_token_id=tokenizer.token_to_id(EOT),
        pad_token_id=tokenizer.token_to_id(PAD),
    )


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names. lm_head is left out: it is tied to wte, as in our model."""
    ours = model.state_dict()
    state = {
        "transformer.wte.weight": ours["tok_emb.weight"],
        "transformer.wpe.weight": ours["pos_emb.weight"],
        "transformer.ln_f.weight": ours["ln_f.weight"],
        "transformer.ln_f.bias": ours["ln_f.bias"],
    }
    for i in range(model.config.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            state[f"{dst}{ln}.weight"] = ours[f"{src}{ln}.weight"]
            state[f"{dst}{ln}.bias"] = ours[f"{src}{ln}.bias"]
        for name, hf_name in LINEAR_NAMES.items():
            # Conv1D computes x @ W + b with W of shape (in, out): the transpose of nn.Linear's (out, in).
            state[f"{dst}{hf_name}.weight"] = ours[f"{src}{name}.weight"].t().contiguous()
            state[f"{dst}{hf_name}.bias"] = ours[f"{src}{name}.bias"]
    return state


def to_gpt2(model: GPT, tokenizer, transformers):
    hf_model = transformers.GPT2LMHeadModel(gpt2_config(model.config, tokenizer, transformers)).float()
    missing, unexpected = hf_model.load_state_dict(gpt2_state_dict(model), strict=False)
    # Anything but the tied head left unset would be transformers' random init: a silent wrong export.
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise LibrarianError(
            f"this transformers version lays GPT-2 out differently (missing {missing}, unexpected {unexpected}); "
            "install the pinned one with `pip install 'librarian[export]'`"
        )
    hf_model.tie_weights()
    return hf_model.eval()


def to_fast_tokenizer(tokenizer, config: GPTConfig, transformers):
    specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=PAD,
        # Byte-level BPE encodes any text, so there is no unknown token.
        extra_special_tokens=[t for t in specials if t not in REQUIRED_SPECIAL_TOKENS],
        model_max_length=config.context_length,
        # Clean-up would rewrite " ." as "." and break decode(encode(text)) == text (5.x skips it for BPE, and warns).
        clean_up_tokenization_spaces=False,
    )

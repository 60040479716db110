"""Export a trained model and its tokenizer as a Hugging Face `transformers` folder.

Librarian's default GPT is GPT-2's architecture exactly (pre-LayerNorm blocks, exact GELU, learned
positions, a head tied to the token embedding), so the export is a GPT2LMHeadModel with the same
weights: `AutoModelForCausalLM.from_pretrained(folder)` then gives the same logits as Librarian.
The options GPT-2 has no switch for (RoPE, RMSNorm, SwiGLU) are refused rather than approximated.

The output folder is replaced whole, so it must be one the export may replace: new, empty, or an
earlier export (recognised by the marker file it writes, and then only with `force`); never a
user's folder, the current folder, the pipeline's data/ or metrics/, or a DVC output.

transformers is an optional dependency (`pip install -e '.[export]'`), imported only here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from librarian import __version__
from librarian.core import paths
from librarian.core.config import REQUIRED_SPECIAL_TOKENS
from librarian.core.errors import LibrarianError
from librarian.core.io import atomic_dir, ordinary_mode, write_json
from librarian.core.paths import WRITABLE
from librarian.data.tokenizer import EOT, PAD, file_sha256
from librarian.inference.generate import Generator
from librarian.model.checkpoint import read_config
from librarian.model.gpt import GPT, GPTConfig

INSTALL_HINT = "pip install -e '.[export]'"  # from the project's clone, as docs/export.md says
# Written into every export, last: a folder holding it (and only the files it lists) is one we may replace.
MARKER = "librarian_export.json"
# The only value of each option that GPT-2 can express.
EXPORTABLE = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}
# Our names for a block's Linear layers and GPT-2's for the same maths; GPT-2 keeps them as Conv1D.
LINEAR_NAMES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def export_hf(model_path: str | Path, tokenizer_path: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """Write a transformers folder (GPT-2 weights in safetensors, config, tokenizer) to `out_dir`.

    `force` replaces an earlier export at `out_dir`; nothing else is ever replaced.
    """
    out_dir = Path(out_dir)
    # Refuse cheaply, before loading anything, and before touching out_dir.
    check_out_dir(out_dir, {"model": Path(model_path), "tokenizer": Path(tokenizer_path)}, force)
    config = read_config(model_path)
    check_exportable(config)
    transformers = import_transformers()
    # The checks generate and chat make: the tokenizer the model was trained with (by hash), and its vocab size.
    generator = Generator.load(model_path, tokenizer_path)
    model, tokenizer = generator.model, generator.tokenizer
    hf_model = to_gpt2(model, tokenizer, transformers)
    hf_tokenizer = to_fast_tokenizer(tokenizer, config, transformers)
    # The writers create files one by one; atomic_dir makes the folder appear whole or not at all.
    with atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp)
        hf_tokenizer.save_pretrained(tmp)
        write_marker(tmp, model_path, tokenizer_path)
        for file in tmp.iterdir():  # safetensors writes 0600: a folder made to be shared should be readable
            os.chmod(file, ordinary_mode())
    return out_dir


def check_out_dir(out_dir: Path, inputs: dict[str, Path], force: bool) -> None:
    """Refuse an export folder whose replacement would destroy anything the export did not write."""
    target = Path(os.path.realpath(out_dir))  # `.`, `..` and symlinked parents folded as the OS sees them
    if Path.cwd().resolve().is_relative_to(target):
        raise LibrarianError(f"export folder {out_dir} is the current folder or contains it; "
                             "give a new folder's path, e.g. out/librarian-base")
    if out_dir.is_symlink():
        raise LibrarianError(f"export folder {out_dir} is a symlink; give a real folder's path")
    check_outside_pipeline(out_dir, target)
    for what, path in inputs.items():
        if Path(os.path.realpath(path)).is_relative_to(target):
            raise LibrarianError(f"export folder {out_dir} holds the input {what} {path}; export to another folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise LibrarianError(f"{out_dir} is a file, not a folder; choose another output path for the export")
    check_replaceable(out_dir, force)


def check_outside_pipeline(out_dir: Path, target: Path) -> None:
    """Refuse a folder in (or holding) the data/ and metrics/ of the DVC project around it, or any DVC output."""
    root = next((p for p in (target, *target.parents) if (p / "dvc.yaml").is_file()), None)
    if root is None:
        return
    for path in pipeline_paths(root):
        if target.is_relative_to(path) or path.is_relative_to(target):
            raise LibrarianError(
                f"export folder {out_dir} is in (or holds) {path.relative_to(root)}, which the DVC pipeline of {root} "
                "writes; export outside its data/ and metrics/, e.g. to out/librarian-base"
            )


def pipeline_paths(root: Path) -> list[Path]:
    """data/, metrics/ and every outs, metrics and plots path dvc.yaml declares, as absolute paths."""
    declared = []
    try:
        pipeline = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
        sections = [pipeline] + list((pipeline.get("stages") or {}).values())
        for section in sections:
            for key in ("outs", "metrics", "plots"):
                # An entry is a path, or {path: options}.
                declared += [e if isinstance(e, str) else next(iter(e)) for e in section.get(key) or []]
    except (OSError, yaml.YAMLError, AttributeError, TypeError, StopIteration):
        pass  # a dvc.yaml DVC itself cannot read: data/ and metrics/ are still protected
    narrowest_first = [*(p for p in declared if isinstance(p, str)), *WRITABLE]  # for the message
    return [Path(os.path.normpath(root / p)) for p in narrowest_first]


def check_replaceable(out_dir: Path, force: bool) -> None:
    """An existing folder may be filled when empty, or replaced with `force` when it is an earlier export."""
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
        paths.check_replaceable(
            out_dir, foreign_entries(out_dir, entries),
            "{out} is not empty and is not a Librarian export (it holds {held}); choose a new or empty folder "
            "(--force replaces only an earlier export)",
            force, "{out} holds an earlier Librarian export; add --force to replace it, or choose another folder")


def foreign_entries(out_dir: Path, entries: list[str]) -> list[str]:
    """The entries of out_dir an export did not write: all of them unless its marker lists the rest."""
    try:
        listed = set(json.loads((out_dir / MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return entries
    written = listed | {MARKER}
    # Only regular files: a folder or a symlink under a listed name is not what the export wrote.
    return [name for name in entries
            if name not in written or (out_dir / name).is_symlink() or not (out_dir / name).is_file()]


def write_marker(folder: Path, model_path: str | Path, tokenizer_path: str | Path) -> None:
    """Say what the folder is and which files the export wrote: only those may ever be replaced."""
    write_json(folder / MARKER, {
        "format": "hf",
        "librarian_version": __version__,
        "model": str(model_path),
        "model_sha256": file_sha256(model_path),
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "files": sorted(p.name for p in folder.iterdir()),
    })


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
            f"exporting needs transformers, which is not installed; install it with `{INSTALL_HINT}`"
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
            f"install the pinned one with `{INSTALL_HINT}`"
        )
    hf_model.tie_weights()
    hf_model.generation_config = generation_config(hf_model.config, transformers)
    return hf_model.eval()


def generation_config(config, transformers):
    """generate()'s defaults: stop at the context (positions past it do not exist) and at <|endoftext|>."""
    return transformers.GenerationConfig(
        max_length=config.n_positions,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


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

"""Model and training-state files: safetensors for weights, never plain pickle.

A model file is a safetensors file whose metadata carries the GPTConfig as JSON, so it loads on
its own. The training state (optimizer, schedule, RNG, data position) is a torch file of tensors
and plain values only, loaded with `weights_only=True`, which cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from librarian.errors import LibrarianError
from librarian.io import atomic_path
from librarian.model import GPT, GPTConfig

CONFIG_KEY = "librarian.gpt_config"
# The output head shares the token embedding's matrix, so it is stored once, under tok_emb.weight.
TIED = "lm_head.weight"


def save_weights(model: GPT, path: str | Path) -> None:
    """Weights and config in one safetensors file, byte-identical for identical weights.

    Not safetensors' save_model: it records the tied names in a metadata map whose key order varies
    from process to process, so equal models would give different bytes.
    """
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name != TIED}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(model.config.to_dict(), sort_keys=True)})


def read_config(path: str | Path) -> GPTConfig:
    path = Path(path)
    if not path.exists():
        raise LibrarianError(f"model file {path} not found; train a model first (`dvc repro train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return GPTConfig(**json.loads(metadata[CONFIG_KEY]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise LibrarianError(
            f"{path} is not a Librarian model file ({type(exc).__name__}); it may be truncated or from another tool"
        ) from None


def load_weights(path: str | Path, device: str | torch.device = "cpu", **overrides) -> GPT:
    """A GPT built from the file's own config (fields in `overrides` replaced) with its weights."""
    config = read_config(path)
    if overrides:
        config = GPTConfig(**{**config.to_dict(), **overrides})
    model = GPT(config)
    try:
        tensors = load_file(str(path))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise LibrarianError(f"{path} does not match its model config ({str(exc).splitlines()[0][:160]})") from None
    if set(missing) != {TIED} or unexpected:
        raise LibrarianError(f"{path} does not match its model config (missing {missing}, unexpected {unexpected})")
    return model.to(device)


def save_state(state: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise LibrarianError(
            f"training state {path} is unreadable or unsafe ({type(exc).__name__}); delete it to start training afresh"
        ) from None

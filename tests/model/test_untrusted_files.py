"""Files from elsewhere never run code: a pickle with a code-running payload, saved as a training
state or under a model file's name, is refused with a one-line LibrarianError and the payload never
runs; truncated model files and model files of another architecture are refused the same way."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from librarian.model.checkpoint import (
    LEGACY_CONFIG_KEY,
    META_KEY,
    load_state,
    load_weights,
    model_metadata,
    read_config,
    read_tokenizer_sha256,
    save_state,
    save_weights,
)
from librarian.core.errors import LibrarianError
from librarian.model.gpt import GPT, GPTConfig
from tests.helpers import tiny_config as shared_tiny_config


# --- malicious and broken data files ---------------------------------------------------------


class Payload:
    """Unpickling this calls `action(*args)`: any code at all, in a real attack."""

    def __init__(self, action, *args):
        self.action, self.args = action, args

    def __reduce__(self):
        return self.action, self.args


def payloads(marker: Path) -> list[Payload]:
    """Two ways a pickle can act on the world: open a file for writing, or run a shell command."""
    return [Payload(open, str(marker), "w"), Payload(os.system, f"touch '{marker}'")]


def assert_one_line(exc: pytest.ExceptionInfo, *words: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400, message
    for word in words:
        assert word in message, message
    return message


def tiny_config(**changes) -> GPTConfig:
    return shared_tiny_config(**{"vocab_size": 40, "context_length": 16, **changes})


def test_the_payload_is_real(tmp_path):
    """The control: plain pickle does run the payloads, so their absence below means something."""
    for i in range(2):
        marker = tmp_path / f"control{i}"
        pickle.loads(pickle.dumps(payloads(marker)[i]))
        assert marker.exists()


@pytest.mark.parametrize("kind", ["open", "os.system"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_pickled_payload_is_refused_and_never_runs(tmp_path, tiny, kind, writer):
    marker = tmp_path / "pwned"
    payload = payloads(marker)[0 if kind == "open" else 1]
    state = {"step": 3, "optimizer": {"lr": 1e-3}, "rng": payload}  # a state with a poisoned entry
    for name in ("state.pt", "model.safetensors"):
        path = tmp_path / name
        if writer == "torch.save":
            torch.save(state, path)
        else:
            path.write_bytes(pickle.dumps(state))
        if name == "state.pt":
            with pytest.raises(LibrarianError) as exc:
                load_state(path)
            assert_one_line(exc, str(path), "delete it")
        else:
            for load in (read_config, load_weights):
                with pytest.raises(LibrarianError) as exc:
                    load(path)
                assert_one_line(exc, str(path), "not a Librarian model file")
            from librarian.inference.generate import Generator

            with pytest.raises(LibrarianError) as exc:
                Generator.load(path, tiny[1])  # a real tokenizer: the model file is what is refused
            assert_one_line(exc, str(path), "not a Librarian model file")
        assert not marker.exists(), f"loading {name} ran the payload"


def test_an_honest_state_still_loads(tmp_path):
    state = {"step": 3, "rng": torch.get_rng_state(), "optimizer": {"state": {0: {"m": torch.ones(2)}}, "lr": 0.1}}
    save_state(state, tmp_path / "state.pt")
    loaded = load_state(tmp_path / "state.pt")
    assert loaded["step"] == 3 and torch.equal(loaded["rng"], state["rng"])


@pytest.fixture
def model_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_weights(GPT(tiny_config()), path)
    return path


def test_a_truncated_model_file_is_refused(model_file, tmp_path):
    data = model_file.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    cuts = sorted({0, 1, 7, 8, 9, 8 + header // 2, 8 + header, 8 + header + 1, len(data) // 2, len(data) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(LibrarianError) as exc:
            load_weights(path)
        assert_one_line(exc, str(path))
    assert load_weights(model_file).config == tiny_config()  # the whole file is fine


def save_foreign(path: Path, tensors: dict, config: dict | None) -> Path:
    metadata = None if config is None else model_metadata(config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def own_tensors(config: GPTConfig) -> dict:
    return {k: v for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize(
    "case",
    ["no_config", "bad_config_json", "unknown_config_field", "other_names", "extra_tensor", "missing_tensor",
     "wider", "deeper_config", "other_vocab_in_tensors", "huge_config", "impossible_config", "rope_huge_context"],
)
def test_a_model_file_of_another_architecture_is_refused(tmp_path, case):
    config = tiny_config()
    tensors, meta = own_tensors(config), config.to_dict()
    if case == "no_config":  # safetensors from another tool: no Librarian metadata at all
        meta = None
    elif case == "bad_config_json":
        save_file(tensors, str(tmp_path / "m.safetensors"), metadata={META_KEY: "{not json"})
    elif case == "unknown_config_field":
        meta = {**meta, "n_experts": 8}
    elif case == "other_names":  # e.g. a Hugging Face GPT-2 checkpoint
        tensors = {"transformer.wte.weight": torch.zeros(40, 16), "transformer.h.0.attn.c_attn.weight": torch.zeros(16, 48)}
    elif case == "extra_tensor":
        tensors = {**tensors, "blocks.1.attn.qkv.weight": torch.zeros(48, 16)}
    elif case == "missing_tensor":
        tensors.pop(sorted(tensors)[-1])
    elif case == "wider":  # the tensors of a d_model=32 model under a d_model=16 config
        tensors = own_tensors(tiny_config(d_model=32, d_ff=64))
    elif case == "deeper_config":  # config says 2 layers, the file holds 1
        meta = {**meta, "n_layer": 2}
    elif case == "other_vocab_in_tensors":
        tensors = own_tensors(tiny_config(vocab_size=41))
    elif case == "huge_config":  # a lying config must not make us allocate terabytes before checking
        meta = {**meta, "vocab_size": 10**12, "d_model": 10**6}
    elif case == "impossible_config":  # heads that do not divide the width
        meta = {**meta, "n_head": 3}
    elif case == "rope_huge_context":  # RoPE has no position tensor to check: the context must be capped
        tensors = own_tensors(tiny_config(position="rope"))
        meta = {**tiny_config(position="rope").to_dict(), "context_length": 10**7}
    path = tmp_path / "m.safetensors"
    if case != "bad_config_json":
        save_foreign(path, tensors, meta)
    with pytest.raises(LibrarianError) as exc:
        load_weights(path)
    assert_one_line(exc, str(path))


def test_a_model_file_of_an_earlier_version_still_loads_and_is_checked_the_same(tmp_path):
    """Earlier versions kept the config alone under `librarian.gpt_config`: a user's model still loads."""
    config = tiny_config()
    tensors = own_tensors(config)
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata={LEGACY_CONFIG_KEY: json.dumps(config.to_dict())})
    loaded = load_weights(path)
    assert loaded.config == config and read_tokenizer_sha256(path) is None
    assert all(torch.equal(loaded.state_dict()[name], t) for name, t in tensors.items())
    forged = tmp_path / "forged.safetensors"  # the old key is validated like the new one
    save_file(tensors, str(forged), metadata={LEGACY_CONFIG_KEY: json.dumps({**config.to_dict(), "n_head": 3})})
    with pytest.raises(LibrarianError) as exc:
        load_weights(forged)
    assert_one_line(exc, str(forged))


def test_a_model_and_tokenizer_of_different_vocabularies_are_refused(model_file, tiny):
    from librarian.inference.generate import Generator

    _, tokenizer_path = tiny
    with pytest.raises(LibrarianError) as exc:
        Generator.load(model_file, tokenizer_path)  # a 40-token model with a ~400-token tokenizer
    assert_one_line(exc, "tokenizer", "use the tokenizer the model was trained with")

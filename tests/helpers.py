"""Shared test helpers: paths, params overrides, token files, and the tiny model and tokenizer.

Plain functions and constants, imported by the tests (`from tests.helpers import ...`); the pytest
fixtures built on them are in conftest.py.
"""

from pathlib import Path

import yaml


ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_CORPUS = FIXTURES / "tinystories"


def set_dotted(raw: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        raw = raw[key]
    raw[leaf] = value


def fixture_stories(name: str = "train-sample.txt.gz") -> list[str]:
    from librarian.data.sources import read_shard

    return read_shard(FIXTURE_CORPUS / name)


def write_tokens(directory: Path, split: str, ids, vocab_size: int, utf8_bytes: int | None = None) -> Path:
    """A token file and its sidecar, as the tokenize stage writes them."""
    import json

    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids, dtype=np.uint16)
    ids.tofile(directory / f"{split}.bin")
    meta = {"split": split, "tokens": len(ids), "stories": int((ids == 0).sum()), "vocab_size": vocab_size,
            "utf8_bytes": utf8_bytes if utf8_bytes is not None else 4 * len(ids), "dtype": "uint16", "eot_id": 0,
            "tokenizer_sha256": "test", "layout": "each story's tokens followed by <|endoftext|>"}
    (directory / f"{split}.json").write_text(json.dumps(meta))
    return directory / f"{split}.bin"


# The tests' one tiny architecture: 1 layer, 2 heads, width 16, feed-forward 32. tiny_config() is it as a
# GPTConfig, TINY_MODEL as params overrides for training tests, dvc_project.TINY for pipeline projects.
TINY_ARCH = {"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32}

TINY_MODEL = {**{f"model.{k}": v for k, v in TINY_ARCH.items()}, "model.context_length": 16, "model.dropout": 0.1,
              "train.stride": 8, "eval.stride": 8,
              "eval.batch_size": 16, "train.batch_size": 8, "train.lr": 3e-3, "train.amp": False,
              "train.device": "cpu", "train.threads": 1}


def gpt_config(**overrides):
    """The committed params.yaml's model (the card's) at vocab 8000, with `overrides`: a GPTConfig
    for tests, without repeating the card's values in code."""
    from librarian.core.config import GPTConfig

    card = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]
    return GPTConfig(**{**card, "vocab_size": 8000, **overrides})


def tiny_config(**overrides):
    """The tests' tiny GPT (1 layer, 2 heads, width 16, feed-forward 32, vocab 64, context 32), with overrides."""
    return gpt_config(**{"vocab_size": VOCAB, "context_length": TINY_CONTEXT, **TINY_ARCH, **overrides})


# --- shared builders: token stories for training tests, a tiny model and tokenizer pair ----------


VOCAB = 64  # the vocabulary of stories()
TINY_CONTEXT = 32  # the context of build_tiny's model


def stories(n_stories: int, seed: int):
    """Learnable token stories: counting runs from a random start, each ended by <|endoftext|> (0)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_stories):
        start, length = rng.integers(1, VOCAB - 20), rng.integers(8, 20)
        out.extend(range(start, start + length))
        out.append(0)
    return np.array(out)


def chat_variants(n_variants: int, conversations: int, seed: int):
    """Learnable token conversations (librarian.data.chat_tokens.ChatTokens), one per variant: a request
    (a counting run from 40, mask 0) then its reply (a counting run from a random start, mask 1,
    with the closing <|endoftext|> 0)."""
    import numpy as np

    from librarian.data.chat_tokens import ChatTokens

    variants = []
    for v in range(n_variants):
        rng = np.random.default_rng([seed, v])
        tokens, mask, conv_starts, spans = [], [], [], []
        for _ in range(conversations):
            request = list(range(40, 40 + int(rng.integers(2, 6))))
            start = int(rng.integers(1, 30))
            reply = [*range(start, start + int(rng.integers(6, 14))), 0]
            conv_starts.append(len(tokens))
            spans.append((len(tokens) + len(request), len(tokens) + len(request) + len(reply)))
            tokens += request + reply
            mask += [0] * len(request) + [1] * len(reply)
        variants.append(ChatTokens(np.array(tokens, dtype=np.uint16), np.array(mask, dtype=np.uint8),
                                   np.array(conv_starts, dtype=np.int64), np.array(spans, dtype=np.int64)))
    return variants


def write_chat_variants(directory: Path, n_variants: int = 2, conversations: int = 120, seed: int = 3) -> Path:
    """A chat_tokens stage output of chat_variants(), for the token files of write_tokens (vocab VOCAB)."""
    from librarian.data.chat_tokens import write_chat_tokens

    tables = [f"train-v{v}.parquet" if v else "train.parquet" for v in range(n_variants)]
    write_chat_tokens(directory, chat_variants(n_variants, conversations, seed), tables, "test", VOCAB)
    return directory


def tiny_tokenizer(path: Path, stories: int = 100):
    """A real byte-level BPE (vocab 400) trained on the first fixture stories, saved at `path`."""
    from librarian.core.config import TokenizerParams
    from librarian.data.tokenizer import save_tokenizer, train_tokenizer

    params = TokenizerParams(vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"])
    tokenizer = train_tokenizer(fixture_stories()[:stories], params)
    save_tokenizer(tokenizer, path)
    return tokenizer


def tiny_model(path: Path, vocab_size: int, context_length: int = TINY_CONTEXT, seed: int = 0,
               tokenizer_sha256: str | None = None) -> Path:
    """A tiny untrained GPT (1 layer, width 16), seeded, saved at `path` as the pipeline saves models."""
    import torch

    from librarian.model.checkpoint import save_weights
    from librarian.model.gpt import GPT

    torch.manual_seed(seed)
    config = tiny_config(vocab_size=vocab_size, context_length=context_length)
    save_weights(GPT(config), path, tokenizer_sha256=tokenizer_sha256)
    return path


def build_tiny(directory: Path, context_length: int = TINY_CONTEXT,
               record_tokenizer: bool = False) -> tuple[Path, Path]:
    """A tiny untrained GPT and a real BPE trained on the fixture stories, saved as the pipeline does;
    with `record_tokenizer`, the model records the tokenizer's hash, as a trained model does."""
    from librarian.data.tokenizer import file_sha256

    tokenizer_path = directory / "tokenizer.json"
    vocab = tiny_tokenizer(tokenizer_path).get_vocab_size()
    sha = file_sha256(tokenizer_path) if record_tokenizer else None
    return tiny_model(directory / "model.safetensors", vocab, context_length, tokenizer_sha256=sha), tokenizer_path


def network_off(cmd: list[str]) -> list[str]:
    """`cmd` in a network namespace of its own: no interface but a loopback that is down (skips where unshare cannot)."""
    import subprocess

    import pytest

    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot turn the network off here (unshare --net: {probe.stderr.decode().strip()})")
    return ["unshare", "--net", *cmd]

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml

# Tests never touch the network: a hub access must fail fast, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "true"

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_CORPUS = FIXTURES / "tinystories"


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """The fixture project after a full `dvc repro`, built once. Copy it before changing anything.

    Under pytest-xdist, once for all the workers: the first to need it builds it in the run's shared
    temporary folder (under a file lock), the others wait for it and read the same folder."""
    from filelock import FileLock

    from tests.dvc_project import STAGES, dvc, make_project, ran

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        project = make_project(tmp_path_factory.mktemp("built"))
        assert ran(dvc("repro", cwd=project)) == STAGES
        return project
    shared = tmp_path_factory.getbasetemp().parent  # above each worker's own basetemp
    project, done = shared / "built", shared / "built.done"
    with FileLock(shared / "built.lock"):
        if not done.exists():
            shutil.rmtree(project, ignore_errors=True)  # a build that failed in another worker
            project.mkdir()
            make_project(project)
            assert ran(dvc("repro", cwd=project)) == STAGES
            done.touch()
    return project


@pytest.fixture
def raw_params() -> dict:
    """The project's params.yaml as a plain dict, to modify per test."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture
def make_params(raw_params):
    """Validated Params with dotted-key overrides: make_params(**{"data.fraction": 1.0})."""
    from librarian.config import parse_params

    def make(**overrides):
        raw = copy.deepcopy(raw_params)
        for dotted, value in overrides.items():
            set_dotted(raw, dotted, value)
        return parse_params(raw)

    return make


def set_dotted(raw: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        raw = raw[key]
    raw[leaf] = value


def fixture_stories(name: str = "train-sample.txt.gz") -> list[str]:
    from librarian.sources import read_shard

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


TINY_MODEL = {"model.n_layer": 1, "model.n_head": 2, "model.d_model": 16, "model.d_ff": 32,
              "model.context_length": 16, "model.dropout": 0.1, "train.stride": 8, "eval.stride": 8,
              "eval.batch_size": 16, "train.batch_size": 8, "train.lr": 3e-3, "train.amp": False,
              "train.device": "cpu", "train.threads": 1}



@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread than two; the stages under test set their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gpt_config(**overrides):
    """The committed params.yaml's model (the card's) at vocab 8000, with `overrides`: a GPTConfig
    for tests, without repeating the card's values in code."""
    from librarian.config import GPTConfig

    card = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]
    return GPTConfig(**{**card, "vocab_size": 8000, **overrides})


def tiny_config(**overrides):
    """The tests' tiny GPT (1 layer, 2 heads, width 16, feed-forward 32, vocab 64, context 32), with overrides."""
    return gpt_config(**{"vocab_size": VOCAB, "context_length": TINY_CONTEXT, "n_layer": 1, "n_head": 2, "d_model": 16,
                         "d_ff": 32, **overrides})


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
    """Learnable token conversations (librarian.chat_tokens.ChatTokens), one per variant: a request
    (a counting run from 40, mask 0) then its reply (a counting run from a random start, mask 1,
    with the closing <|endoftext|> 0)."""
    import numpy as np

    from librarian.chat_tokens import ChatTokens

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
    from librarian.chat_tokens import write_chat_tokens

    tables = [f"train-v{v}.parquet" if v else "train.parquet" for v in range(n_variants)]
    write_chat_tokens(directory, chat_variants(n_variants, conversations, seed), tables, "test", VOCAB)
    return directory


def tiny_tokenizer(path: Path, stories: int = 100):
    """A real byte-level BPE (vocab 400) trained on the first fixture stories, saved at `path`."""
    from librarian.config import TokenizerParams
    from librarian.tokenizer import save_tokenizer, train_tokenizer

    params = TokenizerParams(vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"])
    tokenizer = train_tokenizer(fixture_stories()[:stories], params)
    save_tokenizer(tokenizer, path)
    return tokenizer


def tiny_model(path: Path, vocab_size: int, context_length: int = TINY_CONTEXT, seed: int = 0,
               tokenizer_sha256: str | None = None) -> Path:
    """A tiny untrained GPT (1 layer, width 16), seeded, saved at `path` as the pipeline saves models."""
    import torch

    from librarian.checkpoint import save_weights
    from librarian.model import GPT

    torch.manual_seed(seed)
    config = tiny_config(vocab_size=vocab_size, context_length=context_length)
    save_weights(GPT(config), path, tokenizer_sha256=tokenizer_sha256)
    return path


def build_tiny(directory: Path, context_length: int = TINY_CONTEXT,
               record_tokenizer: bool = False) -> tuple[Path, Path]:
    """A tiny untrained GPT and a real BPE trained on the fixture stories, saved as the pipeline does;
    with `record_tokenizer`, the model records the tokenizer's hash, as a trained model does."""
    from librarian.tokenizer import file_sha256

    tokenizer_path = directory / "tokenizer.json"
    vocab = tiny_tokenizer(tokenizer_path).get_vocab_size()
    sha = file_sha256(tokenizer_path) if record_tokenizer else None
    return tiny_model(directory / "model.safetensors", vocab, context_length, tokenizer_sha256=sha), tokenizer_path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """build_tiny's (model, tokenizer) files, built once per session: read them, never change them."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))

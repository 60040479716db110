"""Bad input, end to end: a catalogue of broken params, data, token files, tokenizers, checkpoints
and prompts, each fed to the real stage (or the `librarian` command) in a subprocess, as DVC runs it.

Every case must end the same way:

- exit code != 0;
- stderr is exactly one line, `error: <the problem and the fix>`, with no Python traceback
  (LIBRARIAN_DEBUG=1 adds one: see the last test);
- no output, whole or partial, where DVC or the next stage would pick it up, and no temporary
  `.name.*.tmp` sibling left beside the outputs.

Some inputs the issue lists are not errors by design; they are checked at the end of this file as
the behaviour they are documented to have (a 50 MB story is dropped by clean as too_long; stories
longer than the context are fine for training; a prompt 100x the context keeps its end; control
characters in a prompt are stripped).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.helpers import (FIXTURE_CORPUS, ROOT, TINY_MODEL, build_tiny, fixture_stories, set_dotted, tiny_model,
                            write_tokens)

TIMEOUT = 120
CTX = TINY_MODEL["model.context_length"]  # 16: the tiny checkpoint's context


# --- shared inputs, built once -------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """Valid inputs for every stage; a case copies what it breaks."""

    tokenizer: Path
    vocab: int
    model: Path  # vocab = the tokenizer's, context CTX
    model_64: Path  # another vocab (64)
    tokens: Path  # train/val/test token files of the tokenizer's vocab
    clean: Path  # train/val/test.parquet
    raw: Path  # train.parquet


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from librarian.core.io import write_stories
    from librarian.data.tokenizer import file_sha256, load_tokenizer

    root = tmp_path_factory.mktemp("world")
    stories = fixture_stories()
    # As the pipeline makes them: the token files and the model record the tokenizer's hash.
    model, tokenizer = build_tiny(root, context_length=CTX, record_tokenizer=True)
    vocab, sha = load_tokenizer(tokenizer).get_vocab_size(), file_sha256(tokenizer)
    tiny_model(root / "model64.safetensors", 64, CTX, seed=1)
    rng = np.random.default_rng(0)
    for split, n in (("train", 600), ("val", 200), ("test", 200)):
        write_tokens(root / "tokens", split, rng.integers(1, vocab, n), vocab)
        sidecar(root / "tokens", split, tokenizer_sha256=sha)
    (root / "clean").mkdir()
    for split, part in (("train", stories[:20]), ("val", stories[20:25]), ("test", stories[25:30])):
        write_stories(root / "clean" / f"{split}.parquet", part)
    (root / "raw").mkdir()
    write_stories(root / "raw" / "train.parquet", stories[:20])
    return World(root / "tokenizer.json", vocab, root / "model.safetensors", root / "model64.safetensors",
                 root / "tokens", root / "clean", root / "raw")


@dataclass
class Ctx:
    """One case's folder: its params file, its copies of the inputs, and the outputs to watch."""

    tmp: Path
    world: World
    outputs: list[Path] = field(default_factory=list)
    cwd: Path = ROOT  # where the command runs
    close: str = ""  # a redirection that closes a standard stream, as the user's shell does: "<&-", ">&-"

    def params(self, text: str | None = None, delete: str | None = None, **overrides) -> str:
        """A params.yaml: the project's, shrunk to TINY_MODEL and a local source, with `overrides` (dotted keys)."""
        path = self.tmp / "params.yaml"
        if text is not None:
            path.write_text(text)
            return str(path)
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        for dotted, value in {**TINY_MODEL, "data.source": str(FIXTURE_CORPUS), **overrides}.items():
            set_dotted(raw, dotted, value)
        if delete:
            *parents, leaf = delete.split(".")
            section = raw
            for part in parents:
                section = section[part]
            del section[leaf]
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(path)

    def out(self, name: str) -> str:
        """An output path of the stage under test: it must not exist after the failure."""
        path = self.tmp / "data" / name
        self.outputs.append(path)
        return str(path)

    def copy(self, source: Path, name: str | None = None) -> Path:
        target = self.tmp / (name or source.name)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, target)
        return target

    # The stages' command lines, as dvc.yaml has them (every output inside data/).

    def download(self, source: Path | str | None = None, **overrides) -> list[str]:
        if source is not None:
            overrides["data.source"] = str(source)
        return ["stages.download", self.out("raw"), "--params", self.params(**overrides)]

    def subsample(self, raw: Path, **overrides) -> list[str]:
        return ["stages.subsample", str(raw), self.out("subsample"), "--params", self.params(**overrides)]

    def clean(self, subsample: Path, **overrides) -> list[str]:
        return ["stages.clean", str(subsample), self.out("clean"), self.out("clean.json"),
                "--params", self.params(**overrides)]

    def train_tokenizer(self, train: Path, **overrides) -> list[str]:
        return ["stages.train_tokenizer", str(train), self.out("tokenizer.json"), "--params", self.params(**overrides)]

    def tokenize(self, clean: Path | None = None, tokenizer: Path | None = None, **overrides) -> list[str]:
        return ["stages.tokenize", str(clean or self.world.clean), str(tokenizer or self.world.tokenizer),
                self.out("tokens"), "--params", self.params(**overrides)]

    def train(self, tokens: Path | None = None, chat_tokens: Path | None = None, **overrides) -> list[str]:
        return ["stages.train", str(tokens or self.world.tokens), str(chat_tokens or self.world.tokens.parent / "chat_tokens"),
                self.out("model"), self.out("train"),
                self.out("train_speed"), self.out("train_state"), "--params", self.params(**overrides)]

    def evaluate(self, model: Path | None = None, tokens: Path | None = None, **overrides) -> list[str]:
        return ["stages.evaluate", str(model or self.world.model), str(tokens or self.world.tokens),
                self.out("metrics.json"), "--params", self.params(**overrides)]

    def samples(self, model: Path | None = None, tokenizer: Path | None = None, **overrides) -> list[str]:
        return ["stages.samples", str(model or self.world.model), str(tokenizer or self.world.tokenizer),
                self.out("samples.md"), "--params", self.params(**overrides)]

    def chat_data(self, clean: Path | None = None, **overrides) -> list[str]:
        return ["stages.chat_data", str(clean or self.world.clean), self.out("chat"), self.out("chat_data.json"),
                "--params", self.params(**overrides)]

    def chat_tokens(self, chat: Path | None = None, **overrides) -> list[str]:
        return ["stages.chat_tokens", str(chat or self.tmp / "chat"), str(self.world.tokenizer), self.out("chat_tokens"),
                "--params", self.params(**overrides)]

    def finetune(self, base: Path | None = None, chat: Path | None = None, **overrides) -> list[str]:
        return ["stages.finetune", str(base or self.world.model), str(chat or self.tmp / "chat"),
                str(self.world.tokenizer), self.out("chat_model"), self.out("finetune"), self.out("finetune_speed"),
                self.out("finetune_state"), "--params", self.params(**overrides)]

    def chat_samples(self, model: Path | None = None, **overrides) -> list[str]:
        return ["stages.chat_samples", str(model or self.world.model), str(self.world.tokenizer),
                self.out("chat_samples.md"), "--params", self.params(**overrides)]

    def evaluate_chat(self, chat_model: Path | None = None, chat: Path | None = None, **overrides) -> list[str]:
        """The world's model as both base and fine-tuned one, unless `chat_model` is given."""
        return ["stages.evaluate_chat", str(self.world.model), str(chat_model or self.world.model),
                str(self.world.tokenizer), str(chat or self.tmp / "chat"), str(self.world.tokens),
                self.out("chat.json"), "--params", self.params(**overrides)]

    def chat(self, *args: str, model: Path | None = None, tokenizer: Path | None = None) -> list[str]:
        return ["librarian.cli.main", "chat", "--model", str(model or self.world.model),
                "--tokenizer", str(tokenizer or self.world.tokenizer), *args]

    def generate(self, *args: str, model: Path | None = None, tokenizer: Path | None = None) -> list[str]:
        return ["librarian.cli.main", "generate", "--model", str(model or self.world.model),
                "--tokenizer", str(tokenizer or self.world.tokenizer), "--max-new-tokens", "4", "--seed", "0", *args]

    def closing(self, redirect: str, argv: list[str]) -> list[str]:
        """`argv` run with a standard stream closed by `redirect` (`<&-` stdin, `>&-` stdout)."""
        self.close = redirect
        return argv

    def elsewhere(self, *args: str) -> list[str]:
        """The librarian command run from a folder that is not a project (no dvc.yaml, no params.yaml)."""
        self.cwd = self.tmp / "elsewhere"
        self.cwd.mkdir()
        return ["librarian.cli.main", *args]

    def export(self, *args: str, out: Path | None = None, model: Path | None = None,
               tokenizer: Path | None = None) -> list[str]:
        """`librarian export` to `out`: an existing folder is the user's; the default, new one must stay absent."""
        if out is None:
            out = self.tmp / "hf"
            self.outputs.append(out)
        return ["librarian.cli.main", "export", "--model", str(model or self.world.model),
                "--tokenizer", str(tokenizer or self.world.tokenizer), *args, str(out)]


def env(**extra) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "LIBRARIAN_DEBUG"}
    return {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1", **extra}


def run(argv: list[str], cwd: Path = ROOT, close: str = "", **extra_env) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", *argv]
    if close:
        command = ["sh", "-c", f'exec "$@" {close}', "sh", *command]
    return subprocess.run(command, cwd=cwd, env=env(**extra_env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=TIMEOUT)


# --- helpers that break one thing -----------------------------------------------------------------


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def parquet(path: Path, columns: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def story(i: int) -> str:
    return f"Story number {i}: once upon a time a little cat named Tom found a red ball in the big green park. The End."


def sidecar(directory: Path, split: str, **changes) -> None:
    path = directory / f"{split}.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def broken_tokens(c: Ctx, how: str, split: str = "train") -> Path:
    tokens = c.copy(c.world.tokens)
    train = tokens / f"{split}.bin"
    if how == "odd length":
        with train.open("ab") as f:
            f.write(b"\x01")
    elif how == "id beyond vocab":
        ids = np.fromfile(train, dtype=np.uint16)
        ids[10] = c.world.vocab + 5
        ids.tofile(train)
    elif how == "count disagrees":
        sidecar(tokens, "train", tokens=12345)
    elif how == "sidecar missing":
        (tokens / "val.json").unlink()
    elif how == "sidecar not json":
        (tokens / "train.json").write_text("{not json")
    elif how == "vocab disagrees":
        sidecar(tokens, "val", vocab_size=c.world.vocab + 100)
    elif how == "empty":
        write_tokens(tokens, "val", [], c.world.vocab)
    elif how == "shorter than a window":
        write_tokens(tokens, "val", [1, 2, 3, 0], c.world.vocab)
    elif how == "another tokenizer":
        sidecar(tokens, split, tokenizer_sha256="0" * 64)
    if how in ("empty", "shorter than a window"):  # rewritten by the same tokenizer as the rest
        sidecar(tokens, "val", tokenizer_sha256=json.loads((tokens / "train.json").read_text())["tokenizer_sha256"])
    return tokens


def reformatted_tokenizer(c: Ctx) -> Path:
    """The same tokenizer saved with other whitespace: it loads fine, but is not the model's file."""
    path = c.tmp / "tokenizer.json"
    path.write_text(json.dumps(json.loads(c.world.tokenizer.read_text()), indent=1))
    return path


def no_special_tokens_tokenizer(c: Ctx) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a cat sat on a mat"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = c.tmp / "tokenizer.json"
    tok.save(str(path))
    return path


def truncated(c: Ctx, source: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    return write(c.tmp / source.name, data[: int(len(data) * keep)])


def other_architecture(c: Ctx) -> Path:
    """A model file whose config (2 layers) does not fit its tensors (1 layer)."""
    from safetensors.torch import load_file, safe_open, save_file

    with safe_open(str(c.world.model), framework="pt") as f:
        meta = dict(f.metadata())
    content = json.loads(meta["librarian"])
    meta["librarian"] = json.dumps({**content, "gpt_config": {**content["gpt_config"], "n_layer": 2}})
    path = c.tmp / "model.safetensors"
    save_file(load_file(str(c.world.model)), str(path), metadata=meta)
    return path


def foreign_model(c: Ctx) -> Path:
    """A safetensors file from another tool: tensors, but no Librarian config."""
    import torch
    from safetensors.torch import save_file

    path = c.tmp / "model.safetensors"
    save_file({"wte.weight": torch.zeros(4, 4)}, str(path))
    return path


def nothing_run(c: Ctx, *args: str) -> list[str]:
    """The librarian command in a fresh clone's folder: dvc.yaml and params.yaml, no data/ yet."""
    c.cwd = c.tmp / "clone"
    c.cwd.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, c.cwd / name)
    return ["librarian.cli.main", *args]


def transformers_export(c: Ctx) -> Path:
    """A folder as `librarian export` (transformers' save_pretrained) writes it: config.json, and weights
    whose only metadata is {"format": "pt"}."""
    from safetensors.torch import load_file, save_file

    folder = c.tmp / "hf"
    folder.mkdir()
    write(folder / "config.json", '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    save_file(load_file(str(c.world.model)), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder / "model.safetensors"


def few_stories(c: Ctx, n: int) -> Path:
    from librarian.core.io import write_stories

    write_stories(c.tmp / "sub" / "train.parquet", [story(i) for i in range(n)])
    return c.tmp / "sub"


def empty_story_split(c: Ctx) -> Path:
    """The world's clean splits with a blank second story in val: not what the clean stage writes."""
    from librarian.core.io import write_stories

    clean = c.copy(c.world.clean)
    write_stories(clean / "val.parquet", [story(0), " "])
    return clean


def model_folder(c: Ctx) -> Path:
    """A folder like the pipeline's data/model/, holding model.safetensors."""
    write(c.tmp / "model" / "model.safetensors", c.world.model.read_bytes())
    return c.tmp / "model"


def users_folder(c: Ctx) -> Path:
    write(c.tmp / "mine" / "notes.txt", "my notes")
    return c.tmp / "mine"


def earlier_export(c: Ctx) -> Path:
    """A folder the export wrote, as far as its marker tells."""
    from librarian.inference.export import MARKER

    write(c.tmp / "hf" / "config.json", "{}")
    write(c.tmp / "hf" / MARKER, json.dumps({"format": "hf", "files": ["config.json"]}))
    return c.tmp / "hf"


def pipeline_model_folder(c: Ctx) -> Path:
    """data/model of a DVC project after `dvc repro`."""
    shutil.copy(ROOT / "dvc.yaml", c.tmp / "dvc.yaml")
    write(c.tmp / "data" / "model" / "model.safetensors", c.world.model.read_bytes())
    return c.tmp / "data" / "model"


# --- the catalogue ---------------------------------------------------------------------------------

# (id, command builder, words the one error line must contain)
CASES = [
    # params.yaml: validated by every stage before it touches anything
    ("params/unknown key, did you mean", lambda c: c.download(**{"model.n_haed": 4}),
     ["unknown key model.n_haed", "did you mean model.n_head", "remove it or fix its spelling"]),
    ("params/missing key", lambda c: ["stages.download", c.out("raw"), "--params", c.params(delete="model.n_head")],
     ["missing key model.n_head", "add it"]),
    ("params/wrong type (quoted int)", lambda c: c.download(**{"train.batch_size": "32"}),
     ["train.batch_size has the wrong type"]),
    ("params/amp not a boolean", lambda c: c.download(**{"train.amp": "ten"}),
     ["train.amp has the wrong type", "valid boolean", "'ten'"]),
    ("params/eval.amp as text", lambda c: c.download(**{"eval.amp": "yes"}), ["eval.amp has the wrong type"]),
    # "0.001" as text: PyYAML quotes it when it writes the file (unquoted, it would be a float to both readers).
    ("params/a number quoted", lambda c: c.download(**{"train.lr": "0.001"}), ["train.lr", "remove the quotes"]),
    ("params/zero size", lambda c: c.download(**{"train.batch_size": 0}),
     ["train.batch_size", "greater than or equal to 1", "got 0"]),
    ("params/negative size", lambda c: c.download(**{"model.d_model": -16}),
     ["model.d_model", "greater than or equal to 1"]),
    ("params/d_model not divisible by n_head", lambda c: c.download(**{"model.n_head": 3}),
     ["d_model (16) must be divisible by n_head (3)", "pick an n_head"]),
    ("params/fraction above 1", lambda c: c.download(**{"data.fraction": 1.5}),
     ["data.fraction", "less than or equal to 1"]),
    ("params/fraction zero", lambda c: c.download(**{"data.fraction": 0.0}), ["data.fraction", "greater than 0"]),
    ("params/val+test >= 1", lambda c: c.download(**{"data.val_fraction": 0.5, "data.test_fraction": 0.5}),
     ["val_fraction + test_fraction must be < 1"]),
    ("params/vocab larger than uint16", lambda c: c.download(**{"tokenizer.vocab_size": 70000}),
     ["tokenizer.vocab_size", "65536"]),
    ("params/stride larger than context", lambda c: c.download(**{"train.stride": 64}),
     ["train.stride (64) must be <= model.context_length"]),
    ("params/not YAML", lambda c: ["stages.download", c.out("raw"), "--params", c.params(text="seed: 1\ndata: [\n")],
     ["not valid YAML at line"]),
    ("params/file missing", lambda c: ["stages.download", c.out("raw"), "--params", str(c.tmp / "nope.yaml")],
     ["not found", "--params"]),
    # a context length larger than the checkpoint's: evaluate scores with the checkpoint's own
    ("params/context larger than the checkpoint's",
     lambda c: c.evaluate(**{"model.context_length": 64, "eval.stride": 32, "train.stride": 32}),
     ["eval.stride (32) exceeds the model's context length (16)", "lower eval.stride"]),
    # data.source, read by the download stage
    ("source/missing path", lambda c: c.download(c.tmp / "nowhere.txt"), ["does not exist", "fix the path"]),
    ("source/empty file", lambda c: c.download(write(c.tmp / "empty.txt", b"")), ["holds no train stories"]),
    ("source/binary garbage", lambda c: c.download(write(c.tmp / "g.txt", os.urandom(2048) + b"\x00")),
     ["binary data", "point data.source at text files"]),
    ("source/invalid UTF-8", lambda c: c.download(write(c.tmp / "l.txt", "caf\u00e9 story.".encode("latin-1"))),
     ["not valid UTF-8", "re-encode it as UTF-8"]),
    ("source/truncated gzip",
     lambda c: c.download(write(c.tmp / "s.txt.gz", gzip.compress(("x" * 5000).encode())[:-20])),
     ["cannot read", "complete, valid file"]),
    ("source/wrong parquet schema", lambda c: c.download(parquet(c.tmp / "s.parquet", {"body": ["a"]})),
     ["needs a 'text' or 'story' column"]),
    ("source/JSONL line not JSON",
     lambda c: c.download(write(c.tmp / "s.jsonl", '{"text": "ok"}\n{"text": broken\n')),
     ["line 2 is not valid JSON", "fix or remove that line"]),
    ("source/JSONL text null", lambda c: c.download(write(c.tmp / "s.jsonl", '{"text": "ok"}\n{"text": null}\n')),
     ['line 2 has "text": null', "fix or remove that line", 'a string "text" or "story"']),
    ("source/several bad JSONL lines, all at once",
     lambda c: c.download(write(c.tmp / "s.jsonl", '{"text": null}\n{"text": "ok"}\n{"text": null}\n[1]\n{"text"\n')),
     ["has 4 bad lines (1, 3, 4, 5)", 'line 1 has "text": null, line 4 is not a JSON object, line 5 is not valid JSON',
      "fix or remove them"]),
    ("source/folder without usable shard", lambda c: c.download(write(c.tmp / "src" / "notes.md", "x").parent),
     ["has no shard files"]),
    # the subsample and clean stages
    ("subsample/leaves zero stories", lambda c: c.subsample(c.world.raw, **{"data.fraction": 0.01}),
     ["keeps none", "raise data.fraction"]),
    ("clean/empty val split", lambda c: c.clean(few_stories(c, 6), **{"data.val_fraction": 0.05}),
     ["leaves the val split empty", "raise data.val_fraction"]),
    ("clean/empty test split",
     lambda c: c.clean(few_stories(c, 6), **{"data.val_fraction": 0.3, "data.test_fraction": 0.01}),
     ["leaves the test split empty", "raise data.test_fraction"]),
    ("clean/every story filtered out", lambda c: c.clean(few_stories(c, 20), **{"clean.min_chars": 5000}),
     ["no story is left after cleaning", "too_short"]),
    ("clean/input missing", lambda c: c.clean(c.tmp / "nowhere"), ["no train.parquet", "dvc repro subsample"]),
    # the chat_data stage (more cases in tests/data/test_chat_data.py)
    ("chat_data/share out of range", lambda c: c.chat_data(**{"chat_data.mix.words": -0.1, "chat_data.mix.plain": 0.7}),
     ["chat_data.mix.words", "greater than or equal to 0"]),
    ("chat_data/shares not summing to 1", lambda c: c.chat_data(**{"chat_data.mix.plain": 0.5}),
     ["the shares must sum to 1, got 1.35", "adjust words (0.45)"]),
    ("chat_data/multi_turn above 1", lambda c: c.chat_data(**{"chat_data.multi_turn": 1.5}),
     ["chat_data.multi_turn", "less than or equal to 1"]),
    ("chat_data/clean split missing",
     lambda c: c.chat_data(clean=write(c.tmp / "clean" / "train.parquet", (c.world.clean / "train.parquet").read_bytes()).parent),
     ["clean/val.parquet not found", "run `dvc repro clean`"]),
    ("chat_data/clean split not parquet",
     lambda c: c.chat_data(clean=write(c.tmp / "clean" / "train.parquet", "not parquet").parent),
     ["train.parquet is not a readable clean split", "rerun `dvc repro -f clean`"]),
    ("chat_data/empty story", lambda c: c.chat_data(clean=empty_story_split(c)),
     ["val.parquet: story 1 is empty", "dvc repro -f clean"]),
    ("chat_data/a kind no story of a split gets",
     lambda c: c.chat_data(**{"chat_data.mix.opening": 0.01, "chat_data.mix.plain": 0.24}),
     ["the train split has no opening conversation although chat_data.mix.opening is 0.01",
      "0.01 of its 20 stories rounds to none; use more data (data.fraction) or set chat_data.mix.opening to 0"]),
    # tokenizer.json, read by tokenize (and samples, generate)
    ("tokenizer/truncated", lambda c: c.tokenize(tokenizer=truncated(c, c.world.tokenizer)),
     ["invalid or truncated", "dvc repro -f train_tokenizer"]),
    ("tokenizer/not JSON", lambda c: c.tokenize(tokenizer=write(c.tmp / "tokenizer.json", "hello")),
     ["invalid or truncated"]),
    ("tokenizer/special tokens missing", lambda c: c.tokenize(tokenizer=no_special_tokens_tokenizer(c)),
     ["lacks the special tokens <|endoftext|>, <pad>", "retrain it"]),
    ("tokenizer/missing file", lambda c: c.tokenize(tokenizer=c.tmp / "nope.json"),
     ["not found", "dvc repro train_tokenizer"]),
    ("tokenize/no clean splits", lambda c: c.tokenize(clean=write(c.tmp / "clean" / "x.txt", "").parent),
     ["has no split files", "dvc repro clean"]),
    ("tokenize/clean split without text column",
     lambda c: c.tokenize(clean=parquet(c.tmp / "clean" / "train.parquet", {"story": ["A story."]}).parent),
     ["no 'text' column", "dvc repro -f clean"]),
    ("tokenize/clean split not parquet", lambda c: c.tokenize(clean=write(c.tmp / "clean" / "val.parquet", "x").parent),
     ["not a readable parquet file"]),
    # token files, read by train (and evaluate)
    ("tokens/odd byte length", lambda c: c.train(broken_tokens(c, "odd length")),
     ["odd byte length", "truncated", "dvc repro -f tokenize"]),
    ("tokens/ids >= vocab size", lambda c: c.train(broken_tokens(c, "id beyond vocab")),
     ["token id", "vocab", "dvc repro -f tokenize"]),
    ("tokens/sidecar count disagrees", lambda c: c.train(broken_tokens(c, "count disagrees")),
     ["but its sidecar says 12345", "dvc repro -f tokenize"]),
    ("tokens/sidecar missing", lambda c: c.train(broken_tokens(c, "sidecar missing")),
     ["val.json is missing", "dvc repro tokenize"]),
    ("tokens/sidecar not JSON", lambda c: c.train(broken_tokens(c, "sidecar not json")),
     ["sidecar", "unreadable", "dvc repro -f tokenize"]),
    ("tokens/train and val vocab disagree", lambda c: c.train(broken_tokens(c, "vocab disagrees")),
     ["vocab", "dvc repro -f tokenize"]),
    ("tokens/empty split", lambda c: c.train(broken_tokens(c, "empty")), ["is empty", "needs stories"]),
    ("tokens/split shorter than a window", lambda c: c.train(broken_tokens(c, "shorter than a window")),
     ["shorter than one window", "shorter context"]),
    ("tokens/train and val from different tokenizers", lambda c: c.train(broken_tokens(c, "another tokenizer", "val")),
     ["encoded by different tokenizers", "dvc repro -f tokenize"]),
    ("tokens/another tokenizer than the model's", lambda c: c.evaluate(tokens=broken_tokens(c, "another tokenizer", "test")),
     ["test.bin comes from another tokenizer (sha256 0000000000000000)", "use the matching files"]),
    ("tokens/ids >= vocab size at evaluate", lambda c: c.evaluate(tokens=broken_tokens(c, "id beyond vocab", "test")),
     ["token id", "dvc repro -f tokenize"]),
    # checkpoints, read by evaluate, samples and the librarian command
    ("checkpoint/truncated", lambda c: c.evaluate(model=truncated(c, c.world.model)),
     ["model.safetensors", "truncated"]),
    ("checkpoint/other architecture", lambda c: c.evaluate(model=other_architecture(c)),
     ["does not match its model config"]),
    ("checkpoint/another tool's file", lambda c: c.evaluate(model=foreign_model(c)),
     ["is not a Librarian model file"]),
    ("checkpoint/vocab mismatch with tokens", lambda c: c.evaluate(model=c.world.model_64),
     ["but the model has 64", "retrain the model"]),
    ("checkpoint/missing file", lambda c: c.evaluate(model=c.tmp / "nope.safetensors"),
     ["not found", "dvc repro train"]),
    ("checkpoint/vocab mismatch with tokenizer", lambda c: c.samples(model=c.world.model_64),
     ["expects 64", "use the tokenizer the model was trained with"]),
    ("tokenizer/not the one the model was trained with", lambda c: c.samples(tokenizer=reformatted_tokenizer(c)),
     ["comes from another tokenizer", "than model", "use the matching files"]),
    ("tokenizer/not the model's, at generate", lambda c: c.generate("--prompt", "Hi", tokenizer=reformatted_tokenizer(c)),
     ["comes from another tokenizer"]),
    ("checkpoint/truncated, at samples", lambda c: c.samples(model=truncated(c, c.world.model, 0.9)),
     ["model.safetensors"]),
    ("checkpoint/no chat model, at chat_samples", lambda c: c.chat_samples(model=c.tmp / "chat_model.safetensors"),
     ["chat_model.safetensors not found", "fine-tune the chat model first (`dvc repro finetune`)"]),
    ("params/chat_samples request empty", lambda c: c.chat_samples(**{"chat_samples.prompts": ["Tell me a story", ""]}),
     ["chat_samples.prompts"]),
    # generation: the librarian command
    ("generate/empty prompt", lambda c: c.generate("--prompt", ""), ["the prompt is empty"]),
    ("generate/only control characters", lambda c: c.generate("--prompt", "\x01\x02\x1b\x7f"),
     ["the prompt is empty"]),
    ("generate/negative temperature", lambda c: c.generate("--prompt", "Hi", "--temperature", "-1"),
     ["temperature must be >= 0"]),
    ("generate/nan temperature", lambda c: c.generate("--prompt", "Hi", "--temperature", "nan"),
     ["temperature must be >= 0"]),
    ("generate/negative top-k", lambda c: c.generate("--prompt", "Hi", "--top-k", "-1"), ["top-k must be"]),
    ("generate/top-p zero", lambda c: c.generate("--prompt", "Hi", "--top-p", "0"), ["top-p must be in (0, 1]"]),
    ("generate/top-p above 1", lambda c: c.generate("--prompt", "Hi", "--top-p", "1.5"), ["top-p must be in (0, 1]"]),
    ("generate/zero new tokens", lambda c: c.generate("--prompt", "Hi", "--max-new-tokens", "0"),
     ["--max-new-tokens must be >= 1"]),
    ("generate/top-k not a number", lambda c: c.generate("--prompt", "Hi", "--top-k", "many"),
     ["invalid int value", "--help"]),
    ("generate/seed beyond 64 bits", lambda c: c.generate("--prompt", "Hi", "--seed", str(2**70)),
     ["--seed must be a whole number from 0 to 9223372036854775807", f"got {2**70}"]),
    ("generate/negative seed", lambda c: c.generate("--prompt", "Hi", "--seed", "-1"),
     ["--seed must be a whole number from 0", "got -1"]),
    ("generate/prompt not UTF-8", lambda c: c.generate("--prompt", b"Once upon a \xff time"),
     ["--prompt is not valid UTF-8 text (byte 0xff at position 12)", "pass UTF-8 text"]),
    ("generate/model is a transformers export", lambda c: c.generate("--prompt", "Hi", model=transformers_export(c)),
     ["is a Hugging Face transformers model (its folder has config.json)", "AutoModelForCausalLM.from_pretrained",
      "data/model/model.safetensors"]),
    ("chat/before any run", lambda c: nothing_run(c, "chat"),
     ["no trained model here yet (no data/model/model.safetensors, no data/tokenizer.json)", "run `librarian demo`",
      "or `dvc repro`"]),
    ("generate/before any run", lambda c: nothing_run(c, "generate", "--prompt", "Hi"),
     ["no trained model here yet", "run `librarian demo`"]),
    ("chat/invalid sampling", lambda c: c.chat("--top-p", "2"), ["top-p must be in (0, 1]"]),
    ("chat/tokenizer of another vocab", lambda c: c.chat(model=c.world.model_64),
     ["expects 64", "use the tokenizer the model was trained with"]),
    ("generate/missing model", lambda c: c.generate("--prompt", "Hi", model=c.tmp / "nope.safetensors"),
     ["not found"]),
    ("generate/truncated tokenizer", lambda c: c.generate("--prompt", "Hi", tokenizer=truncated(c, c.world.tokenizer)),
     ["invalid or truncated", "give the tokenizer.json the model was trained with"]),
    ("chat/given tokenizer missing", lambda c: c.chat(tokenizer=c.tmp / "nope.json"), ["not found; check the path"]),
    ("generate/model is a folder", lambda c: c.generate("--prompt", "Hi", model=c.tmp),
     [f"model file {ROOT.anchor}", "is a folder, not a file", "give the path of a .safetensors file in it"]),
    ("chat/model is the pipeline's model folder", lambda c: c.chat(model=model_folder(c)),
     ["is a folder, not a file", "did you mean", "model.safetensors?"]),
    ("generate/tokenizer is a folder", lambda c: c.generate("--prompt", "Hi", tokenizer=c.tmp),
     ["tokenizer", "is a folder, not a file", "give the path of the tokenizer.json file in it"]),
    ("chat/stdin closed", lambda c: c.closing("<&-", c.chat()),
     ["stdin is closed", "run it in a terminal, or pipe them in"]),
    ("generate/stdout closed", lambda c: c.closing(">&-", c.generate("--prompt", "Hi")),
     ["stdout is closed", "send it to a file"]),
    ("generate/outside the project folder", lambda c: c.elsewhere("generate", "--prompt", "Hi"),
     ["no Librarian project here (", "no dvc.yaml or params.yaml", "run from the project folder",
      "or pass --model and --tokenizer"]),
    ("chat/outside the project folder, --model given", lambda c: c.elsewhere("chat", "--model", str(c.world.model)),
     ["no Librarian project here (", "or pass --tokenizer"]),
    # export: it replaces its folder whole, so only a new, empty or earlier-export folder will do
    ("export/folder holding other files, with --force", lambda c: c.export("--force", out=users_folder(c)),
     ["mine is not empty and is not a Librarian export (it holds notes.txt)", "choose a new or empty folder"]),
    ("export/earlier export without --force", lambda c: c.export(out=earlier_export(c)),
     ["holds an earlier Librarian export", "add --force to replace it"]),
    ("export/into a DVC output", lambda c: c.export("--force", out=pipeline_model_folder(c)),
     ["is in (or holds) data/model, which the DVC pipeline of", "export outside its data/ and metrics/"]),
    ("export/output is a file", lambda c: c.export(out=write(c.tmp / "hf.txt", "x")), ["is a file, not a folder"]),
    ("export/tokenizer not the model's", lambda c: c.export(tokenizer=reformatted_tokenizer(c)),
     ["comes from another tokenizer", "use the matching files"]),
    ("export/tokenizer of another vocab", lambda c: c.export(model=c.world.model_64),
     ["expects 64", "use the tokenizer the model was trained with"]),
    # finetune: the base model, the chat conversations (more cases in tests/training/test_finetune.py)
    ("finetune/no base model", lambda c: c.finetune(base=c.tmp / "model.safetensors"),
     ["base model", "not found", "run `dvc repro train` first"]),
    ("finetune/no chat data", lambda c: c.finetune(),
     ["chat/train.parquet not found", "run `dvc repro chat_data` first"]),
    ("finetune/base model of another vocab", lambda c: c.finetune(base=c.world.model_64),
     ["expects 64", "use the tokenizer the model was trained with"]),
    ("finetune/stride beyond the context", lambda c: c.finetune(chat=chat_folder(c), **{"finetune.stride": 999}),
     ["finetune.stride (999)", "lower finetune.stride"]),
    ("finetune/reply_windows unknown", lambda c: c.finetune(**{"finetune.reply_windows": "last"}),
     ["finetune.reply_windows", "'first' or 'all'"]),
    ("finetune/learned positions beyond the table",
     lambda c: c.finetune(chat=chat_folder(c), **{"finetune.context_length": 4 * CTX}),
     [f"finetune.context_length ({4 * CTX}) is beyond the base model's learned position table", "model.position: rope"]),
    # conversations in pretraining (train.chat_share, chat_data.variants; more cases in tests/training/test_mixture.py)
    ("params/chat share above 1", lambda c: c.train(**{"train.chat_share": 1.5}),
     ["train.chat_share: input should be less than or equal to 1"]),
    ("params/chat share below 0", lambda c: c.train(**{"train.chat_share": -0.25}),
     ["train.chat_share: input should be greater than or equal to 0"]),
    ("params/variants below 1", lambda c: c.chat_data(**{"chat_data.variants": 0}),
     ["chat_data.variants: input should be greater than or equal to 1"]),
    ("params/unknown chat window placement", lambda c: c.train(**{"train.chat_windows": "random"}),
     ["train.chat_windows", "'stream' or 'aligned'"]),
    ("params/learned positions beyond the table, at train",
     lambda c: c.train(**{"finetune.context_length": 4 * CTX}),
     [f"finetune.context_length ({4 * CTX}) is beyond the base model's learned position table"]),
    ("chat_tokens/a chat share above 0 with no chat_data output", lambda c: c.chat_tokens(**{"train.chat_share": 0.5}),
     ["chat/train.parquet not found", "run `dvc repro chat_data` first"]),
    ("train/a chat share above 0 with no chat_tokens output", lambda c: c.train(**{"train.chat_share": 0.5}),
     ["chat_tokens.json is missing or unreadable", "run `dvc repro chat_tokens`"]),
    ("train/a chat share above 0, chat_tokens built at share 0",
     lambda c: c.train(chat_tokens=share_zero_chat_tokens(c), **{"train.chat_share": 0.5}),
     ["holds no conversations (it was built with train.chat_share 0)", "rerun `dvc repro chat_tokens`"]),
    # evaluate_chat: two models, the chat test split (more cases in tests/evaluation/test_evaluate_chat.py)
    ("evaluate_chat/fine-tuned model missing", lambda c: c.evaluate_chat(chat_model=c.tmp / "nope.safetensors"),
     ["fine-tuned model", "not found", "run `dvc repro finetune`"]),
    ("evaluate_chat/models of different vocabs", lambda c: c.evaluate_chat(chat_model=c.world.model_64),
     ["has a vocab of 64 but base model", "fine-tune this base model"]),
    ("evaluate_chat/no chat folder", lambda c: c.evaluate_chat(),
     ["chat/test.parquet not found", "dvc repro chat_data"]),
]


def share_zero_chat_tokens(c: Ctx) -> Path:
    """What the chat_tokens stage writes at train.chat_share 0: a manifest, no conversations."""
    from librarian.data.chat_tokens import build_chat_tokens

    build_chat_tokens(c.tmp / "chat", c.world.tokenizer, c.tmp / "manifest_only", 0.0)
    return c.tmp / "manifest_only"


def chat_folder(c: Ctx) -> Path:
    """The chat_data stage's conversations of the world's clean stories, in the case's folder."""
    from librarian.data.chat_data import build_chat_data
    from librarian.core.config import load_params

    plain_only = {"chat_data.mix.words": 0.0, "chat_data.mix.character": 0.0, "chat_data.mix.opening": 0.0,
                  "chat_data.mix.plain": 1.0}  # the world's val and test splits hold 5 stories each
    build_chat_data(c.world.clean, c.tmp / "chat", c.tmp / "chat_data.json", load_params(c.params(**plain_only)))
    return c.tmp / "chat"


@pytest.mark.parametrize("build,words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, world, build, words):
    c = Ctx(tmp_path, world)
    result = run(build(c), cwd=c.cwd, close=c.close)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    for path in c.outputs:
        assert not path.exists(), f"{path} left behind"
        if path.parent.exists():
            leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]
            assert not leftovers, leftovers


def test_a_forced_cpu_precision_that_is_not_0_or_1_is_one_line(tmp_path, world):
    """LIBRARIAN_CPU_BF16 (librarian/core/precision.py) forces the policy; a value it cannot mean is refused."""
    c = Ctx(tmp_path, world)
    result = run(c.evaluate(), cwd=c.cwd, close=c.close, LIBRARIAN_CPU_BF16="fp16")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["error: LIBRARIAN_CPU_BF16 is 'fp16'; set it to 1 (treat the CPU as having "
                                          "native bf16), 0 (as having none), or unset it to let the hardware decide"]
    assert not any(path.exists() for path in c.outputs)


def test_catalogue_is_large_and_distinct():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)


def test_debug_shows_the_traceback(tmp_path, world):
    """LIBRARIAN_DEBUG=1: the same failure, with the traceback first and the error line last."""
    c = Ctx(tmp_path, world)
    result = run(c.train(broken_tokens(c, "odd length")), LIBRARIAN_DEBUG="1")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: token file")


# --- not errors, by design ------------------------------------------------------------------------


def test_a_50mb_story_is_dropped_by_clean_as_too_long(tmp_path, world):
    """A single 50 MB story is no error: clean drops it as too_long, counts it, and keeps the rest."""
    from librarian.core.io import read_stories, write_stories

    huge = ("The cat sat on the mat. " * (50 * 2**20 // 24))[:50 * 2**20].strip()
    write_stories(tmp_path / "sub" / "train.parquet", [story(i) for i in range(10)] + [huge])
    c = Ctx(tmp_path, world)
    result = run(c.clean(tmp_path / "sub", **{"data.val_fraction": 0.2, "data.test_fraction": 0.2}))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "data" / "clean.json").read_text())
    assert report["train_pool"]["dropped"]["too_long"] == 1 and report["train_pool"]["stories_out"] == 10
    out = tmp_path / "data" / "clean"
    kept = [s for split in ("train", "val", "test") for s in read_stories(out / f"{split}.parquet")]
    assert len(kept) == 10 and max(map(len, kept)) < 200


def test_stories_longer_than_the_context_train_fine(tmp_path, world):
    """Stories longer than the context are no error: windows run across them (and across story ends)."""
    tokens = tmp_path / "tokens"
    long_story = list(range(1, 200)) + [0]  # one story of 199 tokens, 12x the context of 16
    write_tokens(tokens, "train", long_story * 2, world.vocab)
    write_tokens(tokens, "val", long_story, world.vocab)
    c = Ctx(tmp_path, world)
    result = run(c.train(tokens, **{"train.max_steps": 2, "train.max_epochs": 1}))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "model" / "model.safetensors").exists()


def test_a_prompt_100x_the_context_keeps_its_end(tmp_path, world):
    """A prompt far longer than the context is no error: the model sees its last context_length tokens."""
    c = Ctx(tmp_path, world)
    prompt = "Once upon a time there was a cat. " * (100 * CTX // 8)
    result = run(c.generate("--prompt", prompt))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt.strip()[:100]) and result.stderr.count("error") == 0
    # ... and says so, on stderr, since the text printed is the whole prompt
    assert f"more than the model's context of {CTX}: the model sees only its last {CTX}" in result.stderr
    short = run(c.generate("--prompt", "Once upon a time"))
    assert "note:" not in short.stderr


def test_control_characters_in_a_prompt_are_stripped(tmp_path, world):
    """Control characters in an otherwise good prompt are dropped, not an error (tab and newline stay)."""
    c = Ctx(tmp_path, world)
    result = run(c.generate("--prompt", "Once\x1b[31m upon\x07 a\ttime"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Once[31m upon a\ttime")

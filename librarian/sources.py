"""The download stage: read the corpus named by data.source into columnar splits under data/raw/.

Two kinds of source:

- `hf:<owner>/<name>[@revision]`: a dataset on the Hugging Face hub, loaded with `datasets`;
  its `train` and `validation` splits are kept apart.
- a local path: a file, or a folder of shard files, in one of these formats:
  `.txt` / `.txt.gz` (stories separated by `<|endoftext|>`, the layout of TinyStories' own text
  files), `.jsonl` / `.jsonl.gz` (one object a line with a `text` or `story` field) or `.parquet`
  (a `text` or `story` column). In a folder, shards whose name has a `valid` or `validation` word
  (`TinyStories-valid.txt`, `validation-00000-of-00001.parquet`) form the official validation
  split; all others are train.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from librarian.errors import LibrarianError
from librarian.io import StoryWriter, atomic_dir, story_writer, write_json
# read_shard: for tests and benchmarks, which read small shards whole
from librarian.shards import SUFFIXES, first_line, read_shard, shard_batches, text_field  # noqa: F401

HUB_PREFIX = "hf:"
TRAIN, VALIDATION = "train", "validation"
_VALIDATION_WORDS = {"valid", "validation"}
OFFLINE_HINT = (
    "to work offline, point data.source in params.yaml at a local copy of TinyStories "
    "(a .txt, .txt.gz, .jsonl, .parquet file or a folder of them), "
    "e.g. `dvc exp run -S data.source=path/to/tinystories`"
)


@dataclass
class Corpus:
    """Stories per split, plus a manifest of where they came from (the data fingerprint)."""

    splits: dict[str, list[str]] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def download(source: str, out_dir: str | Path, root: str | Path = ".") -> dict:
    """Read `source` and write `out_dir/{train,validation}.parquet` and `manifest.json` atomically."""
    if source.startswith(HUB_PREFIX):
        return _download_hub(source, Path(out_dir))
    path = resolve_local(source, Path(root))
    shards = _shards(path)
    # A shard found bad halfway through raises inside atomic_dir: the splits written so far go with it.
    with atomic_dir(out_dir) as tmp:
        with ExitStack() as writers:
            def open_split(split: str) -> StoryWriter:
                return writers.enter_context(story_writer(tmp / f"{split}.parquet"))

            manifest = stream_local(path, shards, open_split)
        write_json(tmp / "manifest.json", manifest)
    return manifest


# --- the hub ---------------------------------------------------------------------------------

# The hub client retries a request that fails five times over about 25 s, logging each try. One
# HEAD request of the endpoint first, with a short timeout, tells an unreachable hub in seconds.
HUB_PROBE_SECONDS = 4.0
# Loggers that narrate the client's retries and fallbacks; our one line says what matters.
_HUB_LOGGERS = ("huggingface_hub", "datasets", "urllib3", "fsspec")


def _download_hub(source: str, out_dir: Path) -> dict:
    name, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise LibrarianError(f"data.source {source!r} is not of the form hf:<owner>/<name>[@revision]")
    loaded = _load_hub(name, revision or None)
    if TRAIN not in loaded:
        raise LibrarianError(f"hub dataset {name} has no train split (it has {', '.join(loaded)})")
    manifest = {"source": source, "kind": "hub", "dataset": name, "revision": revision or None, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for split in (TRAIN, VALIDATION):
            if split not in loaded:
                continue
            ds = loaded[split]
            column = text_field(ds.column_names, f"hub dataset {name}")
            ds = ds.select_columns([column]).rename_columns({column: "text"}) if column != "text" else ds.select_columns(["text"])
            # Streams in record batches: the full train split (about 2 GB of text) never sits in memory.
            ds.to_parquet(str(tmp / f"{split}.parquet"))
            manifest["splits"][split] = {"stories": ds.num_rows, "fingerprint": ds._fingerprint}
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _load_hub(name: str, revision: str | None):
    """The dataset, from the hub or, when it cannot be reached, from the Hugging Face cache.

    With HF_HUB_OFFLINE=1 the hub is not tried at all. When the probe finds it unreachable, the load
    runs in offline mode, which goes straight to the cache, where datasets would otherwise have
    fallen back after its retries.
    """
    import datasets
    from huggingface_hub import constants

    unreachable = None if datasets.config.HF_HUB_OFFLINE else hub_unreachable(constants.ENDPOINT)
    try:
        with _quiet_hub_client(), _hub_offline(bool(unreachable) or datasets.config.HF_HUB_OFFLINE):
            return datasets.load_dataset(name, revision=revision)
    except Exception as exc:  # noqa: BLE001 - offline, DNS, 404 and auth all mean the same to a user
        not_cached = isinstance(exc, ConnectionError)  # offline, and the cache has no copy
        if unreachable and not_cached:
            reason = f"{constants.ENDPOINT} is unreachable: {unreachable}"
        elif datasets.config.HF_HUB_OFFLINE and not_cached:
            reason = "HF_HUB_OFFLINE is set and the Hugging Face cache has no copy"
        else:
            reason = first_line(exc)
        raise LibrarianError(f"cannot load {name} from the Hugging Face hub ({reason}); {OFFLINE_HINT}") from None


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why `endpoint` cannot be reached, or None when it answers (with any HTTP status) within `timeout`.

    The request goes through the hub client's own session, so proxies, certificates and a custom
    client factory apply as they will to the download. It runs in a thread: a DNS lookup ignores
    socket timeouts and can hang for much longer.
    """
    from huggingface_hub.utils import get_session

    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout, follow_redirects=False)
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - every transport failure means the same here
            outcome.append(f"{type(exc).__name__}: {first_line(exc)}")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


@contextmanager
def _quiet_hub_client():
    """Silence the hub client's retry and fallback warnings (LIBRARIAN_DEBUG=1 keeps them)."""
    if os.environ.get("LIBRARIAN_DEBUG") == "1":
        yield
        return
    loggers = [logging.getLogger(name) for name in _HUB_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="urllib3")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def _hub_offline(offline: bool):
    """Offline mode for this process, as HF_HUB_OFFLINE=1 sets it: no request leaves, the cache answers.

    Both libraries read these flags when a request is made, not only at import.
    """
    import datasets
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    if offline:
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# --- local files -----------------------------------------------------------------------------


def resolve_local(source: str, root: Path) -> Path:
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise LibrarianError(f"data.source {source!r} does not exist (looked at {path}); fix the path in params.yaml")
    return path


def read_local(path: Path) -> Corpus:
    """Every story of a local source in memory, with its manifest: for benchmarks and tests on small corpora."""
    corpus = Corpus()
    corpus.manifest = stream_local(path, _shards(path), lambda split: _StoryList(corpus.splits.setdefault(split, [])))
    return corpus


class _StoryList:
    """A StoryWriter's interface over a list, for read_local."""

    def __init__(self, stories: list[str]):
        self._stories = stories

    @property
    def stories(self) -> int:
        return len(self._stories)

    def write(self, batch: pa.RecordBatch) -> None:
        self._stories.extend(batch.column(0).to_pylist())


def stream_local(path: Path, shards: list[Path], open_split: Callable[[str], StoryWriter]) -> dict:
    """Stream each shard, in name order, into the writer of its split (`open_split(split)`, called
    at the split's first shard, gives a StoryWriter); the manifest (shards, sha256, counts)."""
    manifest = {"source": str(path.name), "kind": "local", "shards": [], "splits": {}}
    writers = {}
    for shard in shards:
        split = shard_split(shard) if path.is_dir() else TRAIN
        if split not in writers:
            writers[split] = open_split(split)
        writer = writers[split]
        before = writer.stories
        for batch in shard_batches(shard):
            writer.write(batch)
        manifest["shards"].append(
            {"name": shard.relative_to(path).as_posix() if path.is_dir() else shard.name,
             "split": split, "stories": writer.stories - before, "sha256": _sha256(shard)}
        )
    if TRAIN not in writers or not writers[TRAIN].stories:
        raise LibrarianError(f"data.source {path} holds no train stories; add train shards or fix the path")
    manifest["splits"] = {split: {"stories": writer.stories} for split, writer in sorted(writers.items())}
    return manifest


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise LibrarianError(f"{path} has an unsupported format; use one of {', '.join(SUFFIXES)}")
        return [path]
    shards = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES) and not _hidden(p, path))
    if not shards:
        raise LibrarianError(f"folder {path} has no shard files; it needs files ending in {', '.join(SUFFIXES)}")
    return shards


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def shard_split(path: Path) -> str:
    words = set(re.split(r"[-_.\s]+", path.name.lower()))
    return VALIDATION if words & _VALIDATION_WORDS else TRAIN


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

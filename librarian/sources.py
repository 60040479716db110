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

import gzip
import hashlib
import json
import logging
import os
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from librarian.errors import LibrarianError
from librarian.io import atomic_dir, write_json, write_stories
from librarian.tokenizer import EOT  # the separator of TinyStories-train.txt is the tokenizer's end-of-text

HUB_PREFIX = "hf:"
TEXT_FIELDS = ("text", "story")
TRAIN, VALIDATION = "train", "validation"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")
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
    corpus = read_local(resolve_local(source, Path(root)))
    with atomic_dir(out_dir) as tmp:
        for split, stories in corpus.splits.items():
            write_stories(tmp / f"{split}.parquet", stories)
        write_json(tmp / "manifest.json", corpus.manifest)
    return corpus.manifest


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
            column = _text_field(ds.column_names, f"hub dataset {name}")
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
            reason = _first_line(exc)
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
            outcome.append(f"{type(exc).__name__}: {_first_line(exc)}")

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


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# --- local files -----------------------------------------------------------------------------


def resolve_local(source: str, root: Path) -> Path:
    path = Path(source).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise LibrarianError(f"data.source {source!r} does not exist (looked at {path}); fix the path in params.yaml")
    return path


def read_local(path: Path) -> Corpus:
    shards = _shards(path)
    corpus = Corpus(manifest={"source": str(path.name), "kind": "local", "shards": [], "splits": {}})
    for shard in shards:
        split = shard_split(shard) if path.is_dir() else TRAIN
        stories = read_shard(shard)
        corpus.splits.setdefault(split, []).extend(stories)
        corpus.manifest["shards"].append(
            {"name": shard.relative_to(path).as_posix() if path.is_dir() else shard.name,
             "split": split, "stories": len(stories), "sha256": _sha256(shard)}
        )
    if not corpus.splits.get(TRAIN):
        raise LibrarianError(f"data.source {path} holds no train stories; add train shards or fix the path")
    corpus.manifest["splits"] = {split: {"stories": len(s)} for split, s in sorted(corpus.splits.items())}
    return corpus


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


def read_shard(path: Path) -> list[str]:
    name = path.name
    if name.endswith(".parquet"):
        return _read_parquet(path)
    text = _read_text(path)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _parse_jsonl(text, path)
    return _parse_txt(text)


def _read_text(path: Path) -> str:
    try:
        data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise LibrarianError(f"cannot read {path}: {exc}; is it a complete, valid file?") from None
    if b"\x00" in data:
        raise LibrarianError(f"{path} holds binary data (NUL bytes), not text; point data.source at text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LibrarianError(
            f"{path} is not valid UTF-8 (bad byte at offset {exc.start}); re-encode it as UTF-8"
        ) from None


def _parse_txt(text: str) -> list[str]:
    # Stories sit between <|endoftext|> lines; the blank piece after the last separator is no story.
    return [story.strip() for story in text.split(EOT) if story.strip()]


def _parse_jsonl(text: str, path: Path) -> list[str]:
    """The stories of a JSONL shard; every bad line is reported at once, so one edit fixes them all."""
    stories, bad = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        story, problem = _jsonl_story(line)
        if problem:
            bad.append((number, problem))
        else:
            stories.append(story)
    if bad:
        raise LibrarianError(_bad_lines(path, bad))
    return stories


_JSONL_LINE = 'each line must be a JSON object with a string "text" or "story"'
_NUMBERED, _EXPLAINED = 10, 3  # line numbers and kinds of problem shown: the message stays one short line


def _bad_lines(path: Path, bad: list[tuple[int, str]]) -> str:
    """How many lines are bad, the first line numbers, and the first line of each kind of problem."""
    if len(bad) == 1:
        number, problem = bad[0]
        return f"{path} line {number} {problem}; fix or remove that line ({_JSONL_LINE})"
    numbers = ", ".join(str(number) for number, _ in bad[:_NUMBERED]) + (", ..." if len(bad) > _NUMBERED else "")
    first_of_kind = {problem: number for number, problem in reversed(bad)}
    kinds = sorted(first_of_kind.items(), key=lambda kind: kind[1])
    why = ", ".join(f"line {number} {problem}" for problem, number in kinds[:_EXPLAINED])
    why += ", ..." if len(kinds) > _EXPLAINED else ""
    return f"{path} has {len(bad)} bad lines ({numbers}): {why}; fix or remove them ({_JSONL_LINE})"


def _jsonl_story(line: str) -> tuple[str | None, str | None]:
    """(the story, None) from one JSONL line, or (None, what is wrong with it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"is not valid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return None, "is not a JSON object"
    key = next((k for k in TEXT_FIELDS if k in record), None)
    if key is None:
        return None, "has no field 'text' or 'story'"
    if not isinstance(record[key], str):
        return None, f"has {json.dumps(key)}: {json.dumps(record[key])[:20]}"
    return record[key], None


def _read_parquet(path: Path) -> list[str]:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise LibrarianError(f"{path} is not a readable parquet file ({exc}); re-download or re-export it") from None
    column = _text_field(schema.names, str(path))
    if not (pa.types.is_string(schema.field(column).type) or pa.types.is_large_string(schema.field(column).type)):
        raise LibrarianError(f"{path} column {column!r} is {schema.field(column).type}, not text; it must hold strings")
    stories = pq.read_table(path, columns=[column]).column(column).to_pylist()
    return [s for s in stories if s is not None]


def _text_field(names, where: str) -> str:
    column = next((n for n in TEXT_FIELDS if n in names), None)
    if column is None:
        raise LibrarianError(f"{where} has columns {list(names)}; it needs a 'text' or 'story' column")
    return column


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""The download stage: read the corpus named by data.source into columnar splits under data/raw/.

Two kinds of source:

- `hf:<owner>/<name>[@revision]`: a dataset repo on the Hugging Face hub. Its parquet files of the
  `train` and `validation` splits (TinyStories: `data/train-0000N-of-00004.parquet`,
  `data/validation-00000-of-00001.parquet`) are downloaded into the hub client's cache one at a
  time, resuming a download a past run left unfinished, then streamed into the splits as a local
  folder of the same files is, a row group at a time: the same bytes. See hub_split for the split
  of a file.
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
from pathlib import Path, PurePosixPath

import pyarrow as pa

from librarian.core.errors import LibrarianError
from librarian.core.io import StoryWriter, atomic_dir, story_writer, write_json
from librarian.core.progress import progress_bar

# read_shard: for tests and benchmarks, which read small shards whole
from librarian.data.shards import SUFFIXES, first_line, read_shard, shard_batches, text_field  # noqa: F401

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
    return _write_raw(out_dir, lambda open_split: stream_local(path, shards, open_split))


def _write_raw(out_dir: str | Path, stream: Callable[[Callable[[str], StoryWriter]], dict]) -> dict:
    """`out_dir` with the splits `stream(open_split)` writes and manifest.json of the manifest it returns."""
    # A shard found bad halfway through raises inside atomic_dir: the splits written so far go with it.
    with atomic_dir(out_dir) as tmp:
        with ExitStack() as writers:
            def open_split(split: str) -> StoryWriter:
                return writers.enter_context(story_writer(tmp / f"{split}.parquet"))

            manifest = stream(open_split)
        write_json(tmp / "manifest.json", manifest)
    return manifest


# --- the hub ---------------------------------------------------------------------------------

# The hub client retries a request that fails five times over about 25 s, logging each try. One
# HEAD request of the endpoint first, with a short timeout, tells an unreachable hub in seconds.
HUB_PROBE_SECONDS = 4.0
# Loggers that narrate the client's retries and fallbacks; our one line says what matters.
_HUB_LOGGERS = ("huggingface_hub", "urllib3")
_DATASET = "dataset"  # the hub's repo type
# Words of a hub path that name a split no stage reads: its stories are left out, not put in train.
_UNUSED_SPLIT_WORDS = {"test"}
_SHA256 = re.compile(r"[0-9a-f]{64}")  # the hub's etag of an LFS file is its sha256


@dataclass(frozen=True)
class HubShard:
    """A parquet file of a hub dataset repo: its path in the repo, its split, its size in bytes."""

    path: str
    split: str
    size: int


def _download_hub(source: str, out_dir: Path) -> dict:
    """The shards of the train and validation splits, downloaded into the hub client's cache, then
    streamed into the splits as a local folder of the same files is: the same bytes.

    The manifest names the commit the revision resolved to and each shard with its sha256: the data
    fingerprint (before, a per-split `fingerprint` of the `datasets` library stood there).
    """
    name, _, revision = source.removeprefix(HUB_PREFIX).partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise LibrarianError(f"data.source {source!r} is not of the form hf:<owner>/<name>[@revision]")
    commit, shards = _load_hub(name, revision or None)
    origin = {"source": source, "kind": "hub", "dataset": name, "revision": revision or None, "commit": commit}
    return _write_raw(out_dir, lambda open_split: {**origin, **stream_hub(name, shards, open_split)})


def stream_hub(name: str, shards: list[tuple[HubShard, Path]], open_split: Callable[[str], StoryWriter]) -> dict:
    """Stream each downloaded shard of hub dataset `name`, in order, into the writer of its split,
    as stream_local does; the manifest's shards (name, split, size, stories, sha256) and counts."""
    splits = _Splits(open_split)
    entries = [{"name": shard.path, "split": shard.split, "size": shard.size,
                "stories": splits.stream(path, shard.split), "sha256": _sha256(path)} for shard, path in shards]
    return {"shards": entries,
            "splits": splits.counts(f"hub dataset {name} holds no train stories; point data.source at another dataset")}


def _load_hub(name: str, revision: str | None) -> tuple[str, list[tuple[HubShard, Path]]]:
    """The commit `revision` (default: main) names, and its shards, each a file in the hub client's
    cache: downloaded when missing or, when the hub cannot be reached, from the cache alone.

    With HF_HUB_OFFLINE=1 the hub is not tried at all. When the probe finds it unreachable, the
    listing and the shards come straight from the cache, where the client would otherwise have
    fallen back after its retries.
    """
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    unreachable = None if offline else hub_unreachable(constants.ENDPOINT)
    try:
        with _quiet_hub_client(), _hub_offline(offline or bool(unreachable)):
            repo = _HubRepo(name, revision or constants.DEFAULT_REVISION)
            commit, shards = repo.listing()
            return commit, list(zip(shards, repo.fetch(commit, shards)))
    except LibrarianError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, DNS, 404 and auth all mean the same to a user
        reason = _hub_failure(exc, constants.ENDPOINT, unreachable, revision)
        raise LibrarianError(f"cannot load {name} from the Hugging Face hub ({reason}); {OFFLINE_HINT}") from None


class _NotCached(LookupError):
    """An offline run needs what the hub client's cache lacks: the repo's listing, or a shard (`path`)."""

    def __init__(self, path: str | None = None):
        super().__init__(path)
        self.path = path


def _hub_failure(exc: Exception, endpoint: str, unreachable: str | None, revision: str | None) -> str:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, _NotCached):
        no_copy = "the Hugging Face cache has no copy" + (f" of {exc.path}" if exc.path else "")
        if unreachable:
            return f"{endpoint} is unreachable: {unreachable}" + (f"; {no_copy}" if exc.path else "")
        return f"HF_HUB_OFFLINE is set and {no_copy}"
    if isinstance(exc, RevisionNotFoundError):
        return f"it has no revision {revision!r}"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such dataset, or it is private or gated"
    return first_line(exc)


class _HubRepo:
    """A dataset repo at a revision, as the hub client sees it: its listing and its files, in the
    client's cache (HF_HUB_CACHE)."""

    def __init__(self, name: str, revision: str):
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.name, self.revision, self.endpoint = name, revision, constants.ENDPOINT
        self.cache = Path(constants.HF_HUB_CACHE)
        self.storage = self.cache / repo_folder_name(repo_id=name, repo_type=_DATASET)

    def listing(self) -> tuple[str, list[HubShard]]:
        """The commit the revision names and the parquet shards of its train and validation splits."""
        from huggingface_hub import constants

        commit, files = self._cached_listing() if constants.is_offline_mode() else self._hub_listing()
        shards = hub_shards(files)
        where = f"hub dataset {self.name} at {self.revision}"
        if not any(path.endswith(".parquet") for path in files):
            raise LibrarianError(f"{where} has no parquet files; the hub's parquet export of it may have them: "
                                 f"data.source hf:{self.name}@refs/convert/parquet")
        if not any(shard.split == TRAIN for shard in shards):
            found = ", ".join(path for path in sorted(files) if path.endswith(".parquet"))[:200]
            raise LibrarianError(f"{where} has no parquet files of a train split (it has {found}); "
                                 "point data.source at another dataset")
        return commit, shards

    def _hub_listing(self) -> tuple[str, dict[str, int]]:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(endpoint=self.endpoint)
        commit = api.repo_info(self.name, repo_type=_DATASET, revision=self.revision).sha
        files = [f for f in api.list_repo_tree(self.name, repo_type=_DATASET, revision=commit, recursive=True)
                 if isinstance(f, RepoFile)]
        self._remember(commit, files)
        return commit, {f.path: f.size for f in files}

    def _remember(self, commit: str, files) -> None:
        """Keep the listing in the cache as snapshot_download does (refs/<revision>, trees/<commit>.json):
        an offline run finds it there, and knows which shards a copy must have to be whole."""
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
        from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision

        write_tree_cache(str(self.storage), commit, {
            f.path: TreeCacheEntry(size=f.size, blob_id=f.blob_id, lfs_sha256=f.lfs.sha256 if f.lfs else None,
                                   lfs_size=f.lfs.size if f.lfs else None, xet_hash=f.xet_hash)
            for f in files
        })
        _cache_commit_hash_for_specific_revision(str(self.storage), self.revision, commit)

    def _cached_listing(self) -> tuple[str, dict[str, int]]:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError

        try:
            files = get_cached_repo_tree(self.name, repo_type=_DATASET, revision=self.revision, cache_dir=self.cache)
        except CachedRepoTreeNotFoundError:
            raise _NotCached() from None
        ref = self.storage / "refs" / self.revision
        commit = ref.read_text() if ref.is_file() else self.revision  # else the revision is a commit hash
        return commit, {f.path: f.size for f in files}

    def fetch(self, commit: str, shards: list[HubShard]) -> list[Path]:
        """Each shard's file in the cache, the missing ones downloaded one at a time in order, under one
        progress bar in bytes over all of them."""
        from huggingface_hub import constants, try_to_load_from_cache

        cached = [try_to_load_from_cache(self.name, shard.path, cache_dir=self.cache, revision=commit,
                                         repo_type=_DATASET) for shard in shards]
        cached = [Path(path) if isinstance(path, str) else None for path in cached]
        missing = [shard for shard, path in zip(shards, cached) if path is None]
        if missing and constants.is_offline_mode():
            raise _NotCached(missing[0].path)
        total = sum(shard.size for shard in shards)
        with progress_bar(total, initial=total - sum(shard.size for shard in missing), desc="download",
                          unit="B", disable=not missing, unit_scale=True) as bar:
            return [path or self._download(commit, shard, bar) for shard, path in zip(shards, cached)]

    def _download(self, commit: str, shard: HubShard, bar) -> Path:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import WeakFileLock

        url = hf_hub_url(self.name, shard.path, repo_type=_DATASET, revision=commit, endpoint=self.endpoint)
        if etag := get_hf_file_metadata(url, endpoint=self.endpoint).etag:  # (else the client refuses the file)
            blob = self.storage / "blobs" / etag  # where the client keeps a file, by its etag
            # The client's lock of this blob: another process downloading it waits instead of appending.
            with WeakFileLock(self.cache / ".locks" / self.storage.name / f"{etag}.lock"):
                if blob.exists():  # another commit's copy of the same file
                    bar.update(shard.size)
                else:
                    self._resume(url, blob, shard, bar)
        # The client links the blob into the commit's snapshot (and would download it itself, into
        # the same bar, had its etag changed since).
        return Path(hf_hub_download(self.name, shard.path, repo_type=_DATASET, revision=commit, cache_dir=self.cache,
                                    endpoint=self.endpoint, tqdm_class=_BarShare(bar)))

    def _resume(self, url: str, blob: Path, shard: HubShard, bar) -> None:
        """Download `url` into `blob`, from where an interrupted download of it stopped.

        The client downloads into a file of its own process and deletes it when cut off (huggingface_hub
        2.4 keeps no `.incomplete` file to resume from); this one is kept, so a run after a Ctrl-C, a
        kill or a lost connection asks for the rest only (a Range request). The client resumes a
        connection lost within one run itself, a few times.
        """
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        partial = blob.with_name(f"{blob.name}.incomplete")
        partial.parent.mkdir(parents=True, exist_ok=True)
        done = partial.stat().st_size if partial.exists() else 0
        if done > shard.size:  # not a beginning of this file: no Range request could complete it
            partial.unlink()
            done = 0
        bar.update(done)
        with partial.open("ab") as f:
            http_get(url, f, resume_size=done, headers=build_hf_headers(), expected_size=shard.size,
                     tqdm_class=_BarShare(bar, counted=done))
        # Bytes from two runs make one file only if both read the same one: check before it is kept.
        if _SHA256.fullmatch(blob.name) and _sha256(partial) != blob.name:
            partial.unlink()
            raise LibrarianError(f"the download of {shard.path} from hub dataset {self.name} does not match "
                                 "its sha256 on the hub; run the download again")
        os.replace(partial, blob)


class _BarShare:
    """What the hub client makes of its `tqdm_class` for a file's progress: here, a share of one bar
    over all the shards, so the terminal shows one bar, not one per shard."""

    def __init__(self, bar, counted: int = 0):
        self._bar, self._counted = bar, counted  # the bytes on disk the bar counts already

    def __call__(self, *, initial: int = 0, **_) -> _BarShare:
        # The client starts a file's bar at the bytes it resumes from: 0 when the server ignored the Range.
        self._bar.update(initial - self._counted)
        return self

    def __enter__(self) -> _BarShare:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        self._bar.update(n)  # negative when the server ignored a Range request and the file starts again


def hub_shards(files: dict[str, int]) -> list[HubShard]:
    """The parquet files (path -> size) of a hub repo's train and validation splits, in name order, as
    a local folder of them is read (hidden ones left out)."""
    paths = sorted((path for path in files if path.endswith(".parquet")
                    and not any(part.startswith(".") for part in path.split("/"))), key=PurePosixPath)
    return [HubShard(path, split, files[path]) for path in paths if (split := hub_split(path))]


def hub_split(path: str) -> str | None:
    """The split of a parquet file in a hub repo, from the words of its path: folders too, as in the
    hub's parquet export (`default/validation/0000.parquet`); None for a test split."""
    words = set(re.split(r"[-_.\s/]+", path.lower()))
    if words & _VALIDATION_WORDS:
        return VALIDATION
    return None if words & _UNUSED_SPLIT_WORDS else TRAIN


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

    The client reads the flag when a request is made, not only at import.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    if offline:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


# --- local files -----------------------------------------------------------------------------


def check_source(source: str, root: str | Path) -> None:
    """Refuse a local data.source that does not exist, as download would (a hub name is checked there)."""
    if not source.startswith(HUB_PREFIX):
        resolve_local(source, Path(root))


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
    manifest = {"source": str(path.name), "kind": "local", "shards": []}
    splits = _Splits(open_split)
    for shard in shards:
        split = shard_split(shard) if path.is_dir() else TRAIN
        manifest["shards"].append(
            {"name": shard.relative_to(path).as_posix() if path.is_dir() else shard.name,
             "split": split, "stories": splits.stream(shard, split), "sha256": _sha256(shard)}
        )
    manifest["splits"] = splits.counts(f"data.source {path} holds no train stories; add train shards or fix the path")
    return manifest


class _Splits:
    """The writer of each split, opened at the split's first shard: what local and hub shards stream into."""

    def __init__(self, open_split: Callable[[str], StoryWriter]):
        self._open = open_split
        self._writers: dict[str, StoryWriter] = {}

    def stream(self, shard: Path, split: str) -> int:
        """Append the stories of `shard` to `split`, a batch at a time; how many it held."""
        if split not in self._writers:
            self._writers[split] = self._open(split)
        writer = self._writers[split]
        before = writer.stories
        for batch in shard_batches(shard):
            writer.write(batch)
        return writer.stories - before

    def counts(self, no_train: str) -> dict:
        """The stories of each split; `no_train` is the error when train has none."""
        if TRAIN not in self._writers or not self._writers[TRAIN].stories:
            raise LibrarianError(no_train)
        return {split: {"stories": writer.stories} for split, writer in sorted(self._writers.items())}


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

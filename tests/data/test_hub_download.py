"""The hub source (`data.source: hf:owner/name`), against stand-in hubs on 127.0.0.1 (benchmarks/hub_standins.py).

In-process tests point the hub client at a StandinHub through huggingface_hub.constants; the stage
runs (subprocesses, as DVC runs them) through HF_ENDPOINT and HF_HOME.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tqdm import tqdm

from benchmarks.hub_standins import TINYSTORIES, StandinHub, refusing_endpoint, silent_endpoint, write_hub_shards
from librarian.core.errors import LibrarianError
from librarian.core.io import read_stories
from librarian.data.sources import download, hub_split, hub_unreachable
from tests.helpers import ROOT, fixture_stories

SOURCE = f"hf:{TINYSTORIES}"
TRAIN_1 = "data/train-00001-of-00002.parquet"  # the second of the two train shards
CHUNK_BYTES = 1024


@pytest.fixture
def repo(tmp_path) -> Path:
    """The fixture's stories as TinyStories sits on the hub: two train shards and a validation shard
    in row groups of 40 stories (5 each), beside a dataset card."""
    folder = tmp_path / "repo"
    write_hub_shards(folder, fixture_stories(), fixture_stories("validation-sample.txt.gz"), row_group_stories=40)
    (folder / "README.md").write_text("# TinyStories\n")
    return folder


@pytest.fixture
def hub(repo, tmp_path, monkeypatch):
    """A stand-in hub serving `repo` as roneneldan/TinyStories, with the client of this process pointed at it
    (online, with an empty cache in tmp_path/hf/hub)."""
    from huggingface_hub import constants

    with StandinHub({TINYSTORIES: repo}) as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.url)
        # read at import, when HF_ENDPOINT is set: hf_hub_url builds its URLs from it
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", standin.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' offline mode; this hub is local
        yield standin


def assert_one_full_bar(stderr: str, repo: Path) -> None:
    """stderr (not a terminal) holds one progress bar, as plain lines, ending at the bytes of all the shards."""
    total = tqdm.format_sizeof(sum(p.stat().st_size for p in (repo / "data").iterdir()))
    lines = stderr.splitlines()
    assert lines and all(line.startswith("download:") for line in lines), lines
    assert f"100%|##########| {total}/{total}" in lines[-1], lines


def raw_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


def blob(tmp_path, path: Path) -> Path:
    """Where the hub client keeps a shard, by its sha256 (its etag on the hub)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return tmp_path / "hf" / "hub" / "datasets--roneneldan--TinyStories" / "blobs" / digest


# --- the download ------------------------------------------------------------------------------


def test_hub_download_writes_the_bytes_of_a_local_folder_of_its_shards(tmp_path, repo, hub, monkeypatch, capsys):
    """Both splits, the shards' stories in order, and data/raw/*.parquet byte for byte what the same
    shards give as a local folder; each shard read a batch at a time, under one bar in bytes."""
    import librarian.core.io
    from tests.data.test_sources import count_writes

    monkeypatch.setattr(librarian.core.io, "READ_BATCH_STORIES", 16)
    written = count_writes(monkeypatch)
    manifest = download(SOURCE, tmp_path / "raw")
    assert read_stories(tmp_path / "raw" / "train.parquet") == fixture_stories()
    assert read_stories(tmp_path / "raw" / "validation.parquet") == fixture_stories("validation-sample.txt.gz")
    download(str(repo), tmp_path / "local")
    assert raw_bytes(tmp_path / "raw") == raw_bytes(tmp_path / "local")
    assert len(written) >= 370 // 16 + 40 // 16  # batches, not shards

    assert manifest == json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert (manifest["kind"], manifest["dataset"], manifest["revision"]) == ("hub", TINYSTORIES, None)
    assert manifest["commit"] == hub.commit(TINYSTORIES)
    local = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert [{k: v for k, v in s.items() if k != "size"} for s in manifest["shards"]] == local["shards"]  # names, sha256
    assert [s["size"] for s in manifest["shards"]] == [(repo / s["name"]).stat().st_size for s in manifest["shards"]]
    assert manifest["splits"] == {"train": {"stories": 370}, "validation": {"stories": 40}}

    for shard in manifest["shards"]:  # one at a time, each once, whole
        assert [r.range for r in hub.gets(shard["name"])] == [None]
    assert_one_full_bar(capsys.readouterr().err, repo)


def test_a_second_download_uses_the_cache(tmp_path, hub):
    download(SOURCE, tmp_path / "first")
    hub.requests.clear()
    download(SOURCE + "@main", tmp_path / "second")
    assert raw_bytes(tmp_path / "second") == raw_bytes(tmp_path / "first")
    assert not [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]


def test_a_connection_cut_halfway_resumes_from_the_bytes_received(tmp_path, repo, hub, monkeypatch, capsys):
    """The stand-in closes the connection halfway through a shard: within the same run the client
    asks for the rest (a Range request from the bytes it has kept), and the output is whole."""
    from huggingface_hub import constants

    # The client keeps what it reads in whole chunks (10 MB); these shards are 0.1 MB.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK_BYTES)
    half = (repo / TRAIN_1).stat().st_size // 2
    hub.cut_at[TRAIN_1] = half
    download(SOURCE, tmp_path / "raw")
    assert [r.range for r in hub.gets(TRAIN_1)] == [None, f"bytes={half // CHUNK_BYTES * CHUNK_BYTES}-"]
    assert_one_full_bar(capsys.readouterr().err, repo)  # the bytes kept are counted once
    download(str(repo), tmp_path / "local")
    assert raw_bytes(tmp_path / "raw") == raw_bytes(tmp_path / "local")


# The download stage, with the hub client reading CHUNK_BYTES at a time (a monkeypatch, in a subprocess).
_SMALL_CHUNKS_STAGE = (f"import sys; import huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = {CHUNK_BYTES}; "
                       "from stages.download import main; main(sys.argv[1:])")


def stage_run(tmp_path, endpoint: str | None, small_chunks: bool = False) -> subprocess.Popen:
    """The download stage as DVC runs it, with the hub client's cache in tmp_path/hf; online against the hub
    at `endpoint`, or with HF_HUB_OFFLINE=1 when it is None."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LIBRARIAN_DEBUG")}
    env.update({"HF_HOME": str(tmp_path / "hf"), **({"HF_ENDPOINT": endpoint} if endpoint else {"HF_HUB_OFFLINE": "1"})})
    stage = ["-c", _SMALL_CHUNKS_STAGE] if small_chunks else ["-m", "stages.download"]
    return subprocess.Popen([sys.executable, *stage, str(tmp_path / "data" / "raw"), "--params", str(params)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def download_stage(tmp_path, endpoint: str | None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    with stage_run(tmp_path, endpoint) as run:
        stdout, stderr = run.communicate(timeout=300)
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr), time.monotonic() - start


def wait_for(condition, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_download_resumes_in_the_next_run(tmp_path, repo, stop):
    """The stage is stopped (SIGTERM, as DVC and a Ctrl-C stop it, or SIGKILL) halfway through a shard;
    the next run asks only for the bytes not on disk yet (a Range request from the partial file's
    size), and writes the right splits."""
    size = (repo / TRAIN_1).stat().st_size
    partial = blob(tmp_path, repo / TRAIN_1).with_suffix(".incomplete")
    with StandinHub({TINYSTORIES: repo}) as hub:
        hub.stall_at[TRAIN_1] = size // 2
        with stage_run(tmp_path, hub.url, small_chunks=True) as run:
            wait_for(hub.stalled.is_set, "the download to stall")
            wait_for(lambda: partial.exists() and partial.stat().st_size > 0, "bytes of the shard on disk")
            run.send_signal(stop)
            run.communicate()
        on_disk = partial.stat().st_size
        assert 0 < on_disk <= size // 2 and run.returncode != 0
        run, _ = download_stage(tmp_path, hub.url)
        assert run.returncode == 0, run.stderr
        assert [r.range for r in hub.gets(TRAIN_1)] == [None, f"bytes={on_disk}-"]
        assert_one_full_bar(run.stderr, repo)
    assert not partial.exists()
    download(str(repo), tmp_path / "local")
    assert raw_bytes(tmp_path / "data" / "raw") == raw_bytes(tmp_path / "local")


def test_a_partial_file_of_other_bytes_is_caught_and_dropped(tmp_path, repo, hub):
    """A resumed file is checked against its sha256 on the hub before the cache keeps it: bytes that
    are not the shard's (a partial file of another download) give one line, and the next run starts over."""
    partial = blob(tmp_path, repo / TRAIN_1).with_suffix(".incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\0" * 1000)
    with pytest.raises(LibrarianError, match=f"the download of {TRAIN_1} from hub dataset {TINYSTORIES} does not match"):
        download(SOURCE, tmp_path / "raw")
    assert not partial.exists() and not (tmp_path / "raw").exists()
    download(SOURCE, tmp_path / "raw")
    assert read_stories(tmp_path / "raw" / "train.parquet") == fixture_stories()


def test_a_corrupt_row_group_names_the_shard_and_writes_nothing(tmp_path, repo, hub):
    """A shard on the hub whose 3rd row group (of 5) is damaged: one line naming the shard and the
    rows, and no output (the splits written so far go with the temporary folder)."""
    chunk = pq.ParquetFile(repo / TRAIN_1).metadata.row_group(2).column(0)
    with open(repo / TRAIN_1, "r+b") as f:  # its pages' headers and data become zeros
        f.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
        f.write(bytes(chunk.total_compressed_size))
    with pytest.raises(LibrarianError) as info:
        download(SOURCE, tmp_path / "raw")
    message = str(info.value)
    assert f"{TRAIN_1} rows 81-120 (row group 3 of 5) cannot be read" in message and "\n" not in message
    assert not (tmp_path / "raw").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]


@pytest.mark.parametrize("parquet,expected", [
    (None, "has no parquet files; the hub's parquet export of it may have them: "
           f"data.source hf:{TINYSTORIES}@refs/convert/parquet"),
    ("data/test-00000-of-00001.parquet", "has no parquet files of a train split (it has data/test-00000-of-00001.parquet)"),
])
def test_a_repo_without_train_shards_is_refused_in_one_line(tmp_path, repo, hub, parquet, expected):
    for shard in (repo / "data").iterdir():
        shard.unlink()
    if parquet:
        pq.write_table(pa.table({"text": ["A test story."]}), repo / parquet)
    with pytest.raises(LibrarianError) as info:
        download(SOURCE, tmp_path / "raw")
    assert str(info.value).startswith(f"hub dataset {TINYSTORIES} at main {expected}") and "\n" not in str(info.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("source,reason", [
    ("hf:someone/nothing-here", "no such dataset, or it is private or gated"),
    (SOURCE + "@v9", "it has no revision 'v9'"),
])
def test_an_unknown_repo_or_revision_gives_one_line(tmp_path, hub, source, reason):
    with pytest.raises(LibrarianError) as info:
        download(source, tmp_path / "raw")
    assert f"from the Hugging Face hub ({reason}); to work offline" in str(info.value)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("path,split", [
    ("data/train-00000-of-00004.parquet", "train"), ("data/validation-00000-of-00001.parquet", "validation"),
    ("default/train/0000.parquet", "train"), ("default/validation/0000.parquet", "validation"),
    ("TinyStories-valid.parquet", "validation"), ("stories.parquet", "train"),
    ("data/test-00000-of-00001.parquet", None), ("default/test/0000.parquet", None),
])
def test_hub_split_by_path(path, split):
    assert hub_split(path) == split


# --- without the hub: the cache, or one line ------------------------------------------------------


def test_offline_after_a_download_answers_from_the_cache(tmp_path, repo, hub):
    """HF_HUB_OFFLINE=1 after a download: the stage needs no hub, and writes the same bytes."""
    download(SOURCE, tmp_path / "online")
    hub.__exit__()
    run, _ = download_stage(tmp_path, None)
    assert run.returncode == 0, run.stderr
    assert raw_bytes(tmp_path / "data" / "raw") == raw_bytes(tmp_path / "online")
    assert run.stdout.splitlines() == ["download: train: 370 stories", "download: validation: 40 stories"]


def test_offline_with_a_shard_missing_from_the_cache_names_it(tmp_path, repo, hub):
    download(SOURCE, tmp_path / "online")
    snapshot = tmp_path / "hf" / "hub" / "datasets--roneneldan--TinyStories" / "snapshots" / hub.commit(TINYSTORIES)
    (snapshot / TRAIN_1).unlink()
    run, _ = download_stage(tmp_path, None)
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"error: cannot load {TINYSTORIES} from the Hugging Face hub (HF_HUB_OFFLINE is set and the Hugging Face "
        f"cache has no copy of {TRAIN_1}); to work offline, point data.source in params.yaml at a local copy of "
        "TinyStories (a .txt, .txt.gz, .jsonl, .parquet file or a folder of them), e.g. "
        "`dvc exp run -S data.source=path/to/tinystories`"]
    assert not (tmp_path / "data").exists()


def test_unreachable_hub_falls_back_to_the_cached_copy_at_once(tmp_path, repo, hub):
    """A copy in the hub client's cache, from a download through the stand-in, still serves when the
    hub is down, without the client's retries."""
    download(SOURCE, tmp_path / "online")
    with refusing_endpoint() as url:
        run, seconds = download_stage(tmp_path, url)
    print(f"cached copy used after {seconds:.1f} s")
    assert run.returncode == 0, run.stderr
    assert "Retrying" not in run.stderr and "thrown while requesting" not in run.stderr and not run.stderr.strip()
    assert raw_bytes(tmp_path / "data" / "raw") == raw_bytes(tmp_path / "online")


@pytest.mark.parametrize("endpoint", [refusing_endpoint, silent_endpoint])
def test_unreachable_hub_fails_fast_in_one_line(tmp_path, endpoint):
    """Not 25 s of retries and a dozen warnings: a short probe of the endpoint, then one line."""
    with endpoint() as url:
        run, seconds = download_stage(tmp_path, url)
    print(f"{endpoint.__name__}: the one line after {seconds:.1f} s")
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: cannot load roneneldan/TinyStories from the Hugging Face hub ({url} is unreachable: ")
    assert "point data.source in params.yaml at a local copy" in run.stderr
    assert seconds < 15  # generous: the probe gives up after HUB_PROBE_SECONDS (4 s)
    assert not (tmp_path / "data").exists()


def test_offline_without_a_cached_copy_fails_in_one_line_with_the_offline_hint(tmp_path):
    run, _ = download_stage(tmp_path, None)
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: cannot load roneneldan/TinyStories from the Hugging Face hub "
                               "(HF_HUB_OFFLINE is set and the Hugging Face cache has no copy)")
    assert "point data.source in params.yaml at a local copy" in lines[0]
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_hub_probe(monkeypatch):
    """hub_unreachable: None for any HTTP answer, a reason for a refused or silent endpoint, within its timeout."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' offline mode; these hubs are local

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub_unreachable(f"http://127.0.0.1:{server.server_address[1]}", timeout=2) is None
    finally:
        server.shutdown()
        server.server_close()
    with refusing_endpoint() as url:
        assert "ConnectError" in hub_unreachable(url, timeout=2)
    with silent_endpoint() as url:
        start = time.monotonic()
        assert "Timeout" in hub_unreachable(url, timeout=0.5)
        assert time.monotonic() - start < 2


def test_malformed_hub_name_is_refused(tmp_path):
    with pytest.raises(LibrarianError, match="hf:<owner>/<name>"):
        download("hf:not a name", tmp_path / "raw")

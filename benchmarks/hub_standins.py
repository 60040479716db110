"""Stand-in Hugging Face hubs on 127.0.0.1, for benchmarks/hub_unreachable.py and the tests of the hub source.

The real hub is never contacted: HF_ENDPOINT (or huggingface_hub.constants.ENDPOINT, in-process) points
the client at one of these instead.

- silent_endpoint, refusing_endpoint: hubs that cannot be reached;
- StandinHub: a hub that serves local folders as dataset repos, with the endpoints huggingface_hub 2.4
  calls to download a file: the repo's revision (`/api/datasets/{repo}/revision/{rev}`), its file tree
  (`/api/datasets/{repo}/tree/{rev}`), and HEAD / GET of `/datasets/{repo}/resolve/{rev}/{path}` with the
  headers the client needs (ETag, X-Repo-Commit, Content-Length) and Range requests (206) for a resume.
  It can cut or stall a download partway, and records every request.

As a command, it serves a folder until stopped (for measurements against a stage run by hand):

    python benchmarks/hub_standins.py FOLDER [--repo roneneldan/TinyStories]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

TINYSTORIES = "roneneldan/TinyStories"
_BLOCK = 1 << 16  # bytes written to the socket at a time


@contextmanager
def silent_endpoint():
    """A stand-in hub that accepts connections and never answers (a firewall that drops packets)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@contextmanager
def refusing_endpoint():
    """A stand-in hub whose port refuses connections (nothing listens there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


def write_hub_shards(folder: Path, train: list[str], validation: list[str], train_shards: int = 2,
                     row_group_stories: int = 40) -> list[Path]:
    """The stories in the layout of TinyStories on the hub: data/train-0000N-of-0000M.parquet and
    data/validation-00000-of-00001.parquet, one string column `text`, in row groups of `row_group_stories`."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(train) // train_shards)
    parts = [(f"train-{i:05d}-of-{train_shards:05d}", train[i * per_shard:(i + 1) * per_shard])
             for i in range(train_shards)] + [("validation-00000-of-00001", validation)]
    paths = []
    for name, stories in parts:
        paths.append(folder / "data" / f"{name}.parquet")
        pq.write_table(pa.table({"text": pa.array(stories, type=pa.string())}), paths[-1],
                       row_group_size=row_group_stories)
    return paths


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # the URL path, percent-decoded
    range: str | None  # the Range header


class StandinHub:
    """A hub on 127.0.0.1 serving each folder of `repos` as a dataset repo at revision `main` and at its
    commit (a hash of its files: it changes when they change). Use as a context manager; `url` is its
    endpoint. `cut_at[path] = n` cuts the connection of the next GET of that file after byte n (once);
    `stall_at[path] = n` stops sending there (once) until `release` is set, and sets `stalled`."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.requests: list[Request] = []
        self.cut_at: dict[str, int] = {}
        self.stall_at: dict[str, int] = {}
        self.stalled, self.release = threading.Event(), threading.Event()
        self._digests: dict[tuple, str] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandinHub:
        threading.Thread(target=self._server.serve_forever, name="standin-hub", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()

    def gets(self, path: str) -> list[Request]:
        """The GET requests of one file, by its path in the repo."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + path)]

    def files(self, repo: str) -> dict[str, Path]:
        folder = self.repos[repo]
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def commit(self, repo: str) -> str:
        digest = hashlib.sha1()
        for path, file in self.files(repo).items():
            digest.update(f"{path}\0{self.sha256(file)}\n".encode())
        return digest.hexdigest()

    def sha256(self, file: Path) -> str:
        """The file's sha256, hashed again only when it changed: every request names the commit."""
        stat = file.stat()
        key = (file, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            digest = hashlib.sha256()
            with file.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._digests[key] = digest.hexdigest()
        return self._digests[key]


def _git_blob_id(path: Path) -> str:
    return hashlib.sha1(b"blob %d\0" % path.stat().st_size + path.read_bytes()).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(".parquet")  # as on the hub: binary data files are stored with LFS


_API = re.compile(r"/api/datasets/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<rest>/.*)?")
_RESOLVE = re.compile(r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<rest>.+)")


def _handler(hub: StandinHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def log_message(self, *args):
            pass

        def _serve(self, body: bool) -> None:
            raw = urlsplit(self.path).path
            hub.requests.append(Request(self.command, unquote(raw), self.headers.get("Range")))
            if api := _API.fullmatch(raw):
                self._api(api, body)
            elif resolve := _RESOLVE.fullmatch(raw):
                self._resolve(resolve, body)
            else:
                self._error(404, "EntryNotFound")

        def _repo_at(self, match) -> tuple[str, str] | None:
            """(repo, commit) of a request, or None once an error is sent."""
            repo, rev = unquote(match["repo"]), unquote(match["rev"])
            if repo not in hub.repos:
                self._error(404, "RepoNotFound")
                return None
            commit = hub.commit(repo)
            if rev not in ("main", commit):
                self._error(404, "RevisionNotFound")
                return None
            return repo, commit

        def _api(self, match, body: bool) -> None:
            if not (found := self._repo_at(match)):
                return
            repo, commit = found
            files = hub.files(repo)
            if match["kind"] == "revision":
                info = {"id": repo, "sha": commit, "private": False,
                        "siblings": [{"rfilename": path} for path in files]}
            else:
                info = _tree(hub, files, unquote(match["rest"] or "/").strip("/"), "recursive=true" in self.path.lower())
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

        def _resolve(self, match, body: bool) -> None:
            if not (found := self._repo_at(match)):
                return
            repo, commit = found
            path = unquote(match["rest"])
            file = hub.files(repo).get(path)
            if file is None:
                self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
                return
            size = file.stat().st_size
            etag = hub.sha256(file) if _is_lfs(path) else _git_blob_id(file)
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            start = _range_start(self.headers.get("Range"))
            if start:
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            status = 206 if start else 200
            if not body:
                self._send(status, b"", {**headers, "Content-Length": str(size)}, body=False)
                return
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(size - start)}.items():
                self.send_header(key, value)
            self.end_headers()
            self._stream(file, path, start, size)

        def _stream(self, file: Path, path: str, start: int, size: int) -> None:
            """The file's bytes from `start`, cut or stalled at the offset a test asked for."""
            stop = hub.cut_at.pop(path, None)
            stall = hub.stall_at.pop(path, None)
            end = min(x for x in (stop, stall, size) if x is not None)
            try:
                with file.open("rb") as f:
                    f.seek(start)
                    offset = start
                    while offset < end:
                        block = f.read(min(_BLOCK, end - offset))
                        self.wfile.write(block)
                        offset += len(block)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: killed, or done
                self.close_connection = True
                return
            if stall is not None and end == stall:
                hub.stalled.set()
                hub.release.wait()
            if end < size:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:  # the client is gone already (killed while the download stalled)
                    pass

        def _error(self, status: int, code: str, headers: dict | None = None) -> None:
            self._send(status, b"{}", {"X-Error-Code": code, "Content-Type": "application/json", **(headers or {})},
                       self.command != "HEAD")

        def _send(self, status: int, content: bytes, headers: dict, body: bool) -> None:
            self.send_response(status)
            headers = {"Content-Length": str(len(content)), **headers}
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(content)

    return Handler


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match[1]) if match else 0


def _tree(hub: StandinHub, files: dict[str, Path], under: str, recursive: bool) -> list[dict]:
    """The tree API's entries below `under`: files with size, git oid and LFS info, and their folders."""
    prefix = f"{under}/" if under else ""
    entries, folders = [], set()
    for path, file in files.items():
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts)):
            folders.add(prefix + "/".join(parts[:depth]))
        if len(parts) > 1 and not recursive:
            continue
        entry = {"type": "file", "path": path, "size": file.stat().st_size, "oid": _git_blob_id(file)}
        if _is_lfs(path):
            entry["lfs"] = {"oid": hub.sha256(file), "size": file.stat().st_size, "pointerSize": 134}
        entries.append(entry)
    for folder in sorted(folders):
        if recursive or "/" not in folder[len(prefix):]:
            entries.append({"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0})
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a folder as a dataset repo on a stand-in hub")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repo", default=TINYSTORIES)
    args = parser.parse_args()
    with StandinHub({args.repo: args.folder}) as hub:
        print(f"HF_ENDPOINT={hub.url}  (serving {args.folder} as {args.repo}; Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

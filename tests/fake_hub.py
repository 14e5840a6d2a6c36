"""A local stand-in for the Hugging Face hub (``HF_ENDPOINT``), and fake hub caches, for the
hub-id tests (importable from tests/unit and tests/e2e, like local_http.py).

It answers what ``huggingface_hub.snapshot_download`` asks, as the hub does:
``GET /api/models/{id}/revision/{rev}`` (the commit ``sha`` and ``siblings``),
``GET /api/models/{id}/tree/{sha}`` (the file listing), and ``HEAD`` / ``GET
/{id}/resolve/{rev}/{file}`` with the ``X-Repo-Commit`` and ``ETag`` headers. Unknown repositories
and revisions get the hub's 404 with its ``X-Error-Code``. Every request is recorded, so a test can
count them (a start from the cache must make none).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import threading
import urllib.parse
from typing import Iterator

REPO_SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # id -> {"refs": {rev: sha}, "files": {sha: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.lock = threading.Lock()

    def add(self, repo_id: str, files: dict[str, bytes], sha: str = REPO_SHA, refs: tuple = ("main",)) -> None:
        repo = self.repos.setdefault(repo_id, {"refs": {}, "files": {}})
        repo["files"][sha] = dict(files)
        for ref in refs:
            repo["refs"][ref] = sha

    def add_dir(self, repo_id: str, model_dir: str, extra: dict[str, bytes] | None = None, **kw) -> None:
        """Serve every file under ``model_dir`` (subfolders too), plus ``extra`` files."""
        files = {}
        for root, _, names in os.walk(model_dir):
            for n in names:
                full = os.path.join(root, n)
                with open(full, "rb") as f:
                    files[os.path.relpath(full, model_dir)] = f.read()
        self.add(repo_id, {**files, **(extra or {})}, **kw)

    def gets(self, file: str) -> int:
        """How many GETs of ``file`` (its path in the repository) were served."""
        return sum(1 for m, p in self.requests if m == "GET" and "/resolve/" in p
                   and p.split("/resolve/", 1)[1].split("/", 1)[1] == file)

    def _find(self, repo_id: str, rev: str) -> tuple[str, dict] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo["refs"].get(rev, rev)
        return (sha, repo["files"][sha]) if sha in repo["files"] else None


def _handler(hub: FakeHub) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            with hub.lock:
                hub.requests.append((self.command, path))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                repo_id, rev = "/".join(parts[2:4]), parts[5]
                found = hub._find(repo_id, rev)
                if found is None:
                    return self._missing(repo_id, rev)
                sha, files = found
                if parts[4] == "revision":
                    data = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                            "siblings": [{"rfilename": p} for p in sorted(files)]}
                else:
                    data = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                            for p, b in sorted(files.items())]
                return self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                found = hub._find(repo_id, rev)
                if found is None:
                    return self._missing(repo_id, rev)
                sha, files = found
                if file not in files:
                    return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                                 "X-Repo-Commit": sha}, body)
                data = files[file]
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                return self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag,
                                              "Content-Type": "application/octet-stream"}, body)
            self._send(404, b"Not found", {}, body)

        def _missing(self, repo_id: str, rev: str) -> None:
            code = "RevisionNotFound" if repo_id in hub.repos else "RepoNotFound"
            self._send(404, f"{code}: {repo_id}@{rev}".encode(), {"X-Error-Code": code,
                                                                   "X-Error-Message": code}, True)

        def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@contextlib.contextmanager
def fake_hub() -> Iterator[tuple[str, FakeHub]]:
    """``(endpoint URL, hub)``: the server runs in a thread of this process until the block ends."""
    hub = FakeHub()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", hub
    finally:
        srv.shutdown()
        srv.server_close()


def fake_cache(cache: str, repo_id: str, files: dict[str, bytes], sha: str = REPO_SHA,
               refs: tuple = ("main",)) -> str:
    """Write ``files`` into an HF cache as ``snapshot_download`` does (blobs, symlinked snapshot,
    ``refs/<name>``); returns the snapshot directory."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", sha)
    for name, data in files.items():
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snap, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(sha)
    return snap

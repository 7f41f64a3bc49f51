"""A small but real Hugging Face Hub on loopback, for testing downloads without internet.

It implements what huggingface_hub calls to list and fetch a model repository:

* ``GET /api/models/{owner}/{name}[/revision/{rev}]`` (``?blobs=true``): id, commit sha and the files with sizes,
  git blob ids and, for LFS files, ``lfs: {sha256, size, pointerSize}``;
* ``HEAD`` and ``GET /{owner}/{name}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (the git blob id, or for
  LFS files the sha256, also as ``X-Linked-Etag`` with ``X-Linked-Size``), ``Content-Length``, byte ``Range``
  requests answered with 206. No Xet headers are sent, so clients use plain HTTP.

Faults for tests: ``drop_after[path] = n`` cuts the connection after n body bytes of the next GET of ``path``
(once); ``corrupt[path] = data`` serves other bytes than the listing announces; ``slow[path] = s`` pauses s
seconds after each 64 KiB (a long download to cancel). ``requests`` records
(method, path, Range header) of every request.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub"]

LFS_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
    files: dict[str, bytes]
    commit: str


@dataclass
class FakeHub:
    repos: dict[str, _Repo] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, bytes] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)   # path -> seconds to wait after each 64 KiB
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def add_repo(self, repo_id: str, files: dict[str, bytes], commit: str | None = None) -> None:
        commit = commit or hashlib.sha1(repr(sorted(files)).encode() + repo_id.encode()).hexdigest()
        self.repos[repo_id] = _Repo(dict(files), commit)

    # ------------------------------------------------------------------------------------------ serving
    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                hub._handle(self, "GET")

            def do_HEAD(self) -> None:
                hub._handle(self, "HEAD")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None,
              head: bool = False) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool,
               commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(h, status, body, headers, head)

    def _repo_and_rest(self, parts: list[str]) -> tuple[str | None, list[str]]:
        for n in (2, 1):
            rid = "/".join(parts[:n])
            if rid in self.repos:
                return rid, parts[n:]
        return None, parts

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.requests.append((method, path, h.headers.get("Range")))
        head = method == "HEAD"
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "models"]:
            rid, rest = self._repo_and_rest(parts[2:])
            if rid is None:
                return self._error(h, 404, "RepoNotFound", "Repository not found", head)
            if rest and (rest[0] != "revision" or len(rest) != 2 or rest[1] not in ("main", self.repos[rid].commit)):
                return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
            return self._send(h, 200, json.dumps(self._info(rid)).encode(), {"Content-Type": "application/json"},
                              head)
        rid, rest = self._repo_and_rest(parts)
        if rid is None or len(rest) < 3 or rest[0] != "resolve":
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        repo = self.repos[rid]
        rev, fpath = rest[1], "/".join(rest[2:])
        if rev not in ("main", repo.commit):
            return self._error(h, 404, "RevisionNotFound", "Invalid rev id", head)
        if fpath not in repo.files:
            return self._error(h, 404, "EntryNotFound", "Entry not found", head, repo.commit)
        self._serve_file(h, repo, fpath, head)

    def _info(self, rid: str) -> dict:
        repo = self.repos[rid]
        siblings = []
        for name, data in sorted(repo.files.items()):
            s: dict = {"rfilename": name, "size": len(data), "blobId": _git_oid(data)}
            if name.endswith(LFS_SUFFIXES):
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                s["blobId"] = _git_oid(b"version https://git-lfs.github.com/spec/v1\n")  # the pointer's id
            siblings.append(s)
        return {"id": rid, "modelId": rid, "sha": repo.commit, "private": False, "siblings": siblings}

    def _serve_file(self, h: BaseHTTPRequestHandler, repo: _Repo, fpath: str, head: bool) -> None:
        listed = repo.files[fpath]
        data = self.corrupt.get(fpath, listed)
        headers = {"X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if fpath.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(listed).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(listed))})
        else:
            headers["ETag"] = f'"{_git_oid(listed)}"'
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            first = rng[len("bytes="):].split("-", 1)[0]
            start = int(first) if first else 0
            if start >= len(data):
                return self._send(h, 416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        if head:
            return self._send(h, 200, b"", headers, head=True)
        cut = self.drop_after.pop(fpath, None)
        if fpath in self.slow:
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            import time

            try:
                for i in range(0, len(body), 1 << 16):
                    h.wfile.write(body[i:i + (1 << 16)])
                    h.wfile.flush()
                    time.sleep(self.slow[fpath])
            except OSError:  # the client went away (a cancelled download)
                h.close_connection = True
            return
        if cut is None:
            return self._send(h, status, body, headers)
        # Announce the whole body, send part of it, then drop the connection: a network failure mid-file.
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body[:cut])
        h.wfile.flush()
        h.close_connection = True
        import socket

        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

"""A loopback test double for the Hugging Face Hub, for tests only.

It implements the few endpoints that huggingface_hub's create_repo → upload_folder →
snapshot_download / hf_hub_download (and repo_info / list_repo_files) call, on 127.0.0.1 at a
free port, with every commit of every repo kept in memory so an old revision stays fetchable by
its hash. Product code knows nothing of it: tests hand its ``endpoint`` to the real client.
Requests it does not implement are answered 501 and recorded in ``unhandled`` (and warned about
at teardown) so a failing test says which call the client made.

Use it from a test module with ``pytest_plugins = ["hub_server"]`` (tests/ is on sys.path), then
take the ``hub`` fixture: ``HfApi(endpoint=hub.endpoint, token="t")``. ``hub.drop_commit`` and
``hub.set_file`` rewrite history or tamper with a file, for tests of pinned revisions and hashes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

DEFAULT_BRANCH = "main"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HEX40 = re.compile(r"[0-9a-f]{40}")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]
    summary: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        """A branch name or a full commit hash → its commit (None when unknown)."""
        rev = unquote(rev)
        sha = self.refs.get(rev) or (rev if _HEX40.fullmatch(rev) else None)
        return self.commits.get(sha) if sha else None


class HubError(Exception):
    """An HTTP error the client understands: status, X-Error-Code and message."""

    def __init__(self, status: int, code: str | None, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class HubServer:
    """The in-memory Hub behind the loopback HTTP server; tests may inspect and alter it."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- repository state ------------------------------------------------------------------
    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        try:
            return self.repos[(repo_type, repo_id)]
        except KeyError:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found.") from None

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                url = f"{self.endpoint}/{_PREFIX[repo_type]}{repo_id}"
                raise HubError(409, None, f"You already created this {repo_type} repo", url=url)
            repo = Repo(repo_id, repo_type, private)
            self.repos[(repo_type, repo_id)] = repo
            self._commit(
                repo,
                DEFAULT_BRANCH,
                {".gitattributes": b"*.safetensors filter=lfs\n"},
                "initial commit",
                parent=None,
            )
            return repo

    def _commit(
        self, repo: Repo, branch: str, files: dict[str, bytes], summary: str, parent: str | None
    ) -> Commit:
        digest = hashlib.sha1(f"{parent}\n{summary}\n{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = Commit(digest.hexdigest(), parent, dict(files), summary, date)
        repo.commits[commit.sha] = commit
        repo.refs[branch] = commit.sha
        return commit

    def commit(
        self, repo_id: str, revision: str, lines: list[dict], repo_type: str = "model"
    ) -> Commit:
        """Apply an NDJSON commit payload (header, file, deletedFile, deletedFolder lines)."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            branch = unquote(revision)
            if branch not in repo.refs:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            head = repo.commits[repo.refs[branch]]
            files = dict(head.files)
            header = next((line["value"] for line in lines if line.get("key") == "header"), {})
            parent = header.get("parentCommit")
            if parent is not None and parent != head.sha:
                raise HubError(412, None, f"A commit has happened since {parent}.")
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, "EntryNotFound", f"{value['path']} does not exist.")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                elif key != "header":
                    raise HubError(400, None, f"the loopback hub cannot handle {key!r} lines.")
            return self._commit(repo, branch, files, header.get("summary", ""), parent=head.sha)

    def create_branch(
        self, repo_id: str, branch: str, start: str | None = None, repo_type: str = "model"
    ) -> None:
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            branch = unquote(branch)
            if branch in repo.refs:
                raise HubError(409, None, f"Reference refs/heads/{branch} already exists.")
            commit = repo.resolve(start or DEFAULT_BRANCH)
            if commit is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {start}")
            repo.refs[branch] = commit.sha

    def drop_commit(self, repo_id: str, sha: str, repo_type: str = "model") -> None:
        """Forget one commit, as a history rewrite on the Hub would: its hash no longer resolves."""
        with self.lock:
            repo = self.repo(repo_id, repo_type)
            del repo.commits[sha]
            for branch, head in list(repo.refs.items()):
                if head == sha:
                    del repo.refs[branch]

    def set_file(
        self,
        repo_id: str,
        path: str,
        data: bytes,
        revision: str = DEFAULT_BRANCH,
        repo_type: str = "model",
    ) -> None:
        """Overwrite a file inside an existing commit, keeping its hash (simulates tampering)."""
        with self.lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            if commit is None:
                raise KeyError(revision)
            commit.files[path] = data


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep pytest output clean; requests are recorded
            pass

        # -- plumbing ----------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while size := int(self.rfile.readline().strip().split(b";")[0], 16):
                    out += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return out
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict | None = None,
            content_type: str = "application/json",
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, status: int = 200) -> None:
            self._send(status, json.dumps(obj).encode())

        def _error(self, err: HubError) -> None:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            body = json.dumps({"error": err.message, **err.extra}).encode()
            self._send(err.status, body, headers)

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            hub.requests.append(f"{self.command} {self.path}")
            body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
            try:
                for method, pattern, name in _ROUTES:
                    match = pattern.fullmatch(url.path)
                    if match and method == self.command:
                        self._check_access(match.groupdict())
                        getattr(self, name)(query=query, body=body, **match.groupdict())
                        return
                hub.unhandled.append(f"{self.command} {self.path}")
                self._error(
                    HubError(501, None, f"loopback hub: no route for {self.command} {url.path}")
                )
            except HubError as err:
                self._error(err)

        def _check_access(self, groups: dict) -> None:
            """As on the Hub: writing needs a token (any token here), and a private repo answers
            'not found' to a request without one."""
            writes = self.command in ("POST", "PUT", "DELETE") and "validate-yaml" not in self.path
            if writes and not self.headers.get("Authorization"):
                raise HubError(401, None, "Invalid credentials in Authorization header")
            if "repo" not in groups:
                return
            repo = hub.repos.get((_TYPES.get(groups.get("type"), "model"), groups["repo"]))
            if repo is not None and repo.private and not self.headers.get("Authorization"):
                raise HubError(401, "RepoNotFound", f"Repository {repo.repo_id} not found.")

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        # -- endpoints ---------------------------------------------------------------------
        def create_repo(self, query, body, **_):
            payload = json.loads(body or b"{}")
            name, org = payload["name"], payload.get("organization")
            repo_id = f"{org}/{name}" if org else name
            repo_type = payload.get("type") or "model"
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            hub.create_repo(repo_id, repo_type, private)
            self._json({"url": f"{hub.endpoint}/{_PREFIX[repo_type]}{repo_id}", "name": repo_id})

        def delete_repo(self, query, body, **_):
            payload = json.loads(body or b"{}")
            name, org = payload["name"], payload.get("organization")
            repo_id = f"{org}/{name}" if org else name
            with hub.lock:
                hub.repo(repo_id, payload.get("type") or "model")
                del hub.repos[(payload.get("type") or "model", repo_id)]
            self._json({})

        def preupload(self, query, body, type, repo, rev):
            head = hub.repo(repo, _TYPES[type]).resolve(rev)
            files = []
            for entry in json.loads(body)["files"]:
                oid = None
                if head is not None and entry["path"] in head.files:
                    oid = git_blob_sha1(head.files[entry["path"]])
                files.append(
                    {
                        "path": entry["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            self._json({"files": files, "commitOid": head.sha if head else None})

        def commit(self, query, body, type, repo, rev):
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            commit = hub.commit(repo, rev, lines, _TYPES[type])
            url = f"{hub.endpoint}/{_PREFIX[_TYPES[type]]}{repo}/commit/{commit.sha}"
            self._json(
                {"commitUrl": url, "commitOid": commit.sha, "pullRequestUrl": None, "success": True}
            )

        def validate_yaml(self, query, body, **_):
            """The Hub checks a README's metadata header before an upload; so does the double."""
            content = json.loads(body or b"{}").get("content", "")
            match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
            try:
                meta = yaml.safe_load(match.group(1)) if match else {}
            except yaml.YAMLError as exc:
                self._send(400, json.dumps({"errors": [{"message": str(exc)}]}).encode())
                return
            if meta is not None and not isinstance(meta, dict):
                self._send(400, json.dumps({"errors": [{"message": "not a mapping"}]}).encode())
                return
            self._json({"errors": [], "warnings": []})

        def branch(self, query, body, type, repo, branch):
            start = json.loads(body or b"{}").get("startingPoint")
            hub.create_branch(repo, branch, start, _TYPES[type])
            self._json({})

        def info(self, query, body, type, repo, rev=DEFAULT_BRANCH):
            r = hub.repo(repo, _TYPES[type])
            commit = self._resolve(r, rev)
            self._json(
                {
                    "id": repo,
                    "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                    "author": repo.split("/")[0] if "/" in repo else None,
                    "sha": commit.sha,
                    "private": r.private,
                    "disabled": False,
                    "gated": False,
                    "lastModified": commit.date,
                    "createdAt": commit.date,
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                }
            )

        def tree(self, query, body, type, repo, rev, path=""):
            commit = self._resolve(hub.repo(repo, _TYPES[type]), rev)
            path = unquote(path or "").strip("/")
            prefix = f"{path}/" if path else ""
            if path and not any(p.startswith(prefix) for p in commit.files):
                raise HubError(404, "EntryNotFound", f"{path} does not exist at {rev}.")
            recursive = query.get("recursive", "").lower() in ("1", "true")
            entries, folders = [], set()
            for p in sorted(commit.files):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix) :].split("/")
                for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                    folders.add(prefix + "/".join(rest[:depth]))
                if recursive or len(rest) == 1:
                    data = commit.files[p]
                    entries.append(
                        {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
                    )
            entries += [
                {
                    "type": "directory",
                    "path": f,
                    "size": 0,
                    "oid": hashlib.sha1(f.encode()).hexdigest(),
                }
                for f in sorted(folders)
            ]
            self._json(entries)

        def resolve(self, query, body, repo, rev, path, type=None):
            commit = self._resolve(hub.repo(repo, _TYPES[type or "models"]), rev)
            path = unquote(path)
            if path not in commit.files:
                raise HubError(404, "EntryNotFound", f"{path} does not exist at {rev}.")
            data = commit.files[path]
            headers = {
                "X-Repo-Commit": commit.sha,
                "ETag": f'"{git_blob_sha1(data)}"',
                "Accept-Ranges": "bytes",
            }
            start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if start and self.command == "GET":
                offset = int(start.group(1))
                headers["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
                self._send(206, data[offset:], headers, "application/octet-stream")
                return
            self._send(200, data, headers, "application/octet-stream")

        @staticmethod
        def _resolve(repo: Repo, rev: str) -> Commit:
            commit = repo.resolve(rev)
            if commit is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
            return commit

    return Handler


_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_TYPE = r"(?P<type>models|datasets|spaces)"
_RESOLVE = rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"
# (method, path pattern, name of the Handler method that answers it with the pattern's groups)
_ROUTES = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("POST", rf"/api/{_TYPE}/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/api/{_TYPE}/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"/api/{_TYPE}/{_REPO}/branch/(?P<branch>.+)", "branch"),
        ("GET", rf"/api/{_TYPE}/{_REPO}/revision/(?P<rev>[^/]+)", "info"),
        ("GET", rf"/api/{_TYPE}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("GET", rf"/api/{_TYPE}/{_REPO}", "info"),
        ("HEAD", _RESOLVE, "resolve"),
        ("GET", _RESOLVE, "resolve"),
    ]
]


@pytest.fixture
def hub():
    """A fresh loopback Hub for one test; ``hub.endpoint`` is its base URL."""
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()
        if server.unhandled:
            warnings.warn(
                f"loopback hub got requests it does not implement: {server.unhandled}", stacklevel=1
            )

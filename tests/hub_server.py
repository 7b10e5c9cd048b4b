"""A small Hugging Face Hub protocol server on 127.0.0.1, for push tests (no network, no Xet).

It speaks what ``huggingface_hub`` uses to create a dataset repo and upload a folder: ``repos/create``,
``validate-yaml``, ``preupload`` (Parquet and images answer "lfs"), the git-LFS batch API with ``basic``
transfers and a PUT upload URL, the NDJSON ``commit`` endpoint (files, LFS pointers, deletions), ``tree``,
``paths-info``, repo info, branches and ``resolve`` downloads. Every API call but the LFS PUT (a pre-signed URL,
as on the real Hub) must carry ``Authorization: Bearer <token>``.

Faults are injected per kind of request: ``hub.fail["lfs_put"] = 1`` answers the next LFS PUT with HTTP 500;
``hub.fail["commit"] = 2`` fails the next two commits. Every request is recorded in ``hub.requests``.

    with HubServer(token="hf_test") as hub:
        os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LFS_SUFFIXES = (".parquet", ".png", ".jpg", ".jpeg", ".bin", ".safetensors")
LFS_THRESHOLD = 10 * 1024 * 1024
REPO = r"(?P<type>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+?)"


@dataclass
class Repo:
    """A repository: each branch maps paths to file bytes; LFS files also keep their sha256."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


@dataclass
class HubState:
    """What the server holds and saw."""

    token: str
    repos: dict[str, Repo] = field(default_factory=dict)  # "datasets/owner/name" -> Repo
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    fail: Counter = field(default_factory=Counter)  # request kind -> failures still to inject
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, method, path)
    lfs_puts: Counter = field(default_factory=Counter)  # sha256 -> successful PUTs
    lock: threading.Lock = field(default_factory=threading.Lock)

    def files(self, repo_id: str, branch: str = "main", repo_type: str = "datasets") -> dict[str, bytes]:
        """The files of a branch (a copy)."""
        return dict(self.repos[f"{repo_type}/{repo_id}"].branches[branch])


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    ROUTES = (
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"/api/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", rf"/api/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", rf"/api/{REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", "tree"),
        ("POST", rf"/api/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", rf"/api/{REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("GET", rf"/api/{REPO}(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", rf"/(?:{REPO})/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/(?:{REPO})/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    )

    # -- plumbing --------------------------------------------------------------------------------------------

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    @property
    def hub(self) -> HubState:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path = unquote(url.path)
        self.query = parse_qs(url.query)
        route = next(
            (
                (kind, match)
                for m, pattern, kind in self.ROUTES
                if m == method and (match := re.fullmatch(pattern, path))
            ),
            None,
        )
        if route is None:
            self.hub.requests.append(("unknown", method, self.path))
            return self._json(404, {"error": f"no route for {method} {path}"})
        kind, match = route
        self.hub.requests.append((kind, method, path))
        body = self._body()
        if kind != "lfs_put" and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        with self.hub.lock:
            if self.hub.fail[kind] > 0:
                self.hub.fail[kind] -= 1
                return self._json(500, {"error": f"injected failure of {kind}"})
        getattr(self, f"_{kind}")(body=body, **{k: v for k, v in match.groupdict().items()})

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _repo(self, type: str, repo: str) -> Repo | None:
        found = self.hub.repos.get(f"{type}/{repo}")
        if found is None:
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return found

    def _branch(self, repo: Repo, rev: str) -> dict[str, bytes] | None:
        branch = repo.branches.get(unquote(rev))
        if branch is None:
            self._json(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return branch

    def _entry(self, path: str, content: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(content), "oid": _git_oid(content)}
        sha = hashlib.sha256(content).hexdigest()
        if sha in self.hub.lfs and _is_lfs(path, len(content)):
            entry["lfs"] = {"oid": sha, "size": len(content), "pointerSize": 134}
        return entry

    # -- endpoints -------------------------------------------------------------------------------------------

    def _create_repo(self, body: bytes) -> None:
        req = json.loads(body)
        repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
        key = f"{req.get('type', 'model')}s/{repo_id}"
        url = f"{self.server.url}/{key}" if not key.startswith("models/") else f"{self.server.url}/{repo_id}"
        with self.hub.lock:
            if key in self.hub.repos:
                return self._json(409, {"error": "You already created this repo", "url": url})
            private = bool(req.get("private")) or req.get("visibility") == "private"
            self.hub.repos[key] = Repo(private=private)
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as err:
                return self._json(400, {"error": f"Invalid YAML: {err}"})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, body: bytes, type: str, repo: str, rev: str) -> None:
        if self._repo(type, repo) is None:
            return
        files = json.loads(body)["files"]
        modes = [
            {"path": f["path"], "uploadMode": "lfs" if _is_lfs(f["path"], f["size"]) else "regular"}
            for f in files
        ]
        self._json(200, {"files": [{**m, "shouldIgnore": False} for m in modes]})

    def _lfs_batch(self, body: bytes, type: str, repo: str) -> None:
        req = json.loads(body)
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:
                href = f"{self.server.url}/lfs-upload/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._json(400, {"error": "sha256 mismatch"})
        with self.hub.lock:
            self.hub.lfs[oid] = body
            self.hub.lfs_puts[oid] += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _commit(self, body: bytes, type: str, repo: str, rev: str) -> None:
        found = self._repo(type, repo)
        branch = found and self._branch(found, rev)
        if branch is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        staged = dict(branch)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._json(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                staged[value["path"]] = self.hub.lfs[value["oid"]]
            elif key == "deletedFile":
                staged.pop(value["path"], None)
        with self.hub.lock:
            branch.clear()
            branch.update(staged)
            oid = hashlib.sha1(f"{len(found.commits)}{sorted(staged)}".encode()).hexdigest()
            found.commits.append({"oid": oid, "summary": lines[0]["value"].get("summary"), "rev": rev})
        url = f"{self.server.url}/{type}/{repo}/commit/{oid}"
        self._json(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})

    def _tree(self, body: bytes, type: str, repo: str, rev: str, path: str | None) -> None:
        found = self._repo(type, repo)
        branch = found and self._branch(found, rev)
        if branch is None:
            return
        prefix = (path or "").strip("/")
        entries = [self._entry(p, c) for p, c in sorted(branch.items()) if p.startswith(prefix)]
        self._json(200, entries)

    def _paths_info(self, body: bytes, type: str, repo: str, rev: str) -> None:
        found = self._repo(type, repo)
        branch = found and self._branch(found, rev)
        if branch is None:
            return
        form = parse_qs(body.decode()) if body and not body.startswith(b"{") else {}
        paths = form.get("paths") or json.loads(body or b"{}").get("paths", [])
        self._json(200, [self._entry(p, branch[p]) for p in paths if p in branch])

    def _create_branch(self, body: bytes, type: str, repo: str, branch: str) -> None:
        found = self._repo(type, repo)
        if found is None:
            return
        with self.hub.lock:
            if branch in found.branches:
                return self._json(409, {"error": f"Reference {branch} already exists"})
            found.branches[branch] = dict(found.branches["main"])
        self._json(200, {})

    def _repo_info(self, body: bytes, type: str, repo: str, rev: str | None) -> None:
        found = self._repo(type, repo)
        branch = found and self._branch(found, rev or "main")
        if branch is None:
            return
        sha = found.commits[-1]["oid"] if found.commits else "0" * 40
        siblings = [{"rfilename": p} for p in sorted(branch)]
        self._json(200, {"id": repo, "sha": sha, "private": found.private, "siblings": siblings})

    def _resolve(self, body: bytes, type: str, repo: str, rev: str, path: str) -> None:
        found = self._repo(type, repo)
        branch = found and self._branch(found, rev)
        if branch is None:
            return
        if path not in branch:
            return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        content = branch[path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{_git_oid(content)}"')
        self.send_header("X-Repo-Commit", found.commits[-1]["oid"] if found.commits else "0" * 40)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)


def _is_lfs(path: str, size: int) -> bool:
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_THRESHOLD


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: HubState):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubServer:
    """Context manager running the server in a thread; ``url``, ``state`` and the faults to inject."""

    def __init__(self, token: str):
        self.state = HubState(token=token)
        self._server = _Server(self.state)
        self.url = self._server.url
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubState:
        self._thread.start()
        self.state.url = self.url
        return self.state

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

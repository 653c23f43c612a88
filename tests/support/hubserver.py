"""A Hugging Face Hub-compatible HTTP server for tests, on the standard library (http.server).

The real `huggingface_hub` and `datasets` clients talk to it over HTTP on 127.0.0.1, so tests exercise
the real client code (uploads, LFS, commits, downloads, caching, `load_dataset`) without the network.
The protocol it speaks is described in shared/docs/hub-protocol.md (next to this repository); the
installed client sources are the reference for every field. It deliberately does NOT emulate Xet:
`point_clients_at` disables Xet in the clients and the server never sends `X-Xet-*` headers or `xetHash`.

Model: every repo starts like on the real Hub with an "initial commit" holding `.gitattributes`; each
commit is a full snapshot `path -> Blob`; blob bytes live in one content-addressed store (in memory,
or under `root/blobs` when a root is given). Commit ids are 40-hex sha1s salted per server run, so a
client cache from another run can never mistake an old snapshot for a new one.

Usage in a test module (the `hub` fixture lives in conftest.py)::

    from support.hubserver import TEST_USER

    def test_upload(hub):
        HfApi().create_repo(f"{TEST_USER}/r", repo_type="dataset")
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import os
import re
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

try:  # optional: PyYAML (a `datasets` dependency) parses README front matter for cardData / validate-yaml
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

TEST_TOKEN = "hf_test_token"
TEST_USER = "acme"

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_LFS_SUFFIXES = (".parquet", ".png", ".safetensors", ".pt", ".bin")
_LFS_MIN_SIZE = 10 * 1024 * 1024
_GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in _LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid`/ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    # parse_datetime in huggingface_hub expects exactly '%Y-%m-%dT%H:%M:%S.%fZ'.
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _repo_type(repo_type: str | None) -> str:
    repo_type = repo_type or "model"
    return _TYPES.get(repo_type, repo_type)


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    sha1: str  # git blob id of the content
    lfs: bool

    @property
    def oid(self) -> str:
        """The git tree oid: for LFS files that is the pointer file's blob id, as in git."""
        return git_blob_sha1(_lfs_pointer(self.sha256, self.size)) if self.lfs else self.sha1

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.sha1


@dataclass
class Commit:
    id: str
    parent: str | None
    files: dict[str, Blob]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    created: str
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: list[str] = field(default_factory=list)  # refs/pr/N -> prs[N - 1]

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]


class HubError(Exception):
    """An error response; `code` goes into X-Error-Code, which is all the clients look at."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


class HubServer:
    def __init__(self, root: Path | None = None, tokens: dict[str, str] | None = None):
        self.root = Path(root) if root is not None else None
        self.tokens = dict(tokens) if tokens is not None else {TEST_TOKEN: TEST_USER}
        self.requests: list[tuple[str, str]] = []
        self.url = ""
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}
        self._salt = os.urandom(16).hex()
        self._counter = 0
        self._fail: list[int] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        if self.root is not None:
            (self.root / "blobs").mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> str:
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hubserver",
                                        daemon=True)  # short poll interval: stop() returns quickly
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- test helpers
    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def fail_next(self, n: int, status: int = 500) -> None:
        """The next `n` requests, whatever they are, get `status` (to test client retries)."""
        with self._lock:
            self._fail.extend([status] * n)

    def fail_after(self, k: int, status: int = 400) -> None:
        """Let `k` requests through, then fail the next one with `status` (to stop a client at any step)."""
        with self._lock:
            self._fail.extend([0] * k + [status])

    def set_gated(self, repo_type: str, repo_id: str, gated: bool = True) -> None:
        with self._lock:
            self._repos[(_repo_type(repo_type), repo_id)].gated = gated

    def create_repo(self, repo_type: str, repo_id: str, private: bool = False) -> None:
        """Create a repo directly (no HTTP), e.g. to set up fixtures another client only reads."""
        with self._lock:
            self._new_repo(_repo_type(repo_type), repo_id, private)

    def file_bytes(self, repo_type: str, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self._lock:
            repo = self._repos[(_repo_type(repo_type), repo_id)]
            return self._read(repo.commits[self._resolve(repo, revision)].files[path])

    def files(self, repo_type: str, repo_id: str, revision: str = "main") -> list[str]:
        with self._lock:
            repo = self._repos[(_repo_type(repo_type), repo_id)]
            return sorted(repo.commits[self._resolve(repo, revision)].files)

    def files_or_none(self, repo_type: str, repo_id: str, revision: str = "main") -> list[str] | None:
        """The repo's files, or None when there is no such repo."""
        with self._lock:
            if (_repo_type(repo_type), repo_id) not in self._repos:
                return None
        return self.files(repo_type, repo_id, revision)

    def branches(self, repo_type: str, repo_id: str) -> list[str]:
        with self._lock:
            return sorted(self._repos[(_repo_type(repo_type), repo_id)].branches)

    def commits(self, repo_type: str, repo_id: str, revision: str = "main") -> list[str]:
        """Commit ids reachable from `revision`, newest first (the last one is the initial commit)."""
        with self._lock:
            repo = self._repos[(_repo_type(repo_type), repo_id)]
            return [c.id for c in self._history(repo, self._resolve(repo, revision))]

    # ---------------------------------------------------------------- storage
    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.root is not None:
            path = self.root / "blobs" / sha
            if not path.exists():
                tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
        else:
            self._blobs[sha] = data
        return sha

    def _has(self, sha: str) -> bool:
        return (self.root / "blobs" / sha).exists() if self.root is not None else sha in self._blobs

    def _read(self, blob: Blob) -> bytes:
        return self._read_sha(blob.sha256)

    def _read_sha(self, sha: str) -> bytes:
        return (self.root / "blobs" / sha).read_bytes() if self.root is not None else self._blobs[sha]

    def _blob(self, data: bytes, lfs: bool) -> Blob:
        return Blob(self._store(data), len(data), git_blob_sha1(data), lfs)

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, Blob], title: str, message: str,
                    author: str) -> Commit:
        self._counter += 1
        tree = ",".join(f"{p}={b.oid}" for p, b in sorted(files.items()))
        seed = f"{self._salt}:{self._counter}:{parent}:{title}:{tree}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, files, title, message, author, _now())
        repo.commits[commit.id] = commit
        return commit

    def _new_repo(self, rtype: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(rtype, repo_id, private, _now())
        # The real Hub creates every repo with an "initial commit" holding a .gitattributes.
        first = self._new_commit(repo, None, {".gitattributes": self._blob(_GITATTRIBUTES, False)},
                                 "initial commit", "", repo.namespace)
        repo.branches["main"] = first.id
        self._repos[(rtype, repo_id)] = repo
        return repo

    def _history(self, repo: Repo, commit_id: str) -> list[Commit]:
        out, cur = [], commit_id
        while cur is not None:
            out.append(repo.commits[cur])
            cur = repo.commits[cur].parent
        return out

    def _resolve(self, repo: Repo, rev: str) -> str:
        """Branch, tag, refs/heads|tags/X, refs/pr/N or (abbreviated) commit id -> commit id."""
        rev = rev or "main"
        name = rev.split("/", 2)[2] if rev.startswith(("refs/heads/", "refs/tags/")) else rev
        if name in repo.branches:
            return repo.branches[name]
        if name in repo.tags:
            return repo.tags[name]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and 0 < int(m.group(1)) <= len(repo.prs):
            return repo.prs[int(m.group(1)) - 1]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [c for c in repo.commits if c.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # ---------------------------------------------------------------- auth
    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if token not in self.tokens:
            # Exact wording the client recognises: it then raises a plain HfHubHTTPError, not RepoNotFound.
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _repo(self, rtype: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self._repos.get((rtype, repo_id))
        if repo is None or (repo.private and user != repo.namespace):
            # Like the Hub: anonymous callers get 401, signed-in ones 404, both RepoNotFound (no existence leak).
            raise HubError(404 if user else 401, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if write and user != repo.namespace:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ---------------------------------------------------------------- routing
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(raw_path)
        # Split before decoding: revisions arrive as one percent-encoded segment ("release%2Fv2").
        parts = [unquote(p) for p in split.path.split("/") if p]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self._lock:
            if self._fail:
                status = self._fail.pop(0)
                if status:  # 0: a request let through before the failures that follow
                    raise HubError(status, f"Injected failure ({status})")
            user = self._user(headers)
            if parts[:2] == ["api", "whoami-v2"]:
                if user is None:
                    raise HubError(401, "Invalid credentials in Authorization header")
                token = {"displayName": "test", "role": "write"}
                return _json({"type": "user", "name": user, "fullname": user, "orgs": [],
                              "auth": {"type": "access_token", "accessToken": token}})
            if parts[:2] == ["api", "agent-harnesses"]:
                return _json({"standardEnvVars": [], "harnesses": {}})
            if parts[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(_load_json(body))
            if parts[:2] == ["api", "repos"] and len(parts) == 3:
                return self._repos_create_delete(method, parts[2], _load_json(body), user)
            if len(parts) >= 4 and parts[0] == "api" and parts[1] in _TYPES:
                # paths-info is a read that happens to be a POST; every other POST/DELETE writes.
                write = method in ("POST", "DELETE") and parts[4:5] != ["paths-info"]
                repo = self._repo(_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", user, write=write)
                return self._api(method, repo, parts[4:], query, body, user)
            if parts and parts[0] in ("lfs-upload", "lfs-verify") and len(parts) == 2:
                return self._lfs_object(parts[0], parts[1], body)
            rtype = "model"
            if parts and parts[0] in ("datasets", "spaces"):
                rtype, parts = _TYPES[parts[0]], parts[1:]
            if len(parts) >= 4 and parts[2] == "resolve" and method in ("GET", "HEAD"):
                repo = self._repo(rtype, f"{parts[0]}/{parts[1]}", user)
                rev, rest = _take_rev(parts[3:])
                return self._resolve_file(repo, rev, "/".join(rest), headers, user)
            if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                repo = self._repo(rtype, f"{parts[0]}/{parts[1][:-4]}", user, write=True)
                return self._lfs_batch(repo, _load_json(body))
        raise HubError(404, f"No route for {method} {split.path}")

    def _api(self, method: str, repo: Repo, rest: list[str], query: dict, body: bytes, user: str | None):
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        if method == "GET" and action in ("", "revision"):
            return self._info(repo, "/".join(args) or "main", query.get("blobs", "").lower() in ("1", "true"))
        if method == "GET" and action == "refs":
            return self._refs(repo, query.get("include_prs") in ("1", "true", "True"))
        rev, tail = _take_rev(args) if args else ("main", [])
        if method == "GET" and action == "tree":
            return _json(self._tree(repo, rev, "/".join(tail), query.get("recursive", "").lower() in ("1", "true"),
                                    query.get("expand", "").lower() in ("1", "true")))
        if method == "GET" and action == "commits":
            return _json([{"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                           "authors": [{"user": c.author, "avatar": None}]}
                          for c in self._history(repo, self._resolve(repo, rev))])
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo, rev, body)
        if method == "POST" and action == "preupload":
            return self._preupload(repo, rev, _load_json(body))
        if method == "POST" and action == "commit":
            return self._commit(repo, rev, body, query.get("create_pr") in ("1", "true", "True"), user)
        if action == "tag":
            return self._tag(method, repo, "/".join(args), _load_json(body) if method == "POST" else {})
        if action == "branch":
            return self._branch(method, repo, "/".join(args), _load_json(body) if method == "POST" else {}, user)
        raise HubError(404, f"No route for {method} /api/.../{action}")

    # ---------------------------------------------------------------- repos
    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{_PREFIX[repo_type]}{repo_id}"

    def _repos_create_delete(self, method: str, op: str, data: dict, user: str | None):
        if user is None:
            raise HubError(401, "You must be authenticated to create or delete a repository")
        rtype = _repo_type(data.get("type"))
        namespace = data.get("organization") or user
        repo_id = f"{namespace}/{data.get('name')}"
        if rtype not in _PREFIX or not data.get("name"):
            raise HubError(400, "Invalid repo type or name")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create or delete repos under {namespace}")
        url = self._repo_url(rtype, repo_id)
        if op == "create" and method == "POST":
            if (rtype, repo_id) in self._repos:
                # With exist_ok=True the client swallows this 409; the body still carries the url.
                raise HubError(409, f"You already created this {rtype} repo", body={"url": url})
            # Recent clients send visibility ("public"/"private"/"protected" Spaces), older ones `private`.
            private = data.get("visibility") == "private" or bool(data.get("private"))
            self._new_repo(rtype, repo_id, private)
            return _json({"url": url, "name": repo_id, "id": repo_id})
        if op == "delete" and method == "DELETE":
            if self._repos.pop((rtype, repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            return _json({})
        raise HubError(404, f"No route for {method} /api/repos/{op}")

    def _info(self, repo: Repo, rev: str, blobs: bool):
        commit = repo.commits[self._resolve(repo, rev)]
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sib: dict = {"rfilename": path}
            if blobs:
                sib.update(size=blob.size, blobId=blob.oid)
                if blob.lfs:
                    sib["lfs"] = {"sha256": blob.sha256, "size": blob.size,
                                  "pointerSize": len(_lfs_pointer(blob.sha256, blob.size))}
            siblings.append(sib)
        card = _card_data(self._read(commit.files["README.md"])) if "README.md" in commit.files else None
        tags = [str(t) for t in card.get("tags", [])] if card and isinstance(card.get("tags"), list) else []
        info = {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "author": repo.namespace,
                "sha": commit.id, "private": repo.private, "gated": "auto" if repo.gated else False,
                "disabled": False, "downloads": 0, "likes": 0, "tags": tags, "createdAt": repo.created,
                "lastModified": commit.date, "siblings": siblings}
        if card is not None:
            info["cardData"] = card
        if repo.type == "model":
            info["modelId"] = repo.id
        return _json(info)

    def _refs(self, repo: Repo, include_prs: bool):
        def refs(kind: str, names: dict) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in names.items()]

        # `converts` is read unconditionally by list_repo_refs.
        out = {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": []}
        if include_prs:
            out["pullRequests"] = [{"name": f"refs/pr/{i}", "ref": f"refs/pr/{i}", "targetCommit": c}
                                   for i, c in enumerate(repo.prs, 1)]
        return _json(out)

    def _tag(self, method: str, repo: Repo, name: str, data: dict):
        if method == "POST":
            commit = self._resolve(repo, name)  # URL carries the revision to tag, body the tag name
            tag = data.get("tag") or ""
            if not tag:
                raise HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit
            return _json({})
        if method == "DELETE":
            if repo.tags.pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            return _json({})
        raise HubError(405, "Method not allowed")

    def _branch(self, method: str, repo: Repo, name: str, data: dict, user: str | None):
        if method == "POST":
            if name in repo.branches:
                raise HubError(409, f"Branch {name} already exists")
            if data.get("emptyBranch"):
                repo.branches[name] = self._new_commit(repo, None, {}, "empty branch", "", user or "").id
            else:
                repo.branches[name] = self._resolve(repo, data.get("startingPoint") or "main")
            return _json({})
        if method == "DELETE":
            if name == "main":
                raise HubError(403, "Cannot delete the default branch")
            if repo.branches.pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            return _json({})
        raise HubError(405, "Method not allowed")

    def _validate_yaml(self, data: dict):
        card = _front_matter(data.get("content") or "")
        if card is not None and yaml is not None:
            try:
                parsed = yaml.safe_load(card)
            except yaml.YAMLError as err:
                raise HubError(400, "Invalid YAML", body={"errors": [{"message": str(err)}], "warnings": []})
            if parsed is not None and not isinstance(parsed, dict):
                raise HubError(400, "Invalid YAML",
                               body={"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
        return _json({"errors": [], "warnings": []})

    # ---------------------------------------------------------------- listing
    def _entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        if path in commit.files:
            blob = commit.files[path]
            entry = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size,
                                "pointerSize": len(_lfs_pointer(blob.sha256, blob.size))}
        else:
            entry = {"type": "directory", "oid": _dir_oid(commit.files, path), "size": 0, "path": path}
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return entry

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        """The oldest commit in the unbroken run of ancestors where `path` looked as it does now."""
        def state(c: Commit):
            return c.files[path].oid if path in c.files else _dir_oid(c.files, path)
        last, want = commit, state(commit)
        for older in self._history(repo, commit.id)[1:]:
            if state(older) != want:
                break
            last = older
        return last

    def _tree(self, repo: Repo, rev: str, path: str, recursive: bool, expand: bool) -> list[dict]:
        commit = repo.commits[self._resolve(repo, rev)]
        path = path.strip("/")
        prefix = path + "/" if path else ""
        below = [p for p in commit.files if p.startswith(prefix)]
        if path and not below:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound",
                           headers={"X-Repo-Commit": commit.id})
        names: set[str] = set()
        for p in below:
            rel = p[len(prefix):].split("/")
            if recursive:
                names.update(prefix + "/".join(rel[: i + 1]) for i in range(len(rel)))
            else:
                names.add(prefix + rel[0])
        # Directories first, then files, each by name: the order the Hub's non-recursive listing uses.
        ordered = sorted(names, key=lambda n: (n in commit.files, n))
        return [self._entry(repo, commit, n, expand) for n in ordered]

    def _paths_info(self, repo: Repo, rev: str, body: bytes):
        form = parse_qs(body.decode())  # form-encoded: paths=a&paths=b&expand=True
        commit = repo.commits[self._resolve(repo, rev)]
        expand = form.get("expand", [""])[-1].lower() in ("1", "true")
        out = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files or any(p.startswith(path + "/") for p in commit.files):
                out.append(self._entry(repo, commit, path, expand))
        return _json(out)

    # ---------------------------------------------------------------- uploads
    def _preupload(self, repo: Repo, rev: str, data: dict):
        commit = repo.commits[self._resolve(repo, rev)]
        out = []
        for f in data.get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            sample = base64.b64decode(f.get("sample") or "")
            lfs = path.endswith(_LFS_SUFFIXES) or size > _LFS_MIN_SIZE or b"\0" in sample
            item = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            old = commit.files.get(path)
            if old is not None:
                # The client compares this with its own sha256 (lfs) / git sha1 (regular) and drops unchanged files.
                item["oid"] = old.sha256 if lfs else old.sha1
            out.append(item)
        return _json({"files": out, "commitOid": commit.id})

    def _lfs_batch(self, repo: Repo, data: dict):
        objects = []
        for obj in data.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item = {"oid": oid, "size": size}
            if not self._has(oid):  # no `actions` means "already there, skip the upload"
                item["authenticated"] = True
                item["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{oid}"},
                                   "verify": {"href": f"{self.url}/lfs-verify/{oid}"}}
            objects.append(item)
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, json.dumps(
            {"transfer": "basic", "objects": objects}).encode()

    def _lfs_object(self, kind: str, oid: str, body: bytes):
        if kind == "lfs-upload":  # stands in for the signed S3 URL: no auth, but content must match the oid
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "Uploaded content does not match its sha256 oid")
            self._store(body)
            return 200, {}, b""
        data = _load_json(body)
        if not self._has(oid) or len(self._read_sha(oid)) != int(data.get("size", -1)):
            raise HubError(404, f"LFS object {oid} not found")
        return _json({"success": True})

    def _commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool, user: str | None):
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Commit payload is not NDJSON")
        header = next((x["value"] for x in lines if x.get("key") == "header"), {})
        if rev not in repo.branches and not re.fullmatch(r"refs/pr/\d+", rev):
            self._resolve(repo, rev)  # 404 RevisionNotFound if it does not exist at all
            raise HubError(400, f"Cannot commit to {rev}: not a branch")
        head = self._resolve(repo, rev)
        parent = header.get("parentCommit")
        if parent and not create_pr and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        base = self._resolve(repo, parent) if (parent and create_pr) else head
        files = dict(repo.commits[base].files)
        for item in lines:
            key, value = item.get("key"), item.get("value") or {}
            path = value.get("path", "")
            if key == "file":
                files[path] = self._blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                if not self._has(value["oid"]):
                    raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
                data = self._read_sha(value["oid"])  # copies omit `size`: take it from the stored object
                files[path] = Blob(value["oid"], len(data), git_blob_sha1(data), True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                gone = [p for p in files if p.startswith(prefix)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del files[p]
            elif key != "header":
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self._new_commit(repo, base, files, header.get("summary") or "Upload files",
                                  header.get("description") or "", user or "")
        out = {"success": True, "commitOid": commit.id,
               "commitUrl": f"{self._repo_url(repo.type, repo.id)}/commit/{commit.id}"}
        if create_pr:
            repo.prs.append(commit.id)
            out["pullRequestUrl"] = f"{self._repo_url(repo.type, repo.id)}/discussions/{len(repo.prs)}"
        elif rev.startswith("refs/pr/"):
            repo.prs[int(rev.rsplit("/", 1)[1]) - 1] = commit.id
        else:
            repo.branches[rev] = commit.id
        return _json(out)

    # ---------------------------------------------------------------- downloads
    def _resolve_file(self, repo: Repo, rev: str, path: str, headers, user: str | None):
        commit = self._resolve(repo, rev)
        if repo.gated and user != repo.namespace:
            raise HubError(403, "Access to this gated repo is restricted", "GatedRepo")
        blob = repo.commits[commit].files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the absence of the file (.no_exist).
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit})
        out = {"X-Repo-Commit": commit, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
        if blob.lfs:
            out.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        data = self._read(blob)
        rng = headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                raise HubError(416, "Malformed range", headers={"Content-Range": f"bytes */{len(data)}"})
            if m.group(1) == "":  # suffix range: the last N bytes
                start, end = max(0, len(data) - int(m.group(2))), len(data) - 1
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            if start >= len(data) or end < start:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(data)}"})
            out["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, out, data[start:end + 1]
        return 200, out, data


# -------------------------------------------------------------------- HTTP plumbing
def _front_matter(text: str) -> str | None:
    m = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.DOTALL)
    return m.group(1) if m else None


def _card_data(readme: bytes) -> dict | None:
    card = _front_matter(readme.decode("utf-8", "replace"))
    if card is None or yaml is None:
        return None
    try:
        parsed = yaml.safe_load(card)
    except yaml.YAMLError:
        return None
    return json.loads(json.dumps(parsed, default=str)) if isinstance(parsed, dict) else None


def _dir_oid(files: dict[str, Blob], path: str) -> str:
    prefix = path + "/" if path else ""
    listing = "".join(f"{p}\0{b.oid}\n" for p, b in sorted(files.items()) if p.startswith(prefix))
    return hashlib.sha1(b"tree " + listing.encode()).hexdigest()


def _take_rev(parts: list[str]) -> tuple[str, list[str]]:
    """Split a revision off path segments. Clients percent-encode it into one segment, but HfFileSystem
    leaves refs/pr/N unencoded on resolve URLs, so unencoded refs/<kind>/<name> is taken as a whole."""
    if len(parts) >= 3 and parts[0] == "refs" and parts[1] in ("pr", "convert", "heads", "tags"):
        return "/".join(parts[:3]), parts[3:]
    return parts[0], parts[1:]


def _load_json(body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise HubError(400, "Body is not valid JSON")
    return data if isinstance(data, dict) else {}


def _json(obj, status: int = 200) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # clients upload with 5 threads and download with 8

    def __init__(self, address, handler, hub: HubServer):
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Drop idle keep-alive connections so handler threads end with the server."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every response carries an exact Content-Length
    timeout = 60
    server: _Server

    def log_message(self, format, *args):  # silence stderr; never log headers (they carry tokens)
        pass

    def _body(self) -> bytes:
        # Always consume the whole body: leftovers would corrupt the next request on this connection.
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.server.hub
        body = self._body()
        with hub._lock:
            hub.requests.append((self.command, self.path))
        try:
            status, headers, payload = hub.handle(self.command, self.path, self.headers, body)
        except HubError as err:
            status, headers = err.status, dict(err.headers)
            payload = json.dumps({"error": err.message, **(err.body or {})}).encode()
            headers.update({"Content-Type": "application/json", "X-Error-Message": err.message})
            if err.code:
                headers["X-Error-Code"] = err.code
        except Exception as err:  # a server bug: report it to the client and to the test output
            traceback.print_exc(file=sys.stderr)
            status, headers, payload = 500, {"X-Error-Message": f"hubserver bug: {err!r}"}, repr(err).encode()
        self.send_response(status)
        for key, value in headers.items():
            # Header values must be one latin-1 line (messages can quote unicode paths).
            value = str(value).replace("\r", " ").replace("\n", " ")
            self.send_header(key, value.encode("latin-1", "backslashreplace").decode("latin-1"))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


# -------------------------------------------------------------------- client wiring
def point_clients_at(url: str, monkeypatch, tmp_path: Path, token: str | None = TEST_TOKEN) -> None:
    """Point the real huggingface_hub and datasets clients at `url`, with fresh caches under tmp_path.

    Both libraries read HF_ENDPOINT, caches and offline mode at import time, so setting the environment is
    not enough: the captured module constants are patched too (monkeypatch undoes everything)."""
    import huggingface_hub
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager, _http

    home = tmp_path / "hf-home"
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "HF_HUB_OFFLINE": "0",
           "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_DATASETS_CACHE": str(home / "datasets"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_TOKEN": token or ""}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(key, raising=False)

    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(home / "hub"), raising=False)
    # The module-level HfApi behind huggingface_hub.create_repo & co. captured the endpoint when it was built.
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)}, raising=False)
    try:  # agent detection would otherwise fetch a registry from the endpoint on first use
        from huggingface_hub.utils import _detect_agent
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY, raising=False)
    except ImportError:  # pragma: no cover
        pass
    try:  # transformers keeps one HfApi, built with the endpoint of the time it was first used
        import transformers.utils.hub as transformers_hub
        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)
    except ImportError:  # pragma: no cover
        pass
    from huggingface_hub.utils._hf_uris import parse_hf_uri
    parse_hf_uri.cache_clear()  # it is lru-cached on arguments and reads HF_URL_HOSTS
    huggingface_hub.HfFileSystem.clear_instance_cache()

    try:
        import datasets.config as dconfig
    except ImportError:  # pragma: no cover - datasets is optional for huggingface_hub-only tests
        return
    for name, value in {
        "HF_ENDPOINT": url,
        "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HUB_DATASETS_HFFS_URL": "hf://datasets/{repo_id}@{revision}/{path}",
        "USE_PARQUET_EXPORT": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": home / "datasets",
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
    }.items():
        monkeypatch.setattr(dconfig, name, value, raising=False)


def set_offline(monkeypatch, offline: bool = True) -> None:
    """Switch both clients' (import-time captured) offline mode, e.g. to prove a download is served from cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    try:
        import datasets.config as dconfig
    except ImportError:  # pragma: no cover
        return
    monkeypatch.setattr(dconfig, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(dconfig, "HF_DATASETS_OFFLINE", offline)

"""A local Hugging Face Hub-protocol server for tests and benchmarks (127.0.0.1 only, random port).

It implements the endpoints ``huggingface_hub`` 2.x calls for ``create_repo``, ``upload_folder`` /
``create_commit`` (preupload, Git LFS batch API + upload hrefs, NDJSON commit), ``create_tag``, ``delete_tag``,
``create_branch``, ``list_repo_refs``, ``repo_info`` / ``model_info``, ``list_repo_tree``,
``hf_hub_download`` and ``snapshot_download`` (HEAD/GET ``/{repo}/resolve/{rev}/{path}``), with repos,
commits, branches and tags kept per repo, the way the real Hub answers them:

* preupload answers ``lfs`` for binaries (``.safetensors``, ``.bin``, ``.pt``, ... or a non-UTF-8
  sample) and ``regular`` for text, and returns the ``oid`` of a file already at that revision so the
  client can skip unchanged files;
* LFS objects go through ``POST /{repo}.git/info/lfs/objects/batch`` and the ``PUT`` upload href it
  returns (sha256 and size checked on receipt), objects already stored get no ``actions``;
* resolve answers ``ETag`` (git blob sha1, or the sha256 for LFS files, also as ``X-Linked-Etag``) and
  ``X-Repo-Commit``.

Test knobs:

* :meth:`HubServer.fail` — make the Nth request of a kind answer a status (500) or drop the connection,
  before or after the server has acted on it (``when="after"`` simulates a lost response);
* :meth:`HubServer.tamper` — resolve GETs return bytes with one byte flipped (same size);
* :meth:`HubServer.hostile` — a hostile Hub for resolve answers of some paths (``clear_hostile()`` ends it):
  ``headers={...}`` overrides answer headers (``ETag``, ``X-Repo-Commit``, ``X-Linked-Etag``,
  ``X-Linked-Size``, ``Content-Length``; ``None`` removes one), ``redirect=URL`` answers 302 with that
  ``Location``, ``body=bytes|int`` replaces a GET body (an int: that many junk bytes, streamed),
  ``trickle=SECONDS`` sends the GET body one byte at a time, ``close_after_body=True`` (with
  ``headers={"Content-Length": None}``) sends a body of unannounced length; ``methods=("HEAD",)`` or
  ``("GET",)`` limits the rule to one method (a server that says one thing on HEAD and another on GET);
* :attr:`HubServer.requests` — every request (method, path, kind, headers, body, status), with
  :meth:`HubServer.uploaded_bytes` for the file bytes a push sent;
* :attr:`HubServer.token` — when set, writes (and reads of private repos) need that bearer token.

Use the :func:`hub_server` fixture: it starts a server, points ``huggingface_hub`` at it through
``HF_ENDPOINT`` (plus ``HF_HUB_DISABLE_XET=1``, a temporary ``HF_HOME`` / ``HF_HUB_CACHE``, and no
offline mode) and stops it afterwards.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npy", ".npz", ".h5", ".onnx", ".msgpack")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The Git LFS pointer file that stands in for an LFS object in the git tree."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class FileEntry:
    """One file in a commit's tree: regular files keep their bytes, LFS files their sha256."""

    path: str
    size: int
    content: bytes | None = None  # regular files
    lfs_oid: str | None = None  # LFS files (sha256 hex)

    @property
    def blob_id(self) -> str:
        if self.lfs_oid is not None:
            return git_blob_sha1(lfs_pointer(self.lfs_oid, self.size))
        assert self.content is not None
        return git_blob_sha1(self.content)

    @property
    def etag(self) -> str:
        return self.lfs_oid if self.lfs_oid is not None else self.blob_id


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, FileEntry]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo (per-repo, like git LFS)

    def resolve(self, rev: str) -> str | None:
        """Branch, tag, full commit id or a 7+ hex prefix -> commit id (None when unknown)."""
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if rev in self.commits:
            return rev
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            hits = [c for c in self.commits if c.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None


@dataclass
class RecordedRequest:
    """One request as the server saw it (header names lower-cased)."""

    method: str
    path: str
    query: str
    kind: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    uploaded: int = 0  # file bytes this request carried that the server accepted (LFS PUT, inline commit files)


@dataclass
class _Fault:
    kind: str
    nth: int
    status: int
    mode: str  # "status" | "drop"
    when: str  # "before" | "after"
    times: int
    seen: int = 0
    fired: int = 0


@dataclass
class Hostile:
    """One hostile-answer rule for resolve requests (see :meth:`HubServer.hostile`); ``hits`` counts uses."""

    paths: set[str]
    methods: tuple[str, ...]
    headers: dict[str, str | None]
    redirect: str | None
    trickle: float | None
    body: bytes | int | None
    close_after_body: bool
    hits: int = 0


@dataclass
class _HostileBody:
    data: bytes | int
    trickle: float | None
    close: bool


class _Dropped(Exception):
    """Raised inside a handler to close the connection without answering."""


class HubServer:
    """A threaded Hub-protocol HTTP server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, *, token: str | None = None, record_bodies: bool = True, nodelay: bool = True) -> None:
        """``nodelay``: answer with TCP_NODELAY (each request costs about a millisecond on the loopback). With
        False a reply's headers and body go out as two small writes under Nagle's algorithm, and the client's
        delayed ACK holds the body back: about 40 ms per request with a body, like a network round trip —
        what ``benchmarks/scale.py`` also measures the Hub operations under."""
        self.nodelay = nodelay
        self.token = token
        self.user = "hubtester"
        self.record_bodies = record_bodies
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[RecordedRequest] = []
        self.tamper_paths: set[str] | None = None  # None: off; empty set: every file
        self.hostile_rules: list[Hostile] = []  # hostile answers to resolve requests (see hostile())
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        if isinstance(host, bytes):  # the typing allows bytes; an AF_INET server gives a str
            host = host.decode()
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server
            disable_nagle_algorithm = server.nodelay

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ knobs
    def fail(self, kind: str, *, nth: int = 1, status: int = 500, mode: str = "status",
             when: str = "before", times: int = 1) -> None:
        """Make the ``nth`` request of ``kind`` from now on (and the ``times - 1`` after it) fail.

        kinds: create_repo, validate_yaml, preupload, lfs_batch, lfs_upload, lfs_verify, commit, tag,
        delete_tag, branch, refs, info, tree, resolve.  ``mode="status"`` answers ``status``; ``mode="drop"`` closes
        the connection without a response.  ``when="after"`` acts on the request first, then fails (a
        commit that happened but whose answer was lost).
        """
        assert mode in ("status", "drop") and when in ("before", "after")
        with self._lock:
            self._faults.append(_Fault(kind, nth, status, mode, when, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def tamper(self, *paths: str) -> None:
        """Serve resolve GETs of ``paths`` (all files when none given) with one byte flipped."""
        self.tamper_paths = set(paths)

    def untamper(self) -> None:
        self.tamper_paths = None

    def hostile(self, *paths: str, methods: tuple[str, ...] = ("HEAD", "GET"),
                headers: dict[str, str | None] | None = None, redirect: str | None = None,
                trickle: float | None = None, body: bytes | int | None = None,
                close_after_body: bool = False) -> "Hostile":
        """Make resolve answers for ``paths`` (every file when none given) hostile; returns the rule.

        ``headers`` overrides answer headers (``None`` removes one): e.g. ``ETag``, ``X-Repo-Commit``,
        ``X-Linked-Etag``, ``X-Linked-Size``, ``Content-Length``. ``redirect`` answers ``302`` with that
        ``Location``. ``body`` replaces a GET body (bytes, or an int: that many junk bytes, streamed);
        ``trickle`` sends the GET body one byte every ``trickle`` seconds. ``close_after_body`` closes the
        connection after the body (use with ``headers={"Content-Length": None}`` for a body of unknown length).
        """
        rule = Hostile(set(paths), tuple(m.upper() for m in methods), dict(headers or {}), redirect, trickle, body,
                       close_after_body)
        with self._lock:
            self.hostile_rules.append(rule)
        return rule

    def clear_hostile(self) -> None:
        with self._lock:
            self.hostile_rules.clear()

    # ------------------------------------------------------------------ introspection
    def kinds(self, since: int = 0) -> Counter[str]:
        """How many requests of each kind were made since request index ``since``."""
        return Counter(r.kind for r in self.requests[since:])

    def uploaded_bytes(self, since: int = 0) -> int:
        """File bytes pushed since request index ``since``: LFS PUT bodies + inline (regular) file contents."""
        return sum(r.uploaded for r in self.requests[since:])

    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits of ``branch``, newest first."""
        repo = self.repos[repo_id]
        out: list[Commit] = []
        oid: str | None = repo.branches.get(branch)
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out

    def file_bytes(self, repo_id: str, rev: str, path: str) -> bytes:
        repo = self.repos[repo_id]
        oid = repo.resolve(rev)
        assert oid is not None, rev
        entry = repo.commits[oid].files[path]
        return self._entry_bytes(entry)

    # ------------------------------------------------------------------ direct state (for crafting tests)
    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        with self._lock:
            if repo_id in self.repos:
                return self.repos[repo_id]
            repo = Repo(repo_id=repo_id, private=private)
            self.repos[repo_id] = repo
            init = self._new_commit(repo, None, "initial commit",
                                    {".gitattributes": FileEntry(".gitattributes", len(GITATTRIBUTES), GITATTRIBUTES)})
            repo.branches["main"] = init.oid
            return repo

    def commit_files(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main",
                     message: str = "crafted commit") -> str:
        """Commit ``files`` straight into the server state (LFS for binaries); returns the commit id."""
        with self._lock:
            repo = self.create_repo(repo_id)
            head = repo.branches[branch]
            tree = dict(repo.commits[head].files)
            for path, data in files.items():
                if self._is_lfs(path, data[:512]):
                    oid = hashlib.sha256(data).hexdigest()
                    self.lfs_objects[oid] = data
                    repo.lfs_oids.add(oid)
                    tree[path] = FileEntry(path, len(data), lfs_oid=oid)
                else:
                    tree[path] = FileEntry(path, len(data), content=data)
            commit = self._new_commit(repo, head, message, tree)
            repo.branches[branch] = commit.oid
            return commit.oid

    def create_tag(self, repo_id: str, tag: str, rev: str = "main") -> None:
        with self._lock:
            repo = self.repos[repo_id]
            oid = repo.resolve(rev)
            assert oid is not None
            repo.tags[tag] = oid

    # ------------------------------------------------------------------ internals
    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, FileEntry]) -> Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_id, parent, message, sorted((p, f.etag) for p, f in files.items()),
                           self._counter, time.time()]).encode()
        oid = hashlib.sha1(seed).hexdigest()
        commit = Commit(oid, parent, message, files, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[oid] = commit
        return commit

    @staticmethod
    def _is_lfs(path: str, sample: bytes) -> bool:
        if path.endswith(LFS_SUFFIXES):
            return True
        try:
            sample.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    def _entry_bytes(self, entry: FileEntry) -> bytes:
        if entry.lfs_oid is not None:
            return self.lfs_objects[entry.lfs_oid]
        assert entry.content is not None
        return entry.content

    def _hostile_rule(self, path: str, method: str) -> "Hostile | None":
        with self._lock:
            for rule in self.hostile_rules:
                if method in rule.methods and (not rule.paths or path in rule.paths):
                    return rule
        return None

    def _check_fault(self, kind: str, when: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind != kind or fault.when != when:
                    continue
                fault.seen += 1
                if fault.seen >= fault.nth and fault.fired < fault.times:
                    fault.fired += 1
                    return fault
        return None


# ---------------------------------------------------------------------- HTTP handling
_API = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<owner>[^/]+)/(?P<name>[^/]+)(?:/(?P<rest>.*))?$")
_RESOLVE = re.compile(r"^/(?P<owner>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_LFS_BATCH = re.compile(r"^/(?P<owner>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects/batch$")
_LFS_UPLOAD = re.compile(r"^/_lfs/upload/(?P<owner>[^/]+)/(?P<name>[^/]+)/(?P<oid>[0-9a-f]{64})$")
_LFS_VERIFY = re.compile(r"^/_lfs/verify/(?P<owner>[^/]+)/(?P<name>[^/]+)$")


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _authorized(self) -> bool:
        token = self.hub.token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    def _require_write(self) -> None:
        if not self._authorized():
            raise _HTTPError(401, "Invalid credentials in Authorization header")

    def _repo(self, owner: str, name: str, *, write: bool = False) -> Repo:
        repo_id = f"{unquote(owner)}/{unquote(name)}"
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        if write:
            self._require_write()
        return repo

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        oid = repo.resolve(unquote(rev))
        if oid is None:
            raise _HTTPError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return repo.commits[oid]

    def _kind(self, method: str, path: str) -> str:
        if path == "/api/repos/create":
            return "create_repo"
        if path == "/api/validate-yaml":
            return "validate_yaml"
        if path == "/api/whoami-v2":
            return "whoami"
        if path == "/api/agent-harnesses":
            return "agent_harnesses"
        if _LFS_BATCH.match(path):
            return "lfs_batch"
        if _LFS_UPLOAD.match(path):
            return "lfs_upload"
        if _LFS_VERIFY.match(path):
            return "lfs_verify"
        m = _API.match(path)
        if m:
            rest = m.group("rest") or ""
            head = rest.split("/", 1)[0]
            if head == "tag" and method == "DELETE":
                return "delete_tag"
            return {"preupload": "preupload", "commit": "commit", "tag": "tag", "branch": "branch",
                    "refs": "refs", "revision": "info", "tree": "tree", "": "info"}.get(head, "api_other")
        if _RESOLVE.match(path):
            return "resolve"
        return "other"

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = split.path, split.query
        body = self._read_body() if method in ("POST", "PUT") else b""
        kind = self._kind(method, path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        headers["x-body-length"] = str(len(body))
        record = RecordedRequest(method, path, query, kind, headers, body if self.hub.record_bodies else b"")
        with self.hub._lock:
            self.hub.requests.append(record)
        try:
            fault = self.hub._check_fault(kind, "before")
            if fault is not None:
                record.status = fault.status if fault.mode == "status" else -1
                if fault.mode == "drop":
                    raise _Dropped()
                self._json(fault.status, {"error": f"injected fault on {kind}"})
                return
            with self.hub._lock:
                status, payload, extra, ctype = self._route(method, path, parse_qs(query), body)
            fault = self.hub._check_fault(kind, "after")
            if fault is not None:
                record.status = fault.status if fault.mode == "status" else -1
                if fault.mode == "drop":
                    raise _Dropped()
                self._json(fault.status, {"error": f"injected fault on {kind}"})
                return
            record.status = status
            if status == 200 and kind == "lfs_upload":
                record.uploaded = len(body)
            elif status == 200 and kind == "commit":
                for line in body.splitlines():
                    item = json.loads(line) if line.strip() else {}
                    if item.get("key") == "file":
                        record.uploaded += len(base64.b64decode(item["value"]["content"]))
            if isinstance(payload, _HostileBody):
                self._send_hostile(status, payload, extra, ctype, head=(method == "HEAD"))
                return
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            if method == "HEAD":
                extra = {**extra, "Content-Length": extra.get("Content-Length", str(len(data)))}
            self._send(status, data, extra, ctype, head=(method == "HEAD"))
        except _Dropped:
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
        except _HTTPError as e:
            record.status = e.status
            hdrs = {"X-Error-Message": e.message}
            if e.code:
                hdrs["X-Error-Code"] = e.code
            self._send(e.status, b"" if method == "HEAD" else json.dumps({"error": e.message}).encode(),
                       hdrs, head=(method == "HEAD"))

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- routes; return (status, payload, headers, content type)
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes
               ) -> tuple[int, Any, dict[str, str], str]:
        hub = self.hub
        base = hub.url
        ok: dict[str, str] = {}
        jtype = "application/json"
        if path == "/api/repos/create" and method == "POST":
            self._require_write()
            req = json.loads(body or b"{}")
            name, org = req.get("name"), req.get("organization")
            if not name or not org:
                raise _HTTPError(400, "name and organization are required")
            repo_id = f"{org}/{name}"
            if req.get("type") not in (None, "model"):
                raise _HTTPError(400, "this test server only serves model repos")
            if repo_id in hub.repos:
                return 409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"}, ok, jtype
            hub.create_repo(repo_id, private=req.get("visibility") == "private" or bool(req.get("private")))
            return 200, {"url": f"{base}/{repo_id}", "name": repo_id}, ok, jtype
        if path == "/api/whoami-v2" and method == "GET":
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not self._authorized():
                raise _HTTPError(401, "Invalid credentials in Authorization header")
            return 200, {"type": "user", "name": hub.user, "auth": {"type": "access_token"}}, ok, jtype
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path == "/api/agent-harnesses" and method == "GET":
            # huggingface_hub's telemetry fetches this registry once a day per cache (for its User-Agent): empty
            return 200, {"standardEnvVars": [], "harnesses": {}}, ok, jtype

        m = _LFS_BATCH.match(path)
        if m and method == "POST":
            repo = self._repo(m["owner"], m["name"], write=True)
            req = json.loads(body or b"{}")
            if req.get("operation") != "upload":
                raise _HTTPError(400, "only the upload operation is supported")
            objects = []
            for obj in req.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in repo.lfs_oids:
                    entry["actions"] = {
                        "upload": {"href": f"{base}/_lfs/upload/{quote(repo.repo_id, safe='/')}/{oid}"},
                        "verify": {"href": f"{base}/_lfs/verify/{quote(repo.repo_id, safe='/')}"},
                    }
                objects.append(entry)
            return 200, {"transfer": "basic", "objects": objects}, ok, "application/vnd.git-lfs+json"
        m = _LFS_UPLOAD.match(path)
        if m and method == "PUT":
            # like a pre-signed S3 URL: no Authorization header expected here
            oid = m["oid"]
            repo_id = f"{unquote(m['owner'])}/{unquote(m['name'])}"
            if repo_id not in hub.repos:
                raise _HTTPError(404, "Repository not found", "RepoNotFound")
            if hashlib.sha256(body).hexdigest() != oid:
                raise _HTTPError(400, "sha256 of the uploaded body does not match the object id")
            hub.lfs_objects[oid] = body
            hub.repos[repo_id].lfs_oids.add(oid)
            return 200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, "text/plain"
        m = _LFS_VERIFY.match(path)
        if m and method == "POST":
            vrepo = self._repo(m["owner"], m["name"], write=True)
            req = json.loads(body or b"{}")
            obj = hub.lfs_objects.get(req.get("oid", "")) if req.get("oid") in vrepo.lfs_oids else None
            if obj is None or len(obj) != int(req.get("size", -1)):
                raise _HTTPError(404, "object not found or wrong size")
            return 200, {}, ok, jtype

        m = _RESOLVE.match(path)
        if m and method in ("GET", "HEAD"):
            return self._resolve(m, method)

        m = _API.match(path)
        if m:
            if m["type"] != "models":
                raise _HTTPError(404, "Repository not found", "RepoNotFound")
            rest = m["rest"] or ""
            parts = rest.split("/")
            head = parts[0]
            if method == "GET" and rest == "":
                repo = self._repo(m["owner"], m["name"])
                return 200, self._info(repo, self._commit_of(repo, "main")), ok, jtype
            if method == "GET" and head == "revision" and len(parts) == 2:
                repo = self._repo(m["owner"], m["name"])
                return 200, self._info(repo, self._commit_of(repo, parts[1])), ok, jtype
            if method == "GET" and head == "refs":
                repo = self._repo(m["owner"], m["name"])
                def refs(d: dict[str, str], prefix: str) -> list[dict[str, str]]:
                    return [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": c} for n, c in sorted(d.items())]
                return 200, {"branches": refs(repo.branches, "heads"), "converts": [],
                             "tags": refs(repo.tags, "tags"), "pullRequests": []}, ok, jtype
            if method == "GET" and head == "tree" and len(parts) >= 2:
                repo = self._repo(m["owner"], m["name"])
                commit = self._commit_of(repo, parts[1])
                prefix = unquote("/".join(parts[2:])).strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return 200, self._tree(commit, prefix, recursive), ok, jtype
            if method == "POST" and head == "preupload" and len(parts) == 2:
                repo = self._repo(m["owner"], m["name"], write=True)
                commit = self._commit_of(repo, parts[1])
                req = json.loads(body or b"{}")
                files = []
                for f in req.get("files", []):
                    sample = base64.b64decode(f.get("sample", ""))
                    existing = commit.files.get(f["path"])
                    files.append({"path": f["path"], "uploadMode": "lfs" if hub._is_lfs(f["path"], sample) else "regular",
                                  "shouldIgnore": False, "oid": existing.etag if existing else None})
                return 200, {"files": files, "commitOid": commit.oid}, ok, jtype
            if method == "POST" and head == "commit" and len(parts) == 2:
                repo = self._repo(m["owner"], m["name"], write=True)
                return self._commit(repo, unquote(parts[1]), body)
            if method == "POST" and head == "tag" and len(parts) == 2:
                repo = self._repo(m["owner"], m["name"], write=True)
                commit = self._commit_of(repo, parts[1])
                tag = json.loads(body or b"{}").get("tag")
                if not tag:
                    raise _HTTPError(400, "tag is required")
                if tag in repo.tags:
                    raise _HTTPError(409, f"Tag {tag} already exists")
                repo.tags[tag] = commit.oid
                return 200, {}, ok, jtype
            if method == "DELETE" and head == "tag" and len(parts) == 2:  # huggingface_hub delete_tag
                repo = self._repo(m["owner"], m["name"], write=True)
                tag = unquote(parts[1])
                if tag not in repo.tags:
                    raise _HTTPError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
                del repo.tags[tag]
                return 200, {}, ok, jtype
            if method == "POST" and head == "branch" and len(parts) == 2:
                repo = self._repo(m["owner"], m["name"], write=True)
                branch = unquote(parts[1])
                if branch in repo.branches:
                    raise _HTTPError(409, f"Branch {branch} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[branch] = self._commit_of(repo, start).oid
                return 200, {}, ok, jtype
        raise _HTTPError(404, f"no route for {method} {path}")

    def _validate_yaml(self, req: dict[str, Any]) -> tuple[int, Any, dict[str, str], str]:
        import yaml

        content = req.get("content", "")
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                return 400, {"errors": [{"message": "unterminated YAML front matter"}]}, {}, "application/json"
            try:
                data = yaml.safe_load(content[3:end])
            except yaml.YAMLError as e:
                return 400, {"errors": [{"message": f"invalid YAML: {e}"}]}, {}, "application/json"
            if data is not None and not isinstance(data, dict):
                return 400, {"errors": [{"message": "metadata must be a mapping"}]}, {}, "application/json"
        return 200, {"errors": [], "warnings": []}, {}, "application/json"

    def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        return {"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": commit.oid, "private": repo.private, "lastModified": commit.date,
                "tags": [], "siblings": [{"rfilename": p} for p in sorted(commit.files)]}

    def _tree(self, commit: Commit, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p, entry in sorted(commit.files.items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rel = p[len(prefix) + 1:] if prefix else p
            if "/" in rel and not recursive:
                dirs.add((prefix + "/" if prefix else "") + rel.split("/", 1)[0])
                continue
            if recursive:
                parts = p.split("/")[:-1]
                for i in range(len(prefix.split("/")) if prefix else 0, len(parts)):
                    dirs.add("/".join(parts[: i + 1]))
            item: dict[str, Any] = {"type": "file", "path": p, "size": entry.size, "oid": entry.blob_id}
            if entry.lfs_oid is not None:
                item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size,
                               "pointerSize": len(lfs_pointer(entry.lfs_oid, entry.size))}
            out.append(item)
        for d in sorted(dirs):
            out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0})
        return out

    def _commit(self, repo: Repo, branch: str, body: bytes) -> tuple[int, Any, dict[str, str], str]:
        if branch not in repo.branches:
            raise _HTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HTTPError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        head = repo.branches[branch]
        parent_req = header.get("parentCommit")
        if parent_req and not head.startswith(parent_req):
            raise _HTTPError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(repo.commits[head].files)
        for item in lines[1:]:
            key, value = item.get("key"), item.get("value", {})
            p = value.get("path", "")
            if not p or p.startswith("/") or ".." in p.split("/"):
                raise _HTTPError(400, f"invalid path {p!r}")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HTTPError(400, "only base64 encoding is supported")
                data = base64.b64decode(value["content"])
                tree[p] = FileEntry(p, len(data), content=data)
            elif key == "lfsFile":
                oid = value["oid"]
                obj = self.hub.lfs_objects.get(oid) if oid in repo.lfs_oids else None
                if obj is None or len(obj) != int(value["size"]):
                    raise _HTTPError(422, f"LFS object {oid} for {p} was never uploaded")
                tree[p] = FileEntry(p, len(obj), lfs_oid=oid)
            elif key == "deletedFile":
                if p not in tree:
                    raise _HTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
                del tree[p]
            elif key == "deletedFolder":
                for q in [q for q in tree if q.startswith(p.rstrip("/") + "/")]:
                    del tree[q]
            else:
                raise _HTTPError(400, f"unsupported commit operation {key!r}")
        message = header.get("summary") or "commit"
        commit = self.hub._new_commit(repo, head, message, tree)
        repo.branches[branch] = commit.oid
        base = self.hub.url
        return 200, {"success": True, "commitOid": commit.oid, "commitUrl": f"{base}/{repo.repo_id}/commit/{commit.oid}",
                     "pullRequestUrl": None}, {}, "application/json"

    def _resolve(self, m: re.Match[str], method: str) -> tuple[int, Any, dict[str, str], str]:
        repo = self._repo(m["owner"], m["name"])
        commit = self._commit_of(repo, m["rev"])
        rel = unquote(m["path"])
        entry = commit.files.get(rel)
        if entry is None:
            err = _HTTPError(404, "Entry not found", "EntryNotFound")
            raise err
        data = self.hub._entry_bytes(entry)
        tamper = self.hub.tamper_paths
        if method == "GET" and tamper is not None and (not tamper or rel in tamper) and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:] if len(data) < 2 else data[:-1] + bytes([data[-1] ^ 0xFF])
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs_oid is not None:
            headers["X-Linked-Etag"] = f'"{entry.lfs_oid}"'
            headers["X-Linked-Size"] = str(entry.size)
        rng = self.headers.get("Range")
        status = 200
        if method == "GET" and rng:
            mr = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if mr:
                start = int(mr[1])
                end = int(mr[2]) if mr[2] else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data = data[start:end + 1]
                status = 206
        if method == "HEAD":
            headers["Content-Length"] = str(entry.size)
        rule = self.hub._hostile_rule(rel, method)
        if rule is None:
            return status, data, headers, "application/octet-stream"
        rule.hits += 1
        if rule.redirect is not None:
            return 302, b"", {**headers, "Location": rule.redirect, "Content-Length": "0"}, "text/plain"
        # an int body is a size: the hostile answer streams that many filler bytes (_HostileBody)
        body: bytes | int = rule.body if rule.body is not None and method == "GET" else data
        size = body if isinstance(body, int) else len(body)
        if method == "GET":
            headers["Content-Length"] = str(size)
        for key, value in rule.headers.items():
            headers.pop(key, None)
            if value is not None:
                headers[key] = value
        if method == "GET" and (rule.trickle is not None or isinstance(body, int) or rule.close_after_body):
            return status, _HostileBody(body, rule.trickle, rule.close_after_body), headers, "application/octet-stream"
        if method == "GET" and "Content-Length" not in headers:
            headers["Content-Length"] = str(size)  # a plain answer always says its length
        return status, body, headers, "application/octet-stream"

    def _send_hostile(self, status: int, body: "_HostileBody", headers: dict[str, str], content_type: str,
                      head: bool) -> None:
        """Send a slow, endless-looking or oversized body (headers exactly as given: no Content-Length added)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in headers.items():
            self.send_header(key, value)
        if body.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()
        if head:
            return
        try:
            if isinstance(body.data, int):
                left, block = body.data, b"\x5a" * (1 << 20)
                while left > 0:
                    chunk = block[:min(left, len(block))]
                    if body.trickle is not None:
                        for i in range(len(chunk)):
                            self.wfile.write(chunk[i:i + 1])
                            self.wfile.flush()
                            time.sleep(body.trickle)
                    else:
                        self.wfile.write(chunk)
                    left -= len(chunk)
            elif body.trickle is not None:
                for i in range(len(body.data)):
                    self.wfile.write(body.data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(body.trickle)
            else:
                self.wfile.write(body.data)
            self.wfile.flush()
        except OSError:  # the client gave up (deadline, size cap): that is the point
            self.close_connection = True

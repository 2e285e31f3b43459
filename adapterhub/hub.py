"""Share adapter versions through the Hugging Face Hub (``huggingface_hub`` public API only).

* :func:`push` — one Hub repo per adapter (default ``<user>/<adapter name>``); each version is one commit
  holding ``adapter.safetensors`` (an LFS file), ``adapterhub.json`` (the machine card, see
  :mod:`adapterhub.modelcard`) and ``README.md`` (the model card), tagged ``v{N}``. The catalog records
  repo, commit and tag. A version whose tag already holds the same weights uploads nothing.
  Retrying a push that failed half-way never makes a second commit: if the branch head already holds
  exactly these files (a commit whose answer was lost), it is tagged instead of committed again.
* :func:`pull` — ``REPO[@REV]`` (tag, branch or commit) through the Hub cache; the weights' sha256 must
  equal the card's ``content_hash`` *before* anything is registered, then the file is validated
  (:func:`adapterhub.format.load`) and registered with an ``imported_from`` edge (repo, revision,
  commit) and its lineage; ``with_parents`` pulls missing ancestors recursively. Pulling a version the
  catalog already has is a no-op.
* :func:`hub_versions` — the ``v{N}`` tags of a repo with the content hash each one holds.

The token comes from ``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``) unless one is passed; it
is never stored, logged or put into an error message. The endpoint is ``endpoint`` or ``HF_ENDPOINT``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from . import format as fmt
from .errors import AdapterHubError, HubError, RefError
from .faults import fault_point
from .modelcard import (CARD_FILE, README_FILE, WEIGHTS_FILE, build_hub_card, build_model_card, hub_card_bytes,
                        is_repo_id, parse_hub_card, safe_repo_path)

if TYPE_CHECKING:  # pragma: no cover
    from .api import VersionInfo, Workspace

_TAG_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199}$")
Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- records
@dataclass
class PushResult:
    """What :func:`push` did. ``uploaded`` is False when the version was already on the Hub."""

    ref: str
    repo: str
    branch: str
    commit: str
    tag: str
    content_hash: str
    uploaded: bool
    url: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    """What :func:`pull` did. ``registered`` is False when the catalog already had the version."""

    ref: str
    repo: str
    revision: str
    commit: str
    tag: str | None
    content_hash: str
    registered: bool
    message: str
    parents: list["PullResult"] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["parents"] = [p.to_json() for p in self.parents]
        return d


@dataclass
class HubVersion:
    """One ``v{N}`` tag of a repo and the adapter it holds (None fields when its card is unreadable)."""

    tag: str
    version: int
    commit: str
    content_hash: str | None
    name: str | None
    kind: str | None
    task: str | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- helpers
def resolve_endpoint(endpoint: str | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT``, else huggingface_hub's default; raises HubError if not http(s)."""
    from huggingface_hub import constants

    url = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT or "").strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HubError(f"invalid Hub endpoint {url!r}: give an http(s) URL")
    return url


def public_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password part (safe to store and show)."""
    p = urlsplit(endpoint)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``owner/name[@rev]`` -> (repo id, rev or None). Raises HubError when malformed."""
    if not isinstance(spec, str) or not spec:
        raise HubError("give a Hub repo as OWNER/NAME[@REVISION]")
    repo, sep, rev = spec.partition("@")
    if not is_repo_id(repo):
        raise HubError(f"invalid Hub repo id {repo!r}: expected OWNER/NAME")
    if sep:
        if not rev or not _REV_RE.match(rev) or ".." in rev or rev.endswith("/"):
            raise HubError(f"invalid revision {rev!r} in {spec!r}")
        return repo, rev
    return repo, None


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Scrub:
    """Removes the token (if any) from text that may end up in an error message."""

    def __init__(self, token: str | bool | None) -> None:
        secret = token if isinstance(token, str) else None
        if secret is None and token is not False:
            try:
                from huggingface_hub import get_token

                secret = get_token()
            except Exception:  # noqa: BLE001 - no token is fine
                secret = None
        self._secret = secret or None

    def __call__(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def _hub_error(what: str, e: BaseException, *, endpoint: str, scrub: _Scrub, repo: str | None = None,
               rev: str | None = None) -> HubError:
    """Turn a huggingface_hub / transport exception into a one-line HubError (token scrubbed)."""
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo}@{rev}" if repo and rev else (repo or endpoint)
    if isinstance(e, HubError):
        return e
    transport = [x for x in (e, e.__cause__, e.__context__)
                 if x is not None and type(x).__module__.split(".")[0].startswith("httpx")
                 and not isinstance(x, HfHubHTTPError)]
    if not isinstance(e, HfHubHTTPError) and (transport or isinstance(e, (ConnectionError, TimeoutError))):
        name = (transport[0] if transport else e).__class__.__name__
        return HubError(scrub(f"{what}: cannot reach the Hub at {public_endpoint(endpoint)} ({name})"))
    if isinstance(e, RepositoryNotFoundError):
        msg = f"{what}: repository {repo} not found on {public_endpoint(endpoint)} (or it is private and no valid token was given)"
    elif isinstance(e, RevisionNotFoundError):
        msg = f"{what}: revision {rev!r} not found in {repo}"
    elif isinstance(e, LocalEntryNotFoundError):
        cause = e.__cause__ or e.__context__
        msg = f"{what}: cannot reach the Hub at {public_endpoint(endpoint)}" + (
            f" ({cause.__class__.__name__})" if cause is not None else "")
    elif isinstance(e, EntryNotFoundError):
        msg = f"{what}: file missing in {where}"
    elif isinstance(e, HfHubHTTPError):
        status = e.response.status_code if getattr(e, "response", None) is not None else "?"
        server = getattr(e, "server_message", None) or ""
        msg = f"{what}: HTTP {status} from {public_endpoint(endpoint)} for {where}" + (
            f": {server.splitlines()[0]}" if server else "")
    else:
        cause = e.__cause__
        detail = _first_line(e) + (f" ({_first_line(cause)})" if cause is not None else "")
        msg = f"{what}: {e.__class__.__name__}: {detail}"
    return HubError(scrub(" ".join(msg.split())))


class _Hub:
    """Thin wrapper around one HfApi with uniform error translation (internal)."""

    def __init__(self, endpoint: str | None, token: str | bool | None, cache_dir: str | os.PathLike[str] | None,
                 progress: Progress | None) -> None:
        from huggingface_hub import HfApi

        self.endpoint = resolve_endpoint(endpoint)
        self.token = token
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.scrub = _Scrub(token)
        self.progress = progress or (lambda _msg: None)
        self.api = HfApi(endpoint=self.endpoint, token=token, library_name="adapterhub",
                         library_version=_version())

    def call(self, what: str, fn: Callable[[], Any], *, repo: str | None = None, rev: str | None = None) -> Any:
        try:
            return fn()
        except AdapterHubError:
            raise
        except Exception as e:  # noqa: BLE001 - every transport/protocol failure becomes one HubError
            raise _hub_error(what, e, endpoint=self.endpoint, scrub=self.scrub, repo=repo, rev=rev) from None

    def download(self, repo: str, filename: str, revision: str) -> Path:
        from huggingface_hub import hf_hub_download

        safe_repo_path(filename)
        path = self.call(f"download {filename}", lambda: hf_hub_download(
            repo, filename, revision=revision, endpoint=self.endpoint, token=self.token,
            cache_dir=self.cache_dir), repo=repo, rev=revision)
        return Path(path)

    def refs(self, repo: str) -> Any:
        return self.call("list refs", lambda: self.api.list_repo_refs(repo), repo=repo)

    def tree(self, repo: str, revision: str) -> dict[str, Any]:
        entries = self.call("list files", lambda: list(self.api.list_repo_tree(repo, revision=revision,
                                                                                recursive=True)),
                            repo=repo, rev=revision)
        return {getattr(f, "path", ""): f for f in entries}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("adapterhub")
    except Exception:  # noqa: BLE001
        return "0"


def _tree_has(tree: dict[str, Any], path: str, *, sha256: str | None = None, data: bytes | None = None) -> bool:
    """Whether ``tree[path]`` holds exactly these bytes (LFS sha256 or git blob id)."""
    f = tree.get(path)
    if f is None:
        return False
    lfs = getattr(f, "lfs", None)
    if sha256 is not None:
        if lfs is not None:
            return getattr(lfs, "sha256", None) == sha256
        return data is not None and getattr(f, "blob_id", None) == _git_blob_sha1(data)
    assert data is not None
    if lfs is not None:
        return getattr(lfs, "sha256", None) == hashlib.sha256(data).hexdigest()
    return getattr(f, "blob_id", None) == _git_blob_sha1(data)


# ---------------------------------------------------------------------------------------------- push
def default_repo(ws: "Workspace", name: str, hub: _Hub) -> str:
    """``<user>/<adapter name>`` for the token's user; raises HubError when there is no token."""
    from huggingface_hub.errors import LocalTokenNotFoundError

    try:
        who = hub.api.whoami()
    except (LocalTokenNotFoundError, ValueError):
        raise HubError("no Hub token: log in (`hf auth login`), set HF_TOKEN, or give --repo OWNER/NAME") from None
    except Exception as e:  # noqa: BLE001
        raise _hub_error("find the Hub user", e, endpoint=hub.endpoint, scrub=hub.scrub) from None
    user = who.get("name") if isinstance(who, dict) else None
    if not user:
        raise HubError("the Hub did not say who the token belongs to; give --repo OWNER/NAME")
    repo = f"{user}/{name}"
    if not is_repo_id(repo):
        raise HubError(f"cannot make a repo id from {repo!r}; give --repo OWNER/NAME")
    return repo


def _lineage_for_card(ws: "Workspace", ref: str) -> list[dict[str, Any]]:
    out = []
    for edge in ws.parents(ref):
        if edge["parent"] is None:  # imported_from provenance is local knowledge, not lineage
            continue
        pv = ws.resolve(edge["parent"])
        hub = {"repo": pv.hub_repo, "commit": pv.hub_commit, "tag": pv.hub_tag} if pv.hub_repo else None
        out.append({"relation": edge["relation"], "weight": edge["weight"], "params": edge["params"] or {},
                    "parent": {"name": pv.name, "version": pv.number, "content_hash": pv.content_hash,
                               "kind": pv.kind, "hub": hub}})
    out.sort(key=lambda e: (e["relation"], e["parent"]["name"], e["parent"]["version"]))
    return out


def push(ws: "Workspace", ref: str, *, repo: str | None = None, private: bool = False, branch: str = "main",
         endpoint: str | None = None, token: str | bool | None = None, progress: Progress | None = None
         ) -> PushResult:
    """Push one catalog version to the Hub as one commit tagged ``v{N}``.

    Takes the workspace, a REF, an optional repo id (default ``<user>/<adapter name>``), privacy for a new
    repo, the branch to commit to, endpoint/token overrides and a progress callback for stage messages.
    Returns a :class:`PushResult`. Raises HubError (transfer failed, tag already holds other weights, bad
    repo id...), RefError for an unknown REF. The catalog is only updated after the Hub has the tag.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    if not branch or not _REV_RE.match(branch) or ".." in branch:
        raise HubError(f"invalid branch name {branch!r}")
    if repo is not None and not is_repo_id(repo):
        raise HubError(f"invalid Hub repo id {repo!r}: expected OWNER/NAME")
    v = ws.resolve(ref)
    data = ws.adapter_bytes(v)  # verified against the content hash by the store
    base = ws.get_base(v.base, resolve_path=False)
    hub = _Hub(endpoint, token, None, progress)
    repo_id = repo or default_repo(ws, v.name, hub)
    tag = f"v{v.number}"
    card = build_hub_card(v, base, _lineage_for_card(ws, v.ref))
    card["size_bytes"] = len(data)
    card_bytes = hub_card_bytes(card)
    readme = str(build_model_card(card, repo_id=repo_id, endpoint=public_endpoint(hub.endpoint))).encode()
    url = f"{public_endpoint(hub.endpoint)}/{repo_id}"

    def done(commit: str, uploaded: bool, message: str) -> PushResult:
        fault_point("push.before-record")  # crash tests: tagged on the Hub, catalog not updated yet
        ws.set_hub(v.ref, repo=repo_id, commit=commit, tag=tag, endpoint=public_endpoint(hub.endpoint))
        return PushResult(v.ref, repo_id, branch, commit, tag, v.content_hash, uploaded, url, message)

    # 1. Is this version already there?
    hub.progress(f"checking {repo_id} on {public_endpoint(hub.endpoint)}")
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        refs = hub.api.list_repo_refs(repo_id)
    except RepositoryNotFoundError:
        refs = None
    except Exception as e:  # noqa: BLE001
        raise _hub_error("push", e, endpoint=hub.endpoint, scrub=hub.scrub, repo=repo_id) from None
    if refs is not None:
        tags = {t.name: t.target_commit for t in refs.tags}
        if tag in tags:
            tree = hub.tree(repo_id, tags[tag])
            if _tree_has(tree, WEIGHTS_FILE, sha256=v.content_hash, data=data):
                return done(tags[tag], False, f"{v.ref} is already on the Hub as {repo_id}@{tag}; nothing uploaded")
            raise HubError(f"{repo_id}@{tag} already holds a different adapter; push to another --repo")
        branches = {b.name: b.target_commit for b in refs.branches}
    else:
        hub.progress(f"creating {'private ' if private else ''}repo {repo_id}")
        hub.call("create repo", lambda: hub.api.create_repo(repo_id, private=private, exist_ok=True), repo=repo_id)
        branches = {b.name: b.target_commit for b in hub.refs(repo_id).branches}
    if branch not in branches:
        hub.call("create branch", lambda: hub.api.create_branch(repo_id, branch=branch, exist_ok=True),
                 repo=repo_id, rev=branch)
        branches = {b.name: b.target_commit for b in hub.refs(repo_id).branches}
    head = branches.get(branch)

    # 2. Commit, unless the head already holds exactly these files (an earlier try whose answer was lost).
    files = {WEIGHTS_FILE: data, CARD_FILE: card_bytes, README_FILE: readme}
    commit: str | None = None
    if head is not None:
        tree = hub.tree(repo_id, head)
        if all(_tree_has(tree, p, sha256=v.content_hash if p == WEIGHTS_FILE else None, data=b)
               for p, b in files.items()):
            commit = head
    if commit is None:
        hub.progress(f"uploading {v.ref} ({len(data)} bytes) to {repo_id}@{branch}")
        # the weights go from the store's blob file (huggingface_hub shows a byte progress bar for files)
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(ws.store.path(v.content_hash))
                                  if p == WEIGHTS_FILE else b) for p, b in files.items()]
        if ops[0].upload_info.sha256.hex() != v.content_hash or ops[0].upload_info.size != len(data):
            raise HubError(f"{v.ref}: the store blob changed while pushing; run `adapterhub verify`")
        info = hub.call("commit", lambda: hub.api.create_commit(
            repo_id, ops, commit_message=f"{v.name} {tag} (sha256 {v.content_hash[:12]})",
            commit_description=f"adapterhub {v.ref}, content hash {v.content_hash}", revision=branch,
            parent_commit=head), repo=repo_id, rev=branch)
        commit = info.oid
    assert commit is not None
    fault_point("push.after-commit")  # crash tests: committed on the Hub, not tagged yet

    # 3. Tag. A 409 is fine when the tag already points at our commit (a retried push).
    hub.progress(f"tagging {commit[:12]} as {tag}")
    try:
        hub.api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"{v.ref} sha256:{v.content_hash}")
    except HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) != 409:
            raise _hub_error("tag", e, endpoint=hub.endpoint, scrub=hub.scrub, repo=repo_id, rev=tag) from None
        now = {t.name: t.target_commit for t in hub.refs(repo_id).tags}
        if now.get(tag) != commit:
            raise HubError(f"{repo_id}@{tag} was created by someone else meanwhile; push to another --repo") from None
    except Exception as e:  # noqa: BLE001
        raise _hub_error("tag", e, endpoint=hub.endpoint, scrub=hub.scrub, repo=repo_id, rev=tag) from None
    return done(commit, True, f"pushed {v.ref} to {repo_id}@{tag} (commit {commit[:12]})")


# ---------------------------------------------------------------------------------------------- pull
def _find_local(ws: "Workspace", content_hash: str) -> "VersionInfo | None":
    try:
        return ws.resolve(f"sha256:{content_hash}")
    except RefError:
        return None


def _ensure_base(ws: "Workspace", base: dict[str, Any]) -> str:
    """A local base named like the card's base with the same fingerprint (adding it when possible)."""
    from .errors import BaseModelError

    name, fp = base.get("name"), base.get("fingerprint")
    if not isinstance(name, str) or not name:
        raise HubError("the adapter card names no base model")
    try:
        local = ws.get_base(name, resolve_path=False)
    except BaseModelError:
        local = None
    if local is not None:
        if local.fingerprint != fp:
            raise HubError(f"local base {name!r} has fingerprint {local.fingerprint[:12]}, the adapter was made for "
                           f"{str(fp)[:12]}; refusing")
        return name
    # The same weights under another local name, or a source we can materialise here.
    candidates = [b.source for b in ws.list_bases() if b.fingerprint == fp]
    src = base.get("source")
    if isinstance(src, str) and src.startswith("builtin:"):
        candidates.append(src)
    for source in candidates:
        try:
            added = ws.add_base(name, source, base.get("revision"))
        except AdapterHubError:
            continue
        if added.fingerprint == fp:
            return name
        raise HubError(f"base {name!r} from {source} has fingerprint {added.fingerprint[:12]}, the adapter needs "
                       f"{str(fp)[:12]}")
    raise HubError(f"base model {name!r} (fingerprint {str(fp)[:12]}) is not in this catalog; add it with "
                   f"`adapterhub base add {name} SOURCE` and pull again")


def _drop_cached(path: Path) -> None:
    """Remove a bad file from the Hub cache (the snapshot link and its blob) so a retry downloads again."""
    try:
        blob = path.resolve()
        if path.is_symlink():
            path.unlink()
        if blob.exists() and blob != path:
            blob.unlink()
        elif path.exists():
            path.unlink()
    except OSError:
        pass


def pull(ws: "Workspace", spec: str, *, name: str | None = None, with_parents: bool = False,
         endpoint: str | None = None, token: str | bool | None = None,
         cache_dir: str | os.PathLike[str] | None = None, progress: Progress | None = None) -> PullResult:
    """Pull ``REPO[@REV]`` into the catalog.

    Takes the workspace, the repo spec (REV: tag such as ``v3``, branch or commit; default ``main``), an
    optional local adapter name (default: the card's), whether to pull missing ancestors, endpoint/token/
    cache overrides and a progress callback. Returns a :class:`PullResult` (``registered`` False when the
    catalog already had these bytes). Raises HubError on a transfer failure, a malformed card, an unsafe
    file name, or weights whose sha256 differs from the card (nothing is registered then); FormatError
    when the file is invalid; BaseModelError/CatalogError when it does not fit the local catalog.
    """
    hub = _Hub(endpoint, token, cache_dir, progress)
    return _pull(ws, hub, spec, name=name, with_parents=with_parents, seen=set(), depth=0)


def _pull(ws: "Workspace", hub: _Hub, spec: str, *, name: str | None, with_parents: bool, seen: set[str],
          depth: int) -> PullResult:
    from .api import Parent
    from .names import validate_name

    if depth > 64:
        raise HubError("lineage deeper than 64 levels; refusing")
    repo, rev = parse_repo_spec(spec)
    revision = rev or "main"
    if name is not None:
        validate_name(name, "adapter name")
    hub.progress(f"reading {CARD_FILE} of {repo}@{revision}")
    card_path = hub.download(repo, CARD_FILE, revision)
    commit = card_path.parent.name
    if not _HEX40.match(commit):  # the cache layout is snapshots/<commit>/<file>
        commit = hub.call("resolve revision", lambda: hub.api.model_info(repo, revision=revision).sha,
                          repo=repo, rev=revision)
    card = parse_hub_card(card_path.read_bytes(), where=f"{repo}@{revision}/{CARD_FILE}")
    digest = card["content_hash"]
    tag: str | None = rev if rev is not None and _TAG_RE.match(rev) else None
    local_name = name or card["name"]
    validate_name(local_name, "adapter name")

    existing = _find_local(ws, digest)
    if existing is not None and (name is None or existing.name == name):
        return PullResult(existing.ref, repo, revision, commit, tag, digest, False,
                          f"{repo}@{revision} is already in the catalog as {existing.ref}; nothing to do")
    if digest in seen:
        raise HubError(f"lineage cycle through {digest[:12]}; refusing")
    seen.add(digest)

    # Weights: download (from the exact commit the card came from) and verify BEFORE anything else.
    filename = safe_repo_path(card.get("file", WEIGHTS_FILE))
    hub.progress(f"downloading {repo}@{revision}/{filename}")
    weights_path = hub.download(repo, filename, commit)
    data = weights_path.read_bytes()
    got = fmt.sha256_hex(data)
    if got != digest:
        _drop_cached(weights_path)
        raise HubError(f"sha256 mismatch for {repo}@{revision}/{filename}: the card says {digest[:16]}…, the "
                       f"download is {got[:16]}…; refusing it, nothing was registered")
    fault_point("pull.after-download")  # crash tests: weights verified in the cache, nothing registered yet
    adapter = fmt.load(data)
    embedded = adapter.card.get("base") if isinstance(adapter.card.get("base"), dict) else {}
    if embedded and embedded.get("fingerprint") != card["base"].get("fingerprint"):
        raise HubError(f"{repo}@{revision}: the file's base fingerprint disagrees with its card; refusing")

    # Lineage: parents found locally become edges; missing ones are pulled (with_parents) or recorded.
    parents: list[Any] = []
    pulled: list[PullResult] = []
    missing: list[dict[str, Any]] = []
    for entry in card.get("lineage", []):
        relation = entry["relation"]
        if relation == "imported_from":
            continue
        parent = entry.get("parent") or {}
        local = _find_local(ws, parent["content_hash"]) if parent.get("content_hash") else None
        if local is None and with_parents:
            coords = parent.get("hub") or {}
            if not coords.get("repo"):
                raise HubError(f"parent {parent.get('name')}@{parent.get('version')} of {repo}@{revision} was never "
                               "pushed to the Hub; it cannot be pulled")
            prev = coords.get("commit") or coords.get("tag") or "main"
            res = _pull(ws, hub, f"{coords['repo']}@{prev}", name=None, with_parents=True, seen=seen, depth=depth + 1)
            if parent.get("content_hash") and res.content_hash != parent["content_hash"]:
                raise HubError(f"parent {coords['repo']}@{prev} holds {res.content_hash[:12]}, the lineage says "
                               f"{parent['content_hash'][:12]}; refusing")
            pulled.append(res)
            local = ws.resolve(res.ref)
        if local is None:
            missing.append({"relation": relation, "name": parent.get("name"), "version": parent.get("version"),
                            "content_hash": parent.get("content_hash"), "hub": parent.get("hub")})
            continue
        parents.append(Parent(local.ref, relation, entry.get("weight"), entry.get("params") or None))
    provenance: dict[str, Any] = {"repo": repo, "revision": revision, "commit": commit, "tag": tag,
                                  "endpoint": public_endpoint(hub.endpoint), "content_hash": digest,
                                  "hub_version": card["version"]}
    if missing:
        provenance["missing_parents"] = missing
    parents.append(Parent(None, "imported_from", None, provenance))

    if tag is None:  # pulled by branch or commit: name the version tag pointing at this commit, if any
        tags = sorted(t.name for t in hub.refs(repo).tags if t.target_commit == commit and _TAG_RE.match(t.name))
        tag = tags[0] if tags else None
    base_name = _ensure_base(ws, card["base"])
    hub.progress(f"registering {local_name}")
    info = ws.register(adapter, name=local_name, task=card.get("task"), base=base_name,
                       kind=card.get("kind") or "expert", parents=parents, metrics=card.get("metrics") or None,
                       training_config=card.get("training") or None,
                       hub={"repo": repo, "commit": commit, "tag": tag, "endpoint": public_endpoint(hub.endpoint)})
    if info.content_hash != digest:  # register re-serialises canonically; pushed files are canonical
        raise HubError(f"{info.ref}: registered bytes hash {info.content_hash[:12]} differs from the Hub's "
                       f"{digest[:12]} (a non-canonical file)")
    return PullResult(info.ref, repo, revision, commit, tag, digest, info.created,
                      f"pulled {repo}@{revision} as {info.ref}" if info.created else
                      f"{repo}@{revision} is already in the catalog as {info.ref}; nothing to do", pulled)


# ---------------------------------------------------------------------------------------------- versions
def hub_versions(repo: str, *, endpoint: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> list[HubVersion]:
    """The ``v{N}`` tags of ``repo`` (oldest first) with the content hash, name, kind and task each holds.

    Raises HubError when the repo cannot be listed. A tag whose card cannot be read is listed with
    ``error`` set instead of failing the whole listing.
    """
    if not is_repo_id(repo):
        raise HubError(f"invalid Hub repo id {repo!r}: expected OWNER/NAME")
    hub = _Hub(endpoint, token, cache_dir, None)
    refs = hub.refs(repo)
    out: list[HubVersion] = []
    for t in refs.tags:
        m = _TAG_RE.match(t.name)
        if not m:
            continue
        try:
            card = parse_hub_card(hub.download(repo, CARD_FILE, t.target_commit).read_bytes(),
                                  where=f"{repo}@{t.name}/{CARD_FILE}")
            out.append(HubVersion(t.name, int(m.group(1)), t.target_commit, card["content_hash"], card.get("name"),
                                  card.get("kind"), card.get("task")))
        except HubError as e:
            out.append(HubVersion(t.name, int(m.group(1)), t.target_commit, None, None, None, None, str(e)))
    return sorted(out, key=lambda h: h.version)


def iter_pull_results(result: PullResult) -> Iterator[PullResult]:
    """The result and its pulled parents, depth first (parents before children)."""
    for p in result.parents:
        yield from iter_pull_results(p)
    yield result

"""Share adapter versions through the Hugging Face Hub (``huggingface_hub`` public API only).

* :func:`push` — one Hub repo per adapter (default ``<user>/<adapter name>``); each version is one commit
  holding ``adapter.safetensors`` (an LFS file), ``adapterhub.json`` (the machine card, see
  :mod:`adapterhub.hub.cards`) and ``README.md`` (the model card), tagged ``v{N}``. The catalog records
  repo, commit and tag. A version whose tag already holds the same weights uploads nothing.
  Retrying a push that failed half-way never makes a second commit: if the branch head already holds
  exactly these files (a commit whose answer was lost), it is tagged instead of committed again. To a repo
  the catalog never pushed to, a push starts with ``create_repo``: a new repo then takes the requests of
  ``create_repo`` + ``upload_folder`` and the tag (8), and an existing one answers 409 and gets the usual
  checks (refs, trees). The weights are hashed once, by the upload itself, before the first request.
* :func:`pull` — ``REPO[@REV]`` (tag, branch or commit) through our own download cache; the weights' sha256 must
  equal the card's ``content_hash`` *before* anything is registered, then the file is validated
  (:func:`adapterhub.format.load`) and registered with an ``imported_from`` edge (repo, revision,
  commit) and its lineage; ``with_parents`` pulls missing ancestors recursively. A pull is all or
  nothing: everything is downloaded and verified first, then registered in one transaction. The local
  name is ``--name`` or ``OWNER--NAME`` from the repo id (a card never chooses it). Pulling a version the
  catalog already has is a no-op.
* :func:`hub_versions` — the ``v{N}`` tags of a repo with the content hash each one holds.

The token comes from ``huggingface_hub`` (``HF_TOKEN`` or ``hf auth login``) unless one is passed; it
is never stored, logged or put into an error message. The endpoint is ``endpoint`` or ``HF_ENDPOINT``; its
``user:password@`` part is likewise never stored, shown in an error or left in a log record of the Hub
client (:class:`_LogScrubber`).

Downloads (:class:`_Hub`): no server-provided string decides a local path. One GET per file (no HEAD): its
commit id and ETag must be hex, and its announced size under the cap, before its body is read; cards are
read into memory (at most 1 MiB); weights are streamed from the resolve URL pinned to the card's commit
straight into a staged temp file of a local store (hashed and written on a worker thread while the transfer
goes on; renamed into place by the registration, removed otherwise) and accepted only when their sha256
equals the card's ``content_hash``; the cache then gets ``blobs/<sha256>`` as a hard link to them. Weights
the store (or the cache) already holds are read from there, verified, instead of downloaded. For an object
store they go through ``<cache>/<endpoint key>/tmp`` under a name we choose and are kept as
``blobs/<sha256>``. The cache is ``<home>/cache/hub/<sha256(public endpoint)[:16]>/`` (one per endpoint). A pull has an overall deadline
and a size cap (:func:`pull_limits`: ``--timeout`` / ``ADAPTERHUB_PULL_TIMEOUT``, default 600 s;
``--max-bytes`` / ``ADAPTERHUB_PULL_MAX_BYTES``, default 4 GiB, lowered by the card's ``size_bytes``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from ..errors import AdapterHubError, HubError, RefError
from ..faults import fault_point
from ..fsutil import sha256_file, sha256_hex
from ..textsafe import excerpt, redact_urls
from .cards import (
    CARD_FILE,
    README_FILE,
    WEIGHTS_FILE,
    build_hub_card,
    hub_card_bytes,
    is_repo_id,
    model_card_text,
    parse_hub_card,
    safe_repo_path,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import BaseInfo, NewVersion, VersionInfo
    from ..store import StagedBlob
    from ..workspace import Workspace

_TAG_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
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
    card_commit: str | None = None  # the card-only commit of a refresh (no weights uploaded)
    card_stale: bool = False  # the Hub's card differs and could not be refreshed on this branch
    hub_tags: list[str] = field(default_factory=list)  # local tags mirrored as tag-<name> (push --tags)
    hub_tags_deleted: list[str] = field(default_factory=list)  # tag-<name> refs of tags gone locally (push --tags)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: A local tag ``prod`` is mirrored as the Hub tag ``tag-prod``: never ``v{N}``, the version tags.
HUB_TAG_PREFIX = "tag-"


def hub_tag_name(local_tag: str) -> str:
    """The Hub tag that mirrors a local tag (``prod`` → ``tag-prod``)."""
    return HUB_TAG_PREFIX + local_tag


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
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a malformed port or netloc
        ok = False
    if not ok:
        raise HubError(f"invalid Hub endpoint {redact_urls(url)!r}: give an http(s) URL")
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
    """Removes secrets from text that may end up in an error message or a log line: the token (if any)
    and the ``user:password`` part of the endpoint (raw and percent-encoded)."""

    def __init__(self, token: str | bool | None, endpoint: str | None = None) -> None:
        secret = token if isinstance(token, str) else None
        if secret is None and token is not False:
            try:
                from huggingface_hub import get_token

                secret = get_token()
            except Exception:  # noqa: BLE001 - no token is fine
                secret = None
        self._secret = secret or None
        self._pairs: list[tuple[str, str]] = []  # (text to find, replacement), longest first
        if endpoint:
            self._pairs = _credential_pairs(endpoint)
        if self._secret:
            self._pairs.append((self._secret, "***"))
        self._pairs.sort(key=lambda p: -len(p[0]))

    @property
    def secrets(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def __call__(self, text: str) -> str:
        for needle, repl in self._pairs:
            if needle:
                text = text.replace(needle, repl)
        return text


def _credential_pairs(endpoint: str) -> list[tuple[str, str]]:
    """What to cut out of text so that ``endpoint``'s ``user:password@`` never shows (every spelling)."""
    from urllib.parse import quote, unquote

    netloc = endpoint.partition("://")[2].partition("/")[0]
    if "@" not in netloc:
        return []
    userinfo = netloc.rsplit("@", 1)[0]
    out: list[tuple[str, str]] = []
    for info in {userinfo, unquote(userinfo)}:
        out.append((info + "@", ""))  # http://user:pw@host -> http://host
        user, _, password = info.partition(":")
        for pw in {password, unquote(password), quote(unquote(password), safe="")}:
            if len(pw) >= 3:  # a one- or two-character password would garble every message; still never echoed in URLs
                out.append((pw, "***"))
    return out


class _LogScrubber(logging.Filter):
    """A logging filter that rewrites records of the Hub client (and its HTTP stack) without our secrets."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[str, str]] = []

    def add(self, pairs: list[tuple[str, str]]) -> None:
        for p in pairs:
            if p not in self.pairs:
                self.pairs.append(p)
        self.pairs.sort(key=lambda p: -len(p[0]))

    def _clean(self, text: str) -> str:
        for needle, repl in self.pairs:
            text = text.replace(needle, repl)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pairs:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to fix
            return True
        clean = self._clean(msg)
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            if self._clean(text) != text:
                clean += " (" + self._clean(_first_line(record.exc_info[1])) + ")" if record.exc_info[1] else ""
                record.exc_info, record.exc_text = None, None
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_LOG_SCRUBBER = _LogScrubber()
_LOGGER_PREFIXES = ("huggingface_hub", "httpx", "httpcore", "urllib3", "requests", "hf_xet")


def _install_log_scrubber(scrub: _Scrub) -> None:
    """Make every logger of the Hub client's stack drop ``scrub``'s secrets from its records (idempotent)."""
    if not scrub.secrets:
        return
    _LOG_SCRUBBER.add(scrub.secrets)
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0].startswith(_LOGGER_PREFIXES)]
    for name in names + ["huggingface_hub"]:
        lg = logging.getLogger(name)
        if _LOG_SCRUBBER not in lg.filters:
            lg.addFilter(_LOG_SCRUBBER)
        for h in lg.handlers:  # propagated records of loggers created later pass these handlers
            if _LOG_SCRUBBER not in h.filters:
                h.addFilter(_LOG_SCRUBBER)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def _hub_error(what: str, e: BaseException, *, endpoint: str, scrub: _Scrub, repo: str | None = None,
               rev: str | None = None) -> HubError:
    """Turn a huggingface_hub / transport exception into a one-line HubError (token scrubbed)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

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


# ---------------------------------------------------------------------------------------------- pull limits
PULL_TIMEOUT_ENV = "ADAPTERHUB_PULL_TIMEOUT"
PULL_MAX_BYTES_ENV = "ADAPTERHUB_PULL_MAX_BYTES"
DEFAULT_PULL_TIMEOUT = 600.0
DEFAULT_PULL_MAX_BYTES = 4 * 1024 ** 3
CARD_MAX_BYTES = 1024 ** 2
STREAM_THREAD_MIN_BYTES = 16 * 1024 ** 2  # weights this large are hashed and written on a second thread (_weights)
_RETRY_STATUS = (429, 500, 502, 503, 504)
_ETAG_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_BYTES_RE = re.compile(r"^([0-9]{1,20})\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}


@dataclass(frozen=True)
class PullLimits:
    """Bounds of one pull: ``timeout`` seconds for the whole pull (parents included), ``max_bytes`` for
    one weights file (a card's ``size_bytes`` can only lower it), ``card_max_bytes`` for one card."""

    timeout: float = DEFAULT_PULL_TIMEOUT
    max_bytes: int = DEFAULT_PULL_MAX_BYTES
    card_max_bytes: int = CARD_MAX_BYTES


def pull_limits(timeout: str | float | None = None, max_bytes: str | int | None = None) -> PullLimits:
    """The pull limits from explicit values, else ``ADAPTERHUB_PULL_TIMEOUT`` / ``ADAPTERHUB_PULL_MAX_BYTES``,
    else the defaults (600 s, 4 GiB). ``max_bytes`` takes a byte count with an optional K/M/G/T (binary)
    suffix. Raises HubError (one line, naming the setting) for a non-positive or malformed value."""
    t_raw = timeout if timeout is not None else os.environ.get(PULL_TIMEOUT_ENV) or None
    b_raw = max_bytes if max_bytes is not None else os.environ.get(PULL_MAX_BYTES_ENV) or None
    t = DEFAULT_PULL_TIMEOUT
    if t_raw is not None:
        try:
            t = float(str(t_raw).strip())
        except ValueError:
            t = math.nan
        if not math.isfinite(t) or t <= 0 or t > 10 ** 7:
            raise HubError(f"invalid pull timeout {excerpt(t_raw)!r} (timeout / {PULL_TIMEOUT_ENV}): give a number "
                           "of seconds > 0", keywords=("timeout",))
    b = DEFAULT_PULL_MAX_BYTES
    if b_raw is not None:
        m = _BYTES_RE.match(str(b_raw).strip()) if not isinstance(b_raw, bool) else None
        b = int(m.group(1)) * _UNITS[m.group(2).lower()] if m else 0
        if b <= 0:
            raise HubError(f"invalid pull size limit {excerpt(b_raw)!r} (max_bytes / {PULL_MAX_BYTES_ENV}): give a "
                           "byte count > 0, e.g. 500M or 4GiB", keywords=("max_bytes",))
    return PullLimits(t, b)


class _TooBig(HubError):
    pass


def _show(value: object) -> str:
    """A short, escaped rendering of a server-provided value for an error message."""
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _endpoint_key(endpoint: str) -> str:
    """The cache folder name of an endpoint: sha256 of its public form (no credentials), 16 hex digits."""
    return hashlib.sha256(public_endpoint(endpoint).encode()).hexdigest()[:16]


def _inside(path: Path, folder: Path) -> Path:
    """``path`` resolved, if it is a direct child of ``folder`` (resolved); else HubError. Nothing on disk is
    touched through a path that has not passed this check."""
    resolved, root = path.resolve(), folder.resolve()
    if resolved.parent != root:
        raise HubError(f"refusing a Hub cache path outside {root}")
    return resolved


def _sweep_stale_parts(tmp_dir: Path, max_age_s: float = 2 * 86400) -> None:
    """Remove our own ``pull-*.part`` temp files older than ``max_age_s`` (left by a killed pull)."""
    now = time.time()
    try:
        for p in tmp_dir.glob("pull-*.part"):
            try:
                if not p.is_symlink() and now - p.stat().st_mtime > max_age_s:
                    _inside(p, tmp_dir).unlink()
            except (OSError, HubError):
                continue
    except OSError:
        pass


@dataclass
class _Meta:
    commit: str
    etag: str
    size: int | None


# ---------------------------------------------------------------------------------------------- transport
class _Hub:
    """Thin wrapper around one HfApi with uniform error translation, secret scrubbing and, for pulls, the
    download layer (internal).

    Downloads never let the server name a local path: the GET's own metadata (commit id, ETag, size) is checked
    before its body is read (hex ids only, size under the cap), the body is streamed by us from the resolve URL
    pinned to the card's commit, into memory (cards), a staged temp file of the store (:meth:`stream_weights`)
    or a temp file we name inside ``<cache>/<endpoint key>/tmp`` (:meth:`fetch_weights`), hashed on the way and
    accepted only when it equals the card's ``content_hash``. With ``limits`` every request runs under the
    pull's overall deadline.
    """

    def __init__(self, endpoint: str | None, token: str | bool | None, cache_dir: str | os.PathLike[str] | None,
                 progress: Progress | None, limits: PullLimits | None = None) -> None:
        from huggingface_hub import HfApi

        self.endpoint = resolve_endpoint(endpoint)
        self.token = token
        self.cache_root = Path(cache_dir) / _endpoint_key(self.endpoint) if cache_dir is not None else None
        self.scrub = _Scrub(token, self.endpoint)
        self.progress = progress or (lambda _msg: None)
        self.limits = limits
        self.deadline = time.monotonic() + limits.timeout if limits is not None else None
        self.cancelled = threading.Event()
        self.api = HfApi(endpoint=self.endpoint, token=token, library_name="adapterhub",
                         library_version=_version())
        # imported for their side effect: create their loggers before installing the scrubber
        import huggingface_hub.file_download
        import huggingface_hub.utils._http  # noqa: F401

        _install_log_scrubber(self.scrub)

    # -- calls
    def call(self, what: str, fn: Callable[[], Any], *, repo: str | None = None, rev: str | None = None) -> Any:
        """``fn()`` with its failures turned into one scrubbed HubError; under the deadline when there is one."""
        try:
            return fn() if self.deadline is None else self._bounded(what, fn)
        except AdapterHubError:
            raise
        except Exception as e:  # noqa: BLE001 - every transport/protocol failure becomes one HubError
            raise _hub_error(what, e, endpoint=self.endpoint, scrub=self.scrub, repo=repo, rev=rev) from None

    def remaining(self) -> float:
        """Seconds left before the pull's deadline (a large number when there is none)."""
        return 3600.0 if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _timeout_error(self, what: str) -> HubError:
        assert self.limits is not None
        return HubError(f"{what}: the pull from {public_endpoint(self.endpoint)} did not finish within "
                        f"{self.limits.timeout:g} s (timeout / {PULL_TIMEOUT_ENV}); nothing was registered",
                        keywords=("timeout",))

    def _bounded(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in a worker thread and wait for it until the deadline. A request that outlives the
        deadline is abandoned (``cancelled`` tells our own download loops to stop at their next chunk)."""
        left = self.remaining()
        if left <= 0:
            self.cancelled.set()
            raise self._timeout_error(what)
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=work, name="adapterhub-pull", daemon=True).start()
        if not done.wait(left):
            self.cancelled.set()
            raise self._timeout_error(what)
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _check_running(self, what: str) -> None:
        if self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline):
            self.cancelled.set()
            raise self._timeout_error(what)

    # -- downloads
    def _answer_meta(self, r: Any, where: str, what: str, cap: int) -> _Meta:
        """The commit id, ETag and announced size of a GET's answer, checked before its body is read (issue 19:
        the GET's own headers carry what a HEAD would, so no HEAD is sent). They are read from the first answer
        of the endpoint's own origin that names a commit (a redirect to a CDN keeps them on the redirect);
        refuses a non-hex commit id or ETag, or an announced size over ``cap``."""
        origin = urlsplit(self.endpoint)
        answers = [*getattr(r, "history", []), r]
        own = [a for a in answers if urlsplit(str(a.url)).netloc.rpartition("@")[2] == origin.netloc.rpartition("@")[2]]
        first = next((a for a in own if a.headers.get("X-Repo-Commit") is not None), own[0] if own else answers[0])
        commit = first.headers.get("X-Repo-Commit")
        etag = first.headers.get("X-Linked-Etag") or first.headers.get("ETag")
        etag = etag.lstrip("W/").strip('"') if isinstance(etag, str) else etag
        if not isinstance(commit, str) or not _HEX40.match(commit):
            raise HubError(self.scrub(f"{what}: the server gave {where} the commit id {_show(commit)}, not 40 hex "
                                      "digits; refusing it, nothing was written"))
        if not isinstance(etag, str) or not _ETAG_RE.match(etag):
            raise HubError(self.scrub(f"{what}: the server gave {where} the ETag {_show(etag)}, not a hex digest; "
                                      "refusing it, nothing was written"))
        size: int | None = None
        for raw in (first.headers.get("X-Linked-Size"), r.headers.get("Content-Length")):
            if raw is None:
                continue
            if not raw.strip().isdigit():
                raise HubError(self.scrub(f"{what}: the server gave {where} the size {_show(raw)}; refusing it"))
            if int(raw) > cap:
                raise _TooBig(f"{what}: {where} is {int(raw)} bytes, over the limit of {cap} bytes; refusing it")
            size = int(raw) if size is None else size
        return _Meta(commit, etag, size)

    def _get(self, repo: str, filename: str, rev: str, cap: int, sink: Callable[[bytes], object], what: str,
             check: Callable[[_Meta], None] | None = None, hasher: Any = None) -> tuple[_Meta, int]:
        """One GET of ``filename`` at ``rev`` (the only request for a file): its headers are checked first
        (:meth:`_answer_meta`, then ``check``), then the body goes chunk by chunk to ``sink`` (and ``hasher``), at
        most ``cap`` bytes, stopping at the deadline. A busy server (429/5xx) is retried with backoff, an
        unreachable one is not. Returns (the answer's metadata, the byte count). Runs in the worker thread of
        :meth:`_bounded`."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        safe_repo_path(filename)
        url = hf_hub_url(repo, filename, revision=rev, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token, library_name="adapterhub", library_version=_version())
        headers["Accept-Encoding"] = "identity"
        where = f"{repo}@{rev[:12] if _HEX40.match(rev) else rev}/{filename}"
        total = 0
        with http_stream_backoff("GET", url, headers=headers, timeout=max(0.1, min(60.0, self.remaining())),
                                 retry_on_exceptions=(), retry_on_status_codes=_RETRY_STATUS) as r:
            hf_raise_for_status(r)
            meta = self._answer_meta(r, where, what, cap)
            if check is not None:
                check(meta)
            for chunk in r.iter_bytes():
                self._check_running(what)
                total += len(chunk)
                if total > cap:
                    raise _TooBig(f"{what}: {where} is over the limit of {cap} bytes; refusing it")
                if hasher is not None:
                    hasher.update(chunk)
                sink(chunk)
        self._check_running(what)
        if meta.size is not None and total != meta.size:
            raise HubError(f"{what}: {where}: got {total} bytes, the server announced {meta.size}; refusing it")
        return meta, total

    def fetch_card(self, repo: str, revision: str) -> tuple[str, bytes]:
        """(commit id, bytes) of the ``adapterhub.json`` at ``revision``, read into memory (at most the card
        cap) by one GET whose commit id and ETag are checked before its body is read. Raises HubError for any
        refusal or transfer failure."""
        import io

        cap = self.limits.card_max_bytes if self.limits is not None else CARD_MAX_BYTES
        what = f"download {CARD_FILE}"
        buf = io.BytesIO()
        meta, _ = self.call(what, lambda: self._get(repo, CARD_FILE, revision, cap, buf.write, what),
                            repo=repo, rev=revision)
        return meta.commit, buf.getvalue()

    @property
    def blobs_dir(self) -> Path:
        if self.cache_root is None:
            raise HubError("no Hub cache folder for this download")
        return self.cache_root / "blobs"

    def _cached(self, digest: str, into: list[bytes] | None = None) -> Path | None:
        """The cached blob ``digest`` if present and still holding exactly those bytes (else it is dropped).
        With ``into``, the bytes that were hashed are appended to it (read once, hashed once)."""
        if self.cache_root is None:
            return None
        path = self.blobs_dir / digest
        if not path.exists() and not path.is_symlink():
            return None
        try:
            path = _inside(path, self.blobs_dir)
            if into is None:
                if sha256_file(path) == digest:
                    return path
            else:
                data = path.read_bytes()
                if sha256_hex(data) == digest:
                    into.append(data)
                    return path
        except (OSError, HubError):
            pass
        _drop_cached(self.blobs_dir / digest, self.blobs_dir)
        return None

    def _keep(self, path: Path, digest: str) -> None:
        """Keep verified bytes at ``path`` (a staged file of the store) as ``<cache>/blobs/<digest>`` too, by a hard
        link (no copy): a later pull of them (say, once a refused one is retried under another name) is served
        without a download. Best effort: another file system, an existing entry or any error keeps nothing."""
        if self.cache_root is None or not _HEX64.match(digest):
            return
        try:  # our own name (a hex digest) in our folder; a link never follows an entry already there
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            os.link(path, self.blobs_dir / digest)
        except OSError:
            pass

    def _weights_checks(self, repo: str, commit: str, digest: str, what: str, where: str) -> Callable[[_Meta], None]:
        def check(meta: _Meta) -> None:
            if meta.commit != commit:
                raise HubError(f"{what}: asked for commit {commit[:12]} of {repo}, the server answered "
                               f"{meta.commit[:12]}; refusing it")
            if len(meta.etag) == 64 and meta.etag != digest:
                raise HubError(f"sha256 mismatch for {where}: the card says {digest[:16]}…, the server's file "
                               f"is {meta.etag[:16]}…; refusing it, nothing was registered")
        return check

    def _weights_cap(self, size_hint: object) -> int:
        cap = self.limits.max_bytes if self.limits is not None else DEFAULT_PULL_MAX_BYTES
        if isinstance(size_hint, int) and not isinstance(size_hint, bool) and 0 <= size_hint < cap:
            cap = size_hint  # the card can only lower the cap
        return cap

    def fetch_weights(self, repo: str, filename: str, commit: str, digest: str, *, size_hint: object = None,
                      where: str | None = None, into: list[bytes] | None = None) -> Path:
        """The verified file ``filename`` of ``commit`` as ``<cache>/blobs/<digest>``: served from the cache
        when it holds those bytes, else downloaded (at most ``max_bytes``, lowered by ``size_hint`` — the
        card's ``size_bytes``) into ``<cache>/tmp`` and kept only when its sha256 equals ``digest``. Raises
        HubError otherwise; no temp file is left behind. With ``into``, the verified bytes are also appended to
        it, so the caller neither re-reads nor re-hashes the file. (A pull into a local store streams into the
        store's staged file instead: :meth:`stream_weights`.)"""
        import io

        if not _HEX40.match(commit) or not _HEX64.match(digest):
            raise HubError(f"refusing to download {filename}: commit or content hash is not hex")
        safe_repo_path(filename)
        where = f"{where or f'{repo}@{commit[:12]}'}/{filename}"
        hit = self._cached(digest, into)
        if hit is not None:
            return hit
        cap = self._weights_cap(size_hint)
        what = f"download {filename}"
        tmp_dir = self.cache_root / "tmp"  # type: ignore[operator]
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        _sweep_stale_parts(tmp_dir)
        fd, name = tempfile.mkstemp(prefix="pull-", suffix=".part", dir=tmp_dir)
        tmp = Path(name)
        buf = io.BytesIO()
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as f:
                def sink(chunk: bytes) -> None:
                    f.write(chunk)
                    if into is not None:
                        buf.write(chunk)
                self.call(what, lambda: self._get(repo, filename, commit, cap, sink, what,
                                                  self._weights_checks(repo, commit, digest, what, where), h),
                          repo=repo, rev=commit)
            got = h.hexdigest()
            if got != digest:
                raise HubError(f"sha256 mismatch for {where}: the card says {digest[:16]}…, the download "
                               f"is {got[:16]}…; refusing it, nothing was registered")
            dest = _inside(self.blobs_dir / digest, self.blobs_dir)
            os.replace(_inside(tmp, tmp_dir), dest)
            if into is not None:
                into.append(buf.getvalue())
            return dest
        finally:
            try:
                if tmp.exists():
                    _inside(tmp, tmp_dir).unlink()
            except (OSError, HubError):
                pass

    def stream_weights(self, repo: str, filename: str, commit: str, digest: str, staged: "StagedBlob", *,
                       size_hint: object = None, where: str | None = None) -> tuple[bytes, Callable[[], None]]:
        """Download ``filename`` of ``commit`` straight into ``staged`` (a streamed :class:`StagedBlob` of the
        store: each chunk is hashed and written on its worker thread while the next one arrives, and the fsync
        starts once the last is written). Returns the bytes as soon as they are received, with ``verify``: it
        waits for the worker's sha256 and raises HubError unless it equals ``digest`` (then the bytes are linked
        into the cache, :meth:`_keep`). The caller may parse the bytes meanwhile but must call ``verify`` before
        using them for anything else. The same checks and limits as :meth:`fetch_weights` (one GET, its headers
        checked before the body). Raises HubError; the caller discards ``staged``."""
        import io

        if not _HEX40.match(commit) or not _HEX64.match(digest):
            raise HubError(f"refusing to download {filename}: commit or content hash is not hex")
        safe_repo_path(filename)
        where = f"{where or f'{repo}@{commit[:12]}'}/{filename}"
        cap = self._weights_cap(size_hint)
        what = f"download {filename}"
        buf = io.BytesIO()

        def sink(chunk: bytes) -> None:
            buf.write(chunk)
            staged.feed(chunk)

        self.call(what, lambda: self._get(repo, filename, commit, cap, sink, what,
                                          self._weights_checks(repo, commit, digest, what, where)),
                  repo=repo, rev=commit)
        data = buf.getvalue()

        def verify() -> None:
            got = staged.end(data)  # the sha256 of exactly the bytes written to the staged file
            if got != digest:
                raise HubError(f"sha256 mismatch for {where}: the card says {digest[:16]}…, the download "
                               f"is {got[:16]}…; refusing it, nothing was registered")
            if staged.tmp is not None:
                self._keep(staged.tmp, digest)
        return data, verify

    # -- listings
    def refs(self, repo: str) -> Any:
        return self.call("list refs", lambda: self.api.list_repo_refs(repo), repo=repo)

    def tree(self, repo: str, revision: str) -> dict[str, Any]:
        entries = self.call("list files", lambda: list(self.api.list_repo_tree(repo, revision=revision,
                                                                                recursive=True)),
                            repo=repo, rev=revision)
        return {getattr(f, "path", ""): f for f in entries}


@functools.cache
def _version() -> str:
    """adapterhub's version for the User-Agent (read once a process: it is asked for on every request)."""
    try:
        from importlib.metadata import version

        return version("adapterhub")
    except Exception:  # noqa: BLE001
        return "0"


def _tree_has(tree: dict[str, Any], path: str, *, sha256: str | None = None,
              data: bytes | Callable[[], bytes] | None = None) -> bool:
    """Whether ``tree[path]`` holds exactly these bytes (LFS sha256 or git blob id). ``data`` may be a function
    giving the bytes: it is called only when the tree's entry is a plain git blob (an LFS entry is compared by
    ``sha256``), so a push reads the weights from the store only where it needs them."""
    f = tree.get(path)
    if f is None:
        return False
    lfs = getattr(f, "lfs", None)
    if sha256 is not None:
        if lfs is not None:
            return getattr(lfs, "sha256", None) == sha256
        if callable(data):
            data = data()
        return data is not None and getattr(f, "blob_id", None) == _git_blob_sha1(data)
    if callable(data):
        data = data()
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
        raise HubError("no Hub token: log in (`hf auth login`), set HF_TOKEN, or give a repo id OWNER/NAME",
                       keywords=("repo",)) from None
    except Exception as e:  # noqa: BLE001
        raise _hub_error("find the Hub user", e, endpoint=hub.endpoint, scrub=hub.scrub) from None
    user = who.get("name") if isinstance(who, dict) else None
    if not user:
        raise HubError("the Hub did not say who the token belongs to; give a repo id OWNER/NAME", keywords=("repo",))
    repo = f"{user}/{name}"
    if not is_repo_id(repo):
        raise HubError(f"cannot make a repo id from {repo!r}; give a repo id OWNER/NAME", keywords=("repo",))
    return repo


def _lineage_for_card(ws: "Workspace", v: "VersionInfo | str", *, has_parents: bool | None = None
                      ) -> list[dict[str, Any]]:
    """The card's lineage of ``v`` (a version or a REF): its edges to local parents (provenance left out), sorted.
    ``has_parents``: whether ``v`` has an edge to a local parent, when the caller already read it."""
    if isinstance(v, str):
        v = ws.resolve(v)
    if has_parents is None:
        has_parents = ws.has_parents(v.id)
    if not has_parents:  # most versions have no parent: one narrow query then, not a resolve + edge walk
        return []
    out = []
    for edge in ws.parents(v.ref):
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
         endpoint: str | None = None, token: str | bool | None = None, progress: Progress | None = None,
         card_only: bool = False, mirror_tags: bool = False) -> PushResult:
    """Push one catalog version to the Hub as one commit tagged ``v{N}``.

    Takes the workspace, a REF, an optional repo id (default ``<user>/<adapter name>``), privacy for a new
    repo, the branch to commit to, endpoint/token overrides and a progress callback for stage messages.
    Returns a :class:`PushResult`. Raises HubError (transfer failed, tag already holds other weights, bad
    repo id...), RefError for an unknown REF. The catalog is only updated after the Hub has the tag.

    Card refresh: when ``v{N}`` is already there with these weights but its card (``adapterhub.json``,
    ``README.md``: metrics, lineage...) differs from the one built now, a commit with only the two card
    files is made on ``branch`` (no weights uploaded) — automatically, or as the only thing to do with
    ``card_only`` (which raises HubError when the version is not on the Hub yet). It needs ``branch``'s
    head to hold this version's weights; a branch that does not exist yet is created at ``v{N}``. The tag
    ``v{N}`` itself stays the first push's commit. ``mirror_tags``: the repo's ``tag-<name>`` refs mirror the
    local tags of the version's adapter (see :func:`_mirror_tags`): a local tag ``prod`` on a version pushed to
    this repo is set as ``tag-prod`` (:func:`hub_tag_name`) at that version's ``v{N}`` commit (moved if it
    pointed elsewhere), and a ``tag-<name>`` at one of this adapter's pushed commits whose local tag is gone
    (or now names a version not on this repo) is deleted; other refs are never touched.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    if not branch or not _REV_RE.match(branch) or ".." in branch:
        raise HubError(f"invalid branch name {branch!r}")
    if repo is not None and not is_repo_id(repo):
        raise HubError(f"invalid Hub repo id {repo!r}: expected OWNER/NAME")
    hub = _Hub(endpoint, token, None, progress)
    public = public_endpoint(hub.endpoint)
    # one read transaction for the version, its base, whether it has parents and whether this catalog pushed its
    # adapter to ``repo`` before (issue 19: a push's fixed cost)
    v, base, has_parents, pushed = ws.push_snapshot(ref, repo, public)
    # The weights are not read up front (issue 19): an upload hashes the store's blob once, in
    # CommitOperationAdd, and is refused unless that equals the content hash; a tree whose weights are a plain
    # git blob (not LFS) is compared against the store's verified bytes, read then and only then.
    weights = functools.cache(lambda: ws.adapter_bytes(v))  # verified against the content hash by the store

    @functools.cache
    def weights_op() -> Any:
        """The upload of the weights from the store's blob file (huggingface_hub shows a byte progress bar for
        files); its upload_info is the one sha256 of the blob, and must be the content hash."""
        blob = ws.store.path(v.content_hash)
        if not blob.is_file() or blob.is_symlink():
            weights()  # the store's own one-line error (missing, a symlink...)
        op = CommitOperationAdd(path_in_repo=WEIGHTS_FILE, path_or_fileobj=str(blob))
        if op.upload_info.sha256.hex() != v.content_hash or op.upload_info.size != v.size_bytes:
            raise HubError(f"{v.ref}: the store's blob does not hold this version's bytes (corrupt or changed); "
                           "nothing was uploaded; run `adapterhub verify`")
        return op
    repo_id = repo or default_repo(ws, v.name, hub)
    if pushed is None:
        pushed = _pushed_to(ws, v.name, repo_id, public)
    tag = f"v{v.number}"
    card = build_hub_card(v, base, _lineage_for_card(ws, v, has_parents=has_parents))
    card["size_bytes"] = v.size_bytes
    card_bytes = hub_card_bytes(card)
    readme = model_card_text(card, repo_id=repo_id, endpoint=public).encode()
    url = f"{public}/{repo_id}"

    def done(commit: str, uploaded: bool, message: str) -> PushResult:
        fault_point("push.before-record")  # crash tests: tagged on the Hub, catalog not updated yet
        ws.set_hub(v.ref, repo=repo_id, commit=commit, tag=tag, endpoint=public, version_id=v.id)
        return PushResult(v.ref, repo_id, branch, commit, tag, v.content_hash, uploaded, url, message)

    # 0. A repo this catalog never pushed to is created first (issue 19): a new repo then needs no refs listing
    # (nothing to compare, no tag to protect); one that exists answers 409 and is checked below as always.
    created = not card_only and not pushed and _create_new_repo(hub, repo_id, private, weights_op)
    refs: Any = None
    branches: dict[str, str | None] = {"main": None}  # a repo created just now: its branch, holding none of our files
    if not created:
        # 1. Is this version already there?
        hub.progress(f"checking {repo_id} on {public_endpoint(hub.endpoint)}")
        refs = _list_refs_or_none(hub, repo_id)
    if refs is not None:
        tags = {t.name: t.target_commit for t in refs.tags}
        if tag in tags:
            tree = hub.tree(repo_id, tags[tag])
            if not _tree_has(tree, WEIGHTS_FILE, sha256=v.content_hash, data=weights):
                raise HubError(f"{repo_id}@{tag} already holds a different adapter; push to another repo",
                               keywords=("repo",))
            res = _refresh_card(hub, v, repo_id, branch, tag, tags[tag], tree, {b.name: b.target_commit
                                                                                 for b in refs.branches},
                                {CARD_FILE: card_bytes, README_FILE: readme}, card_only)
            out = done(tags[tag], False, res[2])
            out.card_commit, out.card_stale = res[0], res[1]
            if mirror_tags:
                out.hub_tags, out.hub_tags_deleted = _mirror_tags(hub, ws, v, repo_id, tags)
            return out
        if card_only:
            raise HubError(f"{v.ref} is not on {repo_id} yet ({tag} is missing): push it first, without --card-only",
                           keywords=("card-only",))
        branches = {b.name: b.target_commit for b in refs.branches}
    elif not created:
        if card_only:
            raise HubError(f"{v.ref} is not on the Hub yet ({repo_id} does not exist): push it first, without "
                           "--card-only", keywords=("card-only",))
        weights_op()  # a blob that is not this version's bytes is refused before the repo is created
        hub.progress(f"creating {'private ' if private else ''}repo {repo_id}")
        hub.call("create repo", lambda: hub.api.create_repo(repo_id, private=private, exist_ok=True), repo=repo_id)
        # like one created above: "main" holds none of our files, so the commit needs no parent and no second refs
        # listing (issue 19); another branch is created and listed below
    if branch not in branches:
        hub.call("create branch", lambda: hub.api.create_branch(repo_id, branch=branch, exist_ok=True),
                 repo=repo_id, rev=branch)
        branches = {b.name: b.target_commit for b in hub.refs(repo_id).branches}
    head: str | None = branches.get(branch)

    # 2. Commit, unless the head already holds exactly these files (an earlier try whose answer was lost).
    files: dict[str, bytes | Callable[[], bytes]] = {WEIGHTS_FILE: weights, CARD_FILE: card_bytes, README_FILE: readme}
    commit: str | None = None
    if head is not None and refs is not None:  # a repo created just now holds none of them: no listing needed
        tree = hub.tree(repo_id, head)
        if all(_tree_has(tree, p, sha256=v.content_hash if p == WEIGHTS_FILE else None, data=b)
               for p, b in files.items()):
            commit = head
    if commit is None:
        hub.progress(f"uploading {v.ref} ({v.size_bytes} bytes) to {repo_id}@{branch}")
        ops = [weights_op(), CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card_bytes),
               CommitOperationAdd(path_in_repo=README_FILE, path_or_fileobj=readme)]
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
            raise HubError(f"{repo_id}@{tag} was created by someone else meanwhile; push to another repo",
                           keywords=("repo",)) from None
    except Exception as e:  # noqa: BLE001
        raise _hub_error("tag", e, endpoint=hub.endpoint, scrub=hub.scrub, repo=repo_id, rev=tag) from None
    out = done(commit, True, f"pushed {v.ref} to {repo_id}@{tag} (commit {commit[:12]})")
    if mirror_tags:
        out.hub_tags, out.hub_tags_deleted = _mirror_tags(hub, ws, v, repo_id,
                                                          {t.name: t.target_commit for t in hub.refs(repo_id).tags})
    return out


def _pushed_to(ws: "Workspace", name: str, repo_id: str, endpoint: str) -> bool:
    """Whether the catalog recorded a push of a version of adapter ``name`` to ``repo_id`` on ``endpoint`` (one
    narrow query: a push's fixed cost, issue 19)."""
    return ws.pushed_to(name, repo_id, endpoint)


def _list_refs_or_none(hub: _Hub, repo_id: str) -> Any:
    """``list_repo_refs(repo_id)``, or None when the repo does not exist; HubError for any other failure."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return hub.api.list_repo_refs(repo_id)
    except RepositoryNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        raise _hub_error("push", e, endpoint=hub.endpoint, scrub=hub.scrub, repo=repo_id) from None


def _create_new_repo(hub: _Hub, repo_id: str, private: bool, weights_op: Callable[[], Any]) -> bool:
    """Try to create ``repo_id`` as a new repo: True when this call created it; False when the Hub says it exists
    (409) or that this token may not create it (401/402/403: it may still exist and be writable), so the caller
    lists its refs and goes on as for any existing repo. The weights are hashed first (``weights_op``): a blob
    that is not this version's bytes creates nothing. Raises HubError for any other failure."""
    from huggingface_hub.errors import HfHubHTTPError

    weights_op()
    hub.progress(f"creating {'private ' if private else ''}repo {repo_id} on {public_endpoint(hub.endpoint)}")
    try:
        hub.api.create_repo(repo_id, private=private, exist_ok=False)
    except HfHubHTTPError as e:
        if getattr(getattr(e, "response", None), "status_code", None) in (409, 401, 402, 403):
            return False
        raise _hub_error("create repo", e, endpoint=hub.endpoint, scrub=hub.scrub, repo=repo_id) from None
    except Exception as e:  # noqa: BLE001
        raise _hub_error("create repo", e, endpoint=hub.endpoint, scrub=hub.scrub, repo=repo_id) from None
    return True


def _refresh_card(hub: _Hub, v: "VersionInfo", repo_id: str, branch: str, tag: str, tag_commit: str,
                  tag_tree: dict[str, Any], branches: dict[str, str], card_files: dict[str, bytes],
                  card_only: bool) -> tuple[str | None, bool, str]:
    """Bring the card on ``branch`` up to date without uploading weights (see :func:`push`).

    Returns (card commit or None, whether the Hub's card stays stale, message)."""
    from huggingface_hub import CommitOperationAdd

    head = branches.get(branch)
    head_tree = hub.tree(repo_id, head) if head is not None else None
    ours = head_tree is not None and _tree_has(head_tree, WEIGHTS_FILE, sha256=v.content_hash)
    where = head_tree if ours and head_tree is not None else tag_tree
    if all(_tree_has(where, p, data=b) for p, b in card_files.items()):
        return None, False, f"{v.ref} is already on the Hub as {repo_id}@{tag} with this card; nothing uploaded"
    if head is not None and not ours:
        hint = f"refresh it on a branch of its own: --card-only --branch {tag}-card"
        if card_only:
            raise HubError(f"{repo_id}@{branch} holds another version's weights; {hint}", keywords=("branch",))
        return None, True, (f"{v.ref} is already on the Hub as {repo_id}@{tag}; nothing uploaded, but its card there "
                            f"is stale and {branch} holds another version: {hint}")
    if head is None:
        hub.progress(f"creating branch {branch} at {tag}")
        hub.call("create branch", lambda: hub.api.create_branch(repo_id, branch=branch, revision=tag_commit,
                                                                exist_ok=True), repo=repo_id, rev=branch)
        head = {b.name: b.target_commit for b in hub.refs(repo_id).branches}.get(branch, tag_commit)
    hub.progress(f"refreshing the card of {v.ref} on {repo_id}@{branch} (no weights)")
    ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b) for p, b in card_files.items()]
    info = hub.call("commit", lambda: hub.api.create_commit(
        repo_id, ops, commit_message=f"{v.name} {tag}: refresh card", revision=branch,
        commit_description=f"adapterhub {v.ref}, card only (weights unchanged, sha256 {v.content_hash})",
        parent_commit=head), repo=repo_id, rev=branch)
    return info.oid, False, (f"{v.ref} is already on the Hub as {repo_id}@{tag}; refreshed its card on {branch} "
                             f"(commit {info.oid[:12]}, no weights uploaded)")


def _delete_tag_if_there(api: Any, repo_id: str, tag: str) -> None:
    """``api.delete_tag``; a tag someone else deleted meanwhile (404 RevisionNotFound) is as good as deleted."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        api.delete_tag(repo_id, tag=tag)
    except RevisionNotFoundError:
        pass


def _mirror_tags(hub: _Hub, ws: "Workspace", v: "VersionInfo", repo_id: str,
                 hub_tags: dict[str, str]) -> tuple[list[str], list[str]]:
    """Make ``repo_id``'s ``tag-<name>`` refs a mirror of the local tags of ``v``'s adapter.

    "Ours" are the ``v{N}`` commits the catalog recorded for the adapter's versions pushed to this repo (and
    endpoint). Wanted: ``tag-<local>`` at the commit of each tagged version among them (created, or moved
    when it points elsewhere). Deleted: a ``tag-<name>`` ref that points at one of our commits but is not
    wanted (its local tag was removed, or moved to a version not on this repo). Refs outside the
    ``tag-`` convention (``v{N}``, branches) and ``tag-`` refs at commits this catalog did not push are left
    alone. Returns (the mirrored Hub tag names, the deleted ones), sorted.
    """
    endpoint = public_endpoint(hub.endpoint)
    ours = {x.hub_commit: x for x in ws.log(v.name)
            if x.hub_repo == repo_id and x.hub_commit and x.hub_endpoint in (None, endpoint)}
    want = {hub_tag_name(local): (commit, local, x.ref) for commit, x in ours.items() for local in x.tags}
    mirrored: list[str] = []
    for name, (commit, local, ref) in sorted(want.items()):
        if hub_tags.get(name) != commit:
            if name in hub_tags:
                hub.progress(f"moving Hub tag {name} to {commit[:12]}")
                hub.call("move tag", functools.partial(hub.api.delete_tag, repo_id, tag=name), repo=repo_id, rev=name)
            hub.call("tag", functools.partial(hub.api.create_tag, repo_id, tag=name, revision=commit,
                                              tag_message=f"adapterhub tag {local} -> {ref}"), repo=repo_id, rev=name)
        mirrored.append(name)
    deleted: list[str] = []
    for name, commit in sorted(hub_tags.items()):
        if name.startswith(HUB_TAG_PREFIX) and name not in want and commit in ours:
            hub.progress(f"deleting Hub tag {name} (no local tag {name[len(HUB_TAG_PREFIX):]} on a version there)")
            hub.call("delete tag", functools.partial(_delete_tag_if_there, hub.api, repo_id, name), repo=repo_id,
                     rev=name)
            deleted.append(name)
    return mirrored, deleted


# ---------------------------------------------------------------------------------------------- pull
def _find_local(ws: "Workspace", content_hash: str) -> "VersionInfo | None":
    """The local version holding these bytes (None when the catalog has none: one narrow query, issue 19)."""
    if not _HEX64.match(content_hash) or not ws.has_content(content_hash):
        return None
    try:
        return ws.resolve(f"sha256:{content_hash}")
    except RefError:
        return None


@dataclass
class _Plan:
    """What one pull will register, gathered before the catalog is touched (internal).

    ``versions``: (version, its PullResult, whether it adds to a local adapter the user named) in
    dependency order; ``bases``: bases to add with them; ``by_digest``: planned results by content hash;
    ``names``: local adapter name -> the repo planned into it; ``in_progress``: hashes being planned
    (a lineage cycle otherwise).
    """

    versions: list[tuple["NewVersion", PullResult, bool]] = field(default_factory=list)
    bases: dict[str, "BaseInfo"] = field(default_factory=dict)
    local_bases: dict[str, "BaseInfo"] = field(default_factory=dict)  # bases of the catalog the versions use
    by_digest: dict[str, PullResult] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    in_progress: set[str] = field(default_factory=set)
    staged: dict[str, Any] = field(default_factory=dict)  # content hash -> StagedBlob (see _weights)
    stages: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # discards them


def _weights(ws: "Workspace", hub: _Hub, plan: _Plan, repo: str, filename: str, commit: str, digest: str, *,
             size_hint: object, where: str) -> tuple[bytes, Callable[[], None]]:
    """The verified weights ``digest`` for a pull, from the first place that has them: this plan (a diamond), the
    local store (a blob no version references any more: read and hashed), the Hub cache, or a download. A pull
    into a local store downloads straight into a staged temp file of the store (:meth:`_Hub.stream_weights`:
    hashed and written while the transfer goes on, fsynced beside the validation), which ``register_many``
    renames into place (issue 19: one write of the bytes, no cache copy first; the cache gets a hard link).
    ``plan.stages`` removes whatever was not renamed; the temp file's own lock keeps a concurrent ``gc`` off it
    until then (:class:`~adapterhub.store.StagedBlob`). Raises HubError (refusals, transfer failures) or
    StoreError (the store cannot be written). Returns the bytes and ``verify``: a download's bytes come back as
    soon as they are received, so that the caller parses them while their sha256 is finished on the worker
    thread; ``verify()`` (a no-op for bytes read and hashed here) raises HubError unless they are the card's,
    and must be called before they are used for anything but parsing."""
    from ..errors import StoreError
    from ..store import BlobStore

    def verified() -> None:
        return None

    planned = plan.staged.get(digest)
    if planned is not None and planned.data is not None:
        return bytes(planned.data), verified
    store = ws.store
    if isinstance(store, BlobStore) and store.has(digest):
        with contextlib.suppress(StoreError):  # a corrupt blob: downloaded again, and put_bytes heals it
            return store.get_bytes(digest), verified
    got: list[bytes] = []
    if hub._cached(digest, got) is not None:
        return got[0], verified
    if not isinstance(store, BlobStore):  # an object store: through the cache, as any download
        hub.fetch_weights(repo, filename, commit, digest, size_hint=size_hint, where=where, into=got)
        return got[0], verified
    # a large download is hashed and written on the stage's worker thread, beside the transfer; a small one in the
    # downloading thread (no hand-over per chunk). The card's size only chooses that: the cap is checked anyway.
    large = isinstance(size_hint, int) and size_hint >= STREAM_THREAD_MIN_BYTES
    staged = plan.stages.enter_context(store.stage(threaded=large))
    data, verify = hub.stream_weights(repo, filename, commit, digest, staged, size_hint=size_hint, where=where)
    plan.staged[digest] = staged
    return data, verify


def local_name_for(repo: str) -> str:
    """The default local adapter name of Hub repo ``owner/name``: ``owner--name`` (never the card's name).

    Raises HubError when that is not a valid adapter name (too long, ``..``), asking for a name.
    """
    from ..catalog.names import validate_name
    from ..errors import NameError_

    try:
        return validate_name(repo.replace("/", "--"), "adapter name")
    except NameError_:
        raise HubError(f"cannot make a local adapter name from the repo id {repo!r}; give a name",
                       keywords=("name",)) from None


def _check_local_name(ws: "Workspace", plan: _Plan, *, name: str, repo: str, endpoint: str, base: str,
                      explicit: bool, versions: list[Any] | None = None) -> bool:
    """May this pull add a version of ``repo`` under local adapter ``name``? Returns True when it adds to
    an adapter the user named (``explicit``) that already exists.

    A name the user gave may hold an existing adapter only on the same base. A name derived from the
    repo id may only hold versions pulled from (or pushed to) that same repo on the same endpoint. One
    pull never puts two repos under one name. ``versions``: the local versions of ``name`` (their ``base``,
    ``hub_repo`` and ``hub_endpoint``) when the caller has read them already. Raises HubError otherwise; writes
    nothing.
    """
    other = plan.names.get(name)
    if other is not None and other != repo:
        raise HubError(f"this pull would put {other} and {repo} under one local name {name!r}; refusing")
    plan.names[name] = repo
    if versions is None:
        try:
            versions = ws.log(name)
        except RefError:
            return False
    if explicit:
        bases = sorted({v.base for v in versions} - {base})
        if bases:
            raise HubError(f"your adapter {name!r} is on base {bases[0]!r} but {repo} is an adapter of base "
                           f"{base!r}; refusing (choose another name)", keywords=("name",))
        return bool(versions)
    if any(v.hub_repo != repo or v.hub_endpoint != endpoint for v in versions):
        raise HubError(f"a local adapter {name!r} already exists and is not a copy of {repo}; give a name "
                       "to choose the local name", keywords=("name",))
    return False


def _ensure_base(ws: "Workspace", base: dict[str, Any], plan: _Plan, *, read: Any = None) -> str:
    """The local base name for the card's ``base``: a local base of that name with the same fingerprint,
    or one to add under that name (kept in ``plan.bases``, registered in the same transaction as the
    versions) from a local base with the same fingerprint or the card's built-in source. The fingerprint
    decides; nothing is written to the catalog here. ``read``: ``(the local base of that name or None,)`` when the
    caller has read it already (:meth:`Workspace.pull_snapshot`). Raises HubError when no such base can be found."""
    from ..errors import BaseModelError

    name, fp = base.get("name"), base.get("fingerprint")
    if not isinstance(name, str) or not name:
        raise HubError("the adapter card names no base model")
    planned = plan.bases.get(name)
    if planned is not None:
        if planned.fingerprint != fp:
            raise HubError(f"the pulled adapters need two different bases called {name!r}; refusing")
        return name
    local = plan.local_bases.get(name)
    if local is None and read is not None:
        local = read[0]
    elif local is None:
        try:
            local = ws.get_base(name, resolve_path=False)
        except BaseModelError:
            local = None
    if local is not None:
        if local.fingerprint != fp:
            raise HubError(f"local base {name!r} has fingerprint {local.fingerprint[:12]}, the adapter was made for "
                           f"{str(fp)[:12]}; refusing")
        plan.local_bases[name] = local  # handed to register_many, which then does not read it again
        return name
    # The same weights under another local name, or a source we can materialise here.
    candidates = [b.source for b in ws.list_bases() if b.fingerprint == fp]
    src = base.get("source")
    if isinstance(src, str) and src.startswith("builtin:"):
        candidates.append(src)
    revision = base.get("revision")
    revision = revision if isinstance(revision, str) and 0 < len(revision) <= 200 and revision.isprintable() else None
    for source in candidates:
        try:
            added = ws.prepare_base(name, source, revision)
        except AdapterHubError:
            continue
        if added.fingerprint == fp:
            plan.bases[name] = added
            return name
        raise HubError(f"base {name!r} from {source} has fingerprint {added.fingerprint[:12]}, the adapter needs "
                       f"{str(fp)[:12]}")
    raise HubError(f"base model {name!r} (fingerprint {str(fp)[:12]}) is not in this catalog; add it with "
                   f"`adapterhub base add {name} SOURCE` and pull again")


def _drop_cached(path: Path, blobs: Path) -> None:
    """Remove a bad entry ``blobs/<sha256>`` from our Hub cache so a retry downloads again.

    Only a direct entry of ``blobs`` whose name is a sha256 is removed, and a symlink there is removed
    itself, never followed: no other path is ever unlinked (whatever a server sent).
    """
    try:
        if not _HEX64.match(path.name) or path.parent.resolve() != blobs.resolve():
            return
        if path.is_symlink() or path.is_file():
            path.unlink()
    except OSError:
        pass


def pull(ws: "Workspace", spec: str, *, name: str | None = None, with_parents: bool = False,
         endpoint: str | None = None, token: str | bool | None = None,
         cache_dir: str | os.PathLike[str] | None = None, progress: Progress | None = None,
         limits: PullLimits | None = None) -> PullResult:
    """Pull ``REPO[@REV]`` into the catalog, all or nothing.

    Takes the workspace, the repo spec (REV: tag such as ``v3``, branch or commit; default ``main``), an
    optional local adapter name (default: ``OWNER--NAME`` from the repo id, never the card's name), whether
    to pull missing ancestors, endpoint/token/cache overrides and a progress callback. Everything (the
    adapter, its parents, recursively, and a base to add) is downloaded and verified first; then all of it
    is registered in one transaction (:meth:`Workspace.register_many`). A version is added to an existing
    local adapter only when the user named it (same base) or when that adapter is a copy of the same repo.
    Returns a :class:`PullResult` (``registered`` False when the catalog already had these bytes). Raises
    HubError on a transfer failure, a malformed card, an unsafe file name, weights whose sha256 differs
    from the card, a local name that is taken; FormatError when the file is invalid; BaseModelError/
    CatalogError when it does not fit the local catalog. On any error the catalog and the store are as
    they were.
    """
    from ..catalog.names import validate_name

    if name is not None:
        validate_name(name, "adapter name")
    # downloads: <cache_dir or <home>/cache/hub>/<endpoint key>/; limits: deadline and size caps (pull_limits)
    hub = _Hub(endpoint, token, cache_dir if cache_dir is not None else ws.cache_dir / "hub", progress,
               limits if limits is not None else pull_limits())
    plan = _Plan()
    with plan.stages:  # staged store copies (_weights): removed unless register_many renamed them into place
        result = _plan_pull(ws, hub, plan, spec, name=name, with_parents=with_parents, depth=0)
        if not plan.versions:
            return result
        hub.progress(f"registering {len(plan.versions)} version(s)")
        from ..bases.sources import resolve_source

        known = [dataclasses.replace(b, path=resolve_source(b.source, ws.cache_dir)) for b in plan.local_bases.values()]
        infos = ws.register_many([v for v, _, _ in plan.versions], new_bases=list(plan.bases.values()),
                                 staged=plan.staged, known_bases=known)
        for (version, res, added), info in zip(plan.versions, infos, strict=True):
            res.ref, res.registered = info.ref, info.created
            where = f"{res.repo}@{res.revision}"
            if not info.created:
                res.message = f"{where} is already in the catalog as {info.ref}; nothing to do"
            elif added:
                res.message = f"pulled {where}: added {info.ref} to your existing adapter {version.name}"
            else:
                res.message = f"pulled {where} as {info.ref}"
    return result


def _card_lineage_edge(entry: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """The weight and params of a card lineage entry, as plain data (anything else is dropped)."""
    weight = entry.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        weight = None
    params = entry.get("params")
    return weight, params if isinstance(params, dict) and params else None


def _plan_pull(ws: "Workspace", hub: _Hub, plan: _Plan, spec: str, *, name: str | None, with_parents: bool,
               depth: int) -> PullResult:
    """Download and verify one version (and, with ``with_parents``, its missing ancestors first) and add
    it to ``plan``; touches neither the catalog nor the store. Returns its PullResult (``ref`` filled in
    after registration; a version the catalog already has is returned as done, ``registered`` False)."""
    from ..catalog.records import NewVersion, Parent

    if depth > 64:
        raise HubError("lineage deeper than 64 levels; refusing")
    repo, rev = parse_repo_spec(spec)
    revision = rev or "main"
    explicit = name is not None
    local_name = name if name is not None else local_name_for(repo)
    hub.progress(f"reading {CARD_FILE} of {repo}@{revision}")
    commit, card_bytes = hub.fetch_card(repo, revision)  # commit: 40 hex digits, checked
    card = parse_hub_card(card_bytes, where=f"{repo}@{revision}/{CARD_FILE}")
    digest = card["content_hash"]
    tag: str | None = rev if rev is not None and _TAG_RE.match(rev) else None

    existing = _find_local(ws, digest)
    if existing is not None and (not explicit or existing.name == name):
        return PullResult(existing.ref, repo, revision, commit, tag, digest, False,
                          f"{repo}@{revision} is already in the catalog as {existing.ref}; nothing to do")
    if digest in plan.in_progress:
        raise HubError(f"lineage cycle through {digest[:12]}; refusing")
    if not explicit and digest in plan.by_digest:  # a diamond: this ancestor is already planned
        return plan.by_digest[digest]
    plan.in_progress.add(digest)

    # Weights: download (from the exact commit the card came from) and verify BEFORE anything else.
    filename = safe_repo_path(card.get("file", WEIGHTS_FILE))
    hub.progress(f"downloading {repo}@{revision}/{filename}")
    data, verify = _weights(ws, hub, plan, repo, filename, commit, digest, size_hint=card.get("size_bytes"),
                            where=f"{repo}@{revision}")  # hashed while streaming into the store's staged file
    # The bytes are parsed while the worker finishes their sha256 (issue 19); nothing uses them before verify().
    # Bytes that are not the card's are refused as such, whatever the parse says.
    from .. import format as fmt  # here, not at import: push and the Hub's read commands run without torch

    try:
        adapter = fmt.load_canonical(data, source_sha256=digest)  # canonical bytes: stored as they are
    except AdapterHubError:
        verify()
        raise
    verify()
    fault_point("pull.after-download")  # crash tests: weights verified and staged, nothing registered yet
    embedded = adapter.card.get("base") if isinstance(adapter.card.get("base"), dict) else {}
    if embedded and embedded.get("fingerprint") != card["base"].get("fingerprint"):
        raise HubError(f"{repo}@{revision}: the file's base fingerprint disagrees with its card; refusing")

    # Lineage: parents found locally (or already planned) become edges; missing ones are pulled
    # (with_parents, named after THEIR repo ids) or recorded as provenance.
    parents: list[Any] = []
    pulled: list[PullResult] = []
    missing: list[dict[str, Any]] = []
    for entry in card.get("lineage", []):
        relation = entry["relation"]
        if relation == "imported_from":
            continue
        parent = entry.get("parent") or {}
        ph = parent.get("content_hash")
        local = _find_local(ws, ph) if ph else None
        parent_ref = local.ref if local is not None else (f"sha256:{ph}" if ph in plan.by_digest else None)
        if parent_ref is None and with_parents:
            coords = parent.get("hub") or {}
            if not coords.get("repo"):
                raise HubError(f"parent {parent.get('name')}@{parent.get('version')} of {repo}@{revision} was never "
                               "pushed to the Hub; it cannot be pulled")
            prev = coords.get("commit") or coords.get("tag") or "main"
            res = _plan_pull(ws, hub, plan, f"{coords['repo']}@{prev}", name=None, with_parents=True, depth=depth + 1)
            if ph and res.content_hash != ph:
                raise HubError(f"parent {coords['repo']}@{prev} holds {res.content_hash[:12]}, the lineage says "
                               f"{ph[:12]}; refusing")
            pulled.append(res)
            parent_ref = f"sha256:{res.content_hash}" if res.content_hash in plan.by_digest else res.ref
        if parent_ref is None:
            missing.append({"relation": relation, "name": parent.get("name"), "version": parent.get("version"),
                            "content_hash": ph, "hub": parent.get("hub")})
            continue
        weight, params = _card_lineage_edge(entry)
        parents.append(Parent(parent_ref, relation, weight, params))
    endpoint = public_endpoint(hub.endpoint)
    provenance: dict[str, Any] = {"repo": repo, "revision": revision, "commit": commit, "tag": tag,
                                  "endpoint": endpoint, "content_hash": digest, "hub_version": card["version"]}
    if missing:
        provenance["missing_parents"] = missing
    parents.append(Parent(None, "imported_from", None, provenance))

    if tag is None:  # pulled by branch or commit: name the version tag pointing at this commit, if any
        tags = sorted(t.name for t in hub.refs(repo).tags if t.target_commit == commit and _TAG_RE.match(t.name))
        tag = tags[0] if tags else None
    # one read of the catalog for the base and the local name (issue 19: a pull's fixed cost)
    card_base = card["base"].get("name")
    read = ws.pull_snapshot(card_base if isinstance(card_base, str) and card_base else None, local_name)
    base_name = _ensure_base(ws, card["base"], plan, read=read[:1])
    added = _check_local_name(ws, plan, name=local_name, repo=repo, endpoint=endpoint, base=base_name,
                              explicit=explicit, versions=read[1])
    version = NewVersion(adapter, name=local_name, task=card.get("task"), base=base_name,
                         kind=card.get("kind") or "expert", parents=tuple(parents),
                         metrics=card.get("metrics") or None, training_config=card.get("training") or None,
                         hub={"repo": repo, "commit": commit, "tag": tag, "endpoint": endpoint}, expect_hash=digest)
    result = PullResult("", repo, revision, commit, tag, digest, True, "", pulled)
    plan.versions.append((version, result, added))
    plan.by_digest[digest] = result
    plan.in_progress.discard(digest)
    return result


# ---------------------------------------------------------------------------------------------- versions
def hub_versions(repo: str, *, endpoint: str | None = None, token: str | bool | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> list[HubVersion]:
    """The ``v{N}`` tags of ``repo`` (oldest first) with the content hash, name, kind and task each holds.

    Raises HubError when the repo cannot be listed. A tag whose card cannot be read (or that the server
    answers with a non-hex commit id/ETag or over 1 MiB) is listed with ``error`` set instead of failing
    the whole listing. Cards are read into memory: ``cache_dir`` is accepted for compatibility, unused.
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
            card = parse_hub_card(hub.fetch_card(repo, t.target_commit)[1],
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

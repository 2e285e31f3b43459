"""The web view's safety settings and the ASGI middleware that enforces them.

Safe by default (docs/ui.md): the server binds 127.0.0.1; any other address needs a token. Every request's
``Host`` header must be in the allow-list (a DNS-rebinding page cannot reach the local server under its
own name); with a token set every request must carry it (``Authorization: Bearer``, or the cookie the
login form sets); every response carries a Content-Security-Policy that allows no script, no frame and no
outside resource. Writes (tag, untag, deploy apply/revert/rollback) exist only with ``allow_writes`` and
need the per-server CSRF token of the page's form (checked in :mod:`adapterhub.ui.app`).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "adapterhub_token"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class UiSettings:
    """How the app guards itself. ``allowed_hosts``: host names (no port) accepted in the Host header;
    ``token``: required on every request when set; ``allow_writes``: the POST actions exist;
    ``csrf``: the per-server token every write form carries (random unless given)."""

    allowed_hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)
    token: str | None = None
    allow_writes: bool = False
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a Host header (``name[:port]``, ``[v6]:port``) names an allowed host."""
        if not host_header:
            return False
        h = host_header.strip().lower()
        if h.startswith("["):
            name = h[1:h.find("]")] if "]" in h else h
        else:
            name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
        return name in self.allowed_hosts

    def token_ok(self, given: str | None) -> bool:
        """Constant-time check of a presented token (always True when no token is set)."""
        if self.token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


def settings_for(host: str, *, token: str | None, allow_writes: bool, extra_hosts: tuple[str, ...] = ()
                 ) -> UiSettings:
    """The settings for serving on ``host``: loopback names plus ``host`` (unless a wildcard) and
    ``extra_hosts`` are allowed. Raises UiError when ``host`` is not loopback and there is no token."""
    if not is_loopback(host) and not token:
        raise UiError(f"serving on {host} (not this machine only) needs a token")
    hosts = {h.lower() for h in LOOPBACK_NAMES} | {h.strip("[]").lower() for h in extra_hosts}
    if host not in ("0.0.0.0", "::", ""):
        hosts.add(host.strip("[]").lower())
    return UiSettings(allowed_hosts=frozenset(hosts), token=token, allow_writes=allow_writes)


def write_token_file(path: Path) -> str:
    """Make a random token and write it to ``path``, readable by the user only (0600, never through a
    symlink, replacing an older token file); returns the token. Raises UiError if it cannot be written."""
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise UiError(f"cannot write the token file {path}: {e.strerror or e}") from None
    return token


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k == name:
            return bytes(v).decode("latin-1")
    return None


def cookie(scope: Scope, name: str) -> str | None:
    """The value of cookie ``name`` in the request, or None."""
    raw = _header(scope, b"cookie")
    for part in (raw or "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


class SecurityMiddleware:
    """Host allow-list, token check and security headers around the whole app (a plain ASGI middleware).

    Requests to ``/login`` and ``/static/`` pass without the token (the login form posts it); everything
    else without it gets 401 (JSON under ``/api/``, the login page elsewhere)."""

    def __init__(self, app: ASGIApp, settings: UiSettings, login_page: Callable[[], bytes]) -> None:
        self.app = app
        self.settings = settings
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k not in dict(SECURITY_HEADERS)]
                message["headers"] = headers + SECURITY_HEADERS
            await send(message)

        if not self.settings.host_allowed(_header(scope, b"host")):
            await _plain(send_with_headers, 400, b"Invalid Host header (not in the allow-list)\n")
            return
        path = scope.get("path", "")
        if self.settings.token is not None and path != "/login" and not path.startswith("/static/"):
            auth = _header(scope, b"authorization") or ""
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else cookie(scope, TOKEN_COOKIE)
            if not self.settings.token_ok(given):
                if path.startswith("/api/"):
                    body = json.dumps({"error": "a token is required (Authorization: Bearer TOKEN)"}).encode()
                    await _send(send_with_headers, 401, body, b"application/json")
                else:
                    await _send(send_with_headers, 401, self.login_page(), b"text/html; charset=utf-8")
                return
        await self.app(scope, receive, send_with_headers)


async def _send(send: Send, status: int, body: bytes, ctype: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _plain(send: Send, status: int, body: bytes) -> None:
    await _send(send, status, body, b"text/plain; charset=utf-8")


__all__ = ["CSP", "LOOPBACK_NAMES", "SecurityMiddleware", "TOKEN_COOKIE", "UiError", "UiSettings", "cookie",
           "is_loopback", "settings_for", "write_token_file"]

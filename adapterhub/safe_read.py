"""Reading files and JSON documents that someone else wrote, without hanging, exhausting memory or crashing.

Folders a user points us at (base model folders, PEFT folders, adapter files) and documents stored for
them (metrics, training configs, cards) are data from outside: a FIFO or a device in place of a file
must not block or stream forever, and a JSON document must not escape as ``RecursionError`` (a nesting
bomb), ``ValueError`` (an integer over Python's 4,300-digit limit, bad UTF-8) or ``AttributeError`` (a
list where an object was expected). Everything here raises the caller's one-line error class instead.

No torch import (the catalog commands start torch-free).
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
from typing import Any

from .errors import AdapterHubError

#: the largest JSON side file (config.json, adapter_config.json) we read
MAX_JSON_FILE_BYTES = 16 * 1024 * 1024
#: limits of a JSON document we store (metrics, training configs) or keep from a foreign file
MAX_DOC_DEPTH = 32
MAX_DOC_BYTES = 1024 * 1024
#: integers beyond this magnitude are refused in stored documents (JSON readers elsewhere lose precision)
MAX_DOC_INT = 2 ** 63


class NotRegularFile(OSError):
    """Raised by :func:`open_regular` for a FIFO, socket, device or folder (``strerror`` says which)."""


def clip(value: object, n: int = 80) -> str:
    """``repr`` of ``value`` cut to about ``n`` characters, for one-line error messages."""
    r = repr(value) if not isinstance(value, str) else repr(value[: n + 1])
    return r if len(r) <= n + 2 else r[:n] + "..."


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], *, follow: bool = True) -> int:
    """A read-only descriptor of ``path`` if it is a regular file (after symlinks unless ``follow=False``).

    Opens with ``O_NONBLOCK`` so that a FIFO never blocks the open. Raises FileNotFoundError,
    :class:`NotRegularFile` (a FIFO, device, socket or folder; ``strerror`` names it), or another OSError
    (``ELOOP`` for a symlink when ``follow=False``).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, _kind(mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], *, limit: int | None = None) -> bytes:
    """All bytes of regular file ``path`` (at most ``limit``; more raises OSError ``EFBIG``).

    Raises FileNotFoundError, :class:`NotRegularFile`, OSError.
    """
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data


def loads(data: bytes | str, what: str, error: type[AdapterHubError]) -> Any:
    """``json.loads`` that raises only ``error`` (one line naming ``what``): bad UTF-8, bad JSON, NaN/Infinity,
    nesting bombs, integers over 4,300 digits."""
    def no_constant(c: str) -> Any:
        raise ValueError(f"{c} is not JSON")

    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise error(f"{what}: not UTF-8 text") from None
    except ValueError as e:  # JSONDecodeError, too many digits, NaN/Infinity
        raise error(f"{what}: not valid JSON ({str(e).splitlines()[0][:80]})") from None


def read_json_file(path: str | os.PathLike[str], what: str, error: type[AdapterHubError], *,
                   limit: int = MAX_JSON_FILE_BYTES) -> Any:
    """The JSON document in regular file ``path`` (at most ``limit`` bytes). Raises ``error`` (one line)
    for a missing, special (FIFO, device), oversized, non-UTF-8 or malformed file."""
    try:
        data = read_regular(path, limit=limit)
    except OSError as e:
        raise error(f"{what}: cannot read ({e.strerror or e.__class__.__name__})") from None
    return loads(data, what, error)


def check_doc(value: Any, what: str, error: type[AdapterHubError], *, max_depth: int = MAX_DOC_DEPTH,
              max_bytes: int = MAX_DOC_BYTES, finite: bool = False) -> Any:
    """Return ``value`` if it is a JSON document we can store and read back: objects with string keys (no
    NUL), lists, strings (no NUL), floats (only finite ones with ``finite=True``; a diverged run's NaN loss
    is a fact worth keeping), integers within ``±2**63``, booleans, null; at most ``max_depth`` deep and
    ``max_bytes`` serialised. Raises ``error`` (one line)."""
    def walk(v: Any, depth: int) -> None:
        if depth > max_depth:
            raise error(f"{what}: nested deeper than {max_depth} levels")
        if v is None or isinstance(v, bool):
            return
        if isinstance(v, int):
            if not -MAX_DOC_INT <= v < MAX_DOC_INT:
                raise error(f"{what}: integer out of range (at most 2**63 in magnitude)")
        elif isinstance(v, float):
            if finite and not math.isfinite(v):
                raise error(f"{what}: {v} is not a JSON number")
        elif isinstance(v, str):
            if "\0" in v:
                raise error(f"{what}: string {clip(v, 40)} contains NUL")
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str) or "\0" in k:
                    raise error(f"{what}: key {clip(k, 40)} must be a string without NUL")
                walk(x, depth + 1)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x, depth + 1)
        else:
            raise error(f"{what}: {type(v).__name__} is not a JSON value")

    walk(value, 0)
    size = len(json.dumps(value, ensure_ascii=False))
    if size > max_bytes:
        raise error(f"{what}: {size} bytes of JSON, at most {max_bytes} allowed")
    return value


def short_text(value: Any, n: int = 200) -> str | None:
    """``value`` if it is a printable string of at most ``n`` characters, else None (for display fields taken
    from foreign files, e.g. a base's architecture or a PEFT config's ``peft_version``)."""
    if isinstance(value, str) and 0 < len(value) <= n and value.isprintable():
        return value
    return None


__all__ = ["NotRegularFile", "clip", "open_regular", "read_regular", "loads", "read_json_file", "check_doc",
           "short_text", "MAX_JSON_FILE_BYTES", "MAX_DOC_DEPTH", "MAX_DOC_BYTES"]

"""Parsing of REFs: ``name``, ``name@N``, ``name@tag``, ``name@latest``, ``name@~N``, ``sha256:<8+ hex>``.

``name@latest`` is the bare ``name`` (the newest version); ``name@~N`` is the version ``N`` before the
newest (``@~0`` is the newest, ``@~1`` the one before it), counted over the adapter's existing versions
by number, deprecated ones included. ``latest`` and tags of the form ``~N`` are therefore not tag names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import NameError_, RefError
from .names import validate_name

_HASH_RE = re.compile(r"^sha256:([0-9a-f]{8,64})$")


@dataclass(frozen=True)
class Ref:
    """A parsed reference. Exactly one of the shapes is set."""

    name: str | None = None
    number: int | None = None
    tag: str | None = None
    hash_prefix: str | None = None
    back: int | None = None  # ``name@~N``: N versions before the newest

    def __str__(self) -> str:
        if self.hash_prefix is not None:
            return f"sha256:{self.hash_prefix}"
        if self.number is not None:
            return f"{self.name}@{self.number}"
        if self.back is not None:
            return f"{self.name}@~{self.back}"
        if self.tag is not None:
            return f"{self.name}@{self.tag}"
        return str(self.name)


def parse_ref(text: object) -> Ref:
    """Parse a REF string; raises RefError with the accepted forms on anything else."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise RefError(f"invalid ref {text!r}: use name, name@N, name@tag, name@latest, name@~N or sha256:<8+ hex digits>")
    if text.startswith("sha256:"):
        m = _HASH_RE.match(text.lower())
        if not m:
            raise RefError(f"invalid ref {text!r}: a hash ref is sha256: followed by 8 to 64 hex digits")
        return Ref(hash_prefix=m.group(1))
    name, sep, rest = text.partition("@")
    try:
        validate_name(name, "adapter name")
        if not sep or rest == "latest":
            return Ref(name=name)
        if rest.startswith("~"):
            k = rest[1:]
            if not (k.isascii() and k.isdigit() and len(k) <= 9):
                raise RefError(f"invalid ref {text!r}: a relative ref is name@~N with N = 0, 1, 2... (at most 9 digits)")
            return Ref(name=name, back=int(k))
        if rest.isascii() and rest.isdigit():  # not '²' or other Unicode digits
            n = int(rest)
            if n < 1 or len(rest) > 9:
                raise RefError(f"invalid ref {text!r}: version numbers start at 1"
                               + (" and have at most 9 digits" if len(rest) > 9 else ""))
            return Ref(name=name, number=n)
        validate_name(rest, "tag")
    except NameError_ as e:
        raise RefError(f"invalid ref {text!r}: {e}") from None
    return Ref(name=name, tag=rest)

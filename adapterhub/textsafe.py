"""Untrusted text made visible: the one escaper behind the CLI's terminal output and the web view.

Names, tasks, cards and metric keys can come from a hostile Hub. Before any of them reaches a terminal or
a page, every control, format (bidi overrides, zero-width), line/paragraph separator, surrogate,
private-use or unassigned character is written as its escape (``\\x1b``, ``\\u202e``), and the password of
any URL in it as ``***``.
"""
from __future__ import annotations

import re
import unicodedata

# control, format (bidi overrides, zero-width), line/paragraph separators, surrogates, private use, unassigned
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def is_unsafe(ch: str) -> bool:
    """Whether ``ch`` must never be shown raw (a space is always safe)."""
    return ch != " " and unicodedata.category(ch) in UNSAFE_CATEGORIES


def visible(value: str, *, newlines: bool = False) -> str:
    """``value`` with every unsafe character (see :func:`is_unsafe`) written as its escape; tabs too, and
    newlines unless ``newlines`` (text whose lines are meant to be kept). The password of any URL in it is
    replaced too (:func:`redact_urls`)."""
    value = redact_urls(value)
    if value.isprintable() and value.isascii():
        return value
    out = []
    for ch in value:
        if ch == "\n" and newlines:
            out.append(ch)
        elif is_unsafe(ch):
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


# ``scheme://userinfo@``: what a URL carries its user and password in
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s]*@")


# ``scheme://user:password`` cut off before its ``@`` (a message quoting the part of a REF before its '@'): a
# ``host:port`` has only digits after the colon, so a colon followed by anything else, up to the end of the word,
# is taken for a password
_CUT_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"\[\]:]*:(?![0-9]*(?:[/'\"\s]|$))[^/\s@'\"]*"
                           r"(?=['\"\s]|$)")


def redact_urls(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it replaced by ``***@``: a URL's password is
    never shown, even one typed into the wrong option or carried by a hostile card. A URL cut off right after its
    password (``scheme://user:password``, then the end of a quoted word) becomes ``scheme://***``."""
    if "://" not in text:
        return text
    if "@" in text:
        text = _USERINFO.sub(r"\1***@", text)
    return _CUT_USERINFO.sub(r"\1***", text)


def excerpt(value: object, n: int = 40) -> str:
    """The first ``n`` characters of ``str(value)`` for a message that quotes a bad value, its URLs' passwords
    replaced first (a cut made before :func:`redact_urls` could keep a password's start and lose its ``@``)."""
    return redact_urls(str(value))[:n]


__all__ = ["UNSAFE_CATEGORIES", "excerpt", "is_unsafe", "redact_urls", "visible"]

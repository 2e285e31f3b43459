"""Untrusted text made visible: the one escaper behind the CLI's terminal output and the web view.

Names, tasks, cards and metric keys can come from a hostile Hub. Before any of them reaches a terminal or
a page, every control, format (bidi overrides, zero-width), line/paragraph separator, surrogate,
private-use or unassigned character is written as its escape (``\\x1b``, ``\\u202e``).
"""
from __future__ import annotations

import unicodedata

# control, format (bidi overrides, zero-width), line/paragraph separators, surrogates, private use, unassigned
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def is_unsafe(ch: str) -> bool:
    """Whether ``ch`` must never be shown raw (a space is always safe)."""
    return ch != " " and unicodedata.category(ch) in UNSAFE_CATEGORIES


def visible(value: str, *, newlines: bool = False) -> str:
    """``value`` with every unsafe character (see :func:`is_unsafe`) written as its escape; tabs too, and
    newlines unless ``newlines`` (text whose lines are meant to be kept)."""
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


__all__ = ["UNSAFE_CATEGORIES", "is_unsafe", "visible"]

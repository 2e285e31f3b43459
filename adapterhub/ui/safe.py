"""Catalog strings made visible and safe for HTML: control characters shown as ``\\xNN``, then escaped.

Names, tasks, cards and metric keys can come from a hostile Hub. Jinja2's autoescape handles ``<``, ``&``
and quotes; an ESC or other control character would still reach the page raw, so the templates'
``finalize`` hook and the SVG builders pass every value through :func:`visible` first.
"""
from __future__ import annotations

import unicodedata
from typing import Any

from markupsafe import Markup, escape

# control, format (bidi overrides, zero-width), line/paragraph separators, surrogates, private use, unassigned
_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def visible(value: str, *, newlines: bool = False) -> str:
    """``value`` with every control, format (bidi, zero-width), separator, surrogate, private-use or
    unassigned character written as its escape (``\\x1b``, ``\\u202e``); tabs too, and newlines unless
    ``newlines`` (Markdown source keeps its lines)."""
    if value.isprintable() and value.isascii():
        return value
    out = []
    for ch in value:
        if ch == "\n" and newlines:
            out.append(ch)
        elif ch != " " and unicodedata.category(ch) in _UNSAFE:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def esc(value: Any) -> Markup:
    """Escaped HTML text of ``value`` (control characters made visible first)."""
    if isinstance(value, Markup):
        return value
    return escape(visible(str(value)))


def attr_value(value: Any) -> Markup:
    """``value`` for a form field's ``value`` attribute: sent back to the server exactly as stored, so only
    HTML-escaped, with control characters as numeric references (no raw control byte in the page)."""
    s = "" if value is None else str(value)
    out = str(escape(s))
    if not (s.isprintable() and s.isascii()):
        out = "".join(f"&#{ord(ch)};" if ch != " " and unicodedata.category(ch) in _UNSAFE else ch for ch in out)
    return Markup(out)


def finalize(value: Any) -> Any:
    """Jinja2 ``finalize``: strings get :func:`visible` (autoescape then escapes them); None prints as empty."""
    if value is None:
        return ""
    if isinstance(value, Markup):
        return value
    if isinstance(value, str):
        return visible(value)
    return value


__all__ = ["attr_value", "esc", "finalize", "visible"]

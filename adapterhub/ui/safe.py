"""Catalog strings made visible and safe for HTML: control characters shown as ``\\xNN``, then escaped.

Names, tasks, cards and metric keys can come from a hostile Hub. Jinja2's autoescape handles ``<``, ``&``
and quotes; an ESC or other control character would still reach the page raw, so the templates'
``finalize`` hook and the SVG builders pass every value through ``adapterhub.textsafe.visible`` first.
"""
from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

from ..textsafe import is_unsafe, visible


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
        out = "".join(f"&#{ord(ch)};" if is_unsafe(ch) else ch for ch in out)
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

"""Validation of user-supplied names (adapters, tags, bases, deployments, tasks)."""
from __future__ import annotations

import re

from ..errors import NameError_

MAX_NAME_LENGTH = 100
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a safe identifier, else raise NameError_.

    Safe means: 1-100 characters from ``[A-Za-z0-9_.-]``, starting with a letter or digit,
    not ``.``/``..`` and no path separators, NUL or ``@`` — so a name can never escape the
    home directory when used as a path component and never be confused with a REF.
    """
    if not isinstance(name, str):
        raise NameError_(f"{what} must be a string")
    if not name:
        raise NameError_(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise NameError_(f"{what} is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed")
    if "/" in name or "\\" in name or "\0" in name or ".." in name:
        raise NameError_(f"{what} {name!r} contains a path separator, NUL or '..'")
    if not _NAME_RE.fullmatch(name):  # fullmatch: '$' would accept a trailing newline
        raise NameError_(f"{what} {name!r} may contain only letters, digits, '_', '.' and '-', starting with a letter or digit")
    return name

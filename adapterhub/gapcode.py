"""The one gap coder of sorted flat positions (no torch: numpy and the error types only).

The adapter format stores a parameter's element indices this way (:mod:`adapterhub.format`), the mask hash is
defined over the same bytes (:mod:`adapterhub.maskhash`) and the deployments' undo records code their
positions with it (:mod:`adapterhub.apply.disk`; checked without torch by ``deploy verify``):
the sorted positions ``i`` become the gaps ``i[k] - i[k-1]`` (``i[-1] = -1``) as little-endian uint16; a gap
of :data:`GAP_LIMIT` or more is written as 0 and its value appended to the little-endian int64 escapes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import FormatError

GAP_LIMIT = 1 << 16

__all__ = ["GAP_LIMIT", "encode_gaps", "decode_gaps"]


def encode_gaps(pos: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Sorted unique positions (a numpy array, a torch tensor on any device, or ints) -> (uint16 gaps, int64
    escapes), both little-endian."""
    if hasattr(pos, "detach"):  # a torch tensor, maybe on an accelerator
        pos = pos.detach().cpu().numpy()
    a = np.asarray(pos, dtype=np.int64).reshape(-1)
    gaps = np.empty(a.size, dtype=np.int64)
    if a.size:
        gaps[0] = a[0] + 1
        np.subtract(a[1:], a[:-1], out=gaps[1:])
    big = gaps >= GAP_LIMIT
    esc = gaps[big].astype("<i8")
    gaps[big] = 0
    return gaps.astype("<u2"), esc


def decode_gaps(gaps: np.ndarray[Any, Any], escapes: np.ndarray[Any, Any], name: str) -> np.ndarray[Any, Any]:
    """Inverse of :func:`encode_gaps` (a new int64 array). Raises: FormatError naming ``name`` if the zero gaps
    and the escape values do not match, or an escape is below GAP_LIMIT."""
    g = gaps.astype(np.int64)
    zero = g == 0
    nz = int(np.count_nonzero(zero))
    if nz != escapes.size:
        raise FormatError(f"{name}: {nz} escaped gaps but {escapes.size} escape values")
    if nz:
        if bool((escapes < GAP_LIMIT).any()):
            raise FormatError(f"{name}: escape value below {GAP_LIMIT}")
        g[zero] = escapes
    idx: np.ndarray[Any, Any] = np.cumsum(g)
    idx -= 1
    return idx

"""The one definition of a mask's hash: what the catalog stores as a version's ``mask_hash`` and what
training records in its mask events (``card["training"]["mask_events"][i]["mask_hash"]``).

Two masks hash equal exactly when they touch the same element positions of the same base tensors.
Definition 2 (issue 19; catalogs made before are migrated by Alembic revision 0006)::

    sha256( "adapterhub.mask-hash/2\\n"
            per base tensor, in name order:
              json([name, shape, count, escapes]) "\\n"   (json.dumps defaults, shape as a list of ints)
              count little-endian uint16 gaps
              escapes little-endian int64 escape values )

where the gaps and escapes are the canonical index coding of the adapter file format
(:mod:`adapterhub.gapcode`, :mod:`adapterhub.format`): the sorted flat element indices ``i`` become ``i[k] - i[k-1]`` (``i[-1] = -1``),
a gap of 65536 or more is written as 0 and its value appended to the escapes. That coding is a bijection
on sorted index sets, so the hash still depends only on the positions; and it is exactly the bytes an
element-layout file stores, so ``register`` and ``pull`` hash a file's own index bytes in one pass (2 B
per non-zero) instead of materialising int64 indices (8 B per non-zero, definition 1). Block-layout
parameters hash as the elements their blocks cover, so a block mask and the equal element mask agree.

No torch here (numpy, hashlib and the one strict safetensors header reader), so the catalog and its
migrations can use it without importing torch.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np

from .gapcode import encode_gaps

PREFIX = b"adapterhub.mask-hash/2\n"

__all__ = ["PREFIX", "MaskHasher", "mask_hash", "encode_gaps", "mask_hash_of_file"]


def _line(name: str, shape: Iterable[int], count: int, n_escapes: int) -> bytes:
    """``json.dumps([name, [*shape], count, n_escapes]) + "\\n"`` as bytes, written out (json.dumps' own string
    encoder for the name; ints as json writes them): the same bytes without the encoder's per-call set-up."""
    dims = ", ".join([str(int(s)) for s in shape])
    return f"[{encode_basestring_ascii(name)}, [{dims}], {int(count)}, {int(n_escapes)}]\n".encode()


class MaskHasher:
    """The mask hash built one tensor at a time (tensors in increasing name order)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(PREFIX)
        self._last: str | None = None

    def add_encoded(self, name: str, shape: Iterable[int], gaps: Any, count: int, escapes: Any, n_escapes: int) -> None:
        """Add one tensor from its coded indices: ``gaps`` / ``escapes`` are buffers holding exactly the
        ``count`` little-endian uint16 gaps and ``n_escapes`` little-endian int64 escapes (e.g. slices of a
        file). Raises ValueError for a name out of order."""
        if self._last is not None and name <= self._last:
            raise ValueError(f"{name}: mask hash tensors must come in increasing name order")
        self._last = name
        self._h.update(_line(name, shape, count, n_escapes))
        self._h.update(gaps)
        self._h.update(escapes)

    def add(self, name: str, shape: Iterable[int], idx: Any) -> None:
        """Add one tensor from its sorted flat element indices (torch tensor, numpy array or ints)."""
        gaps, esc = encode_gaps(idx)
        self.add_encoded(name, shape, gaps.tobytes(), gaps.size, esc.tobytes(), esc.size)

    def copy(self) -> MaskHasher:
        out = MaskHasher()
        out._h, out._last = self._h.copy(), self._last
        return out

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def mask_hash(masks: Mapping[str, tuple[Iterable[int], Any]]) -> str:
    """sha256 hex of a mask.

    Takes: base tensor name -> ``(shape, sorted flat element indices)``; the indices may be a
        (CPU) torch tensor, a numpy array or a sequence of ints.
    Returns: 64 lowercase hex characters; equal for equal masks whatever the key order.
    """
    h = MaskHasher()
    for name in sorted(masks):
        shape, idx = masks[name]
        h.add(name, shape, idx)
    return h.hexdigest()


def _block_elements(shape: tuple[int, ...], block: int, bidx: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Sorted element positions covered by the blocks ``bidx`` of the 2-D view of ``shape``
    (as :meth:`adapterhub.format.SparseParam.flat`)."""
    cols = shape[-1] if len(shape) >= 2 else (shape[0] if shape else 1)
    nbc = cols // block
    br, bc = bidx // nbc, bidx % nbc
    ar = np.arange(block, dtype=np.int64)
    flat = ((br[:, None, None] * block + ar[None, :, None]) * cols + (bc[:, None, None] * block + ar[None, None, :]))
    return np.sort(flat.reshape(-1))


def mask_hash_of_file(data: Any) -> str:
    """The mask hash of a stored adapter file's bytes (a blob the catalog accepted), without torch.

    Element-layout parameters are hashed from the file's own index bytes; block-layout ones are expanded to
    the elements they cover. Raises ValueError (or a HeaderError) for bytes that are not an adapter file.
    """
    from . import st_io

    header = st_io.parse_header(data, "adapter")
    doc = json.loads(header.metadata["adapterhub"])
    mv = memoryview(data)
    h = MaskHasher()
    for name in sorted(doc["params"]):
        spec = doc["params"][name]
        shape = tuple(int(s) for s in spec["shape"])
        ie = header.entries[f"param::{name}::idx"]
        ee = header.entries.get(f"param::{name}::esc")
        gaps = mv[header.data_start + ie.begin:header.data_start + ie.end]
        esc = mv[header.data_start + ee.begin:header.data_start + ee.end] if ee is not None else b""
        if ie.dtype != "U16" or (ee is not None and ee.dtype != "I64"):
            raise ValueError(f"{name}: not an adapter file's index coding")
        n, n_esc = len(gaps) // 2, len(esc) // 8
        if spec.get("layout", "element") == "element":
            h.add_encoded(name, shape, gaps, n, esc, n_esc)
            continue
        g = np.frombuffer(gaps, dtype="<u2").astype(np.int64)
        if n_esc:
            g[g == 0] = np.frombuffer(esc, dtype="<i8")
        bidx = np.cumsum(g) - 1
        h.add(name, shape, _block_elements(shape, int(spec["block_size"]), bidx))
    return h.hexdigest()

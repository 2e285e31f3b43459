"""The one safetensors header reader and the one safetensors dtype table.

Every place that reads a ``.safetensors`` header (adapter files in :mod:`adapterhub.format`, base model
folders in :mod:`adapterhub.bases.sources`, deployment weights and undo records in :mod:`adapterhub.apply.disk`)
goes through :func:`parse_header` / :func:`read_header`, so a hostile or damaged file gets the same
strict checks everywhere and only ever raises :class:`~adapterhub.errors.HeaderError` (a one-line
``FormatError`` naming the file and what is wrong), never ``TypeError``/``KeyError``/``ValueError``/
``OverflowError``/``MemoryError``.

Checks, in order, before anything is allocated from a size the file declares:

* the 8-byte little-endian header length is at most :data:`MAX_HEADER_BYTES` and fits in the file;
* the header is UTF-8 JSON, an object, with no duplicate keys;
* ``__metadata__`` (optional) maps strings to strings;
* every other entry is an object with ``dtype`` in :data:`DTYPE_SIZES`, ``shape`` a list of at most
  :data:`MAX_RANK` non-negative ints below ``2**48``, ``data_offsets`` ``[begin, end]`` ints with
  ``0 <= begin <= end <= data bytes`` and ``end - begin == numel * itemsize``;
* the tensors tile the data region exactly: no overlap, no hole, no trailing bytes (as the
  ``safetensors`` library itself requires).

This module never imports torch at import time (the CLI starts torch-free); :func:`torch_dtype`
maps a name to a torch dtype lazily.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import HeaderError
from .safe_read import open_regular

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DTYPE_SIZES", "FLOAT_DTYPES", "MAX_HEADER_BYTES", "MAX_RANK", "MAX_DIM", "TensorEntry", "Header",
           "parse_header", "read_header", "torch_dtype", "torch_dtypes", "st_name", "HeaderError"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_RANK = 8
MAX_DIM = 1 << 48

# safetensors dtype name -> item size in bytes: THE dtype table of the project.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# the floating dtypes whose values can be patched (apply/revert) in place
FLOAT_DTYPES: tuple[str, ...] = ("F32", "F16", "BF16", "F64")

_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
                "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}


class TensorEntry(NamedTuple):
    """One tensor of a header: dtype name, shape, and [begin, end) relative to the data region.

    A named tuple (cheap to build: a header can hold thousands) read by name or by position."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors by name, ``__metadata__``, where the data starts, file size."""

    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _prefix(source: str | None) -> str:
    return f"{_show(source)}: " if source else ""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` object hook: the object as a dict, built at C speed; a key seen twice raises _Duplicate
    naming the first key that repeats (in document order)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return out


class _Duplicate(Exception):
    pass


def _show(name: str) -> str:
    """A tensor name fit for a one-line message: as is when printable and short, else its escaped repr."""
    return name if name.isprintable() and len(name) <= 200 else repr(name[:200])


def _brief(x: Any) -> str:
    """A short, escaped rendering of a header value (never raises)."""
    try:
        r = repr(x)
    except (RecursionError, ValueError):
        r = type(x).__name__
    return r if len(r) <= 80 else r[:77] + "..."


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_length(hlen: int, file_size: int, source: str | None = None) -> None:
    """Raise HeaderError unless a declared header length ``hlen`` is sane for a file of ``file_size`` bytes."""
    if hlen > MAX_HEADER_BYTES or 8 + hlen > file_size:
        raise HeaderError(f"{_prefix(source)}file is truncated or corrupt: header declares {hlen} bytes, "
                          f"file has {file_size}")


def parse_json(raw: bytes, hlen: int, file_size: int, source: str | None = None) -> Header:
    """Validate the header bytes ``raw`` (the ``hlen`` bytes after the length field) of a file of
    ``file_size`` bytes. Returns the :class:`Header`; raises HeaderError."""
    p = _prefix(source)
    try:
        header = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise HeaderError(f"{p}bad safetensors header: key {str(e.args[0])[:80]!r} appears twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also ints over 4300 digits
        raise HeaderError(f"{p}bad safetensors header: {e.__class__.__name__}") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{p}bad safetensors header: not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(f"{p}bad safetensors header: __metadata__ must map strings to strings")
    data_start = 8 + hlen
    body = file_size - data_start
    entries = _valid_entries(header, body)
    if entries is None:  # something is wrong: the per-entry checks below name it, in header order
        entries = {name: _entry(name, info, body, p) for name, info in header.items()}
        _check_tiling(entries, body, p)
    return Header(entries, meta, data_start, file_size)


def _valid_entries(header: dict[str, Any], body: int) -> dict[str, TensorEntry] | None:
    """The entries of ``header`` when every one passes :func:`_entry`'s checks and they tile ``body`` bytes
    exactly; None as soon as anything fails (then :func:`_entry` and :func:`_check_tiling` find it and word
    the error). The same checks as theirs in one tight loop, without building any message: it accepts
    exactly what they accept (tests/test_st_io_fast.py compares the two on fuzzed headers)."""
    try:
        "".join(header).encode("utf-8")  # a lone surrogate escaped in the JSON, in any name
    except UnicodeEncodeError:
        return None
    sizes, rank, dim = DTYPE_SIZES, MAX_RANK, MAX_DIM
    out: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if type(info) is not dict:
            return None
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if type(dt) is not str or type(shape) is not list or type(offs) is not list or len(offs) != 2 \
                or len(shape) > rank:
            return None
        need = sizes.get(dt)
        b, e = offs
        if need is None or type(b) is not int or type(e) is not int or not 0 <= b <= e <= body:
            return None
        for d in shape:
            if type(d) is not int or not 0 <= d < dim:
                return None
            need *= d
        if need != e - b:
            return None
        out[name] = TensorEntry(dt, tuple(shape), b, e)
        spans.append((b, e))
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            return None
        pos = e
    return out if pos == body else None


def _entry(name: str, info: Any, body: int, p: str) -> TensorEntry:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
        raise HeaderError(f"{p}bad safetensors header: tensor name {name[:200]!r} is not valid Unicode") from None
    n_ = _show(name)
    if not isinstance(info, dict):
        raise HeaderError(f"{p}{n_}: bad tensor entry in header")
    dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dt, str) or dt not in DTYPE_SIZES:
        raise HeaderError(f"{p}{n_}: unsupported dtype {_brief(dt)}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(_is_int(s) and 0 <= s < MAX_DIM for s in shape)):
        raise HeaderError(f"{p}{n_}: bad shape {_brief(shape)}")
    if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= body):
        raise HeaderError(f"{p}{n_}: data offsets {_brief(offs)} lie outside the file ({body} data bytes; "
                          "truncated or corrupt)")
    n = 1
    for s in shape:
        n *= s
    need = n * DTYPE_SIZES[dt]
    if need != offs[1] - offs[0]:
        raise HeaderError(f"{p}{n_}: shape {shape} of {dt} needs {need} bytes, header gives {offs[1] - offs[0]}")
    return TensorEntry(dt, tuple(shape), offs[0], offs[1])


def _check_tiling(entries: dict[str, TensorEntry], body: int, p: str) -> None:
    pos = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end, kv[0])):
        if e.begin != pos:
            raise HeaderError(f"{p}{_show(name)}: tensor data overlaps or leaves a hole at byte {pos}")
        pos = e.end
    if pos != body:
        raise HeaderError(f"{p}file has {body - pos} trailing bytes after the last tensor (truncated or corrupt)")


def parse_header(data: Any, source: str | None = None) -> Header:
    """Validate the header of a whole safetensors file held in memory (``bytes``, ``bytearray``,
    ``memoryview`` or ``mmap``). ``source`` names the file in error messages. Raises HeaderError."""
    size = len(data)
    if size < 8:
        raise HeaderError(f"{_prefix(source)}file is truncated: no safetensors header")
    (hlen,) = struct.unpack("<Q", bytes(data[:8]))
    check_length(hlen, size, source)
    return parse_json(data[8:8 + hlen], hlen, size, source)


def read_header(path: str | os.PathLike[str], source: str | None = None) -> Header:
    """Validate the header of the safetensors file at ``path``, reading only the header bytes.

    ``source`` names the file in messages (default: the file name). Raises HeaderError (also for an
    unreadable or missing file)."""
    path = Path(path)
    src = source if source is not None else path.name
    try:
        with os.fdopen(open_regular(path), "rb") as f:  # a FIFO or device never blocks or streams forever
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise HeaderError(f"{_prefix(src)}file is truncated: no safetensors header")
            (hlen,) = struct.unpack("<Q", raw)
            check_length(hlen, size, src)
            hbytes = f.read(hlen)
    except OSError as e:
        raise HeaderError(f"{_prefix(src)}cannot read ({e.strerror or e.__class__.__name__})") from None
    if len(hbytes) != hlen:  # the file shrank under us
        raise HeaderError(f"{_prefix(src)}file is truncated or corrupt: header shorter than declared")
    return parse_json(hbytes, hlen, size, src)


_TORCH_CACHE: dict[str, "torch.dtype"] = {}


def torch_dtypes() -> dict[str, "torch.dtype"]:
    """safetensors name -> torch dtype for every name of :data:`DTYPE_SIZES` this torch supports (imports torch)."""
    if not _TORCH_CACHE:
        import torch

        for n, tn in _TORCH_NAMES.items():
            dt = getattr(torch, tn, None)
            if dt is not None:
                _TORCH_CACHE[n] = dt
    return dict(_TORCH_CACHE)


def torch_dtype(name: str, source: str | None = None) -> "torch.dtype":
    """The torch dtype of safetensors dtype ``name``; raises HeaderError for a name this torch lacks."""
    table = torch_dtypes()
    if name not in table:
        raise HeaderError(f"{_prefix(source)}unsupported dtype {name!r}")
    return table[name]


def st_name(dtype: "torch.dtype") -> str | None:
    """The safetensors name of a torch dtype, or None if it has none."""
    for n, dt in torch_dtypes().items():
        if dt == dtype:
            return n
    return None

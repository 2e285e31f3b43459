"""The adapterhub sparse adapter file format (``adapterhub.sparse/1``).

One ``.safetensors`` file holds, per target parameter of a base model, the positions of the
non-zero entries of a weight delta and their values, plus optional dense extras (a task head)
and a JSON card in the header metadata. See ``docs/format.md`` for the full specification.

Design points (why, not what):

* Indices are flat row-major positions, strictly increasing. They are stored as **uint16 gaps**
  (``idx[i] - idx[i-1]``, with ``idx[-1] = -1``); a gap that does not fit in 16 bits is written
  as ``0`` (impossible otherwise, gaps are >= 1) and its real value goes into a small int64
  escape list. That is 2 bytes per non-zero at any density where gaps stay below 65536
  (PEFT SHiRA stores 8: two int32 COO coordinates).
* Block layout stores one gap-encoded index per ``b x b`` tile of the 2-D view of the tensor.
* We write the safetensors container ourselves (it is tiny: u64 header length, JSON header,
  raw bytes) so the bytes are canonical: sorted JSON keys, no whitespace, tensors ordered by
  (alignment, name), header padded with spaces to 8 bytes, a single metadata entry. The file
  is still read by the ``safetensors`` library. The same adapter always gives the same bytes,
  so the file's sha256 is the version identity.
* Loading parses and validates the header *before* touching tensor data: declared sizes must
  match the offsets and the file length (a crafted header cannot make us allocate), then
  dtypes, counts, sortedness, ranges and finiteness are checked. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from . import st_io
from .errors import FormatError
from .fsutil import atomic_write_bytes, sha256_hex  # re-exported: part of this module's API
from .safe_read import NotRegularFile, read_regular

FORMAT_ID = "adapterhub.sparse/1"
METADATA_KEY = "adapterhub"
MAX_HEADER_BYTES = st_io.MAX_HEADER_BYTES
GAP_LIMIT = 1 << 16
MAX_NUMEL = 1 << 62  # flat positions (and block-expanded ones) must stay inside int64

# The dtype table lives in st_io (the one safetensors reader); these are views of it.
_ST_TO_DTYPE: dict[str, torch.dtype] = st_io.torch_dtypes()
_DTYPE_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_DTYPE.items()}
_ITEMSIZE = st_io.DTYPE_SIZES
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EXTRA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32)
_EXTRA_ST = tuple(_DTYPE_TO_ST[d] for d in EXTRA_DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a value dtype as the catalog and CLI show it (``fp32``, ``bf16``, ``fp16``)."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name` for value dtypes; raises FormatError on anything else."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    try:
        return table[name]
    except KeyError:
        raise FormatError(f"unknown value dtype {name!r}; use fp32, bf16 or fp16") from None


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _view2d(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return (1, shape[0]) if shape else (1, 1)
    return math.prod(shape[:-1]), shape[-1]


@dataclass
class SparseParam:
    """The sparse delta of one base tensor.

    Element layout (``block_size is None``): ``indices`` are sorted, unique flat row-major
    positions into the base tensor (int64, 1-D) and ``values`` is 1-D of the same length.
    Block layout: the tensor is viewed 2-D as ``(prod(shape[:-1]), shape[-1])``, both dims
    divisible by ``block_size``; ``indices`` are sorted unique flat positions in the block grid
    and ``values`` has shape ``(nblocks, b, b)``.
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor
    block_size: int | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def layout(self) -> str:
        return "element" if self.block_size is None else "block"

    @property
    def nnz(self) -> int:
        """Number of stored values (elements, not blocks)."""
        return int(self.values.numel())

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Element indices (int64, sorted) and 1-D values, whatever the layout."""
        if self.block_size is None:
            return self.indices, self.values
        b = self.block_size
        _, cols = _view2d(self.shape)
        nbc = cols // b
        br = torch.div(self.indices, nbc, rounding_mode="floor")
        bc = self.indices % nbc
        ar = torch.arange(b, dtype=torch.int64)
        rows_idx = (br[:, None, None] * b + ar[None, :, None])  # (nb, b, 1)
        cols_idx = (bc[:, None, None] * b + ar[None, None, :])  # (nb, 1, b)
        flat = (rows_idx * cols + cols_idx).reshape(-1)
        vals = self.values.reshape(-1)
        order = torch.argsort(flat)
        return flat[order], vals[order]

    def mask(self) -> torch.Tensor:
        """Dense boolean mask of the base tensor's shape."""
        m = torch.zeros(self.numel, dtype=torch.bool)
        m[self.flat()[0]] = True
        return m.reshape(self.shape)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The delta as a dense tensor (for tests and small tensors; never done for whole models)."""
        idx, vals = self.flat()
        out = torch.zeros(self.numel, dtype=dtype or vals.dtype)
        out[idx] = vals.to(out.dtype)
        return out.reshape(self.shape)

    @classmethod
    def from_flat(cls, shape: tuple[int, ...], indices: torch.Tensor, values: torch.Tensor) -> "SparseParam":
        """Element layout from (possibly unsorted, unique) flat indices and values."""
        indices = indices.to(torch.int64).reshape(-1)
        values = values.reshape(-1)
        order = torch.argsort(indices)
        return cls(tuple(shape), indices[order].contiguous(), values[order].contiguous())

    @classmethod
    def from_mask(cls, delta: torch.Tensor, mask: torch.Tensor) -> "SparseParam":
        """Element layout keeping ``delta`` where ``mask`` is true."""
        if delta.shape != mask.shape:
            raise FormatError(f"mask shape {tuple(mask.shape)} differs from delta shape {tuple(delta.shape)}")
        idx = mask.reshape(-1).nonzero().reshape(-1)
        return cls(tuple(delta.shape), idx, delta.reshape(-1)[idx].contiguous())

    @classmethod
    def from_block_mask(cls, delta: torch.Tensor, block_mask: torch.Tensor, block_size: int) -> "SparseParam":
        """Block layout: ``block_mask`` has shape (rows//b, cols//b) of the 2-D view of ``delta``."""
        shape = tuple(delta.shape)
        rows, cols = _view2d(shape)
        b = block_size
        if rows % b or cols % b:
            raise FormatError(f"shape {shape} is not divisible into {b}x{b} blocks")
        grid = delta.reshape(rows // b, b, cols // b, b).permute(0, 2, 1, 3)
        bidx = block_mask.reshape(-1).nonzero().reshape(-1)
        vals = grid.reshape(-1, b, b)[bidx].contiguous()
        return cls(shape, bidx, vals, block_size=b)

    def validate(self, name: str, *, allow_nonfinite: bool = False) -> None:
        """Raise FormatError naming ``name`` if this parameter is inconsistent."""
        idx, vals = self.indices, self.values
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise FormatError(f"{name}: indices must be a 1-D int64 tensor")
        if vals.dtype not in VALUE_DTYPES:
            raise FormatError(f"{name}: values dtype {vals.dtype} not allowed (fp32, bf16, fp16)")
        if any(s <= 0 for s in self.shape) or len(self.shape) > 8 or self.numel >= MAX_NUMEL:
            raise FormatError(f"{name}: invalid shape {self.shape}")
        if self.block_size is None:
            limit = self.numel
            if vals.dim() != 1 or vals.numel() != idx.numel():
                raise FormatError(f"{name}: {idx.numel()} indices but values of shape {tuple(vals.shape)}")
        else:
            b = self.block_size
            if b <= 0:
                raise FormatError(f"{name}: invalid block size {b}")
            rows, cols = _view2d(self.shape)
            if rows % b or cols % b:
                raise FormatError(f"{name}: shape {self.shape} is not divisible into {b}x{b} blocks")
            limit = (rows // b) * (cols // b)
            if tuple(vals.shape) != (idx.numel(), b, b):
                raise FormatError(f"{name}: {idx.numel()} blocks but values of shape {tuple(vals.shape)}")
        if idx.numel():
            if int(idx[0]) < 0:
                raise FormatError(f"{name}: negative index {int(idx[0])}")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise FormatError(f"{name}: indices are not strictly increasing (unsorted or duplicate)")
            if int(idx[-1]) >= limit:
                raise FormatError(f"{name}: index {int(idx[-1])} out of range for {limit} positions")
        if not allow_nonfinite and vals.numel() and not bool(torch.isfinite(vals).all()):
            raise FormatError(f"{name}: values contain NaN or infinity")


@dataclass
class SparseAdapter:
    """A sparse adapter: sparse deltas per base tensor, dense extras, and a JSON card."""

    params: dict[str, SparseParam]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def nnz(self) -> int:
        return sum(p.nnz for p in self.params.values())

    @property
    def numel(self) -> int:
        """Total size of the targeted base tensors."""
        return sum(p.numel for p in self.params.values())

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def dtype(self) -> torch.dtype | None:
        dts = {p.dtype for p in self.params.values()}
        return dts.pop() if len(dts) == 1 else None

    def nnz_per_param(self) -> dict[str, int]:
        return {k: self.params[k].nnz for k in sorted(self.params)}

    def mask_hash(self) -> str:
        """sha256 over the sorted parameter names, shapes and element indices: same mask, same hash.

        One definition (:func:`adapterhub.maskhash.mask_hash`), shared with training's mask events.
        """
        from .maskhash import mask_hash

        return mask_hash({name: (p.shape, p.flat()[0]) for name, p in self.params.items()})

    def validate(self, *, allow_nonfinite: bool = False) -> None:
        for name in sorted(self.params):
            _check_name(name)
            self.params[name].validate(name, allow_nonfinite=allow_nonfinite)
        for name in sorted(self.extras):
            _check_name(name)
            t = self.extras[name]
            if t.dtype not in EXTRA_DTYPES:
                raise FormatError(f"extra {name}: dtype {t.dtype} not allowed")
            if not allow_nonfinite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"extra {name}: values contain NaN or infinity")
        try:
            json.dumps(self.card, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise FormatError(f"card is not JSON-serialisable: {e}") from None

    def check_base(self, base_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise FormatError if a parameter is missing from the base or its shape differs."""
        for name in sorted(self.params):
            if name not in base_shapes:
                raise FormatError(f"{name}: no such tensor in the base model")
            if tuple(base_shapes[name]) != self.params[name].shape:
                raise FormatError(
                    f"{name}: shape {self.params[name].shape} does not match the base's {tuple(base_shapes[name])}")


def _check_name(name: str) -> None:
    if (not isinstance(name, str) or not name or len(name) > 1024 or "::" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):  # NUL, newlines, terminal escapes
        raise FormatError(f"invalid tensor name {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON header could never be written back
        raise FormatError(f"invalid tensor name {name!r}: not valid Unicode") from None


# -- index coding -------------------------------------------------------------------------------

def encode_indices(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted int64 indices -> (uint16 gaps, int64 escapes). See the module docstring."""
    idx = idx.to(torch.int64)
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.uint16), torch.zeros(0, dtype=torch.int64)
    gaps = torch.diff(idx, prepend=torch.tensor([-1], dtype=torch.int64))
    big = gaps >= GAP_LIMIT
    escapes = gaps[big].contiguous()
    gaps = torch.where(big, torch.zeros_like(gaps), gaps)
    return gaps.to(torch.uint16), escapes


def decode_indices(gaps: torch.Tensor, escapes: torch.Tensor, name: str) -> torch.Tensor:
    """Inverse of :func:`encode_indices`; raises FormatError if escapes do not match."""
    g = gaps.to(torch.int64)
    zero = g == 0
    nz = int(zero.sum())
    if nz != escapes.numel():
        raise FormatError(f"{name}: {nz} escaped gaps but {escapes.numel()} escape values")
    if nz:
        if bool((escapes < GAP_LIMIT).any()):
            raise FormatError(f"{name}: escape value below {GAP_LIMIT}")
        g[zero] = escapes
    idx = torch.cumsum(g, 0) - 1
    return idx


# -- container -----------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    if t.dtype == torch.uint16:
        return t.to(torch.int32).numpy().astype("<u2").tobytes()
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()


def _tensor_from_bytes(buf: bytes, st_dtype: str, shape: list[int]) -> torch.Tensor:
    dtype = _ST_TO_DTYPE[st_dtype]
    if not buf:
        return torch.zeros(shape, dtype=dtype)
    if dtype == torch.uint16:
        import numpy as np

        arr = np.frombuffer(buf, dtype="<u2").astype(np.int32)
        return torch.from_numpy(arr).to(torch.uint16).reshape(shape)
    return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(shape).clone()


def _write_container(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    # Order by (itemsize desc, name) so every tensor starts aligned to its own size, like safetensors.
    names = sorted(tensors, key=lambda n: (-_ITEMSIZE[_DTYPE_TO_ST[tensors[n].dtype]], n))
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks: list[bytes] = []
    offset = 0
    for n in names:
        t = tensors[n]
        data = _tensor_bytes(t)
        header[n] = {"dtype": _DTYPE_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(chunks)


def _read_container(data: bytes, source: str | None = None) -> tuple[dict[str, tuple[str, list[int], int, int]], dict[str, str], int]:
    """Parse and check the header (:func:`adapterhub.st_io.parse_header`, the one strict reader).

    Returns ({name: (dtype, shape, begin, end)}, metadata, data_start). Raises HeaderError (a FormatError).
    """
    h = st_io.parse_header(data, source)
    entries = {n: (e.dtype, list(e.shape), e.begin, e.end) for n, e in h.entries.items()}
    return entries, dict(h.metadata), h.data_start


def save(adapter: SparseAdapter, *, allow_nonfinite: bool = False) -> bytes:
    """Serialise ``adapter`` to canonical bytes (validates first; raises FormatError).

    NaN/inf values are refused unless the caller passes ``allow_nonfinite=True`` (the card's own
    ``allow_nonfinite`` key is ignored: a file never switches off its own safety check).
    """
    adapter.validate(allow_nonfinite=allow_nonfinite)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for name in sorted(adapter.params):
        p = adapter.params[name]
        gaps, esc = encode_indices(p.indices)
        tensors[f"param::{name}::idx"] = gaps
        if esc.numel():
            tensors[f"param::{name}::esc"] = esc
        tensors[f"param::{name}::val"] = p.values.detach().cpu().contiguous()
        layout[name] = {"shape": list(p.shape), "layout": p.layout, "block_size": p.block_size,
                        "count": int(p.indices.numel()), "nnz": p.nnz, "dtype": dtype_name(p.values.dtype)}
    for name in sorted(adapter.extras):
        tensors[f"extra::{name}"] = adapter.extras[name].detach().cpu().contiguous()
    doc = {"format": FORMAT_ID, "params": layout, "extras": sorted(adapter.extras), "card": adapter.card}
    meta = {METADATA_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    return _write_container(tensors, meta)


def read_card(data: bytes) -> dict[str, Any]:
    """Only the JSON document of a file (format, params layout, extras, card), without loading tensors."""
    _, meta, _ = _read_container(data)
    return _parse_doc(meta)


def _refuse_constant(name: str) -> Any:
    """NaN/Infinity are not JSON: a card holding them could never be written back (save uses allow_nan=False)."""
    raise FormatError(f"bad adapterhub card JSON: {name} is not a JSON value")


def _parse_doc(meta: dict[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in meta:
        raise FormatError("not an adapterhub file: no 'adapterhub' metadata in the safetensors header")
    try:
        doc = json.loads(meta[METADATA_KEY], parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise FormatError(f"bad adapterhub card JSON: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # nesting bombs, integers over 4300 digits
        raise FormatError(f"bad adapterhub card JSON: {e.__class__.__name__}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_ID:
        raise FormatError(f"unsupported adapter format {doc.get('format') if isinstance(doc, dict) else None!r} (expected {FORMAT_ID})")
    if not isinstance(doc.get("params"), dict) or not isinstance(doc.get("extras", []), list) or not isinstance(doc.get("card", {}), dict):
        raise FormatError("bad adapterhub card: params, extras or card has the wrong type")
    return doc


class AdapterReader:
    """A lazy view of one adapter file, like safetensors' ``safe_open``: the header and the card are
    parsed and validated when it opens; each parameter or extra is decoded, checked and returned only
    when asked for, so only one tensor's bytes are in memory at a time.

    Obtain one with :func:`open_adapter` (a context manager). :func:`load` is built on it.

    Attributes:
        doc: the file's JSON document (``format``, ``params`` layout, ``extras``, ``card``).
        card: the adapter's card (``doc["card"]``).
        source: the name shown in header errors (or None).
    """

    def __init__(self, data: Any, *, allow_nonfinite: bool = False, source: str | None = None,
                 on_close: Any = None) -> None:
        self._data = data
        self._on_close = on_close
        self.source = source
        self.allow_nonfinite = allow_nonfinite
        self._entries, meta, self._start = _read_container(data, source)
        self.doc: dict[str, Any] = _parse_doc(meta)
        self.card: dict[str, Any] = self.doc.get("card", {})

    # -- names and shapes (header only)
    def keys(self) -> list[str]:
        """Names of the stored sparse parameters (base tensor names), sorted."""
        return sorted(self.doc["params"])

    def extra_names(self) -> list[str]:
        """Names of the dense extras, in the card's order."""
        return list(self.doc.get("extras", []))

    def param_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the base tensor ``name`` as the card declares it (no tensor data read).

        Raises: KeyError for an unknown name; FormatError for a bad layout entry.
        """
        return self._layout(name)[0]

    def _layout(self, name: str) -> tuple[tuple[int, ...], str, Any, int]:
        spec = self.doc["params"][name]
        try:
            shape = tuple(int(s) for s in spec["shape"])
            layout = spec["layout"]
            block = spec.get("block_size")
            count = int(spec["count"])
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError):
            raise FormatError(f"{name}: bad layout entry in card") from None
        return shape, layout, block, count

    # -- tensors (one at a time)
    def _tensor(self, tname: str, dtypes: tuple[str, ...]) -> torch.Tensor:
        if tname not in self._entries:
            raise FormatError(f"{tname}: tensor missing from file")
        dt, shape, b, e = self._entries[tname]
        if dt not in dtypes:
            raise FormatError(f"{tname}: dtype {dt} not allowed here (expected {' or '.join(dtypes)})")
        return _tensor_from_bytes(self._data[self._start + b:self._start + e], dt, shape)

    def get_param(self, name: str, *, allow_nonfinite: bool | None = None) -> SparseParam:
        """Decode and validate one sparse parameter.

        Takes: the parameter's name; ``allow_nonfinite`` overrides the reader's setting.
        Returns: the :class:`SparseParam`.
        Raises: KeyError for a name the card does not list; FormatError naming the tensor and the problem.
        """
        if name not in self.doc["params"]:
            raise KeyError(name)  # as safe_open's get_tensor and mergekit's lazy loader
        _check_name(name)
        shape, layout, block, count = self._layout(name)
        if layout not in ("element", "block") or (layout == "block") != (block is not None):
            raise FormatError(f"{name}: bad layout {layout!r} / block size {block!r}")
        if block is not None and (not isinstance(block, int) or block <= 0):
            raise FormatError(f"{name}: bad block size {block!r}")
        gaps = self._tensor(f"param::{name}::idx", ("U16",))
        if gaps.dim() != 1 or gaps.numel() != count:
            raise FormatError(f"{name}: index count {gaps.numel()} does not match the card's {count}")
        esc_name = f"param::{name}::esc"
        esc = self._tensor(esc_name, ("I64",)) if esc_name in self._entries else torch.zeros(0, dtype=torch.int64)
        if esc.dim() != 1:
            raise FormatError(f"{name}: escape list must be 1-D")
        idx = decode_indices(gaps, esc, name)
        vals = self._tensor(f"param::{name}::val", ("F32", "BF16", "F16"))
        p = SparseParam(shape, idx, vals, block_size=block)
        p.validate(name, allow_nonfinite=self.allow_nonfinite if allow_nonfinite is None else allow_nonfinite)
        return p

    def get_extra(self, name: str, *, check_finite: bool = True, allow_nonfinite: bool | None = None) -> torch.Tensor:
        """Decode one dense extra (a task head tensor).

        ``check_finite=False`` skips the NaN/inf check (:func:`load` checks all extras last).
        Raises: FormatError for a bad name, a missing tensor, a dtype not allowed or (unless allowed)
        NaN/inf values.
        """
        if not isinstance(name, str):
            raise FormatError("bad extras list in card")
        _check_name(name)
        t = self._tensor(f"extra::{name}", _EXTRA_ST)
        allow = self.allow_nonfinite if allow_nonfinite is None else allow_nonfinite
        if check_finite and not allow and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"extra {name}: values contain NaN or infinity")
        return t

    def unknown_tensors(self) -> list[str]:
        """Tensors in the file that the card does not describe (a valid file has none), sorted."""
        expected: set[str] = set()
        for name in self.doc["params"]:
            expected.update({f"param::{name}::idx", f"param::{name}::val", f"param::{name}::esc"})
        expected.update(f"extra::{n}" for n in self.doc.get("extras", []) if isinstance(n, str))
        return sorted(set(self._entries) - expected)

    # -- lifetime
    def close(self) -> None:
        """Release the file mapping (a reader over bytes holds nothing)."""
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        self._data = b""

    def __enter__(self) -> AdapterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapter(src: bytes | bytearray | memoryview | str | os.PathLike[str], *, allow_nonfinite: bool = False,
                 source: str | None = None) -> AdapterReader:
    """Open an adapter lazily (``with fmt.open_adapter(path) as r: r.keys(); r.card; r.get_param(name)``).

    Takes: the file's bytes, or a path (memory-mapped, never read whole; pickle suffixes refused);
    ``allow_nonfinite`` lets NaN/inf values through (the card's own key never does); ``source``
    names the file in header errors (default: the path's file name).
    Returns: an :class:`AdapterReader` whose header and card are already validated.
    Raises: FormatError (a malformed header or card, an unreadable file).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        return AdapterReader(src, allow_nonfinite=allow_nonfinite, source=source)
    path = Path(src)
    _refuse_pickle(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a .safetensors file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None
    try:
        size = os.fstat(f.fileno()).st_size
        mm: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except BaseException:
        f.close()
        raise

    def release() -> None:
        if isinstance(mm, mmap.mmap):
            mm.close()
        f.close()

    try:
        return AdapterReader(mm, allow_nonfinite=allow_nonfinite, source=source or path.name, on_close=release)
    except BaseException:
        release()
        raise


def load(data: bytes, *, allow_nonfinite: bool = False, source: str | None = None) -> SparseAdapter:
    """Parse and validate adapter bytes. Raises FormatError naming the tensor and the problem.

    NaN/inf values are refused unless the caller passes ``allow_nonfinite=True``; a card saying
    ``"allow_nonfinite": true`` does not switch the check off. ``source`` names the file in header errors.
    Built on :func:`open_adapter`: every parameter (sorted), then every extra, is read through the
    reader; then no tensor may be left that the card does not describe.
    """
    with open_adapter(data, allow_nonfinite=allow_nonfinite, source=source) as r:
        params = {name: r.get_param(name) for name in r.keys()}
        names = r.extra_names()
        extras = {name: r.get_extra(name, check_finite=False) for name in names}
        unknown = r.unknown_tensors()
        if unknown:
            raise FormatError(f"{unknown[0]}: tensor not described by the card")
        for name, t in extras.items():
            if not allow_nonfinite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"extra {name}: values contain NaN or infinity")
        return SparseAdapter(params, extras, r.card)


def save_file(adapter: SparseAdapter, path: str | os.PathLike[str]) -> str:
    """Write ``adapter`` to ``path`` atomically; returns the file's sha256."""
    data = save(adapter)
    atomic_write_bytes(path, data)
    return sha256_hex(data)


_REFUSED_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _REFUSED_SUFFIXES:
        raise FormatError(f"{path.name}: pickle-based files ({path.suffix}) are refused; convert to .safetensors")


def read_bytes_checked(path: str | os.PathLike[str]) -> bytes:
    """Read an adapter file, refusing pickle-based formats with a pointer to safetensors."""
    path = Path(path)
    _refuse_pickle(path)
    try:
        return read_regular(path)  # a FIFO or a device (/dev/zero) is refused, never read forever
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a .safetensors file") from None
    except NotRegularFile as e:
        raise FormatError(f"{path}: is {e.strerror}; expected a .safetensors file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror})") from None


def load_file(path: str | os.PathLike[str], *, allow_nonfinite: bool = False) -> SparseAdapter:
    """Load and validate an adapter file."""
    return load(read_bytes_checked(path), allow_nonfinite=allow_nonfinite, source=Path(path).name)

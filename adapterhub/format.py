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
* Importing this module does not import torch (it is imported on the first use of a tensor): ``register``
  and ``pull`` of a canonical file validate it on numpy views of its bytes (:func:`load_canonical`) and run
  without it, so those commands do not pay its ~1 s import.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _encode_json_str
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from . import st_io
from ._lazy import lazy_module
from .errors import FormatError
from .fsutil import atomic_write_bytes, sha256_hex  # re-exported: part of this module's API
from .gapcode import GAP_LIMIT, decode_gaps, encode_gaps
from .maskhash import MaskHasher
from .safe_read import NotRegularFile, read_regular

FORMAT_ID = "adapterhub.sparse/1"
METADATA_KEY = "adapterhub"
MAX_HEADER_BYTES = st_io.MAX_HEADER_BYTES
MAX_NUMEL = 1 << 62  # flat positions (and block-expanded ones) must stay inside int64

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch", globals())

_ITEMSIZE = st_io.DTYPE_SIZES
_VALUE_ST = ("F32", "BF16", "F16")
_EXTRA_ST = ("F32", "BF16", "F16", "F64", "I64", "I32")
_ST_SHORT = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}  # value dtypes as the catalog and CLI name them


@dataclass(frozen=True)
class _Dtypes:
    """The torch side of the dtype table (it lives in st_io, the one safetensors reader): built on first use,
    which imports torch."""

    st_to_dtype: dict[str, torch.dtype]
    dtype_to_st: dict[torch.dtype, str]
    value: tuple[torch.dtype, ...]
    extra: tuple[torch.dtype, ...]
    short: dict[torch.dtype, str]
    exp_mask: dict[torch.dtype, int]  # exponent bits of the half-precision formats: all ones means inf or NaN


@functools.cache
def _dtypes() -> _Dtypes:
    st_to = st_io.torch_dtypes()
    return _Dtypes(st_to, {v: k for k, v in st_to.items()}, tuple(st_to[n] for n in _VALUE_ST),
                   tuple(st_to[n] for n in _EXTRA_ST), {st_to[n]: short for n, short in _ST_SHORT.items()},
                   {torch.bfloat16: 0x7F80, torch.float16: 0x7C00})


_LAZY_NAMES = {"VALUE_DTYPES": "value", "EXTRA_DTYPES": "extra", "_ST_TO_DTYPE": "st_to_dtype",
               "_DTYPE_TO_ST": "dtype_to_st"}
if TYPE_CHECKING:
    VALUE_DTYPES: tuple[torch.dtype, ...]  # fp32, bf16, fp16: what a parameter's values may be
    EXTRA_DTYPES: tuple[torch.dtype, ...]  # those, fp64, int64 and int32: what a dense extra may be
    _ST_TO_DTYPE: dict[str, torch.dtype]
    _DTYPE_TO_ST: dict[torch.dtype, str]
else:
    def __getattr__(name: str) -> Any:
        """The dtype tables for other modules (``fmt.VALUE_DTYPES``), built (and torch imported) on first read."""
        if name in _LAZY_NAMES:
            return getattr(_dtypes(), _LAZY_NAMES[name])
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a value dtype as the catalog and CLI show it (``fp32``, ``bf16``, ``fp16``)."""
    return _dtypes().short.get(dtype) or str(dtype).replace("torch.", "")


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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a floating tensor is finite (the answer of ``torch.isfinite(t).all()``).

    On CPU it is computed in numpy, which measured 8x faster than ``torch.isfinite`` here (fp32, 4,300 values:
    3 against 25 us; 400,000: 0.12 against 0.80 ms): ``np.isfinite`` for fp32/fp64, and for bf16/fp16 a test of
    the exponent bits on an int16 view (all ones means inf or NaN; numpy has no bf16)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.requires_grad:
        return bool(torch.isfinite(t).all())
    mask = _dtypes().exp_mask.get(t.dtype)
    if mask is not None:
        return not bool(np.any((t.view(torch.int16).numpy() & mask) == mask))
    if t.dtype in (torch.float32, torch.float64):
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


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
    # flat() moved to a device other than the CPU, kept per device: (indices, values it was made from, idx, vals)
    _placed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

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

    @property
    def dtype_label(self) -> str:
        """The values' dtype as the catalog names it (``fp32``, ``bf16``, ``fp16``)."""
        return dtype_name(self.values.dtype)

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

    def flat_on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`flat` on ``device``. Off the CPU the pair is moved once and kept on this parameter for that
        device (a model on a GPU switching adapters moves each adapter's indices and values once); a new
        ``indices`` or ``values`` tensor assigned to the parameter invalidates the kept copy."""
        dev = torch.device(device)
        if dev.type == "cpu":
            return self.flat()
        key = str(dev)
        hit = self._placed.get(key)
        if hit is not None and hit[0] is self.indices and hit[1] is self.values:
            return hit[2], hit[3]
        idx, vals = self.flat()
        placed = idx.to(dev), vals.to(dev)
        self._placed[key] = (self.indices, self.values, *placed)
        return placed

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

    def validate(self, name: str, *, allow_nonfinite: bool = False, increasing: bool = False) -> None:
        """Raise FormatError naming ``name`` if this parameter is inconsistent.

        ``increasing=True`` says the indices are known to be non-negative and strictly increasing (decoded
        from valid gaps: every gap is >= 1), so that O(nnz) pass is skipped; the range is still checked.
        """
        idx, vals = self.indices, self.values
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise FormatError(f"{name}: indices must be a 1-D int64 tensor")
        if vals.dtype not in _dtypes().value:
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
            if not increasing and idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise FormatError(f"{name}: indices are not strictly increasing (unsorted or duplicate)")
            if int(idx[-1]) >= limit:
                raise FormatError(f"{name}: index {int(idx[-1])} out of range for {limit} positions")
        if not allow_nonfinite and vals.numel() and not all_finite(vals):
            raise FormatError(f"{name}: values contain NaN or infinity")


class ParamStats:
    """What the catalog reads of an adapter, derived from ``self.params`` (name -> an object with ``shape``,
    ``nnz``, ``numel``, ``dtype`` and ``dtype_label``): shared by :class:`SparseAdapter`, :class:`PackedAdapter` and
    :class:`ScannedAdapter`."""

    params: Mapping[str, Any]

    @property
    def nnz(self) -> int:
        return sum(int(p.nnz) for p in self.params.values())

    @property
    def numel(self) -> int:
        """Total size of the targeted base tensors."""
        return sum(int(p.numel) for p in self.params.values())

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def dtype(self) -> torch.dtype | None:
        dts = {p.dtype for p in self.params.values()}
        return dts.pop() if len(dts) == 1 else None

    @property
    def dtype_label(self) -> str:
        """The values' dtype as the catalog records it (``fp32``, ``bf16``, ``fp16``; ``mixed`` for several or
        none), read without torch for a scanned or packed adapter."""
        names = {p.dtype_label for p in self.params.values()}
        return names.pop() if len(names) == 1 else "mixed"

    def nnz_per_param(self) -> dict[str, int]:
        return {k: int(self.params[k].nnz) for k in sorted(self.params)}

    def check_base(self, base_shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise FormatError if a parameter is missing from the base or its shape differs."""
        for name in sorted(self.params):
            if name not in base_shapes:
                raise FormatError(f"{name}: no such tensor in the base model")
            if tuple(base_shapes[name]) != tuple(self.params[name].shape):
                raise FormatError(
                    f"{name}: shape {tuple(self.params[name].shape)} does not match the base's {tuple(base_shapes[name])}")


@dataclass
class SparseAdapter(ParamStats):
    """A sparse adapter: sparse deltas per base tensor, dense extras, and a JSON card."""

    params: dict[str, SparseParam]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    # The bytes this adapter was loaded from (``load(..., keep_source=True)``), which :func:`save` hands back
    # unchanged when they already are the canonical serialisation (issue 19: register stores canonical
    # bytes without re-serialising). An adapter loaded so must not have its tensors modified in place.
    source_bytes: bytes | None = field(default=None, repr=False, compare=False)
    source_allow_nonfinite: bool = field(default=False, repr=False, compare=False)
    # sha256 of ``source_bytes`` when the loader's caller already computed it (a pull hashes while downloading)
    source_sha256: str | None = field(default=None, repr=False, compare=False)
    # {tensor name: shape} of the source file's ``::esc`` tensors (read with the header on load)
    source_escapes: dict[str, tuple[int, ...]] | None = field(default=None, repr=False, compare=False)

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
            if t.dtype not in _dtypes().extra:
                raise FormatError(f"extra {name}: dtype {t.dtype} not allowed")
            if not allow_nonfinite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"extra {name}: values contain NaN or infinity")
        try:
            json.dumps(self.card, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise FormatError(f"card is not JSON-serialisable: {e}") from None



_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _check_name(name: str) -> None:
    if (not isinstance(name, str) or not name or len(name) > 1024 or "::" in name
            or _CONTROL.search(name)):  # NUL, newlines, terminal escapes
        raise FormatError(f"invalid tensor name {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON header could never be written back
        raise FormatError(f"invalid tensor name {name!r}: not valid Unicode") from None


# -- index coding -------------------------------------------------------------------------------

def encode_indices(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted int64 indices -> (uint16 gaps, int64 escapes). See the module docstring and
    :func:`adapterhub.gapcode.encode_gaps`."""
    gaps, esc = encode_gaps(idx.detach().to("cpu", torch.int64).numpy())
    return torch.from_numpy(gaps.astype(np.uint16, copy=False)), torch.from_numpy(esc.astype(np.int64, copy=False))


def decode_indices(gaps: torch.Tensor, escapes: torch.Tensor, name: str) -> torch.Tensor:
    """Inverse of :func:`encode_indices`; raises FormatError if escapes do not match
    (:func:`adapterhub.gapcode.decode_gaps`)."""
    return torch.from_numpy(decode_gaps(gaps.detach().cpu().numpy(), escapes.detach().cpu().numpy(), name))


# -- container -----------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> bytes:
    return _le_array(t).tobytes()


def _le_array(t: torch.Tensor) -> np.ndarray[Any, Any]:
    """``t``'s bytes as a flat C-contiguous little-endian numpy array, without a copy where it can (bf16 and fp16
    through an int16 view: numpy has no bfloat16). The container writers take its ``.data`` or its bytes."""
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    a = t.numpy().reshape(-1)
    return a if a.dtype.byteorder != ">" else a.astype(a.dtype.newbyteorder("<"))


_INT_OF_SIZE = {1: "<i1", 2: "<i2", 4: "<i4", 8: "<i8"}


def _tensor_from_buffer(data: Any, offset: int, nbytes: int, st_dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor owning a copy of ``nbytes`` little-endian bytes of ``data`` (bytes, mmap, any buffer) from
    ``offset``: one copy (numpy allocates it aligned), through a signed integer view of the same width."""
    dtype = _dtypes().st_to_dtype[st_dtype]
    if not nbytes:
        return torch.zeros(shape, dtype=dtype)
    size = _ITEMSIZE[st_dtype]
    arr = np.frombuffer(data, dtype="<u2" if dtype == torch.uint16 else _INT_OF_SIZE[size],
                        count=nbytes // size, offset=offset).copy()
    t = torch.from_numpy(arr)
    return (t if dtype == torch.uint16 else t.view(dtype)).reshape(shape)


def _container_header(specs: dict[str, tuple[str, list[int]]], metadata: dict[str, str]) -> tuple[bytes, list[str], int]:
    """The canonical header of a container holding tensors ``{name: (st dtype, shape)}``.

    Returns (the 8-byte length + padded JSON header, the tensor names in data order, the data size).
    Order is (item size descending, name), so every tensor starts aligned to its own size, like safetensors.
    The JSON is ``json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``, each tensor's
    entry written from a template (json's own string encoder for the name; keys in sorted order) instead of a
    dict per tensor serialised by the encoder: the same bytes (tests/test_register_fast.py), at half the cost
    for the hundreds of tensors of an adapter.
    """
    names = sorted(specs, key=lambda n: (-_ITEMSIZE[specs[n][0]], n))
    entries: dict[str, str] = {"__metadata__": json.dumps(metadata, sort_keys=True, separators=(",", ":"),
                                                          ensure_ascii=False)}
    offset = 0
    for n in names:
        dt, shape = specs[n]
        size = _numel(tuple(shape)) * _ITEMSIZE[dt] if shape else _ITEMSIZE[dt]
        dims = ",".join([str(int(d)) for d in shape])
        entries[n] = f'{{"data_offsets":[{offset},{offset + size}],"dtype":"{dt}","shape":[{dims}]}}'
        offset += size
    body = ",".join([f"{_encode_json_str(k)}:{entries[k]}" for k in sorted(entries)])
    hjson = ("{" + body + "}").encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    return struct.pack("<Q", len(hjson)) + hjson, names, offset


def _write_container(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    specs = {n: (_dtypes().dtype_to_st[t.dtype], list(t.shape)) for n, t in tensors.items()}
    return b"".join(container_pieces(specs, metadata, tensors.__getitem__))


def container_pieces(specs: Mapping[str, tuple[str, list[int]]], metadata: dict[str, str],
                     tensor: Callable[[str], torch.Tensor]) -> Iterator[Any]:
    """The bytes of a safetensors container holding tensors ``{name: (st dtype, shape)}``, piece by piece: the
    canonical header (:func:`_container_header`), then each tensor's bytes in data order, asked of ``tensor(name)``
    only when its turn comes — so a writer that takes the pieces as they come (``fsutil.atomic_write_bytes``)
    holds one tensor at a time, never the file (issue 19: the PEFT export). Pieces are bytes or buffers.
    Raises FormatError when a produced tensor's dtype or shape is not the one its spec declared."""
    head, names, _ = _container_header(dict(specs), metadata)
    yield head
    for n in names:
        t = tensor(n)
        dt, shape = specs[n]
        if _dtypes().dtype_to_st.get(t.dtype) != dt or list(t.shape) != [int(d) for d in shape]:
            raise FormatError(f"{n}: produced {t.dtype} {list(t.shape)}, declared {dt} {list(shape)}")
        yield _le_array(t).data


def _read_container(data: bytes, source: str | None = None) -> tuple[dict[str, st_io.TensorEntry], dict[str, str], int]:
    """Parse and check the header (:func:`adapterhub.st_io.parse_header`, the one strict reader).

    Returns ({name: (dtype, shape, begin, end) as a TensorEntry}, metadata, data_start). Raises HeaderError
    (a FormatError).
    """
    h = st_io.parse_header(data, source)
    return h.entries, h.metadata, h.data_start


def _doc_json(adapter: SparseAdapter) -> dict[str, str]:
    """The header metadata of ``adapter`` (its canonical JSON document)."""
    layout: dict[str, Any] = {}
    for name in sorted(adapter.params):
        p = adapter.params[name]
        layout[name] = {"shape": list(p.shape), "layout": p.layout, "block_size": p.block_size,
                        "count": int(p.indices.numel()), "nnz": p.nnz, "dtype": dtype_name(p.values.dtype)}
    return _doc_meta(layout, adapter.extras, adapter.card)


def _doc_meta(layout: dict[str, Any], extras: Mapping[str, Any], card: dict[str, Any]) -> dict[str, str]:
    doc = {"format": FORMAT_ID, "params": layout, "extras": sorted(extras), "card": card}
    try:
        return {METADATA_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    except (TypeError, ValueError) as e:
        raise FormatError(f"card is not JSON-serialisable: {e}") from None


def _reusable(adapter: SparseAdapter, raw: bytes, allow_nonfinite: bool) -> bool:
    """Whether ``raw`` (the bytes ``adapter`` was loaded from) already is ``save(adapter)``.

    The tensor bytes of a loaded file are what ``save`` writes for its decoded tensors (gap coding with
    escapes has exactly one encoding of a sorted index list, and values and extras are copied bit for bit),
    so the file is canonical exactly when its header equals the header ``save`` builds for the adapter's
    current card — compared without serialising a single tensor.
    """
    if adapter.source_allow_nonfinite and not allow_nonfinite:
        return False  # loaded leniently: the values must be checked again, by the full path
    try:
        escapes = adapter.source_escapes
        if escapes is None:
            escapes = {n: tuple(e.shape) for n, e in st_io.parse_header(raw).entries.items() if n.endswith("::esc")}
        specs: dict[str, tuple[str, list[int]]] = {}
        for name in sorted(adapter.params):
            _check_name(name)
            p = adapter.params[name]
            specs[f"param::{name}::idx"] = ("U16", [int(p.indices.numel())])
            esc = escapes.get(f"param::{name}::esc")
            if esc is not None and esc != (0,):  # an empty escape list is never written
                specs[f"param::{name}::esc"] = ("I64", [int(d) for d in esc])
            specs[f"param::{name}::val"] = (_dtypes().dtype_to_st[p.values.dtype], list(p.values.shape))
        for name in sorted(adapter.extras):
            _check_name(name)
            t = adapter.extras[name]
            if t.dtype not in _dtypes().extra:
                return False
            specs[f"extra::{name}"] = (_dtypes().dtype_to_st[t.dtype], list(t.shape))
        head, _, size = _container_header(specs, _doc_json(adapter))
    except (FormatError, KeyError):
        return False
    return len(raw) == len(head) + size and raw[:len(head)] == head


def save(adapter: SparseAdapter | PackedAdapter, *, allow_nonfinite: bool = False) -> bytes:
    """Serialise ``adapter`` to canonical bytes (validates first; raises FormatError).

    NaN/inf values are refused unless the caller passes ``allow_nonfinite=True`` (the card's own
    ``allow_nonfinite`` key is ignored: a file never switches off its own safety check).
    An adapter loaded with ``keep_source=True`` whose source bytes already are its canonical form (only
    its header is compared; e.g. a file written by this function, card unchanged) gets those very bytes
    back, without serialising or re-validating its tensors (they were validated on load).
    """
    if isinstance(adapter, PackedAdapter):
        return b"".join(adapter.chunks())
    raw = adapter.source_bytes
    if raw is not None and _reusable(adapter, raw, allow_nonfinite):
        return raw
    adapter.validate(allow_nonfinite=allow_nonfinite)
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(adapter.params):
        p = adapter.params[name]
        gaps, esc = encode_indices(p.indices)
        tensors[f"param::{name}::idx"] = gaps
        if esc.numel():
            tensors[f"param::{name}::esc"] = esc
        tensors[f"param::{name}::val"] = p.values.detach().cpu().contiguous()
    for name in sorted(adapter.extras):
        tensors[f"extra::{name}"] = adapter.extras[name].detach().cpu().contiguous()
    return _write_container(tensors, _doc_json(adapter))


@dataclass
class PackedParam:
    """What a :class:`PackedAdapter` keeps of one element-layout parameter besides its bytes."""

    shape: tuple[int, ...]
    count: int
    nnz: int
    st: str  # the values' safetensors dtype (F32, BF16, F16): named without torch
    block_size: None = None
    layout: str = "element"

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The values' torch dtype (imports torch)."""
        return _dtypes().st_to_dtype[self.st]

    @property
    def dtype_label(self) -> str:
        return _ST_SHORT[self.st]


class PackedAdapter(ParamStats):
    """An element-layout adapter held as the bytes :func:`save` writes for its tensors, built one parameter
    at a time (issue 19: a merge's result costs what its file costs — 2 B per index and the values' bytes —
    instead of int64 indices per entry, and is written to the store without joining the whole file in memory).

    :meth:`add` takes parameters in sorted name order (the mask hash is computed on the way, as
    :func:`adapterhub.maskhash.mask_hash` defines it). ``save(packed)`` equals ``save`` of the same
    :class:`SparseAdapter`; :meth:`chunks` yields those bytes piece by piece and ``len()`` is their size.
    Catalog code reads it like a SparseAdapter (``params`` with shapes and layouts, ``nnz``, ``density``,
    ``dtype``, ``nnz_per_param()``, ``mask_hash()``, ``extras``, ``card``, ``check_base``).
    """

    def __init__(self, card: dict[str, Any] | None = None, *, allow_nonfinite: bool = False) -> None:
        self.params: dict[str, PackedParam] = {}
        self.extras: dict[str, torch.Tensor] = {}
        self.card: dict[str, Any] = dict(card or {})
        self.allow_nonfinite = allow_nonfinite
        self._tensors: dict[str, tuple[str, list[int], bytes]] = {}
        self._mask = MaskHasher()
        self._last: str | None = None

    def add(self, name: str, p: SparseParam) -> None:
        """Validate, encode and keep one parameter (element layout; names in increasing order).

        Raises: FormatError for an invalid parameter; ValueError for a name out of order.
        """
        if self._last is not None and name <= self._last:
            raise ValueError(f"{name}: parameters must be added in sorted order")
        _check_name(name)
        if p.block_size is not None:
            raise FormatError(f"{name}: a packed adapter holds element layout only")
        p.validate(name, allow_nonfinite=self.allow_nonfinite)
        gaps, esc = encode_indices(p.indices)
        gap_bytes, esc_bytes = _tensor_bytes(gaps), (_tensor_bytes(esc) if esc.numel() else b"")
        self._tensors[f"param::{name}::idx"] = ("U16", [int(gaps.numel())], gap_bytes)
        if esc.numel():
            self._tensors[f"param::{name}::esc"] = ("I64", [int(esc.numel())], esc_bytes)
        vals = p.values.detach().cpu().contiguous()
        self._tensors[f"param::{name}::val"] = (_dtypes().dtype_to_st[vals.dtype], list(vals.shape), _tensor_bytes(vals))
        # the mask hash of definition 2 is over these very index bytes (adapterhub.maskhash)
        self._mask.add_encoded(name, p.shape, gap_bytes, int(gaps.numel()), esc_bytes, int(esc.numel()))
        self.params[name] = PackedParam(p.shape, int(p.indices.numel()), p.nnz, _dtypes().dtype_to_st[vals.dtype])
        self._last = name

    def with_card(self, card: dict[str, Any]) -> PackedAdapter:
        """The same tensors (shared, not copied) under another card."""
        out = PackedAdapter(card, allow_nonfinite=self.allow_nonfinite)
        out.params, out.extras, out._tensors, out._mask, out._last = (self.params, self.extras, self._tensors,
                                                                       self._mask.copy(), self._last)
        return out

    # -- what the catalog reads (nnz, density, dtype, nnz_per_param, check_base: ParamStats)
    def mask_hash(self) -> str:
        return self._mask.hexdigest()

    # -- bytes
    def _layout(self) -> tuple[bytes, list[str], int, dict[str, tuple[str, list[int], bytes]]]:
        for name in sorted(self.extras):
            _check_name(name)
            t = self.extras[name]
            if t.dtype not in _dtypes().extra:
                raise FormatError(f"extra {name}: dtype {t.dtype} not allowed")
            if not self.allow_nonfinite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"extra {name}: values contain NaN or infinity")
        tensors = dict(self._tensors)
        for name in sorted(self.extras):
            t = self.extras[name].detach().cpu().contiguous()
            tensors[f"extra::{name}"] = (_dtypes().dtype_to_st[t.dtype], list(t.shape), _tensor_bytes(t))
        layout = {n: {"shape": list(p.shape), "layout": "element", "block_size": None, "count": p.count,
                      "nnz": p.nnz, "dtype": p.dtype_label} for n, p in sorted(self.params.items())}
        specs = {n: (dt, shape) for n, (dt, shape, _) in tensors.items()}
        head, names, size = _container_header(specs, _doc_meta(layout, self.extras, self.card))
        return head, names, size, tensors

    def chunks(self) -> Any:
        """The canonical file, piece by piece (header, then each tensor's bytes). Raises FormatError."""
        head, names, _, tensors = self._layout()
        yield head
        for n in names:
            yield tensors[n][2]

    def __len__(self) -> int:
        head, _, size, _ = self._layout()
        return len(head) + size


def serialised(adapter: SparseAdapter | PackedAdapter, *, allow_nonfinite: bool = False) -> bytes | PackedAdapter:
    """What the store writes for ``adapter``: :func:`save`'s bytes, or a PackedAdapter itself (written piece by
    piece, never joined). Raises FormatError."""
    if isinstance(adapter, PackedAdapter):
        for _ in adapter.chunks():  # validates extras and the card now, before anything is written
            break
        return adapter
    return save(adapter, allow_nonfinite=allow_nonfinite)


def serialised_sha256(data: bytes | PackedAdapter) -> str:
    """sha256 hex of :func:`serialised`'s result (a packed adapter hashed piece by piece)."""
    if isinstance(data, PackedAdapter):
        h = hashlib.sha256()
        for c in data.chunks():
            h.update(c)
        return h.hexdigest()
    return sha256_hex(data)


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
        return _tensor_from_buffer(self._data, self._start + b, e - b, dt, shape)

    def value_dtype(self, name: str) -> torch.dtype:
        """The dtype of parameter ``name``'s stored values, from the header (no tensor data read).

        Raises: KeyError for a name the card does not list; FormatError for a missing or non-float tensor.
        """
        if name not in self.doc["params"]:
            raise KeyError(name)
        tname = f"param::{name}::val"
        if tname not in self._entries:
            raise FormatError(f"{tname}: tensor missing from file")
        dt = self._entries[tname][0]
        if dt not in _VALUE_ST:
            raise FormatError(f"{tname}: dtype {dt} not allowed here (expected F32 or BF16 or F16)")
        return _dtypes().st_to_dtype[dt]

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
        vals = self._tensor(f"param::{name}::val", _VALUE_ST)
        p = SparseParam(shape, idx, vals, block_size=block)
        # decode_indices checked every gap (>= 1, escapes >= 65536): the indices are strictly increasing
        p.validate(name, allow_nonfinite=self.allow_nonfinite if allow_nonfinite is None else allow_nonfinite,
                   increasing=True)
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


def load(data: bytes, *, allow_nonfinite: bool = False, source: str | None = None,
         keep_source: bool = False, source_sha256: str | None = None) -> SparseAdapter:
    """Parse and validate adapter bytes. Raises FormatError naming the tensor and the problem.

    NaN/inf values are refused unless the caller passes ``allow_nonfinite=True``; a card saying
    ``"allow_nonfinite": true`` does not switch the check off. ``source`` names the file in header errors.
    ``keep_source`` keeps ``data`` on the adapter (``source_bytes``) so that :func:`save` can hand back the
    same bytes when they are canonical (``register`` of a canonical file); do not modify such an adapter's
    tensors in place. ``source_sha256`` (with ``keep_source``) is the sha256 the caller already computed
    of exactly ``data`` (a verified download), so it is not hashed again.
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
        out = SparseAdapter(params, extras, r.card)
        escapes = {n: tuple(e[1]) for n, e in r._entries.items() if n.endswith("::esc")}
    if keep_source:
        out.source_escapes = escapes
        out.source_bytes = bytes(data)
        out.source_allow_nonfinite = allow_nonfinite
        out.source_sha256 = source_sha256
    return out


class ScannedAdapter(ParamStats):
    """A canonical element-layout adapter file, validated without decoding it (issue 19: ``register`` and
    ``pull`` of canonical bytes cost about what hashing and copying the file costs).

    Made by :func:`load_canonical`. It holds the file's bytes (``source_bytes``), the parameters' shapes,
    counts and value dtypes (``params``, as :class:`PackedParam`), the dense extras' dtypes and shapes
    (:class:`ScannedExtra`: checked, not decoded) and the card; its mask
    hash was computed from the file's own index bytes. Catalog code reads it like a SparseAdapter (``nnz``,
    ``density``, ``dtype``, ``nnz_per_param()``, ``mask_hash()``, ``extras``, ``card``, ``check_base``); the
    file is stored as it is when :meth:`canonical_with` says so for the card being registered.
    """

    def __init__(self, data: bytes, params: dict[str, PackedParam], escapes: dict[str, int],
                 extras: dict[str, ScannedExtra], card: dict[str, Any], mask: str, *, allow_nonfinite: bool,
                 source_sha256: str | None) -> None:
        self.source_bytes = data
        self.params = params
        self.extras = extras
        self.card = card
        self.allow_nonfinite = allow_nonfinite
        self.source_sha256 = source_sha256
        self._escapes = escapes
        self._mask = mask

    def mask_hash(self) -> str:
        return self._mask

    def canonical_with(self, card: dict[str, Any], *, allow_nonfinite: bool = False) -> bool:
        """Whether the file is exactly what :func:`save` writes for these tensors under ``card``."""
        if self.allow_nonfinite and not allow_nonfinite:
            return False  # scanned leniently: the values must be checked again, by the full path
        specs: dict[str, tuple[str, list[int]]] = {}
        layout: dict[str, Any] = {}
        for name, p in sorted(self.params.items()):
            specs[f"param::{name}::idx"] = ("U16", [p.count])
            if self._escapes.get(name):
                specs[f"param::{name}::esc"] = ("I64", [self._escapes[name]])
            specs[f"param::{name}::val"] = (p.st, [p.count])
            layout[name] = {"shape": list(p.shape), "layout": "element", "block_size": None, "count": p.count,
                            "nnz": p.nnz, "dtype": p.dtype_label}
        for name in sorted(self.extras):
            x = self.extras[name]
            specs[f"extra::{name}"] = (x.st, list(x.shape))
        try:
            head, _, size = _container_header(specs, _doc_meta(layout, self.extras, card))
        except FormatError:
            return False
        raw = self.source_bytes
        return len(raw) == len(head) + size and raw[:len(head)] == head

    def load(self) -> SparseAdapter:
        """The full :class:`SparseAdapter` (decoded and validated again; keeps the source bytes)."""
        return load(self.source_bytes, allow_nonfinite=self.allow_nonfinite, keep_source=True,
                    source_sha256=self.source_sha256)


@dataclass(frozen=True)
class ScannedExtra:
    """A dense extra of a scanned file: its safetensors dtype and shape (its values checked, not decoded)."""

    st: str
    shape: tuple[int, ...]


def _scan_extras(r: AdapterReader, mv: memoryview) -> dict[str, ScannedExtra] | None:
    """The dense extras of ``r``, accepted exactly as :meth:`AdapterReader.get_extra` accepts them (a listed name,
    its tensor present in an allowed dtype, finite floating values unless allowed), checked on views of the bytes
    ``mv`` without torch; None (the full path decides, with its error) at any doubt."""
    out: dict[str, ScannedExtra] = {}
    names: list[Any] = r.extra_names()  # from the card: not necessarily strings
    for name in names:
        if not isinstance(name, str):
            return None
        _check_name(name)
        e = r._entries.get(f"extra::{name}")
        if e is None or e[0] not in _EXTRA_ST:
            return None
        if not r.allow_nonfinite and e[0] in _FLOAT_LE and not _bytes_finite(mv[r._start + e[2]:r._start + e[3]], e[0]):
            return None
        out[name] = ScannedExtra(e[0], tuple(e[1]))
    return out


_FINITE_BITS = {"BF16": (0x7FFF, 0x7F80), "F16": (0x7FFF, 0x7C00)}
_FLOAT_LE = {"F32": "<f4", "F64": "<f8", "BF16": "<u2", "F16": "<u2"}  # how the floating dtypes are viewed in numpy


def _bytes_finite(part: Any, st: str) -> bool:
    """Whether every value of floating dtype ``st`` in the little-endian bytes ``part`` is finite (numpy's
    isfinite; the half formats, which numpy cannot hold, on their exponent bits)."""
    vals = np.frombuffer(part, dtype=_FLOAT_LE[st])
    if not vals.size:
        return True
    if st in _FINITE_BITS:
        low, exp = _FINITE_BITS[st]
        return int((vals & low).max()) < exp
    return bool(np.isfinite(vals).all())
# parameters of at most this many indices are checked together (one numpy call per check for all of them: a
# 0.5 MB file of 210 parameters paid ~20 us of call overhead per parameter); larger ones one at a time, on views
_BATCH_COUNT = 1 << 14


def _scan_params(r: AdapterReader, mv: memoryview, hasher: MaskHasher
                 ) -> tuple[dict[str, PackedParam], dict[str, int]] | None:
    """Validate every parameter of ``r`` on views of the file's bytes ``mv`` (no decoding, no int64 indices)
    and add them to the mask hash in name order; None where the full path must decide (block layout, any
    doubt). Returns ({name: PackedParam}, {name: number of escapes}).

    Per parameter, exactly :meth:`AdapterReader.get_param`'s acceptance: element layout, a valid shape, gaps
    ``U16[count]``, values ``F32``/``BF16``/``F16`` ``[count]``, an optional ``I64[k]`` escape list with one
    escape (>= 65536) per zero gap, the last index (sum of the gaps, escapes in place of the zeros, minus one)
    inside the tensor, finite values unless allowed.
    """
    import numpy as np

    ents, at = r._entries, r._start
    rows = []  # (name, shape, numel, count, idx entry, val entry, esc entry or None)
    for name in r.keys():
        _check_name(name)
        shape, layout, block, count = r._layout(name)
        if layout != "element" or block is not None or count < 0:
            return None
        numel = _numel(shape)
        if any(d <= 0 for d in shape) or len(shape) > 8 or numel >= MAX_NUMEL:
            return None
        ie, ve = ents.get(f"param::{name}::idx"), ents.get(f"param::{name}::val")
        ee = ents.get(f"param::{name}::esc")
        if ie is None or ve is None or ie[0] != "U16" or ie[1] != (count,) or ve[0] not in _VALUE_ST \
                or ve[1] != (count,) or (ee is not None and (ee[0] != "I64" or len(ee[1]) != 1)):
            return None
        if not count and ee is not None and ee[3] > ee[2]:
            return None  # escapes without gaps
        rows.append((name, shape, numel, count, ie, ve, ee))

    def view(e: Any, dtype: str) -> Any:
        return np.frombuffer(mv[at + e[2]:at + e[3]], dtype=dtype)

    small = [row for row in rows if 0 < row[3] <= _BATCH_COUNT]
    sums_of: dict[str, tuple[int, int]] = {}
    if small:  # zero gaps and gap sums of all small parameters at once, on one joined copy of their gaps
        gaps = np.frombuffer(b"".join([mv[at + row[4][2]:at + row[4][3]] for row in small]), dtype="<u2")
        starts = np.cumsum([0] + [row[3] for row in small[:-1]])
        zeros = [0] * len(small)
        if int(gaps.min()) == 0:  # zero gaps (escaped ones) are rare: counted per parameter from their positions
            owner = np.searchsorted(starts, np.flatnonzero(gaps == 0), side="right") - 1
            zeros = np.bincount(owner, minlength=len(small)).tolist()
        # a sum of at most _BATCH_COUNT gaps below 2**16 fits 32 bits (a narrower accumulator is twice as fast)
        acc = np.uint32 if _BATCH_COUNT * 0xFFFF < 1 << 32 else np.uint64
        sums = np.add.reduceat(gaps, starts, dtype=acc).tolist()
        sums_of = {row[0]: (z, g) for row, z, g in zip(small, zeros, sums, strict=True)}
    for name, _, numel, count, ie, _, ee in rows:
        if not count:
            continue
        if name in sums_of:
            zeros_n, gap_sum = sums_of[name]
        else:
            g = view(ie, "<u2")
            zeros_n = int(np.count_nonzero(g == 0)) if int(g.min()) == 0 else 0
            gap_sum = int(g.sum(dtype=np.uint64))
        n_esc = (ee[3] - ee[2]) // 8 if ee is not None else 0
        if zeros_n != n_esc:
            return None
        esc_sum = 0
        if n_esc:
            esc = view(ee, "<i8")
            if int(esc.min()) < GAP_LIMIT or int(esc.max()) > numel or n_esc * GAP_LIMIT > numel:
                return None
            if float(esc.sum(dtype=np.float64)) > 2.0 * numel:
                return None
            esc_sum = int(esc.sum(dtype=np.uint64))
        # every gap is >= 1, so the indices are strictly increasing from gap[0] - 1 >= 0; the last one is the sum
        # of the gaps (escapes in place of the zeros) minus one
        if gap_sum + esc_sum - 1 >= numel:
            return None
    if not r.allow_nonfinite and not _values_finite(rows, mv, at):
        return None
    params: dict[str, PackedParam] = {}
    escapes: dict[str, int] = {}
    for name, shape, _, count, ie, ve, ee in rows:
        n_esc = (ee[3] - ee[2]) // 8 if ee is not None else 0
        hasher.add_encoded(name, shape, mv[at + ie[2]:at + ie[3]], count,
                           mv[at + ee[2]:at + ee[3]] if ee is not None else b"", n_esc)
        params[name] = PackedParam(shape, count, count, ve[0])
        escapes[name] = n_esc
    return params, escapes




def _values_finite(rows: list[Any], mv: memoryview, at: int) -> bool:
    """Whether every value of the scanned parameters ``rows`` is finite: the small ones of each dtype joined
    and tested at once, the large ones one at a time (the half formats on their exponent bits)."""
    for dt in _VALUE_ST:
        spans = [(at + row[5][2], at + row[5][3]) for row in rows if row[5][0] == dt and row[3]]
        small = [mv[b:e] for b, e in spans if e - b <= _BATCH_COUNT * 4]
        parts: list[bytes | memoryview] = [b"".join(small)] if small else []
        parts += [mv[b:e] for b, e in spans if e - b > _BATCH_COUNT * 4]
        if not all(_bytes_finite(part, dt) for part in parts):
            return False
    return True


def load_canonical(data: bytes, *, allow_nonfinite: bool = False, source: str | None = None,
                   source_sha256: str | None = None) -> SparseAdapter | ScannedAdapter:
    """Read adapter bytes for ``register``/``pull``: a :class:`ScannedAdapter` when every parameter is in
    element layout and passes the checks on views of the bytes, else the full :func:`load` (``keep_source``).

    The scan accepts exactly what :func:`load` accepts (header, card, names, counts, gap coding and escapes,
    ranges, finite values, extras, no undescribed tensors) without decoding indices; at the first doubt it
    hands over to :func:`load`, so every refusal has the same one-line error. Raises FormatError.
    """
    try:
        with open_adapter(data, allow_nonfinite=allow_nonfinite, source=source) as r:
            mv = memoryview(data)
            hasher = MaskHasher()
            got = _scan_params(r, mv, hasher)
            if got is not None:
                params, escapes = got
                extras = _scan_extras(r, mv)
                if extras is not None and not r.unknown_tensors():
                    return ScannedAdapter(data, params, escapes, extras, r.card, hasher.hexdigest(),
                                          allow_nonfinite=allow_nonfinite, source_sha256=source_sha256)
    except (FormatError, KeyError, ValueError, TypeError, OverflowError):
        pass  # the full path below gives the error
    return load(data, allow_nonfinite=allow_nonfinite, source=source, keep_source=True, source_sha256=source_sha256)


def cast_values(adapter: SparseAdapter, dtype: torch.dtype | str | None) -> SparseAdapter:
    """``adapter`` with every parameter's values in ``dtype`` (fp32, bf16 or fp16; ``None``: unchanged).

    Values are rounded to nearest (torch's cast), so apply adds exactly the values the file then holds.
    When a value changes dtype the card records it: ``card["values"] = {"dtype": <new>, "cast_from":
    [<old dtypes>]}``. Returns a new adapter (tensors shared where nothing changes); raises FormatError for
    an unknown dtype (or, on save, for values that overflow fp16 to infinity).
    """
    if dtype is None:
        return adapter
    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if dt not in _dtypes().value:
        raise FormatError(f"values dtype {dt} not allowed (fp32, bf16, fp16)")
    olds = sorted({dtype_name(p.values.dtype) for p in adapter.params.values() if p.values.dtype != dt})
    if not olds:
        return adapter
    params = {n: SparseParam(p.shape, p.indices, p.values.to(dt).contiguous(), p.block_size)
              for n, p in adapter.params.items()}
    card = dict(adapter.card)
    card["values"] = {"dtype": dtype_name(dt), "cast_from": olds}
    return SparseAdapter(params, dict(adapter.extras), card)


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


def load_file(path: str | os.PathLike[str], *, allow_nonfinite: bool = False, keep_source: bool = False
              ) -> SparseAdapter:
    """Load and validate an adapter file (``keep_source`` as :func:`load`)."""
    return load(read_bytes_checked(path), allow_nonfinite=allow_nonfinite, source=Path(path).name,
                keep_source=keep_source)

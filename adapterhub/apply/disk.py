"""Exact apply and revert in place on disk, crash-safely: memory-mapped safetensors and a write-ahead log.

A safetensors file is patched in place through a memory map of its data region (the header comes
from the one strict reader, :func:`adapterhub.st_io.read_header`). :class:`DiskTransaction` is a
context manager around one batch of writes: entering it writes a write-ahead undo record (WAL) — the
original bytes of every position the batch will touch — and fsyncs it *before* the first byte of the
weights changes; :func:`recover_wal` puts those bytes back after a crash.

The arithmetic is :func:`adapterhub.apply.patching.patch_flat` (the in-memory path's), so a file
patched here equals the same weights patched in memory, bit for bit.

``fault_point(name)`` is the fault-injection hook of the crash tests (:mod:`adapterhub.faults`).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from .. import st_io
from ..errors import DeploymentError, FormatError, HeaderError
from ..faults import fault_point
from ..fsutil import atomic_write_bytes, fsync_dir, fsync_path
from ..gapcode import decode_gaps, encode_gaps
from .patching import (
    NonFiniteWeightsError,
    UndoEntry,
    check_scale,
    patch_flat,
    patched_values,
    read_at,
    write_at,
)

__all__ = ["ST_DTYPES", "SafetensorsFile", "WeightsFolder", "DiskTransaction", "encode_undo", "decode_undo",
           "read_wal", "recover_wal", "wal_entries", "check_finite_plan"]

# the patchable (floating) dtypes: a view of the one dtype table in st_io
ST_DTYPES: dict[str, torch.dtype] = {n: st_io.torch_dtype(n) for n in st_io.FLOAT_DTYPES}


def _open_weights_nofollow(path: Path, writable: bool) -> Any:
    """A file object for the weights file ``path``, a regular file; when ``writable``, provably the file in
    the folder: opened without following a symlink and with no second hard link, so a planted link can
    never make a patch write into a file elsewhere. Raises DeploymentError (one line)."""
    try:
        fd = os.open(path, (os.O_RDWR | os.O_NOFOLLOW if writable else os.O_RDONLY) | os.O_NONBLOCK)
    except OSError as e:
        why = "it is a symlink" if e.errno == errno.ELOOP else (e.strerror or e.__class__.__name__)
        raise DeploymentError(f"cannot open {path}: {why}; refusing to patch through it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (writable and st.st_nlink > 1):
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"it has {st.st_nlink} hard links"
        raise DeploymentError(f"{path}: {why}; refusing to patch through it (the folder was tampered with)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+b" if writable else "rb")


class SafetensorsFile:
    """A safetensors file memory-mapped for in-place patching of its data region.

    Takes: the path; ``writable``. Use it as a context manager (or call :meth:`close`).
    Raises: DeploymentError if the file is missing, its header is malformed or offsets leave the file.
    """

    def __init__(self, path: str | os.PathLike[str], writable: bool = True) -> None:
        self.path = Path(path)
        try:  # the one strict safetensors header reader (st_io): a malformed header fails here, cleanly
            header = st_io.read_header(self.path)
        except HeaderError as e:
            if not self.path.exists():
                raise DeploymentError(f"{self.path}: weights file is missing") from None
            raise DeploymentError(str(e)) from None
        self.data_start = header.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            k: (e.dtype, e.shape, e.begin, e.end) for k, e in header.entries.items()}
        self._mm: np.memmap[Any, np.dtype[np.uint8]] | None = None
        if header.file_size:
            with _open_weights_nofollow(self.path, writable) as fh:  # the mapping outlives the file object
                self._mm = np.memmap(fh, dtype=np.uint8, mode="r+" if writable else "r", shape=(header.file_size,))

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def flat(self, name: str) -> torch.Tensor:
        """A 1-D torch view sharing memory with the mapped file (writes go to the file).

        Raises: DeploymentError for a tensor of a dtype that cannot be patched.
        """
        dt, _, b, e = self.entries[name]
        if dt not in ST_DTYPES:
            raise DeploymentError(f"{name}: cannot patch a {dt} tensor")
        assert self._mm is not None  # a file with tensors has a non-empty data region
        arr = self._mm[self.data_start + b:self.data_start + e]
        with warnings.catch_warnings():  # a read-only map: torch warns, and we never write through it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        return t.view(ST_DTYPES[dt])

    def sync(self) -> None:
        """msync the mapping and fsync the file."""
        if self._mm is not None:
            self._mm.flush()
        fsync_path(self.path)

    def close(self) -> None:
        if self._mm is not None:
            mm = getattr(self._mm, "_mmap", None)
            self._mm = None
            if mm is not None:
                with contextlib.suppress(BufferError):  # a view still alive: the map closes when it dies
                    mm.close()


class WeightsFolder:
    """All ``*.safetensors`` files of a model folder, addressed by tensor name (shards allowed).

    Use it as a context manager (or call :meth:`close`).
    Raises: DeploymentError if there is no weights file, a file is corrupt or a tensor name appears twice.
    """

    def __init__(self, folder: str | os.PathLike[str], writable: bool = True) -> None:
        self.path = Path(folder)
        self.files: list[SafetensorsFile] = []
        try:
            for p in sorted(self.path.glob("*.safetensors")):
                self.files.append(SafetensorsFile(p, writable))
            if not self.files:
                raise DeploymentError(f"{self.path}: no .safetensors weights file")
            self._by_name: dict[str, SafetensorsFile] = {}
            for f in self.files:
                for n in f.entries:
                    if n in self._by_name:
                        raise DeploymentError(f"{n}: tensor appears in two weights files")
                    self._by_name[n] = f
        except BaseException:
            self.close()
            raise
        self._dirty: set[int] = set()

    def __enter__(self) -> WeightsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def entries(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        """Tensor name -> (dtype, shape, begin, end) over all files."""
        return {n: f.entries[n] for n, f in self._by_name.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._by_name[name]
        except KeyError:
            raise DeploymentError(f"{name}: no such tensor in the deployment's weights") from None

    def buffer(self, name: str) -> tuple[Any, str, int, int]:
        """(the memory map of the file holding ``name``, the file's name, the tensor's absolute begin and end
        offsets) for hashing its bytes; does not mark the file for :meth:`sync`."""
        f = self._file(name)
        _, _, b, e = f.entries[name]
        return f._mm, f.path.name, f.data_start + b, f.data_start + e

    def file_of(self, name: str) -> str:
        """The name of the weights file holding tensor ``name``."""
        return self._file(name).path.name

    def flat(self, name: str) -> torch.Tensor:
        """See :meth:`SafetensorsFile.flat`; marks the tensor's file for :meth:`sync`."""
        f = self._file(name)
        self._dirty.add(id(f))
        return f.flat(name)

    def sync(self) -> None:
        """Flush and fsync the files a :meth:`flat` view was taken of."""
        for f in self.files:
            if id(f) in self._dirty:
                f.sync()

    def close(self) -> None:
        for f in self.files:
            f.close()


Weights = SafetensorsFile | WeightsFolder


# Undo / WAL records are small safetensors files: per tensor the positions and the original values in the
# weight dtype, plus a JSON document in the metadata. No pickle. The positions are gap-coded as the adapter
# format codes its indices, with the same coder (:func:`adapterhub.gapcode.encode_gaps`: uint16 gaps, a zero gap
# escaping to an int64 value): ``NNNNNN.gap`` + ``NNNNNN.esc``, 2 bytes a position instead of 8. Records written
# before that hold plain int64 positions (``NNNNNN.idx``) and are read as they are.


def encode_undo(entries: Sequence[UndoEntry], meta: Mapping[str, Any]) -> bytes:
    """Serialise undo entries (+ JSON metadata) as safetensors bytes (deterministic).

    Takes: the entries (application order; sorted unique positions, as every apply's) and a JSON-able mapping
    (``names`` is reserved).
    Returns: the bytes of the record.
    """
    from ..format import _DTYPE_TO_ST, _container_header, _le_array

    specs: dict[str, tuple[str, list[int]]] = {}
    blobs: dict[str, np.ndarray[Any, Any]] = {}
    names = []
    for i, e in enumerate(entries):
        gaps, esc = encode_gaps(e.indices)
        parts = {f"{i:06d}.gap": ("U16", gaps), f"{i:06d}.esc": ("I64", esc),
                 f"{i:06d}.orig": (_DTYPE_TO_ST[e.original.dtype], _le_array(e.original))}
        if e.patched is not None:  # the values the apply wrote (a revert's WAL names the record for them)
            parts[f"{i:06d}.new"] = (_DTYPE_TO_ST[e.patched.dtype], _le_array(e.patched))
        if e.chunks is not None and e.chunk_hashes is not None:  # the state's hashes of those chunks before
            parts[f"{i:06d}.chunks"] = ("I64", _le_array(e.chunks.to(torch.int64)))
            parts[f"{i:06d}.prehash"] = ("U8", _le_array(e.chunk_hashes.to(torch.uint8)))
        for k, (dt, arr) in parts.items():
            n = arr.nbytes // st_io.DTYPE_SIZES[dt]
            specs[k] = (dt, [n // 32, 32] if k.endswith(".prehash") else [n])
            blobs[k] = arr
        names.append(e.name)
    doc = dict(meta)
    doc["names"] = names
    # the container written directly (format's canonical safetensors writer), each tensor's bytes copied once,
    # straight from its array into the record
    head, order, _ = _container_header(specs, {"adapterhub.undo": json.dumps(doc, sort_keys=True)})
    return b"".join([head, *(blobs[n].data for n in order)])


def _array(data: bytes, header: st_io.Header, key: str, dtype: str) -> np.ndarray[Any, Any]:
    """Tensor ``key`` of the record ``data`` as a read-only numpy view (little-endian ``dtype``), from the strict
    header's offsets. Raises KeyError if absent, ValueError if it is not of safetensors dtype ``dtype``."""
    e = header.entries[key]
    if e.dtype != dtype:
        raise ValueError(f"{key} is {e.dtype}, not {dtype}")
    return np.frombuffer(data, dtype=_NP[dtype], count=e.nbytes // st_io.DTYPE_SIZES[dtype],
                         offset=header.data_start + e.begin)


_NP = {"U16": "<u2", "I64": "<i8", "U8": "u1"}


def _indices(data: bytes, header: st_io.Header, i: int) -> torch.Tensor:
    """Entry ``i``'s positions: gap-coded (``.gap`` + ``.esc``; :func:`adapterhub.gapcode.decode_gaps`) or,
    in records of earlier versions, plain int64 (``.idx``)."""
    if f"{i:06d}.idx" in header.entries:
        return torch.from_numpy(_array(data, header, f"{i:06d}.idx", "I64").copy())
    try:
        return torch.from_numpy(decode_gaps(_array(data, header, f"{i:06d}.gap", "U16"),
                                            _array(data, header, f"{i:06d}.esc", "I64"), "undo record"))
    except FormatError as e:
        raise ValueError(str(e)) from None


def _original(data: bytes, header: st_io.Header, key: str) -> torch.Tensor:
    """The original values ``key`` (a float tensor in the weight dtype; a copy)."""
    e = header.entries[key]
    if e.dtype not in ST_DTYPES or len(e.shape) != 1:
        raise ValueError(f"{key} is not a list of float values")
    if not e.nbytes:
        return torch.zeros(0, dtype=ST_DTYPES[e.dtype])
    return torch.frombuffer(bytearray(memoryview(data)[header.data_start + e.begin:header.data_start + e.end]),
                            dtype=ST_DTYPES[e.dtype])


def decode_undo(data: bytes) -> tuple[list[UndoEntry], dict[str, Any]]:
    """Inverse of :func:`encode_undo` (and the reader of records with plain int64 positions): (entries, JSON
    document).

    Raises: DeploymentError if the record is damaged.
    """
    try:
        header = st_io.parse_header(data, "undo record")  # the one strict header reader: offsets checked
        doc = json.loads(header.metadata["adapterhub.undo"])
        if not isinstance(doc, dict) or not isinstance(doc.get("names"), list):
            raise ValueError("no entry names")
        entries = []
        for i, name in enumerate(doc["names"]):
            if not isinstance(name, str):
                raise ValueError("an entry name is not a string")
            idx = _indices(data, header, i)
            orig = _original(data, header, f"{i:06d}.orig")
            if orig.numel() != idx.numel():
                raise ValueError("original values do not match their positions")
            new = None
            if f"{i:06d}.new" in header.entries:
                new = _original(data, header, f"{i:06d}.new")
                if new.numel() != idx.numel() or new.dtype != orig.dtype:
                    raise ValueError("patched values do not match their positions")
            chunks = pre = None
            if f"{i:06d}.prehash" in header.entries:
                chunks = torch.from_numpy(_array(data, header, f"{i:06d}.chunks", "I64").copy())
                pre = torch.from_numpy(_array(data, header, f"{i:06d}.prehash", "U8").copy())
                if pre.numel() != 32 * chunks.numel():
                    raise ValueError("chunk hashes do not match their chunks")
                pre = pre.reshape(-1, 32)
            entries.append(UndoEntry(name, idx, orig, chunks, pre, new))
    except (HeaderError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise DeploymentError("undo record is damaged") from None
    return entries, doc


def _union_sorted(lists: Sequence[torch.Tensor], numel: int | None = None) -> torch.Tensor:
    """Sorted union of sorted index lists, in O(n log n) of their total length n — never a mark over the
    tensor's ``numel`` elements (which would make a revert cost what the model costs, issue 19).
    ``numel`` is accepted for callers of the old signature and ignored."""
    if len(lists) == 1:
        return lists[0].to(torch.int64)
    if not lists:
        return torch.zeros(0, dtype=torch.int64)
    return torch.unique(torch.cat([t.to(torch.int64).view(-1) for t in lists]), sorted=True)


def check_finite_plan(weights: Weights, restores: Sequence[Sequence[UndoEntry]],
                      applies: Sequence[tuple[Mapping[str, Any], float, str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Refuse an on-disk operation that would write NaN/inf, before anything is written.

    Takes the weights, the undo entries the operation will restore first (per layer, in the order
    :meth:`DiskTransaction.restore` is called) and the applies that follow, as (name -> SparseParam,
    scale, label). Replays them with :func:`patch_flat`'s exact arithmetic on copies of the touched
    positions only (O(nnz)), in the weight dtype.
    Returns: for each tensor that only one apply touches and nothing restores (the common case), the
    (original, patched) values at that apply's positions — what :class:`DiskTransaction` saves and writes
    (``prepared``), so the positions are gathered and the sum computed once per operation.
    Raises: NonFiniteWeightsError naming the adapter (label) and the tensor; NonFiniteWeightsError for a
    non-finite scale.
    """
    for _, scale, _ in applies:
        check_scale(scale)
    names = sorted({n for params, _, _ in applies for n in params})
    prepared: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for n in names:
        flat = weights.flat(n)
        rest = [e for ents in restores for e in reversed(list(ents)) if e.name == n]
        mine = [(params[n], scale, label) for params, scale, label in applies if n in params]
        if not rest and len(mine) == 1:  # the common case (one apply): no replay, just the new values
            (p, scale, label), = mine
            i, v = p.flat()
            orig = read_at(flat, i)
            try:
                prepared[n] = (orig, patched_values(orig, v, scale, name=n))
            except NonFiniteWeightsError as err:
                raise NonFiniteWeightsError(f"{label}: {err}") from None
            continue
        lists = [p.flat()[0] for p, _, _ in mine]
        idx = _union_sorted(lists + [e.indices for e in rest])
        work = flat.index_select(0, idx)  # a copy: the file is not touched
        for e in rest:
            work[torch.searchsorted(idx, e.indices)] = e.original.to(work.dtype)
        for params, scale, label in applies:
            if n not in params:
                continue
            i, v = params[n].flat()
            pos = torch.searchsorted(idx, i)
            sub = work[pos]
            try:
                patch_flat(sub, torch.arange(sub.numel()), v, scale, name=n)
            except NonFiniteWeightsError as err:
                raise NonFiniteWeightsError(f"{label}: {err}") from None
            work[pos] = sub
    return prepared


class DiskTransaction:
    """A crash-safe batch of in-place writes to memory-mapped weights, as a context manager.

    Takes: the weights; the WAL path; ``meta`` (a JSON-able mapping stored in the WAL, e.g. an
    operation id that tells recovery whether the caller recorded the result); ``touched``: every
    tensor name -> the index lists the batch will write (their union is saved).

    ::

        with DiskTransaction(weights, wal_path, {"op_id": op}, touched) as tx:  # WAL written, fsynced
            tx.restore(entries); new = tx.apply(params, scale)
            tx.commit()          # the new bytes are durable; from here the caller's record decides
            record(op)           # e.g. the catalog event naming ``op``
        # left normally: the WAL is removed (commit() is implied if the block did not call it)

    ``saved_in``: the sha256 of an undo record already durable in ``<WAL folder>/undo/`` holding the current
    bytes of every position the batch writes: a lone apply's own record, written before its patch (its
    original values), or, with ``saved_patched``, the record of the layer a lone revert takes off (the values
    its apply wrote, which the weights hold now; ``current`` gives them, name -> values at the layer's
    positions, so they are not gathered again). The WAL then holds only ``meta`` and that name, and
    :func:`recover_wal` reads the bytes from the record (checking its sha256). The saved bytes are the same
    either way; the WAL is still written and fsynced before the first byte changes.

    An ``Exception`` before :meth:`commit` rolls back at once (the saved bytes are written back,
    fsynced, the WAL removed) and propagates. After :meth:`commit`, and on any ``BaseException`` that
    is not an ``Exception`` (KeyboardInterrupt, SystemExit: the process is going away, as after a
    SIGKILL), the WAL stays: :func:`recover_wal` (or a caller that knows whether ``meta``'s operation was
    recorded) finishes the job. No "done" mark is written: the commit point is the caller's own record,
    which names the operation stored in the WAL from the start.
    """

    def __init__(self, weights: Weights, wal_path: Path, meta: Mapping[str, Any],
                 touched: Mapping[str, Sequence[torch.Tensor]],
                 prepared: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 saved_in: str | None = None, saved_patched: bool = False,
                 current: Mapping[str, torch.Tensor] | None = None) -> None:
        self.weights = weights
        self.wal_path = wal_path
        self.meta = dict(meta)
        # the sha256 of an undo record already durable in ``<WAL folder>/undo/`` that holds the current bytes of
        # every position the batch writes (an apply's own undo record, written before the patch): the WAL then
        # names it instead of holding a second copy of the same bytes (see :func:`wal_entries`)
        self.saved_in = saved_in
        self.saved_patched = saved_patched
        # name -> the current values at the (one) index list the batch touches in it, when the caller holds them
        self._current = dict(current or {})
        self.touched = touched
        # name -> (original, patched) values of the one apply touching it (check_finite_plan's result): saved
        # and written as they are instead of being gathered and computed again
        self._prepared = dict(prepared or {})
        self._saved: list[UndoEntry] = []
        self._committed = False

    def __enter__(self) -> DiskTransaction:
        """Save the current bytes of every touched position to the WAL and fsync it, before any write."""
        for name in sorted(self.touched):
            flat = self.weights.flat(name)
            idx = _union_sorted(self.touched[name])
            pre = self._prepared.get(name)
            if pre is not None and len(self.touched[name]) != 1:
                self._prepared.pop(name)  # positions beyond that apply's: gathered here, patched by apply()
                pre = None
            cur = pre[0] if pre is not None else (self._current.get(name) if len(self.touched[name]) == 1 else None)
            self._saved.append(UndoEntry(name, idx, cur if cur is not None else read_at(flat, idx)))
        if self.saved_in is not None:
            _undo_record_path(self.wal_path, self.saved_in)  # a valid digest, or refused before anything is written
            doc = {**self.meta, "saved_in": self.saved_in, **({"saved": "patched"} if self.saved_patched else {})}
            atomic_write_bytes(self.wal_path, encode_undo([], doc))
        else:
            atomic_write_bytes(self.wal_path, encode_undo(self._saved, self.meta))
        fault_point("wal.written")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            if not self._committed:
                self.commit()
            self._remove_wal()
        elif issubclass(exc_type, Exception) and not self._committed:
            # Nothing was recorded yet: put the saved bytes back now rather than leave the work to the
            # next command. If that fails too the WAL stays, and recovery does it later.
            with contextlib.suppress(Exception):
                self._rollback()

    def apply(self, adapter_params: Mapping[str, Any], scale: float, fault: str | None = None,
              on_patched: Callable[[str, torch.Tensor], None] | None = None) -> list[UndoEntry]:
        """Apply sparse params (name -> SparseParam) in place; returns their undo entries (with the values written, ``patched``).

        ``fault``: a fault point hit half-way through the tensors (the crash tests kill the process there).
        Nothing is synced for it: a killed process leaves its half-written pages in the page cache, where the next
        process reads them.
        ``on_patched(name, indices)``: called after each tensor is written (e.g. to start hashing it).
        Raises: NonFiniteWeightsError (see :func:`patch_flat`; :func:`check_finite_plan` refuses earlier).
        """
        out = []
        for i, name in enumerate(sorted(adapter_params)):
            idx, vals = adapter_params[name].flat()
            pre = self._prepared.pop(name, None)
            if pre is not None:  # computed by check_finite_plan from these very positions and values
                write_at(self.weights.flat(name), idx, pre[1])
                out.append(UndoEntry(name, idx, pre[0], patched=pre[1]))
            else:
                flat = self.weights.flat(name)
                orig = patch_flat(flat, idx, vals, scale, name=name)
                out.append(UndoEntry(name, idx, orig, patched=read_at(flat, idx)))
            if on_patched is not None:
                on_patched(name, idx)
            if fault and i == len(adapter_params) // 2:
                fault_point(fault)
        return out

    def restore(self, entries: Sequence[UndoEntry], fault: str | None = None) -> None:
        """Write originals back (reverse order); ``fault`` as in :meth:`apply`."""
        ents = list(reversed(list(entries)))
        for i, e in enumerate(ents):
            write_at(self.weights.flat(e.name), e.indices, e.original)
            if fault and i == len(ents) // 2:
                fault_point(fault)

    def commit(self) -> None:
        """fsync the weights: the new state survives a crash. After this an exception leaves the WAL."""
        self.weights.sync()
        self._committed = True

    def _rollback(self) -> None:
        for e in reversed(self._saved):
            write_at(self.weights.flat(e.name), e.indices, e.original)
        self.weights.sync()
        self._remove_wal()

    def _remove_wal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.wal_path.unlink()
        fsync_dir(self.wal_path.parent)


def read_wal(wal_path: Path) -> dict[str, Any] | None:
    """The WAL's JSON document (the transaction's ``meta``), or None when there is no WAL.

    Raises: DeploymentError if the WAL is damaged.
    """
    if not wal_path.exists():
        return None
    return decode_undo(wal_path.read_bytes())[1]


def _undo_record_path(wal_path: Path, digest: object) -> Path:
    """Where the undo record named by a WAL lives: ``<WAL folder>/undo/<sha256>.safetensors``.
    Raises: DeploymentError for a name that is not a sha256 (a damaged or forged WAL)."""
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DeploymentError("write-ahead log is damaged (it names an invalid undo record)")
    return wal_path.parent / "undo" / f"{digest}.safetensors"


def wal_entries(wal_path: Path) -> tuple[list[UndoEntry], dict[str, Any]]:
    """The saved bytes of a WAL and its JSON document. A WAL that names the undo record holding them
    (``saved_in``, see :class:`DiskTransaction`) has them read from that record, which must be a regular file
    (no symlink followed) whose sha256 is its name.

    With ``"saved": "patched"`` (a lone revert's WAL) the saved bytes are the values the record's apply wrote.

    Raises: DeploymentError if the WAL or that record is damaged or missing.
    """
    entries, doc = decode_undo(wal_path.read_bytes())
    if "saved_in" not in doc:
        return entries, doc
    p = _undo_record_path(wal_path, doc["saved_in"])
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise DeploymentError(f"the write-ahead log's undo record {p.name} is missing or unreadable; the "
                              "interrupted operation cannot be undone") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise DeploymentError(f"the write-ahead log's undo record {p.name} is not a regular file")
        data = f.read()
    if hashlib.sha256(data).hexdigest() != doc["saved_in"]:
        raise DeploymentError(f"the write-ahead log's undo record {p.name} is corrupt (its sha256 differs); the "
                              "interrupted operation cannot be undone")
    saved = decode_undo(data)[0]
    if doc.get("saved") == "patched":
        if any(e.patched is None for e in saved):
            raise DeploymentError(f"the write-ahead log's undo record {p.name} holds no patched values; the "
                                  "interrupted operation cannot be undone")
        return [UndoEntry(e.name, e.indices, e.patched) for e in saved if e.patched is not None], doc
    if "saved" in doc:
        raise DeploymentError("write-ahead log is damaged (it names an unknown kind of saved values)")
    return saved, doc


def recover_wal(target: Weights, wal_path: Path) -> bool:
    """Put back the bytes saved in a WAL (undo an interrupted operation), then delete the WAL.

    Idempotent: a crash during recovery is recovered again next time.
    Returns: True if something was restored.
    Raises: DeploymentError if the WAL (or the undo record it names) is damaged or names a tensor or a position
    the weights lack.
    """
    if not wal_path.exists():
        return False
    entries, _ = wal_entries(wal_path)
    for e in entries:
        flat = target.flat(e.name)
        if e.indices.numel() and (int(e.indices.min()) < 0 or int(e.indices.max()) >= flat.numel()):
            raise DeploymentError(f"write-ahead log is damaged: {e.name} positions lie outside the tensor")
    for e in entries:
        write_at(target.flat(e.name), e.indices, e.original)
    target.sync()
    wal_path.unlink()
    fsync_dir(wal_path.parent)
    return True

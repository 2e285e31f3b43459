"""Exact apply and revert of sparse adapters in memory: the arithmetic every path shares.

Applying writes ``W[idx] = round(W[idx] + scale * v)``: the sum is computed in fp32 (fp64 for
fp64 weights) and rounded **once** to the weight dtype. Before writing, the original ``W[idx]``
are saved (``index_select``) in an undo record; revert writes them back (:func:`write_at`), so the
weights return bit for bit — unlike PEFT's unmerge, which subtracts and drifts. Cost is O(nnz).

:func:`patch_flat` is the one implementation of that arithmetic (with the refusal of values that
would overflow to NaN/inf); the on-disk path (:mod:`adapterhub.apply.disk`) calls it on memory-mapped
weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import st_io
from ..errors import BaseModelError, DeploymentError
from ..format import SparseAdapter, all_finite

if TYPE_CHECKING:  # pragma: no cover
    from .state import RootScheme

__all__ = [
    "UndoEntry", "UndoRecord", "apply_adapter", "revert", "revert_all", "applied", "state_fingerprint",
    "resolve_names", "patch_flat", "patched_values", "read_at", "write_at", "check_scale", "NonFiniteWeightsError",
    "state_root",
]


# -- the numeric core --------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def write_at(flat: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """``flat[idx] = src`` (same dtype), bit for bit.

    On CPU this goes through numpy fancy assignment on an integer view of the same width, which
    measured 2-3x faster than ``index_copy_`` at 1% density over SmolLM2-sized weights (and copies
    bits, so bf16 needs no numpy dtype). Other devices use ``index_copy_``.
    """
    if flat.device.type != "cpu" or flat.element_size() not in _INT_VIEW:
        flat.index_copy_(0, idx, src.to(flat.dtype))
        return
    it = _INT_VIEW[flat.element_size()]
    dst = flat.detach().view(it).numpy()
    dst[idx.detach().numpy()] = src.detach().to(flat.dtype).contiguous().view(it).numpy()


class NonFiniteWeightsError(DeploymentError):
    """Applying would write NaN/inf into weights (e.g. a bf16/fp16 overflow, a huge scale); nothing was changed."""


def _check_finite(orig: torch.Tensor, new: torch.Tensor, name: str, scale: float) -> None:
    """Raise NonFiniteWeightsError if ``new`` (in the weight dtype) has NaN/inf where ``orig`` was finite."""
    if new.numel() == 0 or all_finite(new):  # (an exponent-bit test for bf16/fp16: same answer, faster)
        return
    bad = ~torch.isfinite(new) & torch.isfinite(orig)
    if bool(bad.any()):
        n = int(bad.sum())
        dt = str(new.dtype).replace("torch.", "")
        raise NonFiniteWeightsError(f"{name}: applying at scale {scale:g} would write {n} non-finite value(s) "
                                    f"(NaN/inf, e.g. {dt} overflow) into the weights; refused, nothing was changed")


def patch_flat(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, scale: float = 1.0, *,
               name: str = "tensor") -> torch.Tensor:
    """``flat[idx] = round(flat[idx] + scale * values)`` in place; returns the originals.

    Takes: a 1-D floating tensor (a view of the weights), sorted unique int64 positions, values; ``name``
    for messages.
    Returns: a copy of ``flat[idx]`` before the write (the undo data).
    Raises: NonFiniteWeightsError, before writing anything, if a patched value would not be finite in
    the weight dtype (where the original was finite).

    On CPU the gather and the scatter go through numpy on an integer view of the weights (a bit
    copy: ``np.take`` then fancy assignment), the add in torch at fp32 (fp64 for fp64 weights),
    rounded once to the weight dtype — the same arithmetic as the device path.
    """
    if flat.device.type == "cpu" and flat.element_size() in _INT_VIEW and idx.device.type == "cpu":
        it = _INT_VIEW[flat.element_size()]
        bits = flat.detach().view(it).numpy()
        ii = idx.numpy()
        orig = torch.from_numpy(np.take(bits, ii)).view(flat.dtype)
        new = patched_values(orig, values, scale, name=name)
        bits[ii] = new.view(it).numpy()
        return orig
    orig = flat.index_select(0, idx)
    write_at(flat, idx, patched_values(orig, values, scale, name=name))
    return orig


def read_at(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A copy of ``flat[idx]`` (on CPU through numpy on an integer view of the same width, as :func:`write_at`)."""
    if flat.device.type == "cpu" and flat.element_size() in _INT_VIEW and idx.device.type == "cpu":
        it = _INT_VIEW[flat.element_size()]
        return torch.from_numpy(np.take(flat.detach().view(it).numpy(), idx.numpy())).view(flat.dtype)
    return flat.index_select(0, idx)


def patched_values(orig: torch.Tensor, values: torch.Tensor, scale: float = 1.0, *, name: str = "tensor") -> torch.Tensor:
    """``round(orig + scale * values)`` in ``orig``'s dtype — :func:`patch_flat`'s arithmetic, without writing:
    the sum in fp32 (fp64 for fp64 weights), rounded once.
    Raises: NonFiniteWeightsError if a value would not be finite where ``orig`` was."""
    ct = _compute_dtype(orig.dtype)
    delta = values if values.dtype == ct else values.to(ct)
    if scale != 1.0:
        delta = delta * scale
    new = orig + delta if orig.dtype == ct else (orig.to(ct) + delta).to(orig.dtype)
    _check_finite(orig, new, name, scale)
    return new


def check_scale(scale: float) -> float:
    """``scale`` as a float. Raises: NonFiniteWeightsError unless it is a finite number."""
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise NonFiniteWeightsError(f"scale must be a finite number, got {scale!r}") from None
    if not math.isfinite(s):
        raise NonFiniteWeightsError(f"scale must be a finite number, got {scale!r}")
    return s


# -- in memory ------------------------------------------------------------------------------------


@dataclass
class UndoEntry:
    """Original values of one tensor at the positions an apply touched."""

    name: str
    indices: torch.Tensor
    original: torch.Tensor
    # On disk only: the deployment state's chunk hashes of the chunks this entry touched, as they were before
    # the apply (ids int64 [k], hashes uint8 [k, 32]); a revert puts them back instead of re-hashing.
    chunks: torch.Tensor | None = None
    chunk_hashes: torch.Tensor | None = None
    # On disk only: the values the apply wrote at those positions (what the weights hold while its layer is on
    # top); a revert of that layer saves them in its WAL by naming the record instead of gathering them again.
    patched: torch.Tensor | None = None


@dataclass
class UndoRecord:
    """Everything needed to revert one apply exactly (entries in application order)."""

    entries: list[UndoEntry] = field(default_factory=list)
    label: str = ""
    scale: float = 1.0

    @property
    def nnz(self) -> int:
        return sum(e.indices.numel() for e in self.entries)


def _tensors_of(target: Any) -> MutableMapping[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        out: dict[str, torch.Tensor] = {}
        for k, v in target.state_dict(keep_vars=True).items():
            out[k] = v.data if isinstance(v, torch.nn.Parameter) else v
        return out
    if isinstance(target, Mapping):
        return target  # type: ignore[return-value]
    raise TypeError(f"expected a torch.nn.Module or a state dict, got {type(target).__name__}")


def resolve_names(adapter_names: Iterable[str], target_names: Iterable[str]) -> dict[str, str]:
    """Map adapter parameter names (the base file's tensor names) onto a module's state-dict names.

    Exact names win; otherwise a unique match differing by a leading prefix (``bert.`` etc.).
    Raises: BaseModelError naming the first parameter with no or an ambiguous match.
    """
    tnames = list(target_names)
    tset = set(tnames)
    out = {}
    for n in adapter_names:
        if n in tset:
            out[n] = n
            continue
        cands = [t for t in tnames if t.endswith("." + n) or n.endswith("." + t)]
        if len(cands) != 1:
            why = "no tensor" if not cands else f"{len(cands)} tensors ({', '.join(cands[:3])})"
            raise BaseModelError(f"{n}: {why} of the model matches this adapter parameter")
        out[n] = cands[0]
    return out


def _flat_view(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise BaseModelError(f"{name}: cannot patch a {t.dtype} tensor")
    if not t.is_contiguous():
        raise BaseModelError(f"{name}: tensor is not contiguous; cannot patch it in place")
    return t.view(-1)


def apply_adapter(target: Any, adapter: SparseAdapter, scale: float = 1.0, *, label: str = "") -> UndoRecord:
    """Apply ``adapter`` in place to a module or state dict.

    Takes: a ``torch.nn.Module`` or a mapping name -> tensor; the adapter; a scale.
    Returns: the :class:`UndoRecord` that :func:`revert` needs.
    Raises: BaseModelError (missing tensor, shape mismatch) before anything is changed;
    NonFiniteWeightsError (a non-finite scale, or patched values that overflow the weight dtype), the
    target left exactly as it was.
    """
    scale = check_scale(scale)
    tensors = _tensors_of(target)
    names = resolve_names(sorted(adapter.params), tensors.keys())
    for n, tn in names.items():
        t = tensors[tn]
        if tuple(t.shape) != adapter.params[n].shape:
            raise BaseModelError(f"{n}: adapter shape {adapter.params[n].shape} does not match {tuple(t.shape)}")
        _flat_view(t, n)
    rec = UndoRecord(label=label, scale=scale)
    with torch.no_grad():
        try:
            for n in sorted(adapter.params):
                flat = _flat_view(tensors[names[n]], n)
                idx, vals = adapter.params[n].flat_on(flat.device)  # moved to a GPU once, then kept
                rec.entries.append(UndoEntry(names[n], idx, patch_flat(flat, idx, vals, scale, name=n)))
        except NonFiniteWeightsError:
            revert(target, rec)  # the tensors patched so far go back bit for bit
            raise
    return rec


def revert(target: Any, record: UndoRecord) -> None:
    """Write an undo record's originals back (must be the most recent un-reverted apply)."""
    tensors = _tensors_of(target)
    with torch.no_grad():
        for e in reversed(record.entries):
            write_at(tensors[e.name].view(-1), e.indices, e.original)


def revert_all(target: Any, records: Sequence[UndoRecord]) -> None:
    """Revert several applies, newest first."""
    for r in reversed(list(records)):
        revert(target, r)


@contextlib.contextmanager
def applied(target: Any, *adapters: SparseAdapter, scale: float | Sequence[float] = 1.0) -> Iterator[list[UndoRecord]]:
    """Context manager: the adapters are applied inside the block and reverted exactly on exit
    (also on an exception).

    Takes: the target (as :func:`apply_adapter`), the adapters, one scale for all or one per adapter.
    Yields: their undo records. Raises: ValueError if the number of scales differs from the adapters'.
    """
    scales = [float(x) for x in scale] if isinstance(scale, Sequence) else [float(scale)] * len(adapters)
    if len(scales) != len(adapters):
        raise ValueError(f"{len(scales)} scales for {len(adapters)} adapters")
    records: list[UndoRecord] = []
    try:
        for a, s in zip(adapters, scales, strict=True):
            records.append(apply_adapter(target, a, s))
        yield records
    finally:
        revert_all(target, records)


def _tensor_raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def state_fingerprint(target: Any) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes in name order.

    Same definition as ``adapterhub.bases.sources.fingerprint_folder``, so the fingerprint of a state dict
    loaded from a folder equals the folder's fingerprint.
    """
    tensors = _tensors_of(target)
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        st = st_io.st_name(t.dtype)
        if st is None:
            raise BaseModelError(f"{name}: unsupported dtype {t.dtype}")
        h.update(json.dumps([name, st, list(t.shape)]).encode() + b"\n")
        h.update(_tensor_raw(t))
    return h.hexdigest()


def state_root(target: Any, scheme: RootScheme | None = None) -> str:
    """The state root of a module or state dict (:mod:`adapterhub.apply.state`): the Merkle fingerprint a
    deployment records, equal to the root of a folder holding the same tensors (a deployment with an empty
    stack has its base's). ``scheme``: the default (BLAKE3) unless given — compare with a recorded root ``r``
    using ``scheme_of(r)``. Raises: BaseModelError for a tensor of a dtype safetensors cannot hold."""
    from .state import DEFAULT_SCHEME, TensorState, root_of, tensor_chunk_hashes

    scheme = scheme or DEFAULT_SCHEME

    tensors = _tensors_of(target)
    out = {}
    for name in sorted(tensors):
        t = tensors[name]
        st = st_io.st_name(t.dtype)
        if st is None:
            raise BaseModelError(f"{name}: unsupported dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        out[name] = TensorState("", st, tuple(t.shape), 0, nbytes, tensor_chunk_hashes(_tensor_raw(t), scheme))
    return root_of(out, scheme)

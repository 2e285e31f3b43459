"""Merging sparse experts in sparse space.

Every method works on the **union of the experts' flat indices** of one parameter at a time
(``cat`` + ``unique(return_inverse)`` + ``index_add_``), so the cost is O(total nnz) and no whole
tensor is ever densified (DESIGN.md, "Merging in sparse space"). Experts are read lazily, one
parameter of each expert at a time (:class:`LazyAdapterFile`), so peak memory stays near the size
of the result plus one tensor per expert.

Methods (registry ids are the CLI names):

=================  ===============================================================================
``uniform-sparse``  the paper's merge (Arnob et al. 2025): each entry is averaged over the experts
                    whose mask contains it, ``sum_i w_i v_i / sum_{i: idx in mask_i} w_i``
``uniform``         mean over all N experts, ``sum_i v_i / N``
``weighted``        weighted mean, ``sum_i w_i v_i / sum_i w_i`` (needs ``weights``)
``task-arithmetic`` ``lambda * sum_i w_i v_i`` (== ``peft.utils.merge_utils.task_arithmetic``)
``ties``            trim to the top-``density`` entries of each expert by magnitude, elect the sign
                    of the (unweighted) sum, disjoint mean (== peft ``ties``, see below)
``dare-linear``     drop each entry with probability ``1-density``, rescale by ``1/density``, sum
``dare-ties``       DARE drop + rescale, then sign election and disjoint mean
``breadcrumbs``     drop the top ``gamma`` fraction (outliers) and keep the next ``density``
                    fraction of each expert's entries by magnitude, then ``lambda * sum w_i v_i``
=================  ===============================================================================

Where the definitions coincide with PEFT, results on densified tensors equal
``peft.utils.merge_utils`` (tests/test_merging.py). Two documented differences:

* ``density`` for trimming (``ties``, ``breadcrumbs``) is a fraction of each expert's *stored
  entries* (``k = int(density * nnz)``), not of the whole tensor: a 1% expert trimmed at 0.5 keeps
  half its entries. PEFT's ``magnitude_based_pruning`` uses ``k = int(density * numel)``; for a
  fully dense expert the two coincide, and for a sparse one PEFT with ``density' = k / numel``
  keeps the same entries.
* DARE needs random draws. ``rng="sparse"`` (default) draws one uniform number per stored entry
  from a generator seeded by ``(seed, parameter, expert key)``: O(nnz), and independent of the
  order the experts are given in. PEFT draws ``torch.bernoulli`` over the *whole* dense tensor
  from the global generator, expert after expert, so its masks cannot be reproduced from O(nnz)
  draws. ``rng="peft"`` reproduces PEFT's stream exactly (one dense Bernoulli draw per expert and
  parameter from a generator seeded with :func:`param_seed`; use it to compare against PEFT,
  it costs O(numel)).

Merge order never changes the result: experts are put in a canonical order (their content hash)
before any floating-point accumulation.

Methods are data (as mergekit's ``merge_methods/registry.py``): each registry id is an instance
of a :class:`MergeMethod` that declares its options as :class:`~adapterhub.params.ParamDef`
(shared with the mask registry) and implements hooks the driver calls without knowing the class:
``configure`` → ``expert_weights`` → ``prepare`` → ``merge_param``. The task-arithmetic family is
one class, :class:`GeneralizedTaskArithmeticMerge` (``sparsification`` x ``consensus``),
registered as ``task-arithmetic``, ``ties``, ``dare-linear``, ``dare-ties`` and ``breadcrumbs``;
:class:`WeightedMerge` serves ``weighted`` and ``uniform``.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import format as fmt
from .errors import FormatError, MergeError
from .faults import fault_point
from .format import SparseAdapter, SparseParam
from .params import ParamDef, configure

__all__ = [
    "ExpertSource", "GeneralizedTaskArithmeticMerge", "InMemoryExpert", "LazyAdapterFile", "MergeMethod",
    "MergeResult", "METHODS", "Sparsification", "UniformSparseMerge", "WeightedMerge", "get_method", "method_names",
    "merge_adapters", "merge", "param_seed", "register_method",
]


# -- expert sources ---------------------------------------------------------------------------


class ExpertSource(ABC):
    """One expert, readable one parameter at a time.

    ``key`` orders experts canonically (content hash); ``base_fingerprint`` guards against mixing
    bases; ``label`` is what errors and lineage show.
    """

    key: str
    label: str
    base_fingerprint: str | None

    @abstractmethod
    def param_names(self) -> list[str]:
        """Names of the stored sparse parameters."""

    @abstractmethod
    def param_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the base tensor ``name`` (without loading values)."""

    @abstractmethod
    def get_param(self, name: str) -> SparseParam:
        """Load one parameter (raises KeyError if absent)."""

    @abstractmethod
    def extras(self) -> dict[str, torch.Tensor]:
        """Dense extras (task heads)."""

    @abstractmethod
    def card(self) -> dict[str, Any]:
        """The adapter's JSON card."""

    def close(self) -> None:  # pragma: no cover - trivial
        """Release file handles."""


class InMemoryExpert(ExpertSource):
    """An expert already loaded as a :class:`SparseAdapter`."""

    def __init__(self, adapter: SparseAdapter, key: str | None = None, label: str | None = None,
                 base_fingerprint: str | None = None) -> None:
        self.adapter = adapter
        self.key = key if key is not None else fmt.sha256_hex(fmt.save(adapter))
        self.label = label or self.key[:12]
        base = adapter.card.get("base") if isinstance(adapter.card.get("base"), dict) else {}
        self.base_fingerprint = base_fingerprint if base_fingerprint is not None else base.get("fingerprint")

    def param_names(self) -> list[str]:
        return sorted(self.adapter.params)

    def param_shape(self, name: str) -> tuple[int, ...]:
        return self.adapter.params[name].shape

    def get_param(self, name: str) -> SparseParam:
        return self.adapter.params[name]

    def extras(self) -> dict[str, torch.Tensor]:
        return dict(self.adapter.extras)

    def card(self) -> dict[str, Any]:
        return dict(self.adapter.card)


class LazyAdapterFile(ExpertSource):
    """An adapter file read through ``mmap``: the header is parsed once, each parameter is decoded
    on demand, so only one parameter's indices and values are in memory at a time.

    Takes: ``path`` of an ``adapterhub.sparse/1`` file; ``expected_sha256`` (checked by streaming
    the file once, so a corrupted blob is refused before any merge).
    Raises: FormatError for a malformed file or a hash mismatch.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None, label: str | None = None,
                 expected_sha256: str | None = None, base_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        if expected_sha256 is not None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != expected_sha256:
                raise FormatError(f"{self.path.name}: content hash mismatch (blob corrupted)")
        self._f = open(self.path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._entries, meta, self._start = fmt._read_container(self._mm)  # noqa: SLF001 - same package
        self._doc = fmt._parse_doc(meta)  # noqa: SLF001
        self.key = key or expected_sha256 or self.path.name
        self.label = label or self.key[:12]
        base = self._doc.get("card", {}).get("base") or {}
        self.base_fingerprint = base_fingerprint if base_fingerprint is not None else (
            base.get("fingerprint") if isinstance(base, dict) else None)

    def _tensor(self, tname: str) -> torch.Tensor:
        if tname not in self._entries:
            raise FormatError(f"{tname}: tensor missing from file")
        dt, shape, b, e = self._entries[tname]
        return fmt._tensor_from_bytes(self._mm[self._start + b:self._start + e], dt, shape)  # noqa: SLF001

    def param_names(self) -> list[str]:
        return sorted(self._doc["params"])

    def param_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._doc["params"][name]["shape"])

    def get_param(self, name: str) -> SparseParam:
        spec = self._doc["params"][name]
        gaps = self._tensor(f"param::{name}::idx")
        esc_name = f"param::{name}::esc"
        esc = self._tensor(esc_name) if esc_name in self._entries else torch.zeros(0, dtype=torch.int64)
        idx = fmt.decode_indices(gaps, esc, name)
        vals = self._tensor(f"param::{name}::val")
        p = SparseParam(tuple(spec["shape"]), idx, vals, block_size=spec.get("block_size"))
        p.validate(name, allow_nonfinite=bool(self._doc.get("card", {}).get("allow_nonfinite", False)))
        return p

    def extras(self) -> dict[str, torch.Tensor]:
        return {n: self._tensor(f"extra::{n}") for n in self._doc.get("extras", [])}

    def card(self) -> dict[str, Any]:
        return dict(self._doc.get("card", {}))

    def close(self) -> None:
        if isinstance(self._mm, mmap.mmap):
            self._mm.close()
        self._f.close()


# -- method registry -----------------------------------------------------------------------------


@dataclass
class _Entry:
    """One expert's contribution to one parameter: fp32 values at sorted flat indices."""

    idx: torch.Tensor
    vals: torch.Tensor
    weight: float
    key: str


def param_seed(seed: int, param: str, key: str = "") -> int:
    """Deterministic 63-bit seed for (seed, parameter, expert key) — the DARE generator seed."""
    d = hashlib.sha256(f"{int(seed)}\0{param}\0{key}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


# The options a merge method may take, declared once; methods pick theirs (and their defaults).
WEIGHTS = ParamDef("weights", kind=list, help="one weight per expert, in the caller's order")
LAMBDA = ParamDef("lam", default=1.0, label="lambda", flag="--lambda", help="scaling of the merged delta")
DENSITY = ParamDef("density", low=0.0, low_open=True, high=1.0,
                   help="fraction kept per expert (trimming: of its entries; DARE: keep probability)")
SEED = ParamDef("seed", kind=int, default=0, help="seed of the DARE random drop")
GAMMA = ParamDef("gamma", default=0.01, low=0.0, high=1.0, high_open=True,
                 help="fraction of each expert's largest entries dropped as outliers (breadcrumbs)")
RNG = ParamDef("rng", kind=str, default="sparse", choices=("sparse", "peft"),
               help="DARE draws: one per stored entry (sparse) or PEFT's dense Bernoulli stream (peft)")


@dataclass(frozen=True, kw_only=True)
class MergeMethod(ABC):
    """A merge strategy, an instance per registry id (one class may serve several ids).

    The driver (:func:`merge_adapters`) only calls these hooks, in this order:
    :meth:`configure` (the options), :meth:`expert_weights` (the weight each expert's entries
    carry), :meth:`prepare` (checks the weights and computes once what :meth:`merge_param`
    reads), then :meth:`merge_param` per parameter.
    """

    name: str
    description: str
    params: tuple[ParamDef, ...] = ()
    reference: str | None = None

    def configure(self, options: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults, check required and unknown options, validate each (``None`` = not given).

        Raises: MergeError naming the bad option.
        """
        return configure(self.params, options, owner=f"method {self.name!r}", error=MergeError)

    def expert_weights(self, weights: list[float], opts: dict[str, Any]) -> list[float]:
        """The weight each expert's entries carry into :meth:`merge_param` (caller's order).

        Default: the weights as given.
        """
        return list(weights)

    def prepare(self, weights: list[float], opts: dict[str, Any]) -> Any:
        """Check the caller's weights (caller's order; all 1.0 when none were given) and compute
        once what :meth:`merge_param` needs.

        Returns: the context handed to every :meth:`merge_param` call (default: ``opts``).
        Raises: MergeError for weights the method cannot use.
        """
        return opts

    @abstractmethod
    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[_Entry], ctx: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge one parameter.

        Takes: the parameter's name and shape, each contributing expert's entries (canonical
        order, fp32 values, weights from :meth:`expert_weights`), the context from :meth:`prepare`.
        Returns: ``(indices, values)`` on the union of indices (sorted int64, fp32).
        """


# - building blocks -

def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _union(entries: list[_Entry], numel: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sorted union of the entries' indices and, per entry, the positions of its indices in it.

    A boolean mark over the tensor plus a prefix-sum rank (O(numel + nnz), no value densified):
    on CPU this is several times faster than ``torch.unique(return_inverse=True)``, which sorts.
    """
    if not entries:
        return torch.zeros(0, dtype=torch.int64), []
    if len(entries) == 1:
        return entries[0].idx, [torch.arange(entries[0].idx.numel())]
    cat = torch.cat([e.idx for e in entries])
    mark = torch.zeros(numel, dtype=torch.bool)
    mark[cat] = True
    uniq = mark.nonzero().view(-1)
    rank = torch.cumsum(mark, 0, dtype=torch.int32 if numel < 2**31 else torch.int64)
    del mark
    inv = rank[cat].to(torch.int64) - 1
    del rank
    return uniq, list(torch.split(inv, [e.idx.numel() for e in entries]))


def _weighted_sum(entries: list[_Entry], size: int, pos: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros(size, dtype=torch.float32)
    for e, p in zip(entries, pos):
        w = torch.tensor(e.weight, dtype=torch.float32)
        acc.index_add_(0, p, e.vals * w)
    return acc


def _magnitude_trim(e: _Entry, density: float) -> _Entry:
    k = int(density * e.idx.numel())
    if k >= e.idx.numel():
        return e
    top = torch.topk(e.vals.abs(), k, largest=True, sorted=False).indices.sort().values
    return _Entry(e.idx[top], e.vals[top], e.weight, e.key)


def _breadcrumbs_trim(e: _Entry, density: float, gamma: float) -> _Entry:
    n = e.idx.numel()
    drop_top = int(gamma * n)
    keep = min(int(density * n), n - drop_top)
    order = torch.argsort(e.vals.abs(), descending=True, stable=True)
    sel = order[drop_top:drop_top + keep].sort().values
    return _Entry(e.idx[sel], e.vals[sel], e.weight, e.key)


def _dare_drop(e: _Entry, density: float, keep: torch.Tensor) -> _Entry:
    # PEFT: (t * mask) / density, then * weight — same operation order for identical rounding.
    return _Entry(e.idx[keep], e.vals[keep] / density, e.weight, e.key)


def _dare_keep_masks(name: str, shape: tuple[int, ...], entries: list[_Entry], opts: dict[str, Any]) -> list[torch.Tensor]:
    density = float(opts["density"])
    seed = int(opts.get("seed", 0))
    masks = []
    if opts.get("rng", "sparse") == "peft":
        g = torch.Generator().manual_seed(param_seed(seed, name))
        for e in entries:
            # Exactly peft.utils.merge_utils.random_pruning's draw, from our generator.
            m = torch.bernoulli(torch.full(shape, density, dtype=torch.float32), generator=g).reshape(-1)
            masks.append(m[e.idx] != 0)
    else:
        for e in entries:
            g = torch.Generator().manual_seed(param_seed(seed, name, e.key))
            masks.append(torch.rand(e.idx.numel(), generator=g) < density)
    return masks


def _disjoint(entries: list[_Entry], numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election (PEFT 'total': sign of the unweighted sum) and disjoint mean."""
    if not entries:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    uniq, pos = _union(entries, numel)
    total = torch.zeros(uniq.numel(), dtype=torch.float32)
    for e, p in zip(entries, pos):
        total.index_add_(0, p, e.vals)
    majority = torch.where(total >= 0, 1.0, -1.0)
    acc = torch.zeros(uniq.numel(), dtype=torch.float32)
    cnt = torch.zeros(uniq.numel(), dtype=torch.float32)
    for e, p in zip(entries, pos):
        # multiply by the 0/1 agreement instead of boolean indexing (much faster on CPU; adding 0 is exact)
        agree = (torch.sign(e.vals) == majority[p]).to(torch.float32)
        w = torch.tensor(e.weight, dtype=torch.float32)
        acc.index_add_(0, p, (e.vals * w) * agree)
        cnt.index_add_(0, p, agree)
    keep = cnt > 0
    return uniq[keep], acc[keep] / torch.clamp(cnt[keep], min=1.0)


# - sparsification: which of each expert's entries take part (mergekit's SparsificationMethod) -

class Sparsification(str, Enum):
    """How each expert is thinned before the sum (or the sign election)."""

    NONE = "none"
    MAGNITUDE = "magnitude"  # keep the top ``density`` fraction of stored entries by |value| (TIES)
    RANDOM = "random"  # DARE: keep each entry with probability ``density``, rescale by 1/density
    BREADCRUMBS = "breadcrumbs"  # drop the top ``gamma`` outliers, keep the next ``density`` fraction


def _random_drop(name: str, shape: tuple[int, ...], entries: list[_Entry], opts: dict[str, Any]) -> list[_Entry]:
    masks = _dare_keep_masks(name, shape, entries, opts)
    return [_dare_drop(e, float(opts["density"]), m) for e, m in zip(entries, masks)]


# kind -> f(parameter name, shape, entries, options) -> the entries that take part
_SPARSIFY: dict[Sparsification, Callable[[str, tuple[int, ...], list[_Entry], dict[str, Any]], list[_Entry]]] = {
    Sparsification.NONE: lambda name, shape, entries, opts: entries,
    Sparsification.MAGNITUDE: lambda name, shape, entries, opts: [
        _magnitude_trim(e, float(opts["density"])) for e in entries],
    Sparsification.RANDOM: _random_drop,
    Sparsification.BREADCRUMBS: lambda name, shape, entries, opts: [
        _breadcrumbs_trim(e, float(opts["density"]), float(opts["gamma"])) for e in entries],
}


# - the methods -

@dataclass(frozen=True, kw_only=True)
class GeneralizedTaskArithmeticMerge(MergeMethod):
    """Task arithmetic and its thinned variants (TIES, DARE, DARE-TIES, breadcrumbs) as one
    method with two settings, as mergekit's ``GeneralizedTaskArithmeticMerge``.

    Lambda is folded into each expert's weight (``lambda * w_i``, as peft's functions are called);
    each expert is thinned by ``sparsification``; then either the weighted sum
    (``consensus=False``) or TIES sign election and disjoint mean (``consensus=True``).
    """

    sparsification: Sparsification = Sparsification.NONE
    consensus: bool = False

    def expert_weights(self, weights: list[float], opts: dict[str, Any]) -> list[float]:
        lam = float(opts.get("lam", 1.0))
        return [lam * w for w in weights]

    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[_Entry], ctx: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        kept = _SPARSIFY[self.sparsification](name, shape, entries, ctx)
        if self.consensus:
            return _disjoint(kept, _numel(shape))
        uniq, pos = _union(kept, _numel(shape))
        return uniq, _weighted_sum(kept, uniq.numel(), pos)


@dataclass(frozen=True, kw_only=True)
class UniformSparseMerge(MergeMethod):
    """Each entry averaged over the experts whose mask contains it: ``lambda * sum_i w_i v_i /
    sum_{i: idx in mask_i} w_i``. Weights must be positive (a zero or negative one could zero
    or flip a denominator)."""

    def prepare(self, weights: list[float], opts: dict[str, Any]) -> float:
        if any(w <= 0 for w in weights):
            raise MergeError(f"{self.name} weights must be positive")
        return float(opts.get("lam", 1.0))

    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[_Entry], ctx: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        uniq, pos = _union(entries, _numel(shape))
        acc = _weighted_sum(entries, uniq.numel(), pos)
        den = torch.zeros(uniq.numel(), dtype=torch.float32)
        for e, p in zip(entries, pos):
            den.index_add_(0, p, torch.full((p.numel(),), e.weight, dtype=torch.float32))
        out = acc / den
        return uniq, out if ctx == 1.0 else out * ctx


@dataclass(frozen=True)
class _Mean:
    """WeightedMerge's context: the sum of the weights and lambda."""

    total: float
    lam: float


@dataclass(frozen=True, kw_only=True)
class WeightedMerge(MergeMethod):
    """Weighted mean over all experts, ``lambda * sum_i w_i v_i / sum_i w_i`` (the plain mean
    when the method takes no weights: each is 1)."""

    def prepare(self, weights: list[float], opts: dict[str, Any]) -> _Mean:
        total = sum(weights)
        if total == 0:
            raise MergeError("weights sum to zero")
        return _Mean(total, float(opts.get("lam", 1.0)))

    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[_Entry], ctx: _Mean
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        uniq, pos = _union(entries, _numel(shape))
        out = _weighted_sum(entries, uniq.numel(), pos) / float(ctx.total)
        return uniq, out if ctx.lam == 1.0 else out * ctx.lam


METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod) -> None:
    """Add a method to the registry; raises MergeError on a duplicate name."""
    if method.name in METHODS:
        raise MergeError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method


_DARE = (WEIGHTS, LAMBDA, DENSITY.with_default(required=True), SEED, RNG)
for _m in (
    UniformSparseMerge(name="uniform-sparse", params=(WEIGHTS, LAMBDA), reference="https://arxiv.org/abs/2507.07140",
                       description="each entry averaged over the experts whose mask contains it (Arnob et al. 2025)"),
    WeightedMerge(name="uniform", params=(LAMBDA,), description="mean over all N experts"),
    WeightedMerge(name="weighted", params=(WEIGHTS.with_default(required=True), LAMBDA),
                  description="weighted mean over all experts: sum w_i v_i / sum w_i"),
    GeneralizedTaskArithmeticMerge(
        name="task-arithmetic", params=(WEIGHTS, LAMBDA), reference="https://arxiv.org/abs/2212.04089",
        description="lambda * sum_i w_i v_i (peft task_arithmetic)"),
    GeneralizedTaskArithmeticMerge(
        name="ties", params=(WEIGHTS, LAMBDA, DENSITY.with_default(1.0)), reference="https://arxiv.org/abs/2306.01708",
        sparsification=Sparsification.MAGNITUDE, consensus=True,
        description="trim each expert to its top-density entries, elect sign, disjoint mean (peft ties)"),
    GeneralizedTaskArithmeticMerge(
        name="dare-linear", params=_DARE, reference="https://arxiv.org/abs/2311.03099",
        sparsification=Sparsification.RANDOM,
        description="random drop (keep prob. density), rescale 1/density, weighted sum (peft dare_linear)"),
    GeneralizedTaskArithmeticMerge(
        name="dare-ties", params=_DARE, reference="https://arxiv.org/abs/2311.03099",
        sparsification=Sparsification.RANDOM, consensus=True,
        description="random drop + rescale, then sign election and disjoint mean (peft dare_ties)"),
    GeneralizedTaskArithmeticMerge(
        name="breadcrumbs", params=(WEIGHTS, LAMBDA, DENSITY.with_default(0.9), GAMMA),
        reference="https://arxiv.org/abs/2312.06795", sparsification=Sparsification.BREADCRUMBS,
        description="drop the top-gamma outliers, keep the next density fraction per expert, weighted sum"),
):
    register_method(_m)


def method_names() -> list[str]:
    """Registered method ids, in registry order (the CLI's choices)."""
    return list(METHODS)


def get_method(name: str) -> MergeMethod:
    """Look up a method; raises MergeError listing the valid names."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


# -- driver ----------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    """The merged adapter and what went into it (in the caller's order)."""

    adapter: SparseAdapter
    method: str
    options: dict[str, Any]
    weights: list[float]
    labels: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def merge_adapters(experts: Sequence[ExpertSource], method: str, *, weights: Sequence[float] | None = None,
                   lam: float | None = None, density: float | None = None, seed: int | None = None,
                   gamma: float | None = None, rng: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> MergeResult:
    """Merge experts parameter by parameter in sparse space.

    Takes: expert sources (at least 2), a method id and its options (``weights`` one per expert
    in the given order; ``lam`` the task-arithmetic lambda; ``density``/``seed``/``gamma``/``rng``
    for trimming and DARE); ``progress(done, total)`` called after each parameter.
    Returns: :class:`MergeResult` with an element-layout adapter whose values have the promoted
    dtype of the experts' values; extras are carried over (same-name extras that differ are averaged).
    Raises: MergeError (fewer than 2 experts, different bases, shape clash, bad options).
    """
    m = get_method(method)
    if len(experts) < 2:
        raise MergeError("merging needs at least two adapters")
    if weights is not None and len(weights) != len(experts):
        raise MergeError(f"got {len(weights)} weights for {len(experts)} adapters")
    opts = m.configure({"weights": list(weights) if weights is not None else None, "lam": lam, "density": density,
                        "seed": seed, "gamma": gamma, "rng": rng})
    fps = {e.base_fingerprint for e in experts}
    if len(fps) > 1:
        raise MergeError("cannot merge adapters of different bases: " + ", ".join(
            f"{e.label} ({(e.base_fingerprint or 'unknown')[:12]})" for e in experts))
    w_in = [float(w) for w in (weights if weights is not None else [1.0] * len(experts))]
    eff = m.expert_weights(w_in, opts)
    ctx = m.prepare(w_in, opts)
    # Canonical order: by content key, so the input order never changes the floating-point result.
    order = sorted(range(len(experts)), key=lambda i: (experts[i].key, eff[i]))
    keys = [experts[i].key for i in order]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise MergeError(f"the same adapter is given twice ({dup[:12]}); use --weights instead")
    ordered = [(experts[i], eff[i]) for i in order]
    names = sorted({n for e, _ in ordered for n in e.param_names()})
    params: dict[str, SparseParam] = {}
    dtypes: list[torch.dtype] = []
    nnz_in = 0
    for k, name in enumerate(names):
        entries: list[_Entry] = []
        shape: tuple[int, ...] | None = None
        for e, w in ordered:
            if name not in e.param_names():
                continue
            sh = e.param_shape(name)
            if shape is not None and sh != shape:
                raise MergeError(f"{name}: shape {sh} in {e.label} differs from {shape}")
            shape = sh
            p = e.get_param(name)
            idx, vals = p.flat()
            dtypes.append(vals.dtype)
            nnz_in += idx.numel()
            entries.append(_Entry(idx, vals.to(torch.float32), w, e.key))
            del p
        assert shape is not None
        idx, vals = m.merge_param(name, shape, entries, ctx)
        del entries
        params[name] = SparseParam(shape, idx.contiguous(), vals)
        if progress is not None:
            progress(k + 1, len(names))
    out_dtype = _promote(dtypes) if dtypes else torch.float32
    for p in params.values():
        p.values = p.values.to(out_dtype).contiguous()
    extras, averaged = _merge_extras([e for e, _ in ordered])
    public_opts = {k: v for k, v in opts.items() if k != "weights"}  # weights are recorded per expert
    card: dict[str, Any] = {"kind": "merge", "merge": {"method": m.name, "options": public_opts, "weights": w_in,
                                                      "experts": [e.label for e in experts]}}
    cards = [e.card() for e, _ in ordered]
    base = next((c.get("base") for c in cards if isinstance(c.get("base"), dict)), None)
    if base:
        card["base"] = base
    labels: dict[str, Any] = {}
    for c in cards:
        if isinstance(c.get("labels"), dict):
            labels.update(c["labels"])
    if labels:
        card["labels"] = labels
    tasks = sorted({str(c["task"]) for c in cards if c.get("task")})
    if tasks:
        card["tasks"] = tasks
    if averaged:
        card["merge"]["extras_averaged"] = averaged
    adapter = SparseAdapter(params, extras, card)
    return MergeResult(adapter, m.name, public_opts, w_in, [e.label for e in experts],
                       {"params": len(params), "nnz_in": nnz_in, "nnz_out": adapter.nnz})


def _merge_extras(experts: Sequence[ExpertSource]) -> tuple[dict[str, torch.Tensor], list[str]]:
    seen: dict[str, list[torch.Tensor]] = {}
    for e in experts:
        for n, t in e.extras().items():
            seen.setdefault(n, []).append(t)
    out: dict[str, torch.Tensor] = {}
    averaged = []
    for n in sorted(seen):
        ts = seen[n]
        if any(t.shape != ts[0].shape or t.dtype != ts[0].dtype for t in ts):
            raise MergeError(f"extra {n}: experts carry it with different shapes or dtypes")
        if all(torch.equal(t, ts[0]) for t in ts[1:]):
            out[n] = ts[0]
        elif ts[0].is_floating_point():
            out[n] = (torch.stack([t.to(torch.float32) for t in ts]).mean(0)).to(ts[0].dtype)
            averaged.append(n)
        else:
            raise MergeError(f"extra {n}: experts disagree on a non-float tensor")
    return out, averaged


def merge(ws: Any, refs: Sequence[str], method: str, *, weights: Sequence[float] | None = None,
          lam: float | None = None, density: float | None = None, seed: int | None = None,
          gamma: float | None = None, rng: str | None = None, name: str,
          progress: Callable[[int, int], None] | None = None) -> Any:
    """Merge catalog versions into a new ``merge`` version with ``merged_from`` lineage.

    Takes: a Workspace, at least two REFs, the method and its options, the output adapter ``name``.
    Returns: the new VersionInfo.
    Raises: RefError (unknown ref), MergeError (different bases, bad options), StoreError.
    Nothing is written unless the merge succeeds.
    """
    from .api import Parent  # local: api imports the whole stack

    infos = [ws.resolve(r) for r in refs]
    bases = {(i.base, i.base_fingerprint) for i in infos}
    if len({fp for _, fp in bases}) > 1:
        raise MergeError("cannot merge adapters of different bases: " + ", ".join(
            f"{i.ref} (base {i.base})" for i in infos))
    sources: list[ExpertSource] = []
    try:
        for i in infos:
            sources.append(LazyAdapterFile(ws.store.path(i.content_hash), key=i.content_hash, label=i.ref,
                                           expected_sha256=i.content_hash, base_fingerprint=i.base_fingerprint))
        res = merge_adapters(sources, method, weights=weights, lam=lam, density=density, seed=seed, gamma=gamma,
                             rng=rng, progress=progress)
    finally:
        for s in sources:
            s.close()
    base_name = infos[0].base
    params_doc = {"method": res.method, **res.options}
    parents = tuple(Parent(i.ref, "merged_from", weight=w, params=params_doc) for i, w in zip(infos, res.weights))
    tasks = sorted({i.task for i in infos if i.task})
    task = tasks[0] if len(tasks) == 1 else "multi"
    res.adapter.card.setdefault("task", task)
    fault_point("merge.before-register")
    return ws.register(res.adapter, name=name, task=task, base=base_name, kind="merge", parents=parents)


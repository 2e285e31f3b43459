"""Merge methods and their registry: how one parameter of several sparse experts becomes one.

Every method works on the **union of the experts' flat indices** of one parameter at a time
(a sort of the concatenated indices, then ``index_add_``), so the cost is O(nnz log nnz) and no
expert's values are ever densified (docs/merging.md). The driver that streams the experts
parameter by parameter is :mod:`adapterhub.merging.driver`; the experts themselves (lazy files,
in-memory adapters) are :mod:`adapterhub.merging.sources`.

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
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable

from .._lazy import lazy_module
from ..errors import MergeError
from ..params import ParamDef, configure

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch", globals())  # imported on first use: listing the methods (``--help``) needs none

__all__ = [
    "DENSITY", "ExpertEntry", "GAMMA", "GeneralizedTaskArithmeticMerge", "LAMBDA", "METHODS", "MergeMethod", "RNG",
    "SEED", "Sparsification", "UniformSparseMerge", "WEIGHTS", "WeightedMerge", "get_method", "method_names",
    "param_seed", "register_method",
]


# -- what the driver hands a method ------------------------------------------------------------


@dataclass
class ExpertEntry:
    """One expert's contribution to one parameter, as the driver hands it to
    :meth:`MergeMethod.merge_param`: fp32 ``vals`` at sorted flat ``idx``, the expert's effective
    ``weight`` (from :meth:`MergeMethod.expert_weights`) and its canonical ``key`` (content hash)."""

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

    The driver (:func:`adapterhub.merging.driver.merge_adapters`) only calls these hooks, in this order:
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
    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[ExpertEntry], ctx: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge one parameter.

        Takes: the parameter's name and shape, each contributing expert's entries (canonical
        order, fp32 values, weights from :meth:`expert_weights`), the context from :meth:`prepare`.
        Returns: ``(indices, values)`` on the union of indices (sorted int64, fp32).
        """


# - building blocks -

def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _union(entries: list[ExpertEntry], numel: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sorted union of the entries' indices and, per entry, the positions of its indices in it.

    Sorts the concatenated index lists (``torch.unique(sorted=True, return_inverse=True)``): O(nnz log nnz)
    time and O(nnz) memory, whatever the tensor's size (issue 19: the old boolean mark and int32 prefix
    sum over every element of the tensor made a 4-way merge cost what the model costs). ``numel`` is
    kept for the callers' signature; nothing of that size is allocated.
    """
    if not entries:
        return torch.zeros(0, dtype=torch.int64), []
    if len(entries) == 1:
        return entries[0].idx, [torch.arange(entries[0].idx.numel())]
    cat = torch.cat([e.idx for e in entries])
    uniq, inv = torch.unique(cat, sorted=True, return_inverse=True)
    del cat
    return uniq, list(torch.split(inv, [e.idx.numel() for e in entries]))


def _weighted_sum(entries: list[ExpertEntry], size: int, pos: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros(size, dtype=torch.float32)
    for e, p in zip(entries, pos, strict=True):
        w = torch.tensor(e.weight, dtype=torch.float32)
        acc.index_add_(0, p, e.vals * w)
    return acc


def _magnitude_trim(e: ExpertEntry, density: float) -> ExpertEntry:
    k = int(density * e.idx.numel())
    if k >= e.idx.numel():
        return e
    top = torch.topk(e.vals.abs(), k, largest=True, sorted=False).indices.sort().values
    return ExpertEntry(e.idx[top], e.vals[top], e.weight, e.key)


def _breadcrumbs_trim(e: ExpertEntry, density: float, gamma: float) -> ExpertEntry:
    n = e.idx.numel()
    drop_top = int(gamma * n)
    keep = min(int(density * n), n - drop_top)
    order = torch.argsort(e.vals.abs(), descending=True, stable=True)
    sel = order[drop_top:drop_top + keep].sort().values
    return ExpertEntry(e.idx[sel], e.vals[sel], e.weight, e.key)


def _dare_drop(e: ExpertEntry, density: float, keep: torch.Tensor) -> ExpertEntry:
    # PEFT: (t * mask) / density, then * weight — same operation order for identical rounding.
    return ExpertEntry(e.idx[keep], e.vals[keep] / density, e.weight, e.key)


def _dare_keep_masks(name: str, shape: tuple[int, ...], entries: list[ExpertEntry], opts: dict[str, Any]) -> list[torch.Tensor]:
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


def _disjoint(entries: list[ExpertEntry], numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES sign election (PEFT 'total': sign of the unweighted sum) and disjoint mean."""
    if not entries:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    uniq, pos = _union(entries, numel)
    total = torch.zeros(uniq.numel(), dtype=torch.float32)
    for e, p in zip(entries, pos, strict=True):
        total.index_add_(0, p, e.vals)
    majority = torch.where(total >= 0, 1.0, -1.0)
    acc = torch.zeros(uniq.numel(), dtype=torch.float32)
    cnt = torch.zeros(uniq.numel(), dtype=torch.float32)
    for e, p in zip(entries, pos, strict=True):
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


def _random_drop(name: str, shape: tuple[int, ...], entries: list[ExpertEntry], opts: dict[str, Any]) -> list[ExpertEntry]:
    masks = _dare_keep_masks(name, shape, entries, opts)
    return [_dare_drop(e, float(opts["density"]), m) for e, m in zip(entries, masks, strict=True)]


# kind -> f(parameter name, shape, entries, options) -> the entries that take part
_SPARSIFY: dict[Sparsification, Callable[[str, tuple[int, ...], list[ExpertEntry], dict[str, Any]], list[ExpertEntry]]] = {
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

    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[ExpertEntry], ctx: dict[str, Any]
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

    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[ExpertEntry], ctx: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        uniq, pos = _union(entries, _numel(shape))
        acc = _weighted_sum(entries, uniq.numel(), pos)
        den = torch.zeros(uniq.numel(), dtype=torch.float32)
        for e, p in zip(entries, pos, strict=True):
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

    def merge_param(self, name: str, shape: tuple[int, ...], entries: list[ExpertEntry], ctx: _Mean
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

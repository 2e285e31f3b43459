"""Compare two sparse adapters parameter by parameter: mask overlap and value statistics.

Works on sorted flat indices (never densifies a whole tensor): the intersection of two masks is found with
``torch.searchsorted`` on the sorted index lists, so the cost is O(nnz log nnz). :func:`diff_versions` reads
both blobs lazily, one parameter of each side at a time (issue 19), so memory follows the largest tensor's
entries, not the adapters (nor the base).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..format import SparseAdapter, SparseParam
from ..progress import Progress, quiet

if TYPE_CHECKING:  # pragma: no cover
    from ..workspace import Workspace


class ParamSource(Protocol):
    """What the diff reads from one side: parameter names, then one parameter at a time
    (:class:`adapterhub.merging.sources.ExpertSource` fits)."""

    def param_names(self) -> list[str]: ...

    def get_param(self, name: str) -> SparseParam: ...


@dataclass
class ValueStats:
    """Summary of a value vector: count, mean, std, mean |v|, max |v| (0 when empty)."""

    count: int
    mean: float
    std: float
    abs_mean: float
    abs_max: float

    @classmethod
    def of(cls, v: torch.Tensor) -> "ValueStats":
        v = v.to(torch.float64)
        if v.numel() == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        return cls(int(v.numel()), float(v.mean()), float(v.std(unbiased=False)), float(v.abs().mean()),
                   float(v.abs().max()))


@dataclass
class ParamDiff:
    """Overlap of one parameter's masks in adapters A and B, and their values on the shared entries."""

    name: str
    shape: list[int] | None
    nnz_a: int
    nnz_b: int
    intersection: int
    union: int
    jaccard: float
    only_a: int
    only_b: int
    values_a: ValueStats
    values_b: ValueStats
    # On the intersection: cosine similarity, share of entries with the same sign, max |a - b|, mean |a - b|.
    cosine: float | None = None
    sign_agreement: float | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    shape_mismatch: bool = False


@dataclass
class AdapterDiff:
    a: str
    b: str
    params: list[ParamDiff] = field(default_factory=list)

    @property
    def intersection(self) -> int:
        return sum(p.intersection for p in self.params)

    @property
    def union(self) -> int:
        return sum(p.union for p in self.params)

    @property
    def jaccard(self) -> float:
        return self.intersection / self.union if self.union else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b,
                "total": {"nnz_a": sum(p.nnz_a for p in self.params), "nnz_b": sum(p.nnz_b for p in self.params),
                          "intersection": self.intersection, "union": self.union, "jaccard": self.jaccard},
                "params": [asdict(p) for p in self.params]}


def _intersect(ia: torch.Tensor, ib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in ``ia`` and ``ib`` (both sorted, unique) of their common indices."""
    if ia.numel() == 0 or ib.numel() == 0:
        e = torch.zeros(0, dtype=torch.int64)
        return e, e
    pos = torch.searchsorted(ib, ia).clamp_(max=ib.numel() - 1)
    hit = ib[pos] == ia
    return hit.nonzero().reshape(-1), pos[hit]


def diff_params(name: str, a: SparseParam | None, b: SparseParam | None) -> ParamDiff:
    """Overlap and value statistics of one parameter (either side may be absent)."""
    ia, va = a.flat() if a is not None else (torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    ib, vb = b.flat() if b is not None else (torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    shape = list((a or b).shape) if (a or b) is not None else None  # type: ignore[union-attr]
    mismatch = a is not None and b is not None and a.shape != b.shape
    if mismatch:
        pa = pb = torch.zeros(0, dtype=torch.int64)
    else:
        pa, pb = _intersect(ia, ib)
    inter = int(pa.numel())
    union = int(ia.numel() + ib.numel() - inter)
    d = ParamDiff(name=name, shape=shape, nnz_a=int(ia.numel()), nnz_b=int(ib.numel()), intersection=inter,
                  union=union, jaccard=inter / union if union else 1.0, only_a=int(ia.numel()) - inter,
                  only_b=int(ib.numel()) - inter, values_a=ValueStats.of(va), values_b=ValueStats.of(vb),
                  shape_mismatch=mismatch)
    if inter:
        xa = va[pa].to(torch.float64)
        xb = vb[pb].to(torch.float64)
        na, nb = float(xa.norm()), float(xb.norm())
        d.cosine = float((xa * xb).sum()) / (na * nb) if na > 0 and nb > 0 else None
        d.sign_agreement = float((torch.sign(xa) == torch.sign(xb)).to(torch.float64).mean())
        ad = (xa - xb).abs()
        d.max_abs_diff = float(ad.max())
        d.mean_abs_diff = float(ad.mean())
        if d.cosine is not None and not math.isfinite(d.cosine):
            d.cosine = None
    return d


def diff_adapters(a: SparseAdapter, b: SparseAdapter, *, name_a: str = "a", name_b: str = "b") -> AdapterDiff:
    """Per-parameter comparison of two adapters over the union of their parameter names (sorted)."""
    out = AdapterDiff(name_a, name_b)
    for name in sorted(set(a.params) | set(b.params)):
        out.params.append(diff_params(name, a.params.get(name), b.params.get(name)))
    return out


def diff_sources(a: ParamSource, b: ParamSource, *, name_a: str = "a", name_b: str = "b",
                 progress: Progress | None = None) -> AdapterDiff:
    """As :func:`diff_adapters`, reading one parameter of each side at a time (lazy files).

    Takes: two sources (``param_names()``, ``get_param(name)``) and a :data:`~adapterhub.progress.Progress`
    (``"comparing"``, tensors). Returns: the :class:`AdapterDiff`.
    Raises: FormatError for a malformed parameter.
    """
    out = AdapterDiff(name_a, name_b)
    held_a, held_b = set(a.param_names()), set(b.param_names())
    names = sorted(held_a | held_b)
    report = progress or quiet
    for i, name in enumerate(names):
        report("comparing", i, len(names))
        pa = a.get_param(name) if name in held_a else None
        pb = b.get_param(name) if name in held_b else None
        out.params.append(diff_params(name, pa, pb))
        del pa, pb
    report("comparing", len(names), len(names))
    return out


def diff_versions(ws: Workspace, ref_a: str, ref_b: str, *, progress: Progress | None = None) -> AdapterDiff:
    """Compare two catalogued versions, reading their blobs lazily (each hash-checked by streaming first).

    Takes: a Workspace, two REFs and a progress callback (as :func:`diff_sources`). Returns: the
    :class:`AdapterDiff` named by the versions' refs.
    Raises: RefError (unknown ref), FormatError (a corrupt blob).
    """
    from ..merging.sources import LazyAdapterFile

    infos = [ws.resolve(ref_a), ws.resolve(ref_b)]
    srcs: list[LazyAdapterFile] = []
    try:
        for i in infos:
            srcs.append(LazyAdapterFile.of_version(ws, i))
        return diff_sources(srcs[0], srcs[1], name_a=infos[0].ref, name_b=infos[1].ref, progress=progress)
    finally:
        for src in srcs:
            src.close()


__all__ = ["diff_adapters", "diff_params", "diff_sources", "diff_versions", "ParamSource", "AdapterDiff", "ParamDiff", "ValueStats"]

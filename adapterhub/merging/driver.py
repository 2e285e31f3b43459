"""The merge driver: stream experts parameter by parameter through a registered merge method.

:func:`merge_adapters` takes :class:`~adapterhub.merging.sources.ExpertSource` objects and a method
id; it looks the method up in the registry (:func:`adapterhub.merging.methods.get_method`) and only
calls its hooks (``configure`` → ``expert_weights`` → ``prepare`` → ``merge_param``), so it never
names a concrete method class (as mergekit's ``plan.py``). Experts are put in a canonical order
(their content hash) before any floating-point accumulation, so the order they are given in never
changes the result. :func:`merge` is the catalog entry point (REFs in, a new ``merge`` version out).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..catalog.records import Parent
from ..errors import FormatError, MergeError
from ..faults import fault_point
from ..format import PackedAdapter, SparseAdapter, SparseParam, dtype_name, parse_dtype
from .methods import ExpertEntry, get_method
from .sources import ExpertSource, LazyAdapterFile

if TYPE_CHECKING:  # pragma: no cover - the workspace imports the whole stack
    from ..catalog.records import VersionInfo
    from ..workspace import Workspace

__all__ = ["MergeResult", "merge", "merge_adapters", "merge_extras"]


@dataclass
class MergeResult:
    """The merged adapter and what went into it (in the caller's order)."""

    adapter: SparseAdapter | PackedAdapter
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
                   progress: Callable[[int, int], None] | None = None,
                   values_dtype: str | None = None, packed: bool = False) -> MergeResult:
    """Merge experts parameter by parameter in sparse space.

    Takes: expert sources (at least 2), a method id and its options (``weights`` one per expert
    in the given order; ``lam`` the task-arithmetic lambda; ``density``/``seed``/``gamma``/``rng``
    for trimming and DARE); ``progress(done, total)`` called after each parameter; ``values_dtype``
    (``fp32``/``bf16``/``fp16`` or their torch names) for the result's values.
    Returns: :class:`MergeResult` with an element-layout adapter whose values have ``values_dtype``, by
    default the promoted dtype of the experts' values (a different one is recorded in the card's
    ``values``); extras are carried over (same-name extras that differ are averaged). With ``packed`` the
    adapter is a :class:`~adapterhub.format.PackedAdapter`: each parameter is encoded (2 B per index + its
    values) as soon as it is merged, so memory holds the result's file-sized bytes plus one tensor's union of
    entries, never int64 indices for the whole model (issue 19); ``format.save`` gives the same bytes.
    Raises: MergeError (fewer than 2 experts, different bases, shape clash, bad options).
    """
    want = _values_dtype(values_dtype)
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
        raise MergeError(f"the same adapter is given twice ({dup[:12]}); give weights instead", keywords=("weights",))
    ordered = [(experts[i], eff[i], set(experts[i].param_names())) for i in order]
    names = sorted({n for _, _, held in ordered for n in held})
    # the output dtype is known before any value is merged (from the headers), so each merged tensor is cast
    # and, when packed, encoded at once
    promoted = _promote([e.value_dtype(n) for n in names for e, _, held in ordered if n in held]) if names \
        else torch.float32
    out_dtype = want if want is not None else promoted
    params: dict[str, SparseParam] = {}
    pack = PackedAdapter() if packed else None
    nnz_in = 0
    for k, name in enumerate(names):
        entries: list[ExpertEntry] = []
        shape: tuple[int, ...] | None = None
        for e, w, held in ordered:
            if name not in held:
                continue
            sh = e.param_shape(name)
            if shape is not None and sh != shape:
                raise MergeError(f"{name}: shape {sh} in {e.label} differs from {shape}")
            shape = sh
            p = e.get_param(name)
            idx, vals = p.flat()
            nnz_in += idx.numel()
            entries.append(ExpertEntry(idx, vals.to(torch.float32), w, e.key))
            del p
        assert shape is not None  # every name comes from some expert's list
        idx, vals = m.merge_param(name, shape, entries, ctx)
        del entries
        merged = SparseParam(shape, idx.contiguous(), vals.to(out_dtype).contiguous())
        if pack is not None:
            pack.add(name, merged)  # encoded now: 2 B per index + the values, as in the file
        else:
            params[name] = merged
        del merged, idx, vals
        if progress is not None:
            progress(k + 1, len(names))
    extras, averaged = merge_extras([e for e, _, _ in ordered])
    public_opts = {k: v for k, v in opts.items() if k != "weights"}  # weights are recorded per expert
    card: dict[str, Any] = {"kind": "merge", "merge": {"method": m.name, "options": public_opts, "weights": w_in,
                                                      "experts": [e.label for e in experts]}}
    cards = [e.card() for e, _, _ in ordered]
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
    if out_dtype != promoted:
        card["values"] = {"dtype": dtype_name(out_dtype), "cast_from": [dtype_name(promoted)]}
    adapter: SparseAdapter | PackedAdapter
    if pack is not None:
        pack.extras, pack.card = extras, card
        adapter = pack
    else:
        adapter = SparseAdapter(params, extras, card)
    return MergeResult(adapter, m.name, public_opts, w_in, [e.label for e in experts],
                       {"params": len(adapter.params), "nnz_in": nnz_in, "nnz_out": adapter.nnz})


def _values_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return parse_dtype(name)
    except FormatError as e:
        raise MergeError(str(e), keywords=("values_dtype",)) from None


def merge_extras(experts: Sequence[ExpertSource]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Carry the experts' dense extras (task heads) into the merge.

    Takes: the experts in canonical order. Returns: ``(extras, averaged names)``: an extra every
    expert holds identically is kept as is; floating extras that differ are averaged (fp32 mean,
    cast back). Raises: MergeError when same-name extras differ in shape or dtype, or a non-float
    extra differs.
    """
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


def merge(ws: Workspace, refs: Sequence[str], method: str, *, weights: Sequence[float] | None = None,
          lam: float | None = None, density: float | None = None, seed: int | None = None,
          gamma: float | None = None, rng: str | None = None, name: str,
          progress: Callable[[int, int], None] | None = None, values_dtype: str | None = None) -> VersionInfo:
    """Merge catalog versions into a new ``merge`` version with ``merged_from`` lineage.

    Takes: a Workspace, at least two REFs, the method and its options, the output adapter ``name``,
    ``values_dtype`` as :func:`merge_adapters`.
    Returns: the new VersionInfo.
    Raises: RefError (unknown ref), MergeError (different bases, bad options), StoreError.
    Nothing is written unless the merge succeeds.
    """
    infos = [ws.resolve(r) for r in refs]
    bases = {(i.base, i.base_fingerprint) for i in infos}
    if len({fp for _, fp in bases}) > 1:
        raise MergeError("cannot merge adapters of different bases: " + ", ".join(
            f"{i.ref} (base {i.base})" for i in infos))
    sources: list[ExpertSource] = []
    try:
        for i in infos:
            sources.append(LazyAdapterFile.of_version(ws, i))
        res = merge_adapters(sources, method, weights=weights, lam=lam, density=density, seed=seed, gamma=gamma,
                             rng=rng, progress=progress, values_dtype=values_dtype, packed=True)
    finally:
        for s in sources:
            s.close()
    base_name = infos[0].base
    params_doc = {"method": res.method, **res.options}
    parents = tuple(Parent(i.ref, "merged_from", weight=w, params=params_doc) for i, w in zip(infos, res.weights, strict=True))
    tasks = sorted({i.task for i in infos if i.task})
    task = tasks[0] if len(tasks) == 1 else "multi"
    res.adapter.card.setdefault("task", task)
    fault_point("merge.before-register")
    return ws.register(res.adapter, name=name, task=task, base=base_name, kind="merge", parents=parents)

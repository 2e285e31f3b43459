"""The JSON documents of the read commands that are more than one record's ``to_json()``.

``show --json``, ``metrics --json`` and ``lineage --format json`` print these, and the web view's
``/api/...`` routes serve the very same documents (one builder each, here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..catalog.metrics import current_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..workspace import Workspace


def show_document(ws: Workspace, ref: str) -> dict[str, Any]:
    """``show REF --json``: the version's record with its direct parents (relation, weight, params).

    Raises RefError for an unknown or malformed REF."""
    info = ws.resolve(ref)
    doc = info.to_json()
    doc["parents"] = [{k: e[k] for k in ("parent", "relation", "weight", "params")} for e in ws.parents(info.ref)]
    return doc


def metrics_document(ws: Workspace, ref: str) -> dict[str, Any]:
    """``metrics REF --json``: the current figures and every metric row, oldest first, ``shown`` marking the
    rows the current figures come from. Raises RefError for an unknown or malformed REF."""
    info = ws.resolve(ref)
    rows = ws.metric_history(info.ref)
    shown = {id(r) for r in current_rows(rows)}
    return {"ref": info.ref, "current": info.metrics or {},
            "history": [{**r.to_json(), "shown": id(r) in shown} for r in rows]}


__all__ = ["metrics_document", "show_document"]

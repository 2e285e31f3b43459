"""Metric history: every figure of a version is an append-only row (``metric_rows``, revision 0003).

A version's ``metrics`` JSON, stored at registration, is never rewritten. What ``show``/``list``/cards
present as the version's figures is that JSON overlaid by the *current* rows: per metric name, the
latest row that scored a whole split (``full``), or the latest subset row when no full one exists,
among rows whose source is the version itself (``train`` or ``eval``). Rows from ``deployment:NAME``
evaluations stay history only.

Keys of a metrics dict map to rows as ``[<task>/]<split>_<stat>`` → name (the key), split, and the
value of the sibling ``<split>_n`` key as ``n``; a ``deployment:NAME/`` prefix moves a key to source
``deployment:NAME``. Non-numeric values (and booleans) are not rows.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

from .records import iso_utc

SPLITS = ("train", "validation", "test")
SELF_SOURCES = ("train", "eval")
DEPLOYMENT_PREFIX = "deployment:"


@dataclass(frozen=True)
class MetricRecord:
    """One row of a version's metric history."""

    name: str
    value: float
    split: str | None
    n: int | None
    full: bool
    dataset_hash: str | None
    scorer: str | None
    source: str
    created_at: dt.datetime | None
    ref: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "name": self.name, "value": self.value, "split": self.split, "n": self.n,
                "full": self.full, "dataset_hash": self.dataset_hash, "scorer": self.scorer, "source": self.source,
                "created_at": iso_utc(self.created_at)}


def split_of(name: str) -> str | None:
    """The split a metric name is about (``sst2/test_accuracy`` → ``test``), or None (``steps``)."""
    stem = name.rsplit("/", 1)[-1]
    for sp in SPLITS:
        if stem.startswith(sp + "_"):
            return sp
    return None


def n_key(name: str) -> str | None:
    """The key holding the row count of a ``<split>_<stat>`` metric (``test_accuracy`` → ``test_n``)."""
    sp = split_of(name)
    if sp is None or name.endswith("_n"):
        return None
    head = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
    return f"{head}{sp}_n"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def rows_from_metrics(metrics: dict[str, Any], *, source: str, full: bool = True, dataset_hash: str | None = None,
                      scorer: str | None = None) -> list[dict[str, Any]]:
    """Row dicts (``metric_rows`` columns except id, version_id, created_at) for a metrics dict.

    ``<split>_n`` keys become the ``n`` of their sibling metrics, not rows of their own."""
    out: list[dict[str, Any]] = []
    for key, raw in sorted((k, v) for k, v in metrics.items() if isinstance(k, str)):
        value = _number(raw)
        if value is None:
            continue
        src, name = source, key
        if key.startswith(DEPLOYMENT_PREFIX) and "/" in key:
            src, name = key.split("/", 1)
        nk = n_key(name)
        if name.endswith("_n") and split_of(name) is not None:
            continue
        n_num = _number(metrics.get((src + "/" + nk) if src != source else nk)) if nk else None
        n = int(n_num) if n_num is not None else None
        out.append({"name": name[:100], "value": value, "split": split_of(name), "n": n, "full": full,
                    "dataset_hash": dataset_hash, "scorer": scorer, "source": src[:120]})
    return out


def present(stored: Any, current: list[MetricRecord]) -> dict[str, Any]:
    """The figures shown as a version's own: the stored JSON (without ``deployment:`` keys) overlaid by
    the current row of each metric (see :func:`current_rows`), with its ``<split>_n``."""
    out = {k: v for k, v in (stored or {}).items()
           if isinstance(k, str) and not k.startswith(DEPLOYMENT_PREFIX)} if isinstance(stored, dict) else {}
    for r in current:
        out[r.name] = r.value
        nk = n_key(r.name)
        if nk and r.n is not None:
            out[nk] = r.n
    return out


def current_rows(rows: list[MetricRecord]) -> list[MetricRecord]:
    """Per metric name, among rows from the version itself: the latest full-split row, else the latest
    subset row. ``rows`` must be oldest first."""
    best: dict[str, MetricRecord] = {}
    for r in rows:
        if r.source not in SELF_SOURCES:
            continue
        old = best.get(r.name)
        if old is None or r.full or not old.full:
            best[r.name] = r
    return [best[k] for k in sorted(best)]

"""Plain records the catalog hands out and takes in: detached from the database, no ORM import.

:class:`VersionInfo` and :class:`BaseInfo` are what :class:`adapterhub.workspace.Workspace` returns
for an adapter version and a registered base; :class:`Parent` and :class:`NewVersion` are what
callers give :meth:`~adapterhub.workspace.Workspace.register` and ``register_many``. Domain modules
(merging, training, FUSED, the Hub client) and the CLI import these without loading SQLAlchemy.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BaseInfo", "NewVersion", "Parent", "VersionInfo", "iso_utc"]


def iso_utc(t: dt.datetime | None) -> str | None:
    """ISO 8601 with a UTC offset (SQLite hands back naive datetimes; they were stored as UTC)."""
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.isoformat()


@dataclass(frozen=True)
class Parent:
    """A lineage edge to create when registering: ``ref`` is a REF string (or None for imported_from)."""

    ref: str | None
    relation: str = "finetuned_from"
    weight: float | None = None
    params: dict[str, Any] | None = None


@dataclass(frozen=True)
class NewVersion:
    """One version for :meth:`Workspace.register_many` (the arguments of :meth:`Workspace.register`).

    ``expect_hash``: when set, the canonical bytes must hash to it or nothing at all is registered.
    """

    adapter: Any  # a format.SparseAdapter or the bytes of an adapter file
    name: str
    task: str | None
    base: str
    kind: str = "expert"
    parents: tuple[Parent, ...] = ()
    metrics: dict[str, Any] | None = None
    training_config: dict[str, Any] | None = None
    hub: dict[str, str | None] | None = None
    expect_hash: str | None = None
    allow_nonfinite: bool = False  # the user's explicit flag (never the file's card): let NaN/inf values in


@dataclass
class BaseInfo:
    """A registered base model: where its weights are and what identifies them (``fingerprint``)."""

    name: str
    source: str
    revision: str | None
    architecture: str | None
    fingerprint: str
    num_params: int | None
    path: Path
    id: int
    created_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (``path`` as a string, ``created_at`` as ISO 8601 UTC)."""
        return {"name": self.name, "source": self.source, "revision": self.revision, "architecture": self.architecture,
                "fingerprint": self.fingerprint, "num_params": self.num_params, "path": str(self.path),
                "created_at": iso_utc(self.created_at)}


@dataclass
class VersionInfo:
    """Everything the catalog knows about one adapter version (a plain record, detached from the DB)."""

    id: int
    name: str
    number: int
    kind: str
    content_hash: str
    size_bytes: int
    task: str | None
    base: str
    base_fingerprint: str
    mask_method: str | None
    density: float | None
    granularity: str | None
    block_size: int | None
    target_modules: Any
    nnz: int
    nnz_per_param: Any
    dtype: str | None
    mask_hash: str | None
    training_config: Any
    metrics: Any
    card: Any
    created_at: dt.datetime | None
    hub_repo: str | None = None
    hub_commit: str | None = None
    hub_tag: str | None = None
    hub_endpoint: str | None = None
    tags: list[str] = field(default_factory=list)
    created: bool = True
    source_format: str | None = None  # what this register call read: "adapterhub", "peft-shira" or "peft-lora"
    deprecated_at: dt.datetime | None = None  # retired with Workspace.deprecate (revision 0003)

    @property
    def ref(self) -> str:
        """``name@number``: the REF that names exactly this version."""
        return f"{self.name}@{self.number}"

    def to_json(self) -> dict[str, Any]:
        """The record as the CLI's ``--json`` shows it."""
        return {
            "ref": self.ref, "name": self.name, "version": self.number, "kind": self.kind,
            "content_hash": self.content_hash, "size_bytes": self.size_bytes, "task": self.task, "base": self.base,
            "base_fingerprint": self.base_fingerprint,
            "mask": {"method": self.mask_method, "density": self.density, "granularity": self.granularity,
                     "block_size": self.block_size, "target_modules": self.target_modules, "nnz": self.nnz,
                     "nnz_per_param": self.nnz_per_param, "dtype": self.dtype, "mask_hash": self.mask_hash},
            "training_config": self.training_config, "metrics": self.metrics or {}, "card": self.card or {},
            "created_at": iso_utc(self.created_at), "tags": self.tags,
            "deprecated": self.deprecated_at is not None, "deprecated_at": iso_utc(self.deprecated_at),
            "hub": {"repo": self.hub_repo, "commit": self.hub_commit, "tag": self.hub_tag, "endpoint": self.hub_endpoint},
        }

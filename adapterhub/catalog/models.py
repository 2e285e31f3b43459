"""SQLAlchemy 2.0 ORM models of the catalog. The schema itself comes only from Alembic revisions
in ``migrations/`` (a test checks that these models and the migrations agree)."""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator, TypeEngine

from .records import iso_utc  # noqa: F401 - re-exported: one definition, in the records module

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

class _PortableJSON(TypeDecorator[Any]):
    """One portable JSON column type: JSONB on PostgreSQL, JSON (text) elsewhere. The PostgreSQL dialect is imported
    only by a PostgreSQL catalog (``JSON().with_variant(JSONB(), ...)`` imported it, ~26 ms, for every SQLite
    command); ``tests/test_migrations.py`` checks the columns still match the migrations on both."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


JSONType = _PortableJSON()

KINDS = ("expert", "merge", "unlearning")
RELATIONS = ("finetuned_from", "merged_from", "unlearns", "imported_from")
ACTIONS = ("create", "apply", "revert", "rollback", "recover")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class BaseModel(Base):
    """A base model adapters are trained on, identified by a fingerprint of its weights."""

    __tablename__ = "base_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    source: Mapped[str] = mapped_column(Text)
    revision: Mapped[Optional[str]] = mapped_column(String(200))
    architecture: Mapped[Optional[str]] = mapped_column(String(200))
    fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    num_params: Mapped[Optional[int]] = mapped_column(BigInteger)
    local_path: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Revision 0004: the Merkle state root of the weights (adapterhub.apply.state), beside the identity
    # fingerprint above; NULL until the first `deploy create` of the base measures it.
    state_root: Mapped[Optional[str]] = mapped_column(String(64))


class Adapter(Base):
    """A named adapter; its immutable versions are AdapterVersion rows."""

    __tablename__ = "adapters"
    __table_args__ = (CheckConstraint("kind IN ('expert','merge','unlearning')", name="kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    description: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    base: Mapped[BaseModel] = relationship(lazy="joined")
    versions: Mapped[list["AdapterVersion"]] = relationship(back_populates="adapter", lazy="raise",
                                                            order_by="AdapterVersion.number")


class AdapterVersion(Base):
    """One immutable version of an adapter: a blob in the store plus its metadata."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),
        Index("ix_adapter_versions_task_created", "task", "created_at"),
        # revision 0005: newest-first pages and counts of the non-deprecated versions from indexes (issue 18)
        Index("ix_adapter_versions_created_id", "created_at", "id"),
        Index("ix_adapter_versions_deprecated_created", "deprecated_at", "created_at", "id"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[Optional[str]] = mapped_column(String(100))
    mask_method: Mapped[Optional[str]] = mapped_column(String(50))
    density: Mapped[Optional[float]] = mapped_column(Float)
    granularity: Mapped[Optional[str]] = mapped_column(String(20))
    block_size: Mapped[Optional[int]] = mapped_column(Integer)
    target_modules: Mapped[Optional[Any]] = mapped_column(JSONType)
    nnz: Mapped[int] = mapped_column(BigInteger)
    nnz_per_param: Mapped[Optional[Any]] = mapped_column(JSONType)
    dtype: Mapped[Optional[str]] = mapped_column(String(20))
    mask_hash: Mapped[Optional[str]] = mapped_column(String(64))
    training_config: Mapped[Optional[Any]] = mapped_column(JSONType)
    metrics: Mapped[Optional[Any]] = mapped_column(JSONType)
    card: Mapped[Optional[Any]] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    hub_repo: Mapped[Optional[str]] = mapped_column(String(300))
    hub_commit: Mapped[Optional[str]] = mapped_column(String(64))
    hub_tag: Mapped[Optional[str]] = mapped_column(String(100))
    hub_endpoint: Mapped[Optional[str]] = mapped_column(String(300))
    # Revision 0003: a deprecated version stays resolvable by ref and hash but is hidden from `list`.
    deprecated_at: Mapped[Optional[dt.datetime]] = mapped_column(DateTime(timezone=True))

    adapter: Mapped[Adapter] = relationship(back_populates="versions", lazy="joined")


class MetricRow(Base):
    """One measured figure of a version (revision 0003): rows are only ever added, never rewritten.

    ``source`` says where it comes from: ``train`` (recorded at registration), ``eval`` (an evaluation
    of the version itself) or ``deployment:NAME`` (an evaluation of a deployment stack that contains it;
    never shown as the version's own figure). ``split`` is the data split, ``n`` the number of rows
    scored and ``full`` whether they were the whole split (a ``--max-examples`` subset is not)."""

    __tablename__ = "metric_rows"
    __table_args__ = (Index("ix_metric_rows_version_name", "version_id", "name"),
                      # revision 0005: the current rows of one metric (a sort column) from the index alone
                      Index("ix_metric_rows_name_version", "name", "version_id", "full", "source", "value"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    split: Mapped[Optional[str]] = mapped_column(String(50))
    n: Mapped[Optional[int]] = mapped_column(Integer)
    full: Mapped[bool] = mapped_column(Boolean, default=True)
    dataset_hash: Mapped[Optional[str]] = mapped_column(String(64))
    scorer: Mapped[Optional[str]] = mapped_column(String(100))
    source: Mapped[str] = mapped_column(String(120))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class CurrentMetric(Base):
    """A version's current figure of one metric (revision 0007): derived from ``metric_rows`` — among the
    version's own sources, the latest full-split row, else the latest row — and kept in the transaction that
    adds a row (:func:`adapterhub.catalog.metrics.upsert_current`), so a catalog sorted by a metric reads the
    ``(name, value)`` index instead of deriving every version's figure first."""

    __tablename__ = "current_metrics"
    __table_args__ = (Index("ix_current_metrics_name_value", "name", "value", "version_id"),)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    full: Mapped[bool] = mapped_column(Boolean)
    row_id: Mapped[int] = mapped_column(Integer)


class LineageEdge(Base):
    """child -> parent with a relation; parent is NULL for imported_from (provenance in params)."""

    __tablename__ = "lineage_edges"
    __table_args__ = (
        CheckConstraint("relation IN ('finetuned_from','merged_from','unlearns','imported_from')", name="relation"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    relation: Mapped[str] = mapped_column(String(20))
    weight: Mapped[Optional[float]] = mapped_column(Float)
    params: Mapped[Optional[Any]] = mapped_column(JSONType)


class Tag(Base):
    """A movable name (``prod``, ``candidate``) pointing at one version of an adapter."""

    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Deployment(Base):
    """A materialised model folder = base + ordered stack of applied adapter versions."""

    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    state_fingerprint: Mapped[Optional[str]] = mapped_column(String(64))
    stack: Mapped[Optional[Any]] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Ownership (revision 0002; NULL on rows made before it, until a home adopts them):
    uid: Mapped[Optional[str]] = mapped_column(String(32), unique=True)  # also in the folder's marker
    home_id: Mapped[Optional[str]] = mapped_column(String(32))  # the home that created it; only it writes
    rel_path: Mapped[Optional[str]] = mapped_column(Text)  # folder relative to that home, if inside it
    # Revision 0004: the current state root (NULL on rows made before it until their next operation measures it);
    # state_fingerprint is then the identity-style sha256 of the state where known (legacy rows: always).
    state_root: Mapped[Optional[str]] = mapped_column(String(64))

    base: Mapped[BaseModel] = relationship(lazy="joined")


class DeploymentEvent(Base):
    """One create/apply/revert/rollback/recover on a deployment, with the resulting state."""

    __tablename__ = "deployment_events"
    __table_args__ = (
        UniqueConstraint("deployment_id", "seq"),
        CheckConstraint("action IN ('create','apply','revert','rollback','recover')", name="action"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(20))
    version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    scale: Mapped[Optional[float]] = mapped_column(Float)
    stack: Mapped[Optional[Any]] = mapped_column(JSONType)
    # The identity-style sha256 of the resulting weights (fingerprint_folder's definition): every event before
    # revision 0004 has one; from 0004 only where it is known without reading the model (e.g. the base's).
    state_fingerprint: Mapped[Optional[str]] = mapped_column(String(64))
    details: Mapped[Optional[Any]] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Revision 0004: the resulting state root, and whether it was measured (every weight byte hashed) or derived
    # from the previous root and the chunks the operation touched. Events before 0004 were measured (full sha256).
    state_root: Mapped[Optional[str]] = mapped_column(String(64))
    measured: Mapped[bool] = mapped_column(Boolean, default=False)

"""Metric history and deprecation: ``metric_rows`` (append-only figures) and ``adapter_versions.deprecated_at``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

Evaluations no longer rewrite a version's ``metrics`` JSON: every figure is a row (name, value,
split, n, whether the whole split was scored, dataset hash, scorer, source, time). ``show``/``list``
present the latest full-split row per metric whose source is the version itself (``train``/``eval``);
``deployment:NAME`` rows are history only. The upgrade copies each version's existing numeric metrics
into rows with source ``train`` so that old catalogs keep showing them. ``deprecated_at`` marks a
retired version (still resolvable, hidden from ``list``).
"""
from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions") as b:
        b.add_column(sa.Column("deprecated_at", sa.DateTime(timezone=True), nullable=True))
    metric_rows = op.create_table(
        "metric_rows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("split", sa.String(50), nullable=True),
        sa.Column("n", sa.Integer(), nullable=True),
        sa.Column("full", sa.Boolean(), nullable=False),
        sa.Column("dataset_hash", sa.String(64), nullable=True),
        sa.Column("scorer", sa.String(100), nullable=True),
        sa.Column("source", sa.String(120), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"],
                                name=op.f("fk_metric_rows_version_id_adapter_versions"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_rows")),
    )
    op.create_index("ix_metric_rows_version_name", "metric_rows", ["version_id", "name"])
    _backfill(metric_rows)


def _backfill(metric_rows: sa.Table) -> None:
    """Existing versions' numeric metrics become ``train`` rows (the JSON itself stays as it was)."""
    from adapterhub.catalog.metrics import rows_from_metrics  # one definition of the key → row mapping

    conn = op.get_bind()
    versions = sa.table("adapter_versions", sa.column("id", sa.Integer()), sa.column("metrics", sa.JSON()),
                        sa.column("created_at", sa.DateTime(timezone=True)))
    out: list[dict[str, Any]] = []
    for vid, metrics, created in conn.execute(sa.select(versions.c.id, versions.c.metrics, versions.c.created_at)):
        if isinstance(metrics, str):
            metrics = json.loads(metrics)
        for r in rows_from_metrics(metrics if isinstance(metrics, dict) else {}, source="train"):
            out.append({**r, "version_id": vid, "created_at": created})
    if out:
        op.bulk_insert(metric_rows, out)


def downgrade() -> None:
    op.drop_index("ix_metric_rows_version_name", table_name="metric_rows")
    op.drop_table("metric_rows")
    with op.batch_alter_table("adapter_versions") as b:
        b.drop_column("deprecated_at")

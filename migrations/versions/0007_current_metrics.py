"""Each version's current figure per metric, kept in its own table (the web view's sort by a metric).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

``metric_rows`` is append-only; a version's *current* figure of a metric is derived from it (among the version's
own sources, ``train`` and ``eval``: the latest full-split row, else the latest row). Sorting the catalog by a
metric had to derive it for every version first (one grouped pass over all that metric's rows: 0.3 s at 100,000
versions). ``current_metrics`` holds that derived row per (version, metric), maintained in the same transaction
that adds a row, so a sorted page reads the ``(name, value)`` index and stops after a page.

Existing rows: filled from ``metric_rows`` with the same rule. The downgrade drops the table (nothing is lost:
it is derived).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "current_metrics",
        sa.Column("version_id", sa.Integer(), sa.ForeignKey("adapter_versions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("full", sa.Boolean(), nullable=False),
        sa.Column("row_id", sa.Integer(), nullable=False),
    )
    op.create_index("ix_current_metrics_name_value", "current_metrics", ["name", "value", "version_id"])
    # the same pick as the catalog's windowed query: per (version, name) among own sources, the latest full row,
    # else the latest row
    op.execute(sa.text("""
        INSERT INTO current_metrics (version_id, name, value, "full", row_id)
        SELECT m.version_id, m.name, m.value, m."full", m.id FROM metric_rows m
        WHERE m.id IN (
            SELECT COALESCE(MAX(CASE WHEN r."full" THEN r.id END), MAX(r.id)) FROM metric_rows r
            WHERE r.source IN ('train', 'eval') GROUP BY r.version_id, r.name)
    """))


def downgrade() -> None:
    op.drop_index("ix_current_metrics_name_value", table_name="current_metrics")
    op.drop_table("current_metrics")

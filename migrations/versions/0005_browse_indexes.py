"""Indexes for browsing a large catalog page by page (issue 18, the web view).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

``list`` and the web view's catalog page show versions newest first, a page at a time, with a count of the
filtered catalog and an optional metric column to sort by. Without these indexes each page sorted every
version row and each count read the whole table:

* ``ix_adapter_versions_created_id`` (created_at, id): the newest-first order, read backwards from the index;
* ``ix_adapter_versions_deprecated_created`` (deprecated_at, created_at, id): the same order and the count of
  the versions that are not deprecated (what ``list`` and the catalog page show by default) from the index;
* ``ix_metric_rows_name_version`` (name, version_id, full, source, value): each version's current row of one
  metric (the sort column) picked from the index alone.

Indexes only: no data changes, and the downgrade drops them.
"""
from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_adapter_versions_created_id", "adapter_versions", ["created_at", "id"])
    op.create_index("ix_adapter_versions_deprecated_created", "adapter_versions", ["deprecated_at", "created_at", "id"])
    op.create_index("ix_metric_rows_name_version", "metric_rows", ["name", "version_id", "full", "source", "value"])


def downgrade() -> None:
    op.drop_index("ix_metric_rows_name_version", table_name="metric_rows")
    op.drop_index("ix_adapter_versions_deprecated_created", table_name="adapter_versions")
    op.drop_index("ix_adapter_versions_created_id", table_name="adapter_versions")

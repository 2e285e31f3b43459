"""``current_metrics`` (revision 0007): each version's current figure per metric, kept as rows are added.

The rule is :func:`adapterhub.catalog.metrics.current_rows`': among the version's own sources (``train``,
``eval``), the latest full-split row, else the latest row. A new row replaces the kept one when it is full and
the kept one is not, or when both are alike and it is newer (a larger id) — so the outcome does not depend on
the order in which concurrent transactions commit. One ``INSERT … ON CONFLICT DO UPDATE … WHERE`` per row
(SQLite and PostgreSQL both have it).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, case, delete, func, insert, select
from sqlalchemy.orm import Session

from . import metrics as mh
from .models import CurrentMetric, MetricRow


def upsert_current(s: Session, rows: Iterable[MetricRow]) -> None:
    """Fold freshly flushed metric rows (ids assigned) into ``current_metrics``."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        insert: Any = pg_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        insert = sqlite_insert
    t = CurrentMetric.__table__
    for r in rows:
        if r.source not in mh.SELF_SOURCES:
            continue
        stmt = insert(t).values(version_id=r.version_id, name=r.name, value=r.value, full=bool(r.full), row_id=r.id)
        new = stmt.excluded
        s.execute(stmt.on_conflict_do_update(
            index_elements=[t.c.version_id, t.c.name],
            set_={"value": new.value, "full": new.full, "row_id": new.row_id},
            where=(new.full & ~t.c.full) | ((new.full == t.c.full) & (new.row_id > t.c.row_id))))


def rebuild(conn: Connection) -> None:
    """Derive the whole ``current_metrics`` table again from ``metric_rows`` (for catalogs filled by bulk inserts
    that bypass :func:`upsert_current`, e.g. the benchmarks' synthetic catalogs): the same rows the upserts keep."""
    m = MetricRow.__table__.c
    pick = (select(func.coalesce(func.max(case((m.full, m.id))), func.max(m.id)))
            .where(m.source.in_(mh.SELF_SOURCES)).group_by(m.version_id, m.name))
    conn.execute(delete(CurrentMetric))
    conn.execute(insert(CurrentMetric).from_select(["version_id", "name", "value", "full", "row_id"],
                                       select(m.version_id, m.name, m.value, m.full, m.id).where(m.id.in_(pick))))

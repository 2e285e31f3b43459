"""State roots may be BLAKE3 roots (issue 19): no schema change, a marker for readers.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

From this revision a state root measured for the first time (a base's at its first ``deploy create``, and so
its deployments') uses the ``blake3`` scheme of :mod:`adapterhub.apply.state` and is written
``blake3:<56 hex digits>`` (63 characters: the ``String(64)`` columns hold it). Roots recorded before keep the
``sha256`` scheme they name (64 hex digits): nothing is re-measured. The schema is unchanged; the revision
exists so that an adapterhub that knows only sha256 roots (head 0007) refuses this catalog as newer than
itself instead of reading a BLAKE3 root as a sha256 one and reporting the weights as changed.

Downgrade: bases whose root is a BLAKE3 root lose it (measured again, with sha256, at their next
``deploy create``); refused, with nothing changed, while a deployment or an event records a BLAKE3 root
(revision 0007 could not check those deployments; remove them first).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_BLAKE3 = "blake3:%"


def upgrade() -> None:
    pass


def downgrade() -> None:
    conn = op.get_bind()
    deps = sa.table("deployments", sa.column("name", sa.String()), sa.column("state_root", sa.String(64)))
    events = sa.table("deployment_events", sa.column("state_root", sa.String(64)))
    names = [r[0] for r in conn.execute(sa.select(deps.c.name).where(deps.c.state_root.like(_BLAKE3)))]
    n_events = conn.execute(sa.select(sa.func.count()).select_from(events)
                            .where(events.c.state_root.like(_BLAKE3))).scalar_one()
    if names or n_events:
        shown = ", ".join(sorted(names)[:5]) + (" …" if len(names) > 5 else "")
        raise RuntimeError(f"cannot downgrade below 0008: deployments record BLAKE3 state roots ({shown or 'in their history'}); "
                           "remove them (adapterhub deploy rm) first")
    bases = sa.table("base_models", sa.column("state_root", sa.String(64)))
    op.execute(bases.update().where(bases.c.state_root.like(_BLAKE3)).values(state_root=None))

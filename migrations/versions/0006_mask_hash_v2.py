"""Mask hash, definition 2 (issue 19): recompute every version's ``mask_hash``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

Definition 1 hashed every non-zero's flat index as an int64 (8 B per non-zero, twice the bytes of a bf16
adapter file); definition 2 (:mod:`adapterhub.maskhash`) hashes the file format's own index coding (uint16
gaps and int64 escapes, 2 B per non-zero), so ``register`` and ``pull`` hash a canonical file's index bytes
as they are. Both depend only on the positions, so a mask's identity is unchanged; its hex string changes.

Existing rows: each version's blob is read once through ``config.attributes["blob_reader"]`` (``digest ->
bytes | None``; the workspace passes its store's verified reader) and its hash recomputed. Without a reader
(alembic run by hand) or where a blob cannot be read, ``mask_hash`` becomes NULL ("unknown", as for a row that
never had one) rather than keep a value of the other definition. The downgrade recomputes definition 1 the same
way. No schema change.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import context, op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_versions = sa.table("adapter_versions", sa.column("id", sa.Integer()), sa.column("content_hash", sa.String(64)),
                     sa.column("mask_hash", sa.String(64)))


def _mask_hash_v1(data: bytes) -> str:
    """Definition 1: per tensor in name order ``name NUL json(shape) NUL`` then the sorted flat element
    indices as little-endian int64."""
    from adapterhub import maskhash, st_io

    header = st_io.parse_header(data, "adapter")
    doc = json.loads(header.metadata["adapterhub"])
    h = hashlib.sha256()
    for name in sorted(doc["params"]):
        spec = doc["params"][name]
        shape = tuple(int(s) for s in spec["shape"])
        ie = header.entries[f"param::{name}::idx"]
        ee = header.entries.get(f"param::{name}::esc")
        g = np.frombuffer(data[header.data_start + ie.begin:header.data_start + ie.end], dtype="<u2").astype(np.int64)
        if ee is not None and ee.end > ee.begin:
            g[g == 0] = np.frombuffer(data[header.data_start + ee.begin:header.data_start + ee.end], dtype="<i8")
        idx = np.cumsum(g) - 1
        if spec.get("layout", "element") != "element":
            idx = maskhash._block_elements(shape, int(spec["block_size"]), idx)
        h.update(name.encode() + b"\0" + json.dumps(list(shape)).encode() + b"\0")
        h.update(np.ascontiguousarray(idx, dtype="<i8").tobytes())
    return h.hexdigest()


def _recompute(fn: Callable[[bytes], str]) -> None:
    reader: Callable[[str], Any] | None = context.config.attributes.get("blob_reader")
    conn = op.get_bind()
    rows = conn.execute(sa.select(_versions.c.id, _versions.c.content_hash)).all()
    for vid, digest in rows:
        new = None
        if reader is not None:
            try:
                data = reader(digest)
                new = fn(data) if data is not None else None
            except Exception:  # noqa: BLE001 - an unreadable blob: unknown, never a value of the other definition
                new = None
        conn.execute(_versions.update().where(_versions.c.id == vid).values(mask_hash=new))


def upgrade() -> None:
    from adapterhub.maskhash import mask_hash_of_file

    _recompute(mask_hash_of_file)


def downgrade() -> None:
    _recompute(_mask_hash_v1)

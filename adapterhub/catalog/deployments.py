"""The deployment rows of the catalog: records and the queries behind them.

:class:`DeploymentCatalog` is what :attr:`Workspace.deployment_rows
<adapterhub.workspace.Workspace.deployment_rows>` hands to :mod:`adapterhub.apply.deployments`, so that
module never sees an ORM object or a session: it reads and writes plain records here. Each method is one
catalog transaction (a session that commits on success and rolls back on error).

The records are detached from the database: :class:`DeploymentInfo` (a deployment's row; ``path`` as
recorded, which :func:`adapterhub.apply.deployments.get` resolves for the calling home) and
:class:`EventInfo` (one event, with the applied version's hash, kind and forget spec).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from ..errors import DeploymentError
from .db import SQL_INT_MAX
from .models import Adapter, AdapterVersion, BaseModel, Deployment, DeploymentEvent
from .records import iso_utc

__all__ = ["DeploymentInfo", "EventInfo", "DeploymentCatalog"]


@dataclass
class EventInfo:
    """One deployment event as history shows it."""

    seq: int
    action: str
    ref: str | None
    scale: float | None
    state_fingerprint: str | None  # identity-style sha256 of the state, where known (always before revision 0004)
    stack: list[dict[str, Any]]
    details: dict[str, Any]
    created_at: dt.datetime | None
    content_hash: str | None = None  # the applied/reverted version's sha256
    kind: str | None = None  # its adapter kind (expert, merge, unlearning, ...)
    forget: str | None = None  # an unlearning version's forget spec, e.g. "class:NUM"
    state_root: str | None = None  # the resulting state root (None: recorded before revision 0004)
    measured: bool = True  # the state was measured (every weight byte hashed), not derived incrementally

    @property
    def state(self) -> str:
        """The state as shown: the root, else (events before revision 0004) the identity-style fingerprint."""
        return self.state_root or self.state_fingerprint or ""

    def to_json(self) -> dict[str, Any]:
        return {"event": self.seq, "action": self.action, "ref": self.ref, "scale": self.scale,
                "content_hash": self.content_hash, "kind": self.kind, "forget": self.forget,
                "state_root": self.state_root, "measured": self.measured,
                "state_fingerprint": self.state_fingerprint, "stack": [layer["ref"] for layer in self.stack],
                "details": self.details, "time": iso_utc(self.created_at)}


@dataclass
class DeploymentInfo:
    """A deployment's current record."""

    name: str
    base: str
    base_fingerprint: str
    path: Path
    state_fingerprint: str | None  # identity-style sha256 of the current weights, where known
    stack: list[dict[str, Any]]
    events: int
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    recovered: bool = False
    last_event: EventInfo | None = field(default=None, repr=False)
    uid: str | None = None  # the id in the folder's marker (None: made before catalog revision 0002, not adopted)
    home_id: str | None = None  # the owner home's id
    read_only: bool = False  # owned by another home (or a copy's original): this home may only read it
    rel_path: str | None = field(default=None, repr=False)  # the folder relative to the owner home, if inside it
    state_root: str | None = None  # the current state root (None: a row made before revision 0004, not yet measured)
    base_state_root: str | None = field(default=None, repr=False)
    base_id: int | None = field(default=None, repr=False)

    @property
    def state(self) -> str:
        """The state as shown: the root, else (rows before revision 0004) the identity-style fingerprint."""
        return self.state_root or self.state_fingerprint or ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "base_fingerprint": self.base_fingerprint, "path": str(self.path),
                "state_root": self.state_root, "base_state_root": self.base_state_root,
                "state_fingerprint": self.state_fingerprint, "stack": [dict(layer) for layer in self.stack],
                "events": self.events, "created_at": iso_utc(self.created_at), "updated_at": iso_utc(self.updated_at),
                "recovered": self.recovered, "owner_home": self.home_id, "read_only": self.read_only}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _row(s: Session, name: str) -> Deployment:
    row = s.scalar(select(Deployment).where(Deployment.name == name))
    if row is None:
        known = ", ".join(s.scalars(select(Deployment.name).order_by(Deployment.name)).all()) or "none"
        raise DeploymentError(f"unknown deployment {name!r} (known: {known})")
    return row


def _info(row: Deployment, events: int) -> DeploymentInfo:
    return DeploymentInfo(row.name, row.base.name, row.base.fingerprint, Path(row.path), row.state_fingerprint,
                          list(row.stack or []), events, row.created_at, row.updated_at, uid=row.uid,
                          home_id=row.home_id, rel_path=row.rel_path, state_root=row.state_root,
                          base_state_root=row.base.state_root, base_id=row.base_id)


def _next_seq(s: Session, row: Deployment) -> int:
    return int(s.scalar(select(func.max(DeploymentEvent.seq)).where(DeploymentEvent.deployment_id == row.id)) or 0) + 1


def _event(e: DeploymentEvent, about: tuple[str, str, str | None] | None = None) -> EventInfo:
    d = dict(e.details or {})
    chash, kind, forget = about or (None, None, None)
    return EventInfo(e.seq, e.action, d.get("ref"), e.scale, e.state_fingerprint, list(e.stack or []), d, e.created_at,
                     chash, kind, forget, e.state_root, bool(e.measured))


class DeploymentCatalog:
    """The deployment rows behind a Workspace (see the module docstring).

    Takes: ``session``, a factory of sessions that commit on success (``Workspace.session``).
    """

    def __init__(self, session: Callable[[], AbstractContextManager[Session]]) -> None:
        self._session = session

    def has_any(self) -> bool:
        """True if the catalog has at least one deployment."""
        with self._session() as s:
            return s.scalar(select(Deployment.id).limit(1)) is not None

    def exists(self, name: str) -> bool:
        """True if a deployment is called ``name``."""
        with self._session() as s:
            return s.scalar(select(Deployment.id).where(Deployment.name == name)) is not None

    def uid_exists(self, uid: str) -> bool:
        """True if a deployment row carries id ``uid``."""
        with self._session() as s:
            return s.scalar(select(Deployment.id).where(Deployment.uid == uid)) is not None

    def get(self, name: str) -> DeploymentInfo:
        """The row of deployment ``name``. Raises: DeploymentError naming the known ones if there is none."""
        with self._session() as s:
            row = _row(s, name)
            n = s.scalar(select(func.count()).select_from(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id))
            return _info(row, int(n or 0))

    def list_all(self) -> list[DeploymentInfo]:
        """Every deployment row, by name (two queries, whatever the number of deployments)."""
        with self._session() as s:
            counts = dict(s.execute(select(DeploymentEvent.deployment_id, func.count())
                                    .group_by(DeploymentEvent.deployment_id)).tuples().all())
            return [_info(r, int(counts.get(r.id, 0))) for r in s.scalars(select(Deployment).order_by(Deployment.name))]

    def add(self, *, name: str, base_id: int, path: str, rel_path: str | None, state_fingerprint: str, uid: str,
            home_id: str, details: dict[str, Any], state_root: str) -> None:
        """Insert a deployment row (empty stack) and its ``create`` event (seq 0, measured), in one transaction.

        Raises: the driver's IntegrityError if the name or uid is taken meanwhile.
        """
        with self._session() as s:
            row = Deployment(name=name, base_id=base_id, path=path, state_fingerprint=state_fingerprint, stack=[],
                             created_at=_now(), updated_at=_now(), uid=uid, home_id=home_id, rel_path=rel_path,
                             state_root=state_root)
            s.add(row)
            s.flush()
            s.add(DeploymentEvent(deployment_id=row.id, seq=0, action="create", version_id=None, scale=None, stack=[],
                                  state_fingerprint=state_fingerprint, details=details, created_at=_now(),
                                  state_root=state_root, measured=True))

    def remove(self, name: str, uid: str | None) -> None:
        """Delete deployment ``name``'s row and its events, in one transaction — only the row carrying id ``uid``
        (a row re-created meanwhile under the same name is another deployment). Raises: DeploymentError."""
        with self._session() as s:
            row = _row(s, name)
            if row.uid != uid:
                raise DeploymentError(f"deployment {name!r} was replaced by another command meanwhile; nothing removed")
            s.execute(delete(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id))
            s.delete(row)

    def set_base_state_root(self, base_id: int, root: str) -> None:
        """Record base ``base_id``'s state root (measured at its first ``deploy create``) if it has none yet."""
        with self._session() as s:
            row = s.get(BaseModel, base_id)
            if row is not None and row.state_root is None:
                row.state_root = root

    def replace_base_state_root(self, base_id: int, old: str | None, new: str) -> bool:
        """Base ``base_id``'s state root becomes ``new`` if it is still ``old`` (False, nothing changed, if another
        process changed it meanwhile)."""
        same = BaseModel.state_root.is_(None) if old is None else BaseModel.state_root == old
        with self._session() as s:  # one conditional UPDATE: atomic on SQLite and PostgreSQL alike
            done = s.execute(update(BaseModel).where(BaseModel.id == base_id, same).values(state_root=new))
            return bool(getattr(done, "rowcount", 0) == 1)

    def base_state_root(self, base_id: int) -> str | None:
        """Base ``base_id``'s state root, or None if it was never measured."""
        with self._session() as s:
            row = s.get(BaseModel, base_id)
            return None if row is None else row.state_root

    def set_state_root(self, name: str, root: str) -> None:
        """Give a row made before revision 0004 its state root, measured now (its stack and events unchanged)."""
        with self._session() as s:
            row = _row(s, name)
            if row.state_root is None:
                row.state_root = root

    def known_fingerprint(self, name: str, root: str) -> str | None:
        """The identity-style fingerprint of state ``root`` if it is known without reading the weights: the base's
        when ``root`` is the base's state root, else one recorded by an earlier event of ``name`` with that root."""
        with self._session() as s:
            row = _row(s, name)
            if row.base.state_root == root:
                return row.base.fingerprint
            return s.scalar(select(DeploymentEvent.state_fingerprint).where(
                DeploymentEvent.deployment_id == row.id, DeploymentEvent.state_root == root,
                DeploymentEvent.state_fingerprint.is_not(None)).limit(1))

    def adopt(self, name: str, *, uid: str, home_id: str, rel_path: str | None) -> None:
        """Give a row made before catalog revision 0002 its ids (only if it still has no owner)."""
        with self._session() as s:
            row = _row(s, name)
            if row.home_id is None:
                row.uid, row.home_id, row.rel_path = uid, home_id, rel_path

    def last_op_id(self, name: str) -> str | None:
        """The ``op_id`` in the details of deployment ``name``'s latest event (None if it has none)."""
        with self._session() as s:
            row = _row(s, name)
            last = s.scalar(select(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id)
                            .order_by(DeploymentEvent.seq.desc()).limit(1))
            op = (last.details or {}).get("op_id") if last is not None else None
            return op if isinstance(op, str) else None

    def add_event(self, name: str, *, action: str, stack: list[dict[str, Any]], state_fingerprint: str | None,
                  details: dict[str, Any], state_root: str, measured: bool, version_id: int | None = None,
                  scale: float | None = None, set_state: bool = True) -> None:
        """Append an event (the next seq) to deployment ``name``, in one transaction.

        With ``set_state`` the row's stack, state root and state fingerprint become the event's; the row's
        ``updated_at`` is set either way.
        """
        with self._session() as s:
            row = _row(s, name)
            s.add(DeploymentEvent(deployment_id=row.id, seq=_next_seq(s, row), action=action, version_id=version_id,
                                  scale=scale, stack=stack, state_fingerprint=state_fingerprint, details=details,
                                  created_at=_now(), state_root=state_root, measured=measured))
            if set_state:
                row.stack = stack
                row.state_fingerprint = state_fingerprint
                row.state_root = state_root
            row.updated_at = _now()

    def events(self, name: str) -> list[EventInfo]:
        """Events of deployment ``name``, oldest first, each with its version's content hash, kind and forget spec."""
        with self._session() as s:
            row = _row(s, name)
            evs = s.scalars(select(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id)
                            .order_by(DeploymentEvent.seq)).all()
            vids = {e.version_id for e in evs if e.version_id is not None}
            about: dict[int, tuple[str, str, str | None]] = {}
            if vids:
                q = (select(AdapterVersion.id, AdapterVersion.content_hash, Adapter.kind, AdapterVersion.training_config)
                     .join(Adapter, AdapterVersion.adapter_id == Adapter.id).where(AdapterVersion.id.in_(vids)))
                for vid, chash, kind, tc in s.execute(q):
                    forget = ((tc or {}).get("forget") or {}).get("spec") if isinstance(tc, dict) else None
                    about[vid] = (chash, kind, forget)
            return [_event(e, about.get(e.version_id) if e.version_id is not None else None) for e in evs]

    def event_stack(self, name: str, seq: int) -> list[dict[str, Any]] | None:
        """The stack recorded by event ``seq`` of deployment ``name``; None if there is no such event."""
        with self._session() as s:
            row = _row(s, name)
            if not 0 <= seq <= SQL_INT_MAX:  # no event has that number (and SQL could not compare it)
                return None
            ev = s.scalar(select(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id,
                                                        DeploymentEvent.seq == seq))
            return None if ev is None else list(ev.stack or [])


"""Recovery of an interrupted deployment operation (a write-ahead log left in its folder). Undoing one rewrites
weights, so torch (through :mod:`adapterhub.apply.disk`) is imported only when there is a log to recover:
``gc``, ``verify`` and ``repair`` of a home whose deployments are clean stay torch-free."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ..errors import DeploymentError
from ..fsutil import atomic_write_bytes
from .deploy_ownership import (
    _checked_state,
    _committed,
    _gc_undo,
    _locked,
    _promote_state,
    _state_file,
    _state_next,
    _wal,
    _writable,
    get,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..workspace import Workspace


def recover(ws: Workspace, name: str) -> bool:
    """Recover deployment ``name`` from an interrupted operation, if any. Returns True if it did.

    Raises: DeploymentError if the deployment belongs to another home (see
    :func:`~adapterhub.apply.deploy_ownership._writable`).
    """
    info = _writable(ws, name)
    with _locked(info.path):
        _writable(ws, name, adopt=True)
        return _recover_locked(ws, name)


def _recover_locked(ws: Workspace, name: str) -> bool:
    """Finish or undo an interrupted operation (caller holds the lock). Returns True if it did anything."""
    info = get(ws, name)
    wal = _wal(info.path)
    if not wal.exists():
        return False
    from .disk import WeightsFolder, read_wal, recover_wal  # torch: only with a log to recover

    doc = read_wal(wal)
    assert doc is not None
    if _committed(ws, name, doc):
        _promote_state(info.path, doc.get("op_id"))
        wal.unlink()
        _gc_undo(info.path, info.stack)
        return True
    weights = WeightsFolder(info.path)
    try:
        recover_wal(weights, wal)
    finally:
        weights.close()
    with contextlib.suppress(FileNotFoundError):
        _state_next(info.path).unlink()  # the interrupted operation's state, never committed
    try:  # the files the WAL rewrote have new stat data: the cheap check re-hashes them in full
        state, measured = _checked_state(ws, info, full=False)
    except DeploymentError as e:
        raise DeploymentError(f"deployment {name!r}: after undoing an interrupted {doc.get('action', 'operation')}: "
                              f"{e}") from None
    root = state.root()
    atomic_write_bytes(_state_file(info.path), state.to_bytes(root))
    ws.deployment_rows.add_event(name, action="recover", stack=list(info.stack), state_fingerprint=info.state_fingerprint,
                                 state_root=root, measured=measured,
                                 details={"interrupted": doc.get("action"), "op_id": doc.get("op_id"),
                                          "ref": doc.get("ref")}, set_state=False)
    _gc_undo(info.path, info.stack)
    return True

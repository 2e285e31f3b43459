"""Where a deployment lives and who may change it: its control folder's layout, its lock, this home's id, the
folder's marker, and the catalog's rows as this home sees them (:func:`get`, :func:`list_deployments`,
:func:`history`).

Torch-free: the read-only and bookkeeping commands (``deploy list``, ``history``, ``rm``, ``verify``,
``create``) start without importing torch; only patching weights does (:mod:`adapterhub.apply.deployments`,
which re-exports the public names of this module and of :mod:`adapterhub.apply.deploy_folders`). See
:mod:`adapterhub.apply.deployments` for the model: ownership, markers, crash safety.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, overload

from ..catalog.deployments import DeploymentInfo, EventInfo
from ..errors import DeploymentError
from ..fsutil import atomic_write_bytes, fsync_dir
from ..progress import Progress
from .state import FolderState, RootScheme, StateFileError, measure_folder, read_state_file, scheme_of, short_root

if TYPE_CHECKING:  # pragma: no cover
    from ..workspace import Workspace

__all__ = ["DeploymentInfo", "EventInfo", "get", "list_deployments", "history", "weights_path", "current_home_id",
           "CONTROL_DIR", "HOME_ID_FILE"]

CONTROL_DIR = ".adapterhub"
HOME_ID_FILE = "home-id"
_MARKER = "deployment.json"


def _control(path: Path) -> Path:
    return path / CONTROL_DIR


def _wal(path: Path) -> Path:
    return _control(path) / "wal.safetensors"


def _state_file(path: Path) -> Path:
    return _control(path) / "state.json"


def _state_next(path: Path) -> Path:
    return _control(path) / "state.next.json"


def _undo_path(path: Path, digest: object) -> Path:
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DeploymentError(f"invalid undo record id {digest!r} in the deployment's stack")
    return _control(path) / "undo" / f"{digest}.safetensors"


def _refuse_symlinks(path: Path) -> None:
    """A deployment folder, its weight files and its control folder must be real files of ours: a symlink
    planted there would make a patch (or a recovery) write through it, outside the home."""
    suspects = [path, _control(path), _control(path) / "undo", _wal(path), _state_file(path), _state_next(path)]
    if path.is_dir() and not path.is_symlink():
        suspects += sorted(path.glob("*.safetensors"))
    for p in suspects:
        if p.is_symlink():
            raise DeploymentError(f"{p} is a symlink; refusing to patch through it (the deployment folder was tampered with)")


@contextlib.contextmanager
def _flock(p: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Exclusive ``flock`` on lock file ``p``, opened without following symlinks (O_NOFOLLOW).

    Yields True when held (False only with ``blocking=False`` when another process holds it).
    Raises: DeploymentError (one line) if ``p`` is a symlink or cannot be opened.
    """
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "it is a symlink" if e.errno == errno.ELOOP else (e.strerror or e.__class__.__name__)
        raise DeploymentError(f"cannot open the lock file {p}: {why}; refusing to lock through it") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Exclusive advisory lock on a deployment (one operation at a time); refuses symlinked folders and files,
    the lock file included. Yields False only with ``blocking=False`` when another operation holds it."""
    _refuse_symlinks(path)
    ctl = _control(path)
    ctl.mkdir(parents=True, exist_ok=True)
    with _flock(ctl / "lock", blocking=blocking) as got:
        yield got


# -- ownership -----------------------------------------------------------------------------------


def _is_id(x: object) -> TypeGuard[str]:
    return isinstance(x, str) and len(x) == 32 and all(c in "0123456789abcdef" for c in x)


def _short(x: Any) -> str:
    """A marker value, safe for a one-line message."""
    return repr(str(x)[:12])


def _read_nofollow(p: Path, limit: int = 1 << 30) -> bytes | None:
    """Bytes of file ``p`` without following a symlink; None if it does not exist.

    Raises: DeploymentError if ``p`` is a symlink or cannot be read.
    """
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        why = "it is a symlink" if e.errno == errno.ELOOP else (e.strerror or e.__class__.__name__)
        raise DeploymentError(f"cannot read {p}: {why}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def _json_or_none(raw: bytes) -> Any:
    """``raw`` parsed as JSON, or None when it is not JSON (the callers word what a damaged file means)."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _where(home: Path) -> dict[str, Any]:
    st = os.stat(home)
    return {"path": str(home), "dev": st.st_dev, "ino": st.st_ino}


def _home_doc(home: Path) -> dict[str, Any] | None:
    raw = _read_nofollow(home / HOME_ID_FILE, 4096)
    if raw is None:
        return None
    doc = _json_or_none(raw)
    if not (isinstance(doc, dict) and _is_id(doc.get("id")) and isinstance(doc.get("path"), str)
            and isinstance(doc.get("dev"), int) and isinstance(doc.get("ino"), int)):
        raise DeploymentError(f"{home / HOME_ID_FILE} is damaged (it holds this home's identity, which its "
                              "deployments' markers name); restore it from a backup")
    return doc


def _same_home(doc: dict[str, Any], here: dict[str, Any]) -> bool:
    """Same path (restored in place) or same inode (moved): the same home; both different: a copy."""
    return doc["path"] == here["path"] or (doc["dev"], doc["ino"]) == (here["dev"], here["ino"])


@overload
def current_home_id(ws: Workspace, *, create: Literal[True] = ...) -> str: ...


@overload
def current_home_id(ws: Workspace, *, create: bool) -> str | None: ...


def current_home_id(ws: Workspace, *, create: bool = True) -> str | None:
    """The id of ``ws.home`` (``<home>/home-id``: random, minted on first need, written atomically, mode 0600).

    A copy of a home (``cp -a``: another path and another inode) is another home: it mints its own id,
    so the deployments it copied (their markers name the original's id) are read-only there.
    With ``create=False`` nothing is written: returns None where an id would have to be minted.
    Raises: DeploymentError if the file is damaged, a symlink, or unreadable.
    """
    home = Path(ws.home)
    here = _where(home)
    doc = _home_doc(home)
    if doc is not None and all(doc[k] == here[k] for k in ("path", "dev", "ino")):
        return str(doc["id"])
    if not create:
        return str(doc["id"]) if doc is not None and _same_home(doc, here) else None
    with _flock(home / ".home-id.lock"):
        doc = _home_doc(home)
        hid = str(doc["id"]) if doc is not None and _same_home(doc, here) else uuid.uuid4().hex
        if doc is None or any(doc[k] != here[k] for k in ("path", "dev", "ino")) or doc["id"] != hid:
            atomic_write_bytes(home / HOME_ID_FILE, json.dumps({"id": hid, **here}, sort_keys=True).encode())
        return hid


def _read_marker(path: Path) -> dict[str, Any] | None:
    """The folder's marker ``{"name", "deployment_id", "home_id", "state"}``; ``{"name": ...}`` for a marker
    written before catalog revision 0002 (just the name); None if there is none. Never follows symlinks."""
    ctl = _control(path)
    if ctl.is_symlink():
        raise DeploymentError(f"{ctl} is a symlink; refusing to use it")
    raw = _read_nofollow(ctl / _MARKER, 1 << 16)
    if raw is None:
        return None
    doc = _json_or_none(raw)
    if isinstance(doc, dict):
        return doc
    return {"name": raw.decode("utf-8", "replace").strip()}


def _write_marker(path: Path, name: str, uid: str, hid: str, state: str) -> None:
    atomic_write_bytes(_control(path) / _MARKER, json.dumps({"name": name, "deployment_id": uid, "home_id": hid,
                                                       "state": state}, sort_keys=True).encode())


def _rel_to_home(ws: Workspace, path: Path) -> str | None:
    try:
        return str(path.relative_to(Path(ws.home)))
    except ValueError:
        return None


def _resolve_path(ws: Workspace, row: DeploymentInfo, hid: str | None) -> Path:
    """Where this home finds the folder: relative to the home for its own deployments stored inside it
    (a moved home keeps working), else the absolute path recorded at creation."""
    rel = row.rel_path
    if rel and hid is not None and row.home_id == hid and not os.path.isabs(rel) and ".." not in Path(rel).parts:
        return Path(ws.home) / rel
    return row.path


def _other_home(path: Path, home: Path) -> Path | None:
    """An adapterhub home other than ``home`` that contains ``path`` (it holds a home-id or catalog.db), else None."""
    for p in path.parents:
        if p == home:
            return None
        if (p / HOME_ID_FILE).exists() or (p / "catalog.db").exists():
            return p
    return None


def _writable(ws: Workspace, name: str, *, adopt: bool = False) -> DeploymentInfo:
    """Check this home may change deployment ``name``: the catalog names this home as its owner and the
    folder's marker names this deployment and this home. With ``adopt`` (deployment lock held), claim a
    deployment made before catalog revision 0002 and mark a freshly created folder ready.

    Returns: its DeploymentInfo. Raises: DeploymentError (one line) when it belongs to another home, its
    folder holds another deployment, or the marker is missing. Reads only, unless ``adopt``.
    """
    hid = current_home_id(ws)
    info = get(ws, name)
    if info.home_id is not None and info.home_id != hid:
        raise DeploymentError(f"deployment {name!r} belongs to another home (home id {info.home_id[:12]}); it is "
                              "read-only here")
    path = info.path
    if not path.is_dir() or path.is_symlink():
        return info  # _refuse_symlinks / _prepare say what is wrong
    m = _read_marker(path)
    if m is None:
        raise DeploymentError(f"{path} has no deployment marker; refusing to change a folder that may not be "
                              f"deployment {name!r}'s")
    if m.get("home_id") is not None and m.get("home_id") != hid:
        raise DeploymentError(f"{path} belongs to another home (home id {_short(m.get('home_id'))}); refusing to "
                              "change it")
    if info.home_id is None:  # made before revision 0002
        other = _other_home(path, Path(ws.home))
        if other is not None:
            raise DeploymentError(f"{path} belongs to another home ({other}); deployment {name!r} is read-only here")
        if m.get("name") != name:
            raise DeploymentError(f"{path} holds deployment {_short(m.get('name'))}, not {name!r}; refusing to change it")
        if adopt:
            uid = m["deployment_id"] if m.get("home_id") == hid and _is_id(m.get("deployment_id")) else uuid.uuid4().hex
            _write_marker(path, name, uid, hid, "ready")
            ws.deployment_rows.adopt(name, uid=uid, home_id=hid, rel_path=_rel_to_home(ws, path))
            info = get(ws, name)
        return info
    if m.get("deployment_id") != info.uid or m.get("home_id") != hid:
        raise DeploymentError(f"{path} holds another deployment (its marker names {_short(m.get('name'))}, id "
                              f"{_short(m.get('deployment_id'))}); refusing to change it")
    if adopt and m.get("state") != "ready":
        _write_marker(path, name, info.uid or "", hid, "ready")
    return info


# -- the catalog's rows, as this home sees them --------------------------------------------------


def _seen_from(ws: Workspace, row: DeploymentInfo, hid: str | None) -> DeploymentInfo:
    """The catalog's row as home ``hid`` sees it: the folder where this home finds it, and whether it may write."""
    return replace(row, path=_resolve_path(ws, row, hid), read_only=row.home_id is not None and row.home_id != hid)


def get(ws: Workspace, name: str) -> DeploymentInfo:
    """The deployment record (no recovery; reads only ``<home>/home-id``). Raises DeploymentError if unknown."""
    hid = current_home_id(ws, create=False)
    return _seen_from(ws, ws.deployment_rows.get(name), hid)


def list_deployments(ws: Workspace) -> list[DeploymentInfo]:
    """All deployments, by name (those of other homes too, marked ``read_only``)."""
    hid = current_home_id(ws, create=False)
    return [_seen_from(ws, r, hid) for r in ws.deployment_rows.list_all()]


def history(ws: Workspace, name: str) -> list[EventInfo]:
    """Events of a deployment, oldest first, each with its version's content hash, kind and forget spec.

    Raises: DeploymentError if there is no such deployment.
    """
    return ws.deployment_rows.events(name)


def weights_path(ws: Workspace, name: str) -> Path:
    """Folder of the deployment (for evaluation: load it with transformers)."""
    return get(ws, name).path


# -- state files (adapterhub.apply.state) ------------------------------------------------------


def _measure(folder: Path, *, scheme: RootScheme, identity: bool = False,
             progress: Progress | None = None) -> tuple[FolderState, str | None]:
    """A full measurement of ``folder``'s weights under ``scheme``, the ``stat`` data taken (after a clock
    reading) before the bytes are read, so a write during the hashing shows as a change next time."""
    pre = FolderState({}, {})
    pre.stamp(folder, [p.name for p in folder.glob("*.safetensors")])
    state, ident = measure_folder(folder, scheme=scheme, identity=identity, progress=progress)
    state.files = pre.files
    return state, ident


def _mismatch(name: str, actual: str, expected: str, where: str = "") -> DeploymentError:
    return DeploymentError(f"deployment {name!r} weights{where} do not match the recorded state ({short_root(actual)} != "
                           f"{short_root(expected)}): the file is corrupt or was changed outside adapterhub; nothing was changed")


def _recorded_state(info: DeploymentInfo) -> FolderState | None:
    """The folder's state file if its chunk hashes give the catalog's state root (recomputed, never taken from
    the file), else None."""
    if info.state_root is None:
        return None
    try:
        got = read_state_file(_state_file(info.path))
    except StateFileError:
        return None
    if got is None or got[0].root() != info.state_root:  # (a root's text names its scheme: no other matches)
        return None
    return got[0]


def _checked_state(ws: Workspace, info: DeploymentInfo, *, full: bool,
                   check: bool = True, progress: Progress | None = None) -> tuple[FolderState, bool]:
    """The chunk hashes of ``info``'s weights, shown to be the catalog's recorded state before anything is written.

    ``full`` (``--verify``), a missing or stale state file, or a row made before revision 0004: a full
    measurement (a pre-0004 row is checked against its identity-style fingerprint, then gets its root).
    Otherwise the cheap check: files whose ``stat`` data changed (or are racily clean) are re-hashed in full
    and compared; ``check=False`` skips it. ``progress``: told of the hashing, if any.
    Returns (state, measured: every byte was hashed).
    Raises: DeploymentError (the weights differ from the record; nothing was changed).
    """
    st = None if full else _recorded_state(info)
    stale: list[str] = []
    if st is not None and check:
        try:
            stale = st.stale_files(info.path)
        except StateFileError:
            st = None
    if st is None:
        # (a row from before revision 0004 gets a root of its base's scheme, so that an empty stack has its base's root)
        new, ident = _measure(info.path, scheme=scheme_of(info.state_root or info.base_state_root),
                              identity=info.state_root is None, progress=progress)
        root = new.root()
        if info.state_root is None:
            if ident != info.state_fingerprint:
                raise _mismatch(info.name, str(ident), str(info.state_fingerprint))
            ws.deployment_rows.set_state_root(info.name, root)
            info.state_root = root
        elif root != info.state_root:
            raise _mismatch(info.name, root, info.state_root)
        return new, True
    if stale:
        pre = FolderState({}, {})
        pre.stamp(info.path, stale)
        new, _ = measure_folder(info.path, scheme=st.scheme, files=stale, base=st, progress=progress)
        root = new.root()
        if root != info.state_root:
            raise _mismatch(info.name, root, str(info.state_root), f" ({', '.join(stale)}, changed since the last operation)")
        new.files.update(pre.files)
        return new, False
    return st, False


def _promote_state(path: Path, op_id: object, *, ours: bool = False) -> None:
    """The operation ``op_id`` is recorded: its ``state.next.json`` becomes ``state.json`` (a next state of another
    operation is dropped; a missing or stale state file only costs the next operation a full measurement).
    ``ours``: the caller wrote that file for ``op_id`` itself, under the lock it still holds (not read again)."""
    nxt = _state_next(path)
    try:
        got = None if ours else read_state_file(nxt)
    except StateFileError:
        got = None
    if ours or (got is not None and isinstance(op_id, str) and got[0].op_id == op_id):
        os.replace(nxt, _state_file(path))
        fsync_dir(_control(path))
    else:
        with contextlib.suppress(FileNotFoundError):
            nxt.unlink()


def _committed(ws: Workspace, name: str, doc: dict[str, Any]) -> bool:
    """True if the catalog's latest event of ``name`` is the operation the WAL ``doc`` belongs to.

    This is the commit point of every operation: the WAL names its operation id from the moment it is
    written, and the event carrying that id is committed only after the new weights are fsynced.
    """
    op = doc.get("op_id")
    return isinstance(op, str) and ws.deployment_rows.last_op_id(name) == op


def _gc_undo(path: Path, stack: Sequence[dict[str, Any]]) -> None:
    keep = {layer["undo"] for layer in stack}
    d = _control(path) / "undo"
    if not d.is_dir():
        return
    for f in d.iterdir():
        if f.name.endswith(".safetensors") and f.name[:-len(".safetensors")] not in keep:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

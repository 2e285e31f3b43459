"""Deployments: named, materialised Hugging Face model folders with a stack of applied adapters.

A deployment is a copy of a base folder (config, tokenizer, ``*.safetensors``) whose weights are
patched **in place** at the touched byte offsets only (memory-mapped). Every operation —
``create``, ``apply``, ``revert``, ``rollback``, ``recover`` — is a ``DeploymentEvent`` row
with the resulting stack and *state root* (:mod:`adapterhub.apply.state`: a Merkle root over 256 KiB chunk
hashes, so a deployment with an empty stack has its base's state root), and whether that root was
*measured* (every byte hashed: ``create``, ``--verify``) or *derived* (the previous root updated with the
chunks the operation touched; a revert puts back the chunk hashes its layer's undo record saved). The chunk
hashes live in ``<dir>/.adapterhub/state.json`` with the ``stat`` data of every weights file; before
writing, an operation compares those (size, mtime, ctime, inode) and re-hashes in full any file that
changed or is racily clean (docs/deployments.md). ``deploy verify`` always measures.

Crash safety (docs/deployments.md): before the first byte changes, the original bytes of every
position the operation touches go to ``<dir>/.adapterhub/wal.safetensors`` with a fresh operation
id (fsynced; :class:`adapterhub.apply.disk.DiskTransaction`). A lone apply writes its layer's undo record
(content-addressed, ``.adapterhub/undo/<sha256>.safetensors``, with the original and the patched values and
the chunk hashes its chunks had before) first, and its WAL names that record instead of holding a second copy
of the same bytes; a lone revert's WAL names the record of the layer it takes off, whose patched values are
the bytes it overwrites (records of earlier versions lack them: their reverts gather them). The weights are
patched, each other applied layer's undo record is saved, the weights files written are fsynced, the new
chunk hashes go to
``.adapterhub/state.next.json``, the catalog event carrying the operation id and state root is committed,
``state.next.json`` becomes ``state.json`` and the WAL is removed. The next command on the deployment finds
a leftover WAL and either keeps the new state (the catalog's latest event has that operation id; its next
state file is promoted) or writes the saved bytes back (it has not) — the last completed state, bit for bit,
checked against the recorded root — and records a ``recover`` event. An ordinary error before
the weights are fsynced puts the saved bytes back at once.

The catalog rows are read and written through ``ws.deployment_rows``
(:class:`adapterhub.catalog.deployments.DeploymentCatalog`); this module never opens a session.

Reverting a layer that is not on top reverts the layers above it, then re-applies them;
rolling back to an event reverts down to the common prefix of both stacks and applies the rest.
Either way the result equals applying the remaining stack to the base.

Ownership (see docs/deployments.md): every deployment has a random id (``Deployment.uid``) written
in its folder's marker ``.adapterhub/deployment.json`` together with the id of the home that created
it (``<home>/home-id``, minted once; a copied home — another path *and* another inode — mints a new
one, a moved home keeps its id). Only that home changes the deployment (apply, revert, rollback,
recover, temp-file cleanup); other homes sharing the catalog, and copies of the home, see it
read-only. A folder whose marker names another deployment or home is never patched or removed.
Rows made before catalog revision 0002 have no ids: the first home that writes to one adopts it,
if the folder is inside that home or outside every adapterhub home.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard, overload

import numpy as np
import torch

from .. import st_io
from ..catalog.deployments import DeploymentInfo, EventInfo
from ..catalog.names import validate_name
from ..errors import AdapterHubError, BaseModelError, DeploymentError, FormatError
from ..faults import fault_point
from ..format import SparseAdapter
from ..fsutil import atomic_write_bytes, fsync_dir
from ..safe_read import open_regular
from .disk import (
    ST_DTYPES,
    DiskTransaction,
    WeightsFolder,
    check_finite_plan,
    decode_undo,
    encode_undo,
    read_wal,
    recover_wal,
)
from .patching import UndoEntry
from .state import (
    CHUNK,
    FolderState,
    StateFileError,
    hash_chunk_sets,
    hash_chunks,
    measure_folder,
    read_state_file,
    root_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..workspace import Workspace

__all__ = ["DeploymentInfo", "EventInfo", "create", "get", "list_deployments", "apply", "revert", "rollback", "remove", "Removed",
           "history", "verify", "recover", "check_all", "remove_temp_files", "current_home_id", "why_not_ok",
           "CONTROL_DIR", "HOME_ID_FILE"]

CONTROL_DIR = ".adapterhub"
HOME_ID_FILE = "home-id"
_MARKER = "deployment.json"
_SKIP_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".gguf", ".onnx", ".ot"}


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


def _where(home: Path) -> dict[str, Any]:
    st = os.stat(home)
    return {"path": str(home), "dev": st.st_dev, "ino": st.st_ino}


def _home_doc(home: Path) -> dict[str, Any] | None:
    raw = _read_nofollow(home / HOME_ID_FILE, 4096)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
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
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
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


# -- create / read -------------------------------------------------------------------------------


def _check_deployments_dir(ws: Workspace) -> None:
    """``<home>/deployments`` must be a real folder of the home: a symlink planted there would send every new
    deployment (and its removal) outside the home. Raises DeploymentError."""
    d = ws.deployments_dir
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise DeploymentError(f"{d} is a symlink or not a folder; refusing to create deployments through it "
                              "(choose another folder for the deployment)")


_MAX_COPY_DEPTH = 16
_MAX_COPY_ENTRIES = 10_000


_FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, XFS with reflink, bcachefs, ...)


def _clone_file(fin: int, fout: int) -> None:
    """Copy file ``fin`` into the empty file ``fout``: a reflink (copy-on-write clone, no data written) where
    the filesystem offers one, else ``copy_file_range`` (in-kernel, server-side on NFS), else a plain copy —
    ``cp --reflink=auto``'s order."""
    try:
        fcntl.ioctl(fout, _FICLONE, fin)
        return
    except OSError:
        pass
    size = os.fstat(fin).st_size
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(fin, fout, size - done, done, done)
            if n == 0:
                break
            done += n
        if done == size:
            return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            raise
    os.ftruncate(fout, 0)
    os.lseek(fin, 0, os.SEEK_SET)
    os.lseek(fout, 0, os.SEEK_SET)
    with os.fdopen(os.dup(fin), "rb") as a, os.fdopen(os.dup(fout), "wb") as b:
        shutil.copyfileobj(a, b, 1 << 20)


def _copy_base_folder(src: Path, dst: Path) -> None:
    """Copy base folder ``src`` into the new deployment folder ``dst`` as real files only.

    Symlinked *files* are followed (a Hugging Face cache snapshot is made of them) but only to regular
    files; a symlinked sub-folder, a FIFO, a socket or a device (``tokenizer.json -> /dev/zero``) is refused,
    so the copy cannot loop, hang or fill the disk, and the deployment holds no symlink to patch through.
    Hidden entries and pickle-family files are skipped. Raises DeploymentError (one line).
    """
    count = 0

    def walk(s: Path, d: Path, depth: int) -> None:
        nonlocal count
        if depth > _MAX_COPY_DEPTH:
            raise DeploymentError(f"base folder {src}: nested deeper than {_MAX_COPY_DEPTH} folders")
        d.mkdir(exist_ok=True)
        for item in sorted(s.iterdir()):
            if item.name.startswith(".") or item.suffix.lower() in _SKIP_SUFFIXES:
                continue
            count += 1
            if count > _MAX_COPY_ENTRIES:
                raise DeploymentError(f"base folder {src}: more than {_MAX_COPY_ENTRIES} files")
            rel = item.relative_to(src)
            if item.is_dir() and not item.is_symlink():
                walk(item, d / item.name, depth + 1)
                continue
            if item.is_dir():
                raise DeploymentError(f"base folder {src}: {rel} is a symlink to a folder; refusing to copy it")
            try:
                with os.fdopen(open_regular(item), "rb") as fin, open(d / item.name, "xb") as fout:
                    _clone_file(fin.fileno(), fout.fileno())
            except OSError as e:
                raise DeploymentError(f"base folder {src}: cannot copy {rel} "
                                      f"({e.strerror or e.__class__.__name__})") from None

    walk(src, dst, 0)


def create(ws: Workspace, name: str, base: str, path: str | os.PathLike[str] | None = None) -> DeploymentInfo:
    """Materialise base ``base`` as deployment ``name`` (a loadable HF folder).

    Takes: a Workspace, the deployment name, a registered base name, an optional target folder
    (default ``<home>/deployments/<name>``; must not exist or be empty — the only non-empty folder it
    replaces is the leftover of this home's own create that crashed before its catalog row).
    Returns: the new DeploymentInfo (stack empty, state fingerprint == base fingerprint), owned by this home.
    Raises: NameError_, BaseModelError (unknown base, or its folder no longer matches its
    fingerprint), DeploymentError (name taken, target folder not empty or another deployment's).
    """
    validate_name(name, "deployment name")
    binfo = ws.get_base(base)
    if ws.deployment_rows.exists(name):
        raise DeploymentError(f"deployment {name!r} already exists")
    hid = current_home_id(ws)
    if path is None:
        _check_deployments_dir(ws)
    target = Path(path).expanduser().absolute() if path else ws.deployments_dir / name
    if target.is_symlink():
        raise DeploymentError(f"{target} is a symlink; refusing to create a deployment through it")
    if target.exists():
        m = _read_marker(target) if target.is_dir() else None
        if m is not None and _is_orphan(ws, m, name, hid):  # this home's create that crashed before its row
            shutil.rmtree(target)
        elif m is not None:
            raise DeploymentError(f"{target} is the folder of another deployment (its marker names "
                                  f"{_short(m.get('name'))}); refusing to replace it")
        elif target.is_file() or any(target.iterdir()):
            raise DeploymentError(f"{target} already exists and is not empty")
    uid = uuid.uuid4().hex
    src = Path(binfo.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _copy_base_folder(src, tmp)
        for w in tmp.glob("*.safetensors"):
            w.chmod(0o644)
            fd = os.open(w, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        _control(tmp).mkdir()
        # The copy is hashed once, chunk by chunk (its state root); a base measured before needs nothing else,
        # one never measured (catalogs from before revision 0004) also gets its identity fingerprint checked in
        # the same pass, and its root recorded.
        base_root = ws.deployment_rows.base_state_root(binfo.id)
        state, ident = _measure(tmp, identity=base_root is None)
        root = state.root()
        if (base_root is None and ident != binfo.fingerprint) or (base_root is not None and root != base_root):
            raise BaseModelError(f"base {base!r} folder {src} no longer matches its registered fingerprint "
                                 f"({binfo.fingerprint[:12]}); its weights changed")
        if base_root is None:
            ws.deployment_rows.set_base_state_root(binfo.id, root)
        atomic_write_bytes(_state_file(tmp), state.to_bytes(root))
        _write_marker(tmp, name, uid, hid, "creating")
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("deploy.create.before-commit")
    try:
        ws.deployment_rows.add(name=name, base_id=binfo.id, path=str(target), rel_path=_rel_to_home(ws, target),
                               state_fingerprint=binfo.fingerprint, state_root=root, uid=uid, home_id=hid,
                               details={"base": base, "path": str(target)})
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):  # "creating" -> "ready"; if this is lost, the next write does it
        _write_marker(target, name, uid, hid, "ready")
    return get(ws, name)


def _is_orphan(ws: Workspace, m: dict[str, Any], name: str | None, hid: str,
               states: tuple[str, ...] = ("creating", "removing")) -> bool:
    """True if marker ``m`` is of this home's deployment ``name`` (any name when None), in one of ``states``, and
    has no catalog row: a create that crashed before its row, or a removal that crashed after deleting it
    (:func:`remove`)."""
    if m.get("state") not in states or (name is not None and m.get("name") != name) or m.get("home_id") != hid:
        return False
    uid = m.get("deployment_id")
    if not _is_id(uid):
        return False
    return not ws.deployment_rows.uid_exists(uid)


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


def verify(ws: Workspace, name: str, *, measure: bool = True) -> dict[str, Any]:
    """Re-hash the weights and compare with the recorded state fingerprint; check the folder's marker
    names this deployment and that every undo record the stack needs (to revert or roll back) is there,
    intact (its sha256 is the stack's) and of its layer.

    ``measure=False`` (a quick look, e.g. the web view's page): when the folder's state file gives the
    recorded root and no weights file's ``stat`` data changed since (nor is racily clean), the recorded root
    is reported without reading the weights (``"measured": False``); otherwise every byte is hashed as usual.
    Works on deployments of other homes too (read-only). Does not change anything.
    Returns: {"name", "ok", "expected", "actual" (state roots; the identity-style fingerprint for a row made
    before revision 0004 and not yet measured), "measured", "pending_recovery", "stack", "problems": [one-line
    strings], "read_only"}.
    """
    info = get(ws, name)
    problems = _folder_problems(info)
    pending = False
    wal = _wal(info.path)
    if wal.exists():
        try:
            doc = read_wal(wal)
        except DeploymentError:
            doc = None
        # A WAL whose operation is already recorded is a leftover of a completed operation, not pending work.
        pending = doc is None or not _committed(ws, name, doc)
    # A full measurement unless asked for a quick look whose stat checks pass (operations use the same checks).
    expected = info.state_root or info.state_fingerprint or ""
    actual = None
    if not measure and not problems and info.path.is_dir():
        st = _recorded_state(info)
        try:
            if st is not None and not st.stale_files(info.path):
                actual = info.state_root
        except StateFileError:
            actual = None
    was_measured = actual is None
    if actual is None:
        try:
            measured, ident = measure_folder(info.path, identity=info.state_root is None)
            actual = measured.root() if info.state_root is not None else str(ident)
        except AdapterHubError as e:
            actual = f"unreadable: {e}"
        except OSError as e:
            actual = f"unreadable: {e.strerror}"
    return {"name": name, "ok": actual == expected and not pending and not problems,
            "expected": expected, "actual": actual, "measured": was_measured, "pending_recovery": pending,
            "stack": [layer["ref"] for layer in info.stack], "problems": problems, "read_only": info.read_only}


def _folder_problems(info: DeploymentInfo) -> list[str]:
    """What is wrong with the marker and the undo records of ``info``'s folder (one line each)."""
    if not info.path.is_dir():
        return [f"deployment folder {info.path} is missing"]
    out = []
    try:
        m = _read_marker(info.path)
        if m is None:
            out.append(f"{info.path} has no deployment marker")
        elif info.uid is not None and (m.get("deployment_id") != info.uid or m.get("home_id") != info.home_id):
            out.append(f"{info.path} holds another deployment (its marker names {_short(m.get('name'))}, id "
                       f"{_short(m.get('deployment_id'))})")
    except DeploymentError as e:
        out.append(str(e))
    for layer in info.stack:
        try:
            _load_layer_undo(info.path, layer)
        except DeploymentError as e:
            out.append(str(e))
    return out


def why_not_ok(r: dict[str, Any]) -> str:
    """One line saying why a :func:`verify` result is not ok."""
    if r.get("problems"):
        more = len(r["problems"]) - 1
        return r["problems"][0] + (f" (and {more} more problem(s))" if more else "")
    if r.get("pending_recovery"):
        return "an interrupted operation is pending recovery (the next operation on it, or a repair, finishes it)"
    return f"weights {str(r['actual'])[:12]} do not match the recorded state {str(r['expected'])[:12]}"


def check_all(ws: Workspace) -> list[str]:
    """Problems of every deployment (``"deployment NAME: ..."``, one line each); empty when all verify.

    An interrupted operation pending recovery is not a problem here (its write-ahead log restores the
    recorded state exactly; the next command on it, or ``verify --repair``, does so), but a damaged or
    missing marker or undo record is, and so are weights that differ with no recovery pending.
    """
    out = []
    for d in list_deployments(ws):
        try:
            r = verify(ws, d.name)
        except (AdapterHubError, OSError) as e:
            out.append(f"deployment {d.name}: {' '.join(str(e).split()) or e.__class__.__name__}")
            continue
        if not r["ok"] and (r["problems"] or not r["pending_recovery"]):
            out.append(f"deployment {d.name}: {why_not_ok(r)}")
    return out


def remove_temp_files(ws: Workspace, *, dry_run: bool = False) -> int:
    """Remove temp files of interrupted writes (``.adapterhub/.*.tmp``, ``.adapterhub/undo/.*.tmp``) from this
    home's deployment folders, and the folders an interrupted ``deploy rm`` left in ``<home>/deployments``
    (each counted as one). Skips deployments of other homes, folders that are not provably theirs, and
    deployments busy with an operation (their temp files may be in use). Returns how many were (would be) removed.
    """
    hid = current_home_id(ws, create=False)
    n = _sweep_removed(ws, dry_run=dry_run)
    for d in list_deployments(ws):
        mine = d.home_id == hid if d.home_id is not None else _rel_to_home(ws, d.path) is not None
        ctl = _control(d.path)
        if hid is None or not mine or d.path.is_symlink() or ctl.is_symlink() or not ctl.is_dir():
            continue
        try:
            m = _read_marker(d.path)
            if m is None or m.get("deployment_id") != d.uid or m.get("home_id") != d.home_id:
                continue
            with _locked(d.path, blocking=False) as got:
                if not got:
                    continue
                for folder in (ctl, ctl / "undo"):
                    if folder.is_symlink() or not folder.is_dir():
                        continue
                    for f in folder.glob(".*.tmp"):
                        if f.is_symlink() or f.is_file():
                            n += 1
                            if not dry_run:
                                with contextlib.suppress(FileNotFoundError):
                                    f.unlink()
        except DeploymentError:
            continue  # a tampered folder: verify reports it
    return n


@dataclass
class Removed:
    """What :func:`remove` did: the record as it was, and what became of the folder."""

    info: DeploymentInfo
    folder: Literal["deleted", "kept", "already gone"]

    def to_json(self) -> dict[str, Any]:
        return {"removed": self.info.name, "path": str(self.info.path), "folder": self.folder,
                "stack": [layer["ref"] for layer in self.info.stack], "events": self.info.events}


def remove(ws: Workspace, name: str, *, keep_files: bool = False) -> Removed:
    """Remove deployment ``name``: its catalog row and history, and its folder.

    Only the home that created it may (see :func:`_writable`); the folder must be provably the deployment's (its
    marker names it and this home; no symlink is followed) and no other command may be working on it.
    ``keep_files``: an interrupted operation is recovered first, then only the control folder
    (``.adapterhub/``: state, undo records, lock) is deleted — the model files stay, a plain Hugging Face folder
    in the state of the last event. A folder already deleted by hand just has its row removed.

    Crash-safe: the marker says ``removing`` before the row is deleted; the row's deletion is the commit point;
    then the folder is renamed to a hidden ``.<name>.removing-<id>`` beside it and deleted. A folder left by a
    crash after the commit has no row: ``deploy create`` of the same name replaces it and ``gc`` deletes it.

    Returns: :class:`Removed`. Raises: DeploymentError (unknown, another home's, busy, tampered folder).
    """
    info = _writable(ws, name)
    path = info.path
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise DeploymentError(f"{path} is not the deployment's folder (a symlink or a file); refusing to remove it")
    hid = current_home_id(ws)
    if not path.exists():
        ws.deployment_rows.remove(name, info.uid)
        return Removed(info, "already gone")
    with _locked(path, blocking=False) as got:
        if not got:
            raise DeploymentError(f"deployment {name!r} is busy (another command is working on it); try again")
        info = _writable(ws, name, adopt=True)  # as it is now, under the lock (a row made before 0002 gets its id)
        uid = info.uid
        if uid is None:  # pragma: no cover - adopt gives every row of this home an id
            raise DeploymentError(f"deployment {name!r} has no id; refusing to remove it")
        if keep_files:
            info, _ = _prepare(ws, name, info)
        _write_marker(path, name, uid, hid, "removing")
        ws.deployment_rows.remove(name, uid)
        fault_point("deploy.remove.after-commit")
        if keep_files:
            shutil.rmtree(_control(path))
    if keep_files:
        return Removed(info, "kept")
    _delete_folder(path, uid)
    return Removed(info, "deleted")


def _delete_folder(path: Path, uid: str) -> None:
    """Rename a removed deployment's folder to a hidden name beside it, then delete it (never following a link).
    A concurrent ``gc`` may be deleting it too: what is already gone is not an error."""
    trash = path.parent / f".{path.name}.removing-{uid}"
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, trash)
        fsync_dir(path.parent)
    _rmtree(trash)


def _rmtree(p: Path) -> None:
    """``shutil.rmtree`` (links inside are removed, never followed) that skips what another process removed."""
    def gone(fn: Any, path: str, exc: Any) -> None:
        e = exc[1] if isinstance(exc, tuple) else exc  # onerror's (type, value, tb) or onexc's exception
        if not isinstance(e, FileNotFoundError):
            raise e

    if sys.version_info >= (3, 12):
        shutil.rmtree(p, onexc=gone)
    else:
        shutil.rmtree(p, onerror=gone)


def _sweep_removed(ws: Workspace, *, dry_run: bool) -> int:
    """Folders in ``<home>/deployments`` left by a removal that crashed after its commit: the folder, or its hidden
    ``.<name>.removing-<id>`` copy, whose marker says this home was removing it and whose id has no catalog row.
    (A ``creating`` folder without a row may be a create in progress: only ``deploy create`` of that name
    replaces it.) Returns how many were (would be) deleted."""
    hid = current_home_id(ws, create=False)
    d = ws.deployments_dir
    if hid is None or d.is_symlink() or not d.is_dir():
        return 0
    n = 0
    for f in sorted(d.iterdir()):
        if f.is_symlink() or not f.is_dir():
            continue
        try:
            m = _read_marker(f)
        except DeploymentError:
            continue
        if m is None or not _is_orphan(ws, m, None, hid, ("removing",)):
            continue
        if not f.name.startswith(".") and ws.deployment_rows.exists(f.name):
            continue  # a live deployment of that name (another folder's marker never decides a deletion of it)
        n += 1
        if not dry_run:
            _rmtree(f)
    return n


# -- state roots (adapterhub.apply.state) --------------------------------------------------------------


def _measure(folder: Path, *, identity: bool = False) -> tuple[FolderState, str | None]:
    """A full measurement of ``folder``'s weights, the ``stat`` data taken (after a clock reading) before the
    bytes are read, so a write during the hashing shows as a change next time."""
    pre = FolderState({}, {})
    pre.stamp(folder, [p.name for p in folder.glob("*.safetensors")])
    state, ident = measure_folder(folder, identity=identity)
    state.files = pre.files
    return state, ident


def _mismatch(name: str, actual: str, expected: str, where: str = "") -> DeploymentError:
    return DeploymentError(f"deployment {name!r} weights{where} do not match the recorded state ({actual[:12]} != "
                           f"{expected[:12]}): the file is corrupt or was changed outside adapterhub; nothing was changed")


def _recorded_state(info: DeploymentInfo) -> FolderState | None:
    """The folder's state file if its chunk hashes give the catalog's state root (recomputed, never taken from
    the file), else None."""
    if info.state_root is None:
        return None
    try:
        got = read_state_file(_state_file(info.path))
    except StateFileError:
        return None
    if got is None or got[0].root() != info.state_root:
        return None
    return got[0]


def _checked_state(ws: Workspace, info: DeploymentInfo, *, full: bool,
                   check: bool = True) -> tuple[FolderState, bool]:
    """The chunk hashes of ``info``'s weights, shown to be the catalog's recorded state before anything is written.

    ``full`` (``--verify``), a missing or stale state file, or a row made before revision 0004: a full
    measurement (a pre-0004 row is checked against its identity-style fingerprint, then gets its root).
    Otherwise the cheap check: files whose ``stat`` data changed (or are racily clean) are re-hashed in full
    and compared; ``check=False`` skips it. Returns (state, measured: every byte was hashed).
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
        new, ident = _measure(info.path, identity=info.state_root is None)
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
        new, _ = measure_folder(info.path, files=stale, base=st)
        root = new.root()
        if root != info.state_root:
            raise _mismatch(info.name, root, str(info.state_root), f" ({', '.join(stale)}, changed since the last operation)")
        new.files.update(pre.files)
        return new, False
    return st, False


def _layout_matches(state: FolderState, weights: WeightsFolder) -> bool:
    """The state's files and byte ranges are the weights' (they are not covered by the root)."""
    entries = weights.entries
    if set(entries) != set(state.tensors):
        return False
    for n, t in state.tensors.items():
        _, fname, b, e = weights.buffer(n)
        if (fname, b, e, entries[n][0], tuple(entries[n][1])) != (t.file, t.begin, t.end, t.dtype, tuple(t.shape)):
            return False
    return True


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


class _ChunkBook:
    """The state's chunk hashes through one operation: a revert puts back the hashes saved in the layer's undo
    record; chunks an apply wrote (or a revert whose record has none) are re-hashed once, at the end, from the
    memory-mapped weights — O(touched chunks), never the model."""

    def __init__(self, state: FolderState, weights: WeightsFolder) -> None:
        self.state = state
        self.weights = weights
        self.unknown: dict[str, set[int]] = {}

    def _chunks(self, name: str, idx: torch.Tensor) -> np.ndarray[Any, Any]:
        per = CHUNK // st_io.DTYPE_SIZES[self.state.tensors[name].dtype]
        a = idx.to(torch.int64).numpy() // per
        if a.size == 0:
            return a
        return a[np.concatenate(([True], a[1:] != a[:-1]))]  # indices are sorted: O(nnz)

    def restored(self, entries: Sequence[UndoEntry]) -> None:
        for e in entries:
            unk = self.unknown.setdefault(e.name, set())
            hashes = self.state.tensors[e.name].hashes
            touched = set(self._chunks(e.name, e.indices).tolist())
            if e.chunks is not None and e.chunk_hashes is not None:
                ids = e.chunks.numpy()
                if ids.size and (ids.min() < 0 or ids.max() >= len(hashes)):
                    unk.update(touched)
                    continue
                hashes[ids] = e.chunk_hashes.numpy()
                saved = set(ids.tolist())
                unk.difference_update(saved)
                unk.update(touched - saved)
            else:
                unk.update(touched)

    def applied(self, entries: Sequence[UndoEntry]) -> list[UndoEntry]:
        """The entries with the hashes of their chunks before the apply (those known), for the layer's record."""
        out = []
        for e in entries:
            unk = self.unknown.setdefault(e.name, set())
            ch = self._chunks(e.name, e.indices)
            ids = ch.tolist()
            # (nothing unknown in this tensor yet, the common case: every chunk's hash is known)
            known = ch.astype(np.int64) if not unk else np.array([c for c in ids if c not in unk], dtype=np.int64)
            pre = self.state.tensors[e.name].hashes[known]
            out.append(replace(e, chunks=torch.from_numpy(known), chunk_hashes=torch.from_numpy(np.ascontiguousarray(pre))))
            unk.update(ids)
        return out

    def hash_written(self, name: str, idx: torch.Tensor) -> tuple[list[int], list[bytes]]:
        """Digests of the chunks of ``name`` holding ``idx``, read now (the tensor's last write of the operation
        is done); stored by :meth:`finish`, so that the pre-apply hashes stay readable meanwhile."""
        buf, _, b, e = self.weights.buffer(name)
        return hash_chunks(buf, b, e, self._chunks(name, idx).tolist(), threads=False)

    def finish(self, early: dict[str, Future[tuple[list[int], list[bytes]]]] | None = None) -> str:
        """Re-hash the chunks whose hashes are unknown (those ``early`` hashed already are taken from it);
        returns the derived state root.

        Called once the patch is written (alongside the fsync): the background hasher's tensors it has not
        started yet are taken back (cancelled) and hashed here on every core, while it finishes the one it is
        on; its results are collected last."""
        early = dict(early or {})
        running = {n for n, f in early.items() if not f.cancel()}  # started or done: their results are used
        # every tensor the background hasher has not started, on one pool (all cores, however small each is)
        rest = sorted(n for n, unk in self.unknown.items() if unk and n not in running)
        jobs = [(*self._span(n), self.unknown[n]) for n in rest]
        for name, got in zip(rest, hash_chunk_sets(jobs), strict=True):
            self._store(name, *got)
        for name in sorted(running):
            ids, digests = early[name].result()
            self._store(name, ids, digests)
            left = self.unknown.get(name, set()) - set(ids)
            if left:
                self._store(name, *hash_chunk_sets([(*self._span(name), left)])[0])
        return root_of(self.state.tensors)

    def _span(self, name: str) -> tuple[Any, int, int]:
        buf, _, b, e = self.weights.buffer(name)
        return buf, b, e

    def _store(self, name: str, ids: list[int], digests: list[bytes]) -> None:
        if ids:
            self.state.tensors[name].hashes[ids] = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32)


# -- recovery --------------------------------------------------------------------------------------


def _committed(ws: Workspace, name: str, doc: dict[str, Any]) -> bool:
    """True if the catalog's latest event of ``name`` is the operation the WAL ``doc`` belongs to.

    This is the commit point of every operation: the WAL names its operation id from the moment it is
    written, and the event carrying that id is committed only after the new weights are fsynced.
    """
    op = doc.get("op_id")
    return isinstance(op, str) and ws.deployment_rows.last_op_id(name) == op


def _recover_locked(ws: Workspace, name: str) -> bool:
    """Finish or undo an interrupted operation (caller holds the lock). Returns True if it did anything."""
    info = get(ws, name)
    wal = _wal(info.path)
    if not wal.exists():
        return False
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


def recover(ws: Workspace, name: str) -> bool:
    """Recover deployment ``name`` from an interrupted operation, if any. Returns True if it did.

    Raises: DeploymentError if the deployment belongs to another home (see :func:`_writable`).
    """
    info = _writable(ws, name)
    with _locked(info.path):
        _writable(ws, name, adopt=True)
        return _recover_locked(ws, name)


def _gc_undo(path: Path, stack: Sequence[dict[str, Any]]) -> None:
    keep = {layer["undo"] for layer in stack}
    d = _control(path) / "undo"
    if not d.is_dir():
        return
    for f in d.iterdir():
        if f.name.endswith(".safetensors") and f.name[:-len(".safetensors")] not in keep:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


# -- operations ----------------------------------------------------------------------------------


@dataclass
class _ApplyStep:
    info: VersionInfo
    adapter: SparseAdapter
    scale: float


def _check_fit(weights: WeightsFolder, adapter: SparseAdapter, ref: str) -> None:
    entries = weights.entries
    for n, p in adapter.params.items():
        if n not in entries:
            raise BaseModelError(f"{ref}: parameter {n} is not a tensor of this deployment's weights")
        if entries[n][1] != p.shape:
            raise BaseModelError(f"{ref}: {n} has shape {p.shape}, the deployment's tensor is {entries[n][1]}")
        if entries[n][0] not in ST_DTYPES:
            raise BaseModelError(f"{ref}: {n} is a {entries[n][0]} tensor; only float tensors can be patched")


def _load_layer_undo(path: Path, layer: dict[str, Any]) -> list[UndoEntry]:
    """The undo entries of stack layer ``layer``: its record must exist (not a symlink), hash to the stack's
    ``undo`` digest, parse, and name the layer's ref and scale. Raises: DeploymentError (one line naming it)."""
    p = _undo_path(path, layer.get("undo"))
    ref = layer.get("ref")
    data = _read_nofollow(p)
    if data is None:
        raise DeploymentError(f"undo record of {ref} is missing ({p.name}); revert and rollback need it (the "
                              "deployment folder was tampered with)")
    if hashlib.sha256(data).hexdigest() != layer["undo"]:
        raise DeploymentError(f"undo record of {ref} is corrupt ({p.name}: its sha256 differs)")
    try:
        entries, doc = decode_undo(data)
    except DeploymentError:
        raise DeploymentError(f"undo record of {ref} is damaged ({p.name})") from None
    if doc.get("ref") != ref or doc.get("scale") != layer.get("scale"):
        raise DeploymentError(f"undo record {p.name} is of {doc.get('ref')!r} x{doc.get('scale')!r}, not of the "
                              f"stack's {ref} x{layer.get('scale')!r}")
    return entries


def _prepare(ws: Workspace, name: str, info: DeploymentInfo | None = None) -> tuple[DeploymentInfo, bool]:
    """Lock must be held. Recover, then check the recorded state still matches the files. ``info``: the record
    as read under the lock; with no WAL to recover it is current (not read again)."""
    if info is not None and not _wal(info.path).exists():
        if not info.path.is_dir():
            raise DeploymentError(f"deployment folder {info.path} is missing")
        info.recovered = False
        return info, False
    recovered = _recover_locked(ws, name)
    info = get(ws, name)
    info.recovered = recovered
    if not info.path.is_dir():
        raise DeploymentError(f"deployment folder {info.path} is missing")
    return info, recovered


def _execute(ws: Workspace, name: str, *, action: str, revert_layers: int = 0, applies: Sequence[_ApplyStep] = (),
             version_id: int | None = None, scale: float | None = None, details: dict[str, Any] | None = None,
             check: bool = True, verify: bool = False, fault: str | None = None,
             planned_on: Sequence[dict[str, Any]] | None = None, seen: DeploymentInfo | None = None) -> DeploymentInfo:
    """Revert the top ``revert_layers`` layers, then apply ``applies``, crash-safely; record the event.

    ``planned_on`` is the stack the caller planned against; if another process changed it
    meanwhile, the operation is refused (nothing changed) rather than applied to the wrong stack.
    ``check``: the cheap check of the weights against the recorded state (stat data; changed files re-hashed).
    ``verify``: measure instead — hash every byte before, and after the patch (must equal the derived root).
    ``seen``: the caller's :func:`_writable` record, read without the lock (it only says which folder to lock:
    everything is read again under it).
    """
    info = seen if seen is not None else _writable(ws, name)
    with _locked(info.path):
        info, recovered = _prepare(ws, name, _writable(ws, name, adopt=True))
        if planned_on is not None and [layer["undo"] for layer in planned_on] != [layer["undo"] for layer in info.stack]:
            raise DeploymentError(f"deployment {name!r} was changed by another command meanwhile; run it again")
        weights = WeightsFolder(info.path)  # parses headers: a corrupt/truncated file fails here, nothing changed
        try:
            for st in applies:
                _check_fit(weights, st.adapter, st.info.ref)
            state, _ = _checked_state(ws, info, full=verify, check=check)
            if not _layout_matches(state, weights):  # a state file out of step with the files: measure them
                state, _ = _checked_state(ws, info, full=True)
            stack = list(info.stack)
            if revert_layers > len(stack):
                raise DeploymentError("nothing to revert")
            undone = [(layer, _load_layer_undo(info.path, layer)) for layer in reversed(stack[len(stack) - revert_layers:])]
            touched: dict[str, list[torch.Tensor]] = {}
            for _, ents in undone:
                for e in ents:
                    touched.setdefault(e.name, []).append(e.indices)
            for st in applies:
                for n, p in st.adapter.params.items():
                    touched.setdefault(n, []).append(p.flat()[0])
            # NaN/inf (e.g. bf16 overflow, a huge --scale) refused before the WAL or any weight byte is written
            prepared = check_finite_plan(weights, [ents for _, ents in undone],
                                         [(st.adapter.params, st.scale, st.info.ref) for st in applies])
            op_id = uuid.uuid4().hex
            wal_meta = {"op_id": op_id, "action": action, "ref": (details or {}).get("ref")}
            book = _ChunkBook(state, weights)
            # A lone apply (nothing reverted first): its undo record holds the current bytes of every position the
            # patch writes, which is what the WAL must hold. It is written (fsynced) first and the WAL names it
            # instead of holding a second copy: one encode, one write and one fsync less.
            saved_in = early_record = None
            if not undone and len(applies) == 1 and set(prepared) == set(applies[0].adapter.params):
                saved_in = early_record = _early_record(info.path, book, applies[0], prepared)
            # A lone revert: the weights now hold the values the layer's apply wrote, which its record keeps (records
            # of earlier versions do not): the WAL names the record for them instead of gathering and writing them.
            current = _patched_values(undone) if not applies else None
            if current is not None:
                saved_in = undone[0][0]["undo"]
            # With one apply each tensor's last write is its patch: its chunks are hashed on a worker as soon as
            # it is patched, overlapping the rest of the patch, the undo records and the fsync. The worker reads
            # the memory map, so it is always joined before the map is closed.
            hasher = ThreadPoolExecutor(1) if len(applies) == 1 and not verify else None
            early: dict[str, Future[tuple[list[int], list[bytes]]]] = {}

            def on_patched(n: str, idx: torch.Tensor) -> None:
                if hasher is not None:
                    early[n] = hasher.submit(book.hash_written, n, idx)

            try:
                with DiskTransaction(weights, _wal(info.path), wal_meta, touched, prepared, saved_in=saved_in,
                                     saved_patched=current is not None, current=current) as tx:
                    new_stack, root = _patch(name, info, tx, book, undone, applies, stack, revert_layers, on_patched,
                                             early, fault=fault, verify=verify, saved_in=early_record)
                    state.stamp(info.path, {weights.file_of(n) for n in touched})  # fsync'ed files: final stat data
                    state.op_id = op_id
                    atomic_write_bytes(_state_next(info.path), state.to_bytes(root))
                    fault_point(f"deploy.{action}.before-commit")
                    ws.deployment_rows.add_event(name, action=action, version_id=version_id, scale=scale,
                                                 stack=new_stack,
                                                 state_fingerprint=ws.deployment_rows.known_fingerprint(name, root),
                                                 state_root=root, measured=verify,
                                                 details={**(details or {}), "op_id": op_id})
                    fault_point(f"deploy.{action}.after-commit")
                    _promote_state(info.path, op_id, ours=True)
            except Exception:
                if early_record is not None and not _wal(info.path).exists() and early_record not in {
                        layer["undo"] for layer in stack}:  # rolled back: no stack will name the early record
                    with contextlib.suppress(OSError):
                        _undo_path(info.path, early_record).unlink()
                raise
            finally:
                if hasher is not None:
                    hasher.shutdown(wait=True)
        finally:
            weights.close()
        _gc_undo(info.path, new_stack)
    out = get(ws, name)
    out.recovered = recovered
    return out


def _patch(name: str, info: DeploymentInfo, tx: DiskTransaction, book: _ChunkBook,
           undone: Sequence[tuple[dict[str, Any], list[UndoEntry]]], applies: Sequence[_ApplyStep],
           stack: list[dict[str, Any]], revert_layers: int, on_patched: Callable[[str, torch.Tensor], None],
           early: dict[str, Future[tuple[list[int], list[bytes]]]], *,
           fault: str | None, verify: bool, saved_in: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """The writes of :func:`_execute` inside its transaction, up to the durable weights (``tx.commit``).
    ``saved_in``: the digest of the lone apply's undo record, already written (:func:`_early_record`).
    Returns (the new stack, the new state root)."""
    for _, ents in undone:
        tx.restore(ents, fault=fault if fault and not applies else None)
        book.restored(ents)
    new_layers, records = [], []
    for st in applies:
        written = tx.apply(st.adapter.params, st.scale, fault=fault, on_patched=on_patched)
        if saved_in is not None:  # its record (and its chunk hashes) were taken before the patch
            digest = saved_in
        else:
            data = encode_undo(book.applied(written), {"ref": st.info.ref, "scale": st.scale})
            digest = hashlib.sha256(data).hexdigest()
            records.append((digest, data))
        new_layers.append({"ref": st.info.ref, "version_id": st.info.id,
                           "content_hash": st.info.content_hash, "scale": st.scale, "undo": digest})
    for digest, data in records:  # after the last patch, so a crash mid-patch leaves none behind
        atomic_write_bytes(_undo_path(info.path, digest), data)
    new_stack = stack[:len(stack) - revert_layers] + new_layers
    # After tx.commit() the weights are durable; from there the event naming op_id decides whether recovery
    # keeps them (see _committed), so an error past that point leaves the WAL for it.
    if verify:  # measured: every byte hashed again, and it must agree with the derivation
        root = book.finish()
        whole, _ = measure_folder(info.path)
        if whole.root() != root:
            raise DeploymentError(f"deployment {name!r}: the measured state {whole.root()[:12]} differs from "
                                  f"the derived {root[:12]} (the weights changed during the operation); "
                                  "nothing was changed")
        tx.commit()
    else:  # derived: the rest of the touched chunks re-hashed from the hot pages during the write-back
        pool = ThreadPoolExecutor(1)  # not the background hasher: finish takes back what that has not started
        derived = pool.submit(book.finish, early)
        try:
            tx.commit()
        finally:
            pool.shutdown(wait=True)  # it reads the memory map: never unmap it under the hasher
        root = derived.result()
    return new_stack, root


def _patched_values(undone: Sequence[tuple[dict[str, Any], list[UndoEntry]]]) -> dict[str, torch.Tensor] | None:
    """For a lone revert (one layer taken off, nothing applied): name -> the values the layer's apply wrote, from
    its record, when the record holds them for every entry (one entry per tensor); else None."""
    if len(undone) != 1:
        return None
    ents = undone[0][1]
    if not ents or len({e.name for e in ents}) != len(ents) or any(e.patched is None for e in ents):
        return None
    return {e.name: e.patched for e in ents if e.patched is not None}


def _early_record(path: Path, book: _ChunkBook, st: _ApplyStep,
                  prepared: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """Write (durably) the undo record of lone apply ``st`` before its patch: the positions, the original values
    :func:`check_finite_plan` gathered, and the chunk hashes before the patch. Returns its sha256 — the record
    the WAL names (:class:`DiskTransaction`'s ``saved_in``). The same bytes as a record written after the patch
    (the original and the patched values of every position, the chunk hashes before)."""
    ents = book.applied([UndoEntry(n, st.adapter.params[n].flat()[0], prepared[n][0], patched=prepared[n][1])
                         for n in sorted(st.adapter.params)])
    data = encode_undo(ents, {"ref": st.info.ref, "scale": st.scale})
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(_undo_path(path, digest), data)
    fault_point("undo.written")  # a crash here leaves a record no stack names: the next operation's gc removes it
    return digest


def _load_step(ws: Workspace, dep: DeploymentInfo, ref: str, scale: float) -> _ApplyStep:
    if not math.isfinite(scale):
        raise DeploymentError(f"scale must be a finite number, got {scale}")
    vinfo = ws.resolve(ref)
    if vinfo.base_fingerprint != dep.base_fingerprint:
        raise BaseModelError(f"{vinfo.ref} was made for base {vinfo.base!r} ({vinfo.base_fingerprint[:12]}); deployment "
                             f"{dep.name!r} serves base {dep.base!r} ({dep.base_fingerprint[:12]})")
    try:
        adapter = ws.load_adapter(vinfo)
    except FormatError as e:
        raise DeploymentError(f"{vinfo.ref}: {e}") from None
    return _ApplyStep(vinfo, adapter, float(scale))


def apply(ws: Workspace, name: str, ref: str, scale: float = 1.0, *, check: bool = True,
          verify: bool = False) -> DeploymentInfo:
    """Apply adapter ``ref`` on top of deployment ``name``'s stack, in place on disk.

    The new state root is derived from the chunks the patch touched; ``verify`` measures it instead (every
    weight byte hashed before and after; see :func:`_execute`).

    Raises: DeploymentError (unknown deployment, corrupt weights), RefError, BaseModelError (other base,
    shape mismatch). On any error the deployment is unchanged.
    """
    dep = _writable(ws, name)
    step = _load_step(ws, dep, ref, scale)
    return _execute(ws, name, action="apply", applies=[step], version_id=step.info.id, scale=step.scale,
                    details={"ref": step.info.ref}, check=check, verify=verify, fault="deploy.apply.mid-patch",
                    seen=dep)


def revert(ws: Workspace, name: str, ref: str | None = None, *, check: bool = True,
           verify: bool = False) -> DeploymentInfo:
    """Revert the top layer, or the topmost layer holding version ``ref`` (re-applying those above it).

    ``verify``: measure the resulting state instead of deriving it (as :func:`apply`).

    Raises: DeploymentError (empty stack, ref not applied, another home's deployment), RefError.
    """
    dep = _writable(ws, name)
    stack = dep.stack
    if not stack:
        raise DeploymentError(f"deployment {name!r} has no adapter applied")
    if ref is None:
        pos = len(stack) - 1
    else:
        vinfo = ws.resolve(ref)
        hits = [i for i, layer in enumerate(stack) if layer["version_id"] == vinfo.id]
        if not hits:
            raise DeploymentError(f"{vinfo.ref} is not applied to deployment {name!r} "
                                  f"(stack: {', '.join(layer['ref'] for layer in stack)})")
        pos = hits[-1]
    target = stack[pos]
    above = stack[pos + 1:]
    # name@N refs are immutable, so re-applying them gives exactly the same versions.
    steps = [_load_step(ws, dep, layer["ref"], layer["scale"]) for layer in above]
    return _execute(ws, name, action="revert", revert_layers=len(stack) - pos, applies=steps,
                    version_id=target["version_id"], scale=target["scale"],
                    details={"ref": target["ref"], "reapplied": [layer["ref"] for layer in above]}, check=check,
                    verify=verify,
                    fault="deploy.revert.mid-patch", planned_on=stack, seen=dep)


def rollback(ws: Workspace, name: str, to: int, *, check: bool = True, verify: bool = False) -> DeploymentInfo:
    """Restore the state after event ``to`` (its stack), exactly.

    ``verify`` (``rollback --verify``): measure — hash every weight byte before and after; the event records a
    measured state, and a rollback whose result differs from the derived root is undone.

    Raises: DeploymentError (unknown event, another home's deployment).
    """
    dep = _writable(ws, name)
    target = ws.deployment_rows.event_stack(name, to)
    if target is None:
        raise DeploymentError(f"deployment {name!r} has no event {to}")
    cur = dep.stack
    p = 0
    while p < min(len(cur), len(target)) and (cur[p]["content_hash"], cur[p]["scale"]) == (
            target[p]["content_hash"], target[p]["scale"]):
        p += 1
    steps = []
    for layer in target[p:]:
        st = _load_step(ws, dep, layer["ref"], layer["scale"])
        steps.append(st)
    return _execute(ws, name, action="rollback", revert_layers=len(cur) - p, applies=steps,
                    details={"to": to, "ref": None, "stack": [layer["ref"] for layer in target]}, check=check,
                    verify=verify,
                    fault="deploy.rollback.mid-patch", planned_on=cur, seen=dep)


def weights_path(ws: Workspace, name: str) -> Path:
    """Folder of the deployment (for evaluation: load it with transformers)."""
    return get(ws, name).path

"""Deployment folders without patching weights: ``create`` (copy and measure a base folder), ``remove``,
``verify``, the temp-file and leftover sweep of ``gc``, and the undo-record checks it shares with the
operations (:mod:`adapterhub.apply.deployments` patches; its docstring describes the model).

Torch-free: only the recovery of an interrupted operation (a write-ahead log left in the folder) imports torch
(:mod:`adapterhub.apply.deploy_recovery`) — ``deploy rm --keep-files`` of such a deployment.
An undo record (or a write-ahead log) is checked here as :func:`adapterhub.apply.disk.decode_undo` checks it,
without building its tensors (:func:`undo_doc`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import stat
import sys
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import st_io
from ..catalog.deployments import DeploymentInfo
from ..catalog.names import validate_name
from ..errors import AdapterHubError, BaseModelError, DeploymentError, FormatError, HeaderError
from ..faults import fault_point
from ..fsutil import atomic_write_bytes, fsync_dir, fsync_path
from ..gapcode import decode_gaps
from ..progress import Progress, counter
from ..safe_read import open_regular
from . import state as _state
from .deploy_ownership import (
    _committed,
    _control,
    _is_id,
    _locked,
    _measure,
    _read_marker,
    _read_nofollow,
    _recorded_state,
    _rel_to_home,
    _short,
    _state_file,
    _undo_path,
    _wal,
    _writable,
    _write_marker,
    current_home_id,
    get,
    list_deployments,
)
from .state import StateFileError, measure_folder, scheme_of

if TYPE_CHECKING:  # pragma: no cover

    from ..workspace import Workspace

__all__ = ["create", "remove", "Removed", "verify", "why_not_ok", "check_all", "remove_temp_files", "undo_doc",
           "rehash_base"]

_SKIP_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".gguf", ".onnx", ".ot"}


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


_COPY_STEP = 256 << 20  # bytes per copy_file_range call: the copy's progress moves at least this often


def _clone_file(fin: int, fout: int, on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Copy file ``fin`` into the empty file ``fout``: a reflink (copy-on-write clone, no data written) where
    the filesystem offers one, else ``copy_file_range`` (in-kernel, server-side on NFS), else a plain copy —
    ``cp --reflink=auto``'s order. ``on_bytes(n)``: ``n`` more bytes copied (progress)."""
    size = os.fstat(fin).st_size
    try:
        fcntl.ioctl(fout, _FICLONE, fin)
        on_bytes(size)
        return
    except OSError:
        pass
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(fin, fout, min(size - done, _COPY_STEP), done, done)
            if n == 0:
                break
            done += n
            on_bytes(n)
        if done == size:
            return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
            raise
    os.ftruncate(fout, 0)
    os.lseek(fin, 0, os.SEEK_SET)
    os.lseek(fout, 0, os.SEEK_SET)
    on_bytes(-done)  # started again from the first byte
    with os.fdopen(os.dup(fin), "rb") as a, os.fdopen(os.dup(fout), "wb") as b:
        while block := a.read(1 << 20):
            b.write(block)
            on_bytes(len(block))


def _copy_base_folder(src: Path, dst: Path, on_copied: Callable[[Path], None] | None = None,
                      on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Copy base folder ``src`` into the new deployment folder ``dst`` as real files only; ``on_copied(path)`` is
    called with each copied file's path as soon as it is written.

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
                    _clone_file(fin.fileno(), fout.fileno(), on_bytes)
            except OSError as e:
                raise DeploymentError(f"base folder {src}: cannot copy {rel} "
                                      f"({e.strerror or e.__class__.__name__})") from None
            if on_copied is not None:
                on_copied(d / item.name)

    walk(src, dst, 0)


def create(ws: Workspace, name: str, base: str, path: str | os.PathLike[str] | None = None, *,
           progress: Progress | None = None) -> DeploymentInfo:
    """Materialise base ``base`` as deployment ``name`` (a loadable HF folder).

    Takes: a Workspace, the deployment name, a registered base name, an optional target folder
    (default ``<home>/deployments/<name>``; must not exist or be empty — the only non-empty folder it
    replaces is the leftover of this home's own create that crashed before its catalog row), and a
    :data:`~adapterhub.progress.Progress` callback (``copying``, then ``hashing``).
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
    # Each weights file is fsynced on a worker as soon as it is copied: its write-back overlaps the copy of the
    # next file and the measurement, which read the same pages from the page cache. All are durable before the
    # state file is written.
    syncer = ThreadPoolExecutor(1)
    synced: list[Future[None]] = []
    # the total only sizes the bar: the top folder's files, as many as the copy accepts (it refuses what it must)
    copy_total = sum(_size_or_zero(f) for f in itertools.islice(src.iterdir(), _MAX_COPY_ENTRIES + 1)
                     if not f.name.startswith(".") and f.suffix.lower() not in _SKIP_SUFFIXES)
    on_bytes = counter(progress, "copying", copy_total)

    def on_copied(f: Path) -> None:
        if f.parent == tmp and f.suffix == ".safetensors":
            f.chmod(0o644)  # here, not on the worker: it changes the ctime, which the measurement records
            synced.append(syncer.submit(fsync_path, f))

    try:
        try:
            _copy_base_folder(src, tmp, on_copied, on_bytes)
            _control(tmp).mkdir()
            # The copy is hashed once, chunk by chunk (its state root); a base measured before needs nothing
            # else, one never measured (catalogs from before revision 0004) also gets its identity fingerprint
            # checked in the same pass, and its root recorded.
            base_root = ws.deployment_rows.base_state_root(binfo.id)  # its scheme is the deployment's for good
            state, ident = _measure(tmp, scheme=scheme_of(base_root), identity=base_root is None, progress=progress)
        finally:
            syncer.shutdown(wait=True)
        for fut in synced:
            fut.result()  # an fsync's error, if any
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


def rehash_base(ws: Workspace, base: str) -> dict[str, Any]:
    """Give base ``base`` a state root of the default scheme (BLAKE3) when the one it has is of an older scheme
    (sha256: measured before catalog revision 0008), so that its new deployments hash with it.

    The base's own folder is measured now (its files may be symlinks to regular files, as in a Hugging Face cache
    snapshot) and its identity fingerprint is checked in the same pass. Deployments made before keep their roots
    and their scheme: each follows its own root, and an empty stack's root stays the one their ``create`` event
    recorded with the base's fingerprint. A base never measured (no deployment yet) gets its root at its first
    ``deploy create``, as always: nothing to do.

    Returns: ``{"base", "previous", "state_root", "changed", "scheme", "deployments"}`` (the base's deployments,
    name -> the scheme of its root).
    Raises: NameError_ (unknown base), BaseModelError (the folder no longer matches the base's fingerprint),
    DeploymentError (unreadable files; the root changed meanwhile). Nothing is changed on any error.
    """
    binfo = ws.get_base(base)
    old = ws.deployment_rows.base_state_root(binfo.id)
    scheme = _state.DEFAULT_SCHEME
    deps = {d.name: scheme_of(d.state_root or old).name for d in ws.deployment_rows.list_all() if d.base_id == binfo.id}
    out: dict[str, Any] = {"base": binfo.name, "previous": old, "state_root": old, "changed": False,
                           "scheme": scheme.name, "deployments": deps}
    if old is None or scheme_of(old) is scheme:
        return out
    state, ident = measure_folder(Path(binfo.path), scheme=scheme, identity=True, follow_links=True)
    if ident != binfo.fingerprint:
        raise BaseModelError(f"base {binfo.name!r} folder {binfo.path} no longer matches its registered fingerprint "
                             f"({binfo.fingerprint[:12]}); its weights changed; nothing was changed")
    root = state.root()
    if not ws.deployment_rows.replace_base_state_root(binfo.id, old, root):
        raise DeploymentError(f"base {binfo.name!r}: its state root was changed by another command meanwhile; "
                              "run it again")
    out.update(state_root=root, changed=True)
    return out


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


def _size_or_zero(p: Path) -> int:
    """A regular file's size (a symlink's target's), else 0 (a folder, a device, a dangling link...)."""
    try:
        st = p.stat()
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def verify(ws: Workspace, name: str, *, measure: bool = True, progress: Progress | None = None) -> dict[str, Any]:
    """Re-hash the weights and compare with the recorded state fingerprint; check the folder's marker
    names this deployment and that every undo record the stack needs (to revert or roll back) is there,
    intact (its sha256 is the stack's) and of its layer.

    ``measure=False`` (a quick look, e.g. the web view's page): when the folder's state file gives the
    recorded root and no weights file's ``stat`` data changed since (nor is racily clean), the recorded root
    is reported without reading the weights (``"measured": False``); otherwise every byte is hashed as usual.
    Works on deployments of other homes too (read-only). Does not change anything. ``progress``: told of the
    hashing (:data:`~adapterhub.progress.Progress`).
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
            doc = _wal_doc(wal)
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
            measured, ident = measure_folder(info.path, scheme=scheme_of(info.state_root), progress=progress,
                                             identity=info.state_root is None)
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
            _check_layer_undo(info.path, layer)
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












# -- recovery --------------------------------------------------------------------------------------






def _prepare(ws: Workspace, name: str, info: DeploymentInfo | None = None) -> tuple[DeploymentInfo, bool]:
    """Lock must be held. Recover, then check the recorded state still matches the files. ``info``: the record
    as read under the lock; with no WAL to recover it is current (not read again). Only a WAL to recover imports
    :mod:`adapterhub.apply.deployments` (and torch)."""
    if info is not None and not _wal(info.path).exists():
        if not info.path.is_dir():
            raise DeploymentError(f"deployment folder {info.path} is missing")
        info.recovered = False
        return info, False
    from .deploy_recovery import _recover_locked  # rewrites weights: torch, only when there is something to recover

    recovered = _recover_locked(ws, name)
    info = get(ws, name)
    info.recovered = recovered
    if not info.path.is_dir():
        raise DeploymentError(f"deployment folder {info.path} is missing")
    return info, recovered


# -- undo records and write-ahead logs, checked without their tensors --------------------------------


def undo_doc(data: bytes) -> dict[str, Any]:
    """The JSON document of undo record (or write-ahead log) ``data``, after the checks
    :func:`adapterhub.apply.disk.decode_undo` makes — the strict header, the entry names, each entry's positions
    (plain int64, or gap-coded with matching escapes), its float values (original, and patched if saved) one per
    position, its chunk hashes 32 bytes per chunk — without building a tensor (no torch).

    Raises: DeploymentError("undo record is damaged") exactly where ``decode_undo`` raises it (a test compares
    the two on damaged records).
    """
    try:
        header = st_io.parse_header(data, "undo record")
        doc = json.loads(header.metadata["adapterhub.undo"])
        if not isinstance(doc, dict) or not isinstance(doc.get("names"), list):
            raise ValueError("no entry names")
        for i, name in enumerate(doc["names"]):
            if not isinstance(name, str):
                raise ValueError("an entry name is not a string")
            n = _positions(data, header, i)
            dtype = _values(header, f"{i:06d}.orig")
            if header.entries[f"{i:06d}.orig"].nbytes // st_io.DTYPE_SIZES[dtype] != n:
                raise ValueError("original values do not match their positions")
            if f"{i:06d}.new" in header.entries:
                new = _values(header, f"{i:06d}.new")
                if header.entries[f"{i:06d}.new"].nbytes // st_io.DTYPE_SIZES[new] != n or new != dtype:
                    raise ValueError("patched values do not match their positions")
            if f"{i:06d}.prehash" in header.entries:
                if _count(header, f"{i:06d}.prehash", "U8") != 32 * _count(header, f"{i:06d}.chunks", "I64"):
                    raise ValueError("chunk hashes do not match their chunks")
    except (HeaderError, FormatError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise DeploymentError("undo record is damaged") from None
    return doc


def _count(header: st_io.Header, key: str, dtype: str) -> int:
    """How many ``dtype`` values tensor ``key`` holds. Raises KeyError if absent, ValueError if of another dtype."""
    e = header.entries[key]
    if e.dtype != dtype:
        raise ValueError(f"{key} is {e.dtype}, not {dtype}")
    return e.nbytes // st_io.DTYPE_SIZES[dtype]


def _positions(data: bytes, header: st_io.Header, i: int) -> int:
    """How many positions entry ``i`` holds, its gap coding checked by the one decoder
    (:func:`adapterhub.gapcode.decode_gaps`: one escape per zero gap, each at least GAP_LIMIT)."""
    if f"{i:06d}.idx" in header.entries:
        return _count(header, f"{i:06d}.idx", "I64")
    n = _count(header, f"{i:06d}.gap", "U16")
    n_esc = _count(header, f"{i:06d}.esc", "I64")
    gaps = np.frombuffer(data, dtype="<u2", count=n, offset=header.data_start + header.entries[f"{i:06d}.gap"].begin)
    esc = np.frombuffer(data, dtype="<i8", count=n_esc,
                        offset=header.data_start + header.entries[f"{i:06d}.esc"].begin)
    decode_gaps(gaps, esc, "undo record")
    return n


def _values(header: st_io.Header, key: str) -> str:
    """The safetensors dtype of value list ``key`` (a 1-D float tensor). Raises KeyError, ValueError."""
    e = header.entries[key]
    if e.dtype not in st_io.FLOAT_DTYPES or len(e.shape) != 1:
        raise ValueError(f"{key} is not a list of float values")
    return str(e.dtype)


def _wal_doc(wal: Path) -> dict[str, Any] | None:
    """The write-ahead log's JSON document (as :func:`adapterhub.apply.disk.read_wal`), or None when there is none.
    Raises: DeploymentError if it is damaged."""
    if not wal.exists():
        return None
    return undo_doc(wal.read_bytes())


def _layer_record(path: Path, layer: dict[str, Any]) -> tuple[Path, bytes]:
    """The bytes of stack layer ``layer``'s undo record: it must exist (not a symlink) and hash to the stack's
    ``undo`` digest. Returns (its path, its bytes). Raises: DeploymentError (one line naming it)."""
    p = _undo_path(path, layer.get("undo"))
    ref = layer.get("ref")
    data = _read_nofollow(p)
    if data is None:
        raise DeploymentError(f"undo record of {ref} is missing ({p.name}); revert and rollback need it (the "
                              "deployment folder was tampered with)")
    if hashlib.sha256(data).hexdigest() != layer["undo"]:
        raise DeploymentError(f"undo record of {ref} is corrupt ({p.name}: its sha256 differs)")
    return p, data


def _check_layer_doc(p: Path, layer: dict[str, Any], doc: dict[str, Any]) -> None:
    """The record's document names the layer's ref and scale. Raises: DeploymentError."""
    ref = layer.get("ref")
    if doc.get("ref") != ref or doc.get("scale") != layer.get("scale"):
        raise DeploymentError(f"undo record {p.name} is of {doc.get('ref')!r} x{doc.get('scale')!r}, not of the "
                              f"stack's {ref} x{layer.get('scale')!r}")


def _check_layer_undo(path: Path, layer: dict[str, Any]) -> None:
    """What :func:`adapterhub.apply.deployments._load_layer_undo` checks of a layer's undo record, without
    building its tensors. Raises: DeploymentError (one line naming it)."""
    p, data = _layer_record(path, layer)
    try:
        doc = undo_doc(data)
    except DeploymentError:
        raise DeploymentError(f"undo record of {layer.get('ref')} is damaged ({p.name})") from None
    _check_layer_doc(p, layer, doc)

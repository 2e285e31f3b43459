"""Deployments: named, materialised Hugging Face model folders with a stack of applied adapters.

A deployment is a copy of a base folder (config, tokenizer, ``*.safetensors``) whose weights are
patched **in place** at the touched byte offsets only (memory-mapped). Every operation —
``create``, ``apply``, ``revert``, ``rollback``, ``recover`` — is a ``DeploymentEvent`` row
with the resulting state fingerprint (``adapterhub.models.fingerprint_folder``, the same hash as
a base fingerprint, so a deployment with an empty stack has its base's fingerprint) and stack.

Crash safety (DESIGN.md, "Exact apply and revert"): before the first byte changes, the original
bytes of every position the operation touches go to ``<dir>/.adapterhub/wal.safetensors``
(fsynced). The weights are patched and fsynced, each applied layer's own undo record is saved
(content-addressed, ``.adapterhub/undo/<sha256>.safetensors``), the WAL is marked ``done`` with
an operation id, the catalog event is committed, and the WAL is removed. The next command on the
deployment finds a leftover WAL and either keeps the new state (the catalog has the event with
that operation id) or writes the saved bytes back (it has not) — the last completed state, bit
for bit — and records a ``recover`` event.

Reverting a layer that is not on top reverts the layers above it, then re-applies them;
rolling back to an event reverts down to the common prefix of both stacks and applies the rest.
Either way the result equals applying the remaining stack to the base.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from sqlalchemy import func, select

from .catalog.models import Adapter, AdapterVersion, Deployment, DeploymentEvent, iso_utc
from .errors import AdapterHubError, BaseModelError, DeploymentError, FormatError
from .format import SparseAdapter
from .models import fingerprint_folder
from .names import validate_name
from .patching import (DiskTransaction, UndoEntry, WeightsFolder, decode_undo, encode_undo, fault_point, read_wal,
                       recover_wal, write_atomic)

__all__ = ["DeploymentInfo", "EventInfo", "create", "get", "list_deployments", "apply", "revert", "rollback",
           "history", "verify", "recover", "CONTROL_DIR"]

CONTROL_DIR = ".adapterhub"
_SKIP_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".gguf", ".onnx", ".ot"}


@dataclass
class EventInfo:
    """One deployment event as history shows it."""

    seq: int
    action: str
    ref: str | None
    scale: float | None
    state_fingerprint: str
    stack: list[dict[str, Any]]
    details: dict[str, Any]
    created_at: dt.datetime | None
    content_hash: str | None = None  # the applied/reverted version's sha256
    kind: str | None = None  # its adapter kind (expert, merge, unlearning, ...)
    forget: str | None = None  # an unlearning version's forget spec, e.g. "class:NUM"

    def to_json(self) -> dict[str, Any]:
        return {"event": self.seq, "action": self.action, "ref": self.ref, "scale": self.scale,
                "content_hash": self.content_hash, "kind": self.kind, "forget": self.forget,
                "state_fingerprint": self.state_fingerprint, "stack": [layer["ref"] for layer in self.stack],
                "details": self.details, "time": iso_utc(self.created_at)}


@dataclass
class DeploymentInfo:
    """A deployment's current record."""

    name: str
    base: str
    base_fingerprint: str
    path: Path
    state_fingerprint: str
    stack: list[dict[str, Any]]
    events: int
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    recovered: bool = False
    last_event: EventInfo | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "base_fingerprint": self.base_fingerprint, "path": str(self.path),
                "state_fingerprint": self.state_fingerprint, "stack": [dict(layer) for layer in self.stack],
                "events": self.events, "created_at": iso_utc(self.created_at), "updated_at": iso_utc(self.updated_at),
                "recovered": self.recovered}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _control(path: Path) -> Path:
    return path / CONTROL_DIR


def _wal(path: Path) -> Path:
    return _control(path) / "wal.safetensors"


def _undo_path(path: Path, digest: str) -> Path:
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DeploymentError(f"invalid undo record id {digest!r} in the deployment's stack")
    return _control(path) / "undo" / f"{digest}.safetensors"


def _refuse_symlinks(path: Path) -> None:
    """A deployment folder, its weight files and its control folder must be real files of ours: a symlink
    planted there would make a patch (or a recovery) write through it, outside the home."""
    suspects = [path, _control(path), _control(path) / "undo", _wal(path)]
    if path.is_dir() and not path.is_symlink():
        suspects += sorted(path.glob("*.safetensors"))
    for p in suspects:
        if p.is_symlink():
            raise DeploymentError(f"{p} is a symlink; refusing to patch through it (the deployment folder was tampered with)")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on a deployment (one operation at a time); refuses symlinked folders and files."""
    _refuse_symlinks(path)
    ctl = _control(path)
    ctl.mkdir(parents=True, exist_ok=True)
    fd = os.open(ctl / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- create / read -------------------------------------------------------------------------------


def create(ws: Any, name: str, base: str, path: str | os.PathLike[str] | None = None) -> DeploymentInfo:
    """Materialise base ``base`` as deployment ``name`` (a loadable HF folder).

    Takes: a Workspace, the deployment name, a registered base name, an optional target folder
    (default ``<home>/deployments/<name>``; must not exist or be empty).
    Returns: the new DeploymentInfo (stack empty, state fingerprint == base fingerprint).
    Raises: NameError_, BaseModelError (unknown base, or its folder no longer matches its
    fingerprint), DeploymentError (name taken, target folder not empty).
    """
    validate_name(name, "deployment name")
    binfo = ws.get_base(base)
    with ws.session() as s:
        if s.scalar(select(Deployment).where(Deployment.name == name)) is not None:
            raise DeploymentError(f"deployment {name!r} already exists")
    target = Path(path).expanduser().absolute() if path else ws.deployments_dir / name
    if target.is_symlink():
        raise DeploymentError(f"{target} is a symlink; refusing to create a deployment through it")
    if target.exists():
        marker = _control(target) / "deployment.json"
        orphan = marker.is_file() and marker.read_text().strip() == name
        if orphan:  # a create that crashed before its catalog row: ours to replace
            shutil.rmtree(target)
        elif target.is_file() or any(target.iterdir()):
            raise DeploymentError(f"{target} already exists and is not empty")
    src = Path(binfo.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for item in sorted(src.iterdir()):
            if item.name.startswith(".") or item.suffix.lower() in _SKIP_SUFFIXES:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, ignore=shutil.ignore_patterns(*[f"*{x}" for x in _SKIP_SUFFIXES]))
            else:
                shutil.copy2(item, tmp / item.name)
        for w in tmp.glob("*.safetensors"):
            w.chmod(0o644)
            fd = os.open(w, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fp = fingerprint_folder(tmp)
        if fp != binfo.fingerprint:
            raise BaseModelError(f"base {base!r} folder {src} no longer matches its registered fingerprint "
                                 f"({binfo.fingerprint[:12]}); its weights changed")
        _control(tmp).mkdir()
        write_atomic(_control(tmp) / "deployment.json", name.encode())
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("deploy.create.before-commit")
    try:
        with ws.session() as s:
            row = Deployment(name=name, base_id=binfo.id, path=str(target), state_fingerprint=fp, stack=[],
                             created_at=_now(), updated_at=_now())
            s.add(row)
            s.flush()
            s.add(DeploymentEvent(deployment_id=row.id, seq=0, action="create", version_id=None, scale=None, stack=[],
                                  state_fingerprint=fp, details={"base": base, "path": str(target)}, created_at=_now()))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return get(ws, name)


def _row(s: Any, name: str) -> Deployment:
    row = s.scalar(select(Deployment).where(Deployment.name == name))
    if row is None:
        known = ", ".join(s.scalars(select(Deployment.name).order_by(Deployment.name)).all()) or "none"
        raise DeploymentError(f"unknown deployment {name!r} (known: {known})")
    return row


def _info(s: Any, row: Deployment) -> DeploymentInfo:
    n = s.scalar(select(func.count()).select_from(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id))
    return DeploymentInfo(row.name, row.base.name, row.base.fingerprint, Path(row.path), row.state_fingerprint or "",
                          list(row.stack or []), int(n or 0), row.created_at, row.updated_at)


def get(ws: Any, name: str) -> DeploymentInfo:
    """The deployment record (no recovery, no file access). Raises DeploymentError if unknown."""
    with ws.session() as s:
        return _info(s, _row(s, name))


def list_deployments(ws: Any) -> list[DeploymentInfo]:
    """All deployments, by name."""
    with ws.session() as s:
        return [_info(s, r) for r in s.scalars(select(Deployment).order_by(Deployment.name))]


def history(ws: Any, name: str) -> list[EventInfo]:
    """Events of a deployment, oldest first, each with its version's content hash, kind and forget spec."""
    with ws.session() as s:
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


def _event(e: DeploymentEvent, about: tuple[str, str, str | None] | None = None) -> EventInfo:
    d = dict(e.details or {})
    chash, kind, forget = about or (None, None, None)
    return EventInfo(e.seq, e.action, d.get("ref"), e.scale, e.state_fingerprint, list(e.stack or []), d, e.created_at,
                     chash, kind, forget)


def verify(ws: Any, name: str) -> dict[str, Any]:
    """Re-hash the weights and compare with the recorded state fingerprint.

    Returns: {"name", "ok", "expected", "actual", "pending_recovery"}. Does not change anything.
    """
    info = get(ws, name)
    pending = False
    wal = _wal(info.path)
    if wal.exists():
        try:
            doc = read_wal(wal)
        except DeploymentError:
            doc = None
        # A WAL whose operation is already recorded is a leftover of a completed operation, not pending work.
        pending = doc is None or not _committed(ws, name, doc)
    try:
        actual = fingerprint_folder(info.path)
    except AdapterHubError as e:
        actual = f"unreadable: {e}"
    except OSError as e:
        actual = f"unreadable: {e.strerror}"
    return {"name": name, "ok": actual == info.state_fingerprint and not pending, "expected": info.state_fingerprint,
            "actual": actual, "pending_recovery": pending, "stack": [layer["ref"] for layer in info.stack]}


# -- recovery --------------------------------------------------------------------------------------


def _committed(ws: Any, name: str, doc: dict[str, Any]) -> bool:
    """True if the catalog's latest event of ``name`` is the operation the WAL ``doc`` belongs to."""
    with ws.session() as s:
        row = _row(s, name)
        last = s.scalar(select(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id)
                        .order_by(DeploymentEvent.seq.desc()).limit(1))
        return last is not None and (last.details or {}).get("op_id") == doc.get("op_id")


def _recover_locked(ws: Any, name: str) -> bool:
    """Finish or undo an interrupted operation (caller holds the lock). Returns True if it did anything."""
    info = get(ws, name)
    wal = _wal(info.path)
    if not wal.exists():
        return False
    doc = read_wal(wal)
    assert doc is not None
    if _committed(ws, name, doc):
        wal.unlink()
        _gc_undo(info.path, info.stack)
        return True
    weights = WeightsFolder(info.path)
    try:
        recover_wal(weights, wal)
    finally:
        weights.close()
    fp = fingerprint_folder(info.path)
    if fp != info.state_fingerprint:
        raise DeploymentError(f"deployment {name!r}: after undoing an interrupted {doc.get('action', 'operation')} the "
                              f"weights do not match the recorded state ({fp[:12]} != {info.state_fingerprint[:12]}); "
                              "the weights file was changed outside adapterhub")
    with ws.session() as s:
        row = _row(s, name)
        seq = _next_seq(s, row)
        s.add(DeploymentEvent(deployment_id=row.id, seq=seq, action="recover", version_id=None, scale=None,
                              stack=list(row.stack or []), state_fingerprint=fp,
                              details={"interrupted": doc.get("action"), "op_id": doc.get("op_id"),
                                       "ref": doc.get("ref")}, created_at=_now()))
        row.updated_at = _now()
    _gc_undo(info.path, info.stack)
    return True


def recover(ws: Any, name: str) -> bool:
    """Recover deployment ``name`` from an interrupted operation, if any. Returns True if it did."""
    info = get(ws, name)
    with _locked(info.path):
        return _recover_locked(ws, name)


def _next_seq(s: Any, row: Deployment) -> int:
    return int(s.scalar(select(func.max(DeploymentEvent.seq)).where(DeploymentEvent.deployment_id == row.id)) or 0) + 1


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
    info: Any  # VersionInfo
    adapter: SparseAdapter
    scale: float


def _check_fit(weights: WeightsFolder, adapter: SparseAdapter, ref: str) -> None:
    entries = weights.entries
    for n, p in adapter.params.items():
        if n not in entries:
            raise BaseModelError(f"{ref}: parameter {n} is not a tensor of this deployment's weights")
        if entries[n][1] != p.shape:
            raise BaseModelError(f"{ref}: {n} has shape {p.shape}, the deployment's tensor is {entries[n][1]}")
        if entries[n][0] not in ("F32", "F16", "BF16", "F64"):
            raise BaseModelError(f"{ref}: {n} is a {entries[n][0]} tensor; only float tensors can be patched")


def _load_layer_undo(path: Path, layer: dict[str, Any]) -> list[UndoEntry]:
    p = _undo_path(path, layer["undo"])
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise DeploymentError(f"undo record of {layer['ref']} is missing ({p.name}); the deployment folder was "
                              "tampered with") from None
    if hashlib.sha256(data).hexdigest() != layer["undo"]:
        raise DeploymentError(f"undo record of {layer['ref']} is corrupt ({p.name})")
    return decode_undo(data)[0]


def _prepare(ws: Any, name: str) -> tuple[DeploymentInfo, bool]:
    """Lock must be held. Recover, then check the recorded state still matches the files."""
    recovered = _recover_locked(ws, name)
    info = get(ws, name)
    info.recovered = recovered
    if not info.path.is_dir():
        raise DeploymentError(f"deployment folder {info.path} is missing")
    return info, recovered


def _execute(ws: Any, name: str, *, action: str, revert_layers: int = 0, applies: Sequence[_ApplyStep] = (),
             version_id: int | None = None, scale: float | None = None, details: dict[str, Any] | None = None,
             check: bool = True, fault: str | None = None,
             planned_on: Sequence[dict[str, Any]] | None = None) -> DeploymentInfo:
    """Revert the top ``revert_layers`` layers, then apply ``applies``, crash-safely; record the event.

    ``planned_on`` is the stack the caller planned against; if another process changed it
    meanwhile, the operation is refused (nothing changed) rather than applied to the wrong stack.
    """
    info = get(ws, name)
    with _locked(info.path):
        info, recovered = _prepare(ws, name)
        if planned_on is not None and [layer["undo"] for layer in planned_on] != [layer["undo"] for layer in info.stack]:
            raise DeploymentError(f"deployment {name!r} was changed by another command meanwhile; run it again")
        weights = WeightsFolder(info.path)  # parses headers: a corrupt/truncated file fails here, nothing changed
        try:
            for st in applies:
                _check_fit(weights, st.adapter, st.info.ref)
            if check:
                actual = fingerprint_folder(info.path)
                if actual != info.state_fingerprint:
                    raise DeploymentError(
                        f"deployment {name!r} weights do not match the recorded state ({actual[:12]} != "
                        f"{info.state_fingerprint[:12]}): the file is corrupt or was changed outside adapterhub; "
                        "nothing was changed")
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
            op_id = uuid.uuid4().hex
            tx = DiskTransaction(weights, _wal(info.path), {"op_id": op_id, "action": action,
                                                            "ref": (details or {}).get("ref")})
            tx.begin(touched)
            for _, ents in undone:
                tx.restore(ents, fault=fault if fault and not applies else None)
            new_layers = []
            for st in applies:
                ents = tx.apply(st.adapter.params, st.scale, fault=fault)
                data = encode_undo(ents, {"ref": st.info.ref, "scale": st.scale})
                digest = hashlib.sha256(data).hexdigest()
                new_layers.append({"ref": st.info.ref, "version_id": st.info.id, "content_hash": st.info.content_hash,
                                   "scale": st.scale, "undo": digest, "_data": data})
            tx.sync()
            for layer in new_layers:
                write_atomic(_undo_path(info.path, layer["undo"]), layer.pop("_data"))
            new_stack = stack[:len(stack) - revert_layers] + new_layers
            fp = fingerprint_folder(info.path)
            tx.mark_done({"state_fingerprint": fp})
            fault_point(f"deploy.{action}.before-commit")
            with ws.session() as s:
                row = _row(s, name)
                seq = _next_seq(s, row)
                s.add(DeploymentEvent(deployment_id=row.id, seq=seq, action=action, version_id=version_id, scale=scale,
                                      stack=new_stack, state_fingerprint=fp,
                                      details={**(details or {}), "op_id": op_id}, created_at=_now()))
                row.stack = new_stack
                row.state_fingerprint = fp
                row.updated_at = _now()
            fault_point(f"deploy.{action}.after-commit")
            tx.finish()
        finally:
            weights.close()
        _gc_undo(info.path, new_stack)
    out = get(ws, name)
    out.recovered = recovered
    return out


def _load_step(ws: Any, dep: DeploymentInfo, ref: str, scale: float) -> _ApplyStep:
    import math

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


def apply(ws: Any, name: str, ref: str, scale: float = 1.0, *, check: bool = True) -> DeploymentInfo:
    """Apply adapter ``ref`` on top of deployment ``name``'s stack, in place on disk.

    Raises: DeploymentError (unknown deployment, corrupt weights), RefError, BaseModelError (other base,
    shape mismatch). On any error the deployment is unchanged.
    """
    dep = get(ws, name)
    step = _load_step(ws, dep, ref, scale)
    return _execute(ws, name, action="apply", applies=[step], version_id=step.info.id, scale=step.scale,
                    details={"ref": step.info.ref}, check=check, fault="deploy.apply.mid-patch")


def revert(ws: Any, name: str, ref: str | None = None, *, check: bool = True) -> DeploymentInfo:
    """Revert the top layer, or the topmost layer holding version ``ref`` (re-applying those above it).

    Raises: DeploymentError (empty stack, ref not applied), RefError.
    """
    dep = get(ws, name)
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
                    fault="deploy.revert.mid-patch", planned_on=stack)


def rollback(ws: Any, name: str, to: int, *, check: bool = True) -> DeploymentInfo:
    """Restore the state after event ``to`` (its stack), exactly.

    Raises: DeploymentError (unknown event).
    """
    dep = get(ws, name)
    with ws.session() as s:
        row = _row(s, name)
        ev = s.scalar(select(DeploymentEvent).where(DeploymentEvent.deployment_id == row.id, DeploymentEvent.seq == to))
        if ev is None:
            raise DeploymentError(f"deployment {name!r} has no event {to}")
        target = list(ev.stack or [])
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
                    fault="deploy.rollback.mid-patch", planned_on=cur)


def weights_path(ws: Any, name: str) -> Path:
    """Folder of the deployment (for evaluation: load it with transformers)."""
    return get(ws, name).path


ProgressFn = Callable[[int, int], None]

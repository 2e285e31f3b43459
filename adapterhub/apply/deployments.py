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

Modules: this one patches weights (apply, revert, rollback, recover) and imports torch (a tensor container
for the positions and values it writes). Everything that does not patch — where a deployment lives and who owns
it (:mod:`adapterhub.apply.deploy_ownership`: markers, home id, locks, get, list, history) and its folder's
life (:mod:`adapterhub.apply.deploy_folders`: create, remove, verify, gc's sweep) — is torch-free, so the CLI's
read and bookkeeping commands start without torch; their public names are re-exported here.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import st_io
from ..catalog.deployments import DeploymentInfo, EventInfo
from ..errors import BaseModelError, DeploymentError, FormatError
from ..faults import fault_point
from ..format import SparseAdapter
from ..fsutil import atomic_write_bytes
from ..progress import Count, Progress, counter, quiet
from .deploy_folders import (
    Removed,
    _check_layer_doc,
    _layer_record,
    _prepare,
    check_all,
    create,
    rehash_base,
    remove,
    remove_temp_files,
    verify,
    why_not_ok,
)
from .deploy_ownership import (
    CONTROL_DIR,
    HOME_ID_FILE,
    _checked_state,
    _gc_undo,
    _locked,
    _promote_state,
    _state_next,
    _undo_path,
    _wal,
    _writable,
    current_home_id,
    get,
    history,
    list_deployments,
    weights_path,
)
from .deploy_recovery import recover
from .disk import (
    ST_DTYPES,
    DiskTransaction,
    WeightsFolder,
    check_finite_plan,
    decode_undo,
    encode_undo,
)
from .patching import UndoEntry
from .state import (
    CHUNK,
    FolderState,
    hash_chunk_sets,
    hash_chunks,
    measure_folder,
    root_of,
    short_root,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..workspace import Workspace

__all__ = ["DeploymentInfo", "EventInfo", "create", "get", "list_deployments", "apply", "revert", "rollback", "remove", "Removed",
           "history", "verify", "recover", "check_all", "remove_temp_files", "current_home_id", "why_not_ok",
           "weights_path", "CONTROL_DIR", "HOME_ID_FILE", "rehash_base"]



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
        return hash_chunks(buf, b, e, self._chunks(name, idx).tolist(), scheme=self.state.scheme, threads=False)

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
        for name, got in zip(rest, hash_chunk_sets(jobs, scheme=self.state.scheme), strict=True):
            self._store(name, *got)
        for name in sorted(running):
            ids, digests = early[name].result()
            self._store(name, ids, digests)
            left = self.unknown.get(name, set()) - set(ids)
            if left:
                self._store(name, *hash_chunk_sets([(*self._span(name), left)], scheme=self.state.scheme)[0])
        return root_of(self.state.tensors, self.state.scheme)

    def _span(self, name: str) -> tuple[Any, int, int]:
        buf, _, b, e = self.weights.buffer(name)
        return buf, b, e

    def _store(self, name: str, ids: list[int], digests: list[bytes]) -> None:
        if ids:
            self.state.tensors[name].hashes[ids] = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, 32)




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
    ``undo`` digest, parse, and name the layer's ref and scale (as ``deploy verify`` checks it without its tensors,
    :func:`adapterhub.apply.deploy_folders._check_layer_undo`). Raises: DeploymentError (one line naming it)."""
    p, data = _layer_record(path, layer)
    try:
        entries, doc = decode_undo(data)
    except DeploymentError:
        raise DeploymentError(f"undo record of {layer.get('ref')} is damaged ({p.name})") from None
    _check_layer_doc(p, layer, doc)
    return entries


def _execute(ws: Workspace, name: str, *, action: str, revert_layers: int = 0, applies: Sequence[_ApplyStep] = (),
             version_id: int | None = None, scale: float | None = None, details: dict[str, Any] | None = None,
             check: bool = True, verify: bool = False, fault: str | None = None,
             planned_on: Sequence[dict[str, Any]] | None = None, seen: DeploymentInfo | None = None,
             progress: Progress | None = None) -> DeploymentInfo:
    """Revert the top ``revert_layers`` layers, then apply ``applies``, crash-safely; record the event.

    ``planned_on`` is the stack the caller planned against; if another process changed it
    meanwhile, the operation is refused (nothing changed) rather than applied to the wrong stack.
    ``check``: the cheap check of the weights against the recorded state (stat data; changed files re-hashed).
    ``verify``: measure instead — hash every byte before, and after the patch (must equal the derived root).
    ``seen``: the caller's :func:`_writable` record, read without the lock (it only says which folder to lock:
    everything is read again under it). ``progress``: told the phases (:mod:`adapterhub.progress`).
    """
    report = progress or quiet
    info = seen if seen is not None else _writable(ws, name)
    with _locked(info.path):
        info, recovered = _prepare(ws, name, _writable(ws, name, adopt=True))
        if planned_on is not None and [layer["undo"] for layer in planned_on] != [layer["undo"] for layer in info.stack]:
            raise DeploymentError(f"deployment {name!r} was changed by another command meanwhile; run it again")
        weights = WeightsFolder(info.path)  # parses headers: a corrupt/truncated file fails here, nothing changed
        try:
            for st in applies:
                _check_fit(weights, st.adapter, st.info.ref)
            report("checking", 0, 0)
            state, _ = _checked_state(ws, info, full=verify, check=check, progress=progress)
            if not _layout_matches(state, weights):  # a state file out of step with the files: measure them
                state, _ = _checked_state(ws, info, full=True, progress=progress)
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

            steps = sum(len(ents) for _, ents in undone) + sum(len(st.adapter.params) for st in applies)
            count: Count  # made inside the transaction (below): "patching" starts there

            def on_patched(n: str, idx: torch.Tensor) -> None:
                if hasher is not None:
                    early[n] = hasher.submit(book.hash_written, n, idx)
                count(1)

            try:
                with DiskTransaction(weights, _wal(info.path), wal_meta, touched, prepared, saved_in=saved_in,
                                     saved_patched=current is not None, current=current) as tx:
                    count = counter(report, "patching", steps)
                    new_stack, root = _patch(name, info, tx, book, undone, applies, stack, revert_layers, on_patched,
                                             early, fault=fault, verify=verify, saved_in=early_record, count=count,
                                             progress=report)
                    report("recording", 0, 0)
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
           fault: str | None, verify: bool, saved_in: str | None = None, count: Callable[[int], None] = lambda n: None,
           progress: Progress = quiet) -> tuple[list[dict[str, Any]], str]:
    """The writes of :func:`_execute` inside its transaction, up to the durable weights (``tx.commit``).
    ``saved_in``: the digest of the lone apply's undo record, already written (:func:`_early_record`); ``count(n)``:
    ``n`` more tensors patched (an apply's are counted by ``on_patched``); ``progress``: the later phases.
    Returns (the new stack, the new state root)."""
    for _, ents in undone:
        tx.restore(ents, fault=fault if fault and not applies else None)
        book.restored(ents)
        count(len(ents))
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
        whole, _ = measure_folder(info.path, scheme=book.state.scheme, progress=progress)
        if whole.root() != root:
            raise DeploymentError(f"deployment {name!r}: the measured state {short_root(whole.root())} differs from "
                                  f"the derived {short_root(root)} (the weights changed during the operation); "
                                  "nothing was changed")
        progress("writing back", 0, 0)
        tx.commit()
    else:  # derived: the rest of the touched chunks re-hashed from the hot pages during the write-back
        pool = ThreadPoolExecutor(1)  # not the background hasher: finish takes back what that has not started
        derived = pool.submit(book.finish, early)
        try:
            progress("writing back", 0, 0)
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
          verify: bool = False, progress: Progress | None = None) -> DeploymentInfo:
    """Apply adapter ``ref`` on top of deployment ``name``'s stack, in place on disk.

    The new state root is derived from the chunks the patch touched; ``verify`` measures it instead (every
    weight byte hashed before and after; see :func:`_execute`). ``progress``: told the phases
    (:data:`~adapterhub.progress.Progress`).

    Raises: DeploymentError (unknown deployment, corrupt weights), RefError, BaseModelError (other base,
    shape mismatch). On any error the deployment is unchanged.
    """
    dep = _writable(ws, name)
    step = _load_step(ws, dep, ref, scale)
    return _execute(ws, name, action="apply", applies=[step], version_id=step.info.id, scale=step.scale,
                    details={"ref": step.info.ref}, check=check, verify=verify, fault="deploy.apply.mid-patch",
                    seen=dep, progress=progress)


def revert(ws: Workspace, name: str, ref: str | None = None, *, check: bool = True,
           verify: bool = False, progress: Progress | None = None) -> DeploymentInfo:
    """Revert the top layer, or the topmost layer holding version ``ref`` (re-applying those above it).

    ``verify``: measure the resulting state instead of deriving it (as :func:`apply`); ``progress`` as there.

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
                    fault="deploy.revert.mid-patch", planned_on=stack, seen=dep, progress=progress)


def rollback(ws: Workspace, name: str, to: int, *, check: bool = True, verify: bool = False,
             progress: Progress | None = None) -> DeploymentInfo:
    """Restore the state after event ``to`` (its stack), exactly.

    ``verify`` (``rollback --verify``): measure — hash every weight byte before and after; the event records a
    measured state, and a rollback whose result differs from the derived root is undone. ``progress``: as
    :func:`apply`'s.

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
                    fault="deploy.rollback.mid-patch", planned_on=cur, seen=dep, progress=progress)

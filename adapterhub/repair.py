"""Whole-home maintenance: ``adapterhub gc``, ``verify`` and ``verify --repair``.

:func:`gc` and :func:`verify` are :meth:`Workspace.gc <adapterhub.workspace.Workspace.gc>` and
:meth:`Workspace.verify <adapterhub.workspace.Workspace.verify>` (the store and the catalog) plus the
deployments (their folders' temp files; their weights, markers and undo records). They live here, above
both, so the workspace never reaches up into :mod:`adapterhub.apply.deployments` (which takes a Workspace).

:func:`repair` brings a home back to a consistent state after a crash.

What a crash (SIGKILL, power cut) can leave behind, and what repair does about it:

* an **orphan blob** (the blob is written before its catalog row, so a crash in between leaves a blob
  no version references) and **temp files** of interrupted atomic writes: removed through :func:`gc`;
* a **deployment with a leftover write-ahead log** (killed mid apply/revert/rollback): finished or
  undone, bit for bit, by :func:`adapterhub.apply.deploy_recovery.recover`, which records a ``recover`` event
  (only for this home's deployments: those of another home sharing the catalog, or of the home this
  one was copied from, are verified, never changed);
* **temp files** of interrupted writes in this home's deployment folders (``.adapterhub/.*.tmp``,
  ``.adapterhub/undo/.*.tmp``): removed through :func:`gc`.

Every deployment is then verified: weights against the recorded state, and each undo record its
stack needs (missing or corrupt ones are reported: revert and rollback would fail without them).

A catalog row is never half-written (each register is one transaction), so nothing else needs fixing;
problems repair cannot fix (a referenced blob missing or corrupt, a deployment whose weights were
changed outside adapterhub) are reported, not hidden.

Orphan removal races with a concurrent ``register`` (its blob exists a moment before its row). With
``grace_s > 0`` only orphans not touched for that many seconds are removed (``BlobStore.put_bytes``
refreshes the mtime of a blob it finds already present), which is safe to run next to writers; the
default ``grace_s=0`` removes every orphan at once, like ``git gc --prune=now``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import AdapterHubError

if TYPE_CHECKING:  # pragma: no cover
    from .store import GcResult
    from .workspace import Workspace


def gc(ws: Workspace, *, dry_run: bool = False, grace_s: float = 0.0) -> GcResult:
    """Remove blobs no version references and temp files of interrupted writes, in the store and in this
    home's deployment folders (``.adapterhub/.*.tmp``, ``.adapterhub/undo/.*.tmp``), and the folders an
    interrupted ``deploy rm`` left in ``<home>/deployments``.

    Takes: the workspace; ``dry_run``: only count; ``grace_s``: keep orphans younger than this (see
    :meth:`Workspace.gc <adapterhub.workspace.Workspace.gc>`).
    Returns: the store's GcResult, with the deployments' temp files counted in ``temp_files_removed``.
    """
    res = ws.gc(dry_run=dry_run, grace_s=grace_s)
    d = ws.deployments_dir  # folders an interrupted removal left there count too, rows or not
    if ws.deployment_rows.has_any() or (d.is_dir() and not d.is_symlink() and any(d.iterdir())):
        from .apply.deploy_folders import remove_temp_files

        res.temp_files_removed += remove_temp_files(ws, dry_run=dry_run)
    return res


def verify(ws: Workspace, refs: Sequence[str] = (), *,
           on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """:meth:`Workspace.verify <adapterhub.workspace.Workspace.verify>`; without ``refs`` also every deployment.

    Returns: {"checked", "problems", "orphans"}, deployment problems (``"deployment NAME: ..."``, see
    :func:`adapterhub.apply.deploy_folders.check_all`) appended to ``problems``.
    Raises: RefError for an unknown ref.
    """
    res = ws.verify(refs, on_progress=on_progress)
    if not refs and ws.deployment_rows.has_any():
        from .apply.deploy_folders import check_all

        res["problems"] += check_all(ws)
    return res


@dataclass
class RepairReport:
    """What repair did and what is still wrong (``ok`` is True when nothing is)."""

    removed_blobs: list[str] = field(default_factory=list)
    kept_recent_orphans: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    temp_files_removed: int = 0
    recovered_deployments: list[str] = field(default_factory=list)
    deployment_problems: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.deployment_problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "removed_blobs": self.removed_blobs,
                "kept_recent_orphans": self.kept_recent_orphans, "freed_bytes": self.freed_bytes,
                "temp_files_removed": self.temp_files_removed, "recovered_deployments": self.recovered_deployments,
                "deployment_problems": self.deployment_problems, "problems": self.problems, "dry_run": self.dry_run}


def repair(ws: Workspace, *, grace_s: float = 0.0, dry_run: bool = False) -> RepairReport:
    """Recover interrupted deployments, remove orphan blobs and temp files, then verify everything.

    Takes: the workspace; ``grace_s``: keep orphans modified less than this many seconds ago (0: remove all);
    ``dry_run``: only report (deployments are checked, not recovered).
    Returns: a :class:`RepairReport`. Raises: nothing for per-item problems (they are in the report);
    AdapterHubError only if the catalog itself cannot be read.
    """
    from .apply import deploy_folders, deploy_ownership, deploy_recovery  # torch only to undo an interrupted write

    rep = RepairReport(dry_run=dry_run)
    # 1. deployments first: recovery reads blobs (undo records live in the deployment folder, not the store)
    for d in deploy_ownership.list_deployments(ws):
        try:
            if not dry_run and not d.read_only and deploy_recovery.recover(ws, d.name):
                rep.recovered_deployments.append(d.name)
            chk = deploy_folders.verify(ws, d.name)
        except (AdapterHubError, OSError) as e:
            rep.deployment_problems.append(f"{d.name}: {_one_line(e)}")
            continue
        if not chk["ok"]:
            rep.deployment_problems.append(f"{d.name}: {deploy_folders.why_not_ok(chk)}")
    # 2. orphans and temp files
    res = gc(ws, dry_run=dry_run, grace_s=grace_s)
    rep.removed_blobs, rep.freed_bytes, rep.temp_files_removed = res.removed, res.freed_bytes, res.temp_files_removed
    rep.kept_recent_orphans = res.kept_recent
    # 3. what is left must verify
    v = ws.verify()  # the store and the catalog; the deployments were checked above
    rep.checked = v["checked"]
    rep.problems = list(v["problems"])
    return rep


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


__all__ = ["gc", "verify", "repair", "RepairReport"]

"""The façade the CLI calls: a :class:`Workspace` ties the home directory, blob store and catalog together."""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar, cast

from sqlalchemy import CursorResult, bindparam, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from . import safe_read
from .bases.sources import canonical_source, inspect_folder, resolve_source, tensor_shapes
from .catalog import db, metrics as mh
from .catalog.current import upsert_current
from .catalog.deployments import DeploymentCatalog
from .catalog.models import (
    KINDS,
    RELATIONS,
    Adapter,
    AdapterVersion,
    BaseModel,
    CurrentMetric,
    LineageEdge,
    MetricRow,
    Tag,
)
from .catalog.names import validate_name
from .catalog.records import BaseInfo, NewVersion, Parent, VersionInfo, iso_utc  # noqa: F401 - re-exported
from .catalog.refs import parse_ref
from .errors import AdapterHubError, BaseModelError, CatalogError, FormatError, NameError_, RefError, StoreError
from .fsutil import sha256_hex
from .progress import Progress
from .store import GcResult, Store, open_store

if TYPE_CHECKING:
    from sqlalchemy import Table

    from . import format as fmt

_log = logging.getLogger("adapterhub.catalog")


@dataclass
class _PreparedVersion:
    """A validated, canonically serialised version, not yet written anywhere (internal)."""

    spec: NewVersion
    base: "BaseInfo"
    adapter: Any
    card: dict[str, Any]
    data: Any  # bytes, or a format.PackedAdapter written piece by piece (len() is its size)
    digest: str
    dtype: str

    def row_args(self, digest: str) -> dict[str, Any]:
        """Keyword arguments of :meth:`Workspace._insert_version` / ``_add_version_row``."""
        s = self.spec
        return dict(name=s.name, kind=s.kind, base_id=self.base.id, digest=digest, size=len(self.data), task=s.task,
                    mask=self.card.get("mask") or {}, adapter=self.adapter, dtype=self.dtype, parents=s.parents,
                    metrics=s.metrics, training_config=s.training_config, card=self.card, hub=s.hub, base=self.base)


def _version_info(row: AdapterVersion, base: BaseModel | BaseInfo, tags: list[str] | None = None) -> VersionInfo:
    a = row.adapter
    return VersionInfo(
        id=row.id, name=a.name, number=row.number, kind=a.kind, content_hash=row.content_hash, size_bytes=row.size_bytes,
        task=row.task, base=base.name, base_fingerprint=base.fingerprint, mask_method=row.mask_method,
        density=row.density, granularity=row.granularity, block_size=row.block_size, target_modules=row.target_modules,
        nnz=row.nnz, nnz_per_param=row.nnz_per_param, dtype=row.dtype, mask_hash=row.mask_hash,
        training_config=row.training_config, metrics=row.metrics, card=row.card, created_at=row.created_at,
        hub_repo=row.hub_repo, hub_commit=row.hub_commit, hub_tag=row.hub_tag, hub_endpoint=row.hub_endpoint,
        tags=sorted(tags or []), deprecated_at=row.deprecated_at)


def _version_columns() -> list[Any]:
    """The columns of a version, its adapter and its base, labelled with :class:`VersionInfo`'s field names (a row
    of them becomes ``VersionInfo(**row._mapping)``; the query joins the three tables)."""
    v, a, b = AdapterVersion.__table__.c, Adapter.__table__.c, BaseModel.__table__.c
    return [v.id, a.name, v.number, a.kind, v.content_hash, v.size_bytes, v.task, b.name.label("base"),
            b.fingerprint.label("base_fingerprint"), v.mask_method, v.density, v.granularity, v.block_size,
            v.target_modules, v.nnz, v.nnz_per_param, v.dtype, v.mask_hash, v.training_config, v.metrics,
            v.card, v.created_at, v.hub_repo, v.hub_commit, v.hub_tag, v.hub_endpoint, v.deprecated_at]


@functools.cache
def _push_snapshot_query(*, by_id: bool) -> Any:
    """The statement of :meth:`Workspace.push_snapshot` (built once: a push's fixed cost, issue 19): a version's
    columns (:func:`_version_columns`), its base's (``b_*``), whether it has an edge to a local parent and whether a
    version of its adapter was pushed to ``:repo_id`` on ``:endpoint`` (or recorded without an endpoint); the version
    by ``:name`` and ``:number``, or ``by_id`` by ``:id``."""
    v, a, b = AdapterVersion.__table__.c, Adapter.__table__.c, BaseModel.__table__.c
    e, other = LineageEdge.__table__.c, AdapterVersion.__table__.alias("pushed").c
    q = select(*_version_columns(), b.id.label("b_id"), b.source.label("b_source"), b.revision.label("b_revision"),
               b.architecture.label("b_architecture"), b.num_params.label("b_num_params"),
               b.local_path.label("b_local_path"), b.created_at.label("b_created_at"),
               select(e.id).where(e.child_id == v.id, e.parent_id.is_not(None)).limit(1).exists()
               .label("b_has_parents"),
               select(other.id).where(other.adapter_id == v.adapter_id, other.hub_repo == bindparam("repo_id"), or_(
                   other.hub_endpoint.is_(None), other.hub_endpoint == bindparam("endpoint"))).limit(1).exists()
               .label("b_pushed")).select_from(
        AdapterVersion.__table__.join(Adapter.__table__, v.adapter_id == a.id).join(BaseModel.__table__, a.base_id == b.id))
    if by_id:
        return q.where(v.id == bindparam("id"))
    return q.where(a.name == bindparam("name"), v.number == bindparam("number"))


@dataclass
class _RegisterSnapshot:
    """What ``register`` read of the catalog before writing anything (:meth:`Workspace._register_snapshot`)."""

    base: BaseInfo | None
    adapter: tuple[str, int, str] | None  # kind, base id, base name of the adapter of that name, if any
    parent_errors: list[AdapterHubError | None]  # per parent: the error resolving its ref, if any

    def precheck(self, name: str, kind: str, base_id: int, parents: Sequence[Parent]) -> None:
        """Raise what :meth:`Workspace._insert_version` would raise for kind/base conflicts and unknown parents,
        so a refused registration leaves the store unchanged (the insert re-checks inside its transaction)."""
        if self.adapter is not None:
            a_kind, a_base_id, a_base = self.adapter
            if a_kind != kind:
                raise CatalogError(f"adapter {name!r} is of kind {a_kind}, not {kind}")
            if a_base_id != base_id:
                raise CatalogError(f"adapter {name!r} belongs to base {a_base!r}")
        for p, err in zip(parents, self.parent_errors, strict=True):
            if p.ref is None:
                if p.relation != "imported_from":
                    raise CatalogError(f"relation {p.relation} needs a parent ref")
            elif err is not None:
                raise err


_T = TypeVar("_T")

def retry_on_busy(fn: Callable[[], _T], *, attempts: int | None = None, base_delay: float = 0.02,
                  timeout: float | None = None, on_wait: Callable[[float], None] | None = None) -> _T:
    """Run ``fn()`` retrying on lock/busy/serialization errors, unique-key races and stale rows (a row
    another process changed or removed meanwhile), with jittered backoff.

    ``timeout``: seconds to keep trying (default: env ADAPTERHUB_LOCK_TIMEOUT, else 60); ``attempts``:
    optional cap on tries. Each try waits at most a short slice for SQLite's lock, so once a lock has been
    waited for ``db.LOCK_NOTICE_AFTER_S`` seconds, ``on_wait(seconds_waited)`` is called once (and the
    notice logged on ``adapterhub.catalog`` at INFO); the library itself never prints.
    Raises CatalogError (one line) when the error is not transient or the time/attempts run out, so a
    raw driver error never reaches the user.
    """
    limit = db.lock_timeout_setting(timeout)
    start = time.monotonic()
    noticed = False
    i = 0
    while True:
        remaining = limit - (time.monotonic() - start)
        try:
            with db.busy_slice(int(1000 * max(0.05, min(db.LOCK_NOTICE_AFTER_S, remaining)))):
                return fn()
        except (OperationalError, IntegrityError, StaleDataError) as e:
            raw = str(getattr(e, "orig", None) or e)
            msg = raw.lower()
            locked = False
            if isinstance(e, StaleDataError):
                transient = True
            elif isinstance(e, IntegrityError):  # only a unique-key race is worth retrying (FK/CHECK are bugs)
                transient = "unique" in msg or "duplicate key" in msg
            else:
                locked = "locked" in msg or "busy" in msg or "lock timeout" in msg  # PostgreSQL: 55P03
                transient = locked or any(s in msg for s in ("could not serialize", "deadlock"))
            first = (raw.strip().splitlines() or ["?"])[0]
            if not transient:
                raise CatalogError(f"catalog write failed: {first}") from e
            i += 1
            elapsed = time.monotonic() - start
            if attempts is not None and i >= attempts:
                raise CatalogError(f"the catalog stayed busy after {attempts} attempts: {first}") from e
            if elapsed >= limit:
                if locked:
                    raise CatalogError(f"the catalog database is locked by another process; gave up after {elapsed:.0f} s"
                                       f" (lock_timeout or {db.LOCK_TIMEOUT_ENV} sets how long to wait)",
                                       keywords=("lock_timeout",)) from e
                raise CatalogError(f"the catalog stayed busy for {elapsed:.0f} s: {first}") from e
            if locked and not noticed and elapsed >= 0.95 * db.LOCK_NOTICE_AFTER_S:
                noticed = True
                _log.info("waiting for the catalog lock (held by another process), up to %.0f s", limit)
                if on_wait is not None:
                    on_wait(elapsed)
            delay = base_delay * (2 ** min(i - 1, 6)) * (0.5 + random.random())
            time.sleep(max(0.0, min(delay, limit - elapsed)))


class Workspace:
    """An adapterhub home: ``<home>/blobs`` (content-addressed store), the catalog, deployments, caches.

    Open with :meth:`open`; every CLI command is one or a few calls on this object.
    """

    def __init__(self, home: Path, db_url: str, *, migrate: bool = True, lock_timeout: float | None = None,
                 on_lock_wait: Callable[[float], None] | None = None, store_url: str | None = None) -> None:
        """``lock_timeout``: seconds to wait for another process's catalog lock (default: env
        ADAPTERHUB_LOCK_TIMEOUT, else 60); ``on_lock_wait(seconds)`` is called once when a write has
        waited ~2 s for it. ``store_url``: the blob store (``s3://bucket/prefix`` or a folder; default:
        env ADAPTERHUB_STORE_URL, else ``<home>/blobs/sha256``). Raises CatalogError for an unusable home,
        URL or timeout, StoreError for an unusable store URL.
        """
        self.home = home
        self.db_url = db_url
        self.lock_timeout = db.lock_timeout_setting(lock_timeout)
        self.on_lock_wait = on_lock_wait
        if self.home.exists() and not self.home.is_dir():
            raise CatalogError(f"the home {home} is not a directory")
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CatalogError(f"cannot create the home directory {home}: {e.strerror or e}") from None
        if self.home.is_symlink():
            raise CatalogError(f"{home}: the home directory must not be a symlink")
        # a shared store (s3://bucket/prefix) next to a shared catalog: every home sees every version's bytes
        self.store: Store = open_store(store_url or os.environ.get("ADAPTERHUB_STORE_URL"), self.home)
        self.engine = db.make_engine(db_url, lock_timeout=self.lock_timeout)
        if migrate:
            db.ensure_schema(self.engine, blob_reader=self.blob_or_none)
        self._sessions = db.session_factory(self.engine)

    def blob_or_none(self, digest: str) -> bytes | None:
        """A blob's verified bytes, or None when it is missing or corrupt (for data migrations)."""
        try:
            return self.store.get_bytes(digest)
        except StoreError:
            return None

    @classmethod
    def open(cls, home: str | os.PathLike[str] | None = None, db_url: str | None = None, *,
             migrate: bool = True, lock_timeout: float | None = None,
             on_lock_wait: Callable[[float], None] | None = None, store_url: str | None = None) -> "Workspace":
        """Open (creating if needed) the workspace. Flags > env (ADAPTERHUB_HOME, ADAPTERHUB_DB_URL,
        ADAPTERHUB_LOCK_TIMEOUT, ADAPTERHUB_STORE_URL) > defaults. See ``__init__`` for the options."""
        h = Path(home).expanduser() if home else db.default_home()
        url = db_url or os.environ.get("ADAPTERHUB_DB_URL") or db.default_sqlite_url(h.absolute())
        return cls(h.absolute(), url, migrate=migrate, lock_timeout=lock_timeout, on_lock_wait=on_lock_wait,
                   store_url=store_url)

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """:func:`retry_on_busy` with this workspace's lock timeout and waiting callback."""
        return retry_on_busy(fn, timeout=self.lock_timeout, on_wait=self.on_lock_wait)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def deployments_dir(self) -> Path:
        return self.home / "deployments"

    @property
    def deployment_rows(self) -> DeploymentCatalog:
        """The catalog's deployment rows and events (what :mod:`adapterhub.apply.deployments` reads and writes)."""
        return DeploymentCatalog(self.session)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self._sessions() as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    # -- bases ------------------------------------------------------------------------------------

    def add_base(self, name: str, source: str, revision: str | None = None, *,
                 progress: Progress | None = None) -> BaseInfo:
        """Register a base model from a local HF folder or a built-in source; computes its fingerprint
        (``progress``: told ``("hashing", bytes done, bytes in all)`` meanwhile).

        Re-adding the same name with the same source is a no-op; a different source is refused.
        """
        validate_name(name, "base name")
        src = canonical_source(source)
        path = resolve_source(src, self.cache_dir)
        with self.session() as s:
            existing = s.scalar(select(BaseModel).where(BaseModel.name == name))
            if existing is not None:
                if existing.source != src:
                    raise CatalogError(f"base {name!r} already exists with source {existing.source}")
                return self._base_info(existing)
        info = inspect_folder(path, progress)

        def txn() -> BaseInfo:
            with self.session() as s:
                existing = s.scalar(select(BaseModel).where(BaseModel.name == name))
                if existing is not None:
                    return self._base_info(existing)
                row = BaseModel(name=name, source=src, revision=revision, architecture=info.architecture,
                                fingerprint=info.fingerprint, num_params=info.num_params,
                                local_path=None if src.startswith("builtin:") else str(path))
                s.add(row)
                s.flush()
                return self._base_info(row, path)

        return self._retry(txn)

    def _base_info(self, row: BaseModel, path: Path | None = None) -> BaseInfo:
        if path is None:
            path = Path(row.local_path) if row.local_path else None
        return BaseInfo(row.name, row.source, row.revision, row.architecture, row.fingerprint, row.num_params,
                        path if path is not None else Path(""), row.id, row.created_at)

    def get_base(self, name: str, *, resolve_path: bool = True) -> BaseInfo:
        """The base called ``name`` with its local folder resolved; raises BaseModelError if unknown."""
        with self.session() as s:
            row = s.scalar(select(BaseModel).where(BaseModel.name == name))
            if row is None:
                known = ", ".join(s.scalars(select(BaseModel.name).order_by(BaseModel.name)).all()) or "none registered"
                raise BaseModelError(f"unknown base {name!r} (known: {known}); add it with `adapterhub base add`")
            info = self._base_info(row)
        if resolve_path:
            info.path = resolve_source(info.source, self.cache_dir)
        return info

    def list_bases(self) -> list[BaseInfo]:
        with self.session() as s:
            return [self._base_info(r) for r in s.scalars(select(BaseModel).order_by(BaseModel.name))]

    # -- register ---------------------------------------------------------------------------------

    def read_adapter_path(self, path: str | os.PathLike[str], base: str, *, allow_nonfinite: bool = False,
                          density: float | None = None, block_size: int | None = None
                          ) -> tuple[fmt.SparseAdapter, str, list[Parent]]:
        """Read what ``register`` takes from disk: an adapterhub ``.safetensors`` file or a PEFT SHiRA/LoRA
        folder (mapped onto base ``base``'s tensors; a LoRA folder needs ``density``, takes ``block_size``).
        Returns (adapter, source format, provenance parents: an ``imported_from`` edge for an imported
        folder). Raises FormatError, BaseModelError."""
        from .interop.peft import is_peft_folder, read_adapter_source

        shapes = tensor_shapes(self.get_base(base).path) if is_peft_folder(path) else None
        adapter, source = read_adapter_source(path, shapes, allow_nonfinite=allow_nonfinite, density=density,
                                              block_size=block_size)
        extra = [] if source == "adapterhub" else [Parent(None, "imported_from", params={
            "format": source, "path": os.path.basename(os.path.abspath(path))})]
        return adapter, source, extra

    def register(self, adapter: fmt.SparseAdapter | fmt.PackedAdapter | fmt.ScannedAdapter | bytes | str | os.PathLike[str],
                 *, name: str,
                 task: str | None,
                 base: str, kind: str = "expert", parents: Sequence[Parent] = (),
                 metrics: dict[str, Any] | None = None, training_config: dict[str, Any] | None = None,
                 hub: dict[str, str | None] | None = None, allow_nonfinite: bool = False,
                 density: float | None = None, block_size: int | None = None,
                 values_dtype: str | None = None) -> VersionInfo:
        """Store an adapter and record it as the next version of ``name``.

        NaN/inf values are refused (FormatError) unless ``allow_nonfinite`` is passed (``register
        --allow-nonfinite``); the adapter card's own ``allow_nonfinite`` key does not switch the check off.

        ``adapter`` is a SparseAdapter, the bytes of an adapter file (re-serialised canonically), or a path
        (str / PathLike) to an adapter file or PEFT folder, read as ``adapterhub register`` reads it
        (:meth:`read_adapter_path`, which adds the ``imported_from`` provenance edge; ``density`` and
        ``block_size`` are for a PEFT LoRA folder, as ``register --density``). Bytes (or a file) that already
        are canonical are stored as they are, hashed once (no re-serialisation). ``values_dtype`` (``fp32``/
        ``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``) stores the values in that dtype
        (:func:`adapterhub.format.cast_values`, recorded in the card); default: as given.
        Checks: names, kind, relations, parents exist, the adapter fits the base (fingerprint in its card,
        every parameter a base tensor of the same shape). The blob is written before the catalog row,
        so a crash leaves at most an unreferenced blob (removed by ``gc``), never a row without a blob.
        Registering content already present as a version of ``name`` returns that version (created=False).
        """
        if not isinstance(adapter, (str, os.PathLike)) and (density is not None or block_size is not None):
            raise FormatError("density and block_size apply only to a PEFT LoRA folder given by its path",
                              keywords=("density", "block_size"))
        source = None  # what a path turned out to hold (VersionInfo.source_format)
        with contextlib.ExitStack() as stack:
            staged = None
            if isinstance(adapter, (str, os.PathLike)):
                validate_name(name, "adapter name")  # misuse is refused before the file is read
                if density is None and block_size is None and not os.path.isdir(adapter):
                    from . import format as fmt

                    # our own file: validated on views of its bytes, stored as it is when canonical (issue 19)
                    path = Path(adapter)
                    raw = fmt.read_bytes_checked(path)
                    staged = self._stage(raw, stack)  # its write + fsync overlap the validation and the hash
                    adapter = _load_hashed(raw, allow_nonfinite=allow_nonfinite, source=path.name)
                    source = "adapterhub"
                else:
                    adapter, source, extra = self.read_adapter_path(adapter, base, allow_nonfinite=allow_nonfinite,
                                                                     density=density, block_size=block_size)
                    parents = [*parents, *extra]
            if values_dtype is not None:
                from . import format as fmt

                if isinstance(adapter, (bytes, bytearray)):
                    adapter = fmt.load(bytes(adapter), allow_nonfinite=allow_nonfinite)
                if isinstance(adapter, fmt.ScannedAdapter):
                    adapter = adapter.load()
                if isinstance(adapter, fmt.PackedAdapter):  # a merge's result: merge(values_dtype=) casts it
                    raise FormatError("values_dtype does not apply to a packed merge result; give it to the merge",
                                      keywords=("values_dtype",))
                adapter = fmt.cast_values(adapter, values_dtype)
            spec = NewVersion(adapter, name=name, task=task, base=base, kind=kind, parents=tuple(parents),
                              metrics=metrics, training_config=training_config, hub=hub, allow_nonfinite=allow_nonfinite)
            # one read of the catalog for the base and what the precheck needs; the insert re-checks in its transaction
            snap = self._register_snapshot(name, base, parents)
            prep = self._prepare_version(spec, {base: snap.base} if snap.base is not None else {})
            snap.precheck(name, kind, prep.base.id, parents)  # refuse before the blob is written
            from .faults import fault_point

            # a concurrent gc waits until the row is committed (a staged write holds the lock already)
            with contextlib.nullcontext() if staged is not None else self.store.lock(exclusive=False):
                # hashed once, in _prepare_version; a staged temp file holding these bytes is renamed into place
                digest = self.store.put_bytes(prep.data, digest=prep.digest, staged=staged)
                fault_point("register.after-blob")
                info = self._retry(lambda: self._insert_version(**prep.row_args(digest)))
        info.source_format = source
        return info

    def _stage(self, raw: bytes, stack: contextlib.ExitStack) -> Any:
        """For a file of 1 MiB or more on a local store: take the store's shared lock (until ``stack`` closes)
        and start writing ``raw`` to a temp file of the store now (:meth:`BlobStore.stage`); None otherwise."""
        from .store import can_stage

        if not can_stage(self.store, len(raw)):
            return None
        stack.enter_context(self.store.lock(exclusive=False))
        return stack.enter_context(self.store.stage(raw))

    def _prepare_version(self, spec: NewVersion, bases: dict[str, BaseInfo]) -> _PreparedVersion:
        """Validate one version and serialise it canonically; writes nothing.

        Takes the version and bases not yet in the catalog (by name; others are looked up). Returns the
        canonical bytes and row values. Raises NameError_/CatalogError (names, kind, task, relations),
        FormatError (unreadable bytes), BaseModelError (the adapter does not fit the base).
        """
        from . import format as fmt  # torch: imported only by commands that read or write adapters

        name, kind, task, base = spec.name, spec.kind, spec.task, spec.base
        validate_name(name, "adapter name")
        if kind not in KINDS:
            raise CatalogError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if task is not None and (not isinstance(task, str) or not task or len(task) > 100
                                 or any(c in task for c in "\0\n\r")):
            raise NameError_(f"invalid task name {safe_read.clip(task)}")
        for doc, what in ((spec.metrics, "metrics"), (spec.training_config, "training config")):
            if doc is not None:  # stored as JSON: must read back the same on SQLite and PostgreSQL
                safe_read.check_doc(doc, what, CatalogError)
        for p in spec.parents:
            if p.relation not in RELATIONS:
                raise CatalogError(f"unknown relation {p.relation!r}; use one of {', '.join(RELATIONS)}")
        adapter = spec.adapter
        if isinstance(adapter, (bytes, bytearray)):  # kept: canonical bytes are stored as they are
            adapter = fmt.load_canonical(bytes(adapter), allow_nonfinite=spec.allow_nonfinite)
        card = dict(adapter.card)
        if spec.allow_nonfinite:  # record the user's decision, so reads from the store accept this blob
            card["allow_nonfinite"] = True
        binfo = bases[base] if base in bases else self.get_base(base)
        card_fp = (card.get("base") or {}).get("fingerprint") if isinstance(card.get("base"), dict) else None
        if card_fp and card_fp != binfo.fingerprint:
            raise BaseModelError(
                f"adapter was made for a base with fingerprint {card_fp[:12]}, but base {base!r} is {binfo.fingerprint[:12]}")
        try:
            adapter.check_base(tensor_shapes(binfo.path))
        except FormatError as e:
            raise BaseModelError(f"adapter does not fit base {base!r}: {e}") from None
        card["base"] = {"name": base, "fingerprint": binfo.fingerprint}
        if task is not None:
            card.setdefault("task", task)
        card.setdefault("kind", kind)
        if isinstance(adapter, fmt.ScannedAdapter):  # canonical under this card: the file's own bytes, hashed once
            if adapter.canonical_with(card, allow_nonfinite=spec.allow_nonfinite):
                raw = adapter.source_bytes
                return _PreparedVersion(spec, binfo, adapter, card, raw, adapter.source_sha256 or sha256_hex(raw),
                                        adapter.dtype_label)
            adapter = adapter.load()  # another card: re-serialised by the full path
        if isinstance(adapter, fmt.PackedAdapter):  # a merge's result: written piece by piece, never joined
            if spec.allow_nonfinite:
                adapter.allow_nonfinite = True
            packed = adapter.with_card(card)
            data: Any = fmt.serialised(packed)
            digest = fmt.serialised_sha256(data)
            return _PreparedVersion(spec, binfo, packed, card, data, digest, packed.dtype_label)
        adapter = fmt.SparseAdapter(adapter.params, adapter.extras, card, source_bytes=adapter.source_bytes,
                                    source_allow_nonfinite=adapter.source_allow_nonfinite,
                                    source_sha256=adapter.source_sha256, source_escapes=adapter.source_escapes)
        data = fmt.save(adapter, allow_nonfinite=spec.allow_nonfinite)  # the source bytes when canonical
        # hashed once: a pull's bytes were hashed while downloading (source_sha256), others here
        digest = (adapter.source_sha256 if data is adapter.source_bytes and adapter.source_sha256
                  else sha256_hex(data))
        return _PreparedVersion(spec, binfo, adapter, card, data, digest, adapter.dtype_label)

    def prepare_base(self, name: str, source: str, revision: str | None = None) -> BaseInfo:
        """What :meth:`add_base` would record for ``name``/``source``, without recording it (``id`` is 0).

        Materialises a built-in source into the cache if needed and fingerprints the folder. Raises
        NameError_ for a bad name, BaseModelError when the source cannot be used.
        """
        validate_name(name, "base name")
        src = canonical_source(source)
        path = resolve_source(src, self.cache_dir)
        info = inspect_folder(path)
        return BaseInfo(name, src, revision, info.architecture, info.fingerprint, info.num_params, path, 0)

    def register_many(self, versions: Sequence[NewVersion], *, new_bases: Sequence[BaseInfo] = (),
                      staged: dict[str, Any] | None = None, known_bases: Sequence[BaseInfo] = ()) -> list[VersionInfo]:
        """Register several versions (and new bases) all-or-nothing: one catalog transaction.

        ``staged``: content hash -> a :class:`~adapterhub.store.StagedBlob` of those very bytes (``pull`` stages
        what it downloaded while it validates it): renamed into place instead of written again; the caller
        discards them afterwards (and must not hold the store's lock during this call). ``known_bases``: bases of
        the catalog the caller has just read (their folders resolved), so that they are not read again.

        Takes the versions in order (a parent before its children; a child names a parent of the same
        batch by ``sha256:<content hash>``) and bases from :meth:`prepare_base` to add in the same
        transaction. Everything is validated and serialised first, and each ``expect_hash`` checked;
        then the whole batch is tried against the catalog, so refusals happen before any blob is written:
        in a transaction rolled back before the blobs are written, or, when no blob has bytes to write (each
        is staged, or already in a local store: a pull), in the transaction itself, flushed before the blobs
        are renamed into place and committed after them (issue 19: no second pass over the batch). Blobs are
        written atomically and fsynced before the rows are committed. If anything fails after that, the blobs
        this call newly created (and no committed version references) are removed again; blobs that already
        existed stay. A crash leaves at most unreferenced blobs, which ``gc`` removes. Returns one VersionInfo
        per version, in order (created False for content already present as a version of that name). Raises
        what :meth:`register` raises, CatalogError for a hash that differs from ``expect_hash`` or a base that
        appeared meanwhile with other weights.
        """
        from .faults import fault_point
        from .store import BlobStore

        bases = {b.name: b for b in known_bases}
        bases.update({b.name: b for b in new_bases})
        for b in new_bases:
            validate_name(b.name, "base name")
        prepared = [self._prepare_version(v, bases) for v in versions]
        for p in prepared:
            if p.spec.expect_hash is not None and p.digest != p.spec.expect_hash:
                raise CatalogError(f"{p.spec.name}: the canonical bytes hash {p.digest[:12]} differs from the "
                                   f"expected {p.spec.expect_hash[:12]} (a non-canonical file); nothing was registered")
        stages = staged or {}
        created: list[str] = []  # blobs this call writes (not there before): removed again on failure

        def put_blobs() -> None:
            for p in prepared:
                if p.digest not in created and not self.store.has(p.digest):
                    created.append(p.digest)
                self.store.put_bytes(p.data, digest=p.digest, staged=stages.get(p.digest))
            fault_point("register.after-blob")

        # Nothing to write: every blob is a staged file of these very bytes (renamed into place) or already stored.
        place_only = isinstance(self.store, BlobStore) and all(
            (stages.get(p.digest) is not None and stages[p.digest].data is p.data) or self.store.has(p.digest)
            for p in prepared)
        if place_only:
            def placing_txn() -> list[VersionInfo]:
                with self.session() as s:
                    infos = self._add_batch(s, new_bases, prepared)  # refusals: before any blob is placed
                    put_blobs()  # renames (and the wait for the staged fsyncs) inside the open transaction
                    fault_point("register.before-commit")  # rows and edges flushed, transaction not committed
                    return infos
            try:
                with self.store.lock(exclusive=False):  # a concurrent gc waits until the rows are committed
                    return cast("list[VersionInfo]", self._retry(placing_txn))
            except BaseException:
                self._drop_unreferenced(created)
                raise

        def dry_run() -> None:
            with self._sessions() as s:
                try:
                    self._add_batch(s, new_bases, prepared)
                finally:
                    s.rollback()

        self._retry(dry_run)  # refusals (kinds, bases, unknown parents) before any blob is written

        def txn() -> list[VersionInfo]:
            with self.session() as s:
                infos = self._add_batch(s, new_bases, prepared)
                fault_point("register.before-commit")  # rows and edges flushed, transaction not committed
                return infos

        try:
            with self.store.lock(exclusive=False):  # a concurrent gc waits until the rows are committed
                put_blobs()
                return cast("list[VersionInfo]", self._retry(txn))
        except BaseException:
            self._drop_unreferenced(created)
            raise

    def _add_batch(self, s: Session, new_bases: Sequence[BaseInfo], prepared: Sequence[_PreparedVersion]
                   ) -> list[VersionInfo]:
        """Insert the new bases and every version into session ``s`` (flushed, not committed)."""
        base_ids: dict[str, int] = {}
        for b in new_bases:
            row = s.scalar(select(BaseModel).where(BaseModel.name == b.name))
            if row is not None and (row.fingerprint != b.fingerprint or row.source != b.source):
                raise CatalogError(f"base {b.name!r} was added meanwhile with other weights or source; pull again")
            if row is None:
                row = BaseModel(name=b.name, source=b.source, revision=b.revision, architecture=b.architecture,
                                fingerprint=b.fingerprint, num_params=b.num_params,
                                local_path=None if b.source.startswith("builtin:") else str(b.path))
                s.add(row)
                s.flush()
            base_ids[b.name] = row.id
        out = []
        for p in prepared:
            args = p.row_args(p.digest)
            args["base_id"] = base_ids.get(p.spec.base, p.base.id)
            out.append(self._add_version_row(s, **args))
        return out

    def _drop_unreferenced(self, digests: Sequence[str]) -> None:
        """Remove blobs of a failed batch that no committed version references (best effort, under the
        store's exclusive lock so no other registration is between its blob write and its commit)."""
        if not digests:
            return
        try:
            with self.store.lock(exclusive=True):
                referenced = self.referenced_hashes()
                for d in digests:
                    if d not in referenced:
                        self.store.delete(d)
        except Exception:  # noqa: BLE001 - the original error matters more; gc removes what is left
            pass

    def _register_snapshot(self, name: str, base: str, parents: Sequence[Parent]) -> _RegisterSnapshot:
        """One read transaction: base ``base`` (its folder resolved; None when unknown, so that
        :meth:`get_base` words the error later, in its turn), adapter ``name`` and each parent ref's resolution."""
        with self.session() as s:
            # column rows, not ORM objects: nothing here is changed or kept
            row = s.execute(select(*BaseModel.__table__.c).where(BaseModel.name == base)).first()
            info = self._base_info(cast(BaseModel, row)) if row is not None else None
            a = s.execute(select(Adapter.kind, Adapter.base_id, BaseModel.name).join(BaseModel, Adapter.base_id == BaseModel.id)
                          .where(Adapter.name == name)).first()
            have = (a[0], a[1], a[2]) if a is not None else None
            errors: list[AdapterHubError | None] = []
            for p in parents:
                err = None
                if p.ref is not None:
                    try:
                        self._resolve_row(s, p.ref)
                    except AdapterHubError as e:
                        err = e
                errors.append(err)
        if info is not None:
            info.path = resolve_source(info.source, self.cache_dir)
        return _RegisterSnapshot(info, have, errors)

    def _insert_version(self, *, name: str, kind: str, base_id: int, digest: str, size: int, task: str | None,
                        mask: dict[str, Any], adapter: fmt.SparseAdapter, dtype: str, parents: Sequence[Parent],
                        metrics: dict[str, Any] | None, training_config: dict[str, Any] | None, card: dict[str, Any],
                        hub: dict[str, str | None] | None, base: BaseInfo) -> VersionInfo:
        with self.session() as s:
            info = self._add_version_row(
                s, name=name, kind=kind, base_id=base_id, digest=digest, size=size, task=task, mask=mask,
                adapter=adapter, dtype=dtype, parents=parents, metrics=metrics, training_config=training_config,
                card=card, hub=hub, base=base)
            if info.created:
                from .faults import fault_point

                fault_point("register.before-commit")  # row and edges flushed, transaction not committed
            return info

    def _add_version_row(self, s: Session, *, name: str, kind: str, base_id: int, digest: str, size: int,
                         task: str | None, mask: dict[str, Any], adapter: fmt.SparseAdapter, dtype: str,
                         parents: Sequence[Parent], metrics: dict[str, Any] | None,
                         training_config: dict[str, Any] | None, card: dict[str, Any],
                         hub: dict[str, str | None] | None, base: BaseInfo) -> VersionInfo:
        """Add one version row and its lineage edges to session ``s`` (flushed, not committed); an
        adapter row is created when ``name`` is new. ``base`` is the base of ``base_id`` as the caller read it
        (its name and fingerprint go into the returned VersionInfo of a new adapter, without reading the row
        again). Raises CatalogError/RefError on conflicts."""
        a = s.scalar(select(Adapter).where(Adapter.name == name))
        new = a is None
        if a is None:  # inserted with the version row, in one flush
            a = Adapter(name=name, kind=kind, base_id=base_id)
            s.add(a)
        else:
            if a.kind != kind:
                raise CatalogError(f"adapter {name!r} is of kind {a.kind}, not {kind}")
            if a.base_id != base_id:
                raise CatalogError(f"adapter {name!r} belongs to base {a.base.name!r}")
            same = s.scalar(select(AdapterVersion).where(AdapterVersion.adapter_id == a.id,
                                                         AdapterVersion.content_hash == digest))
            if same is not None:
                info = _version_info(same, a.base)
                info.created = False
                return info
        parent_rows = []
        for p in parents:
            prow = self._resolve_row(s, p.ref) if p.ref is not None else None
            if prow is None and p.relation != "imported_from":
                raise CatalogError(f"relation {p.relation} needs a parent ref")
            parent_rows.append((p, prow))
        number = 1 if new else (s.scalar(select(func.max(AdapterVersion.number))
                                         .where(AdapterVersion.adapter_id == a.id)) or 0) + 1
        row = AdapterVersion(
            adapter=a, number=number, content_hash=digest, size_bytes=size, task=task,
            mask_method=mask.get("method"), density=float(mask["density"]) if mask.get("density") is not None else adapter.density,
            granularity=mask.get("granularity") or _granularity(adapter), block_size=mask.get("block_size") or _block_size(adapter),
            target_modules=mask.get("targets") or sorted(adapter.params), nnz=adapter.nnz,
            nnz_per_param=adapter.nnz_per_param(), dtype=dtype, mask_hash=adapter.mask_hash(),
            training_config=training_config, metrics=metrics or {}, card=card,
            hub_repo=(hub or {}).get("repo"), hub_commit=(hub or {}).get("commit"),
            hub_tag=(hub or {}).get("tag"), hub_endpoint=(hub or {}).get("endpoint"),
        )
        s.add(row)
        s.flush()
        for p, prow in parent_rows:
            s.add(LineageEdge(child_id=row.id, parent_id=prow.id if prow is not None else None,
                              relation=p.relation, weight=p.weight, params=p.params))
        added = [MetricRow(version_id=row.id, created_at=row.created_at, **m)  # the history starts with them
                 for m in mh.rows_from_metrics(metrics or {}, source="train")]
        if parent_rows or added:  # one flush for the edges and metric rows (none for a plain register)
            s.add_all(added)
            s.flush()
            upsert_current(s, added)
        return _version_info(row, base if new else a.base)

    # -- resolve / read ---------------------------------------------------------------------------

    def _resolve_row(self, s: Session, ref: str) -> AdapterVersion:
        r = parse_ref(ref)
        if r.hash_prefix is not None:
            rows = s.scalars(select(AdapterVersion).where(AdapterVersion.content_hash.like(r.hash_prefix + "%"))
                             .order_by(AdapterVersion.id).limit(20)).all()
            if not rows:
                raise RefError(f"no version has a content hash starting with {r.hash_prefix}")
            if len({(x.adapter_id, x.number) for x in rows}) > 1 and len({x.content_hash for x in rows}) > 1:
                raise RefError(f"hash prefix {r.hash_prefix} is ambiguous; give more digits")
            return rows[0]
        a = s.scalar(select(Adapter).where(Adapter.name == r.name))
        if a is None:
            raise RefError(f"unknown adapter {r.name!r}")
        q = select(AdapterVersion).where(AdapterVersion.adapter_id == a.id)
        if r.number is not None:
            row = s.scalar(q.where(AdapterVersion.number == r.number))
            if row is None:
                raise RefError(f"{r.name} has no version {r.number}")
            return row
        if r.tag is not None:
            t = s.scalar(select(Tag).where(Tag.adapter_id == a.id, Tag.name == r.tag))
            if t is None:
                raise RefError(f"{r.name} has no tag {r.tag!r}")
            return s.get(AdapterVersion, t.version_id)  # type: ignore[return-value]
        back = r.back or 0  # bare name / name@latest: the newest; name@~N: N before it
        row = s.scalar(q.order_by(AdapterVersion.number.desc()).offset(back).limit(1))
        if row is None:
            if back:
                n = s.scalar(select(func.count()).select_from(AdapterVersion)
                             .where(AdapterVersion.adapter_id == a.id))
                raise RefError(f"{r.name}@~{back}: {r.name} has only {n} version{'s' if n != 1 else ''}")
            raise RefError(f"{r.name} has no versions")
        return row

    def ref_candidates(self, prefix: str = "", *, limit: int = 200) -> list[str]:
        """REFs starting with ``prefix`` for shell completion: adapter names, then ``name@tag``,
        ``name@latest``, ``name@~1`` and ``name@N`` once ``prefix`` names one adapter and its ``@``."""
        name, sep, _ = prefix.partition("@")
        with self.session() as s:
            if not sep:
                q = select(Adapter.name).order_by(Adapter.name).limit(limit)
                if prefix:
                    q = q.where(Adapter.name.startswith(prefix, autoescape=True))
                return [n for n in s.scalars(q)]
            a = s.scalar(select(Adapter).where(Adapter.name == name))
            if a is None:
                return []
            tags = s.scalars(select(Tag.name).where(Tag.adapter_id == a.id).order_by(Tag.name)).all()
            nums = s.scalars(select(AdapterVersion.number).where(AdapterVersion.adapter_id == a.id)
                             .order_by(AdapterVersion.number.desc()).limit(limit)).all()
        out = [f"{name}@{t}" for t in tags] + [f"{name}@latest", f"{name}@~1"] + [f"{name}@{n}" for n in nums]
        return [r for r in out if r.startswith(prefix)][:limit]

    def resolve(self, ref: str) -> VersionInfo:
        """Resolve a REF to its version record; raises RefError if malformed or unknown."""
        with self.session() as s:
            row = self._resolve_row(s, ref)
            tags = s.scalars(select(Tag.name).where(Tag.version_id == row.id)).all()
            info = _version_info(row, row.adapter.base, list(tags))
            info.metrics = mh.present(row.metrics, mh.current_rows(self._metric_records(s, [row.id]).get(row.id, [])))
            return info

    def load_adapter(self, ref: str | VersionInfo) -> fmt.SparseAdapter:
        """The adapter of a version, read from the store and verified against its hash."""
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        from . import format as fmt

        # The store holds only what register accepted: a blob whose card says allow_nonfinite got in with
        # finite values or through the user's --allow-nonfinite, so honouring the key here is safe.
        card = info.card if isinstance(info.card, dict) else {}
        return fmt.load(self.store.get_bytes(info.content_hash), allow_nonfinite=card.get("allow_nonfinite") is True)

    def adapter_bytes(self, ref: str | VersionInfo) -> bytes:
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        return self.store.get_bytes(info.content_hash)

    def record_metrics(self, ref: str, metrics: dict[str, Any], *, source: str = "eval", full: bool = True,
                       dataset_hash: str | None = None, scorer: str | None = None) -> VersionInfo:
        """Append ``metrics`` to the version's metric history as rows (``<split>_n`` keys give their ``n``).

        Nothing is overwritten: the stored metrics JSON stays as registered and earlier rows stay; what
        ``resolve`` presents is the latest full-split row per metric (:mod:`adapterhub.catalog.metrics`).
        ``source`` is ``eval``, ``train`` or ``deployment:NAME``; ``full`` is False for a subset of a split.
        Raises CatalogError if ``metrics`` is not a storable JSON object (:func:`safe_read.check_doc`) or
        the source is not one of those; RefError for an unknown ref."""
        if not isinstance(metrics, dict):
            raise CatalogError("metrics must be a JSON object")
        safe_read.check_doc(metrics, "metrics", CatalogError)
        if source not in mh.SELF_SOURCES and not (source.startswith(mh.DEPLOYMENT_PREFIX)
                                                   and len(source) > len(mh.DEPLOYMENT_PREFIX)):
            raise CatalogError(f"metric source {source[:60]!r}: use train, eval or deployment:NAME")
        rows = mh.rows_from_metrics(metrics, source=source, full=full, dataset_hash=dataset_hash, scorer=scorer)

        def txn() -> str:
            with self.session() as s:
                row = self._resolve_row(s, ref)
                now = dt.datetime.now(dt.timezone.utc)
                added = [MetricRow(version_id=row.id, created_at=now, **m) for m in rows]
                s.add_all(added)
                s.flush()
                upsert_current(s, added)
                return f"{row.adapter.name}@{row.number}"
        return self.resolve(self._retry(txn))

    def update_metrics(self, ref: str, metrics: dict[str, Any]) -> VersionInfo:
        """Record ``metrics`` as new ``eval`` rows (kept for callers of the old name; see :meth:`record_metrics`)."""
        return self.record_metrics(ref, metrics, source="eval")

    def metric_history(self, ref: str) -> list[mh.MetricRecord]:
        """Every metric row of the version, oldest first (all sources, subsets included)."""
        with self.session() as s:
            row = self._resolve_row(s, ref)
            return self._metric_records(s, [row.id], ref=f"{row.adapter.name}@{row.number}").get(row.id, [])

    @staticmethod
    def _metric_records(s: Session, ids: Sequence[int], ref: str | None = None) -> dict[int, list[mh.MetricRecord]]:
        out: dict[int, list[mh.MetricRecord]] = {}
        m = MetricRow.__table__.c
        for i in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
            q = (select(m.version_id, m.name, m.value, m.split, m.n, m.full, m.dataset_hash, m.scorer, m.source,
                        m.created_at).where(m.version_id.in_(list(ids[i:i + 900]))).order_by(m.id))
            for r in s.execute(q):
                out.setdefault(r.version_id, []).append(mh.MetricRecord(
                    name=r.name, value=r.value, split=r.split, n=r.n, full=bool(r.full), dataset_hash=r.dataset_hash,
                    scorer=r.scorer, source=r.source, created_at=r.created_at, ref=ref))
        return out

    def has_content(self, content_hash: str) -> bool:
        """Whether a version holds these bytes (one narrow query: a pull's fixed cost, issue 19)."""
        with self.session() as s:
            return s.scalar(select(AdapterVersion.id).where(AdapterVersion.content_hash == content_hash).limit(1)) \
                is not None

    def has_parents(self, version_id: int) -> bool:
        """Whether version ``version_id`` has a lineage edge to a local parent (one narrow query)."""
        with self.session() as s:
            return s.scalar(select(LineageEdge.id).where(LineageEdge.child_id == version_id,
                                                         LineageEdge.parent_id.is_not(None)).limit(1)) is not None

    def pushed_to(self, name: str, repo_id: str, endpoint: str) -> bool:
        """Whether a push of a version of adapter ``name`` to ``repo_id`` on ``endpoint`` is recorded (a version
        recorded without an endpoint counts: catalogs from before endpoints were kept). One narrow query."""
        v = AdapterVersion
        with self.session() as s:
            return s.scalar(select(v.id).join(Adapter, v.adapter_id == Adapter.id).where(
                Adapter.name == name, v.hub_repo == repo_id, or_(v.hub_endpoint.is_(None), v.hub_endpoint == endpoint)
            ).limit(1)) is not None

    def push_snapshot(self, ref: str, repo_id: str | None, endpoint: str) -> tuple[VersionInfo, BaseInfo, bool, bool | None]:
        """What a push reads of the catalog, in one read transaction of three statements (issue 19: a push's fixed
        cost): the version ``ref`` resolves to (as :meth:`resolve`: tags and presented metrics included), its base
        (as ``get_base(resolve_path=False)``), whether it has a lineage edge to a local parent (:meth:`has_parents`)
        and, with ``repo_id``, whether a version of its adapter was pushed there on ``endpoint`` (:meth:`pushed_to`;
        None without ``repo_id``). Raises RefError (as :meth:`resolve`)."""
        r = parse_ref(ref)
        args = {"repo_id": repo_id or "", "endpoint": endpoint}
        with self.session() as s:
            row = None
            if r.name is not None and r.number is not None:  # name@N (what a push is given): one statement
                row = s.execute(_push_snapshot_query(by_id=False), {**args, "name": r.name, "number": r.number}).first()
            if row is None:  # any other REF, or one that does not resolve (then its RefError)
                row = s.execute(_push_snapshot_query(by_id=True), {**args, "id": self._resolve_row(s, ref).id}).one()
            m = dict(row._mapping)
            tags = s.scalars(select(Tag.name).where(Tag.version_id == m["id"])).all()
            current = mh.current_rows(self._metric_records(s, [m["id"]]).get(m["id"], []))
        info = VersionInfo(**{k: m[k] for k in m if not k.startswith("b_")}, tags=sorted(tags))
        info.metrics = mh.present(info.metrics, current)
        base = BaseInfo(info.base, m["b_source"], m["b_revision"], m["b_architecture"], info.base_fingerprint,
                        m["b_num_params"], Path(m["b_local_path"]) if m["b_local_path"] else Path(""), m["b_id"],
                        m["b_created_at"])
        return info, base, bool(m["b_has_parents"]), None if repo_id is None else bool(m["b_pushed"])

    def pull_snapshot(self, base: str | None, name: str) -> tuple[BaseInfo | None, list[Any]]:
        """What a pull reads of the catalog before it plans a version, in one read transaction (issue 19: a pull's
        fixed cost): the base called ``base`` (as ``get_base(resolve_path=False)``; None when there is none or
        ``base`` is None) and, for every version of adapter ``name`` (none when there is no such adapter), a row with
        its ``base`` name, ``hub_repo`` and ``hub_endpoint``, oldest first."""
        v, a, b = AdapterVersion.__table__.c, Adapter.__table__.c, BaseModel.__table__.c
        with self.session() as s:
            row = s.execute(select(*BaseModel.__table__.c).where(b.name == base)).first() if base is not None else None
            info = self._base_info(cast(BaseModel, row)) if row is not None else None
            versions = list(s.execute(
                select(b.name.label("base"), v.hub_repo, v.hub_endpoint)
                .select_from(AdapterVersion.__table__.join(Adapter.__table__, v.adapter_id == a.id)
                             .join(BaseModel.__table__, a.base_id == b.id))
                .where(a.name == name).order_by(v.number)).all())
        return info, versions

    def set_hub(self, ref: str, *, repo: str, commit: str | None, tag: str | None, endpoint: str | None,
                version_id: int | None = None) -> None:
        """Record the Hub coordinates of a pushed version. ``version_id``: the row ``ref`` resolved to (a push knows
        it): one UPDATE by id, without resolving ``ref`` again (RefError when that row is gone meanwhile)."""
        def txn() -> None:
            with self.session() as s:
                if version_id is not None:
                    t = AdapterVersion.__table__.c  # a Core UPDATE: no ORM object is loaded
                    done = s.execute(update(cast("Table", AdapterVersion.__table__)).where(t.id == version_id).values(
                        hub_repo=repo, hub_commit=commit, hub_tag=tag, hub_endpoint=endpoint))
                    if cast("CursorResult[Any]", done).rowcount != 1:
                        raise RefError(f"{ref} was removed from the catalog meanwhile; its Hub coordinates were "
                                       "not recorded")
                    return
                row = self._resolve_row(s, ref)
                row.hub_repo, row.hub_commit, row.hub_tag, row.hub_endpoint = repo, commit, tag, endpoint
        self._retry(txn)

    def list_versions(self, *, task: str | None = None, base: str | None = None, kind: str | None = None,
                      name: str | None = None, limit: int | None = None,
                      include_deprecated: bool = True, sort: str | None = None, descending: bool = False,
                      columns: Sequence[str] = (), tag: str | None = None, search: str | None = None,
                      on_hub: bool = False, offset: int = 0) -> list[VersionInfo]:
        """Versions filtered by task/base/kind/name, newest first (``include_deprecated=False`` leaves out
        versions retired with :meth:`deprecate`). ``tag``: only versions a tag of that name points at;
        ``search``: adapter name or task contains the text (any case); ``on_hub``: only pushed versions; ``offset``
        skips that many rows (pages of ``limit``; :meth:`count_versions` counts the same filters).

        One Core query over the version, adapter and base columns (no ORM objects, no per-row lazy loads)
        and one query for the tags: tens of thousands of rows a second even on a 1M-version catalog; with a
        ``limit``, the page's ids are found first over narrow rows and indexes, then their columns read.
        ``sort`` orders by a metric's current figure (versions without it last, then newest first; read from
        ``current_metrics``, a page at a time from its ``(name, value)`` index: :meth:`_sorted_page`); ``columns`` names further metrics the caller
        shows. Each version's ``metrics`` is the presented overlay (:func:`adapterhub.catalog.metrics.present`,
        every current figure, those of ``columns`` included), read with one more query.
        """
        if (limit is not None and limit < 0) or offset < 0:
            raise CatalogError(f"limit and offset must be >= 0, not {limit} and {offset}")
        if limit is not None and limit > db.SQL_INT_MAX:
            limit = None  # more rows than a catalog can hold: all of them (SQL's LIMIT takes a 64-bit integer)
        if offset > db.SQL_INT_MAX:
            return []
        v = AdapterVersion.__table__.c
        cols = _version_columns()  # labelled with VersionInfo's field names, so each row becomes VersionInfo(**row)
        # A page (``limit``) takes two steps: its ids, filtered and ordered through the indexes over narrow rows
        # (SQLite would otherwise sort whole rows, JSON columns and all, for every page), then their columns.
        narrow = bool(limit)
        filters: dict[str, Any] = {"task": task, "base": base, "kind": kind, "name": name, "tag": tag, "search": search,
                   "on_hub": on_hub, "include_deprecated": include_deprecated}
        q = self._version_filters(select(v.id) if narrow else select(*cols), join=not narrow, **filters)
        if sort and not narrow:  # only the sort metric is joined: `columns` figures come with the metrics overlay
            cm = CurrentMetric.__table__.c
            q = q.outerjoin(CurrentMetric.__table__, (cm.version_id == v.id) & (cm.name == sort))
            q = q.order_by(cm.value.is_(None), cm.value.desc() if descending else cm.value.asc())
        q = q.order_by(v.created_at.desc(), v.id.desc()).limit(limit or None).offset(offset or None)
        with self.session() as s:
            if narrow:  # a sorted page is read from the metric's index instead (_sorted_page)
                order = (self._sorted_page(s, sort, descending, int(limit or 0), offset, filters) if sort
                         else [r[0] for r in s.execute(q)])
                wide = self._version_filters(select(*cols), join=True)
                by_id: dict[int, Any] = {}
                for i in range(0, len(order), 900):  # stay under SQLite's bound-parameter limit
                    by_id.update({r.id: r for r in s.execute(wide.where(v.id.in_(order[i:i + 900])))})
                rows = [by_id[i] for i in order if i in by_id]
            else:
                rows = list(s.execute(q).all())
            tagmap: dict[int, list[str]] = {}
            ids = [r.id for r in rows]
            for i in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
                for vid, tname in s.execute(select(Tag.version_id, Tag.name).where(Tag.version_id.in_(ids[i:i + 900]))):
                    tagmap.setdefault(vid, []).append(tname)
            current = self._current_metrics(s, ids)
        out = [VersionInfo(**r._mapping, tags=sorted(tagmap.get(r.id, []))) for r in rows]
        for info in out:
            info.metrics = mh.present(info.metrics, current.get(info.id, []))
        return out

    @staticmethod
    def _version_filters(q: Any, *, task: str | None = None, base: str | None = None, kind: str | None = None,
                         name: str | None = None, tag: str | None = None, search: str | None = None,
                         on_hub: bool = False, include_deprecated: bool = True, join: bool = False) -> Any:
        """``q`` over versions, narrowed by :meth:`list_versions`' filters; joined with their adapter and base
        when ``join`` or a filter needs them (a query of version columns only then runs on its indexes)."""
        v, a, b = AdapterVersion.__table__.c, Adapter.__table__.c, BaseModel.__table__.c
        if join or base is not None or kind is not None or name is not None or search:
            q = q.select_from(AdapterVersion.__table__.join(Adapter.__table__, v.adapter_id == a.id)
                              .join(BaseModel.__table__, a.base_id == b.id))
        else:
            q = q.select_from(AdapterVersion.__table__)
        if task is not None:
            q = q.where(v.task == task)
        if kind is not None:
            q = q.where(a.kind == kind)
        if name is not None:
            q = q.where(a.name == name)
        if base is not None:
            q = q.where(b.name == base)
        if tag is not None:
            q = q.where(v.id.in_(select(Tag.version_id).where(Tag.name == tag)))
        if search:
            q = q.where(a.name.icontains(search, autoescape=True) | v.task.icontains(search, autoescape=True))
        if on_hub:
            q = q.where(v.hub_repo.is_not(None))
        if not include_deprecated:
            q = q.where(v.deprecated_at.is_(None))
        return q

    def count_versions(self, *, task: str | None = None, base: str | None = None, kind: str | None = None,
                       name: str | None = None, tag: str | None = None, search: str | None = None,
                       on_hub: bool = False, include_deprecated: bool = True) -> int:
        """How many versions :meth:`list_versions` returns with the same filters and no limit."""
        q = self._version_filters(select(func.count()), task=task, base=base, kind=kind, name=name, tag=tag,
                                  search=search, on_hub=on_hub, include_deprecated=include_deprecated)
        with self.session() as s:
            return int(s.scalar(q) or 0)

    def catalog_facets(self) -> dict[str, list[str]]:
        """The distinct tasks, kinds and tag names in the catalog, sorted (what a filter can choose from)."""
        v, a = AdapterVersion.__table__.c, Adapter.__table__.c
        with self.session() as s:
            tasks = s.scalars(select(v.task).where(v.task.is_not(None)).distinct().order_by(v.task)).all()
            kinds = s.scalars(select(a.kind).distinct().order_by(a.kind)).all()
            tags = s.scalars(select(Tag.name).distinct().order_by(Tag.name)).all()
        return {"tasks": [t for t in tasks if t is not None], "kinds": list(kinds), "tags": list(tags)}

    def metric_names(self, ids: Sequence[int]) -> list[str]:
        """The names of the metrics recorded for versions ``ids`` (any source), sorted."""
        m = MetricRow.__table__.c
        out: set[str] = set()
        with self.session() as s:
            for i in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
                out.update(s.scalars(select(m.name).where(m.version_id.in_(list(ids[i:i + 900]))).distinct()))
        return sorted(out)

    def _sorted_page(self, s: Session, metric: str, descending: bool, limit: int, offset: int,
                     filters: dict[str, Any]) -> list[int]:
        """The ids of one page of :meth:`list_versions` sorted by ``metric``: the versions with a current figure
        in value order (then newest first), read from the ``(name, value)`` index of ``current_metrics`` and
        stopped after the page; then, where the page runs past them, the versions without one, newest first.
        The same order as the single outer-joined query, without ordering the whole catalog."""
        v, cm = AdapterVersion.__table__.c, CurrentMetric.__table__.c
        value = cm.value.desc() if descending else cm.value.asc()
        on = (cm.version_id == v.id) & (cm.name == metric)
        has = self._version_filters(select(v.id), **filters).join(CurrentMetric.__table__, on)
        order = [r[0] for r in s.execute(has.order_by(value, v.created_at.desc(), v.id.desc())
                                         .limit(limit).offset(offset))]
        if len(order) == limit:
            return order
        # the page runs past the versions with the metric: how many there are decides where the rest starts
        n_has = offset + len(order) if order else int(s.scalar(
            self._version_filters(select(func.count()), **filters).join(CurrentMetric.__table__, on)) or 0)
        lacking = ~select(cm.version_id).where(cm.version_id == v.id, cm.name == metric).exists()
        rest = (self._version_filters(select(v.id), **filters).where(lacking)
                .order_by(v.created_at.desc(), v.id.desc()).limit(limit - len(order)).offset(max(0, offset - n_has)))
        return order + [r[0] for r in s.execute(rest)]

    def _current_metrics(self, s: Session, ids: Sequence[int]) -> dict[int, list[mh.MetricRecord]]:
        """The current rows of versions ``ids``: ``current_metrics`` (revision 0007, kept by
        :func:`adapterhub.catalog.current.upsert_current`) joined to the metric rows it names, in name order (as
        :func:`adapterhub.catalog.metrics.current_rows` gives them); one query per 900 ids."""
        m, cm = MetricRow.__table__.c, CurrentMetric.__table__.c
        out: dict[int, list[mh.MetricRecord]] = {}
        for i in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
            q = (select(m.version_id, m.name, m.value, m.n, m.full, m.split, m.source)
                 .join_from(MetricRow.__table__, CurrentMetric.__table__, cm.row_id == m.id)
                 .where(cm.version_id.in_(list(ids[i:i + 900]))).order_by(cm.version_id, cm.name))
            for r in s.execute(q):
                out.setdefault(r.version_id, []).append(mh.MetricRecord(
                    name=r.name, value=r.value, split=r.split, n=r.n, full=bool(r.full), dataset_hash=None,
                    scorer=None, source=r.source, created_at=None))
        return out

    def log(self, name: str) -> list[VersionInfo]:
        """All versions of adapter ``name``, oldest first."""
        validate_name(name, "adapter name")
        with self.session() as s:
            if s.scalar(select(Adapter.id).where(Adapter.name == name)) is None:
                raise RefError(f"unknown adapter {name!r}")
        return sorted(self.list_versions(name=name), key=lambda v: v.number)

    # -- retiring versions ------------------------------------------------------------------------

    def deprecate(self, ref: str, *, undo: bool = False) -> VersionInfo:
        """Retire a version: it stays resolvable by ref and hash (deployments, lineage and pulls keep
        working) but ``list_versions(include_deprecated=False)`` leaves it out. ``undo=True`` reinstates
        it. Idempotent: deprecating a deprecated version keeps its first time."""
        def txn() -> VersionInfo:
            with self.session() as s:
                row = self._resolve_row(s, ref)
                if undo:
                    row.deprecated_at = None
                elif row.deprecated_at is None:
                    row.deprecated_at = dt.datetime.now(dt.timezone.utc)
                s.flush()
                return _version_info(row, row.adapter.base)
        return cast(VersionInfo, self._retry(txn))

    def is_deprecated(self, ref: str) -> bool:
        """Whether the version ``ref`` names was retired with :meth:`deprecate`."""
        with self.session() as s:
            return self._resolve_row(s, ref).deprecated_at is not None

    def remove(self, ref: str) -> VersionInfo:
        """Delete a version's catalog row (its blob stays in the store until ``gc``).

        Refused with CatalogError, naming what needs the version, when a deployment's stack or history
        (rollback targets), a lineage edge (as the parent) or a tag refers to it, and when it is the newest
        of several versions (its number would be handed out again: deprecate it instead). Removing an
        adapter's only version removes the adapter name too.
        """
        from .catalog.models import Deployment, DeploymentEvent, MetricRow

        def txn() -> VersionInfo:
            with self.session() as s:
                row = self._resolve_row(s, ref)
                vref = f"{row.adapter.name}@{row.number}"
                info = _version_info(row, row.adapter.base)
                for d in s.scalars(select(Deployment).order_by(Deployment.name)):
                    if any(isinstance(l, dict) and l.get("version_id") == row.id for l in d.stack or []):
                        raise CatalogError(f"{vref} is in deployment {d.name!r}'s stack; revert it there first")
                ev = s.execute(select(Deployment.name, DeploymentEvent.seq, DeploymentEvent.stack)
                               .join(Deployment, DeploymentEvent.deployment_id == Deployment.id)
                               .order_by(Deployment.name, DeploymentEvent.seq)).all()
                for dname, seq, stack in ev:
                    if any(isinstance(l, dict) and l.get("version_id") == row.id for l in stack or []):
                        raise CatalogError(f"{vref} is needed by deployment {dname!r}'s history (event {seq} "
                                           "can be rolled back to); deprecate it instead")
                if s.scalar(select(func.count()).select_from(DeploymentEvent)
                            .where(DeploymentEvent.version_id == row.id)):
                    raise CatalogError(f"{vref} is recorded in a deployment's history; deprecate it instead")
                child = s.execute(select(Adapter.name, AdapterVersion.number).select_from(LineageEdge)
                                  .join(AdapterVersion, LineageEdge.child_id == AdapterVersion.id)
                                  .join(Adapter, AdapterVersion.adapter_id == Adapter.id)
                                  .where(LineageEdge.parent_id == row.id).limit(1)).first()
                if child is not None:
                    raise CatalogError(f"{vref} is a parent of {child[0]}@{child[1]} (lineage); deprecate it instead")
                tags = s.scalars(select(Tag.name).where(Tag.version_id == row.id).order_by(Tag.name)).all()
                if tags:
                    raise CatalogError(f"{vref} is tagged {', '.join(tags)}; untag it first")
                others = s.scalar(select(func.count()).select_from(AdapterVersion)
                                  .where(AdapterVersion.adapter_id == row.adapter_id, AdapterVersion.id != row.id))
                newest = s.scalar(select(func.max(AdapterVersion.number))
                                  .where(AdapterVersion.adapter_id == row.adapter_id))
                if others and row.number == newest:
                    raise CatalogError(f"{vref} is the newest version of {row.adapter.name}; removing it would let "
                                       "the next version reuse its number: deprecate it instead")
                s.execute(delete(LineageEdge).where(LineageEdge.child_id == row.id))
                s.execute(delete(MetricRow).where(MetricRow.version_id == row.id))
                s.execute(delete(CurrentMetric).where(CurrentMetric.version_id == row.id))
                adapter_id = row.adapter_id
                s.delete(row)
                s.flush()
                if not others:
                    s.execute(delete(Tag).where(Tag.adapter_id == adapter_id))
                    s.execute(delete(Adapter).where(Adapter.id == adapter_id))
                return info
        return cast(VersionInfo, self._retry(txn))

    # -- tags -------------------------------------------------------------------------------------

    def tag(self, ref: str, tag: str) -> VersionInfo:
        """Point ``tag`` of the ref's adapter at that version (moves an existing tag)."""
        validate_name(tag, "tag")
        if tag.isdigit():
            raise NameError_(f"tag {tag!r} would be read as a version number")
        if tag == "latest":
            raise NameError_("tag 'latest' is reserved: name@latest is always the newest version")

        def txn() -> VersionInfo:
            with self.session() as s:
                row = self._resolve_row(s, ref)
                t = s.scalar(select(Tag).where(Tag.adapter_id == row.adapter_id, Tag.name == tag))
                if t is None:
                    s.add(Tag(adapter_id=row.adapter_id, name=tag, version_id=row.id))
                else:
                    t.version_id = row.id
                    t.updated_at = dt.datetime.now(dt.timezone.utc)
                s.flush()
                return _version_info(row, row.adapter.base, [tag])
        return self._retry(txn)

    def untag(self, name: str, tag: str) -> None:
        """Remove ``tag`` from adapter ``name``; raises RefError if either is unknown (also when another
        process removed the tag meanwhile). One DELETE statement, retried on a busy catalog."""
        def txn() -> None:
            with self.session() as s:
                a = s.scalar(select(Adapter).where(Adapter.name == name))
                if a is None:
                    raise RefError(f"unknown adapter {name!r}")
                gone = cast("CursorResult[Any]", s.execute(delete(Tag).where(Tag.adapter_id == a.id, Tag.name == tag))).rowcount
                if not gone:
                    raise RefError(f"{name} has no tag {tag!r}")
        self._retry(txn)

    # -- lineage ----------------------------------------------------------------------------------

    def lineage(self, ref: str, *, direction: str = "ancestors", max_depth: int | None = None) -> list[dict[str, Any]]:
        """All ancestors (or descendants) of a version as edges, found with one recursive CTE.

        Each edge: {"child", "parent", "relation", "weight", "params", "depth"} with refs ``name@N``
        (parent None for imported_from provenance). ``max_depth``: only edges at most that many steps away
        (the walk stops there: a picture of a huge graph reads only what it draws).
        """
        if direction not in ("ancestors", "descendants"):
            raise CatalogError("direction must be ancestors or descendants")
        if max_depth is not None and max_depth < 1:
            raise CatalogError("max_depth must be at least 1")
        info = self.resolve(ref)
        # one walk for both directions: follow edges from `near` (the side we stand on) to `far`
        near, far = ("child_id", "parent_id") if direction == "ancestors" else ("parent_id", "child_id")
        sql = f"""
            WITH RECURSIVE walk(edge_id, child_id, parent_id, depth) AS (
                SELECT e.id, e.child_id, e.parent_id, 1 FROM lineage_edges e WHERE e.{near} = :vid
                UNION
                SELECT e.id, e.child_id, e.parent_id, w.depth + 1 FROM lineage_edges e
                JOIN walk w ON e.{near} = w.{far} WHERE w.depth < :max_depth
            )
            SELECT edge_id, MIN(depth) FROM walk GROUP BY edge_id"""
        with self.session() as s:
            depth = {eid: d for eid, d in s.execute(text(sql), {"vid": info.id, "max_depth": max_depth or 10000})}
            return self._edge_dicts(s, depth)

    @staticmethod
    def _edge_dicts(s: Session, depth: dict[int, int]) -> list[dict[str, Any]]:
        """Edge ids with their depth -> sorted edge records with ``name@N`` refs."""
        if not depth:
            return []
        edges = s.scalars(select(LineageEdge).where(LineageEdge.id.in_(list(depth)))).all()
        vids = {e.child_id for e in edges} | {e.parent_id for e in edges if e.parent_id is not None}
        # only (id, name, number): loading whole version rows (JSON columns) cost 10x the CTE itself
        refs = {vid: f"{aname}@{num}" for vid, aname, num in s.execute(
            select(AdapterVersion.id, Adapter.name, AdapterVersion.number)
            .join(Adapter, AdapterVersion.adapter_id == Adapter.id).where(AdapterVersion.id.in_(list(vids))))}
        out = [{"child": refs[e.child_id], "parent": refs.get(e.parent_id) if e.parent_id else None,
                "relation": e.relation, "weight": e.weight, "params": e.params, "depth": depth[e.id]}
               for e in edges]
        return sorted(out, key=lambda e: (e["depth"], e["child"], e["parent"] or ""))

    def parents(self, ref: str) -> list[dict[str, Any]]:
        """Direct lineage edges of a version (depth-1 ancestors), without walking further up."""
        info = self.resolve(ref)
        with self.session() as s:
            ids = s.scalars(select(LineageEdge.id).where(LineageEdge.child_id == info.id)).all()
            return self._edge_dicts(s, {i: 1 for i in ids})

    # -- integrity --------------------------------------------------------------------------------

    def referenced_hashes(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(AdapterVersion.content_hash)).all())

    def gc(self, *, dry_run: bool = False, grace_s: float = 0.0) -> GcResult:
        """Remove blobs no version references (and temp files of interrupted writes in the store).

        ``grace_s``: keep orphans younger than this (safe while other processes register versions).
        Deployment folders are the deployments' business: :func:`adapterhub.repair.gc` adds their temp files.
        """
        return self.store.gc(self.referenced_hashes, dry_run=dry_run, grace_s=grace_s)

    def verify(self, refs: Sequence[str] = (), *, on_progress: Callable[[int, int], None] | None = None
               ) -> dict[str, Any]:
        """Re-hash the blobs of ``refs`` (default all versions) and check catalog <-> store.
        :func:`adapterhub.repair.verify` adds every deployment (weights, marker, undo records).

        ``on_progress(done, total)``, if given, is called after each version (the CLI draws a progress bar).
        Returns {"checked": n, "problems": [..], "orphans": [digests in the store no version references]}.
        """
        problems: list[str] = []
        if refs:
            infos = [self.resolve(r) for r in refs]
        else:
            infos = self.list_versions()
        for i, v in enumerate(infos):
            p = self.store.verify(v.content_hash)
            if p is not None:
                problems.append(f"{v.ref}: {p}")
            if on_progress is not None:
                on_progress(i + 1, len(infos))
        orphans = sorted(set(self.store.iter_digests()) - self.referenced_hashes()) if not refs else []
        return {"checked": len(infos), "problems": problems, "orphans": orphans}


def open_workspace(home: str | None = None, db_url: str | None = None) -> Workspace:
    """Shorthand for :meth:`Workspace.open`."""
    return Workspace.open(home, db_url)


def _load_hashed(data: bytes, *, allow_nonfinite: bool, source: str) -> fmt.SparseAdapter | fmt.ScannedAdapter:
    """:func:`adapterhub.format.load_canonical` of ``data`` with its sha256 (the version's content hash) computed
    at the same time on a second thread (hashlib releases the GIL on large buffers), so a large file costs about
    one pass of the slower of the two instead of both; the digest is kept as the adapter's ``source_sha256``."""
    from . import format as fmt

    if len(data) < (1 << 20):
        return fmt.load_canonical(data, allow_nonfinite=allow_nonfinite, source=source)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        digest = pool.submit(sha256_hex, data)
        adapter = fmt.load_canonical(data, allow_nonfinite=allow_nonfinite, source=source)
        adapter.source_sha256 = digest.result()
    return adapter


def _granularity(adapter: fmt.SparseAdapter) -> str | None:
    layouts = {p.layout for p in adapter.params.values()}
    return layouts.pop() if len(layouts) == 1 else ("mixed" if layouts else None)


def _block_size(adapter: fmt.SparseAdapter) -> int | None:
    sizes = {p.block_size for p in adapter.params.values() if p.block_size}
    return sizes.pop() if len(sizes) == 1 else None


__all__ = ["Workspace", "Parent", "NewVersion", "BaseInfo", "VersionInfo", "open_workspace", "retry_on_busy", "AdapterHubError"]

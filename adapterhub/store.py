"""Content-addressed blob store: ``<home>/blobs/sha256/ab/cdef...`` keyed by the sha256 of the bytes."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeGuard

from .errors import StoreError
from .fsutil import atomic_write_bytes, fsync_dir, sha256_file, sha256_hex

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


class Chunked(Protocol):
    """Bytes written piece by piece (``adapterhub.format.PackedAdapter``): never joined in memory."""

    def chunks(self) -> Iterable[bytes]: ...

    def __len__(self) -> int: ...


def _write_blob(path: Path, data: bytes | Chunked) -> None:
    """``atomic_write_bytes`` (temp file, fsync, rename, directory fsync); chunked data is written piece by piece."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        atomic_write_bytes(path, bytes(data) if not isinstance(data, bytes) else data)
    else:
        atomic_write_bytes(path, data.chunks())


STAGE_MIN_BYTES = 1 << 20  # smaller bytes are written after their checks: a worker thread would cost more


def can_stage(store: object, nbytes: int) -> TypeGuard[BlobStore]:
    """Whether ``nbytes`` bytes bound for ``store`` are worth staging (:meth:`BlobStore.stage`): a local store
    and at least :data:`STAGE_MIN_BYTES` (what ``register`` and ``pull`` both ask)."""
    return nbytes >= STAGE_MIN_BYTES and isinstance(store, BlobStore)


WRITEBACK_BYTES = 8 * 1024 ** 2  # a streamed stage starts the disk write of every this many bytes as it goes


@functools.cache
def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)`` of the C library (Linux), else None.

    It starts the write-back of those pages and returns without waiting (no durability of its own: the stage's
    :func:`os.fsync` stays what makes the bytes durable). A streamed download calls it behind itself, so by
    the time the last chunk arrives most of the file is on its way to the disk and the final fsync only waits
    for the tail (issue 19: a pull's fsync was a large part of its own time on a large adapter)."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; an error is the final fsync's to report

    return start


def _locked_temp(folder: Path) -> tuple[int, Path | None]:
    """A new temp file ``.staged.<random>.tmp`` in ``folder``, open and ``flock``\ ed: (its fd, its path). It is made
    as ``.staged.<random>.new`` (a name ``gc`` leaves alone while young), locked, and only then linked under its
    ``.tmp`` name, so ``gc`` never sees a staged ``.tmp`` file that is not locked by a live process."""
    while True:
        fd, new = tempfile.mkstemp(prefix=".staged.", suffix=".new", dir=folder)
        tmp: Path | None = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(FileExistsError):  # a .tmp of that name already: another name
                os.link(new, new[: -len(".new")] + ".tmp")
                tmp = Path(new[: -len(".new")] + ".tmp")
        finally:
            os.unlink(new)
            if tmp is None:
                os.close(fd)
        if tmp is not None:
            return fd, tmp


class StagedBlob:
    """Bytes being written to a temp file of the store (write + fsync) on a worker thread, started before their
    digest is known, so the write and its fsync overlap the caller's validation and hashing of the same bytes.

    Two ways to fill it: given ``data``, the whole bytes are written at once; without, the caller :meth:`feed`\ s
    chunks as they arrive (a download) and :meth:`end` returns the sha256 of exactly the bytes written and starts
    the fsync. Fed chunks are hashed and written on the worker thread, overlapping the transfer (``threaded``,
    for large downloads), or in the feeding thread (cheaper for small ones: no hand-over per chunk).

    :meth:`BlobStore.put_bytes` given ``staged=`` with the *same* bytes object renames the temp file into place
    (no second write); in every other case the temp file is removed (:meth:`discard`, also on exit of the
    ``with`` block). The temp file is ``flock``\ ed by this process until it is renamed or removed, and ``gc``
    leaves a locked temp file alone (:meth:`BlobStore.gc`): a collection between the staging and the register
    (which holds the store's shared lock only while it renames and commits) cannot take it; a temp file left by
    a killed process is unlocked (the kernel drops the lock with the process) and removed by ``gc``.
    """

    def __init__(self, folder: Path, data: bytes | None = None, *, threaded: bool = True) -> None:
        self.data = data
        self._error: BaseException | None = None
        fd, self.tmp = _locked_temp(folder)
        self._lock_fd: int | None = fd  # held (flock) until renamed or removed: gc skips the file meanwhile
        self._queue: queue.SimpleQueue[bytes | None] | None = None
        self._hash: Any = None if data is not None else hashlib.sha256()
        self._streaming = data is None
        self._hashed = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # an inline feed and the closing of its fd never interleave
        try:
            if data is not None:
                self._thread = threading.Thread(target=self._write, args=(os.dup(fd),), name="adapterhub-stage",
                                                daemon=True)
            elif threaded:
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._pump, args=(os.dup(fd),), name="adapterhub-stage",
                                                daemon=True)
            if self._thread is not None:
                self._thread.start()
        except BaseException:
            self._close()
            raise

    def _write(self, fd: int) -> None:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.data)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by wait()
            self._error = e

    def _pump(self, fd: int) -> None:
        """The streaming worker: hash and write each fed chunk; at the end (None), fsync."""
        assert self._queue is not None
        writeback = _sync_file_range()
        written = flushed = 0
        try:
            with os.fdopen(fd, "wb") as f:
                while (chunk := self._queue.get()) is not None:
                    self._hash.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
                    if writeback is not None and written - flushed >= WRITEBACK_BYTES:
                        f.flush()  # the kernel's pages are written back from here on, while the download goes on
                        writeback(f.fileno(), flushed, written - flushed)
                        flushed = written
                f.flush()
                self._hashed.set()
                os.fsync(f.fileno())
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by end() / wait()
            self._error = e
        finally:
            self._hashed.set()

    def _sync(self, fd: int) -> None:
        """The fsync of a stage fed in the caller's thread (``threaded=False``), on a worker thread."""
        try:
            os.fsync(fd)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by wait()
            self._error = e
        finally:
            os.close(fd)

    def feed(self, chunk: bytes) -> None:
        """Hash and write ``chunk`` (streaming mode): queued to the worker thread, or, for a stage made with
        ``threaded=False``, right here. Raises the write's OSError (once it failed)."""
        if self._error is not None:
            raise self._failure()
        if self._queue is not None:
            if self._hashed.is_set():
                raise StoreError("internal: feed() after end() or discard()")
            self._queue.put(chunk)
            return
        with self._mutex:  # (a download abandoned at its deadline may still feed while the pull discards this)
            if not self._streaming or self._hashed.is_set() or self._lock_fd is None:
                raise StoreError("internal: feed() on a staged blob made from whole bytes, or after end()")
            self._hash.update(chunk)
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(self._lock_fd, view):]
            except OSError as e:
                self._error = e
                raise self._failure() from None

    def _failure(self) -> BaseException:
        """The write's error as a one-line StoreError (an OSError: no space left...), else as it was."""
        e = self._error
        assert e is not None
        return _write_error(e, "(staged)") if isinstance(e, OSError) else e

    def end(self, data: bytes) -> str:
        """Finish a streamed stage: ``data`` must be the fed chunks joined (what ``put_bytes`` will be given). Waits
        until every chunk is written and returns their sha256; the fsync goes on in the background (:meth:`wait`).
        Raises the write's OSError."""
        if not self._streaming:
            raise StoreError("internal: end() on a staged blob made from whole bytes")
        if self._queue is not None:
            self._queue.put(None)
            self._hashed.wait()
        else:
            self._hashed.set()
            if self._error is None and self._lock_fd is not None:
                self._thread = threading.Thread(target=self._sync, args=(os.dup(self._lock_fd),),
                                                name="adapterhub-stage", daemon=True)
                self._thread.start()
        if self._error is not None:
            raise self._failure()
        self.data = data
        return str(self._hash.hexdigest())

    def wait(self) -> Path:
        """The temp file, written and fsynced. Raises the write's OSError."""
        if self._streaming and not self._hashed.is_set():
            raise StoreError("internal: a streamed staged blob was used before end()")
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self.tmp is None:
            raise StoreError("internal: a staged blob was used after it was discarded")
        return self.tmp

    def _close(self) -> None:
        """Remove the temp file (if still there), then drop the lock."""
        with self._mutex:
            self._hashed.set()  # no feed after this
            if self.tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp)
                self.tmp = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def placed(self) -> None:
        """The temp file was renamed into place: forget it and drop the lock."""
        self.tmp = None
        self._close()

    def discard(self) -> None:
        """Stop and wait for the write and remove the temp file (a no-op once renamed into place), and the staging
        folder with it when that leaves it empty (a refused pull or register leaves no trace)."""
        if self._queue is not None and not self._hashed.is_set():
            self._queue.put(None)
        self._hashed.set()
        if self._thread is not None:
            self._thread.join()
        if self.tmp is not None:
            folder = self.tmp.parent
            self._close()
            with contextlib.suppress(OSError):  # not empty (another process stages there): kept
                folder.rmdir()
        self._close()

    def __enter__(self) -> StagedBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def _write_error(e: OSError, digest: str) -> StoreError:
    """One-line StoreError for a failed blob write (ENOSPC, EDQUOT, EROFS, EIO...)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left on device writing blob {digest[:12]} to the store; the store "
                          "is unchanged (free some space and run the command again)")
    return StoreError(f"cannot write blob {digest[:12]} to the store: {e.strerror or ' '.join(str(e).split())[:200] or e.__class__.__name__}")


@dataclass
class GcResult:
    removed: list[str]
    freed_bytes: int
    temp_files_removed: int
    kept_recent: list[str] = field(default_factory=list)
    empty_folders_removed: int = 0


class _VerifiedReads:
    """What both stores derive from their verified ``get_bytes``."""

    def get_bytes(self, digest: str) -> bytes:
        raise NotImplementedError

    def verify(self, digest: str) -> str | None:
        """None if the blob is present and intact, else a one-line problem description."""
        try:
            self.get_bytes(digest)
        except StoreError as e:
            return str(e)
        return None


class BlobStore(_VerifiedReads):
    """Immutable blobs addressed by sha256. Writes are atomic; reads are verified."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        for p in (self.root, self.root.parent):  # a planted symlink would send writes outside the home
            if p.is_symlink():
                raise StoreError(f"{p} is a symlink; refusing to use it as the blob store")
        self.root.mkdir(parents=True, exist_ok=True)

    def _shard(self, digest: str) -> Path:
        """The blob's shard folder; raises StoreError if it is a symlink (planted to escape the store)."""
        d = self.path(digest).parent
        if d.is_symlink():
            raise StoreError(f"store folder {d.name} is a symlink; refusing to follow it")
        return d

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (validates the digest: no path tricks)."""
        if not isinstance(digest, str) or not _HEX_RE.match(digest):
            raise StoreError(f"invalid blob digest {digest!r}")
        return self.root / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        p = self.path(digest)
        return p.is_file() and not p.is_symlink() and not p.parent.is_symlink()

    def stage(self, data: bytes | None = None, *, threaded: bool = True) -> StagedBlob:
        """Start writing ``data`` to a temp file of the store now, or, without ``data``, open one to be fed chunk by
        chunk (see :class:`StagedBlob`; ``threaded=False``: hashed and written in the feeding thread, only the
        fsync on a worker: cheaper for small downloads). The temp file's own lock keeps ``gc`` off it until it is put or
        discarded, so no store lock is needed meanwhile. Raises StoreError for a symlink in the way."""
        folder = self.root / "staging"
        if folder.is_symlink():
            raise StoreError(f"{folder} is a symlink; refusing to write through it")
        try:
            for attempt in range(3):
                folder.mkdir(exist_ok=True)
                try:
                    return StagedBlob(folder, data, threaded=threaded)
                except FileNotFoundError:  # an emptied staging folder removed meanwhile (StagedBlob.discard)
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        except OSError as e:
            raise _write_error(e, "(staged)") from None

    def put_bytes(self, data: bytes | Chunked, *, digest: str | None = None, staged: StagedBlob | None = None) -> str:
        """Store ``data`` (idempotent) and return its sha256 hex digest.

        ``staged`` (from :meth:`stage`) holding this very ``data`` object is renamed into place instead of
        writing the bytes again; otherwise it is ignored (the caller discards it).

        ``digest`` is the caller's sha256 of these very bytes (``register`` hashes them once and passes it, so
        they are not hashed twice); never pass a digest not computed from ``data``. ``data`` may be chunked
        (a merge's packed result, written piece by piece; then ``digest`` is required).
        A blob already present is re-hashed: if its bytes no longer match (bit rot, a torn copy, tampering)
        it is replaced atomically by ``data``, so re-registering or pulling the good bytes heals the store
        instead of giving the new version the bad ones. Raises StoreError (one line) for a symlink in the
        way or a failed write (``no space left on device``...); no temp file is left behind.
        """
        if digest is None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise StoreError("internal: chunked data needs its digest")
            digest = sha256_hex(data)
        p = self.path(digest)
        self._shard(digest)
        if self.has(digest) and (self._same_bytes(p, data) if isinstance(data, (bytes, bytearray, memoryview))
                                 else self._intact(p, digest)):
            try:  # refresh the mtime: a grace-period gc must not take a blob a register is about to reference
                os.utime(p)
            except OSError:
                pass
            return digest
        if p.is_symlink():
            raise StoreError(f"refusing to write through a symlink at {p}")
        try:
            if staged is not None and staged.data is data and self._place(staged, p):
                return digest
            _write_blob(p, data)  # temp file, fsync, rename: replaces a corrupt blob atomically
        except OSError as e:
            raise _write_error(e, digest) from None
        return digest

    @staticmethod
    def _place(staged: StagedBlob, p: Path) -> bool:
        """Rename a staged temp file to ``p`` and fsync its folder; False (nothing done) if the rename crosses
        file systems. Raises the staged write's OSError."""
        tmp = staged.wait()
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, p)
        except OSError as e:
            if e.errno == errno.EXDEV:
                return False
            raise
        staged.placed()
        fsync_dir(p.parent)
        return True

    @staticmethod
    def _same_bytes(p: Path, data: bytes | bytearray | memoryview) -> bool:
        """True if the file at ``p`` holds exactly ``data`` (whose sha256 is the blob's digest): the same answer
        as :meth:`_intact`, by comparing instead of hashing (False if it cannot be read)."""
        mv = memoryview(data).cast("B")
        try:
            with open(p, "rb") as f:
                if os.fstat(f.fileno()).st_size != mv.nbytes:
                    return False
                at = 0
                while at < mv.nbytes:
                    chunk = f.read(min(1 << 22, mv.nbytes - at))
                    if not chunk or chunk != mv[at:at + len(chunk)]:
                        return False
                    at += len(chunk)
                return True
        except OSError:
            return False

    @staticmethod
    def _intact(p: Path, digest: str) -> bool:
        """True if the file at ``p`` hashes to ``digest`` (streamed; False if it cannot be read)."""
        try:
            return sha256_file(p) == digest
        except OSError:
            return False

    def get_bytes(self, digest: str) -> bytes:
        """Read a blob and verify its hash; raises StoreError if missing or corrupt."""
        p = self.path(digest)
        self._shard(digest)
        if p.is_symlink():
            raise StoreError(f"blob {digest[:12]} is a symlink; refusing to follow it")
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:12]} is missing from the store") from None
        if sha256_hex(data) != digest:
            raise StoreError(f"blob {digest[:12]} is corrupt: its bytes no longer match their hash")
        return data

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool) -> Iterator[None]:
        """The store's writer/collector lock (``flock`` on ``<root>/.lock``).

        A writer holds it shared from writing a blob until the catalog row that references it is
        committed (``Workspace.register``); ``gc`` holds it exclusively. So a collection waits for
        in-flight registrations and never removes a blob between its write and its commit, whatever
        the grace period. A killed process releases it with its file descriptors.
        """
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:  # e.g. a symlink planted as the lock file (O_NOFOLLOW)
            raise StoreError(f"cannot open the blob store lock {self.root / '.lock'}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def iter_digests(self) -> Iterator[str]:
        if not self.root.exists():
            return
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or d.is_symlink() or len(d.name) != 2:
                continue
            for f in sorted(d.iterdir()):
                name = d.name + f.name
                if _HEX_RE.match(name) and f.is_file():
                    yield name

    def delete(self, digest: str) -> int:
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
            return size
        except FileNotFoundError:
            return 0

    def gc(self, referenced: Callable[[], Iterable[str]] | Iterable[str], *, dry_run: bool = False,
           grace_s: float = 0.0) -> GcResult:
        """Remove blobs not referenced and stale temp files from interrupted writes.

        ``referenced`` is the set of live digests, or a function returning it. With ``grace_s > 0``,
        orphans modified less than that many seconds ago are kept (``put_bytes`` refreshes the time of
        a blob it finds present), and a function is called again just before deleting, so a blob
        being registered by another process right now is not removed under it.
        """
        with self.lock(exclusive=True):
            return self._gc(referenced, dry_run=dry_run, grace_s=grace_s)

    def _gc(self, referenced: Callable[[], Iterable[str]] | Iterable[str], *, dry_run: bool, grace_s: float) -> GcResult:
        get_refs = referenced if callable(referenced) else (lambda r=set(referenced): r)
        keep = set(get_refs())
        now = time.time()
        candidates: list[str] = []
        kept: list[str] = []
        for digest in list(self.iter_digests()):
            if digest in keep:
                continue
            try:
                age = now - self.path(digest).stat().st_mtime
            except FileNotFoundError:
                continue
            (kept if grace_s > 0 and age < grace_s else candidates).append(digest)
        if candidates and grace_s > 0 and callable(referenced):
            live = set(get_refs())
            candidates = [d for d in candidates if d not in live]
        removed: list[str] = []
        freed = 0
        for digest in candidates:
            removed.append(digest)
            freed += self.path(digest).stat().st_size if dry_run else self.delete(digest)
        temps = 0
        for d in self.root.iterdir() if self.root.exists() else []:
            if d.is_dir() and not d.is_symlink():
                for f in [*d.glob(".*.tmp"), *d.glob(".staged.*.new")]:
                    try:
                        young = max(grace_s, 3600.0 if f.suffix == ".new" else 0.0)  # .new: see _locked_temp
                        if young > 0 and now - f.stat().st_mtime < young:
                            continue
                    except FileNotFoundError:
                        continue
                    with _unless_held(f) as free:  # a staged file a live process still holds is not stale
                        if not free:
                            continue
                        temps += 1
                        if not dry_run:
                            f.unlink(missing_ok=True)
        return GcResult(removed, freed, temps, kept, self._remove_empty_folders(dry_run=dry_run))

    def _remove_empty_folders(self, *, dry_run: bool) -> int:
        """Remove shard folders (and ``staging/``) left empty by deleted blobs or a refused registration; the
        caller holds the store lock exclusively, so no writer is between creating a folder and filling it
        (:meth:`stage` retries when its folder goes meanwhile). ``dry_run`` counts the folders empty now."""
        n = 0
        for d in sorted(self.root.iterdir()) if self.root.exists() else []:
            if not ((len(d.name) == 2 and _HEX_RE.match(d.name + "0" * 62)) or d.name == "staging"):
                continue
            if d.is_symlink() or not d.is_dir():
                continue
            try:
                if any(d.iterdir()):
                    continue
                if not dry_run:
                    d.rmdir()  # fails (and is skipped) if something arrived meanwhile
            except OSError:
                continue
            n += 1
        if n and not dry_run:
            fsync_dir(self.root)
        return n


@contextlib.contextmanager
def _unless_held(path: Path) -> Iterator[bool]:
    """Yield False when another open file holds ``path``'s ``flock`` (a :class:`StagedBlob` of a live process),
    else True, holding the lock meanwhile so no one takes it up while ``gc`` removes the file. A symlink or a
    file that cannot be opened is not held by anyone: True."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# -- shared object store (S3-compatible, through fsspec/s3fs) -------------------------------------------

_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9._\-/]*$")


class _SecretFilter(logging.Filter):
    """Rewrites log records of the S3 stack (botocore logs request headers at DEBUG) without the
    current AWS credentials, like the Hub client does with its token."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = [v for v in (os.environ.get(n) for n in _SECRET_ENV) if v and len(v) >= 4]
        if not secrets:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is not ours to fix
            return True
        clean = msg
        for v in secrets:
            clean = clean.replace(v, "***")
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and any(v in str(record.exc_info[1]) for v in secrets):
            record.exc_info, record.exc_text = None, None
        return True


_SECRET_FILTER = _SecretFilter()
_S3_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "aiohttp")


def _install_secret_filter() -> None:
    """Attach the filter to every logger of the S3 stack (a filter does not apply to children's records)."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _S3_LOGGERS]
    for name in [*names, *_S3_LOGGERS]:
        lg = logging.getLogger(name)
        if _SECRET_FILTER not in lg.filters:
            lg.addFilter(_SECRET_FILTER)


def _endpoint_from_env() -> str | None:
    """The S3 endpoint for S3-compatible servers: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (validated)."""
    ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not ep:
        return None
    from urllib.parse import urlsplit

    u = urlsplit(ep)
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password or u.query or u.fragment:
        raise StoreError("AWS_ENDPOINT_URL must be an http(s)://host[:port] URL without credentials")
    return ep


class ObjectStore(_VerifiedReads):
    """The blob store in an S3 bucket (``s3://bucket/prefix``), shared by every home of a team.

    Same contract as :class:`BlobStore`: keys ``<prefix>/ab/cdef...`` named by the sha256 of the bytes,
    reads re-hashed, puts atomic (one S3 PUT: an object appears under its key only once its whole
    body is received, so there is never a partial object under a final key). ``put_bytes`` always
    uploads, which heals a mismatching object and refreshes its LastModified time (gc's grace clock).

    Guarantees across homes: the :meth:`lock` is a local ``flock`` only (it orders register and gc of
    one home). A ``gc`` in one home may race a register in another, so on a shared store run gc with a
    grace period longer than any registration takes (``gc --grace``): an object uploaded less than
    ``grace_s`` ago is kept, and the references are read again just before deleting.

    Credentials come from the standard AWS chain (env, profile, instance role) and are never part of
    the URL, an error message or a log line of this class.
    """

    def __init__(self, url: str, cache_dir: str | os.PathLike[str]) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        if u.scheme != "s3":
            raise StoreError(f"unsupported store URL scheme {u.scheme or '(none)'!r}: use s3://bucket/prefix "
                             "or a local folder")
        if u.username or u.password or "@" in u.netloc:
            raise StoreError("the store URL must not contain credentials (use AWS_ACCESS_KEY_ID / a profile)")
        bucket, prefix = u.netloc, u.path.strip("/")
        if not _BUCKET_RE.match(bucket) or u.query or u.fragment:
            raise StoreError(f"invalid S3 bucket in the store URL: {bucket!r}")
        if not _PREFIX_RE.match(prefix) or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
            raise StoreError(f"invalid key prefix in the store URL: {prefix!r}")
        self.url = f"s3://{bucket}" + (f"/{prefix}" if prefix else "")
        self.root_key = f"{bucket}/{prefix}" if prefix else bucket
        self.cache_dir = Path(cache_dir)
        self.endpoint = _endpoint_from_env()
        self._fs: Any = None

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    # -- plumbing --------------------------------------------------------------------------------------
    @property
    def fs(self) -> Any:
        if self._fs is None:
            try:
                import importlib

                s3fs: Any = importlib.import_module("s3fs")  # optional: `pip install 'adapterhub[s3]'`
            except ImportError:
                raise StoreError("an s3:// store needs s3fs: pip install 'adapterhub[s3]'") from None
            kw: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
            if self.endpoint:
                kw["client_kwargs"] = {"endpoint_url": self.endpoint}
            self._fs = s3fs.S3FileSystem(**kw)
            _install_secret_filter()
        return self._fs

    def _scrub(self, text: str) -> str:
        for name in _SECRET_ENV:
            v = os.environ.get(name)
            if v and len(v) >= 4:
                text = text.replace(v, "***")
        return " ".join(text.split())[:300]

    def _error(self, what: str, e: BaseException) -> StoreError:
        msg = self._scrub(str(e)) or e.__class__.__name__
        return StoreError(f"{what} in the store {self.url}: {msg}")

    def key(self, digest: str) -> str:
        """The object key of ``digest`` (validates the digest)."""
        if not isinstance(digest, str) or not _HEX_RE.match(digest):
            raise StoreError(f"invalid blob digest {digest!r}")
        return f"{self.root_key}/{digest[:2]}/{digest[2:]}"

    # -- the BlobStore interface --------------------------------------------------------------------
    def has(self, digest: str) -> bool:
        k = self.key(digest)
        try:
            return bool(self.fs.exists(k))
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore / aiohttp errors: one line, secrets scrubbed
            raise self._error(f"cannot check blob {digest[:12]}", e) from None

    def put_bytes(self, data: bytes | Chunked, *, digest: str | None = None, staged: StagedBlob | None = None) -> str:
        """Upload ``data`` under its sha256 (one atomic PUT; replaces a mismatching object) and return it.

        ``digest``: the caller's sha256 of these very bytes, to skip hashing them again (as ``BlobStore``).
        Chunked data is joined here (one PUT needs the whole body). ``staged`` is accepted for the same call
        shape as ``BlobStore`` and never used (nothing is staged for an object store)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = b"".join(data.chunks())
        data = bytes(data)
        digest = digest if digest is not None else sha256_hex(data)
        k = self.key(digest)
        try:
            self.fs.pipe_file(k, data)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(f"cannot write blob {digest[:12]}", e) from None
        return digest

    def get_bytes(self, digest: str) -> bytes:
        """Download a blob and verify its hash; raises StoreError if missing or corrupt."""
        k = self.key(digest)
        try:
            data = bytes(self.fs.cat_file(k))
        except FileNotFoundError:
            raise StoreError(f"blob {digest[:12]} is missing from the store {self.url}") from None
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._error(f"cannot read blob {digest[:12]}", e) from None
        if sha256_hex(data) != digest:
            raise StoreError(f"blob {digest[:12]} is corrupt: its bytes no longer match their hash")
        return data


    def path(self, digest: str) -> Path:
        """A verified local copy of the blob (``<cache>/ab/cdef...``), for code that reads files lazily."""
        p = self.cache_dir / digest[:2] / digest[2:] if _HEX_RE.match(str(digest)) else None
        if p is None:
            raise StoreError(f"invalid blob digest {digest!r}")
        if p.is_file() and not p.is_symlink() and BlobStore._intact(p, digest):
            return p
        data = self.get_bytes(digest)
        try:
            atomic_write_bytes(p, data)
        except OSError as e:
            raise _write_error(e, digest) from None
        return p

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool) -> Iterator[None]:
        """A local ``flock`` (this machine's homes only); see the class doc for what holds across homes."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.cache_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise StoreError(f"cannot open the store lock {self.cache_dir / '.lock'}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def _listing(self) -> dict[str, tuple[int, float]]:
        """{digest: (size, LastModified as a POSIX time)} of every blob object under the prefix."""
        try:
            found = self.fs.find(self.root_key, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001
            raise self._error("cannot list the blobs", e) from None
        out: dict[str, tuple[int, float]] = {}
        base = self.root_key + "/"
        for name, info in found.items():
            rel = name[len(base):] if name.startswith(base) else ""
            parts = rel.split("/")
            if len(parts) != 2 or len(parts[0]) != 2 or not _HEX_RE.match(parts[0] + parts[1]):
                continue
            lm = info.get("LastModified")
            ts = lm.timestamp() if hasattr(lm, "timestamp") else time.time()
            out[parts[0] + parts[1]] = (int(info.get("size") or 0), float(ts))
        return out

    def iter_digests(self) -> Iterator[str]:
        yield from sorted(self._listing())

    def delete(self, digest: str) -> int:
        k = self.key(digest)
        with contextlib.suppress(OSError):  # the local copy that path() made, if any
            (self.cache_dir / digest[:2] / digest[2:]).unlink()
        try:
            size = int(self.fs.info(k).get("size") or 0)
            self.fs.rm_file(k)
            return size
        except FileNotFoundError:
            return 0
        except Exception as e:  # noqa: BLE001
            raise self._error(f"cannot delete blob {digest[:12]}", e) from None

    def gc(self, referenced: Callable[[], Iterable[str]] | Iterable[str], *, dry_run: bool = False,
           grace_s: float = 0.0) -> GcResult:
        """Delete objects not referenced; with ``grace_s > 0`` keep those uploaded less than ``grace_s`` ago
        (by LastModified, which every ``put_bytes`` refreshes) and re-read the references before deleting."""
        with self.lock(exclusive=True):
            get_refs = referenced if callable(referenced) else (lambda r=set(referenced): r)
            keep = set(get_refs())
            listing = self._listing()
            now = time.time()
            candidates: list[str] = []
            kept: list[str] = []
            for digest, (_size, ts) in sorted(listing.items()):
                if digest in keep:
                    continue
                (kept if grace_s > 0 and now - ts < grace_s else candidates).append(digest)
            if candidates and grace_s > 0 and callable(referenced):
                live = set(get_refs())
                candidates = [d for d in candidates if d not in live]
            freed = 0
            for digest in candidates:
                freed += listing[digest][0] if dry_run else self.delete(digest)
            return GcResult(candidates, freed, 0, kept)


Store = BlobStore | ObjectStore


def open_store(url: str | None, home: Path) -> "Store":
    """The store of a home: ``url`` (``s3://bucket/prefix``, or a local folder path; env
    ADAPTERHUB_STORE_URL) or, by default, ``<home>/blobs/sha256``. Raises StoreError for a bad URL."""
    if not url:
        return BlobStore(home / "blobs" / "sha256")
    if url.startswith("s3://"):
        return ObjectStore(url, home / "cache" / "store")
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise StoreError(f"unsupported store URL {url.split('://', 1)[0]}://...: use s3://bucket/prefix "
                         "or a local folder")
    return BlobStore(Path(url).expanduser())

"""Content-addressed blob store: ``<home>/blobs/sha256/ab/cdef...`` keyed by the sha256 of the bytes."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import StoreError
from .fsutil import atomic_write_bytes, sha256_file, sha256_hex

_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


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


class BlobStore:
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

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its sha256 hex digest.

        A blob already present is re-hashed: if its bytes no longer match (bit rot, a torn copy, tampering)
        it is replaced atomically by ``data``, so re-registering or pulling the good bytes heals the store
        instead of giving the new version the bad ones. Raises StoreError (one line) for a symlink in the
        way or a failed write (``no space left on device``...); no temp file is left behind.
        """
        digest = sha256_hex(data)
        p = self.path(digest)
        self._shard(digest)
        if self.has(digest) and self._intact(p, digest):
            try:  # refresh the mtime: a grace-period gc must not take a blob a register is about to reference
                os.utime(p)
            except OSError:
                pass
            return digest
        if p.is_symlink():
            raise StoreError(f"refusing to write through a symlink at {p}")
        try:
            atomic_write_bytes(p, data)  # temp file, fsync, rename: replaces a corrupt blob atomically
        except OSError as e:
            raise _write_error(e, digest) from None
        return digest

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

    def verify(self, digest: str) -> str | None:
        """None if the blob is present and intact, else a one-line problem description."""
        try:
            self.get_bytes(digest)
        except StoreError as e:
            return str(e)
        return None

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
                for f in d.glob(".*.tmp"):
                    try:
                        if grace_s > 0 and now - f.stat().st_mtime < grace_s:
                            continue
                    except FileNotFoundError:
                        continue
                    temps += 1
                    if not dry_run:
                        f.unlink(missing_ok=True)
        return GcResult(removed, freed, temps, kept)

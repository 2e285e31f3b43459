"""Byte-level helpers with no heavy imports: content hashes (of bytes, streamed from files) and atomic writes.

Kept apart from :mod:`adapterhub.format` (which needs torch) so that the store and the catalog
commands (``list``, ``show``, ``tag``...) start without importing torch.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (the identity of an adapter file)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks (never whole into memory).

    Raises: OSError if the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync the file or directory at ``path`` (opened read-only for it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the directory ``path`` (a rename or unlink in it becomes durable)."""
    fsync_path(path)


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """Raise FileExistsError unless ``path`` is absent, a regular file or a symlink (a rename over a symlink
    replaces the link, never its target): a rename would otherwise put a file in place of a folder's entry that is
    a device (``/dev/null``), a FIFO or a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise FileExistsError(errno.EEXIST, "exists and is not a regular file; nothing was written there",
                              os.fspath(path))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or pieces written in turn) to ``path`` atomically: temp file in the same folder,
    fsync, rename, fsync dir. A ``path`` that exists as anything but a regular file or a symlink (a device, a FIFO,
    a socket, a folder) is refused before anything is written (:func:`check_replaceable`)."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for piece in (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


DONE_MARKER = ".adapterhub-complete"  # the last file a :func:`build_once` folder gets: the folder is whole


def build_once(dest: str | os.PathLike[str], build: Callable[[Path], str]) -> Path:
    """The folder ``dest``, made by ``build`` the first time and reused once whole.

    ``dest`` is whole when it holds :data:`DONE_MARKER`; then it is returned as it is. Otherwise ``build(tmp)``
    writes the files into a hidden temp folder beside ``dest`` and returns the marker's text; the files are
    fsynced, the marker written last, and the folder renamed to ``dest`` (replacing a ``dest`` left without
    its marker by a build that crashed). A crash never leaves a half-made folder that looks whole. When two
    processes build at once, the first rename wins and the other's copy (the same bytes, for a deterministic
    ``build``) is dropped. On an error nothing is left beside ``dest``. The builds run side by side; putting one in
    place is done under an exclusive ``flock`` of the parent folder, so a folder left without its marker is
    removed by one builder only, and a whole one never.
    """
    import fcntl
    import shutil

    dest = Path(dest)
    if (dest / DONE_MARKER).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        text = build(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        atomic_write_bytes(tmp / DONE_MARKER, text.encode())
        lock = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (dest / DONE_MARKER).is_file():
                return dest  # another builder finished first
            if dest.exists() or dest.is_symlink():
                if not dest.is_dir() or dest.is_symlink():
                    raise FileExistsError(f"{dest}: exists and is not a folder")
                shutil.rmtree(dest)  # a build that crashed before its marker
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        finally:
            os.close(lock)  # releases the lock
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextlib.contextmanager
def new_or_existing_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The folder to write ``path``'s files into, so that a failure never leaves a half-made new folder.

    When ``path`` does not exist yet, yields a hidden temp folder beside it (``.<name>.<random>``); once the
    block ends without an error it is fsynced and renamed to ``path`` (``FileExistsError`` if something took
    the name meanwhile, or if ``path`` is a file), and on an error it is removed: ``path`` then appears whole or
    not at all. An existing folder is yielded as it is (its files are the caller's to replace one by one,
    atomically each).
    """
    import shutil

    path = Path(path)
    if path.is_dir():
        yield path
        return
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path}: exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        if path.exists() or path.is_symlink():  # made meanwhile (rename would replace an empty folder)
            raise FileExistsError(f"{path}: appeared while it was being written; nothing was put there")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)

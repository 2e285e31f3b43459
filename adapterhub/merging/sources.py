"""Experts as merge inputs: one parameter of one expert readable at a time.

:class:`ExpertSource` is what :func:`adapterhub.merging.driver.merge_adapters` reads;
:class:`InMemoryExpert` wraps a loaded :class:`~adapterhub.format.SparseAdapter` (tests, studies),
:class:`LazyAdapterFile` reads an adapter file through :func:`adapterhub.format.open_adapter`
(header once, then one parameter at a time from a memory map), so a merge's peak memory stays near
the size of the result plus one tensor per expert (as mergekit's ``LazyTensorLoader``).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .. import format as fmt
from ..errors import FormatError
from ..format import SparseAdapter, SparseParam
from ..fsutil import sha256_file, sha256_hex

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..store import Store


class HasStore(Protocol):
    """A catalog whose blobs :meth:`LazyAdapterFile.of_version` reads (a Workspace)."""

    store: Store

__all__ = ["ExpertSource", "InMemoryExpert", "LazyAdapterFile"]


class ExpertSource(ABC):
    """One expert, readable one parameter at a time.

    ``key`` orders experts canonically (content hash); ``base_fingerprint`` guards against mixing
    bases; ``label`` is what errors and lineage show.
    """

    key: str
    label: str
    base_fingerprint: str | None

    @abstractmethod
    def param_names(self) -> list[str]:
        """Names of the stored sparse parameters."""

    @abstractmethod
    def param_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the base tensor ``name`` (without loading values)."""

    @abstractmethod
    def get_param(self, name: str) -> SparseParam:
        """Load one parameter (raises KeyError if absent)."""

    def value_dtype(self, name: str) -> torch.dtype:
        """The dtype of parameter ``name``'s values (default: loads the parameter; sources override it
        to read it without loading values)."""
        return self.get_param(name).values.dtype

    @abstractmethod
    def extras(self) -> dict[str, torch.Tensor]:
        """Dense extras (task heads)."""

    @abstractmethod
    def card(self) -> dict[str, Any]:
        """The adapter's JSON card."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release file handles."""


def _card_fingerprint(card: dict[str, Any]) -> str | None:
    base = card.get("base")
    return base.get("fingerprint") if isinstance(base, dict) else None


class InMemoryExpert(ExpertSource):
    """An expert already loaded as a :class:`SparseAdapter`.

    Takes: the adapter; ``key`` (default: the sha256 of its canonical bytes), ``label`` (default: the
    key's first 12 characters), ``base_fingerprint`` (default: the card's).
    """

    def __init__(self, adapter: SparseAdapter, key: str | None = None, label: str | None = None,
                 base_fingerprint: str | None = None) -> None:
        self.adapter = adapter
        self.key = key if key is not None else sha256_hex(fmt.save(adapter))
        self.label = label or self.key[:12]
        self.base_fingerprint = base_fingerprint if base_fingerprint is not None else _card_fingerprint(adapter.card)

    def param_names(self) -> list[str]:
        return sorted(self.adapter.params)

    def param_shape(self, name: str) -> tuple[int, ...]:
        return self.adapter.params[name].shape

    def get_param(self, name: str) -> SparseParam:
        return self.adapter.params[name]

    def value_dtype(self, name: str) -> torch.dtype:
        return self.adapter.params[name].values.dtype

    def extras(self) -> dict[str, torch.Tensor]:
        return dict(self.adapter.extras)

    def card(self) -> dict[str, Any]:
        return dict(self.adapter.card)


class LazyAdapterFile(ExpertSource):
    """An adapter file read lazily through :func:`adapterhub.format.open_adapter`: the header is
    validated once, each parameter is decoded (and checked as :func:`adapterhub.format.load` checks
    it) on demand, so only one parameter's indices and values are in memory at a time.

    Takes: ``path`` of an ``adapterhub.sparse/1`` file; ``expected_sha256`` (checked by streaming
    the file once, so a corrupted blob is refused before any merge); ``key``/``label``/
    ``base_fingerprint`` as :class:`InMemoryExpert`.
    Raises: FormatError for a malformed file or a hash mismatch.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None, label: str | None = None,
                 expected_sha256: str | None = None, base_fingerprint: str | None = None) -> None:
        self.path = Path(path)
        if expected_sha256 is not None and sha256_file(self.path) != expected_sha256:
            raise FormatError(f"{self.path.name}: content hash mismatch (blob corrupted)")
        self._reader = fmt.open_adapter(self.path)
        # A store blob whose card says allow_nonfinite was let in by the user's explicit flag at
        # register time (adapterhub.workspace); its hash was just checked, so the card is trusted here.
        self._allow_nonfinite = self._reader.card.get("allow_nonfinite") is True
        self.key = key or expected_sha256 or self.path.name
        self.label = label or self.key[:12]
        self.base_fingerprint = (base_fingerprint if base_fingerprint is not None
                                 else _card_fingerprint(self._reader.card))

    @classmethod
    def of_version(cls, ws: HasStore, info: VersionInfo) -> LazyAdapterFile:
        """A catalogued version's blob (a verified local copy: ``ws.store.path``), its hash checked by streaming
        it once, then read one parameter at a time; keyed by its content hash, labelled by its ref."""
        return cls(ws.store.path(info.content_hash), key=info.content_hash, label=info.ref,
                   expected_sha256=info.content_hash, base_fingerprint=info.base_fingerprint)

    def param_names(self) -> list[str]:
        return self._reader.keys()

    def param_shape(self, name: str) -> tuple[int, ...]:
        return self._reader.param_shape(name)

    def get_param(self, name: str) -> SparseParam:
        return self._reader.get_param(name, allow_nonfinite=self._allow_nonfinite)

    def value_dtype(self, name: str) -> torch.dtype:
        return self._reader.value_dtype(name)

    def extras(self) -> dict[str, torch.Tensor]:
        return {n: self._reader.get_extra(n, allow_nonfinite=self._allow_nonfinite)
                for n in self._reader.extra_names()}

    def card(self) -> dict[str, Any]:
        return dict(self._reader.card)

    def close(self) -> None:
        self._reader.close()

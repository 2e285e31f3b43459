"""PEP 562 lazy exports, shared by the package ``__init__`` files (no torch, no other import)."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(module: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for package ``module`` whose public names live in the submodules named by
    ``exports`` (name -> relative module); each name is imported on first use and then cached."""
    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name], module), name)
            setattr(sys.modules[module], name, value)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module])) | set(exports))

    return __getattr__, __dir__


class _LazyModule:
    """Stands for module ``name`` in a namespace until an attribute of it is first read: then the module is
    imported, put in the namespace in place of this stand-in (later reads cost nothing) and answered."""

    def __init__(self, name: str, namespace: dict[str, Any], alias: str) -> None:
        self._name, self._namespace, self._alias = name, namespace, alias

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        self._namespace[self._alias] = module
        return getattr(module, attr)


def lazy_module(name: str, namespace: dict[str, Any], alias: str | None = None) -> Any:
    """Module ``name`` if already imported, else a stand-in bound as ``alias`` (default: ``name``) in
    ``namespace`` (a module's ``globals()``) that imports it on first use. For modules whose every use of the
    module is an attribute read (``torch.float32``, ``torch.zeros(...)``), so that importing them stays cheap."""
    return sys.modules.get(name) or _LazyModule(name, namespace, alias or name)

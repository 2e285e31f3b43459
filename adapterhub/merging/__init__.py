"""Merging sparse adapters: ``methods`` (the registry), ``sources`` (lazy expert files), ``driver``."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .driver import MergeResult as MergeResult, merge as merge, merge_adapters as merge_adapters
    from .methods import (
        METHODS as METHODS,
        ExpertEntry as ExpertEntry,
        GeneralizedTaskArithmeticMerge as GeneralizedTaskArithmeticMerge,
        MergeMethod as MergeMethod,
        Sparsification as Sparsification,
        get_method as get_method,
        method_names as method_names,
        param_seed as param_seed,
        register_method as register_method,
    )
    from .sources import (
        ExpertSource as ExpertSource,
        InMemoryExpert as InMemoryExpert,
        LazyAdapterFile as LazyAdapterFile,
    )

# Public names and the submodule that defines each (imported on first use, so importing a
# sibling submodule stays as cheap as before the split).
_EXPORTS = {
    "ExpertEntry": ".methods",
    "ExpertSource": ".sources",
    "GeneralizedTaskArithmeticMerge": ".methods",
    "InMemoryExpert": ".sources",
    "LazyAdapterFile": ".sources",
    "METHODS": ".methods",
    "MergeMethod": ".methods",
    "MergeResult": ".driver",
    "Sparsification": ".methods",
    "get_method": ".methods",
    "merge": ".driver",
    "merge_adapters": ".driver",
    "method_names": ".methods",
    "param_seed": ".methods",
    "register_method": ".methods",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

"""Merging sparse adapters: ``methods`` (the registry), ``sources`` (lazy expert files), ``driver``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

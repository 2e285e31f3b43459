"""Evaluating adapters and deployments on tasks."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scoring import deployment_path as deployment_path, evaluate as evaluate

# Public names and the submodule that defines each (imported on first use, so importing a
# sibling submodule stays as cheap as before the split).
_EXPORTS = {
    "deployment_path": ".scoring",
    "evaluate": ".scoring",
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

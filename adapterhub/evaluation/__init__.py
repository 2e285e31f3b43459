"""Evaluating adapters and deployments on tasks."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .scoring import deployment_path as deployment_path, evaluate as evaluate

# Public names and the submodule that defines each (imported on first use, so importing a
# sibling submodule stays as cheap as before the split).
_EXPORTS = {
    "deployment_path": ".scoring",
    "evaluate": ".scoring",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

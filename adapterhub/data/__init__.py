"""Offline tasks and datasets."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .tasks import (
        BUILTIN_TASKS as BUILTIN_TASKS,
        TaskData as TaskData,
        list_tasks as list_tasks,
        load_dataset as load_dataset,
        load_task as load_task,
        resolve_data as resolve_data,
    )

# Public names and the submodule that defines each (imported on first use, so importing a
# sibling submodule stays as cheap as before the split).
_EXPORTS = {
    "BUILTIN_TASKS": ".tasks",
    "TaskData": ".tasks",
    "list_tasks": ".tasks",
    "load_dataset": ".tasks",
    "load_task": ".tasks",
    "resolve_data": ".tasks",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

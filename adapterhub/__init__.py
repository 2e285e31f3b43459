"""adapterhub: a catalog, Hub transfers and exact apply/revert for sparse adapters.

The PEFT-shaped entry points, loaded on first use (PEP 562), so ``import adapterhub`` (and the CLI)
never imports torch::

    import adapterhub
    with adapterhub.activate(model, "rt@prod") as rt:   # a path, a catalog ref or a Hub id
        rt.predict(["a fine film"])
    adapters = adapterhub.AdapterSet(model)              # named adapters, exact switching

See docs/guide.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from .activation import (
        ActiveAdapter as ActiveAdapter,
        AdapterClassifier as AdapterClassifier,
        AdapterSet as AdapterSet,
        AdapterSetError as AdapterSetError,
        activate as activate,
        apply_adapter as apply_adapter,
        resolve_source as resolve_source,
    )
    from .apply.patching import applied as applied, revert as revert, state_fingerprint as state_fingerprint
    from .errors import AdapterHubError as AdapterHubError
    from .format import (
        SparseAdapter as SparseAdapter,
        SparseParam as SparseParam,
        load_file as load_file,
        save_file as save_file,
    )
    from .workspace import Workspace as Workspace, open_workspace as open_workspace

# Public name -> the submodule that defines it (imported on first access).
_EXPORTS = {
    "activate": ".activation",
    "ActiveAdapter": ".activation",
    "AdapterClassifier": ".activation",
    "AdapterSet": ".activation",
    "AdapterSetError": ".activation",
    "apply_adapter": ".activation",
    "resolve_source": ".activation",
    "applied": ".apply.patching",
    "revert": ".apply.patching",
    "state_fingerprint": ".apply.patching",
    "AdapterHubError": ".errors",
    "SparseAdapter": ".format",
    "SparseParam": ".format",
    "load_file": ".format",
    "save_file": ".format",
    "Workspace": ".workspace",
    "open_workspace": ".workspace",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

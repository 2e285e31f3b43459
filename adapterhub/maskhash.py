"""The one definition of a mask's hash: what the catalog stores as a version's ``mask_hash`` and what
training records in its mask events (``card["training"]["mask_events"][i]["mask_hash"]``).

Two masks hash equal exactly when they touch the same element positions of the same base tensors:
sha256 over the tensors in name order, each as ``name \\0 json(shape) \\0`` followed by its sorted
flat element indices as little-endian int64. Block-layout parameters hash as the elements their
blocks cover, so a block mask and the equal element mask agree. Needs no torch (indices may be
torch tensors or anything numpy can read), so the catalog can use it without importing torch.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def mask_hash(masks: Mapping[str, tuple[Iterable[int], Any]]) -> str:
    """sha256 hex of a mask.

    Takes: base tensor name -> ``(shape, sorted flat element indices)``; the indices may be a
        (CPU) torch tensor, a numpy array or a sequence of ints.
    Returns: 64 lowercase hex characters; equal for equal masks whatever the key order.
    """
    h = hashlib.sha256()
    for name in sorted(masks):
        shape, idx = masks[name]
        if hasattr(idx, "detach"):  # a torch tensor, maybe on an accelerator
            idx = idx.detach().cpu().numpy()
        h.update(name.encode() + b"\0" + json.dumps([int(s) for s in shape]).encode() + b"\0")
        h.update(np.ascontiguousarray(np.asarray(idx, dtype="<i8")).tobytes())
    return h.hexdigest()


__all__ = ["mask_hash"]

"""Reference implementations kept as oracles for tests and as the "before" of benchmarks.

They are the straightforward versions that faster code replaced; tests check that the replacement gives the same
bytes, and ``benchmarks/scale.py`` times them in the same run as the "before" figure.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..merging.methods import ExpertEntry


def dense_mark_union(entries: list[ExpertEntry], numel: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The merge's union of the experts' index sets as it was before issue 19: a boolean mark over every element
    of the tensor and an int32 prefix sum (int64 past 2**31 elements), O(numel). Returns the sorted union and,
    per expert, the position of each of its entries in that union (what ``merging.methods._union`` returns)."""
    if not entries:
        return torch.zeros(0, dtype=torch.int64), []
    if len(entries) == 1:
        return entries[0].idx, [torch.arange(entries[0].idx.numel())]
    cat = torch.cat([e.idx for e in entries])
    mark = torch.zeros(numel, dtype=torch.bool)
    mark[cat] = True
    uniq = mark.nonzero().view(-1)
    rank = torch.cumsum(mark, 0, dtype=torch.int32 if numel < 2**31 else torch.int64)
    inv = rank[cat].to(torch.int64) - 1
    return uniq, list(torch.split(inv, [e.idx.numel() for e in entries]))

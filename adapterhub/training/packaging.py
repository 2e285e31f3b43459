"""Packaging: turn a trained :class:`~adapterhub.training.model.SparseDeltaModel` into a :class:`~adapterhub.format.SparseAdapter`.

The values (cast to the run's dtype) are keyed by the base file's tensor names; a block run is
stored in block layout; an encoder's head becomes the dense extras ``heads.<task>.weight/bias``;
the card records the mask, the full training config, the data fingerprint and the mask events.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .. import format as fmt
from ..data import TaskData
from ..errors import TrainingError
from .config import TrainConfig
from .masks import view2d
from .model import DTYPES, PROMPT_SUFFIX, SparseDeltaModel

if TYPE_CHECKING:  # pragma: no cover
    from ..data.text2text import Text2TextData

__all__ = ["build_adapter"]


def build_adapter(sdm: SparseDeltaModel, cfg: TrainConfig, *, kind: str, task_name: str, labels: Sequence[str],
                  regex: str, base_name: str | None, base_fingerprint: str | None,
                  events: list[dict[str, Any]], data: TaskData | Text2TextData, world: int) -> fmt.SparseAdapter:
    """Package the trained values (and head) as a SparseAdapter keyed by base-file tensor names.

    Takes: the trained model, its config, the model ``kind``, the task name and label names, the
    target ``regex`` used, the base's name and fingerprint (recorded in the card), the mask
    ``events``, the training ``data`` and the number of processes ``world``.
    Returns: the validated adapter.
    Raises: TrainingError when a target never got a mask; FormatError when the result is invalid.
    """
    vdtype = DTYPES[cfg.dtype]
    params: dict[str, fmt.SparseParam] = {}
    for k, key in sdm.targets.items():
        if k not in sdm.values:
            raise TrainingError("internal: training ended before a mask was selected")
        idx = sdm.idx[k].cpu()
        vals = sdm.values[k].detach().float().cpu().to(vdtype)
        shape = tuple(sdm.weights[k].shape)
        if cfg.granularity == "block":
            b = cfg.block_size
            dense = torch.zeros(math.prod(shape), dtype=vdtype)
            dense[idx] = vals
            bmask = torch.zeros(math.prod(shape), dtype=torch.bool)
            bmask[idx] = True
            rows, cols = view2d(shape)
            grid = bmask.reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1)
            params[key] = fmt.SparseParam.from_block_mask(dense.reshape(shape), grid, b)
        else:
            params[key] = fmt.SparseParam(shape, idx.clone().contiguous(), vals.contiguous())
    extras: dict[str, torch.Tensor] = {}
    head_info = None
    if sdm.head is not None:
        extras[f"heads.{task_name}.weight"] = sdm.head.linear.weight.detach().float().cpu().contiguous()
        extras[f"heads.{task_name}.bias"] = sdm.head.linear.bias.detach().float().cpu().contiguous()
        head_info = {"type": "linear", "pooling": "none" if kind == "image" else "mean", "task": task_name}
    card: dict[str, Any] = {
        "format": fmt.FORMAT_ID,
        "task": task_name,
        "kind": "expert",
        "labels": {task_name: list(labels)},
        "model_kind": kind,
        "mask": {"method": cfg.mask, "density": cfg.density, "granularity": cfg.granularity,
                 "block_size": cfg.block_size if cfg.granularity == "block" else None,
                 "targets": regex, "scope": cfg.scope,
                 "score": cfg.score if cfg.mask == "connection-sensitivity" else None,
                 "target_tensors": sorted(params)},
        "training": {"config": cfg.to_json(), "data": {"name": data.name, "fingerprint": data.fingerprint(),
                                                        "rows": data.counts()},
                     "mask_events": events, "world_size": world},
    }
    if head_info:
        card["head"] = head_info
    if kind == "causal-lm":
        card["prompt"] = {"template": "{text}" + PROMPT_SUFFIX + " {label}"}
    if base_name or base_fingerprint:
        card["base"] = {"name": base_name, "fingerprint": base_fingerprint}
    adapter = fmt.SparseAdapter(params, extras, card)
    adapter.validate()
    return adapter

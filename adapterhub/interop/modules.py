"""PEFT folders recognised and PEFT module paths mapped to a base model's tensor names (shared by the SHiRA and
LoRA imports; no torch, so ``register`` of our own file can ask without importing it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..errors import FormatError

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"


def is_peft_folder(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a folder with a PEFT ``adapter_config.json``."""
    p = Path(path)
    return p.is_dir() and (p / PEFT_CONFIG).is_file()


def map_module_to_tensor(module: str, base_shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Name of the base tensor (``<module>.weight``) a PEFT module path refers to.

    PEFT paths are relative to the model class that was wrapped (``BertForSequenceClassification`` has
    ``bert.encoder...``), while a base folder saved from ``BertModel`` has ``encoder...``. We accept an exact
    match, or a unique match after dropping leading path components on either side.
    Raises FormatError if there is no unique match.
    """
    exact = module + ".weight"
    if exact in base_shapes:
        return exact
    parts = module.split(".")
    for k in range(1, len(parts)):
        cand = ".".join(parts[k:]) + ".weight"
        if cand in base_shapes:
            return cand
    hits = [n for n in base_shapes if n.endswith("." + exact)]
    if len(hits) == 1:
        return hits[0]
    raise FormatError(f"{PEFT_PREFIX}{module}: no tensor {exact} in the base model"
                      + (f" ({len(hits)} candidates)" if hits else ""))

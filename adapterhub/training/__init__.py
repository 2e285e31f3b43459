"""Sparse training: ``config`` (settings), ``masks`` (mask methods), ``model`` (base + delta + head,
loading, batching), ``loop`` (trainers and the public train functions), ``packaging`` (trained state
to adapter), ``distributed`` (multi-process), ``sft`` (text-to-text fine-tuning of causal LMs) and
``decoding`` (generation, Rouge-L, exact match)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .config import TrainConfig as TrainConfig
    from .distributed import init_distributed_from_env as init_distributed_from_env
    from .loop import (
        TRAINERS as TRAINERS,
        BaselineResult as BaselineResult,
        Trainer as Trainer,
        TrainResult as TrainResult,
        get_trainer as get_trainer,
        register_trainer as register_trainer,
        train as train,
        train_adapter as train_adapter,
        train_baseline as train_baseline,
        validate_config as validate_config,
        with_validation as with_validation,
    )
    from .model import (
        DEFAULT_TARGETS as DEFAULT_TARGETS,
        DTYPES as DTYPES,
        Batcher as Batcher,
        MeanPoolHead as MeanPoolHead,
        SparseDeltaModel as SparseDeltaModel,
        apply_delta as apply_delta,
        base_tensor_keys as base_tensor_keys,
        file_tensor_key as file_tensor_key,
        find_targets as find_targets,
        load_backbone as load_backbone,
        load_tokenizer as load_tokenizer,
        mean_pool as mean_pool,
        model_kind as model_kind,
        predict as predict,
        resolve_device as resolve_device,
    )
    from .packaging import build_adapter as build_adapter
    from .sft import (
        SFTBatcher as SFTBatcher,
        fit_sft as fit_sft,
        train_sft as train_sft,
        train_sft_adapter as train_sft_adapter,
    )

# Public names and the submodule that defines each (imported on first use, so importing a
# sibling submodule stays as cheap as before the split).
_EXPORTS = {
    "Batcher": ".model",
    "SFTBatcher": ".sft",
    "fit_sft": ".sft",
    "train_sft": ".sft",
    "train_sft_adapter": ".sft",
    "BaselineResult": ".loop",
    "DEFAULT_TARGETS": ".model",
    "DTYPES": ".model",
    "MeanPoolHead": ".model",
    "SparseDeltaModel": ".model",
    "TRAINERS": ".loop",
    "TrainConfig": ".config",
    "TrainResult": ".loop",
    "Trainer": ".loop",
    "apply_delta": ".model",
    "base_tensor_keys": ".model",
    "build_adapter": ".packaging",
    "file_tensor_key": ".model",
    "find_targets": ".model",
    "get_trainer": ".loop",
    "init_distributed_from_env": ".distributed",
    "load_backbone": ".model",
    "load_tokenizer": ".model",
    "mean_pool": ".model",
    "model_kind": ".model",
    "predict": ".model",
    "register_trainer": ".loop",
    "resolve_device": ".model",
    "train": ".loop",
    "train_adapter": ".loop",
    "train_baseline": ".loop",
    "validate_config": ".loop",
    "with_validation": ".loop",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

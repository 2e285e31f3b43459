"""PEFT LoRA folders imported as sparse adapters: ΔW = B·A·scale per target, kept sparse by magnitude.

A PEFT LoRA folder holds ``adapter_config.json`` (``"peft_type": "LORA"``, ``r``, ``lora_alpha``,
``use_rslora``, ``fan_in_fan_out``...) and ``adapter_model.safetensors`` with, per adapted module:

* ``base_model.model.<module>.lora_A.weight``: ``(r, in)``;
* ``base_model.model.<module>.lora_B.weight``: ``(out, r)``.

PEFT's merged weight is ``W + B @ A * scale`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with ``use_rslora``), transposed when ``fan_in_fan_out`` (GPT-2's Conv1D). :func:`lora_delta` is the one
place that computes it (the merge study's LoRA baseline uses it too). The import keeps the top ``density``
fraction of ΔW's entries by magnitude (or of its ``b x b`` blocks by norm) and records, per tensor, the
relative reconstruction error ``‖ΔW − sparse‖ / ‖ΔW‖`` in the card (``imported.reconstruction_error``).
DoRA, embedding LoRA, ``alpha_pattern`` and LoRA biases are refused; see ``peft/tuners/lora/layer.py``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .. import format as fmt, safe_read
from ..errors import FormatError
from .modules import PEFT_PREFIX, map_module_to_tensor

_A = ".lora_A.weight"
_B = ".lora_B.weight"


def lora_scale(lora_alpha: float, r: int, *, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
               fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = B·A·scale in fp32, of the base weight's shape (``(out, in)``; transposed for ``fan_in_fan_out``).

    Takes ``lora_a`` of shape ``(r, in)`` and ``lora_b`` of shape ``(out, r)``, as PEFT stores them.
    Computed in the order PEFT's ``get_delta_weight`` uses (``(B @ A) * scale``). Raises FormatError when
    the shapes do not chain.
    """
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
        raise FormatError(f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not chain as B @ A")
    d = (lora_b.detach().float() @ lora_a.detach().float()) * scale
    return d.T.contiguous() if fan_in_fan_out else d


def sparsify(delta: torch.Tensor, density: float, *, block_size: int | None = None
             ) -> tuple[fmt.SparseParam, float]:
    """Keep the top ``density`` fraction of ``delta``'s entries by magnitude (or of its blocks by norm).

    Returns the sparse parameter (fp32 values, exactly ``delta``'s where kept) and the relative
    reconstruction error ``‖delta − sparse‖ / ‖delta‖`` (0.0 for an all-zero delta).
    Raises TrainingError for a bad density or a shape not divisible into blocks.
    """
    from ..training.masks import select

    delta = delta.detach().float().contiguous()
    granularity = "element" if block_size is None else "block"
    sel = select({"d": delta.square()}, density, granularity=granularity, block_size=block_size or 16)["d"]
    if block_size is None:
        p = fmt.SparseParam(tuple(delta.shape), sel.indices.contiguous(),
                            delta.reshape(-1)[sel.indices].contiguous())
    else:
        assert sel.block_indices is not None
        rows = math.prod(delta.shape[:-1])
        mask = torch.zeros(rows // block_size * (delta.shape[-1] // block_size), dtype=torch.bool)
        mask[sel.block_indices] = True
        p = fmt.SparseParam.from_block_mask(delta, mask, block_size)
    total = float(torch.linalg.vector_norm(delta.double()))
    if total == 0.0:
        return p, 0.0
    rest = delta.reshape(-1).double().clone()
    rest[sel.indices] = 0.0
    return p, float(torch.linalg.vector_norm(rest)) / total


def _num(cfg: Mapping[str, Any], key: str, default: float | None = None) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 or v > 2 ** 31:
        raise FormatError(f"adapter_config.json: {key} must be a positive number, got {safe_read.clip(v, 40)}")
    return float(v)


def _flag(cfg: Mapping[str, Any], key: str) -> bool:
    v = cfg.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise FormatError(f"adapter_config.json: {key} must be true or false, got {safe_read.clip(v, 40)}")
    return v


def import_peft_lora(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     base_shapes: Mapping[str, tuple[int, ...]], *, density: float,
                     block_size: int | None = None, allow_nonfinite: bool = False
                     ) -> tuple[dict[str, fmt.SparseParam], dict[str, Any], list[str]]:
    """Turn a PEFT LoRA config and its tensors into sparse params keyed by the base's tensor names.

    Returns ``(params, card fragment, unused tensor keys)``; the caller decides what the unused keys
    (``modules_to_save`` heads) become. The card's ``imported.modules`` maps each PEFT module path to its
    tensor name (the caller reduces it to a module prefix; it is not meant to be stored). Raises FormatError naming the tensor or config key at fault.
    """
    if _flag(cfg, "use_dora"):
        raise FormatError("adapter_config.json: use_dora is true; DoRA adapters cannot be imported (only plain LoRA)")
    if cfg.get("alpha_pattern"):
        raise FormatError("adapter_config.json: alpha_pattern is not supported on import")
    use_rslora = _flag(cfg, "use_rslora")
    fifo = _flag(cfg, "fan_in_fan_out")
    alpha = _num(cfg, "lora_alpha", 8)
    emb = sorted(k for k in tensors if ".lora_embedding_" in k or ".lora_magnitude_vector" in k)
    if emb:
        raise FormatError(f"{emb[0]}: embedding LoRA and DoRA tensors are not supported on import")
    modules = sorted({k[:-len(_A)] for k in tensors if k.endswith(_A)} | {k[:-len(_B)] for k in tensors if k.endswith(_B)})
    if not modules:
        raise FormatError("adapter_model.safetensors: no lora_A/lora_B tensors found")
    params: dict[str, fmt.SparseParam] = {}
    errors: dict[str, float] = {}
    used: set[str] = set()
    mapped: dict[str, str] = {}
    for mod in modules:
        akey, bkey = mod + _A, mod + _B
        for k in (akey, bkey):
            if k not in tensors:
                raise FormatError(f"{k}: missing (LoRA needs both lora_A and lora_B)")
            t = tensors[k]
            if t.dtype not in fmt.VALUE_DTYPES:
                raise FormatError(f"{k}: dtype {t.dtype} not allowed (fp32, bf16, fp16)")
            if t.dim() != 2:
                raise FormatError(f"{k}: must be 2-D, got shape {tuple(t.shape)}")
            if not allow_nonfinite and t.numel() and not bool(torch.isfinite(t).all()):
                raise FormatError(f"{k}: values contain NaN or infinity")
        a, b = tensors[akey], tensors[bkey]
        if b.shape[1] != a.shape[0] or a.shape[0] == 0:
            raise FormatError(f"{bkey}: shape {tuple(b.shape)} does not chain with {akey} {tuple(a.shape)}")
        module = mod[len(PEFT_PREFIX):] if mod.startswith(PEFT_PREFIX) else mod
        tname = map_module_to_tensor(module, base_shapes)
        mapped[module] = tname
        shape = tuple(base_shapes[tname])
        want = (a.shape[1], b.shape[0]) if fifo else (b.shape[0], a.shape[1])
        if shape != want:
            raise FormatError(f"{akey}: LoRA delta of shape {want} does not fit {tname} of shape {shape}")
        if tname in params:
            raise FormatError(f"{akey}: maps to {tname}, which another module already targets")
        delta = lora_delta(a, b, lora_scale(alpha, int(a.shape[0]), use_rslora=use_rslora), fan_in_fan_out=fifo)
        if not allow_nonfinite and not bool(torch.isfinite(delta).all()):
            raise FormatError(f"{akey}: B @ A overflows to infinity")
        params[tname], errors[tname] = sparsify(delta, density, block_size=block_size)
        used |= {akey, bkey}
    r = cfg.get("r")
    card = {
        "mask": {"method": "peft-lora-magnitude", "granularity": "element" if block_size is None else "block",
                 "density": density, **({"block_size": block_size} if block_size else {}), "targets": sorted(params)},
        "imported": {"format": "peft-lora", "peft_version": safe_read.short_text(cfg.get("peft_version"), 40),
                     "r": r if isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 2 ** 31 else None,
                     "lora_alpha": alpha, "use_rslora": use_rslora, "density": density, "block_size": block_size,
                     "reconstruction_error": {k: errors[k] for k in sorted(errors)},
                     "base_model_name_or_path": safe_read.short_text(cfg.get("base_model_name_or_path")),
                     "modules": mapped},  # PEFT module path -> tensor name; the caller replaces it
    }
    return params, card, sorted(k for k in tensors if k not in used)


def lora_delta_of_module(module: torch.nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """ΔW of one live PEFT ``LoraLayer`` (its ``lora_A``/``lora_B``/``scaling`` for ``adapter_name``)."""
    a = module.lora_A[adapter_name].weight  # type: ignore[index, union-attr]
    b = module.lora_B[adapter_name].weight  # type: ignore[index, union-attr]
    scale = module.scaling[adapter_name]  # type: ignore[index]
    return lora_delta(a, b, float(scale), fan_in_fan_out=bool(getattr(module, "fan_in_fan_out", False)))


__all__ = ["lora_delta", "lora_delta_of_module", "lora_scale", "sparsify", "import_peft_lora"]

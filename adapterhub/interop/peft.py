"""Import and export of PEFT SHiRA adapter folders (PEFT's own sparse format); LoRA folders import too.

A PEFT SHiRA folder holds ``adapter_config.json`` (``"peft_type": "SHIRA"``, ``r``, ``target_modules``...)
and ``adapter_model.safetensors`` with, per adapted ``nn.Linear`` called ``<module>``:

* ``base_model.model.<module>.shira_weight``: 1-D values (fp32), ``r * (in + out)`` of them;
* ``base_model.model.<module>.shira_indices``: ``(2, n)`` int32 COO coordinates (row, col) into the
  ``(out, in)`` weight.

PEFT adds ``torch.sparse_coo_tensor(indices, weight * scaling)`` to the dense weight (duplicates summed),
so the delta of ``<module>.weight`` is exactly our :class:`~adapterhub.format.SparseParam` with flat index
``row * in + col``. See ``peft/tuners/shira/{layer,model}.py`` (peft 0.21).

Because PEFT allocates exactly ``r * (in + out)`` values per layer, export pads every layer to that count
with zero-valued entries at positions outside the mask (adding 0 leaves the weight unchanged), choosing
the smallest ``r`` that holds every layer.

LoRA folders (``"peft_type": "LORA"``) import through :mod:`adapterhub.interop.lora` at a chosen density.
``modules_to_save`` tensors (a ``SEQ_CLS`` classifier head, ``base_model.model.<module>.weight``) become the
dense extras ``peft.modules_to_save.<module>.<param>`` and export back as ``modules_to_save`` with the same
``task_type``. Other extras (our trained ``heads.<task>.*``, a mean-pool head PEFT has no module for) are
written beside the PEFT files as ``adapterhub_extras.safetensors``, which PEFT ignores and our import reads.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import format as fmt, safe_read, st_io
from ..errors import FormatError
from ..fsutil import atomic_write_bytes, new_or_existing_folder
from ..merging.sources import ExpertSource, InMemoryExpert
from ..progress import Progress, quiet
from .modules import PEFT_CONFIG, PEFT_PREFIX, is_peft_folder, map_module_to_tensor

PEFT_WEIGHTS = "adapter_model.safetensors"
_W = ".shira_weight"
_I = ".shira_indices"
EXTRAS_FILE = "adapterhub_extras.safetensors"
MTS_PREFIX = "peft.modules_to_save."
TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "QUESTION_ANS", "FEATURE_EXTRACTION")
_MAX_LORA_DENSE = 1 << 28  # entries of one dense ΔW computed during a LoRA import


def _read_peft_config(folder: Path) -> dict[str, Any]:
    cfg = safe_read.read_json_file(folder / PEFT_CONFIG, PEFT_CONFIG, FormatError)  # no hang, bomb or raw error
    if not isinstance(cfg, dict):
        raise FormatError(f"{PEFT_CONFIG}: not a JSON object")
    ptype = cfg.get("peft_type", "")
    if not isinstance(ptype, str) or ptype.upper() not in ("SHIRA", "LORA"):
        raise FormatError(f"{PEFT_CONFIG}: peft_type is {safe_read.clip(ptype, 40)}; "
                          "only SHIRA and LORA adapters can be imported")
    return cfg


def peft_type(folder: str | os.PathLike[str]) -> str:
    """``"SHIRA"`` or ``"LORA"``: the checked ``peft_type`` of a PEFT folder. Raises FormatError."""
    return str(_read_peft_config(Path(folder))["peft_type"]).upper()


def _task_type(cfg: Mapping[str, Any]) -> str | None:
    t = cfg.get("task_type")
    if t is None:
        return None
    if not isinstance(t, str) or t not in TASK_TYPES:
        raise FormatError(f"{PEFT_CONFIG}: task_type {safe_read.clip(t, 40)} is not one of {', '.join(TASK_TYPES)}")
    return t


def _modules_to_save_extras(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], keys: list[str],
                            allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    """The ``modules_to_save`` tensors among ``keys`` as dense extras ``peft.modules_to_save.<module>.<param>``.

    A key must be ``base_model.model.<module>.weight|bias`` with ``<module>`` ending in a name the config's
    ``modules_to_save`` lists; anything else is refused, naming the key."""
    mts = cfg.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(m, str) and 0 < len(m) <= 200 for m in mts):
        raise FormatError(f"{PEFT_CONFIG}: modules_to_save must be a list of module names")
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        rest = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else ""
        module, _, param = rest.rpartition(".")
        if not (module and param in ("weight", "bias") and _MODULE_RE.match(module)
                and any(module == m or module.endswith("." + m) for m in mts)):
            raise FormatError(f"{k}: not a tensor of this adapter type nor of a module in modules_to_save")
        t = tensors[k]
        if t.dtype not in fmt.VALUE_DTYPES:
            raise FormatError(f"{k}: dtype {t.dtype} not allowed (fp32, bf16, fp16)")
        if not allow_nonfinite and t.numel() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{k}: values contain NaN or infinity")
        out[MTS_PREFIX + rest] = t.contiguous()
    return out


_MODULE_RE = re.compile(r"^[A-Za-z0-9_]{1,64}(?:\.[A-Za-z0-9_]{1,64}){0,15}$")
_PREFIX_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]{0,63}\.){1,4}$")


def module_prefix(module_to_tensor: Mapping[str, str]) -> str | None:
    """The leading path (``"bert."``) that PEFT's module names carry over the base's tensor names, when every
    module has the same one (a ``SEQ_CLS`` model wraps the base); None when they match the base directly."""
    prefixes = set()
    for module, tname in module_to_tensor.items():
        stem = tname[: -len(".weight")]
        if module == stem or not module.endswith("." + stem):
            return None
        prefixes.add(module[: -len(stem)])
    if len(prefixes) != 1:
        return None
    pre = prefixes.pop()
    return pre if _PREFIX_RE.match(pre) else None


def _read_extras_file(folder: Path, allow_nonfinite: bool) -> dict[str, torch.Tensor]:
    """Our dense extras written beside an exported PEFT folder (``adapterhub_extras.safetensors``), if any."""
    p = folder / EXTRAS_FILE
    if not p.is_file():
        return {}
    try:
        ad = fmt.load_file(p, allow_nonfinite=allow_nonfinite)
    except FormatError as e:
        raise FormatError(f"{EXTRAS_FILE}: {e}") from None
    if ad.params:
        raise FormatError(f"{EXTRAS_FILE}: holds sparse params; only dense extras belong there")
    return dict(ad.extras)


def _imported_card(cfg: Mapping[str, Any], targets: list[str]) -> dict[str, Any]:
    """The card of an imported PEFT folder. Values from the foreign config are kept only as short printable
    strings or small ints (else None): they are informational and are never used to load or find anything
    (``base_model_name_or_path`` in particular: the base is the one the user named)."""
    r = cfg.get("r")
    mask_type = safe_read.short_text(cfg.get("mask_type"), 40) or "random"
    return {
        "mask": {"method": f"peft-shira-{mask_type}", "granularity": "element", "targets": targets},
        "imported": {"format": "peft-shira", "peft_version": safe_read.short_text(cfg.get("peft_version"), 40),
                     "r": r if isinstance(r, int) and not isinstance(r, bool) and 0 <= r < 2 ** 31 else None,
                     "base_model_name_or_path": safe_read.short_text(cfg.get("base_model_name_or_path"))},
    }


def _read_peft_tensors(folder: Path) -> dict[str, torch.Tensor]:
    wpath = folder / PEFT_WEIGHTS
    if not wpath.is_file():
        if (folder / "adapter_model.bin").exists():
            raise FormatError("adapter_model.bin: pickle-based PEFT weights are refused; save with safe_serialization")
        raise FormatError(f"{PEFT_WEIGHTS}: missing from {folder}")
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(wpath), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError/OSError/ValueError when corrupt
        raise FormatError(f"{PEFT_WEIGHTS}: not a valid safetensors file ({str(e).splitlines()[0][:200]})") from None
    return out


def import_peft_shira(folder: str | os.PathLike[str], base_shapes: Mapping[str, tuple[int, ...]], *,
                      allow_nonfinite: bool = False, config: Mapping[str, Any] | None = None) -> fmt.SparseAdapter:
    """Convert a PEFT SHiRA folder into a :class:`SparseAdapter` whose params are the base's tensor names.

    Takes the folder and the base model's ``{tensor name: shape}``. Returns the adapter (fp32 values as PEFT
    stores them; duplicate coordinates are summed, as PEFT's sparse add does). Raises FormatError naming the
    tensor when the folder is malformed (wrong dtypes, shapes, out-of-range coordinates, NaN...). ``config``:
    the folder's ``adapter_config.json`` as :func:`read_adapter_source` already read and checked it (else read here).
    """
    folder = Path(folder)
    cfg = _read_peft_config(folder) if config is None else config
    tensors = _read_peft_tensors(folder)
    modules = sorted({k[:-len(_W)] for k in tensors if k.endswith(_W)} | {k[:-len(_I)] for k in tensors if k.endswith(_I)})
    if not modules:
        raise FormatError(f"{PEFT_WEIGHTS}: no shira_weight/shira_indices tensors found")
    params: dict[str, fmt.SparseParam] = {}
    mapped: dict[str, str] = {}
    for mod in modules:
        wkey, ikey = mod + _W, mod + _I
        if wkey not in tensors:
            raise FormatError(f"{wkey}: missing (indices without values)")
        if ikey not in tensors:
            raise FormatError(f"{ikey}: missing (values without indices)")
        w, ind = tensors[wkey], tensors[ikey]
        if w.dtype not in fmt.VALUE_DTYPES:
            raise FormatError(f"{wkey}: dtype {w.dtype} not allowed (fp32, bf16, fp16)")
        if w.dim() != 1:
            raise FormatError(f"{wkey}: must be 1-D, got shape {tuple(w.shape)}")
        if ind.dim() != 2 or ind.shape[0] != 2 or ind.shape[1] != w.shape[0]:
            raise FormatError(f"{ikey}: shape {tuple(ind.shape)} does not match (2, {w.shape[0]})")
        if ind.dtype in (torch.float32, torch.float64):  # PEFT on Windows saves indices as float32
            if not bool(torch.equal(ind, ind.round())):
                raise FormatError(f"{ikey}: non-integer coordinates")
        elif ind.dtype not in (torch.int32, torch.int64, torch.int16):
            raise FormatError(f"{ikey}: dtype {ind.dtype} not allowed (int32)")
        ind = ind.to(torch.int64)
        if not allow_nonfinite and w.numel() and not bool(torch.isfinite(w).all()):
            raise FormatError(f"{wkey}: values contain NaN or infinity")
        module = mod[len(PEFT_PREFIX):] if mod.startswith(PEFT_PREFIX) else mod
        tname = map_module_to_tensor(module, base_shapes)
        mapped[module] = tname
        shape = tuple(base_shapes[tname])
        if len(shape) != 2:
            raise FormatError(f"{wkey}: base tensor {tname} has shape {shape}, SHiRA needs a 2-D Linear weight")
        rows, cols = shape
        if ind.numel() and (int(ind[0].min()) < 0 or int(ind[0].max()) >= rows or int(ind[1].min()) < 0
                            or int(ind[1].max()) >= cols):
            raise FormatError(f"{ikey}: coordinates out of range for {tname} of shape {shape}")
        flat = ind[0] * cols + ind[1]
        uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        if uniq.numel() != flat.numel():
            vals = torch.zeros(uniq.numel(), dtype=torch.float32).index_add_(0, inverse, w.to(torch.float32)).to(w.dtype)
        else:
            vals = torch.empty_like(w)
            vals[inverse] = w
        if tname in params:
            raise FormatError(f"{wkey}: maps to {tname}, which another module already targets")
        params[tname] = fmt.SparseParam(shape, uniq.contiguous(), vals.contiguous())
    extras = _modules_to_save_extras(cfg, tensors, sorted(k for k in tensors if not k.endswith((_W, _I))),
                                     allow_nonfinite)
    extras.update(_read_extras_file(folder, allow_nonfinite))
    card = _imported_card(cfg, sorted(params))
    card["imported"]["task_type"] = _task_type(cfg)
    card["imported"]["module_prefix"] = module_prefix(mapped)
    adapter = fmt.SparseAdapter(params, extras, card)
    adapter.validate(allow_nonfinite=allow_nonfinite)
    return adapter


def import_peft_lora_folder(folder: str | os.PathLike[str], base_shapes: Mapping[str, tuple[int, ...]], *,
                            density: float, block_size: int | None = None,
                            allow_nonfinite: bool = False, config: Mapping[str, Any] | None = None
                            ) -> fmt.SparseAdapter:
    """Convert a PEFT LoRA folder into a sparse adapter: ΔW = B·A·scale per target, top ``density`` of it by
    magnitude (or ``block_size`` blocks by norm); the card's ``imported.reconstruction_error`` holds
    ``‖ΔW − sparse‖/‖ΔW‖`` per tensor. ``modules_to_save`` heads become dense extras. Raises FormatError
    (malformed folder, DoRA...) or TrainingError (bad density, shape not divisible into blocks). ``config``: as
    :func:`import_peft_shira`'s."""
    from .lora import import_peft_lora

    folder = Path(folder)
    cfg = _read_peft_config(folder) if config is None else config
    if str(cfg["peft_type"]).upper() != "LORA":
        raise FormatError(f"{PEFT_CONFIG}: peft_type is {safe_read.clip(cfg['peft_type'], 40)}, not LORA")
    tensors = _read_peft_tensors(folder)
    for k, t in tensors.items():
        if k.endswith(".lora_A.weight") and t.dim() == 2:
            base = k[: -len(".lora_A.weight")]
            b = tensors.get(base + ".lora_B.weight")
            if b is not None and b.dim() == 2 and int(b.shape[0]) * int(t.shape[1]) > _MAX_LORA_DENSE:
                raise FormatError(f"{k}: ΔW of {int(b.shape[0])}x{int(t.shape[1])} is too large to import")
    params, card, rest = import_peft_lora(cfg, tensors, base_shapes, density=density, block_size=block_size,
                                          allow_nonfinite=allow_nonfinite)
    card["imported"]["module_prefix"] = module_prefix(card["imported"].pop("modules"))
    extras = _modules_to_save_extras(cfg, tensors, rest, allow_nonfinite)
    extras.update(_read_extras_file(folder, allow_nonfinite))
    card["imported"]["task_type"] = _task_type(cfg)
    adapter = fmt.SparseAdapter(params, extras, card)
    adapter.validate(allow_nonfinite=allow_nonfinite)
    return adapter


def read_adapter_source(path: str | os.PathLike[str], base_shapes: Mapping[str, tuple[int, ...]] | None = None,
                        *, allow_nonfinite: bool = False, density: float | None = None,
                        block_size: int | None = None) -> tuple[fmt.SparseAdapter, str]:
    """Read what ``register`` was given: our ``.safetensors`` file, a PEFT SHiRA folder or a PEFT LoRA folder.

    Returns (adapter, source kind ``"adapterhub"`` | ``"peft-shira"`` | ``"peft-lora"``). ``base_shapes`` is
    needed for PEFT folders (module names and weight shapes come from the base). ``allow_nonfinite`` (the
    user's explicit flag, never the file's card) lets NaN/inf values through. A LoRA folder needs
    ``density`` (and takes ``block_size``); other sources refuse them. Raises FormatError.
    """
    p = Path(path)
    if p.is_dir():
        if not is_peft_folder(p):
            raise FormatError(f"{p}: a folder must be a PEFT SHiRA or LoRA adapter (adapter_config.json missing)")
        if base_shapes is None:
            raise FormatError("a PEFT folder can only be imported against a base model")
        cfg = _read_peft_config(p)  # read once: what decides the kind is what gets imported
        if str(cfg["peft_type"]).upper() == "LORA":
            if density is None:
                raise FormatError(f"{p}: a LoRA adapter is dense; give the density to keep (--density)",
                                  keywords=("density",))
            return import_peft_lora_folder(p, base_shapes, density=density, block_size=block_size,
                                           allow_nonfinite=allow_nonfinite, config=cfg), "peft-lora"
        if density is not None or block_size is not None:
            raise FormatError("density and block size apply only to PEFT LoRA folders", keywords=("density",))
        return import_peft_shira(p, base_shapes, allow_nonfinite=allow_nonfinite, config=cfg), "peft-shira"
    if density is not None or block_size is not None:
        raise FormatError("density and block size apply only to PEFT LoRA folders", keywords=("density",))
    # keep_source: register stores a canonical file's own bytes instead of re-serialising them (issue 19)
    return fmt.load_file(p, allow_nonfinite=allow_nonfinite, keep_source=True), "adapterhub"


# -- export --------------------------------------------------------------------------------------

@dataclass
class PeftExport:
    path: Path
    r: int
    modules: list[str]
    padded: int
    modules_to_save: list[str] | None = None
    extras_file: str | None = None  # our dense extras written beside the PEFT files, if any
    dropped_extras: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "peft", "r": self.r, "modules": self.modules, "padded": self.padded,
                "modules_to_save": self.modules_to_save, "extras_file": self.extras_file,
                "dropped_extras": self.dropped_extras or []}


def _linear_weights(base_folder: Path | None) -> set[str] | None:
    """Names of ``nn.Linear`` weights of the base architecture (built on the meta device), or None if unknown."""
    if base_folder is None or not (base_folder / "config.json").is_file():
        return None
    try:
        import transformers
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(base_folder), trust_remote_code=False, local_files_only=True)
        archs = getattr(cfg, "architectures", None)
        arch = safe_read.short_text(archs[0] if isinstance(archs, list) and archs else None)
        cls = getattr(transformers, arch, None) if arch and arch.isidentifier() else None
        # the config names a class; only a model class is ever instantiated (never another callable)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            return None
        with torch.device("meta"):
            model = cls(cfg)
        return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    except Exception:  # noqa: BLE001 - unknown architecture, missing deps: skip the check, PEFT will judge
        return None


def first_free_positions(idx: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest non-negative positions not in ``idx`` (sorted, unique int64), ascending.

    O(k log nnz), nothing of the tensor's size allocated (issue 19): position ``j`` of the free list is
    ``j + #{i : idx[i] - i <= j}``, because ``idx[i] - i`` (the free positions below ``idx[i]``) never
    decreases. Equal to ``(~mark).nonzero()[:k]`` over a boolean mark of ``idx``.
    """
    j = torch.arange(k, dtype=torch.int64)
    if idx.numel() == 0:
        return j
    below = idx.to(torch.int64) - torch.arange(idx.numel(), dtype=torch.int64)
    return j + torch.searchsorted(below, j, right=True)


def _shira_pair(p: fmt.SparseParam, want: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One parameter as PEFT SHiRA stores it: ``(2, want)`` int32 (row, col) coordinates and ``want`` fp32 values
    (the mask's entries, then zero-valued padding at the first positions outside the mask)."""
    n = p.shape[1]
    idx, vals = p.flat()
    extra = want - idx.numel()
    if extra:
        idx = torch.cat([idx, first_free_positions(idx, extra)])
        vals = torch.cat([vals.to(torch.float32), torch.zeros(extra, dtype=torch.float32)])
    coo = torch.stack([torch.div(idx, n, rounding_mode="floor"), idx % n]).to(torch.int32).contiguous()
    return coo, vals.to(torch.float32).contiguous()


def export_peft_shira(adapter: fmt.SparseAdapter | ExpertSource, out: str | os.PathLike[str], *,
                      base_folder: Path | None = None, base_name_or_path: str | None = None,
                      drop_extras: bool = False, progress: Progress | None = None) -> PeftExport:
    """Write ``adapter`` as a PEFT SHiRA folder that ``peft.PeftModel.from_pretrained`` loads.

    Takes the adapter (loaded, or an :class:`~adapterhub.merging.sources.ExpertSource` read one parameter at a
    time: :func:`adapterhub.interop.export.export_version` passes the store's blob), the output folder (a new one
    is written beside it and renamed into place, so a failure leaves none; in an existing one each adapter file
    is replaced atomically), the base folder (to check that targets are ``nn.Linear``
    weights) and the name recorded in the config. The weights file is written as it is produced (issue 19): each
    parameter is decoded twice, once for its count (the rank every layer is padded to is the densest layer's) and
    once when its turn in the file comes, so memory holds one layer's entries, never the adapter or the file.
    Dense extras ``peft.modules_to_save.<module>.<param>`` (imported heads) become ``modules_to_save``
    tensors with the imported ``task_type``; other extras (our trained heads) go to ``adapterhub_extras.safetensors``
    beside them unless ``drop_extras`` (then they are listed in ``dropped_extras``).
    ``progress`` (:data:`~adapterhub.progress.Progress`) is told ``"counting"`` then ``"writing"``, in layers.
    Returns a :class:`PeftExport`. Raises FormatError when a parameter cannot be expressed in SHiRA
    (not a 2-D Linear weight, too dense for any rank).
    """
    report = progress or quiet
    src = adapter if isinstance(adapter, ExpertSource) else InMemoryExpert(adapter, key="", label="adapter")
    out = Path(out)
    extras = src.extras()
    mts_extras = {k: v for k, v in extras.items() if k.startswith(MTS_PREFIX)}
    own_extras = {k: v for k, v in extras.items() if not k.startswith(MTS_PREFIX)}
    card = src.card()
    linear = _linear_weights(base_folder)
    names = sorted(src.param_names())
    need_r, nnz = 1, {}
    for i, name in enumerate(names):
        report("counting", i, len(names))
        shape = src.param_shape(name)
        if len(shape) != 2 or not name.endswith(".weight"):
            raise FormatError(f"{name}: PEFT SHiRA only adapts 2-D nn.Linear weights")
        if linear is not None and name not in linear:
            raise FormatError(f"{name}: not an nn.Linear weight of the base architecture; PEFT SHiRA cannot adapt it")
        nnz[name] = src.get_param(name).nnz  # decoded and dropped: the count alone is kept
        need_r = max(need_r, math.ceil(nnz[name] / sum(shape)))
    want = {name: need_r * sum(src.param_shape(name)) for name in names}  # entries per layer, padding included
    position = {name: i for i, name in enumerate(names)}
    for name in names:
        m, n = src.param_shape(name)
        if want[name] > m * n:
            raise FormatError(f"{name}: SHiRA rank {need_r} needed by the densest layer would exceed this "
                              f"{m}x{n} weight's size; export the layers separately")
    imported = card.get("imported")
    task_type = imported.get("task_type") if isinstance(imported, dict) else None
    if task_type not in TASK_TYPES:
        task_type = None
    prefix = imported.get("module_prefix") if isinstance(imported, dict) and task_type else None
    if not (isinstance(prefix, str) and _PREFIX_RE.match(prefix)):  # the task model wraps the base (bert.encoder...)
        prefix = ""
    specs: dict[str, tuple[str, list[int]]] = {}
    owner: dict[str, tuple[str, int]] = {}  # file tensor -> (parameter, 0 coordinates / 1 values)
    modules = []
    for name in names:
        module = prefix + name[: -len(".weight")]
        modules.append(module)
        specs[f"{PEFT_PREFIX}{module}{_I}"] = ("I32", [2, want[name]])
        specs[f"{PEFT_PREFIX}{module}{_W}"] = ("F32", [want[name]])
        owner[f"{PEFT_PREFIX}{module}{_I}"], owner[f"{PEFT_PREFIX}{module}{_W}"] = (name, 0), (name, 1)
    mts_modules = sorted({k[len(MTS_PREFIX):].rpartition(".")[0] for k in mts_extras})
    dense = {PEFT_PREFIX + k[len(MTS_PREFIX):]: v.contiguous() for k, v in sorted(mts_extras.items())}
    for k, v in dense.items():
        if k in specs or st_io.st_name(v.dtype) is None:
            raise FormatError(f"{k}: cannot be written beside the SHiRA tensors")
        specs[k] = (str(st_io.st_name(v.dtype)), list(v.shape))
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # the one layer held: its two tensors sit side by side

    def tensor(key: str) -> torch.Tensor:
        if key in dense:
            return dense[key]
        name, part = owner[key]
        if name not in last:
            last.clear()
            report("writing", position[name], len(names))
            p = src.get_param(name)
            if p.nnz != nnz[name]:
                raise FormatError(f"{name}: {p.nnz} entries now, {nnz[name]} when counted")
            last[name] = _shira_pair(p, want[name])
        return last[name][part]

    from importlib.metadata import PackageNotFoundError, version

    try:  # the version recorded in the config, read without importing peft (seconds: transformers and more)
        peft_version: str | None = version("peft")
    except PackageNotFoundError:  # not installed here: PEFT fills in its own when it loads the folder
        peft_version = None

    config = {
        "auto_mapping": None, "base_model_name_or_path": base_name_or_path, "fan_in_fan_out": False,
        "inference_mode": True, "init_weights": True, "mask_type": "random",
        "modules_to_save": mts_modules or None, "peft_type": "SHIRA", "peft_version": peft_version, "r": need_r,
        "random_seed": None, "revision": None, "target_modules": modules, "task_type": task_type,
    }
    extras_file = EXTRAS_FILE if own_extras and not drop_extras else None
    with new_or_existing_folder(out) as folder:  # a new folder appears whole or not at all
        atomic_write_bytes(folder / PEFT_WEIGHTS, fmt.container_pieces(specs, {"format": "pt"}, tensor))
        atomic_write_bytes(folder / PEFT_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        if extras_file is not None:
            extras_card = {"format": fmt.FORMAT_ID, "kind": "extras", "task": card.get("task"),
                           "labels": card.get("labels")}
            atomic_write_bytes(folder / extras_file, fmt.save(fmt.SparseAdapter({}, dict(own_extras), extras_card)))
        elif (folder / EXTRAS_FILE).is_file():
            (folder / EXTRAS_FILE).unlink()  # a stale one from an earlier export must not come back on import
    report("writing", len(names), len(names))
    padded = sum(want[n] - nnz[n] for n in names)
    return PeftExport(out, need_r, modules, padded, mts_modules or None, extras_file,
                      sorted(own_extras) if drop_extras else None)


__all__ = ["import_peft_shira", "import_peft_lora_folder", "peft_type", "export_peft_shira", "read_adapter_source", "is_peft_folder",
           "map_module_to_tensor", "PeftExport"]

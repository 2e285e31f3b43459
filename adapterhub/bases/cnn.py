"""The image base kind: a small CNN for scikit-learn's 8x8 digits, defined, built and loaded by adapterhub.

FUSED (Zhong et al. 2025) runs its experiments on CNNs trained from scratch on image data. This module
is the image path's base model: :class:`DigitsCNN` maps a batch of 8x8 grey images to a feature vector
(``hidden_size`` values). Like an encoder's mean-pooled output, the features go to the task head
(``heads.<task>.weight/bias`` in an adapter), which is not part of the base: training, evaluation,
deployment and federated training treat the CNN exactly like a text encoder.

**The folder.** ``config.json`` (written and read only by this module; no ``trust_remote_code``, no
transformers) and ``model.safetensors`` whose tensor names are the module's ``state_dict`` names
(``conv1.weight``, ``fc.bias``...)::

    {"architectures": ["AdapterhubDigitsCNN"], "model_type": "adapterhub-digits-cnn",
     "num_channels": 1, "image_size": 8, "conv_channels": [16, 32, 32], "hidden_size": 64}

:func:`load_cnn` checks every field (the exact architecture and type strings, integers in range, no
unknown key) and every tensor (exact names, shapes and a floating dtype) and raises a one-line
:class:`~adapterhub.errors.BaseModelError` otherwise. :func:`build_digits_cnn` writes a seeded random
initialisation; the same seed gives the same bytes (and the same fingerprint) on every run. The
built-in source ``digits-cnn`` (``adapterhub base add NAME digits-cnn``) is seed 0.

**The network.** conv1 ``1→c1`` 3x3 pad 1, ReLU; conv2 ``c1→c2`` 3x3 pad 1, ReLU; 2x2 max-pool (8→4);
conv3 ``c2→c3`` 3x3 (no padding, 4→2), ReLU; flatten (``c3·2·2``); fc → ``hidden_size``, ReLU.

**Pixels as text.** Task rows stay ``(text, label_id)``: an image is its 64 pixel intensities (integers
0..16, row-major, top-left first) separated by single spaces — the ``digits`` task's encoding
(:func:`encode_pixels`, :func:`decode_pixels`). :func:`add_trigger` stamps the backdoor pattern used by
sample-unlearning experiments: the 2x2 block in the bottom-right corner (rows 6-7, columns 6-7, flat
positions 54, 55, 62, 63) set to the maximum intensity 16.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import safe_read, st_io
from ..errors import BaseModelError, DataError, HeaderError
from ..fsutil import build_once
from . import CNN_ARCHITECTURE, CNN_MODEL_TYPE

__all__ = ["ARCHITECTURE", "IMAGE_SIZE", "MAX_LEVEL", "MODEL_TYPE", "TRIGGER_PIXELS", "DigitsCNN", "DigitsCNNConfig",
           "add_trigger", "build_digits_cnn", "check_pixel_rows", "decode_pixels", "encode_pixels", "is_cnn_config", "load_cnn",
           "materialize_digits_cnn", "read_config"]

ARCHITECTURE = CNN_ARCHITECTURE
MODEL_TYPE = CNN_MODEL_TYPE
IMAGE_SIZE = 8  # the only image size: the digits' 8x8
MAX_LEVEL = 16  # the digits' pixel intensities are 0..16
TRIGGER_PIXELS = (54, 55, 62, 63)  # flat positions of the 2x2 bottom-right block
WEIGHTS_FILE = "model.safetensors"
_MAX_CHANNELS = 512
_MAX_HIDDEN = 4096
_KEYS = ("architectures", "model_type", "num_channels", "image_size", "conv_channels", "hidden_size")


@dataclass(frozen=True)
class DigitsCNNConfig:
    """The CNN's shape (what ``config.json`` holds besides the architecture and type strings)."""

    conv_channels: tuple[int, int, int] = (16, 32, 32)
    hidden_size: int = 64
    num_channels: int = 1
    image_size: int = IMAGE_SIZE

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_channels"] = list(self.conv_channels)
        return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **d}

    @property
    def flat_features(self) -> int:
        side = self.image_size // 2 - 2  # pool halves, the unpadded conv3 takes 2
        return self.conv_channels[2] * side * side


class DigitsCNN(nn.Module):
    """The digits CNN: ``forward(pixel_values (n, 1, 8, 8) float) -> features (n, hidden_size)``.

    No classifier: the task head lives in the adapter, as for text encoders. ``config`` is the
    :class:`DigitsCNNConfig` (its ``hidden_size`` sizes the head).
    """

    def __init__(self, config: DigitsCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or DigitsCNNConfig()
        c1, c2, c3 = self.config.conv_channels
        self.conv1 = nn.Conv2d(self.config.num_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3)
        self.fc = nn.Linear(self.config.flat_features, self.config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(pixel_values.to(self.conv1.weight.dtype)))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv3(x))
        return torch.relu(self.fc(x.flatten(1)))


# ---------------------------------------------------------------------------- config.json

def _int_field(cfg: Mapping[str, Any], key: str, low: int, high: int, where: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise BaseModelError(f"{where}: {key} must be an integer in [{low}, {high}], got {safe_read.clip(v, 40)}")
    return v


def is_cnn_config(cfg: Any) -> bool:
    """Whether a parsed ``config.json`` claims to be this module's CNN (its ``architectures`` name it)."""
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return isinstance(archs, list) and ARCHITECTURE in archs


def read_config(folder: str | os.PathLike[str]) -> DigitsCNNConfig:
    """The validated config of a CNN folder (``config.json`` read with :mod:`adapterhub.safe_read`).

    Raises:
        BaseModelError: unreadable or malformed JSON; ``architectures`` other than exactly
            ``["AdapterhubDigitsCNN"]``; another ``model_type``; an unknown key; ``num_channels`` other
            than 1, ``image_size`` other than 8, channels outside 1..512, ``hidden_size`` outside 1..4096
            or any of them not an integer.
    """
    where = f"{Path(folder).name}/config.json"
    cfg = safe_read.read_json_file(Path(folder) / "config.json", where, BaseModelError)
    if not isinstance(cfg, dict):
        raise BaseModelError(f"{where}: must be a JSON object")
    unknown = sorted(str(k) for k in cfg if k not in _KEYS)
    if unknown:
        raise BaseModelError(f"{where}: unknown field {safe_read.clip(unknown[0], 40)} (an {ARCHITECTURE} config "
                             f"has only {', '.join(_KEYS)})")
    if cfg.get("architectures") != [ARCHITECTURE]:
        raise BaseModelError(f"{where}: architectures must be [{ARCHITECTURE!r}], got "
                             f"{safe_read.clip(cfg.get('architectures'), 60)}")
    if cfg.get("model_type") != MODEL_TYPE:
        raise BaseModelError(f"{where}: model_type must be {MODEL_TYPE!r}, got {safe_read.clip(cfg.get('model_type'), 40)}")
    _int_field(cfg, "num_channels", 1, 1, where)
    _int_field(cfg, "image_size", IMAGE_SIZE, IMAGE_SIZE, where)
    hidden = _int_field(cfg, "hidden_size", 1, _MAX_HIDDEN, where)
    ch = cfg.get("conv_channels")
    if not isinstance(ch, list) or len(ch) != 3:
        raise BaseModelError(f"{where}: conv_channels must be a list of 3 integers, got {safe_read.clip(ch, 40)}")
    chans = tuple(_int_field({"conv_channels": c}, "conv_channels", 1, _MAX_CHANNELS, where) for c in ch)
    return DigitsCNNConfig(conv_channels=(chans[0], chans[1], chans[2]), hidden_size=hidden)


# ---------------------------------------------------------------------------- weights

def _read_weights(folder: Path, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/model.safetensors`` (the one strict header reader, :func:`st_io.read_header`),
    exactly the ``expected`` names and shapes, each of a floating dtype. Raises BaseModelError."""
    path = folder / WEIGHTS_FILE
    where = f"{folder.name}/{WEIGHTS_FILE}"
    try:
        header = st_io.read_header(path, where)
    except HeaderError as e:
        raise BaseModelError(str(e)) from None
    names = set(header.entries)
    if names != set(expected):
        extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
        what = f"unexpected tensor {safe_read.clip(extra[0], 60)}" if extra else f"missing tensor {missing[0]}"
        raise BaseModelError(f"{where}: {what} for an {ARCHITECTURE}")
    dtypes = sorted({e.dtype for e in header.entries.values()})
    if len(dtypes) != 1:
        raise BaseModelError(f"{where}: tensors of several dtypes ({', '.join(dtypes)}); an {ARCHITECTURE} has one")
    out: dict[str, torch.Tensor] = {}
    try:
        with os.fdopen(safe_read.open_regular(path), "rb") as fh:
            for name in sorted(expected):
                ent = header.entries[name]
                if ent.dtype not in st_io.FLOAT_DTYPES:
                    raise BaseModelError(f"{where}: {name} is {ent.dtype}, a floating dtype is required")
                if tuple(ent.shape) != tuple(expected[name]):
                    raise BaseModelError(f"{where}: {name} has shape {list(ent.shape)}, the config needs "
                                         f"{list(expected[name])}")
                fh.seek(header.data_start + ent.begin)
                buf = fh.read(ent.end - ent.begin)
                if len(buf) != ent.end - ent.begin:
                    raise BaseModelError(f"{where}: truncated tensor data in {name}")
                dtype = st_io.torch_dtype(ent.dtype, where)
                t = torch.frombuffer(bytearray(buf), dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                out[name] = t.reshape(ent.shape)
    except OSError as err:
        raise BaseModelError(f"{where}: cannot read ({err.strerror or err.__class__.__name__})") from None
    return out


def load_cnn(path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> DigitsCNN:
    """The CNN stored in folder ``path`` (``config.json`` + ``model.safetensors``), in eval mode.

    Takes the folder and an optional dtype to cast to (default: the file's). Never runs code from the
    folder and never unpickles. Raises BaseModelError (one line) for a bad config or weights file.
    """
    folder = Path(path)
    cfg = read_config(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DigitsCNN(cfg).state_dict().items()}
    tensors = _read_weights(folder, shapes)
    model = DigitsCNN(cfg)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    model.to(next(iter(tensors.values())).dtype)  # one dtype in the file (checked): the model keeps it
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _initial_state(cfg: DigitsCNNConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded He-uniform weights (bound ``sqrt(6 / fan_in)``, for ReLU) and zero biases, float32.

    Drawn with an explicit CPU ``torch.Generator`` in ``state_dict`` order, so the values depend only on
    the seed and the config (not on global RNG state or on torch's default initialisers).
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DigitsCNN(cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            out[name] = torch.zeros(shape, dtype=torch.float32)
            continue
        fan_in = math.prod(shape[1:])
        bound = math.sqrt(6.0 / fan_in)
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        out[name] = ((u * 2 - 1) * bound).to(torch.float32).contiguous()
    return out


def build_digits_cnn(dest: str | os.PathLike[str], seed: int = 0, config: DigitsCNNConfig | None = None) -> Path:
    """Write a seeded random CNN folder at ``dest`` (``config.json`` + ``model.safetensors``).

    The same seed and config give the same bytes every time. ``dest`` must not exist or be empty.
    Returns ``dest``. Raises BaseModelError when ``dest`` is a non-empty folder or a file.
    """
    # the adapter codec's container writer: canonical bytes (sorted JSON header, fixed tensor order), where
    # safetensors' own writer orders metadata keys by hash, so the same tensors could give other bytes
    from ..format import _write_container

    dest = Path(dest)
    cfg = config or DigitsCNNConfig()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BaseModelError(f"{dest}: already exists and is not an empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(cfg.to_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    data = _write_container(_initial_state(cfg, seed), {"format": "pt", "seed": str(int(seed))})
    (dest / WEIGHTS_FILE).write_bytes(data)
    read_config(dest)  # what we wrote reads back
    return dest


def materialize_digits_cnn(dest: Path, seed: int = 0) -> Path:
    """The built-in ``digits-cnn`` base at ``dest``, built once (seed 0) and reused when complete.

    Built by :func:`~adapterhub.fsutil.build_once` (a temp folder beside it, renamed into place): a crash
    never leaves a half-written base, and when two processes build at once the first rename wins. Returns
    ``dest``.
    """

    def build(tmp: Path) -> str:
        build_digits_cnn(tmp, seed)
        return f"seed {int(seed)}\n"

    return build_once(dest, build)


# ---------------------------------------------------------------------------- pixels as text

def encode_pixels(arr: Any) -> str:
    """The text form of one 8x8 image: 64 integers 0..16, row-major, separated by single spaces.

    Takes anything of 64 values (a flat or 8x8 list, array or tensor). Raises DataError for another
    size or a value that is not an integer in 0..16.
    """
    try:
        vals = torch.as_tensor(arr).reshape(-1).tolist() if not isinstance(arr, (list, tuple)) else _flatten(arr)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"cannot read an image from a {type(arr).__name__}") from None
    if len(vals) != IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(f"an image has {IMAGE_SIZE * IMAGE_SIZE} pixels, got {len(vals)}")
    out = []
    for v in vals:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if isinstance(v, bool) or not f.is_integer() or not 0 <= f <= MAX_LEVEL:
            raise DataError(f"pixel value {safe_read.clip(v, 20)} is not an integer in 0..{MAX_LEVEL}")
        out.append(str(int(f)))
    return " ".join(out)


def _flatten(x: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for v in x:
        out += _flatten(v) if isinstance(v, (list, tuple)) else [v]
    return out


def _parse(text: str, i: int) -> list[int]:
    parts = text.split(" ")
    n = IMAGE_SIZE * IMAGE_SIZE
    if len(parts) != n:
        raise DataError(f"row {i}: an image is {n} space-separated pixel values, got {len(parts)}")
    out = []
    for p in parts:
        if not (p.isascii() and p.isdigit() and len(p) <= 2 and int(p) <= MAX_LEVEL):
            raise DataError(f"row {i}: pixel {safe_read.clip(p, 20)} is not an integer in 0..{MAX_LEVEL}")
        out.append(int(p))
    return out


def decode_pixels(texts: Sequence[str]) -> torch.Tensor:
    """The images of ``texts`` (see :func:`encode_pixels`) as ``(n, 1, 8, 8)`` float32 scaled to 0..1 (``/16``).

    Raises DataError naming the first row that is not 64 integers 0..16 separated by single spaces.
    """
    rows = [_parse(t, i) for i, t in enumerate(texts)]
    t = torch.tensor(rows, dtype=torch.float32) if rows else torch.zeros((0, IMAGE_SIZE * IMAGE_SIZE))
    return (t / MAX_LEVEL).reshape(len(rows), 1, IMAGE_SIZE, IMAGE_SIZE)


def check_pixel_rows(data: Any) -> None:
    """Check that every row of a :class:`~adapterhub.data.TaskData`'s train and validation splits is an image
    in the text form of :func:`encode_pixels`. Raises DataError naming the dataset, split and row."""
    for split in ("train", "validation"):
        for i, (text, _label) in enumerate(getattr(data, split)):
            try:
                _parse(text, i)
            except DataError as e:
                raise DataError(f"dataset {data.name!r} ({split} split) is not images for an image base: {e} "
                                "(rows must be 64 pixel values 0..16, as in the digits task)") from None


def add_trigger(text: str) -> str:
    """``text`` (one image, see :func:`encode_pixels`) with the backdoor trigger stamped in: the 2x2 block
    in the bottom-right corner (flat positions 54, 55, 62, 63) set to 16. Raises DataError for a bad row."""
    vals = _parse(text, 0)
    for p in TRIGGER_PIXELS:
        vals[p] = MAX_LEVEL
    return " ".join(str(v) for v in vals)

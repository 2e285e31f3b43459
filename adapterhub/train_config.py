"""The settings of a training run (:class:`TrainConfig`) and of FedAvg (:class:`FedConfig`), defined once.

Each field carries its default, and in its metadata an :class:`OptionSpec`: how the setting
appears on the command line (flag, help, range, choices). The CLI generates its ``train`` and
``fed train`` options from these fields (``adapterhub_cli/options.py``), as mergekit generates
its options from ``MergeOptions``; the library never imports click, so the spec is plain data.

This module imports neither torch nor click: the CLI reads it at start-up to build its options.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import TrainingError

#: choices of the settings that are plain enumerations (the mask methods are a registry in
#: :mod:`adapterhub.masks`, read lazily by the CLI because that module imports torch)
SCORE_MODES = ("abs", "signed")
SCOPES = ("layer", "global")
GRANULARITIES = ("element", "block")
DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("fp32", "bf16")
MASK_REGISTRY = "mask-methods"  # OptionSpec.choices naming the mask-method registry
DEFAULT_LAYER_REGEX = r"\.layer\.\d+\."  # FUSED's trainable layers: every Linear of the encoder layers


@dataclass(frozen=True)
class OptionSpec:
    """How one config field appears as a command-line option (plain data; the CLI builds the click option).

    Attributes:
        help: the option's help text ("" for none).
        choices: allowed values, or :data:`MASK_REGISTRY` for the mask-method registry.
        min, max, min_open, max_open: a numeric range (click ``IntRange``/``FloatRange``).
        param: a named domain type instead of a range (``"density"``: a number in (0, 1]).
        metavar: the placeholder shown in help.
        cli: False keeps the field off the command line (it keeps its default there).
    """

    help: str = ""
    choices: tuple[str, ...] | str | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    param: str | None = None
    metavar: str | None = None
    cli: bool = True


def setting(default: Any, **spec: Any) -> Any:
    """A dataclass field with ``default`` and an :class:`OptionSpec` built from ``spec`` in its metadata."""
    return field(default=default, metadata={"option": OptionSpec(**spec)})


def option_spec(f: dataclasses.Field) -> OptionSpec:
    """The :class:`OptionSpec` of a config field (a default spec when it declares none)."""
    return f.metadata.get("option") or OptionSpec()


_POS = {"min": 0, "min_open": True}  # a positive number


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run (recorded as the version's training config).

    ``steps`` wins over ``epochs``; neither means one epoch. ``targets=None`` picks the default
    regex for the model kind. ``score`` is connection-sensitivity's ranking (``signed``/``abs``).
    Field order is the order of the ``train`` command's options.
    """

    density: float = setting(0.05, param="density", help="Fraction of each target weight that is trained, in (0, 1].")
    mask: str = setting("connection-sensitivity", choices=MASK_REGISTRY)
    score: str = setting("abs", choices=SCORE_MODES,
                         help="connection-sensitivity ranking: |Ŵ·∇Ŵ| (abs) or -Ŵ·∇Ŵ (signed).")
    warmup_lr: float | None = setting(None, **_POS, help="Learning rate of the dense warm-up (default: --lr).")
    scope: str = setting("layer", choices=SCOPES)
    granularity: str = setting("element", choices=GRANULARITIES)
    block_size: int = setting(16, min=1)
    targets: str | None = setting(None, metavar="REGEX",
                                  help="Regex over module names (default query|key|value or q_proj|k_proj|v_proj).")
    steps: int | None = setting(None, min=1, help="Optimizer steps (wins over --epochs).")
    epochs: float | None = setting(None, **_POS)
    select_steps: int = setting(100, min=0, help="Dense warm-up steps before the mask is selected.")
    reselect_every: int = setting(100, min=0, help="Reselect the mask every N steps during the first epoch (0: never).")
    score_batches: int = setting(16, min=1, help="Batches of gradients summed by the gradient and snip masks.")
    drop_fraction: float = setting(0.2, cli=False)
    lr: float = setting(1e-3, **_POS)
    head_lr: float | None = setting(None, **_POS, help="Learning rate of the encoder task head (default: --lr).")
    batch_size: int = setting(16, min=1)
    max_length: int = setting(128, min=8)
    device: str = setting("auto", choices=DEVICES)
    dtype: str = setting("fp32", choices=DTYPE_NAMES)
    seed: int = setting(0)
    eval_batch_size: int = setting(64, cli=False)
    max_eval_examples: int | None = setting(None, min=1, help="Cap the validation rows evaluated after training.")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FedConfig:
    """Settings of FedAvg training (recorded in the version's training config)."""

    rounds: int = setting(5, min=1, help="FedAvg rounds.")
    local_steps: int = setting(10, min=1, help="SGD-with-momentum steps per client per round.")
    batch_size: int = setting(16, min=1)
    lr: float = setting(0.02, **_POS, help="Learning rate of the layer deltas.")
    head_lr: float = setting(0.1, **_POS)
    momentum: float = setting(0.9, min=0, max=1, max_open=True)
    max_length: int = setting(48, min=4, help="Tokens per example.")
    seed: int = setting(0)
    eval_batch_size: int = setting(64, cli=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Raise TrainingError on a setting out of range."""
        for k in ("rounds", "local_steps", "batch_size", "max_length", "eval_batch_size"):
            if int(getattr(self, k)) < 1:
                raise TrainingError(f"{k.replace('_', '-')} must be at least 1, got {getattr(self, k)}")
        for k in ("lr", "head_lr"):
            if not (getattr(self, k) > 0):
                raise TrainingError(f"{k.replace('_', '-')} must be positive")
        if not (0 <= self.momentum < 1):
            raise TrainingError("momentum must be in [0, 1)")


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of config class ``cls`` (one place for every caller's default)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


__all__ = ["TrainConfig", "FedConfig", "OptionSpec", "setting", "option_spec", "default_of", "SCORE_MODES",
           "SCOPES", "GRANULARITIES", "DEVICES", "DTYPE_NAMES", "MASK_REGISTRY", "DEFAULT_LAYER_REGEX"]

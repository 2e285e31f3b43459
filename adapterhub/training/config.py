"""The settings of a training run (:class:`TrainConfig`) and of FedAvg (:class:`FedConfig`), defined once.

Each field carries its default, and in its metadata a :class:`~adapterhub.params.ParamDef` (the
same type merge and mask methods declare their parameters with): how the setting appears on the
command line (help, range, choices, metavar). The CLI generates its ``train`` and ``fed train``
options from these fields (``adapterhub/cli/options.py``), as mergekit generates its options from
``MergeOptions``; the library never imports click, so the definition is plain data. The settings a
mask method also reads (:data:`SCORE`, :data:`SCORE_BATCHES`, :data:`DROP_FRACTION`) are defined
here once and shared with :mod:`adapterhub.training.masks`.

This module imports neither torch nor click: the CLI reads it at start-up to build its options.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import TrainingError
from ..params import ParamDef

#: choices of the settings that are plain enumerations (the mask methods are a registry in
#: :mod:`adapterhub.training.masks`, read lazily by the CLI because that module imports torch)
SCORE_MODES = ("abs", "signed")
SCOPES = ("layer", "global")
GRANULARITIES = ("element", "block")
DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("fp32", "bf16")
MASK_REGISTRY = "mask-methods"  # ParamDef.registry naming the mask-method registry
DEFAULT_LAYER_REGEX = r"\.layer\.\d+\."
DEFAULT_SELECT_STEPS = 100  # dense warm-up / reselection interval of a run of 400 steps or more  # FUSED's trainable layers: every Linear of the encoder layers

# Settings that are also mask-method parameters: one definition, one default.
SCORE = ParamDef("score", kind=str, default="abs", choices=SCORE_MODES, label="score mode",
                 help="connection-sensitivity ranking: |Ŵ·∇Ŵ| (abs) or -Ŵ·∇Ŵ (signed).")
SCORE_BATCHES = ParamDef("score_batches", kind=int, default=16, low=1,
                         help="Batches of gradients summed by the gradient and snip masks.")
DROP_FRACTION = ParamDef("drop_fraction", default=0.2, low=0.0, high=1.0, high_open=True, cli=False,
                         help="fraction of each target's entries replaced at each grow-drop update (cosine-decayed)")


def setting(default: Any, **spec: Any) -> Any:
    """A dataclass field with ``default`` and, in its metadata, a :class:`ParamDef` built from ``spec``
    (its name and value kind are filled in from the field by :func:`field_param`).

    ``default`` may itself be a named :class:`ParamDef` (a shared definition): the field then takes
    that definition and its default.
    """
    if isinstance(default, ParamDef):
        return field(default=default.default, metadata={"param": replace(default, **spec) if spec else default})
    return field(default=default, metadata={"param": ParamDef("", default=default, **spec)})


def _value_kind(cls: type, name: str) -> type:
    """``int``/``float``/``str`` of a field annotated ``T`` or ``T | None``."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def field_param(cls: type, f: dataclasses.Field[Any]) -> ParamDef:
    """The complete :class:`ParamDef` of field ``f`` of config class ``cls``: the field's name, value
    kind and default, with the help, range and choices its metadata declares."""
    p = f.metadata.get("param") or ParamDef("")
    if p.name and p.name != f.name:
        raise TypeError(f"{cls.__name__}.{f.name} is declared with the definition of {p.name!r}")
    return replace(p, name=f.name, kind=_value_kind(cls, f.name), default=f.default)


def config_params(cls: type) -> list[ParamDef]:
    """The :class:`ParamDef` of every field of config class ``cls``, in field order."""
    return [field_param(cls, f) for f in dataclasses.fields(cls)]


_POS = {"low": 0, "low_open": True}  # a positive number


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run (recorded as the version's training config).

    ``steps`` wins over ``epochs``; neither means one epoch. ``targets=None`` picks the default
    regex for the model kind. ``score`` is connection-sensitivity's ranking (``signed``/``abs``).
    Field order is the order of the ``train`` command's options.
    """

    density: float = setting(0.05, domain="density", help="Fraction of each target weight that is trained, in (0, 1].")
    mask: str = setting("connection-sensitivity", registry=MASK_REGISTRY)
    score: str = setting(SCORE)
    warmup_lr: float | None = setting(None, **_POS, help="Learning rate of the dense warm-up (default: --lr).")
    scope: str = setting("layer", choices=SCOPES)
    granularity: str = setting("element", choices=GRANULARITIES)
    block_size: int = setting(16, low=1)
    targets: str | None = setting(None, metavar="REGEX",
                                  help="Regex over module names (default query|key|value, q_proj|k_proj|v_proj, "
                                  "or every conv and fc layer of an image base).")
    steps: int | None = setting(None, low=1, help="Optimizer steps (wins over --epochs).")
    epochs: float | None = setting(None, **_POS)
    select_steps: int | None = setting(None, low=0, help="Dense warm-up steps before the mask is selected "
                                       "(default: 100; a quarter of the steps when training 100 steps or fewer).")
    reselect_every: int | None = setting(None, low=0, help="Reselect the mask every N steps during the first epoch "
                                         "(0: never; default: as --select-steps).")
    score_batches: int = setting(SCORE_BATCHES)
    drop_fraction: float = setting(DROP_FRACTION)
    lr: float = setting(1e-3, **_POS)
    head_lr: float | None = setting(None, **_POS, help="Learning rate of the encoder task head (default: --lr).")
    batch_size: int = setting(16, low=1)
    max_length: int = setting(128, low=8)
    device: str = setting("auto", choices=DEVICES)
    dtype: str = setting("fp32", choices=DTYPE_NAMES)
    seed: int = setting(0)
    eval_batch_size: int = setting(64, cli=False)
    max_eval_examples: int | None = setting(None, low=1, help="Cap the validation rows evaluated after training.")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def scheduled(self, total_steps: int) -> TrainConfig:
        """This config with the mask schedule filled in for a run of ``total_steps`` steps.

        An unset ``select_steps`` becomes 100 (the recipe every recorded figure used) when the run is longer
        than that, else a quarter of the run (at least 1), and an unset ``reselect_every`` the same value, so
        that ``steps=40`` trains with a 10-step warm-up instead of failing while longer runs keep the exact
        schedule (and bytes) they always had; values given explicitly are kept as they are (and checked
        against the run's length).
        """
        default = DEFAULT_SELECT_STEPS if total_steps > DEFAULT_SELECT_STEPS else max(1, total_steps // 4)
        return replace(self, select_steps=default if self.select_steps is None else self.select_steps,
                       reselect_every=default if self.reselect_every is None else self.reselect_every)


@dataclass(frozen=True)
class FedConfig:
    """Settings of FedAvg training (recorded in the version's training config)."""

    rounds: int = setting(5, low=1, help="FedAvg rounds.")
    local_steps: int = setting(10, low=1, help="SGD-with-momentum steps per client per round.")
    batch_size: int = setting(16, low=1)
    lr: float = setting(0.02, **_POS, help="Learning rate of the layer deltas.")
    head_lr: float = setting(0.1, **_POS)
    momentum: float = setting(0.9, low=0, high=1, high_open=True)
    max_length: int = setting(48, low=4, help="Tokens per example.")
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


@dataclass(frozen=True)
class UnlearnDefaults:
    """Defaults of an unlearning request (``fused.unlearning.unlearn`` and the ``unlearn`` command read them
    here, so each is defined once), and of a federation's split and density (``fed train``)."""

    layers: int = 3  # K critical layers the unlearning adapter trains
    density: float = 0.1  # random mask density on those layers
    head: str = "ranked"  # FUSED: the head is ranked with the layers (the dense-head modes are baselines)
    patience: int = 2  # stop when the remaining-data validation loss has not improved for this many rounds
    max_eval: int = 300  # evaluation rows per metric
    seed: int = 0
    alpha: float = 1.0  # Dirichlet concentration of a federation's label split
    global_density: float = 1.0  # density of a federated global model (1 = dense-as-sparse)


UNLEARN_DEFAULTS = UnlearnDefaults()


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of config class ``cls`` (one place for every caller's default)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]


__all__ = ["TrainConfig", "FedConfig", "setting", "field_param", "config_params", "default_of", "SCORE_MODES",
           "SCORE", "SCORE_BATCHES", "DROP_FRACTION",
           "SCOPES", "GRANULARITIES", "DEVICES", "DTYPE_NAMES", "MASK_REGISTRY", "DEFAULT_LAYER_REGEX"]

"""Mask selection strategies for sparse adapters, behind one registry.

Contract shared by every method (after peft ``tuners/shira/mask_functions.py``): a method
turns what it may look at (:class:`MaskInputs`: base weights, the dense delta and gradients
w.r.t. the effective weight) into one **score tensor per target**, of the weight's shape;
:func:`select` keeps the ``density`` fraction with the highest scores, per target
(``scope="layer"``) or over all targets together (``scope="global"``), as single elements or as
``b x b`` tiles of the 2-D view (a tile scores the sum of its entries). Randomness comes only
from the seeded ``torch.Generator`` in the inputs, so the same seed gives the same mask.

Methods (ids are the CLI names):

* ``connection-sensitivity`` (default; Arnob et al. 2025): after a dense warm-up of the
  delta ``Ŵ``, score the connection sensitivity of each delta entry. Seeing the forward
  weight as ``W + Ŵ⊙M`` with ``M = 1``, ``∂L/∂M = Ŵ⊙∇Ŵ``; dropping an entry changes the loss
  by about ``-Ŵ⊙∇Ŵ``. The default ``score="abs"`` ranks ``|Ŵ⊙∇Ŵ|`` (the magnitude of that
  sensitivity, as SNIP does); ``score="signed"`` keeps the largest ``-Ŵ⊙∇Ŵ`` (the entries whose
  removal would cost the most to first order). Keeping the largest raw ``Ŵ⊙∇Ŵ`` is not offered:
  on MiniLM/trec-coarse (50 steps) it scored 0.387 test accuracy vs 0.727 signed and 0.900 abs
  (docs/bench/training.md). Reselected during the first epoch.
* ``random``: uniform scores from the generator.
* ``magnitude``: ``|W|`` of the base weight.
* ``gradient``: ``Σ|∇W|`` over a few batches at the base.
* ``snip``: ``Σ|W⊙∇W|`` over a few batches at the base (Lee et al. 2019).
* ``grow-drop`` (RigL / SpIEL style): start random; during the first epoch, on a schedule, drop
  the smallest ``|value|`` entries and regrow as many where ``|∇|`` is largest.
"""
from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Mapping

from .._lazy import lazy_module
from ..errors import TrainingError
from ..params import ParamDef, configure
from .config import (  # noqa: F401 - SCORE_MODES re-exported; each defined once, with TrainConfig
    DROP_FRACTION,
    GRANULARITIES,
    SCOPES,
    SCORE,
    SCORE_BATCHES,
    SCORE_MODES,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch", globals())  # imported on first use: listing the methods (``--help``) needs none


@dataclass
class MaskInputs:
    """What a mask method may look at, per target name.

    Attributes:
        weights: base weights (frozen), target name -> tensor.
        generator: seeded CPU generator (the only source of randomness).
        deltas: the dense delta ``Ŵ`` after warm-up (connection-sensitivity).
        grads: gradient of the loss w.r.t. the effective weight, accumulated as the method
            asks (see :attr:`MaskMethod.grad_reduce`).
        options: method parameters (``score`` ...).
    """

    weights: dict[str, torch.Tensor]
    generator: torch.Generator
    deltas: dict[str, torch.Tensor] | None = None
    grads: dict[str, torch.Tensor] | None = None
    options: dict[str, object] = field(default_factory=dict)


class MaskMethod(ABC):
    """One mask selection strategy.

    Class attributes say what the training loop must provide: ``needs_grad`` (accumulate
    gradients over ``score_batches`` batches at the base before training), ``dense_warmup``
    (train a dense delta for ``select_steps`` first, then score with it), ``reselect``
    (reselect on a schedule during the first epoch), ``grow_drop`` (values-phase regrowth).
    ``params`` declares the method's parameters (the same :class:`~adapterhub.params.ParamDef`
    the merge methods use); :meth:`options` reads and checks them.
    """

    name: ClassVar[str]
    url: ClassVar[str | None] = None
    params: ClassVar[tuple[ParamDef, ...]] = ()
    needs_grad: ClassVar[bool] = False
    grad_reduce: ClassVar[str] = "abs"  # how per-batch gradient terms are accumulated
    dense_warmup: ClassVar[bool] = False
    reselect: ClassVar[bool] = False
    grow_drop: ClassVar[bool] = False

    def options(self, options: Mapping[str, object]) -> dict[str, object]:
        """This method's parameters from ``options``, defaults filled in, each value checked.

        Options the method does not declare are ignored: the training loop hands one options
        dict (``score``, ``drop_fraction``...) to whichever method runs.
        Raises: TrainingError naming the bad parameter.
        """
        return configure(self.params, options, owner=f"mask method {self.name!r}", error=TrainingError,
                         strict=False)

    def scores(self, inputs: MaskInputs) -> dict[str, torch.Tensor]:
        """Score every entry of every target (higher = keep). Returns float32 tensors."""
        raise NotImplementedError


class ConnectionSensitivityMask(MaskMethod):
    name = "connection-sensitivity"
    url = "https://arxiv.org/abs/2507.07140"
    params = (SCORE,)
    dense_warmup = True
    reselect = True

    def scores(self, inputs: MaskInputs) -> dict[str, torch.Tensor]:
        if inputs.deltas is None or inputs.grads is None:
            raise TrainingError("connection-sensitivity needs the warmed-up delta and its gradient")
        mode = self.options(inputs.options)["score"]
        out = {}
        for k in inputs.weights:
            s = inputs.deltas[k].float() * inputs.grads[k].float()
            out[k] = s.abs() if mode == "abs" else -s
        return out


class RandomMask(MaskMethod):
    name = "random"

    def scores(self, inputs: MaskInputs) -> dict[str, torch.Tensor]:
        return {k: torch.rand(w.shape, generator=inputs.generator) for k, w in sorted(inputs.weights.items())}


class MagnitudeMask(MaskMethod):
    name = "magnitude"

    def scores(self, inputs: MaskInputs) -> dict[str, torch.Tensor]:
        return {k: w.detach().float().abs().cpu() for k, w in inputs.weights.items()}


class GradientMask(MaskMethod):
    name = "gradient"
    params = (SCORE_BATCHES,)
    needs_grad = True

    def scores(self, inputs: MaskInputs) -> dict[str, torch.Tensor]:
        if inputs.grads is None:
            raise TrainingError("gradient masks need accumulated gradients")
        return {k: inputs.grads[k].float() for k in inputs.weights}


class SnipMask(MaskMethod):
    name = "snip"
    url = "https://arxiv.org/abs/1810.02340"
    params = (SCORE_BATCHES,)
    needs_grad = True
    grad_reduce = "abs_times_weight"

    def scores(self, inputs: MaskInputs) -> dict[str, torch.Tensor]:
        if inputs.grads is None:
            raise TrainingError("snip masks need accumulated gradients")
        return {k: inputs.grads[k].float() for k in inputs.weights}


class GrowDropMask(MaskMethod):
    name = "grow-drop"
    url = "https://arxiv.org/abs/2401.16405"
    params = (DROP_FRACTION,)
    reselect = True
    grow_drop = True

    def scores(self, inputs: MaskInputs) -> dict[str, torch.Tensor]:
        return RandomMask().scores(inputs)


MASK_METHODS: dict[str, MaskMethod] = {}


def register_mask_method(method: MaskMethod) -> None:
    """Add a method to the registry. Raises ValueError on a duplicate name."""
    if method.name in MASK_METHODS:
        raise ValueError(f"mask method {method.name!r} is already registered")
    MASK_METHODS[method.name] = method


for _m in (ConnectionSensitivityMask(), RandomMask(), MagnitudeMask(), GradientMask(), SnipMask(),
           GrowDropMask()):
    register_mask_method(_m)


def get_mask_method(name: str) -> MaskMethod:
    """Look up a method by its CLI name.

    Raises:
        TrainingError: unknown name (lists the valid ones).
    """
    try:
        return MASK_METHODS[name]
    except KeyError:
        raise TrainingError(f"unknown mask method {name!r}; choose one of {', '.join(MASK_METHODS)}") from None


# ---------------------------------------------------------------------------- selection

def view2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view used for blocks: ``(prod(shape[:-1]), shape[-1])``."""
    if len(shape) < 2:
        return 1, int(shape[0]) if shape else 1
    return math.prod(shape[:-1]), int(shape[-1])


def budget(n: int, density: float) -> int:
    """Number of units (elements or blocks) kept out of ``n`` at ``density``: round, at least 1."""
    return max(1, min(n, int(math.floor(density * n + 0.5))))


def check_density(density: float) -> None:
    """Raise TrainingError unless ``0 < density <= 1``."""
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1):
        raise TrainingError(f"density must be in (0, 1], got {density}")


def check_blockable(name: str, shape: tuple[int, ...], block_size: int) -> None:
    """Raise TrainingError if the 2-D view of ``shape`` is not divisible into b x b blocks."""
    if block_size <= 0:
        raise TrainingError(f"block size must be positive, got {block_size}")
    rows, cols = view2d(shape)
    if rows % block_size or cols % block_size:
        raise TrainingError(f"{name}: shape {tuple(shape)} (2-D view {rows}x{cols}) is not divisible "
                            f"into {block_size}x{block_size} blocks; use granularity 'element' or "
                            f"another block_size", keywords=("granularity", "block_size"))


def block_scores(score: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum the scores of each ``b x b`` tile of the 2-D view; returns shape (rows//b, cols//b)."""
    rows, cols = view2d(tuple(score.shape))
    b = block_size
    return score.reshape(rows // b, b, cols // b, b).sum(dim=(1, 3))


def blocks_to_elements(shape: tuple[int, ...], block_idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sorted flat element indices covered by the given flat block-grid indices."""
    rows, cols = view2d(shape)
    b = block_size
    nbc = cols // b
    br = torch.div(block_idx, nbc, rounding_mode="floor")
    bc = block_idx % nbc
    ar = torch.arange(b, dtype=torch.int64)
    r = br[:, None, None] * b + ar[None, :, None]
    c = bc[:, None, None] * b + ar[None, None, :]
    return torch.sort((r * cols + c).reshape(-1)).values


@dataclass
class Selection:
    """The kept entries of one target.

    Attributes:
        indices: sorted flat element indices (int64).
        block_indices: sorted flat block-grid indices when granularity is block, else None.
    """

    indices: torch.Tensor
    block_indices: torch.Tensor | None = None


def _topk_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    flat = score.reshape(-1).float()
    # nan never wins; ties resolve deterministically on one device
    flat = torch.nan_to_num(flat, nan=-math.inf)
    idx = torch.topk(flat, k, sorted=False).indices
    return torch.sort(idx).values


def select(scores: dict[str, torch.Tensor], density: float, *, scope: str = "layer",
           granularity: str = "element", block_size: int = 16) -> dict[str, Selection]:
    """Keep the top ``density`` fraction of entries (or blocks) by score.

    Takes:
        scores: target name -> score tensor of the weight's shape.
        density: fraction in (0, 1].
        scope: ``layer`` (budget per target) or ``global`` (one budget over all targets).
        granularity: ``element`` or ``block`` (``block_size`` x ``block_size`` tiles).
    Returns:
        target name -> Selection; per-layer budgets are ``budget(n, density)`` units each,
        the global budget is ``budget(total, density)`` units.
    Raises:
        TrainingError: bad density, scope, granularity, or a shape not divisible into blocks.
    """
    check_density(density)
    if scope not in SCOPES:
        raise TrainingError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if granularity not in GRANULARITIES:
        raise TrainingError(f"unknown granularity {granularity!r}; choose element or block")
    names = sorted(scores)
    units: dict[str, torch.Tensor] = {}
    for k in names:
        s = scores[k].detach().float().cpu()
        if granularity == "block":
            check_blockable(k, tuple(s.shape), block_size)
            s = block_scores(s, block_size)
        units[k] = s.reshape(-1)
    chosen: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for k in names:
            chosen[k] = _topk_sorted(units[k], budget(units[k].numel(), density))
    else:
        cat = torch.cat([units[k] for k in names])
        top = _topk_sorted(cat, budget(cat.numel(), density))
        start = 0
        for k in names:
            n = units[k].numel()
            sel = top[(top >= start) & (top < start + n)] - start
            chosen[k] = sel
            start += n
    out = {}
    for k in names:
        if granularity == "block":
            out[k] = Selection(blocks_to_elements(tuple(scores[k].shape), chosen[k], block_size), chosen[k])
        else:
            out[k] = Selection(chosen[k])
    return out


def grow_drop_update(values: torch.Tensor, indices: torch.Tensor, grad: torch.Tensor, fraction: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One RigL/SpIEL step for one target (element granularity).

    Drops the ``fraction`` of kept entries with the smallest ``|value|`` and regrows as many
    unkept positions with the largest ``|grad|`` (``grad`` is the dense gradient w.r.t. the
    effective weight). Returns ``(new_indices sorted, keep)`` where ``keep`` is a bool tensor
    over ``new_indices`` marking survivors (their value and optimizer state carry over; new
    entries start at zero).
    """
    n = indices.numel()
    k = int(fraction * n)
    if k <= 0:
        return indices, torch.ones(n, dtype=torch.bool)
    order = torch.argsort(values.detach().abs().float().cpu(), stable=True)
    survivors = torch.sort(indices[order[k:]]).values
    g = grad.detach().float().abs().reshape(-1).cpu().clone()
    g[indices] = -1.0  # never regrow an entry that was just active
    grown = torch.sort(torch.topk(g, k, sorted=False).indices).values
    new = torch.cat([survivors, grown])
    keep = torch.cat([torch.ones(survivors.numel(), dtype=torch.bool), torch.zeros(k, dtype=torch.bool)])
    order = torch.argsort(new)
    return new[order], keep[order]

"""Sparse adapter training: a mask phase, then a values-only phase (Arnob et al. 2025).

The base model is frozen. Each target weight ``W`` (a Linear, Conv or Embedding weight whose
module name matches the target regex) gets a delta; the forward pass uses ``W + Δ`` through
:func:`torch.func.functional_call`, so any Hugging Face model works unchanged and the base
tensors are never written.

Phases (method ``connection-sensitivity``, the default):

1. *Dense warm-up* (``select_steps`` steps): ``Δ = Ŵ`` is a dense trainable tensor, mask all ones.
2. *Select*: score every entry (see :mod:`adapterhub.training.masks`) and keep the top ``density``
   fraction per layer (or globally), as elements or ``b x b`` blocks.
3. *Values phase*: ``Δ = scatter(idx, v)`` where ``v`` is a **1-D** parameter of length nnz per
   target, so optimizer state is proportional to nnz (memory close to LoRA's). During the first
   epoch the mask is reselected every ``reselect_every`` steps: entries outside the mask keep
   their warm-up value (a frozen buffer, dropped when the mask freezes), scores use the current
   dense gradient of the effective weight; survivors keep value and Adam state, newcomers start
   from their warm-up value and fresh state. After the first epoch the mask is frozen.

``random``/``magnitude`` select before training; ``gradient``/``snip`` after summing
gradients of a few batches at the base; ``grow-drop`` starts random and swaps entries during
the first epoch (drop smallest ``|v|``, regrow largest ``|∇|``).

The model (frozen base + deltas + head), loading and batching are
:mod:`adapterhub.training.model`; turning the trained state into an adapter file is
:mod:`adapterhub.training.packaging`; multi-process gradient averaging is
:mod:`adapterhub.training.distributed`. Every trainer (sparse, and the LoRA/full baselines) is a
:class:`Trainer` in the :data:`TRAINERS` registry and shares its one optimizer step.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import torch
from torch import nn

from .. import format as fmt
from ..data import TaskData
from ..errors import TrainingError
from ..maskhash import mask_hash
from .config import GRANULARITIES, SCOPES, SCORE_MODES, TrainConfig
from .distributed import allreduce_mean, rank_and_world
from .masks import (
    MaskInputs,
    Selection,
    check_blockable,
    check_density,
    get_mask_method,
    grow_drop_update,
    select as select_mask,
)
from .model import (
    DEFAULT_TARGETS,
    DTYPES,
    TARGET_TYPES,
    Batcher,
    SparseDeltaModel,
    base_tensor_keys,
    find_targets,
    load_backbone,
    model_kind,
    position_limit,
    predict,
    resolve_device,
    tokenizer_for,
)
from .packaging import build_adapter

if TYPE_CHECKING:  # pragma: no cover - the workspace imports the whole stack
    from ..catalog.records import VersionInfo
    from ..data.text2text import Text2TextData
    from ..workspace import Workspace

__all__ = ["BASELINES", "BaselineResult", "FullTrainer", "LoraTrainer", "ProgressFn", "SparseTrainer", "TRAINERS",
           "TrainResult", "Trainer", "build_baseline_model", "dataset_task_name", "get_trainer", "register_trainer",
           "train", "train_adapter", "train_baseline", "validate_config", "with_validation"]

ProgressFn = Callable[[int, int, dict[str, Any]], None]


class RowBatcher(Protocol):
    """What a trainer needs of a batcher: the model inputs of a list of rows (label rows for
    :class:`~adapterhub.training.model.Batcher`, prompt/response pairs for
    :class:`~adapterhub.training.sft.SFTBatcher`)."""

    def batch(self, rows: Sequence[Any], device: torch.device) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainResult:
    """What :func:`train_adapter` produces (no catalog involved)."""

    adapter: fmt.SparseAdapter
    metrics: dict[str, Any]
    mask_events: list[dict[str, Any]]
    losses: list[float]
    config: TrainConfig
    world_size: int = 1
    model: SparseDeltaModel | None = None  # the trained model, for further evaluation in-process
    batcher: Batcher | None = None


# ---------------------------------------------------------------------------- validation

def validate_config(cfg: TrainConfig) -> None:
    """Check a config before any model is loaded. Raises TrainingError with one line."""
    check_density(cfg.density)
    method = get_mask_method(cfg.mask)
    if cfg.score not in SCORE_MODES:
        raise TrainingError(f"unknown score {cfg.score!r}; choose abs or signed", keywords=("score",))
    if cfg.scope not in SCOPES:
        raise TrainingError(f"unknown scope {cfg.scope!r}; choose layer or global")
    if cfg.granularity not in GRANULARITIES:
        raise TrainingError(f"unknown granularity {cfg.granularity!r}; choose element or block")
    if cfg.granularity == "block" and cfg.block_size <= 0:
        raise TrainingError(f"block size must be positive, got {cfg.block_size}")
    if method.grow_drop and cfg.granularity == "block":
        raise TrainingError("grow-drop supports element granularity only")
    if cfg.steps is not None and cfg.steps <= 0:
        raise TrainingError(f"steps must be positive, got {cfg.steps}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise TrainingError(f"epochs must be positive, got {cfg.epochs}")
    for name in ("batch_size", "max_length", "eval_batch_size"):
        if getattr(cfg, name) <= 0:
            raise TrainingError(f"{name.replace('_', '-')} must be positive")
    if (cfg.select_steps or 0) < 0 or (cfg.reselect_every or 0) < 0 or cfg.score_batches <= 0:
        raise TrainingError("select-steps and reselect-every must be >= 0, score-batches > 0")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise TrainingError(f"learning rate must be positive, got {cfg.lr}")
    if cfg.warmup_lr is not None and not (cfg.warmup_lr > 0 and math.isfinite(cfg.warmup_lr)):
        raise TrainingError(f"warm-up learning rate must be positive, got {cfg.warmup_lr}")
    if cfg.dtype not in DTYPES:
        raise TrainingError(f"unknown dtype {cfg.dtype!r}; choose fp32 or bf16")
    if not 0 <= cfg.drop_fraction < 1:
        raise TrainingError("drop fraction must be in [0, 1)")
    if cfg.targets is not None:
        try:
            re.compile(cfg.targets)
        except re.error as e:
            raise TrainingError(f"invalid targets regex {cfg.targets!r}: {e}", keywords=("targets",)) from None
    resolve_device(cfg.device)


# ---------------------------------------------------------------------------- trainers

def _lr_at(step: int, total: int) -> float:
    """Linear decay to 10% over the run (a fraction of the base lr)."""
    return 1.0 - 0.9 * (step / max(1, total))


def _score_inputs(sdm: SparseDeltaModel, gen: torch.Generator, cfg: TrainConfig,
                  deltas: dict[str, torch.Tensor] | None = None,
                  grads: dict[str, torch.Tensor] | None = None) -> MaskInputs:
    return MaskInputs(weights={k: sdm.weights[k].detach().cpu() for k in sdm.targets}, generator=gen,
                        deltas=deltas, grads=grads,
                        options={"score": cfg.score, "drop_fraction": cfg.drop_fraction})


class Trainer:
    """One way of training a :class:`SparseDeltaModel` on a task, behind the :data:`TRAINERS` registry.

    Shared by every trainer: the data order (seeded epochs, rank shards), AdamW with a delta/body
    group and a head group, the linear learning-rate decay and the one optimizer step
    (:meth:`step`). A subclass says how the model is built (:meth:`build_model`), what is
    trainable (:meth:`trainable`) and what happens around the steps (:meth:`prepare`,
    :meth:`before_step`, :meth:`after_step`).
    """

    name: ClassVar[str] = ""

    def __init__(self, sdm: SparseDeltaModel, data: TaskData | Text2TextData, batcher: Batcher | RowBatcher,
                 cfg: TrainConfig, progress: ProgressFn | None = None) -> None:
        self.sdm, self.data, self.batcher, self.cfg, self.progress = sdm, data, batcher, cfg, progress
        self.rank, self.world = rank_and_world()
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.mask_gen = torch.Generator().manual_seed(cfg.seed + 1)
        n = len(data.train)
        self.steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        if cfg.steps is not None:
            self.total = cfg.steps
        else:
            self.total = max(1, int(round((cfg.epochs or 1.0) * self.steps_per_epoch)))
        self.cfg = cfg = cfg.scheduled(self.total)  # unset select/reselect steps scale with the run's length
        self.order: list[int] = []
        self.order_fn: Callable[[torch.Generator], list[int]] | None = None  # e.g. SFT's length bucketing
        self.pos = 0
        self.events: list[dict[str, Any]] = []  # mask events (sparse trainers)
        self.losses: list[float] = []
        self.opt: torch.optim.Optimizer | None = None

    @classmethod
    def build_model(cls, base_path: Path, cfg: TrainConfig, *, n_labels: int, **options: Any) -> SparseDeltaModel:
        """Load the base and parametrise it for this trainer (seeded by ``cfg.seed``). Raises TrainingError."""
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        """The trained parameters other than the head (deltas, LoRA factors or the whole backbone)."""
        raise NotImplementedError

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def phase(self) -> str:
        """What the progress callback shows for the coming step."""
        return self.name

    # -- hooks around the shared loop
    def prepare(self) -> None:
        """Set up before the first step: by default, the optimizer over :meth:`trainable` and the head."""
        self.make_opt()

    def before_step(self, step: int) -> bool:
        """Called before step ``step``; True asks the step to keep the effective weights' gradients."""
        return False

    def after_step(self, step: int, captured: bool) -> None:
        """Called after step ``step`` (``captured``: what :meth:`before_step` returned)."""

    # -- data
    def new_order(self) -> list[int]:
        """The next epoch's order of the train rows: a seeded permutation, or :attr:`order_fn`'s order."""
        if self.order_fn is not None:
            return self.order_fn(self.gen)
        return torch.randperm(len(self.data.train), generator=self.gen).tolist()

    def next_rows(self) -> list[Any]:
        rows: list[Any] = []
        while len(rows) < self.cfg.batch_size:
            if self.pos >= len(self.order):
                self.order = self.new_order()
                self.pos = 0
            take = self.order[self.pos:self.pos + self.cfg.batch_size - len(rows)]
            self.pos += len(take)
            rows += [self.data.train[i] for i in take]
            if self.pos >= len(self.order):
                break  # an epoch ends at its last (possibly short) batch
        return rows[self.rank::self.world] or rows[:1]

    def batch(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The model inputs of ``rows`` on the model's device."""
        return self.batcher.batch(rows, self.sdm.device)

    # -- optimizer and the one step
    def make_opt(self) -> None:
        groups = [{"params": self.trainable(), "lr": self.cfg.lr, "base_lr": self.cfg.lr}]
        hp = self.sdm.head_params()
        if hp:
            hlr = self.cfg.head_lr or self.cfg.lr
            groups.append({"params": hp, "lr": hlr, "base_lr": hlr})
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0, foreach=False)

    def step(self, batch: dict[str, torch.Tensor], step: int, *, capture: bool = False) -> float:
        """One optimizer step on ``batch`` (step ``step`` of ``self.total``); returns the loss.

        Forward, backward, gradients averaged over ranks, learning rate at ``step`` of the linear
        decay, AdamW step. Appends the loss to :attr:`losses`.
        Raises: TrainingError when the loss is not finite.
        """
        loss, _ = self.sdm.forward(batch, capture=capture)
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
        allreduce_mean([p.grad for p in params if p.grad is not None])
        frac = _lr_at(step - 1, self.total)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * frac
        self.opt.step()
        lval = float(loss.detach())
        if not math.isfinite(lval):
            raise TrainingError(f"loss became {lval} at step {step}; lower the learning rate", keywords=("lr",))
        self.losses.append(lval)
        return lval

    def run(self) -> None:
        """:meth:`prepare`, then ``self.total`` steps with the hooks and the progress callback."""
        self.prepare()
        t0 = time.perf_counter()
        self.sdm.backbone.train()
        for step in range(1, self.total + 1):
            batch = self.batch(self.next_rows())
            phase = self.phase()
            capture = self.before_step(step)
            lval = self.step(batch, step, capture=capture)
            self.after_step(step, capture)
            if self.progress is not None:
                el = time.perf_counter() - t0
                self.progress(step, self.total, {"loss": lval, "phase": phase, "steps_per_s": step / el if el else 0.0})


class SparseTrainer(Trainer):
    """The sparse adapter: a mask phase (per ``cfg.mask``), then values-only training (module docstring)."""

    name = "sparse"

    def __init__(self, sdm: SparseDeltaModel, data: TaskData | Text2TextData, batcher: Batcher | RowBatcher,
                 cfg: TrainConfig, progress: ProgressFn | None = None) -> None:
        super().__init__(sdm, data, batcher, cfg, progress)
        self.method = get_mask_method(cfg.mask)
        self.freeze_step = min(self.steps_per_epoch, self.total)
        self.warm: dict[str, torch.Tensor] = {}  # warm-up deltas kept for reselection
        self.warmup = 0

    @classmethod
    def build_model(cls, base_path: Path, cfg: TrainConfig, *, n_labels: int, **options: Any) -> SparseDeltaModel:
        """The frozen base with the targets of ``cfg.targets`` (default: the kind's), no delta yet."""
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        kind = model_kind(base_path)
        file_shapes = base_tensor_keys(base_path)
        backbone = load_backbone(base_path, kind, DTYPES[cfg.dtype], device)
        targets = find_targets(backbone, cfg.targets or DEFAULT_TARGETS[kind], file_shapes)
        if cfg.granularity == "block":
            for key in targets.values():
                check_blockable(key, tuple(file_shapes[key]), cfg.block_size)
        torch.manual_seed(cfg.seed)  # the head's initialisation does not depend on the backbone's loading
        return SparseDeltaModel(backbone, kind, targets, n_labels, device, autocast=device.type == "cuda")

    def trainable(self) -> list[nn.Parameter]:
        return self.sdm.delta_params()

    def phase(self) -> str:
        """``warm-up`` while the delta is dense (before the mask is chosen), ``mask selection`` while the
        mask may still be re-selected, ``values-only`` once it is frozen."""
        if self.sdm.dense:
            return "warm-up"
        step = len(self.losses) + 1  # the coming step
        if self.method.reselect and (self.cfg.reselect_every or 0) > 0 and self.warmup < step < self.freeze_step:
            return "mask selection"
        return "values-only"

    def swap_param(self, old: nn.Parameter, new: nn.Parameter, gather: torch.Tensor | None,
                   keep: torch.Tensor | None) -> None:
        """Replace ``old`` by ``new`` in the optimizer, carrying Adam state for kept entries."""
        assert self.opt is not None
        for g in self.opt.param_groups:
            for i, p in enumerate(g["params"]):
                if p is old:
                    g["params"][i] = new
        st = self.opt.state.pop(old, None)
        if st:
            ns = {"step": st["step"]}
            for key in ("exp_avg", "exp_avg_sq"):
                src = st[key].reshape(-1)
                val = torch.zeros(new.numel(), dtype=src.dtype, device=src.device)
                if gather is not None:
                    val[keep] = src[gather]
                ns[key] = val
            self.opt.state[new] = ns

    # -- mask operations
    def to_sparse(self, sel: dict[str, Selection], init: dict[str, torch.Tensor], step: int, kind: str) -> None:
        """Switch every target to values mode with indices ``sel``; values from ``init`` (dense)."""
        if self.opt is not None:
            self.opt.param_groups[0]["base_lr"] = self.cfg.lr
        for k in self.sdm.targets:
            idx = sel[k].indices.to(self.sdm.device)
            source = init[k].detach().reshape(-1).float().to(self.sdm.device)
            newp = nn.Parameter(source[idx].clone())
            if k in self.sdm.dense:
                old = self.sdm.dense.pop(k)
                # dense -> sparse: Adam state of the kept entries carries over
                self.swap_param(old, newp, idx, torch.ones(idx.numel(), dtype=torch.bool, device=idx.device))
            elif k in self.sdm.values:
                old = self.sdm.values[k]
                old_idx = self.sdm.idx[k]
                pos = torch.searchsorted(old_idx, idx)
                pos_c = pos.clamp(max=old_idx.numel() - 1)
                hit = old_idx[pos_c] == idx
                newp.data[hit] = old.detach()[pos_c[hit]]
                self.swap_param(old, newp, pos_c[hit], hit)
            else:
                raise TrainingError("internal: target without a delta")
            self.sdm.idx[k] = idx
            self.sdm.values[k] = newp
        self.record(step, kind)

    def record(self, step: int, kind: str) -> None:
        # keyed by base tensor names, as the catalog hashes the registered adapter: the last event's
        # hash is the version's mask_hash
        sdm = self.sdm
        h = mask_hash({sdm.targets[k]: (sdm.weights[k].shape, sdm.idx[k]) for k in sdm.idx})
        self.events.append({"step": step, "event": kind, "mask_hash": h,
                            "nnz": int(sum(int(v.numel()) for v in self.sdm.idx.values()))})

    def select(self, scores: dict[str, torch.Tensor]) -> dict[str, Selection]:
        return select_mask(scores, self.cfg.density, scope=self.cfg.scope, granularity=self.cfg.granularity,
                        block_size=self.cfg.block_size)

    def accumulate_base_grads(self) -> dict[str, torch.Tensor]:
        """Sum |∇W| (gradient) or |W⊙∇W| (snip) over ``score_batches`` batches at the base."""
        acc = {k: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for k, w in self.sdm.weights.items()}
        saved = {}
        for k, w in self.sdm.weights.items():  # a zero dense delta makes the effective weight differentiable
            saved[k] = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        self.sdm.dense.update(saved)
        gen_state = self.gen.get_state()
        order, pos = list(self.order), self.pos
        for _ in range(self.cfg.score_batches):
            loss, _ = self.sdm.forward(self.batch(self.next_rows()))
            grads = [g.float() for g in torch.autograd.grad(loss, [saved[k] for k in sorted(saved)])]
            allreduce_mean(grads)
            for k, g in zip(sorted(saved), grads, strict=True):
                if self.method.grad_reduce == "abs_times_weight":
                    acc[k] += (g * self.sdm.weights[k].float()).abs()
                else:
                    acc[k] += g.abs()
        # scoring batches do not consume the training data order
        self.gen.set_state(gen_state)
        self.order, self.pos = order, pos
        for k in saved:
            del self.sdm.dense[k]
        return {k: v.cpu() for k, v in acc.items()}

    # -- the mask phases around the shared loop
    def prepare(self) -> None:
        cfg, sdm = self.cfg, self.sdm
        method = self.method
        zeros = {k: torch.zeros(w.shape, dtype=torch.float32) for k, w in sdm.weights.items()}
        if method.dense_warmup:
            self.warmup = warmup = cfg.select_steps or 0  # filled in by TrainConfig.scheduled
            if warmup < 1:
                raise TrainingError(f"{method.name} needs a dense warm-up: select_steps must be >= 1",
                                    keywords=("select_steps",))
            if warmup >= self.total:
                raise TrainingError(f"select-steps ({warmup}) must be below the number of training steps "
                                    f"({self.total}); lower select_steps or train longer", keywords=("select_steps",))
            for k, w in sdm.weights.items():
                sdm.dense[k] = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
            self.make_opt()
            if cfg.warmup_lr is not None:  # the dense warm-up may need a gentler rate than the values
                self.opt.param_groups[0]["base_lr"] = cfg.warmup_lr  # type: ignore[union-attr]
        else:
            if method.needs_grad:
                scores = method.scores(_score_inputs(sdm, self.mask_gen, cfg, grads=self.accumulate_base_grads()))
            else:
                scores = method.scores(_score_inputs(sdm, self.mask_gen, cfg))
            # start values-only with zero values
            for k, w in sdm.weights.items():
                sdm.dense[k] = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
            self.make_opt()
            self.to_sparse(self.select(scores), zeros, 0, "select")

    def before_step(self, step: int) -> bool:
        return (self.method.dense_warmup and step == self.warmup) or self._reselect_due(step, self.warmup)

    def after_step(self, step: int, captured: bool) -> None:
        if captured:
            grads = self.sdm.captured_grads()
            allreduce_mean(list(grads.values()))
            self._rescore(step, self.warmup, grads)
        if step == self.freeze_step and self.warm:
            self.warm = {}  # mask frozen: the dense warm-up buffers go

    def _reselect_due(self, step: int, warmup: int) -> bool:
        every = self.cfg.reselect_every or 0  # filled in by TrainConfig.scheduled
        if not self.method.reselect or every <= 0:
            return False
        if step >= self.freeze_step or step <= warmup:
            return False
        return (step - warmup) % every == 0

    def _rescore(self, step: int, warmup: int, grads: dict[str, torch.Tensor]) -> None:
        sdm, cfg = self.sdm, self.cfg
        if self.method.dense_warmup and step == warmup:
            deltas = {k: sdm.dense[k].detach().float().cpu() for k in sdm.targets}
            scores = self.method.scores(_score_inputs(sdm, self.mask_gen, cfg, deltas=deltas,
                                                      grads={k: g.cpu() for k, g in grads.items()}))
            self.warm = deltas if self._any_reselect(warmup) else {}
            self.to_sparse(self.select(scores), deltas, step, "select")
            return
        if self.method.grow_drop:
            t = step / max(1, self.freeze_step)
            frac = cfg.drop_fraction * 0.5 * (1 + math.cos(math.pi * t))
            sel = {}
            for k in sdm.targets:
                new_idx, _keep = grow_drop_update(sdm.values[k].detach().cpu(), sdm.idx[k].cpu(),
                                                    grads[k].cpu(), frac)
                sel[k] = Selection(new_idx)
            self.to_sparse(sel, {k: torch.zeros(sdm.weights[k].shape) for k in sdm.targets}, step, "grow-drop")
            return
        # connection-sensitivity reselection: current delta = warm-up values outside the mask,
        # trained values inside
        deltas = {}
        for k in sdm.targets:
            d = self.warm[k].clone().reshape(-1)
            d[sdm.idx[k].cpu()] = sdm.values[k].detach().float().cpu()
            deltas[k] = d.reshape(sdm.weights[k].shape)
        scores = self.method.scores(_score_inputs(sdm, self.mask_gen, cfg, deltas=deltas,
                                                  grads={k: g.cpu() for k, g in grads.items()}))
        self.warm = deltas
        self.to_sparse(self.select(scores), deltas, step, "reselect")

    def _any_reselect(self, warmup: int) -> bool:
        every = self.cfg.reselect_every or 0
        return every > 0 and warmup + every < self.freeze_step


# ---------------------------------------------------------------------------- public API

def train_adapter(base_path: Path, data: TaskData, cfg: TrainConfig, *, task_name: str,
                  base_name: str | None = None, base_fingerprint: str | None = None,
                  progress: ProgressFn | None = None) -> TrainResult:
    """Train one sparse adapter on a base folder. No catalog involved.

    Takes:
        base_path: local HF folder with ``config.json``, tokenizer and safetensors weights.
        data: the task data (train split used for training, validation for the metrics).
        cfg: the training settings.
        task_name: task name used for the head extras (``heads.<task>.weight``) and the card.
        base_name, base_fingerprint: recorded in the card.
        progress: called as ``progress(step, total, {"loss", "phase", "steps_per_s"})``; ``phase`` is
            ``warm-up``, ``mask selection`` or ``values-only``.
    Returns:
        TrainResult with a SparseAdapter whose parameter names are the base file's tensor names.
    Raises:
        TrainingError/DataError: bad config, empty data, regex matching nothing, missing CUDA...
    """
    trainer, data, seconds = _fit("sparse", base_path, data, cfg, progress=progress)
    sdm, batcher = trainer.sdm, trainer.batcher
    assert isinstance(batcher, Batcher)  # label training; text-to-text goes through training.sft
    metrics = _metrics(trainer, data, seconds)
    adapter = build_adapter(sdm, trainer.cfg, kind=sdm.kind, task_name=task_name, labels=data.labels,
                            regex=cfg.targets or DEFAULT_TARGETS[sdm.kind], base_name=base_name,
                            base_fingerprint=base_fingerprint, events=trainer.events, data=data, world=trainer.world)
    return TrainResult(adapter, metrics, trainer.events, trainer.losses, trainer.cfg, trainer.world, sdm, batcher)


VALIDATION_FRACTION = 0.1  # of the train rows, when a dataset has no validation split


_D = TypeVar("_D", "TaskData", "Text2TextData")


def with_validation(data: _D, seed: int, fraction: float = VALIDATION_FRACTION) -> _D:
    """The data to train and validate on; the test split is never used for validation.

    Takes the task data, a seed and a fraction. Returns ``data`` itself when it has a validation
    split (or fewer than two train rows); otherwise a copy whose validation split is a seeded
    ``fraction`` of the train rows (at least one) and whose train split is the rest, both in
    their original order.
    """
    if data.validation or len(data.train) < 2:
        return data
    import random

    n_val = min(len(data.train) - 1, max(1, round(len(data.train) * fraction)))
    picked = set(random.Random(f"validation/{int(seed)}").sample(range(len(data.train)), n_val))
    train = [r for i, r in enumerate(data.train) if i not in picked]
    val = [r for i, r in enumerate(data.train) if i in picked]
    return replace(data, train=train, validation=val)


def _fit(method: str, base_path: Path, data: TaskData, cfg: TrainConfig, *, progress: ProgressFn | None = None,
         **options: Any) -> tuple[Trainer, TaskData, float]:
    """Validate, build the model of trainer ``method``, train it; (trainer, data used, train seconds).

    The data used has a validation split (see :func:`with_validation`).
    Raises: TrainingError for a bad config, data without train rows or fewer than two labels.
    """
    validate_config(cfg)
    cls = get_trainer(method)
    if not data.train:
        raise TrainingError(f"dataset {data.name!r} has no training rows")
    if len(data.labels) < 2:
        raise TrainingError(f"dataset {data.name!r} needs at least two labels")
    data = with_validation(data, cfg.seed)
    sdm = cls.build_model(base_path, cfg, n_labels=len(data.labels), **options)
    if sdm.kind == "image":  # a text dataset on an image base fails here, in one line, not mid-training
        from ..bases.cnn import check_pixel_rows

        check_pixel_rows(data)
    batcher = Batcher(tokenizer_for(base_path, sdm.kind), sdm.kind, data.labels, cfg.max_length, position_limit(sdm))
    trainer = cls(sdm, data, batcher, cfg, progress)
    if sdm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(sdm.device)
    t0 = time.perf_counter()
    trainer.run()
    return trainer, data, time.perf_counter() - t0


def _metrics(trainer: Trainer, data: TaskData, seconds: float) -> dict[str, Any]:
    """Loss, steps, trainable count, time (and peak GPU memory), then accuracy on the validation split."""
    cfg, sdm = trainer.cfg, trainer.sdm
    metrics: dict[str, Any] = {"train_loss": _tail_mean(trainer.losses), "steps": trainer.total,
                               "trainable_values": trainer.trainable_count(),
                               "train_seconds": round(seconds, 3),
                               "steps_per_second": round(trainer.total / seconds, 4) if seconds else None}
    if sdm.device.type == "cuda":  # peak of everything allocated on the GPU while training (model included)
        metrics["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(sdm.device) / 2**20, 1)
    val_rows = data.validation[:cfg.max_eval_examples] if cfg.max_eval_examples else data.validation
    if val_rows:
        assert isinstance(trainer.batcher, Batcher)
        acc, vloss, n = predict(sdm, trainer.batcher, val_rows, cfg.eval_batch_size)
        metrics.update({"validation_accuracy": acc, "validation_loss": vloss, "validation_n": n})
    return metrics


def _tail_mean(xs: list[float], n: int = 20) -> float | None:
    tail = xs[-n:]
    return sum(tail) / len(tail) if tail else None


def train(ws: Workspace, *, base: str, task: str | None = None, dataset: str | None = None, name: str | None = None,
          config: TrainConfig | None = None, text_column: str = "text", label_column: str = "label",
          progress: ProgressFn | None = None) -> VersionInfo | None:
    """Train on a workspace base and register the result as a new version.

    Takes the Workspace, the base name, exactly one of a built-in ``task`` or a ``dataset`` spec,
    an optional adapter ``name`` (default ``<task>-<mask>``), the config and a progress callback.
    Returns the VersionInfo of the new version (or ``None`` on non-zero distributed ranks).
    Raises:
        AdapterHubError subclasses; nothing is registered when anything fails.
    """
    from ..catalog.names import validate_name
    from ..data import resolve_data

    config = config if config is not None else TrainConfig()
    validate_config(config)
    binfo = ws.get_base(base)
    data = resolve_data(task, dataset, text_column=text_column, label_column=label_column)
    task_name = task or dataset_task_name(dataset or "")
    adapter_name = name or f"{task_name}-{config.mask}"
    validate_name(adapter_name, "adapter name")
    result = train_adapter(binfo.path, data, config, task_name=task_name, base_name=binfo.name,
                           base_fingerprint=binfo.fingerprint, progress=progress)
    if rank_and_world()[0] != 0:  # every rank trained the same adapter; rank 0 registers it
        return None
    return ws.register(result.adapter, name=adapter_name, task=task_name, base=binfo.name, kind="expert",
                       metrics=result.metrics, training_config=result.config.to_json())


def dataset_task_name(spec: str) -> str:
    """The task name of a dataset spec (``csv:path/reviews.csv`` -> ``reviews``): its file stem,
    reduced to name-safe characters (at most 80)."""
    stem = Path(spec.partition(":")[2]).stem if ":" in spec else spec
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "dataset"
    return clean[:80]


# ---------------------------------------------------------------------------- baselines

BASELINES = ("lora", "full")


def build_baseline_model(base_path: Path, method: str, *, n_labels: int, lora_r: int = 16,
                         targets: str | None = None, dtype: str = "fp32", device: str = "auto"
                         ) -> tuple[SparseDeltaModel, list[nn.Parameter], list[nn.Parameter]]:
    """A comparison model: PEFT LoRA on the target modules, or full fine-tuning.

    Returns ``(model, body_params, head_params)``; the model runs through the same forward and
    loss as the sparse adapter (it is a SparseDeltaModel without deltas), so only the
    parametrisation differs.
    Raises:
        TrainingError: unknown method, or peft missing for LoRA.
    """
    if method not in BASELINES:
        raise TrainingError(f"unknown baseline {method!r}; choose lora or full")
    dev = resolve_device(device)
    kind = model_kind(base_path)
    backbone = load_backbone(base_path, kind, DTYPES[dtype], dev)
    regex = targets or DEFAULT_TARGETS[kind]
    names = sorted({m.rsplit(".", 1)[-1] for m, mod in backbone.named_modules()
                    if m and re.search(regex, m) and isinstance(mod, TARGET_TYPES)})
    if not names:
        raise TrainingError(f"targets regex {regex!r} matches no module", keywords=("targets",))
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise TrainingError("the LoRA baseline needs peft (pip install peft)") from None
        pm = get_peft_model(backbone, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                 target_modules=names))
        backbone = pm.base_model.model  # type: ignore[assignment]  # peft types it Tensor | Module
        body = [p for p in backbone.parameters() if p.requires_grad]
        for p in body:
            p.data = p.data.float()
    else:
        for p in backbone.parameters():
            p.requires_grad_(True)
        body = [p for p in backbone.parameters()]
    sdm = SparseDeltaModel(backbone, kind, {}, n_labels, dev, autocast=dev.type == "cuda")
    return sdm, body, sdm.head_params()


class _BaselineTrainer(Trainer):
    """A baseline trains backbone parameters (LoRA factors or all of them) with the shared step."""

    @classmethod
    def build_model(cls, base_path: Path, cfg: TrainConfig, *, n_labels: int, lora_r: int = 16,
                    **options: Any) -> SparseDeltaModel:
        torch.manual_seed(cfg.seed)
        sdm, _, _ = build_baseline_model(base_path, cls.name, n_labels=n_labels, lora_r=lora_r,
                                         targets=cfg.targets, dtype=cfg.dtype, device=cfg.device)
        return sdm

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.sdm.backbone.parameters() if p.requires_grad]


class LoraTrainer(_BaselineTrainer):
    """PEFT LoRA (rank ``lora_r``, alpha 2r) on the target modules."""

    name = "lora"


class FullTrainer(_BaselineTrainer):
    """Full fine-tuning of every backbone weight."""

    name = "full"


TRAINERS: dict[str, type[Trainer]] = {}


def register_trainer(cls: type[Trainer]) -> type[Trainer]:
    """Add a trainer class under its ``name``. Raises TrainingError on a duplicate or empty name."""
    if not cls.name or cls.name in TRAINERS:
        raise TrainingError(f"trainer name {cls.name!r} is empty or already registered")
    TRAINERS[cls.name] = cls
    return cls


for _cls in (SparseTrainer, LoraTrainer, FullTrainer):
    register_trainer(_cls)


def get_trainer(name: str) -> type[Trainer]:
    """The trainer class registered as ``name``. Raises TrainingError listing the names."""
    try:
        return TRAINERS[name]
    except KeyError:
        raise TrainingError(f"unknown trainer {name!r}; choose {', '.join(TRAINERS)}") from None


@dataclass
class BaselineResult:
    """Metrics of a baseline run plus the trained model (for test-set evaluation)."""

    metrics: dict[str, Any]
    model: SparseDeltaModel
    batcher: Batcher


def train_baseline(base_path: Path, data: TaskData, cfg: TrainConfig, *, method: str, lora_r: int = 16,
                   progress: ProgressFn | None = None) -> BaselineResult:
    """Train a LoRA or full fine-tuning baseline with the same data order, schedule, step and loss.

    Returns a BaselineResult whose metrics match :func:`train_adapter`'s
    (``validation_accuracy``, ``train_loss``, ``trainable_values``...). Nothing is registered:
    baselines are for benchmarks.
    Raises: TrainingError for an unknown method (not one of :data:`BASELINES`) or a bad config.
    """
    if method not in BASELINES:
        raise TrainingError(f"unknown baseline {method!r}; choose lora or full")
    trainer, data, seconds = _fit(method, base_path, data, cfg, progress=progress, lora_r=lora_r)
    assert isinstance(trainer.batcher, Batcher)
    return BaselineResult(_metrics(trainer, data, seconds), trainer.sdm, trainer.batcher)

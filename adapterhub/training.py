"""Sparse adapter training: a mask phase, then a values-only phase (Arnob et al. 2025).

The base model is frozen. Each target weight ``W`` (a Linear, Conv or Embedding weight whose
module name matches the target regex) gets a delta; the forward pass uses ``W + Δ`` through
:func:`torch.func.functional_call`, so any Hugging Face model works unchanged and the base
tensors are never written.

Phases (method ``connection-sensitivity``, the default):

1. *Dense warm-up* (``select_steps`` steps): ``Δ = Ŵ`` is a dense trainable tensor, mask all ones.
2. *Select*: score every entry (see :mod:`adapterhub.masks`) and keep the top ``density``
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

Encoders (BERT-like) classify with a dense linear head on the mean-pooled last hidden state,
stored as the adapter's extras ``heads.<task>.weight/bias``. Causal LMs (Llama-like) learn
text-to-label: the prompt ``"<text>\\nLabel:"`` is followed by ``" <label name>"``; training
minimises the label tokens' negative log-likelihood, prediction picks the label with the
highest log-likelihood. No head.

Multi-process: when ``torch.distributed`` is initialised (``accelerate launch`` or
``torchrun`` set ``WORLD_SIZE``), every rank takes its share of each global batch and the
gradients of the trainable tensors are averaged with ``all_reduce`` (gloo on CPU, nccl on
CUDA); mask selection uses the averaged gradients, so every rank holds the same adapter.
"""
from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import format as fmt
from . import masks as M
from .data import TaskData
from .errors import AdapterHubError, TrainingError
from .maskhash import mask_hash
from .train_config import (
    DEVICES,
    DTYPE_NAMES,
    GRANULARITIES,
    SCOPES,
    SCORE_MODES,
    TrainConfig,
)

DEFAULT_TARGETS = {"encoder": r"(query|key|value)$", "causal-lm": r"(q_proj|k_proj|v_proj)$"}
PROMPT_SUFFIX = "\nLabel:"
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16)))
TARGET_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)

ProgressFn = Callable[[int, int, dict[str, Any]], None]


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
    M.check_density(cfg.density)
    method = M.get_mask_method(cfg.mask)
    if cfg.score not in SCORE_MODES:
        raise TrainingError(f"unknown --score {cfg.score!r}; choose abs or signed")
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
    if cfg.select_steps < 0 or cfg.reselect_every < 0 or cfg.score_batches <= 0:
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
            raise TrainingError(f"invalid --targets regex {cfg.targets!r}: {e}") from None
    resolve_device(cfg.device)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu. Raises TrainingError if cuda is asked but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("CUDA was requested (--device cuda) but no CUDA device is available")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise TrainingError(f"unknown device {device!r}; choose {', '.join(DEVICES)}")


# ---------------------------------------------------------------------------- models

def model_kind(path: Path) -> str:
    """``causal-lm`` if the folder's config names a ``*ForCausalLM`` architecture, else ``encoder``."""
    import json

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        raise TrainingError(f"{path}: no readable config.json") from None
    archs = cfg.get("architectures") or []
    return "causal-lm" if any(str(a).endswith("ForCausalLM") for a in archs) else "encoder"


def load_backbone(path: Path, kind: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Load the frozen base model (encoder or causal LM) from a local folder."""
    import transformers

    cls = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # transformers raises many types
        raise TrainingError(f"cannot load the base model from {path}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(path: Path):
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise TrainingError(f"cannot load a tokenizer from {path}: {type(e).__name__}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def base_tensor_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in the base folder's safetensors files."""
    from .models import tensor_shapes

    return tensor_shapes(Path(path))


def find_targets(model: nn.Module, regex: str, file_shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Map model parameter names of matching target weights to the base file's tensor names.

    Takes the model, a regex searched in module names, and the file's tensor shapes.
    Returns ``{model_param_name: file_tensor_name}`` in model order.
    Raises:
        TrainingError: nothing matches, or a weight has no unique tensor in the base file.
    """
    pat = re.compile(regex)
    out: dict[str, str] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        if not mname or not pat.search(mname):
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or not (isinstance(mod, TARGET_TYPES)
                                                  or type(mod).__name__ == "Conv1D"):
            continue
        if id(w) in seen:  # tied weights: train them once
            continue
        seen.add(id(w))
        pname = f"{mname}.weight"
        key = _file_key(pname, file_shapes)
        if key is None:
            raise TrainingError(f"target {pname} has no tensor in the base model.safetensors")
        if tuple(file_shapes[key]) != tuple(w.shape):
            raise TrainingError(f"target {pname}: shape {tuple(w.shape)} differs from {key} {file_shapes[key]}")
        out[pname] = key
    if not out:
        raise TrainingError(f"--targets {regex!r} matches no Linear/Conv/Embedding module of this model")
    return out


def _file_key(pname: str, keys: dict[str, tuple[int, ...]]) -> str | None:
    if pname in keys:
        return pname
    cands = [k for k in keys if k.endswith("." + pname) or pname.endswith("." + k)]
    return cands[0] if len(cands) == 1 else None


class MeanPoolHead(nn.Module):
    """Dense task head on the mean-pooled last hidden state (sentence-transformers style)."""

    def __init__(self, hidden: int, n_labels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, n_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(mean_pool(hidden, attention_mask))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over the attended tokens, in fp32: ``(batch, hidden)``."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)).float()


# ---------------------------------------------------------------------------- batches

class Batcher:
    """Tokenises examples for one model kind (encoder classification or causal text-to-label)."""

    def __init__(self, tokenizer, kind: str, labels: Sequence[str], max_length: int) -> None:
        self.tok = tokenizer
        self.kind = kind
        self.labels = list(labels)
        self.max_length = max_length
        if kind == "causal-lm":
            self.label_ids = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"] for lab in self.labels]
            if any(len(x) == 0 for x in self.label_ids):
                raise TrainingError("a label name tokenises to nothing")
            bos = tokenizer.bos_token_id
            self.prefix = [bos] if bos is not None else []

    def encoder_batch(self, rows: Sequence[tuple[str, int]], device: torch.device) -> dict[str, torch.Tensor]:
        enc = self.tok([t for t, _ in rows], padding=True, truncation=True, max_length=self.max_length,
                       return_tensors="pt")
        out = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out["labels"] = torch.tensor([lab for _, lab in rows], dtype=torch.long, device=device)
        return out

    def _prompt_ids(self, text: str, room: int) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        suffix = self.tok(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]
        keep = max(0, room - len(self.prefix) - len(suffix))
        return self.prefix + ids[:keep] + suffix

    def causal_batch(self, rows: Sequence[tuple[str, int]], device: torch.device,
                     candidates: bool = False) -> dict[str, torch.Tensor]:
        """Sequences prompt+label; with ``candidates`` every label for every row (row-major)."""
        seqs, targets, owners = [], [], []
        longest_label = max(len(x) for x in self.label_ids)
        for i, (text, lab) in enumerate(rows):
            prompt = self._prompt_ids(text, self.max_length - longest_label)
            for j in (range(len(self.labels)) if candidates else [lab]):
                lab_ids = self.label_ids[j]
                seqs.append(prompt + lab_ids)
                targets.append([-100] * len(prompt) + lab_ids)
                owners.append(i)
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for r, (s, t) in enumerate(zip(seqs, targets)):
            ids[r, :len(s)] = torch.tensor(s)
            att[r, :len(s)] = 1
            lab[r, :len(t)] = torch.tensor(t)
        return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": lab.to(device),
                "gold": torch.tensor([lab_ for _, lab_ in rows], dtype=torch.long, device=device)}


def label_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label tokens) per sequence (positions where ``labels != -100``)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100
    lp = torch.log_softmax(shift_logits, dim=-1)
    tok = lp.gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


# ---------------------------------------------------------------------------- the model wrapper

def apply_delta(w: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """The effective weight ``W + Δ``, computed in fp32 and cast back to ``W``'s dtype.

    Takes the frozen weight, a delta (dense of ``W``'s shape when ``idx`` is None, else a 1-D
    vector of values at the sorted flat positions ``idx``). Returns a new tensor (differentiable
    in ``delta``); ``W`` is never written. The one place ``W + Δ`` is computed for training,
    federated training, unlearning and in-memory evaluation, so they agree bit for bit with
    :mod:`adapterhub.patching` (which adds the same fp32 values).
    """
    if idx is None:
        return (w.float() + delta).to(w.dtype)
    return w.detach().float().reshape(-1).index_add(0, idx, delta).reshape(w.shape).to(w.dtype)


class SparseDeltaModel:
    """A frozen base plus per-target deltas and (encoders) a task head, run through ``functional_call``.

    The one "base weights + delta + head" model: training, the LoRA/full baselines, evaluation,
    federated training and unlearning (:class:`adapterhub.federated.FedModel` is a subclass) all
    run their forward pass through :meth:`outputs`.

    Each target is in one of two states: dense (``dense[k]`` trainable, used in warm-up) or
    sparse (``idx[k]`` sorted flat indices, ``values[k]`` a 1-D trainable parameter). Keys are
    model parameter names; ``targets`` maps them to the base file's tensor names.
    """

    def __init__(self, backbone: nn.Module, kind: str, targets: dict[str, str], n_labels: int,
                 device: torch.device, autocast: bool) -> None:
        self.backbone = backbone
        self.kind = kind
        self.targets = targets  # model param name -> file tensor name
        params = dict(backbone.named_parameters(remove_duplicate=False))
        self.weights = {k: params[k] for k in targets}
        self.dense: dict[str, nn.Parameter] = {}
        self.idx: dict[str, torch.Tensor] = {}
        self.values: dict[str, nn.Parameter] = {}
        self.device = device
        self.autocast = autocast
        self.head: MeanPoolHead | None = None
        if kind == "encoder":
            hidden = int(getattr(backbone.config, "hidden_size"))
            self.head = MeanPoolHead(hidden, n_labels).to(device)
        self.capture: dict[str, torch.Tensor] | None = None  # effective weights to keep grads of

    # -- parameters
    def delta_params(self) -> list[nn.Parameter]:
        return [self.dense[k] for k in sorted(self.dense)] + [self.values[k] for k in sorted(self.values)]

    def head_params(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) if self.head is not None else []

    def trainable_delta_count(self) -> int:
        return sum(p.numel() for p in self.delta_params())

    def effective(self, k: str) -> torch.Tensor:
        w = self.weights[k]
        if k in self.dense:
            return apply_delta(w, self.dense[k])
        if k in self.values:
            return apply_delta(w, self.values[k], self.idx[k])
        return w

    # -- the head
    def set_head(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Copy a trained head in (fp32). Raises TrainingError when its shape does not fit."""
        if self.head is None:
            raise TrainingError("this model has no classification head (causal LMs score labels)")
        if tuple(weight.shape) != tuple(self.head.linear.weight.shape):
            raise TrainingError(f"head shape {tuple(weight.shape)} does not fit the model "
                                f"{tuple(self.head.linear.weight.shape)}")
        with torch.no_grad():
            self.head.linear.weight.copy_(weight.float())
            self.head.linear.bias.copy_(bias.float())

    def load_head(self, adapter: fmt.SparseAdapter, task: str) -> None:
        """Load the adapter's ``heads.<task>.weight/bias``. Raises TrainingError when it has none."""
        w, b = adapter.extras.get(f"heads.{task}.weight"), adapter.extras.get(f"heads.{task}.bias")
        if w is None or b is None:
            raise TrainingError(f"the adapter has no head for task {task!r}")
        self.set_head(w, b)

    # -- forward
    def outputs(self, eff: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], *,
                head: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (encoder) or per-sequence label log-likelihoods (causal LM) of the backbone run with
        the parameters ``eff`` (model param name -> tensor) replacing its own.

        ``head``: a ``(weight, bias)`` pair used instead of :attr:`head` (a head that is being trained
        as a plain tensor, as federated training does).
        """
        from torch.func import functional_call

        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else _null()
        with ctx:
            if self.kind == "encoder":
                kw = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                out = functional_call(self.backbone, dict(eff), args=(), kwargs=kw, strict=False)
                if head is None:
                    return self.head(out.last_hidden_state, batch["attention_mask"])  # type: ignore[misc]
                return nn.functional.linear(mean_pool(out.last_hidden_state, batch["attention_mask"]), *head)
            out = functional_call(self.backbone, dict(eff), args=(),
                                  kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                  strict=False)
            return label_token_logprobs(out.logits, batch["labels"])

    def loss(self, out: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of :meth:`outputs`: cross-entropy (encoder) or label-token NLL (causal LM)."""
        if self.kind == "encoder":
            return nn.functional.cross_entropy(out.float(), batch["labels"])
        ntok = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
        return -out.sum() / ntok

    def forward(self, batch: dict[str, torch.Tensor], *, capture: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, logits-or-per-sequence-scores) with the current deltas and head."""
        eff = {k: self.effective(k) for k in self.targets}
        if capture:
            for t in eff.values():
                if t.requires_grad:
                    t.retain_grad()
            self.capture = eff
        out = self.outputs(eff, batch)
        return self.loss(out, batch), out

    def captured_grads(self) -> dict[str, torch.Tensor]:
        if self.capture is None:
            raise TrainingError("internal: no captured effective weights")
        out = {}
        for k, t in self.capture.items():
            g = t.grad
            out[k] = torch.zeros(t.shape, dtype=torch.float32, device=t.device) if g is None else g.detach().float()
        self.capture = None
        return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


# ---------------------------------------------------------------------------- training loop

def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _allreduce_mean(tensors: Sequence[torch.Tensor]) -> None:
    dist = _dist()
    if dist is None:
        return
    ws = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(ws)


def _lr_at(step: int, total: int) -> float:
    """Linear decay to 10% over the run (a fraction of the base lr)."""
    return 1.0 - 0.9 * (step / max(1, total))


def _score_inputs(sdm: SparseDeltaModel, gen: torch.Generator, cfg: TrainConfig,
                  deltas=None, grads=None) -> M.MaskInputs:
    return M.MaskInputs(weights={k: sdm.weights[k].detach().cpu() for k in sdm.targets}, generator=gen,
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

    def __init__(self, sdm: SparseDeltaModel, data: TaskData, batcher: Batcher, cfg: TrainConfig,
                 progress: ProgressFn | None = None) -> None:
        self.sdm, self.data, self.batcher, self.cfg, self.progress = sdm, data, batcher, cfg, progress
        dist = _dist()
        self.rank = dist.get_rank() if dist else 0
        self.world = dist.get_world_size() if dist else 1
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.mask_gen = torch.Generator().manual_seed(cfg.seed + 1)
        n = len(data.train)
        self.steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
        if cfg.steps is not None:
            self.total = cfg.steps
        else:
            self.total = max(1, int(round((cfg.epochs or 1.0) * self.steps_per_epoch)))
        self.order: list[int] = []
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
    def next_rows(self) -> list[tuple[str, int]]:
        rows = []
        while len(rows) < self.cfg.batch_size:
            if self.pos >= len(self.order):
                self.order = torch.randperm(len(self.data.train), generator=self.gen).tolist()
                self.pos = 0
            take = self.order[self.pos:self.pos + self.cfg.batch_size - len(rows)]
            self.pos += len(take)
            rows += [self.data.train[i] for i in take]
            if self.pos >= len(self.order):
                break  # an epoch ends at its last (possibly short) batch
        return rows[self.rank::self.world] or rows[:1]

    def batch(self, rows):
        if self.sdm.kind == "encoder":
            return self.batcher.encoder_batch(rows, self.sdm.device)
        return self.batcher.causal_batch(rows, self.sdm.device)

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
        _allreduce_mean([p.grad for p in params])  # type: ignore[misc]
        frac = _lr_at(step - 1, self.total)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * frac
        self.opt.step()
        lval = float(loss.detach())
        if not math.isfinite(lval):
            raise TrainingError(f"loss became {lval} at step {step}; lower --lr")
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

    def __init__(self, sdm: SparseDeltaModel, data: TaskData, batcher: Batcher, cfg: TrainConfig,
                 progress: ProgressFn | None = None) -> None:
        super().__init__(sdm, data, batcher, cfg, progress)
        self.method = M.get_mask_method(cfg.mask)
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
                M.check_blockable(key, tuple(file_shapes[key]), cfg.block_size)
        torch.manual_seed(cfg.seed)  # the head's initialisation does not depend on the backbone's loading
        return SparseDeltaModel(backbone, kind, targets, n_labels, device, autocast=device.type == "cuda")

    def trainable(self) -> list[nn.Parameter]:
        return self.sdm.delta_params()

    def phase(self) -> str:
        return "dense" if self.sdm.dense else "values"

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
    def to_sparse(self, sel: dict[str, M.Selection], init: dict[str, torch.Tensor], step: int, kind: str) -> None:
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

    def select(self, scores: dict[str, torch.Tensor]) -> dict[str, M.Selection]:
        return M.select(scores, self.cfg.density, scope=self.cfg.scope, granularity=self.cfg.granularity,
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
            grads = torch.autograd.grad(loss, [saved[k] for k in sorted(saved)])
            grads = [g.float() for g in grads]
            _allreduce_mean(grads)
            for k, g in zip(sorted(saved), grads):
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
            self.warmup = warmup = cfg.select_steps
            if warmup < 1:
                raise TrainingError(f"{method.name} needs a dense warm-up: --select-steps must be >= 1")
            if warmup >= self.total:
                raise TrainingError(f"select-steps ({warmup}) must be below the number of training steps "
                                    f"({self.total}); lower --select-steps or train longer")
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
            _allreduce_mean(list(grads.values()))
            self._rescore(step, self.warmup, grads)
        if step == self.freeze_step and self.warm:
            self.warm = {}  # mask frozen: the dense warm-up buffers go

    def _reselect_due(self, step: int, warmup: int) -> bool:
        if not self.method.reselect or self.cfg.reselect_every <= 0:
            return False
        if step >= self.freeze_step or step <= warmup:
            return False
        return (step - warmup) % self.cfg.reselect_every == 0

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
                new_idx, _keep = M.grow_drop_update(sdm.values[k].detach().cpu(), sdm.idx[k].cpu(),
                                                    grads[k].cpu(), frac)
                sel[k] = M.Selection(new_idx)
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
        return self.cfg.reselect_every > 0 and warmup + self.cfg.reselect_every < self.freeze_step


# ---------------------------------------------------------------------------- evaluation core

@torch.no_grad()
def predict(sdm: SparseDeltaModel, batcher: Batcher, rows: Sequence[tuple[str, int]], batch_size: int
            ) -> tuple[float, float, int]:
    """(accuracy, mean loss, n) of the current model on ``rows``."""
    sdm.backbone.eval()
    correct, loss_sum, n = 0, 0.0, 0
    nl = len(batcher.labels)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        if sdm.kind == "encoder":
            b = batcher.encoder_batch(chunk, sdm.device)
            _, logits = sdm.forward(b)
            logits = logits.float()
            loss_sum += float(nn.functional.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == b["labels"]).sum())
        else:
            b = batcher.causal_batch(chunk, sdm.device, candidates=True)
            _, ll = sdm.forward(b)
            scores = ll.float().reshape(len(chunk), nl)
            loss_sum += float(nn.functional.cross_entropy(scores, b["gold"], reduction="sum"))
            correct += int((scores.argmax(-1) == b["gold"]).sum())
        n += len(chunk)
    return (correct / n if n else 0.0), (loss_sum / n if n else 0.0), n


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
        progress: called as ``progress(step, total, {"loss", "phase", "steps_per_s"})``.
    Returns:
        TrainResult with a SparseAdapter whose parameter names are the base file's tensor names.
    Raises:
        TrainingError/DataError: bad config, empty data, regex matching nothing, missing CUDA...
    """
    trainer, data, seconds = _fit("sparse", base_path, data, cfg, progress=progress)
    sdm, batcher = trainer.sdm, trainer.batcher
    metrics = _metrics(trainer, data, seconds)
    adapter = build_adapter(sdm, cfg, kind=sdm.kind, task_name=task_name, labels=data.labels,
                            regex=cfg.targets or DEFAULT_TARGETS[sdm.kind], base_name=base_name,
                            base_fingerprint=base_fingerprint, events=trainer.events, data=data, world=trainer.world)
    return TrainResult(adapter, metrics, trainer.events, trainer.losses, cfg, trainer.world, sdm, batcher)


VALIDATION_FRACTION = 0.1  # of the train rows, when a dataset has no validation split


def with_validation(data: TaskData, seed: int, fraction: float = VALIDATION_FRACTION) -> TaskData:
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
    batcher = Batcher(load_tokenizer(base_path), sdm.kind, data.labels, cfg.max_length)
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
        acc, vloss, n = predict(sdm, trainer.batcher, val_rows, cfg.eval_batch_size)
        metrics.update({"validation_accuracy": acc, "validation_loss": vloss, "validation_n": n})
    return metrics


def _tail_mean(xs: list[float], n: int = 20) -> float | None:
    tail = xs[-n:]
    return sum(tail) / len(tail) if tail else None


def build_adapter(sdm: SparseDeltaModel, cfg: TrainConfig, *, kind: str, task_name: str, labels: Sequence[str],
                  regex: str, base_name: str | None, base_fingerprint: str | None,
                  events: list[dict[str, Any]], data: TaskData, world: int) -> fmt.SparseAdapter:
    """Package the trained values (and head) as a SparseAdapter keyed by base-file tensor names."""
    vdtype = DTYPES[cfg.dtype]
    params: dict[str, fmt.SparseParam] = {}
    for k, key in sdm.targets.items():
        if k not in sdm.values:
            raise TrainingError("internal: training ended before a mask was selected")
        idx = sdm.idx[k].cpu()
        vals = sdm.values[k].detach().float().cpu().to(vdtype)
        shape = tuple(sdm.weights[k].shape)
        if cfg.granularity == "block":
            b = cfg.block_size
            dense = torch.zeros(math.prod(shape), dtype=vdtype)
            dense[idx] = vals
            bmask = torch.zeros(math.prod(shape), dtype=torch.bool)
            bmask[idx] = True
            rows, cols = M.view2d(shape)
            grid = bmask.reshape(rows // b, b, cols // b, b).any(dim=3).any(dim=1)
            params[key] = fmt.SparseParam.from_block_mask(dense.reshape(shape), grid, b)
        else:
            params[key] = fmt.SparseParam(shape, idx.clone().contiguous(), vals.contiguous())
    extras: dict[str, torch.Tensor] = {}
    head_info = None
    if sdm.head is not None:
        extras[f"heads.{task_name}.weight"] = sdm.head.linear.weight.detach().float().cpu().contiguous()
        extras[f"heads.{task_name}.bias"] = sdm.head.linear.bias.detach().float().cpu().contiguous()
        head_info = {"type": "linear", "pooling": "mean", "task": task_name}
    card: dict[str, Any] = {
        "format": fmt.FORMAT_ID,
        "task": task_name,
        "kind": "expert",
        "labels": {task_name: list(labels)},
        "model_kind": kind,
        "mask": {"method": cfg.mask, "density": cfg.density, "granularity": cfg.granularity,
                 "block_size": cfg.block_size if cfg.granularity == "block" else None,
                 "targets": regex, "scope": cfg.scope,
                 "score": cfg.score if cfg.mask == "connection-sensitivity" else None,
                 "target_tensors": sorted(params)},
        "training": {"config": cfg.to_json(), "data": {"name": data.name, "fingerprint": data.fingerprint(),
                                                        "rows": data.counts()},
                     "mask_events": events, "world_size": world},
    }
    if head_info:
        card["head"] = head_info
    if kind == "causal-lm":
        card["prompt"] = {"template": "{text}" + PROMPT_SUFFIX + " {label}"}
    if base_name or base_fingerprint:
        card["base"] = {"name": base_name, "fingerprint": base_fingerprint}
    adapter = fmt.SparseAdapter(params, extras, card)
    adapter.validate()
    return adapter


def train(ws, *, base: str, task: str | None = None, dataset: str | None = None, name: str | None = None,
          config: TrainConfig = TrainConfig(), text_column: str = "text", label_column: str = "label",
          progress: ProgressFn | None = None):
    """Train on a workspace base and register the result as a new version.

    Takes the Workspace, the base name, exactly one of a built-in ``task`` or a ``dataset`` spec,
    an optional adapter ``name`` (default ``<task>-<mask>``), the config and a progress callback.
    Returns the VersionInfo of the new version (or ``None`` on non-zero distributed ranks).
    Raises:
        AdapterHubError subclasses; nothing is registered when anything fails.
    """
    from .data import resolve_data
    from .names import validate_name

    validate_config(config)
    binfo = ws.get_base(base)
    data = resolve_data(task, dataset, text_column=text_column, label_column=label_column)
    task_name = task or _dataset_task_name(dataset or "")
    adapter_name = name or f"{task_name}-{config.mask}"
    validate_name(adapter_name, "adapter name")
    result = train_adapter(binfo.path, data, config, task_name=task_name, base_name=binfo.name,
                           base_fingerprint=binfo.fingerprint, progress=progress)
    dist = _dist()
    if dist is not None and dist.get_rank() != 0:
        return None
    return ws.register(result.adapter, name=adapter_name, task=task_name, base=binfo.name, kind="expert",
                       metrics=result.metrics, training_config=config.to_json())


def _dataset_task_name(spec: str) -> str:
    stem = Path(spec.partition(":")[2]).stem if ":" in spec else spec
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "dataset"
    return clean[:80]


def init_distributed_from_env() -> bool:
    """Initialise torch.distributed when launched by ``accelerate launch``/``torchrun``.

    Returns True when more than one process takes part. Uses nccl on CUDA, gloo otherwise.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


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
        raise TrainingError(f"--targets {regex!r} matches no module")
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise TrainingError("the LoRA baseline needs peft (pip install peft)") from None
        pm = get_peft_model(backbone, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                 target_modules=names))
        backbone = pm.base_model.model
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
    return BaselineResult(_metrics(trainer, data, seconds), trainer.sdm, trainer.batcher)


__all__ = ["TrainConfig", "TrainResult", "train", "train_adapter", "validate_config", "find_targets",
           "predict", "SparseDeltaModel", "Batcher", "model_kind", "resolve_device", "DEFAULT_TARGETS",
           "AdapterHubError", "train_baseline", "build_baseline_model", "BaselineResult", "BASELINES",
           "Trainer", "SparseTrainer", "LoraTrainer", "FullTrainer", "TRAINERS", "register_trainer", "get_trainer",
           "apply_delta", "mean_pool", "with_validation"]

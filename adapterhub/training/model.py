"""The one "frozen base weights + delta + head" model, and what it needs: loading, targets, batches.

The base model is frozen. Each target weight ``W`` (a Linear, Conv or Embedding weight whose
module name matches the target regex) gets a delta; the forward pass uses ``W + Δ`` through
:func:`torch.func.functional_call`, so any Hugging Face model works unchanged and the base
tensors are never written. :class:`SparseDeltaModel` is that model for training
(:mod:`adapterhub.training.loop`), the LoRA/full baselines, evaluation, federated training and
unlearning (:class:`adapterhub.fused.federated.FedModel` is a subclass).

Encoders (BERT-like) classify with a dense linear head (:class:`MeanPoolHead`) on the mean-pooled
last hidden state. Image bases (:class:`adapterhub.bases.cnn.DigitsCNN`, kind ``image``) return a feature
vector per image, which a dense linear head (:class:`LinearHead`) classifies: the same head tensors
(``heads.<task>.weight/bias``) and loss as encoders, with the pooling left out. Causal LMs (Llama-like)
learn text-to-label: the prompt ``"<text>\\nLabel:"`` is followed by ``" <label name>"``; the loss is
the label tokens' negative log-likelihood and prediction picks the label with the highest
log-likelihood (:class:`Batcher` builds every kind of batch).
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import format as fmt
from ..errors import TrainingError
from .config import DEVICES, DTYPE_NAMES

__all__ = ["CLASSIFIER_KINDS", "DEFAULT_TARGETS", "DTYPES", "PROMPT_SUFFIX", "TARGET_TYPES", "Batcher", "LinearHead",
           "MeanPoolHead", "SparseDeltaModel", "apply_delta", "base_tensor_keys", "file_tensor_key", "find_targets",
           "label_token_logprobs", "load_backbone", "load_tokenizer", "mean_pool", "model_kind", "predict",
           "resolve_device", "tokenizer_for"]

# image bases: every conv and linear weight of the CNN (conv1..conv3, fc)
DEFAULT_TARGETS = {"encoder": r"(query|key|value)$", "causal-lm": r"(q_proj|k_proj|v_proj)$",
                   "image": r"^(conv\d+|fc)$"}
#: the kinds that classify with a dense head (``heads.<task>.weight/bias``) and cross-entropy
CLASSIFIER_KINDS = ("encoder", "image")
PROMPT_SUFFIX = "\nLabel:"
DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16), strict=True))
TARGET_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


# ---------------------------------------------------------------------------- loading

def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu. Raises TrainingError if cuda is asked but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError("CUDA was requested (device='cuda') but no CUDA device is available",
                                keywords=("device",))
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise TrainingError(f"unknown device {device!r}; choose {', '.join(DEVICES)}")


def model_kind(path: Path) -> str:
    """``image`` for adapterhub's own CNN (architecture ``AdapterhubDigitsCNN``), ``causal-lm`` if the
    folder's config names a ``*ForCausalLM`` architecture, else ``encoder``."""
    from .. import safe_read
    from ..bases.cnn import is_cnn_config

    # the folder is someone else's: a FIFO, a nesting bomb or bad UTF-8 fails in one line, never hangs
    cfg = safe_read.read_json_file(Path(path) / "config.json", f"{path}: config.json", TrainingError)
    if not isinstance(cfg, dict):
        raise TrainingError(f"{path}: config.json is not a JSON object")
    if is_cnn_config(cfg):
        return "image"
    archs = cfg.get("architectures") or []
    return "causal-lm" if isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs) else "encoder"


def load_backbone(path: Path, kind: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Load the frozen base model (encoder, causal LM or image CNN) from a local folder.

    Raises TrainingError (transformers' failures) or BaseModelError (a bad CNN folder), one line.
    """
    if kind == "image":
        from ..bases.cnn import load_cnn

        cnn = load_cnn(path, dtype=dtype).to(device)
        for p in cnn.parameters():
            p.requires_grad_(False)
        return cnn
    import transformers

    cls: Any = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise TrainingError(f"cannot load the base model from {path}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(path: Path) -> Any:
    """The base folder's tokenizer, with a pad token (eos or unk when it has none). Raises TrainingError."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise TrainingError(f"cannot load a tokenizer from {path}: {type(e).__name__}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def tokenizer_for(path: Path, kind: str) -> Any:
    """The tokenizer a :class:`Batcher` of ``kind`` needs: None for image bases (pixels are parsed, not
    tokenised), else :func:`load_tokenizer`."""
    return None if kind == "image" else load_tokenizer(path)


def base_tensor_keys(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in the base folder's safetensors files."""
    from ..bases.sources import tensor_shapes

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
        key = file_tensor_key(pname, file_shapes)
        if key is None:
            raise TrainingError(f"target {pname} has no tensor in the base model.safetensors")
        if tuple(file_shapes[key]) != tuple(w.shape):
            raise TrainingError(f"target {pname}: shape {tuple(w.shape)} differs from {key} {file_shapes[key]}")
        out[pname] = key
    if not out:
        raise TrainingError(f"targets regex {regex!r} matches no Linear/Conv/Embedding module of this model",
                            keywords=("targets",))
    return out


def file_tensor_key(pname: str, keys: Mapping[str, tuple[int, ...]]) -> str | None:
    """The base file's tensor name for model parameter ``pname``: the same name, or the one name
    that differs only by a leading prefix (``bert.`` and the like); None when there is none or
    more than one."""
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


class LinearHead(nn.Module):
    """Dense task head on a feature vector per example (image bases): :class:`MeanPoolHead` without the
    pooling. ``linear`` holds the same ``heads.<task>.weight/bias`` tensors."""

    def __init__(self, hidden: int, n_labels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, n_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.float())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over the attended tokens, in fp32: ``(batch, hidden)``."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)).float()


# ---------------------------------------------------------------------------- batches

def position_limit(model: Any) -> int | None:
    """The number of positions ``model`` (a backbone or a model holding ``.backbone``) can embed, if its
    config says (``max_position_embeddings``); None when unknown."""
    backbone = getattr(model, "backbone", model)
    n = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


class Batcher:
    """Tokenises examples for one model kind (encoder classification or causal text-to-label); for image
    bases it parses pixel rows instead (``tokenizer`` may be None; :meth:`image_batch`)."""

    def __init__(self, tokenizer: Any, kind: str, labels: Sequence[str], max_length: int,
                 position_limit: int | None = None) -> None:
        self.tok = tokenizer
        self.kind = kind
        self.labels = list(labels)
        # A base with fewer positions than max_length (a tiny model, a short-context encoder) would fail
        # mid-forward with a raw index error on the first long row; truncate to what the model can take.
        self.max_length = min(max_length, position_limit) if position_limit else max_length
        if kind == "causal-lm":
            self.label_ids = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"] for lab in self.labels]
            if any(len(x) == 0 for x in self.label_ids):
                raise TrainingError("a label name tokenises to nothing")
            bos = tokenizer.bos_token_id
            self.prefix = [bos] if bos is not None else []

    def batch(self, rows: Sequence[tuple[str, int]], device: torch.device) -> dict[str, torch.Tensor]:
        """The training batch of ``rows`` for this kind: :meth:`encoder_batch`, :meth:`image_batch` or
        :meth:`causal_batch` (gold labels only)."""
        if self.kind == "image":
            return self.image_batch(rows, device)
        if self.kind == "encoder":
            return self.encoder_batch(rows, device)
        return self.causal_batch(rows, device)

    def image_batch(self, rows: Sequence[tuple[str, int]], device: torch.device) -> dict[str, torch.Tensor]:
        """``{"pixel_values": (n, 1, 8, 8) float32 in 0..1, "labels": (n,)}`` of pixel-text rows
        (:func:`adapterhub.bases.cnn.decode_pixels`). Raises DataError naming a malformed row."""
        from ..bases.cnn import decode_pixels

        return {"pixel_values": decode_pixels([t for t, _ in rows]).to(device),
                "labels": torch.tensor([lab for _, lab in rows], dtype=torch.long, device=device)}

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
        for i, (text, gold) in enumerate(rows):
            prompt = self._prompt_ids(text, self.max_length - longest_label)
            for j in (range(len(self.labels)) if candidates else [gold]):
                lab_ids = self.label_ids[j]
                seqs.append(prompt + lab_ids)
                targets.append([-100] * len(prompt) + lab_ids)
                owners.append(i)
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id or 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for r, (s, t) in enumerate(zip(seqs, targets, strict=True)):
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
    :mod:`adapterhub.apply.patching` (which adds the same fp32 values).
    """
    if idx is None:
        return (w.float() + delta).to(w.dtype)
    return w.detach().float().reshape(-1).index_add(0, idx, delta).reshape(w.shape).to(w.dtype)


class SparseDeltaModel:
    """A frozen base plus per-target deltas and (encoders) a task head, run through ``functional_call``.

    The one "base weights + delta + head" model: training, the LoRA/full baselines, evaluation,
    federated training and unlearning (:class:`adapterhub.fused.federated.FedModel` is a subclass) all
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
        self.head: MeanPoolHead | LinearHead | None = None
        if kind in CLASSIFIER_KINDS:
            hidden = int(getattr(backbone, "config").hidden_size)  # noqa: B009 - nn.Module's __getattr__ is typed as Tensor | Module
            self.head = (LinearHead if kind == "image" else MeanPoolHead)(hidden, n_labels).to(device)
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
        """Logits (encoder, image) or per-sequence label log-likelihoods (causal LM) of the backbone run
        with the parameters ``eff`` (model param name -> tensor) replacing its own.

        ``head``: a ``(weight, bias)`` pair used instead of :attr:`head` (a head that is being trained
        as a plain tensor, as federated training does).
        """
        from torch.func import functional_call

        ctx: Any = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            if self.kind == "image":
                feats = functional_call(self.backbone, dict(eff), args=(),
                                        kwargs={"pixel_values": batch["pixel_values"]}, strict=False).float()
                if head is None:
                    return self.head(feats)  # type: ignore[misc]
                return nn.functional.linear(feats, *head)
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
        """The training loss of :meth:`outputs`: cross-entropy (encoder, image) or label-token NLL (causal LM)."""
        if self.kind in CLASSIFIER_KINDS:
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


# ---------------------------------------------------------------------------- evaluation core

@torch.no_grad()
def predict(sdm: SparseDeltaModel, batcher: Batcher, rows: Sequence[tuple[str, int]], batch_size: int,
            on_batch: Callable[[int, int], None] | None = None) -> tuple[float, float, int]:
    """(accuracy, mean loss, n) of the current model on ``rows``; ``on_batch(done, total)`` after each batch."""
    sdm.backbone.eval()
    correct, loss_sum, n = 0, 0.0, 0
    nl = len(batcher.labels)
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        if sdm.kind in CLASSIFIER_KINDS:
            b = batcher.batch(chunk, sdm.device)
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
        if on_batch is not None:
            on_batch(n, len(rows))
    return (correct / n if n else 0.0), (loss_sum / n if n else 0.0), n

"""PEFT-shaped one-liners: activate an adapter on a loaded model, predict with its head, switch by name.

:func:`activate` takes a loaded Hugging Face model and an adapter *source* and applies the adapter in
place through :func:`adapterhub.apply.patching.apply_adapter`; the returned :class:`ActiveAdapter`
reverts it bit for bit (:meth:`ActiveAdapter.revert`, or on leaving a ``with`` block), and predicts
with the adapter's task head exactly as ``adapterhub eval`` does (the same
:class:`~adapterhub.training.model.SparseDeltaModel`, :class:`~adapterhub.training.model.MeanPoolHead`
and :class:`~adapterhub.training.model.Batcher`). :class:`AdapterSet` keeps several named adapters
for one model and switches between them exactly (``set_adapter``, ``disable_adapter``).

A source is resolved in this order (:func:`resolve_source`):

1. an adapter object (:class:`~adapterhub.format.SparseAdapter`) as it is;
2. an existing local file or folder: an adapterhub ``.safetensors`` file or a PEFT folder (what
   ``adapterhub register`` reads), mapped onto the model's own tensor names;
3. a catalog ref (``rt``, ``rt@2``, ``rt@prod``, a hash prefix) of the workspace;
4. a Hub repo id ``OWNER/NAME[@REV]``: pulled into the workspace first (the only step that uses the
   network). With ``offline=True`` or ``HF_HUB_OFFLINE=1`` a version pulled before with that revision
   is used; otherwise the call fails with a one-line :class:`~adapterhub.errors.HubError`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import format as fmt
from .apply.patching import UndoRecord, apply_adapter as apply_adapter_exact, revert
from .errors import AdapterHubError, FormatError, HubError, TrainingError

if TYPE_CHECKING:
    from .catalog.records import VersionInfo
    from .workspace import Workspace

__all__ = ["ActiveAdapter", "AdapterClassifier", "AdapterSet", "AdapterSetError", "ResolvedAdapter", "activate",
           "apply_adapter", "offline_mode", "resolve_source"]

_TRUE = ("1", "true", "yes", "on")


class AdapterSetError(AdapterHubError):
    """Misuse of an :class:`AdapterSet` (unknown or duplicate adapter name)."""


@dataclass
class ResolvedAdapter:
    """An adapter source resolved to tensors: what to apply (bottom first) and where it came from.

    ``stack``: the adapters applied in order (an unlearning adapter's global model first, then itself);
    ``origin``: ``object`` | ``path`` | ``catalog`` | ``hub``; ``ref``: the catalog ref when there is one;
    ``base_path``: the base folder recorded in the catalog (its tokenizer is the default for predictions).
    """

    adapter: fmt.SparseAdapter
    origin: str
    label: str
    ref: str | None = None
    task: str | None = None
    base_path: Path | None = None
    stack: list[fmt.SparseAdapter] = field(default_factory=list)


def offline_mode(offline: bool | None) -> bool:
    """``offline`` when given, else whether ``HF_HUB_OFFLINE`` is set to a true value."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith(("/", os.sep, ".safetensors")) or s.count("/") > 1


def _from_version(ws: Workspace, info: VersionInfo, origin: str) -> ResolvedAdapter:
    from .evaluation.scoring import underlying_versions

    adapter = ws.load_adapter(info)
    below = [ws.load_adapter(v) for v in underlying_versions(ws, info)]
    base_path: Path | None
    try:
        base_path = ws.get_base(info.base).path
    except AdapterHubError:  # a base whose folder is gone: predictions then need an explicit tokenizer
        base_path = None
    return ResolvedAdapter(adapter, origin, info.ref, ref=info.ref, task=info.task, base_path=base_path,
                           stack=[*below, adapter])


def _hub_local_copy(ws: Workspace, repo: str, rev: str | None) -> VersionInfo | None:
    """A version pulled before from ``repo`` at tag or commit ``rev`` (None when there is none)."""
    if rev is None:
        return None
    for v in ws.list_versions():
        if v.hub_repo == repo and rev in (v.hub_tag, v.hub_commit):
            return v
    return None


def resolve_source(source: str | os.PathLike[str] | fmt.SparseAdapter, model: nn.Module | None = None, *,
                   workspace: Workspace | None = None, offline: bool | None = None,
                   density: float | None = None) -> ResolvedAdapter:
    """Resolve an adapter source (see the module docstring for the order).

    Takes the source, the model (its tensor names and shapes map a PEFT folder's modules), a workspace
    (default: :meth:`Workspace.open` of ``ADAPTERHUB_HOME``, opened only for a ref or a Hub id) and the
    offline switch (default: ``HF_HUB_OFFLINE``); ``density``: the fraction of ΔW kept for a PEFT LoRA
    folder (required for one, as ``register --density``). Returns a :class:`ResolvedAdapter`.
    Raises: FormatError (unreadable file or folder), RefError (unknown ref), HubError (transfer failure,
    or a Hub id while offline), one line each.
    """
    if isinstance(source, fmt.SparseAdapter):
        return ResolvedAdapter(source, "object", "<adapter>", task=(source.card or {}).get("task"), stack=[source])
    if not isinstance(source, (str, os.PathLike)):
        raise FormatError(f"an adapter source is a path, a ref, a Hub id or a SparseAdapter, not {type(source).__name__}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if text and path.exists():
        from .interop.peft import is_peft_folder, read_adapter_source

        shapes = _model_shapes(model) if (model is not None and is_peft_folder(path)) else None
        adapter, _kind = read_adapter_source(path, shapes, density=density)
        return ResolvedAdapter(adapter, "path", str(path), task=(adapter.card or {}).get("task"), stack=[adapter])
    if not isinstance(source, str) or _looks_like_path(text):
        raise FormatError(f"{text}: no such adapter file or folder")
    from .workspace import Workspace

    own = workspace is None
    ws = Workspace.open() if workspace is None else workspace
    try:
        if "/" not in text.partition("@")[0]:
            return _from_version(ws, ws.resolve(text), "catalog")
        from .hub.client import parse_repo_spec, pull

        repo, rev = parse_repo_spec(text)
        if offline_mode(offline):
            local = _hub_local_copy(ws, repo, rev)
            if local is None:
                raise HubError(f"{text} is not a local path or a catalog ref and offline mode is on "
                               "(offline=True or HF_HUB_OFFLINE=1): pull it first or go online")
            return _from_version(ws, local, "hub")
        res = pull(ws, text)
        return _from_version(ws, ws.resolve(res.ref), "hub")
    finally:
        if own:
            ws.close()


# ---------------------------------------------------------------------------------------------- heads

def _kind_of(model: nn.Module) -> str:
    from .bases.cnn import DigitsCNN

    if isinstance(model, DigitsCNN):
        return "image"
    return "causal-lm" if type(model).__name__.endswith("ForCausalLM") else "encoder"


def _labels_of(adapter: fmt.SparseAdapter, task: str | None, kind: str) -> tuple[str | None, list[str]]:
    """(head task, label names): the head's for encoders and image CNNs, the card's (or the built-in task's)
    for causal LMs."""
    if kind in ("encoder", "image"):
        from .evaluation.scoring import head_for

        name, _w, _b, labels = head_for(adapter, task)
        return name, labels
    card_labels = (adapter.card or {}).get("labels") or {}
    if isinstance(card_labels, dict):
        if task in card_labels:
            return task, list(card_labels[task])
        if len(card_labels) == 1:
            (name, labels), = card_labels.items()
            return str(name), list(labels)
    if task:
        from .data import BUILTIN_TASKS, load_task

        if task in BUILTIN_TASKS:
            return task, list(load_task(task).labels)
    raise TrainingError("the adapter's card names no labels to score; give labels=[...]", keywords=("labels",))


class AdapterClassifier(nn.Module):
    """An ``AutoModelForSequenceClassification``-shaped module: the (adapted) encoder plus the adapter's
    mean-pool head. ``forward(input_ids, attention_mask, token_type_ids=None, labels=None)`` returns a
    ``SequenceClassifierOutput`` (``.logits``, ``.loss`` when labels are given); ``config.id2label``
    names the classes. The encoder's weights are the model's own (with the adapter applied)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, labels: Sequence[str]) -> None:
        super().__init__()
        from .training.model import SparseDeltaModel

        self.backbone = backbone
        self.head = head
        self.labels = list(labels)
        self.config = getattr(backbone, "config", None)
        self.id2label = dict(enumerate(self.labels))
        self.label2id = {v: k for k, v in self.id2label.items()}
        dev = next(backbone.parameters()).device
        # the library's one forward (functional_call with no replaced parameters = the weights as patched)
        self._sdm = SparseDeltaModel(backbone, "encoder", {}, len(self.labels), dev, autocast=dev.type == "cuda")
        self._sdm.head = head  # type: ignore[assignment]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        batch = {"input_ids": input_ids,
                 "attention_mask": attention_mask if attention_mask is not None else torch.ones_like(input_ids)}
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        logits = self._sdm.outputs({}, batch).float()
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class ActiveAdapter:
    """An adapter applied in place to a model (see :func:`activate`).

    ``revert()`` writes the saved original weights back, bit for bit (a second call does nothing); as a
    context manager it reverts on exit, also on an exception. ``predict(texts)`` returns label names,
    ``scores(texts)`` the logits (encoders) or per-label log-likelihoods (causal LMs) that ``adapterhub
    eval`` computes; ``classifier()`` an ``AutoModelForSequenceClassification``-shaped module (encoders).
    """

    def __init__(self, model: nn.Module, resolved: ResolvedAdapter, scale: float, records: list[UndoRecord],
                 tokenizer: Any = None, task: str | None = None) -> None:
        self.model = model
        self.resolved = resolved
        self.scale = scale
        self._records = records
        self._tokenizer = tokenizer
        self.kind = _kind_of(model)
        self.task = task if task is not None else resolved.task
        self._head: nn.Module | None = None
        self._labels: list[str] | None = None

    # -- state
    @property
    def adapter(self) -> fmt.SparseAdapter:
        return self.resolved.adapter

    @property
    def ref(self) -> str | None:
        """The catalog ref (None for a file, folder or object)."""
        return self.resolved.ref

    @property
    def active(self) -> bool:
        return bool(self._records)

    def revert(self) -> None:
        """Restore the model's weights exactly as they were before :func:`activate` (idempotent)."""
        while self._records:
            revert(self.model, self._records.pop())

    def __enter__(self) -> ActiveAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return f"<ActiveAdapter {self.resolved.label} scale={self.scale:g} {state}>"

    # -- heads and predictions
    @property
    def labels(self) -> list[str]:
        if self._labels is None:
            self.task, self._labels = _labels_of(self.adapter, self.task, self.kind)
        return self._labels

    def _backbone(self) -> nn.Module:
        if self.kind == "causal-lm":
            return self.model
        base = getattr(self.model, "base_model", None)
        return base if isinstance(base, nn.Module) else self.model

    def head(self) -> nn.Module:
        """The adapter's task head: a :class:`~adapterhub.training.model.MeanPoolHead` (encoders) or a
        :class:`~adapterhub.training.model.LinearHead` (image CNNs)."""
        if self._head is None:
            if self.kind not in ("encoder", "image"):
                raise TrainingError("causal LMs score labels by log-likelihood and have no head; use predict()")
            from .evaluation.scoring import head_for
            from .training.model import SparseDeltaModel

            _ = self.labels
            _name, w, b, labels = head_for(self.adapter, self.task)
            dev = next(self.model.parameters()).device
            sdm = SparseDeltaModel(self._backbone(), self.kind, {}, len(labels), dev, autocast=False)
            sdm.set_head(w, b)
            assert sdm.head is not None
            self._head = sdm.head
        return self._head

    def classifier(self) -> AdapterClassifier:
        """The adapted encoder with the adapter's head, shaped like ``AutoModelForSequenceClassification``."""
        if self.kind == "image":
            raise TrainingError("classifier() wraps text encoders; for an image model use predict() or scores()")
        return AdapterClassifier(self._backbone(), self.head(), self.labels)

    def tokenizer(self) -> Any:
        """The tokenizer given to :func:`activate`, else the base folder's (catalog) or the model's folder's."""
        if self._tokenizer is None and self.kind == "image":
            return None  # pixel rows are parsed, not tokenised
        if self._tokenizer is None:
            from .training.model import load_tokenizer

            where = self.resolved.base_path or getattr(self.model, "name_or_path", None)
            if not where or not Path(str(where)).is_dir():
                raise TrainingError("no tokenizer known for this model; pass tokenizer=... to activate()",
                                    keywords=("tokenizer",))
            self._tokenizer = load_tokenizer(Path(str(where)))
        return self._tokenizer

    @torch.no_grad()
    def scores(self, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
        """``(len(texts), n_labels)`` fp32: logits (encoder head on the mean-pooled last hidden state) or
        label log-likelihoods after ``"<text>\\nLabel:"`` (causal LMs) — ``adapterhub eval``'s figures
        (same batching defaults: 64 rows, 128 tokens)."""
        from .training.model import Batcher, SparseDeltaModel, position_limit

        if isinstance(texts, str):
            texts = [texts]
        labels = self.labels
        dev = next(self.model.parameters()).device
        sdm = SparseDeltaModel(self._backbone(), self.kind, {}, len(labels), dev, autocast=dev.type == "cuda")
        if self.kind in ("encoder", "image"):
            sdm.head = self.head()  # type: ignore[assignment]
        batcher = Batcher(self.tokenizer(), self.kind, labels, max_length, position_limit(sdm))
        rows = [(t, 0) for t in texts]
        out: list[torch.Tensor] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                if self.kind in ("encoder", "image"):
                    _, logits = sdm.forward(batcher.batch(chunk, dev))
                    out.append(logits.float())
                else:
                    _, ll = sdm.forward(batcher.causal_batch(chunk, dev, candidates=True))
                    out.append(ll.float().reshape(len(chunk), len(labels)))
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.empty((0, len(labels)))

    def predict(self, texts: Sequence[str], **kw: Any) -> list[str]:
        """The label names the adapter predicts for ``texts`` (argmax of :meth:`scores`)."""
        labels = self.labels
        return [labels[int(i)] for i in self.scores(texts, **kw).argmax(-1)]


def activate(model: nn.Module, source: str | os.PathLike[str] | fmt.SparseAdapter, scale: float = 1.0, *,
             workspace: Workspace | None = None, offline: bool | None = None, tokenizer: Any = None,
             task: str | None = None, density: float | None = None) -> ActiveAdapter:
    """Apply an adapter to ``model`` in place; the returned handle reverts it exactly.

    ``source`` is resolved in this order: an adapter object; an existing local file or folder (an
    adapterhub ``.safetensors`` file or a PEFT folder); a catalog ref (``rt@prod``) of ``workspace``
    (default: the ``ADAPTERHUB_HOME`` workspace); a Hub id ``OWNER/NAME[@REV]``, pulled into the
    workspace — the only step that uses the network, refused (one-line HubError) when ``offline`` or
    ``HF_HUB_OFFLINE=1`` unless that revision was pulled before. A catalog version that applies on
    another (an unlearning adapter on its global model) brings that version along.

    ``scale`` multiplies the deltas; ``tokenizer``/``task`` serve :meth:`ActiveAdapter.predict`
    (defaults: the base folder's tokenizer, the version's task); ``density`` is for a PEFT LoRA folder
    (the fraction of each ΔW = B·A·scale kept). Raises FormatError, RefError, HubError,
    BaseModelError (the adapter does not fit the model: nothing is changed), NonFiniteWeightsError.

    Example::

        with adapterhub.activate(model, "rt@prod") as rt:
            print(rt.predict(["a fine film"]))
        # model's weights are back, bit for bit
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"activate() needs a torch.nn.Module, got {type(model).__name__}")
    resolved = resolve_source(source, model, workspace=workspace, offline=offline, density=density)
    return _apply_resolved(model, resolved, scale, tokenizer=tokenizer, task=task)


def _apply_resolved(model: nn.Module, resolved: ResolvedAdapter, scale: float, *, tokenizer: Any,
                    task: str | None) -> ActiveAdapter:
    """Apply the resolved stack (``scale`` on the top adapter); on any failure the model is left as it was."""
    records: list[UndoRecord] = []
    try:
        for i, a in enumerate(resolved.stack):
            top = i == len(resolved.stack) - 1
            records.append(apply_adapter_exact(model, a, scale if top else 1.0, label=resolved.label))
    except BaseException:
        while records:
            revert(model, records.pop())
        raise
    return ActiveAdapter(model, resolved, float(scale), records, tokenizer=tokenizer, task=task)


def apply_adapter(target: Any, source: str | os.PathLike[str] | fmt.SparseAdapter, scale: float = 1.0, *,
                  label: str = "", workspace: Workspace | None = None, offline: bool | None = None) -> UndoRecord:
    """:func:`adapterhub.apply.patching.apply_adapter` that also takes a path, a catalog ref or a Hub id
    (resolved as :func:`activate` does; ``target`` is a module or a state dict).

    Returns one :class:`~adapterhub.apply.patching.UndoRecord` covering the whole stack (a version's
    ``applies_on`` chain first), which :func:`adapterhub.revert` undoes bit for bit.
    """
    model = target if isinstance(target, nn.Module) else None
    if model is None and not isinstance(source, fmt.SparseAdapter) and Path(os.fspath(source)).is_dir():
        raise FormatError("a PEFT folder needs the model (its tensor names): pass a torch.nn.Module")
    resolved = resolve_source(source, model, workspace=workspace, offline=offline)
    records: list[UndoRecord] = []
    try:
        for i, a in enumerate(resolved.stack):
            top = i == len(resolved.stack) - 1
            records.append(apply_adapter_exact(target, a, scale if top else 1.0, label=label or resolved.label))
    except BaseException:
        while records:
            revert(target, records.pop())
        raise
    if len(records) == 1:
        return records[0]
    return UndoRecord([e for r in records for e in r.entries], label=label or resolved.label, scale=float(scale))


class AdapterSet:
    """Named adapters for one loaded model, PEFT-style; at most one is applied at a time.

    ``load(name, source)`` resolves and keeps an adapter (nothing is applied); ``set_adapter(name)``
    reverts the active one exactly and applies ``name``; ``with disable_adapter():`` runs on the base
    weights and re-applies on exit; ``unload()`` returns to the base. Every switch goes through the exact
    revert, so the base weights between adapters are the original bytes.
    """

    def __init__(self, model: nn.Module, *, workspace: Workspace | None = None, offline: bool | None = None,
                 tokenizer: Any = None) -> None:
        self.model = model
        self.workspace = workspace
        self.offline = offline
        self.tokenizer = tokenizer
        self._loaded: dict[str, tuple[ResolvedAdapter, float, str | None]] = {}
        self._active: ActiveAdapter | None = None
        self._active_name: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    @property
    def active_adapter(self) -> str | None:
        """The name of the applied adapter (None on the base weights)."""
        return self._active_name

    @property
    def active(self) -> ActiveAdapter | None:
        """The applied adapter's handle (``predict``, ``classifier``), None on the base weights."""
        return self._active

    def load(self, name: str, source: str | os.PathLike[str] | fmt.SparseAdapter, *, scale: float = 1.0,
             task: str | None = None, activate: bool = False, density: float | None = None) -> ResolvedAdapter:
        """Resolve ``source`` (as :func:`activate`) and keep it under ``name``; ``activate=True`` also
        switches to it. Raises AdapterSetError when ``name`` is taken."""
        if not isinstance(name, str) or not name:
            raise AdapterSetError("an adapter name must be a non-empty string")
        if name in self._loaded:
            raise AdapterSetError(f"adapter {name!r} is already loaded; delete_adapter({name!r}) first")
        resolved = resolve_source(source, self.model, workspace=self.workspace, offline=self.offline,
                                  density=density)
        self._loaded[name] = (resolved, float(scale), task)
        if activate:
            self.set_adapter(name)
        return resolved

    def _get(self, name: str) -> tuple[ResolvedAdapter, float, str | None]:
        if name not in self._loaded:
            known = ", ".join(self._loaded) or "none loaded"
            raise AdapterSetError(f"no adapter {name!r} (known: {known})")
        return self._loaded[name]

    def set_adapter(self, name: str) -> ActiveAdapter:
        """Revert the active adapter exactly and apply ``name``. Returns its handle."""
        resolved, scale, task = self._get(name)
        if self._active_name == name and self._active is not None:
            return self._active
        self.unload()
        self._active = _apply_resolved(self.model, resolved, scale, tokenizer=self.tokenizer, task=task)
        self._active_name = name
        return self._active

    def unload(self) -> None:
        """Back to the base weights, bit for bit (no adapter active)."""
        if self._active is not None:
            self._active.revert()
        self._active, self._active_name = None, None

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the block on the base weights; the adapter that was active is re-applied on exit."""
        name = self._active_name
        self.unload()
        try:
            yield
        finally:
            if name is not None:
                self.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        """Forget ``name`` (reverting it first when it is the active one)."""
        self._get(name)
        if self._active_name == name:
            self.unload()
        del self._loaded[name]

    def predict(self, texts: Sequence[str], **kw: Any) -> list[str]:
        """:meth:`ActiveAdapter.predict` of the active adapter. Raises AdapterSetError when none is active."""
        if self._active is None:
            raise AdapterSetError("no adapter is active; call set_adapter(name) first")
        return self._active.predict(texts, **kw)

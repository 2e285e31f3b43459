"""Accuracy and loss of an adapter version (or of a materialised model folder) on a task split.

Two ways to get the weights:

* ``model_dir=None``: the version's base folder, with the adapter's sparse deltas added in
  memory (``W + Δ`` through ``functional_call``; the base files are never touched);
* ``model_dir=PATH``: a folder whose weights already include the adapters (a deployment made by
  the composer); only the adapter's task head and label names are taken from ``ref``.

Encoders and image bases (adapterhub's CNN, :mod:`adapterhub.bases.cnn`) need a head: the adapter's
extras ``heads.<task>.weight/bias`` (the head for the asked task, or the adapter's only head). Causal LMs
are scored by label log-likelihood, no head.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import format as fmt
from ..apply.patching import apply_adapter
from ..data import BUILTIN_TASKS, TaskData, load_dataset, load_task
from ..errors import DataError, RefError, TrainingError
from ..training.loop import dataset_task_name
from ..training.model import (
    CLASSIFIER_KINDS,
    DTYPES,
    Batcher,
    SparseDeltaModel,
    base_tensor_keys,
    file_tensor_key,
    load_backbone,
    model_kind,
    position_limit,
    predict,
    resolve_device,
    tokenizer_for,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..workspace import Workspace


@dataclass
class EvalResult:
    """One evaluation: where, on what, and the figures."""

    ref: str | None
    task: str
    split: str
    accuracy: float
    loss: float
    n: int
    model_dir: str
    metric_keys: dict[str, str]
    full: bool = True  # the whole split was scored (not a --max-examples subset)
    source: str = "eval"  # the metric rows' source: eval, or deployment:NAME
    dataset_hash: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def head_for(adapter: fmt.SparseAdapter, task: str | None) -> tuple[str, torch.Tensor, torch.Tensor, list[str]]:
    """(head task, weight, bias, label names) from an adapter's extras and card.

    Raises:
        TrainingError: no head, several heads and none for ``task``, or labels missing.
    """
    heads = sorted({k.split(".")[1] for k in adapter.extras if k.startswith("heads.") and k.endswith(".weight")})
    if not heads:
        raise TrainingError("this adapter has no classification head (heads.<task>.weight); "
                            "encoder and image evaluation need one")
    if task in heads:
        name = task
    elif len(heads) == 1:
        name = heads[0]
    else:
        raise TrainingError(f"adapter has heads for {', '.join(heads)}; choose one by giving its task",
                            keywords=("task",))
    labels = ((adapter.card or {}).get("labels") or {}).get(name)
    w, b = adapter.extras[f"heads.{name}.weight"], adapter.extras.get(f"heads.{name}.bias")
    if b is None:
        b = torch.zeros(w.shape[0], dtype=w.dtype)
    if not labels or len(labels) != w.shape[0]:
        raise TrainingError(f"adapter card has no label names for head {name!r}")
    return name, w, b, list(labels)


def model_folder(ws: Workspace, version: VersionInfo | None, model_dir: str | Path | None) -> Path:
    """The model folder an evaluation runs on: ``model_dir`` (a deployment or any folder with a
    ``config.json``), else the version's base. Raises TrainingError (one line) otherwise."""
    if model_dir is not None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise TrainingError(f"{path}: not a model folder (no config.json)")
        return path
    if version is not None:
        return Path(ws.get_base(version.base).path)
    raise TrainingError("give a REF or a model folder to evaluate")


def load_eval_data(task: str | None, dataset: str | None, labels: list[str] | None, *,
                   text_column: str = "text", label_column: str = "label") -> TaskData:
    """Built-in task or dataset spec, with label ids aligned to ``labels`` when given.

    Raises:
        DataError: both/neither given, unknown task, or labels that differ from the head's.
    """
    if (task is None) == (dataset is None):
        raise DataError("give exactly one of task or dataset", keywords=("task", "dataset"))
    if task is not None:
        data = load_task(task)
        if labels is not None and list(labels) != list(data.labels):
            raise DataError(f"task {task!r} has labels {data.labels}, the adapter's head predicts {labels}")
        return data
    return load_dataset(dataset, text_column=text_column, label_column=label_column,  # type: ignore[arg-type]
                        labels=labels)


def evaluate(ws: Workspace, ref: str | None, task: str | None = None, dataset: str | None = None, split: str = "test",
             model_dir: str | Path | None = None, *, text_column: str = "text", label_column: str = "label",
             batch_size: int = 64, max_examples: int | None = None, max_length: int = 128,
             device: str = "auto", dtype: str = "fp32", record: bool = True,
             deployment: str | None = None,
             progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> EvalResult:
    """Evaluate a version (or a model folder) on a split and record the figures on the version.

    Takes:
        ws: the Workspace.
        ref: a REF; may be None only with ``model_dir`` and a causal LM (no head needed).
        task / dataset: what to evaluate on (default: the version's own built-in task).
        split: ``train``, ``validation`` or ``test``.
        model_dir: evaluate these weights as they are (a deployment folder) instead of base + adapter.
        record: append ``<prefix><split>_accuracy`` and ``_loss`` rows (with n, whether the whole split
            was scored, the data's hash, the scorer and the time) to the version's metric history, where
            the prefix is empty for the version's own task and ``<task>/`` otherwise; the source is
            ``eval``, or ``deployment:<name>`` when ``deployment`` is given (history only, never shown as
            the version's own figure). Nothing earlier is overwritten.
        progress: ``progress(done, total, info)`` once the rows are known (``done`` 0) and after each batch,
            with ``total`` the rows to score and ``info["phase"]`` (``loading``, ``scoring``), as training's
            callback is called.
    Returns:
        EvalResult.
    Raises:
        RefError, DataError, TrainingError, BaseModelError (one line each).
    """
    version = ws.resolve(ref) if ref is not None else None
    adapter = ws.load_adapter(version) if version is not None else None
    if task is None and dataset is None:
        if version is not None and version.task in BUILTIN_TASKS:
            task = version.task
        else:
            raise DataError("give a task or a dataset (the version's task is not a built-in task)",
                            keywords=("task", "dataset"))
    path = model_folder(ws, version, model_dir)
    kind = model_kind(path)
    head = None
    labels: list[str] | None = None
    if kind in CLASSIFIER_KINDS:
        if adapter is None:
            raise TrainingError(f"{kind} evaluation needs an adapter REF for its classification head")
        head = head_for(adapter, task or (version.task if version else None))
        labels = head[3]
    data = load_eval_data(task, dataset, labels, text_column=text_column, label_column=label_column)
    rows = data.split(split)
    split_size = len(rows)
    if max_examples:
        rows = rows[:max_examples]
    if not rows:
        raise DataError(f"{data.name}: the {split} split is empty")
    if progress is not None:
        progress(0, len(rows), {"phase": "loading"})
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise TrainingError(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    backbone = load_backbone(path, kind, DTYPES[dtype], dev)
    if version is not None and model_dir is None:
        for below in underlying_versions(ws, version):  # e.g. an unlearning adapter's global model, patched first
            apply_adapter(backbone, ws.load_adapter(below))
    targets: dict[str, str] = {}
    if adapter is not None and model_dir is None:
        shapes = base_tensor_keys(path)
        adapter.check_base(shapes)
        by_key: dict[str, str] = {}
        for pname, _ in backbone.named_parameters(remove_duplicate=False):
            key = file_tensor_key(pname, adapter.params)  # type: ignore[arg-type]
            if key is not None and key in adapter.params and key not in by_key.values():
                by_key[pname] = key
        missing = set(adapter.params) - set(by_key.values())
        if missing:
            raise TrainingError(f"adapter tensors not found in the model: {sorted(missing)[:3]}")
        targets = by_key
    sdm = SparseDeltaModel(backbone, kind, targets, len(data.labels), dev, autocast=dev.type == "cuda")
    for pname, key in targets.items():
        idx, vals = adapter.params[key].flat()  # type: ignore[union-attr]
        sdm.idx[pname] = idx.to(dev)
        sdm.values[pname] = torch.nn.Parameter(vals.float().to(dev), requires_grad=False)
    if head is not None and sdm.head is not None:
        sdm.set_head(head[1], head[2])
    batcher = Batcher(tokenizer_for(path, kind), kind, data.labels, max_length, position_limit(sdm))
    on_batch = None if progress is None else (lambda done, total: progress(done, total, {"phase": "scoring"}))
    acc, loss, n = predict(sdm, batcher, rows, batch_size, on_batch)
    task_label = task if task is not None else dataset_task_name(dataset or "")
    prefix = "" if (version is not None and task_label == version.task) else f"{task_label}/"
    source = f"deployment:{deployment}" if deployment else "eval"
    names = {"accuracy": f"{prefix}{split}_accuracy", "loss": f"{prefix}{split}_loss", "n": f"{prefix}{split}_n"}
    shown = f"deployment:{deployment}/" if deployment else ""  # the keys as reported: whose figure it is
    keys = {k: shown + v for k, v in names.items()}
    full = n == split_size
    data_hash = data.fingerprint()
    if record and version is not None:
        scorer = f"adapterhub.evaluation:{kind}:{dtype}:max_length={max_length}"
        ws.record_metrics(version.ref, {names["accuracy"]: acc, names["loss"]: loss, names["n"]: n}, source=source,
                          full=full, dataset_hash=data_hash, scorer=scorer)
    return EvalResult(version.ref if version else None, task_label, split, acc, loss, n, str(path), keys, full,
                      source, data_hash)


def underlying_versions(ws: Workspace, version: VersionInfo) -> list[VersionInfo]:
    """The versions a version is applied on top of, bottom first (``training_config.applies_on``).

    An unlearning adapter holds deltas over its global model's weights, not over the base, so
    evaluating it alone means evaluating ``base + global + unlearning``, exactly what a deployment
    with both applied serves. The recorded content hash must still match.
    Raises: RefError/CatalogError when the recorded version is gone or its bytes changed.
    """
    chain: list[VersionInfo] = []
    seen, cur = {version.id}, version
    while True:
        on = (cur.training_config or {}).get("applies_on") if isinstance(cur.training_config, dict) else None
        if not on or not on.get("ref"):
            break
        below = ws.resolve(on["ref"])
        if on.get("content_hash") and below.content_hash != on["content_hash"]:
            raise RefError(f"{cur.ref} applies on {on['ref']} with hash {on['content_hash'][:12]}..., "
                           f"but that version now has {below.content_hash[:12]}...")
        if below.id in seen:
            raise RefError(f"{cur.ref}: applies_on forms a cycle at {below.ref}")
        seen.add(below.id)
        chain.append(below)
        cur = below
    return chain[::-1]


def deployment_path(ws: Workspace, name: str) -> str:
    """The folder of the deployment called ``name`` (its catalog row's path, as recorded).

    Raises:
        DeploymentError: no such deployment (the message names the known ones).
    """
    return str(ws.deployment_rows.get(name).path)

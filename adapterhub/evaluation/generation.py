"""Generation-based evaluation of text-to-text adapters: batched greedy decoding, Rouge-L and exact match.

Scores (:mod:`adapterhub.training.decoding`, re-exported here): Rouge-L (the ``rouge-score`` package's
``rougeL`` F-measure) and exact match.

Where the weights come from mirrors :func:`adapterhub.evaluation.scoring.evaluate`: the version's base
with its sparse deltas (and any version it applies on) added in memory, or a deployment folder loaded as it
is with ``AutoModelForCausalLM``. Metric rows ``<prefix><split>_rougeL``, ``_exact_match`` and ``_n`` are
appended to the version's metric history.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError, TrainingError
from ..training.decoding import exact_match, generate, rouge_l, score_generations

if TYPE_CHECKING:  # pragma: no cover
    from ..data.text2text import Text2TextData
    from ..workspace import Workspace

__all__ = ["GenEvalResult", "evaluate_text2text", "exact_match", "generate", "rouge_l", "score_generations",
           "wants_generation"]


@dataclass
class GenEvalResult:
    """One generation-based evaluation: where, on what, the scores and the recorded metric keys."""

    ref: str | None
    task: str
    split: str
    rougeL: float
    exact_match: float
    n: int
    model_dir: str
    metric_keys: dict[str, str]
    full: bool = True
    source: str = "eval"
    dataset_hash: str | None = None
    max_new_tokens: int = 32
    examples: list[dict[str, str]] | None = None  # a few (prompt, reference, prediction) for people

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wants_generation(ws: Workspace, ref: str | None, task: str | None, dataset: str | None,
                     prompt_column: str | None) -> bool:
    """True when an evaluation is text-to-text: a built-in text-to-text ``task``, a ``prompt_column``, or
    (no task nor dataset given) a version whose card says ``text2text``."""
    from ..data.text2text import is_text2text_task

    if is_text2text_task(task) or prompt_column is not None:
        return True
    if task is None and dataset is None and ref is not None:
        adapter = ws.load_adapter(ws.resolve(ref))
        return "text2text" in (adapter.card or {})
    return False


def _eval_data(task: str | None, dataset: str | None, prompt_column: str, response_column: str) -> Text2TextData:
    from ..data.text2text import resolve_text2text

    return resolve_text2text(task, dataset, prompt_column=prompt_column, response_column=response_column)


def evaluate_text2text(ws: Workspace, ref: str | None, task: str | None = None, dataset: str | None = None,
                       split: str = "test", model_dir: str | Path | None = None, *, prompt_column: str = "prompt",
                       response_column: str = "response", batch_size: int = 32, max_examples: int | None = None,
                       max_length: int = 256, max_new_tokens: int | None = None, device: str = "auto",
                       dtype: str = "fp32", record: bool = True, deployment: str | None = None,
                       chat_template: bool | None = None,
                       progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> GenEvalResult:
    """Rouge-L and exact match of a version (or a model folder) generating on a text-to-text split.

    Takes: as :func:`adapterhub.evaluation.scoring.evaluate`, plus the prompt/response columns of a
    dataset, the generation budget (default: the adapter card's, else 32) and whether to lay prompts out
    with the chat template (default: the adapter card's format, else when the tokenizer has one).
    Records ``<prefix><split>_rougeL``, ``_exact_match`` and ``_n`` on the version (prefix empty for
    its own task, ``<task>/`` otherwise; source ``eval`` or ``deployment:<name>``).
    Returns: GenEvalResult. Raises: RefError, DataError, TrainingError (one line each).
    """
    from ..apply.patching import apply_adapter
    from ..training.loop import dataset_task_name
    from ..training.model import DTYPES, load_backbone, load_tokenizer, model_kind, resolve_device
    from ..training.sft import SFTBatcher
    from .scoring import model_folder, underlying_versions

    version = ws.resolve(ref) if ref is not None else None
    adapter = ws.load_adapter(version) if version is not None else None
    card = (adapter.card or {}) if adapter is not None else {}
    if task is None and dataset is None:
        from ..data.text2text import is_text2text_task

        if version is not None and is_text2text_task(version.task):
            task = version.task
        else:
            raise DataError("give a text-to-text task or a dataset (the version's task is not a built-in one)",
                            keywords=("task", "dataset"))
    path = model_folder(ws, version, model_dir)
    if model_kind(path) != "causal-lm":
        raise TrainingError(f"text-to-text evaluation needs a causal LM; {path} is not one")
    data = _eval_data(task, dataset, prompt_column, response_column)
    rows = data.split(split)
    split_size = len(rows)
    if max_examples:
        rows = rows[:max_examples]
    t2t = card.get("text2text") if isinstance(card.get("text2text"), dict) else {}
    if max_new_tokens is None:
        mnt = t2t.get("max_new_tokens") if isinstance(t2t, dict) else None
        max_new_tokens = int(mnt) if isinstance(mnt, int) and 0 < mnt <= 4096 else 32
    if chat_template is None and isinstance(card.get("prompt"), dict) and card["prompt"].get("format") in ("chat",
                                                                                                          "plain"):
        chat_template = card["prompt"]["format"] == "chat"
    if progress is not None:
        progress(0, len(rows), {"phase": "loading"})
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise TrainingError(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    model = load_backbone(path, "causal-lm", DTYPES[dtype], dev)
    if version is not None and model_dir is None:
        for below in underlying_versions(ws, version):
            apply_adapter(model, ws.load_adapter(below))
        assert adapter is not None
        apply_adapter(model, adapter)
    batcher = SFTBatcher(load_tokenizer(path), max_length, chat_template)
    on_batch = None if progress is None else (lambda done, total: progress(done, total, {"phase": "generating"}))
    preds = generate(model, batcher, [p for p, _ in rows], max_new_tokens=max_new_tokens, batch_size=batch_size,
                     on_batch=on_batch)
    scores = score_generations(preds, [r for _, r in rows])
    task_label = task if task is not None else dataset_task_name(dataset or "")
    prefix = "" if (version is not None and task_label == version.task) else f"{task_label}/"
    source = f"deployment:{deployment}" if deployment else "eval"
    names = {"rougeL": f"{prefix}{split}_rougeL", "exact_match": f"{prefix}{split}_exact_match",
             "n": f"{prefix}{split}_n"}
    shown = f"deployment:{deployment}/" if deployment else ""
    full = len(rows) == split_size
    data_hash = data.fingerprint()
    if record and version is not None:
        scorer = (f"adapterhub.evaluation.generation:greedy:{dtype}:max_new_tokens={max_new_tokens}:"
                  f"format={batcher.format}")
        ws.record_metrics(version.ref, {names["rougeL"]: scores["rougeL"], names["exact_match"]: scores["exact_match"],
                                        names["n"]: len(rows)}, source=source, full=full, dataset_hash=data_hash,
                          scorer=scorer)
    examples = [{"prompt": p, "reference": r, "prediction": g} for (p, r), g in list(zip(rows, preds, strict=True))[:3]]
    return GenEvalResult(version.ref if version else None, task_label, split, scores["rougeL"],
                         scores["exact_match"], len(rows), str(path), {k: shown + v for k, v in names.items()}, full,
                         source, data_hash, max_new_tokens, examples)

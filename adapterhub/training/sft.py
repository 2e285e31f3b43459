"""Supervised fine-tuning (SFT) of causal LMs on prompt → response pairs, with any registered trainer.

The sparse adapter (every mask method, density, element or block granularity, the values-only phase),
the LoRA and the full fine-tuning baselines all train through the one :class:`~adapterhub.training.loop.Trainer`
loop; only the batches differ from label scoring:

* **format**: with a chat template (the base tokenizer has one, e.g. SmolLM2-Instruct) the prompt is the
  template's user turn plus the assistant header (``add_generation_prompt``); without one it is
  ``BOS + prompt + "\\n"``. The response follows, then the EOS token (the end of the assistant turn), so
  the model learns to stop;
* **loss mask**: labels are ``-100`` on every prompt and padding position, so the loss is the mean
  negative log-likelihood of the response tokens (and EOS) only — computed by
  :meth:`~adapterhub.training.model.SparseDeltaModel.loss`, as for label scoring;
* **truncation**: the response keeps at most half of ``max_length`` tokens, the prompt's text is cut
  (from its end, the template kept whole) to fit the rest;
* **length bucketing**: each epoch's seeded permutation is cut into windows of ``BUCKET_WINDOW``
  batches, each window sorted by length and cut into batches, and the batches shuffled (the short last
  batch stays last), so a batch pads little.

:func:`train_sft_adapter` trains and packages a sparse adapter (no catalog), :func:`train_sft` registers
it, :func:`fit_sft` is the shared fit used by the baselines and the studies.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import format as fmt
from ..data.text2text import Pair, Text2TextData
from ..errors import TrainingError
from .config import TrainConfig
from .distributed import rank_and_world
from .loop import ProgressFn, Trainer, _tail_mean, dataset_task_name, get_trainer, validate_config, with_validation
from .model import DEFAULT_TARGETS, SparseDeltaModel, label_token_logprobs, load_tokenizer, position_limit
from .packaging import build_adapter

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..workspace import Workspace

__all__ = ["BUCKET_WINDOW", "SFTBatcher", "SFTResult", "fit_sft", "patched_weights", "response_loss", "train_sft",
           "train_sft_adapter"]

BUCKET_WINDOW = 16  # batches per length-sorted window
PLAIN_SEPARATOR = "\n"


class SFTBatcher:
    """Tokenises ``(prompt, response)`` pairs for a causal LM: training batches with the response-only loss
    mask, left-padded prompt batches for generation.

    Takes the tokenizer (with a pad token, :func:`~adapterhub.training.model.load_tokenizer`), the token
    budget, whether to use the tokenizer's chat template (``None``: when it has one) and the model's
    position limit, and a system message for the chat template (None: the template's own default; ``""`` an
    empty one, which shortens SmolLM2's prompts by 17 tokens).
    Raises: TrainingError when a chat template is asked for and the tokenizer has none.
    """

    def __init__(self, tokenizer: Any, max_length: int, chat_template: bool | None = None,
                 position_limit: int | None = None, system_prompt: str | None = None) -> None:
        self.tok = tokenizer
        self.system = system_prompt
        self.max_length = min(max_length, position_limit) if position_limit else max_length
        has = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has:
            raise TrainingError("the base tokenizer has no chat template", keywords=("chat_template",))
        self.chat = has if chat_template is None else bool(chat_template)
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise TrainingError("the base tokenizer has no EOS token; responses could not end")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.bos = [] if self.chat or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        self._lengths: dict[Pair, int] = {}

    @property
    def format(self) -> str:
        """``chat`` or ``plain``: how prompts are laid out (recorded in the adapter card)."""
        return "chat" if self.chat else "plain"

    def _render(self, prompt: str) -> list[int]:
        if self.chat:
            system = [] if self.system is None else [{"role": "system", "content": self.system}]
            text = self.tok.apply_chat_template(system + [{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=False)
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self.bos + list(self.tok(prompt + PLAIN_SEPARATOR, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str, room: int | None = None) -> list[int]:
        """The prompt's tokens (template included), its text cut from the end to fit ``room`` tokens
        (default ``max_length``); at least the template is kept."""
        room = self.max_length if room is None else room
        ids = self._render(prompt)
        if len(ids) <= room:
            return ids
        text_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        keep = max(0, len(text_ids) - (len(ids) - room))
        ids = self._render(self.tok.decode(text_ids[:keep]))
        while len(ids) > room and keep > 0:  # decoding and re-encoding may merge tokens differently
            keep -= max(1, (len(ids) - room))
            ids = self._render(self.tok.decode(text_ids[:max(0, keep)]))
        return ids

    def response_ids(self, response: str) -> list[int]:
        """The response's tokens followed by EOS."""
        return list(self.tok(response, add_special_tokens=False)["input_ids"]) + [self.eos]

    def encode(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one pair; labels are ``-100`` on the prompt."""
        resp = self.response_ids(response)[:max(1, self.max_length // 2)]
        prompt_ids = self.prompt_ids(prompt, self.max_length - len(resp))
        return prompt_ids + resp, [-100] * len(prompt_ids) + resp

    def length(self, row: Pair) -> int:
        """Tokens of a pair as :meth:`encode` lays it out (cached)."""
        n = self._lengths.get(row)
        if n is None:
            n = self._lengths[row] = len(self.encode(*row)[0])
        return n

    def batch(self, rows: Sequence[Pair], device: torch.device) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on prompt and padding), right-padded."""
        enc = [self.encode(p, r) for p, r in rows]
        width = max(len(ids) for ids, _ in enc)
        ids_t = torch.full((len(enc), width), self.pad, dtype=torch.long)
        att = torch.zeros((len(enc), width), dtype=torch.long)
        lab = torch.full((len(enc), width), -100, dtype=torch.long)
        for i, (ids, labels) in enumerate(enc):
            ids_t[i, :len(ids)] = torch.tensor(ids)
            att[i, :len(ids)] = 1
            lab[i, :len(labels)] = torch.tensor(labels)
        return {"input_ids": ids_t.to(device), "attention_mask": att.to(device), "labels": lab.to(device)}

    def prompt_batch(self, prompts: Sequence[str], device: torch.device, room: int | None = None
                     ) -> dict[str, torch.Tensor]:
        """Left-padded prompt tokens for generation (``input_ids``, ``attention_mask``)."""
        enc = [self.prompt_ids(p, room) for p in prompts]
        width = max(len(x) for x in enc)
        ids_t = torch.full((len(enc), width), self.pad, dtype=torch.long)
        att = torch.zeros((len(enc), width), dtype=torch.long)
        for i, ids in enumerate(enc):
            ids_t[i, width - len(ids):] = torch.tensor(ids)
            att[i, width - len(ids):] = 1
        return {"input_ids": ids_t.to(device), "attention_mask": att.to(device)}

    def bucketed_order(self, rows: Sequence[Pair], batch_size: int) -> Any:
        """An order function for :attr:`Trainer.order_fn`: length-bucketed epochs (module docstring)."""
        def order(gen: torch.Generator) -> list[int]:
            perm = torch.randperm(len(rows), generator=gen).tolist()
            window = batch_size * BUCKET_WINDOW
            batches: list[list[int]] = []
            for start in range(0, len(perm), window):
                chunk = sorted(perm[start:start + window], key=lambda i: self.length(rows[i]))
                batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
            last = batches.pop() if batches and len(batches[-1]) < batch_size else None
            shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            if last is not None:
                shuffled.append(last)
            return [i for b in shuffled for i in b]
        return order


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the positions whose label is not ``-100`` (next-token shifted): the SFT loss."""
    ntok = (labels[:, 1:] != -100).sum().clamp(min=1)
    return -label_token_logprobs(logits, labels).sum() / ntok


@contextlib.contextmanager
def patched_weights(sdm: SparseDeltaModel) -> Iterator[torch.nn.Module]:
    """The backbone with each target's effective weight ``W + Δ`` written in (for ``generate``), the base
    weights restored bit for bit on exit. LoRA/full baselines (no deltas) are yielded as they are."""
    saved = {}
    with torch.no_grad():
        for k in sdm.targets:
            if k in sdm.dense or k in sdm.values:
                saved[k] = sdm.weights[k].detach().clone()
                sdm.weights[k].copy_(sdm.effective(k).detach())
    try:
        yield sdm.backbone
    finally:
        with torch.no_grad():
            for k, w in saved.items():
                sdm.weights[k].copy_(w)


@dataclass
class SFTResult:
    """A trained SFT model (any trainer), its batcher, metrics and the data it used."""

    trainer: Trainer
    batcher: SFTBatcher
    data: Text2TextData
    metrics: dict[str, Any]


@torch.no_grad()
def validation_loss(sdm: SparseDeltaModel, batcher: SFTBatcher, rows: Sequence[Pair], batch_size: int) -> float:
    """Mean response-token NLL over ``rows`` (token-weighted)."""
    sdm.backbone.eval()
    total, ntok = 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = batcher.batch(rows[i:i + batch_size], sdm.device)
        _, ll = sdm.forward(b)
        total -= float(ll.sum())
        ntok += int((b["labels"][:, 1:] != -100).sum())
    return total / max(1, ntok)


def fit_sft(method: str, base_path: Path, data: Text2TextData, cfg: TrainConfig, *, chat_template: bool | None = None,
            progress: ProgressFn | None = None, eval_generate: int = 0, max_new_tokens: int = 32,
            lora_r: int = 16, system_prompt: str | None = None) -> SFTResult:
    """Train trainer ``method`` (``sparse``, ``lora``, ``full``...) on prompt/response pairs.

    Takes the base folder (a causal LM), the data, the config, whether to use the chat template (None:
    when the tokenizer has one) and its system message (:class:`SFTBatcher`), the progress callback, how many validation rows to generate for Rouge-L
    and exact match after training (0: none), the generation budget and LoRA's rank.
    Returns: SFTResult with metrics ``train_loss``, ``steps``, ``trainable_values``, ``train_seconds``,
    ``steps_per_second``, ``validation_loss`` (and ``validation_rougeL``/``validation_exact_match``).
    Raises: TrainingError (bad config, not a causal LM, no train rows).
    """
    validate_config(cfg)
    cls = get_trainer(method)
    if not data.train:
        raise TrainingError(f"dataset {data.name!r} has no training rows")
    data = with_validation(data, cfg.seed)
    sdm = cls.build_model(base_path, cfg, n_labels=0, lora_r=lora_r)
    if sdm.kind != "causal-lm":
        raise TrainingError(f"text-to-text training needs a causal LM base; {base_path} is a {sdm.kind} model")
    batcher = SFTBatcher(load_tokenizer(base_path), cfg.max_length, chat_template, position_limit(sdm), system_prompt)
    trainer = cls(sdm, data, batcher, cfg, progress)
    trainer.order_fn = batcher.bucketed_order(data.train, cfg.batch_size)
    if sdm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(sdm.device)
    t0 = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {"train_loss": _tail_mean(trainer.losses), "steps": trainer.total,
                               "trainable_values": trainer.trainable_count(), "train_seconds": round(seconds, 3),
                               "steps_per_second": round(trainer.total / seconds, 4) if seconds else None}
    if sdm.device.type == "cuda":
        metrics["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(sdm.device) / 2**20, 1)
    val = data.validation[:cfg.max_eval_examples] if cfg.max_eval_examples else data.validation
    if val:
        metrics["validation_loss"] = validation_loss(sdm, batcher, val, cfg.eval_batch_size)
        metrics["validation_n"] = len(val)
    if eval_generate > 0 and val:
        from .decoding import generate, score_generations

        rows = val[:eval_generate]
        with patched_weights(sdm) as model:
            preds = generate(model, batcher, [p for p, _ in rows], max_new_tokens=max_new_tokens,
                             batch_size=cfg.eval_batch_size)
        scores = score_generations(preds, [r for _, r in rows])
        metrics.update({"validation_rougeL": scores["rougeL"], "validation_exact_match": scores["exact_match"],
                        "validation_generated_n": len(rows)})
    return SFTResult(trainer, batcher, data, metrics)


def train_sft_adapter(base_path: Path, data: Text2TextData, cfg: TrainConfig, *, task_name: str,
                      base_name: str | None = None, base_fingerprint: str | None = None,
                      chat_template: bool | None = None, eval_generate: int = 32, max_new_tokens: int = 32,
                      progress: ProgressFn | None = None) -> tuple[fmt.SparseAdapter, SFTResult]:
    """Train a sparse text-to-text adapter (no catalog) and package it.

    The card records ``model_kind: causal-lm``, the prompt format (``chat``/``plain``), and
    ``text2text`` (generative or verbalised, the answer words, the generation budget).
    Returns: (the adapter, the SFTResult). Raises: TrainingError/DataError/FormatError.
    """
    res = fit_sft("sparse", base_path, data, cfg, chat_template=chat_template, progress=progress,
                  eval_generate=eval_generate, max_new_tokens=max_new_tokens)
    trainer, sdm = res.trainer, res.trainer.sdm
    adapter = build_adapter(sdm, trainer.cfg, kind=sdm.kind, task_name=task_name, labels=res.data.labels,
                            regex=cfg.targets or DEFAULT_TARGETS[sdm.kind], base_name=base_name,
                            base_fingerprint=base_fingerprint, events=trainer.events, data=res.data,
                            world=trainer.world)
    adapter.card["prompt"] = {"format": res.batcher.format,
                              "template": ("chat template user turn -> assistant turn + EOS" if res.batcher.chat
                                           else "{prompt}\\n{response}<eos>")}
    adapter.card["text2text"] = {"generative": res.data.generative, "answers": list(res.data.labels),
                                 "max_new_tokens": max_new_tokens}
    adapter.validate()
    return adapter, res


def train_sft(ws: Workspace, *, base: str, task: str | None = None, dataset: str | None = None,
              name: str | None = None, config: TrainConfig | None = None, prompt_column: str = "prompt",
              response_column: str = "response", chat_template: bool | None = None, max_new_tokens: int = 32,
              progress: ProgressFn | None = None) -> VersionInfo | None:
    """Train a text-to-text sparse adapter on a workspace base and register it as a new version.

    Takes the Workspace, the base name, exactly one of a built-in text-to-text ``task`` or a ``dataset``
    spec (with its prompt/response columns), the adapter name (default ``<task>-<mask>``), the config.
    Returns: the VersionInfo (None on non-zero distributed ranks).
    Raises: AdapterHubError subclasses; nothing is registered when anything fails.
    """
    from ..catalog.names import validate_name
    from ..data.text2text import resolve_text2text

    config = config if config is not None else TrainConfig()
    validate_config(config)
    binfo = ws.get_base(base)
    data = resolve_text2text(task, dataset, prompt_column=prompt_column, response_column=response_column)
    task_name = task or dataset_task_name(dataset or "")
    adapter_name = name or f"{task_name}-{config.mask}"
    validate_name(adapter_name, "adapter name")
    n_gen = min(32, config.max_eval_examples or 32)
    adapter, res = train_sft_adapter(binfo.path, data, config, task_name=task_name, base_name=binfo.name,
                                     base_fingerprint=binfo.fingerprint, chat_template=chat_template,
                                     eval_generate=n_gen, max_new_tokens=max_new_tokens, progress=progress)
    if rank_and_world()[0] != 0:
        return None
    metrics = {k: v for k, v in res.metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    return ws.register(adapter, name=adapter_name, task=task_name, base=binfo.name, kind="expert",
                       metrics=metrics, training_config=res.trainer.cfg.to_json())

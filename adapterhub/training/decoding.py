"""Decoding and scoring of text-to-text models: batched greedy (or sampled) generation, Rouge-L, exact match.

The primitives that SFT's validation (:mod:`adapterhub.training.sft`) and generation-based evaluation
(:mod:`adapterhub.evaluation.generation`) share:

* **Rouge-L**: the F-measure of the ``rougeL`` scorer of the ``rouge-score`` package (Google's
  reference implementation: lower-cased, non-alphanumerics as spaces, no stemming), averaged over rows;
  a fraction in ``[0, 1]`` (the paper's tables show it x100);
* **exact match**: the prediction equals the reference after lower-casing, collapsing whitespace and
  stripping surrounding punctuation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..errors import TrainingError

__all__ = ["PromptBatcher", "exact_match", "generate", "rouge_l", "score_generations"]


class PromptBatcher(Protocol):
    """What :func:`generate` needs of a batcher (:class:`adapterhub.training.sft.SFTBatcher` is one)."""

    tok: Any
    max_length: int
    pad: int
    eos: int

    def prompt_batch(self, prompts: Sequence[str], device: torch.device, room: int | None = None
                     ) -> dict[str, torch.Tensor]: ...

_SCORER: Any = None


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure of one pair (``rouge-score``'s ``rougeL``, no stemming).

    Raises: TrainingError when the ``rouge-score`` package is missing.
    """
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise TrainingError("Rouge-L needs the rouge-score package (pip install rouge-score)") from None
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_SCORER.score(reference, prediction)["rougeL"].fmeasure)


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).strip(" .,!?;:'\"")


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after lower-casing, collapsing whitespace and stripping surrounding punctuation."""
    return _norm(prediction) == _norm(reference)


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean Rouge-L and exact-match rate of aligned predictions and references (``n`` included)."""
    if len(predictions) != len(references):
        raise TrainingError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    if n == 0:
        return {"rougeL": 0.0, "exact_match": 0.0, "n": 0}
    return {"rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / n,
            "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / n,
            "n": n}


@torch.no_grad()
def generate(model: torch.nn.Module, batcher: PromptBatcher, prompts: Sequence[str], *, max_new_tokens: int = 32,
             batch_size: int = 32, sample: bool = False, temperature: float = 1.0, seed: int = 0,
             on_batch: Callable[[int, int], None] | None = None) -> list[str]:
    """Decode a response for each prompt, in the prompts' order.

    Prompts are laid out by ``batcher`` (chat template or plain), sorted by length into batches of
    ``batch_size``, left-padded, and decoded greedily (or sampled at ``temperature`` with a seeded
    generator) for at most ``max_new_tokens`` tokens or until EOS; the decoded text (special tokens
    dropped) is stripped. ``on_batch(done, total)`` after each batch.
    Raises: TrainingError for a non-positive budget.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise TrainingError("max-new-tokens and batch size must be at least 1")
    model.eval()
    device = next(model.parameters()).device
    room = max(1, batcher.max_length)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    if sample:
        torch.manual_seed(seed)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = batcher.prompt_batch([prompts[i] for i in idx], device, room)
        kw: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_k": 0} if sample else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        gen = model.generate(**b, max_new_tokens=max_new_tokens, pad_token_id=batcher.pad,  # type: ignore[operator]
                             eos_token_id=batcher.eos, **kw)
        new = gen[:, b["input_ids"].shape[1]:]
        for j, i in enumerate(idx):
            out[i] = batcher.tok.decode(new[j], skip_special_tokens=True).strip()
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return out

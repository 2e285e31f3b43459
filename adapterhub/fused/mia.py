"""Membership inference: could an attacker tell the forgotten training rows from rows the model never saw?

A loss-threshold attack (Yeom et al. 2018): the attacker scores every row by the model's
confidence in its true label (the negative cross-entropy loss, higher = more member-like) and
calls rows above a threshold "members". Its power is measured over every threshold at once:

* **members** are the forgotten training rows (the rows the global model was trained on and the
  unlearned model must not betray);
* **non-members** are held-out rows from the same distribution (the forgotten class's test rows,
  test rows matching a client's label mix, backdoored test rows for a backdoor) — never trained on
  by any model in the comparison;
* **AUC** is the probability that a random member scores above a random non-member (ties count
  half; 0.5 = the attacker learns nothing), and **TPR at 1% FPR** the share of members caught at
  the threshold that wrongly accuses 1% of non-members (Carlini et al. 2022's low-FPR view).

Unlearning succeeds on this metric when the unlearned model's AUC on the forgotten rows is close to
that of a model retrained without them. The attack needs no shadow models, so it measures the
target model, not a stand-in.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .federated import Example, FedModel

__all__ = ["MembershipResult", "auc", "loss_scores", "membership", "tpr_at_fpr"]


def loss_scores(model: FedModel, state: Mapping[str, torch.Tensor], rows: Sequence[Example],
                batch_size: int = 64) -> list[float]:
    """Per row, the model's log-probability of the true label (``-loss``; higher = more member-like)."""
    if not rows:
        return []
    probs = model.predict_proba(state, rows, batch_size).double().clamp(min=1e-300)
    gold = torch.tensor([lab for _, lab in rows])
    return [float(x) for x in probs.gather(1, gold.view(-1, 1)).log().view(-1)]


def auc(members: Sequence[float], nonmembers: Sequence[float]) -> float:
    """P(member score > non-member score) + ½·P(equal): the Mann-Whitney AUC, exact, O(n log n)."""
    if not members or not nonmembers:
        raise ValueError("AUC needs at least one member and one non-member score")
    pooled = sorted([(s, 1) for s in members] + [(s, 0) for s in nonmembers])
    rank_sum = 0.0  # sum of the members' mid-ranks (1-based)
    i = 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        mid = (i + 1 + j) / 2.0
        rank_sum += mid * sum(1 for k in range(i, j) if pooled[k][1] == 1)
        i = j
    m, n = len(members), len(nonmembers)
    return (rank_sum - m * (m + 1) / 2.0) / (m * n)


def tpr_at_fpr(members: Sequence[float], nonmembers: Sequence[float], fpr: float = 0.01) -> float:
    """Share of members scoring strictly above the threshold that at most ``fpr`` of non-members exceed.

    The threshold is the ``ceil(fpr·n)``-th highest non-member score (so with fewer than 100
    non-members, 1% FPR means "above every non-member").
    """
    if not members or not nonmembers:
        raise ValueError("TPR needs at least one member and one non-member score")
    ranked = sorted(nonmembers, reverse=True)
    allowed = int(math.floor(fpr * len(ranked)))  # non-members allowed above the threshold
    threshold = ranked[allowed] if allowed < len(ranked) else -math.inf
    return sum(1 for s in members if s > threshold) / len(members)


@dataclass(frozen=True)
class MembershipResult:
    """The attack's power on one model: AUC, TPR at 1% FPR, and how many rows each side had."""

    auc: float
    tpr_at_1pct_fpr: float
    members: int
    nonmembers: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def membership(model: FedModel, state: Mapping[str, torch.Tensor], members: Sequence[Example],
               nonmembers: Sequence[Example], batch_size: int = 64) -> MembershipResult | None:
    """Run the loss-threshold attack on ``model + state``; None when either side has no rows."""
    if not members or not nonmembers:
        return None
    ms = loss_scores(model, state, members, batch_size)
    ns = loss_scores(model, state, nonmembers, batch_size)
    return MembershipResult(round(auc(ms, ns), 6), round(tpr_at_fpr(ms, ns, 0.01), 6), len(ms), len(ns))

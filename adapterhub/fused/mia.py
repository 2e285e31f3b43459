"""Membership inference: did a model see these training rows? (FUSED's MIA metric).

A shadow-model attack on output confidences (Shokri et al. 2017, kept small): shadow models are
the frozen base encoder with a linear head trained on one half of held-out rows (members) and not
on the other half (non-members); a logistic-regression attack learns "member" from the shadows'
softmax confidences. :mod:`adapterhub.fused.unlearning` reports its success on the forgotten
training rows (lower after unlearning is better).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UnlearningError
from ..training.config import FedConfig, default_of
from .federated import Example, FedModel

__all__ = ["MembershipAttack", "attack_features"]


def attack_features(probs: torch.Tensor, labels: torch.Tensor) -> Any:
    """The attack's features per row: sorted probabilities, the true label's probability, its
    negative log, and the entropy (a float64 numpy array, one row per example)."""
    import numpy as np

    p = probs.double().clamp(min=1e-12)
    top = torch.sort(p, dim=-1, descending=True).values
    true = p.gather(1, labels.view(-1, 1))
    ent = -(p * p.log()).sum(-1, keepdim=True)
    return np.concatenate([top.numpy(), true.numpy(), (-true.log()).numpy(), ent.numpy()], axis=1)


class MembershipAttack:
    """Shadow-model membership inference on output confidences (Shokri et al. 2017, kept small).

    Shadow models are the frozen base encoder with a linear head trained on one half of held-out
    rows (members) and not on the other half (non-members); an attack classifier (logistic
    regression) learns "member" from the shadows' softmax confidences. Its success on the target
    is the fraction of forgotten training rows it calls members.
    """

    def __init__(self, base_path: Path, n_labels: int, held_out: Sequence[Example], *,
                 max_length: int = default_of(FedConfig, "max_length"),
                 seed: int = 0, n_shadow: int = 2, epochs: int = 300) -> None:
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        if len(held_out) < 8:
            raise UnlearningError("too few held-out rows to train shadow models for the membership attack")
        shadow = FedModel(base_path, n_labels, max_length=max_length, seed=seed)
        feats = shadow.pooled(held_out)
        gold = torch.tensor([lab for _, lab in held_out])
        xs, ys = [], []
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_shadow):
            perm = torch.randperm(len(held_out), generator=g)
            half = len(held_out) // 2
            inn, out = perm[:half], perm[half:]
            head = torch.nn.Linear(feats.shape[1], n_labels)
            opt = torch.optim.Adam(head.parameters(), lr=0.01)
            for _ in range(epochs):
                loss = torch.nn.functional.cross_entropy(head(feats[inn]), gold[inn])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                probs = torch.softmax(head(feats), -1)
            xs += [attack_features(probs[inn], gold[inn]), attack_features(probs[out], gold[out])]
            ys += [np.ones(len(inn)), np.zeros(len(out))]
        self.clf = LogisticRegression(max_iter=1000).fit(np.concatenate(xs), np.concatenate(ys))

    def success(self, probs: torch.Tensor, labels: Sequence[int]) -> float | None:
        """Fraction of rows (given the target's probabilities on them) the attack calls members."""
        if len(labels) == 0:
            return None
        x = attack_features(probs, torch.tensor(list(labels)))
        return float(self.clf.predict(x).mean())

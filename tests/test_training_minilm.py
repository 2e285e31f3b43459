"""Slow: the shipped MiniLM learns movie-review sentiment well above chance in a short CPU run."""
from __future__ import annotations

import pytest
import torch

from adapterhub.evaluation import evaluate
from adapterhub.training import TrainConfig, train


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a few minutes alone; much longer on a shared 2-core machine
def test_minilm_rt_sentiment_clearly_above_chance(ws):
    torch.set_num_threads(2)
    ws.add_base("minilm", "minilm")
    cfg = TrainConfig(steps=300, select_steps=50, reselect_every=50, batch_size=16, max_length=64, lr=1e-3,
                      density=0.05, seed=0, max_eval_examples=200)
    info = train(ws, base="minilm", task="rt-sentiment", name="rt", config=cfg)
    r = evaluate(ws, info.ref, task="rt-sentiment", split="test")
    print(f"MiniLM rt-sentiment: validation {info.metrics['validation_accuracy']:.4f}, "
          f"test {r.accuracy:.4f} on {r.n} rows, {info.metrics['train_seconds']:.0f} s")
    assert r.n == 486
    assert r.accuracy >= 0.68  # chance is ~0.5 (1920 rotten / 1971 fresh in train)
    assert info.nnz == sum(max(1, round(0.05 * 384 * 384)) for _ in range(18))

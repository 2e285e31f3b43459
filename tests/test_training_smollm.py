"""Slow: the shipped SmolLM2 GGUF becomes a plain float folder that trains as a causal LM."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from adapterhub.bases.smollm import materialize_smollm2
from adapterhub.data import TaskData
from adapterhub.training import TrainConfig, train_adapter


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_smollm2_converts_and_trains_text_to_label(tmp_path):
    torch.set_num_threads(2)
    folder = materialize_smollm2(tmp_path / "smollm2")
    assert materialize_smollm2(tmp_path / "smollm2") == folder  # converted once, reused
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.float32
    assert "model.layers.29.self_attn.v_proj.weight" in keys
    rows = [("I loved it, wonderful", 1), ("terrible and boring", 0)] * 8
    data = TaskData("toy", ["negative", "positive"], rows, rows[:4], rows[:4])
    res = train_adapter(folder, data, TrainConfig(steps=3, select_steps=1, reselect_every=1, batch_size=4,
                                                  max_length=24, density=0.01), task_name="toy")
    assert len(res.adapter.params) == 90 and set(res.adapter.params) <= keys
    assert res.adapter.card["model_kind"] == "causal-lm" and not res.adapter.extras

"""Tiny random base models (2 layers, hidden 32) saved as Hugging Face folders, for tests and demos.

torch and transformers are imported when a model is built, not at import time.
"""
from __future__ import annotations

from pathlib import Path


def save_tiny(kind: str, dest: Path, seed: int = 0) -> Path:
    """Save a tiny random model of ``kind`` (``bert``: an encoder; anything else: a Llama decoder) to ``dest``.

    Takes: the kind, the destination folder, the torch seed. Returns: ``dest``.
    """
    import torch
    from transformers import PreTrainedModel  # also fails early, before seeding, when transformers is missing

    torch.manual_seed(seed)
    model: PreTrainedModel
    if kind == "bert":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                             max_position_embeddings=64))
    model.save_pretrained(dest, safe_serialization=True)
    return dest

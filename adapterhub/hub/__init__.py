"""Hugging Face Hub push/pull (client) and model cards (cards)."""

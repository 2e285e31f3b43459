"""Helpers for the training tests: tiny random BERT-like and Llama-like folders with a real
(small) tokenizer, and small CSV datasets. Imported by tests/test_training*.py."""
from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

WORDS_POS = ["good", "great", "fine", "love", "nice", "happy", "best", "fun", "wow", "superb"]
WORDS_NEG = ["bad", "awful", "poor", "hate", "sad", "worst", "boring", "ugly", "dull", "weak"]
FILLER = ["the", "movie", "was", "a", "film", "plot", "it", "and", "so", "very", "is", "this"]


def make_tokenizer(dest: Path) -> None:
    """A WordPiece BERT tokenizer over a tiny vocabulary (fast, offline); every word of the toy rows is in it
    (``tests/test_training.py`` checks none becomes ``[UNK]``)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "label", ":", ".", ","] + WORDS_POS + WORDS_NEG + FILLER
    vocab += ["positive", "negative", "neutral", "rotten", "fresh", "ham", "spam", "x", "y", "z"]
    seen, uniq = set(), []
    for w in vocab:
        if w not in seen:
            seen.add(w)
            uniq.append(w)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.txt").write_text("\n".join(uniq) + "\n")
    # the vocabulary as a mapping: transformers 5 takes ``vocab`` (a ``vocab_file`` keyword is ignored there,
    # which left every word [UNK])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(uniq)}, do_lower_case=True)
    tok.save_pretrained(str(dest))


def tiny_model(kind: str, dest: Path, seed: int = 0) -> Path:
    """Save a 2-layer random model (hidden 32, vocab 64) with a tokenizer; returns the folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64)
        model = transformers.BertModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                       bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(dest), safe_serialization=True)
    make_tokenizer(dest)
    return dest


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Separable toy sentiment rows (text, label name)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = [rng.choice(FILLER) for _ in range(4)] + [rng.choice(WORDS_POS if pos else WORDS_NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words), "positive" if pos else "negative"))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()

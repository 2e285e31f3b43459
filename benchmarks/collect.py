"""Assemble docs/benchmarks.md from the fragments each benchmark writes into docs/bench/*.md.

Usage: python benchmarks/collect.py   (run after any benchmark; each fragment holds its own command)
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["format", "catalog", "training", "composer", "hub", "unlearning", "merge_study", "reliability", "demo"]


def main() -> None:
    frags = sorted((ROOT / "docs" / "bench").glob("*.md"),
                   key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    parts = ["# Benchmarks\n",
             "Every figure below was measured by a script in `benchmarks/`, with its anchor (PEFT LoRA, PEFT SHiRA,",
             "dense merging, raw `huggingface_hub` calls, retraining...) measured in the same run; each section gives",
             "the exact command. Machine unless stated otherwise: 2 CPU cores, 24 GiB RAM, no GPU, shared with other",
             "work while measuring, so absolute times are pessimistic; the ratios are the point.",
             "Regenerate this page with `python benchmarks/collect.py`.\n",
             "Sections: " + ", ".join(f"[{p.stem}](#{p.stem})" for p in frags) + "\n"]
    for p in frags:
        text = p.read_text().strip()
        parts.append(f'<a id="{p.stem}"></a>\n\n{text}\n')
    (ROOT / "docs" / "benchmarks.md").write_text("\n".join(parts))
    print(f"docs/benchmarks.md: {len(frags)} sections")


if __name__ == "__main__":
    main()

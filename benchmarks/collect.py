"""Assemble docs/benchmarks.md from the fragments the benchmarks write into docs/bench/*.md.

Usage: python benchmarks/collect.py           (rewrite docs/benchmarks.md)
       python benchmarks/collect.py --check   (exit 1 if docs/benchmarks.md is not what the fragments give)

Each fragment holds its own command and figures; the page is only their concatenation in ORDER, with links
rebased from docs/bench/ to docs/. A fragment that is neither in ORDER nor in DETAILS is an error, so a new
benchmark's figures cannot be left off the page unnoticed. Edit a fragment, never the page.
"""
from __future__ import annotations

import argparse
import posixpath
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "bench"
PAGE = ROOT / "docs" / "benchmarks.md"
# the page's sections, in reading order (docs/bench/<stem>.md)
ORDER = ["catalog", "training", "composer", "deploy_scale", "scale", "scale_8b", "register_floor", "hub", "cli_startup",
         "unlearning_summary", "merge_study", "generative_study", "generative_study_long", "reliability", "ui", "demo"]
# full result tables a section links to instead of inlining (too long for the page)
DETAILS = {"unlearning"}
HEADER = [
    "# Benchmarks\n",
    "Every figure below was measured by a script in `benchmarks/` (or `studies/`), with its anchor (PEFT LoRA,",
    "PEFT SHiRA, dense merging, raw `huggingface_hub` calls, retraining...) measured in the same run; each section",
    "gives the exact command. Machine unless stated otherwise: 2 CPU cores, 24 GiB RAM, no GPU, shared with other",
    "work while measuring, so absolute times are pessimistic; the ratios are the point.",
    "This page is assembled from `docs/bench/*.md` by `python benchmarks/collect.py` (a test checks it is).\n",
]
_LINK = re.compile(r"(\]\()(?!https?:|mailto:|#|/)([^)\s]+)")


def rebase(text: str) -> str:
    """Relative link and image targets of a fragment (relative to docs/bench/) made relative to docs/."""
    return _LINK.sub(lambda m: m.group(1) + posixpath.normpath("bench/" + m.group(2)), text)


def assemble() -> str:
    """The page the fragments give. Raises SystemExit naming fragments missing from or unknown to ORDER."""
    present = {p.stem for p in BENCH.glob("*.md")}
    unknown = sorted(present - set(ORDER) - DETAILS)
    if unknown:
        raise SystemExit(f"docs/bench/ fragments in neither ORDER nor DETAILS of benchmarks/collect.py: {unknown}")
    stems = [s for s in ORDER if s in present]
    parts = [*HEADER, "Sections: " + ", ".join(f"[{s}](#{s})" for s in stems) + "\n"]
    for s in stems:
        parts.append(f'<a id="{s}"></a>\n\n{rebase((BENCH / f"{s}.md").read_text().strip())}\n')
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is stale")
    a = ap.parse_args(argv)
    text = assemble()
    if a.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print("docs/benchmarks.md is not what docs/bench/*.md give: run python benchmarks/collect.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"docs/benchmarks.md: {text.count('<a id=')} sections")
    return 0


if __name__ == "__main__":
    sys.exit(main())

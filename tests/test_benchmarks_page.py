"""docs/benchmarks.md is exactly what the fragments in docs/bench/ give (benchmarks/collect.py), and its links
resolve: figures are edited in one place, and a page assembled from fragments cannot point nowhere."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_page_is_the_fragments_assembled() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "collect.py"), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_links_and_images_of_the_page_resolve() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', page))
    targets = re.findall(r"\]\(([^)\s]+)\)", page)
    assert targets
    for t in targets:
        if t.startswith(("http://", "https://")):
            continue
        if t.startswith("#"):
            assert t[1:] in anchors, t
            continue
        path = t.split("#", 1)[0]
        assert (ROOT / "docs" / path).is_file(), t

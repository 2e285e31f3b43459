"""The catalog/format benchmark scripts still run (tiny sizes; no timings asserted, only that they work)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_format_bytes_smoke():
    out = _run("benchmarks/format_bytes.py", "--shapes", "64x512", "--densities", "0.01,0.5", "--repeat", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 64x512")]
    assert len(rows) == 2 and all("| 2.000 | 8.000 | 8.000 | 4.00x |" in r for r in rows)


def test_catalog_scale_smoke():
    out = _run("benchmarks/catalog_scale.py", "--n", "300", "--n-small", "150", "--repeat", "2")
    assert "lineage, 100 deep" in out and "hop-by-hop" in out

"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is on sys.path)."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of ``repeat`` calls of ``fn``, in seconds."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is on sys.path)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable


def median_seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of ``repeat`` calls of ``fn``, in seconds."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def write_section(md_path: Path, marker: str, body: str, *, title: str = "") -> None:
    """Put ``body`` between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` in ``md_path``, replacing what
    was there (or appending the block; a new file starts with ``title``). Text outside the markers is kept."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    body = body.strip()
    if body.startswith(begin):
        body = body[len(begin):]
    if body.endswith(end):
        body = body[:-len(end)]
    block = f"{begin}\n{body.strip()}\n{end}"
    text = md_path.read_text() if md_path.exists() else title
    if begin in text and end in text.split(begin, 1)[1]:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(text)


def first_apply_seconds(target: Any, adapter: Any, device: str) -> float:
    """Time one in-memory ``apply_adapter`` on ``target`` (off the CPU it also moves the adapter's indices and
    values to the device, once), then revert it; the device is synchronised before each clock reading."""
    import torch

    from adapterhub.apply.patching import apply_adapter, revert

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    rec = apply_adapter(target, adapter)
    sync()
    first = time.perf_counter() - t0
    revert(target, rec)
    sync()
    return first

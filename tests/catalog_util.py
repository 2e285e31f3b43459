"""Helpers shared by the catalog tests: random adapters for the tiny bases, snapshots, a catalog_url fixture."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable

import pytest
import torch

from adapterhub import format as fmt

BERT_TARGETS = {
    "encoder.layer.0.attention.self.query.weight": (32, 32),
    "encoder.layer.0.attention.self.value.weight": (32, 32),
    "encoder.layer.1.intermediate.dense.weight": (64, 32),
    "encoder.layer.1.output.dense.weight": (32, 64),
}
LLAMA_TARGETS = {
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 64),
    "model.layers.1.self_attn.v_proj.weight": (16, 32),
    "model.layers.1.mlp.up_proj.weight": (64, 32),
}


def make_adapter(targets: dict[str, tuple[int, ...]] = BERT_TARGETS, *, density: float = 0.1, seed: int = 0,
                 dtype: torch.dtype = torch.float32, block: int | None = None, card: dict | None = None,
                 extras: dict[str, torch.Tensor] | None = None, scale: float = 0.05) -> fmt.SparseAdapter:
    """A random adapter over ``targets`` (element layout, or ``block`` x ``block`` tiles)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in targets.items():
        numel = 1
        for s in shape:
            numel *= s
        if block is None:
            k = max(1, int(round(density * numel)))
            idx = torch.randperm(numel, generator=g)[:k].sort().values
            vals = (torch.randn(k, generator=g) * scale).to(dtype)
            params[name] = fmt.SparseParam(shape, idx, vals)
        else:
            rows = numel // shape[-1]
            nb = (rows // block) * (shape[-1] // block)
            k = max(1, int(round(density * nb)))
            idx = torch.randperm(nb, generator=g)[:k].sort().values
            vals = (torch.randn(k, block, block, generator=g) * scale).to(dtype)
            params[name] = fmt.SparseParam(shape, idx, vals, block_size=block)
    return fmt.SparseAdapter(params, extras or {}, card or {"mask": {"method": "random"}})


def write_adapter(path: Path, **kw) -> Path:
    fmt.save_file(make_adapter(**kw), path)
    return path


def home_snapshot(home: Path, db_url: str | None = None) -> tuple[list[tuple[str, int]], dict[str, list]]:
    """(every file under the home except SQLite's WAL/SHM side files, with sizes; every catalog row)."""
    files = []
    for root, _dirs, names in os.walk(home):
        for n in names:
            p = Path(root) / n
            if n.endswith(("-wal", "-shm")) or "_hf" in p.parts:
                continue
            files.append((str(p.relative_to(home)), p.stat().st_size))
    rows: dict[str, list] = {}
    from sqlalchemy import create_engine, inspect, text

    url = db_url or f"sqlite:///{home / 'catalog.db'}"
    if url.startswith("sqlite") and not (home / "catalog.db").exists():
        return sorted(files), rows
    eng = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with eng.connect() as c:
            for t in sorted(inspect(c).get_table_names()):
                rows[t] = sorted(json.dumps(list(r), default=str) for r in c.execute(text(f'SELECT * FROM "{t}"')))
    finally:
        eng.dispose()
    return sorted(files), rows


def apply_dense(model: torch.nn.Module, adapter: fmt.SparseAdapter) -> None:
    """Reference apply for tests: add each delta into the matching parameter (in the weight's dtype)."""
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in adapter.params.items():
            w = sd[name]
            idx, vals = p.flat()
            flat = w.data.view(-1)
            flat[idx] = flat[idx] + vals.to(w.dtype)


def all_commands(group, prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
    import click

    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))


@pytest.fixture(params=["sqlite", "postgres"])
def catalog_url(request, home):
    """A catalog database URL: SQLite in the test's home, or a fresh PostgreSQL database (skips without a server)."""
    if request.param == "sqlite":
        home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{home / 'catalog.db'}"
    return request.getfixturevalue("pg_url")


def hand_mask_hash(adapter: fmt.SparseAdapter) -> str:
    """The mask-hash definition (2) written out independently of adapterhub/maskhash.py (struct, no numpy): a
    prefix line, then per name in sorted order ``json([name, shape, count, escapes])`` and a newline, every gap
    between sorted flat indices (from -1) as little-endian uint16 (0 when it is 65536 or more), then those
    large gaps as little-endian int64."""
    h = hashlib.sha256(b"adapterhub.mask-hash/2\n")
    for name in sorted(adapter.params):
        p = adapter.params[name]
        prev, gaps, esc = -1, [], []
        for i in p.flat()[0].tolist():
            gaps.append(i - prev if i - prev < 65536 else 0)
            if i - prev >= 65536:
                esc.append(i - prev)
            prev = i
        h.update(json.dumps([name, list(p.shape), len(gaps), len(esc)]).encode() + b"\n")
        h.update(b"".join(struct.pack("<H", g) for g in gaps) + b"".join(struct.pack("<q", e) for e in esc))
    return h.hexdigest()

"""What `register` of a canonical file costs next to its anchor and next to the durable work it cannot skip.

Issue 19's target is register <= 1.2x a plain sha256 + copy + fsync of the file (the anchor of
``benchmarks/scale.py``). Register does more durable work than the anchor: the blob goes to the store
atomically (temp file, fsync, rename, fsync of the folder) and the version is a committed catalog row. This
script measures, in one process and interleaved (one of each per round, so they share the machine's
conditions), the medians of:

* ``register``: ``Workspace.register(file)`` (the version is then removed and collected, untimed);
* ``anchor``: read + sha256 + write + fsync of a copy (``scale._copy_hash_fsync``);
* ``sha256``: the content hash of the bytes alone;
* ``blob_write``: ``BlobStore.put_bytes`` of the bytes (hash given) into a scratch store on the same file system;
* ``sqlite_commit``: one ``INSERT`` of an adapter row + ``COMMIT`` into this catalog with the catalog's own
  settings (WAL, ``synchronous=FULL``: the commit is fsynced) through the plain ``sqlite3`` module;
* ``orm_commit``: the same row through the catalog's SQLAlchemy session (add, commit);
* ``validate``: ``format.load_canonical`` + ``ScannedAdapter.canonical_with`` (the checks, in memory).

``floor`` = sha256 + blob_write + sqlite_commit: a register that hashed the file, stored it durably and committed
one row, and did nothing else. Prints one JSON document; touches no docs.

Usage: ``python benchmarks/register_floor.py [--sizes 135m,1.1b] [--densities 0.01,0.001] [--repeat 31]``
(after ``benchmarks/scale.py`` made its checkpoints, homes and files under ``--work``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale  # the anchor is scale.py's own


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(work: Path, size: str, density: str, repeat: int) -> dict[str, Any]:
    """Interleaved medians (seconds) for one file; see the module docstring."""
    import torch

    torch.set_num_threads(1)
    from adapterhub import format as fmt
    from adapterhub.catalog.models import Adapter, BaseModel
    from adapterhub.store import BlobStore
    from adapterhub.workspace import Workspace

    home = work / f"home-{size}"
    f = work / f"adapter-{size}-{density}-register.safetensors"
    data = f.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    ws = Workspace.open(home)
    scratch = Path(tempfile.mkdtemp(dir=work, prefix="floor-"))
    store = BlobStore(scratch / "blobs")
    copy_to = scratch / "anchor-copy.safetensors"
    db_path = ws.engine.url.database
    if not db_path:
        raise SystemExit("register_floor.py needs a SQLite catalog")
    raw = sqlite3.connect(db_path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute("PRAGMA foreign_keys=ON")
    with ws.session() as s:
        base_id = s.query(BaseModel.id).filter(BaseModel.name == "b").scalar()

    def register() -> float:
        t0 = time.perf_counter()
        v = ws.register(f, name="reg", task="t", base="b")
        t = time.perf_counter() - t0
        ws.remove(v.ref)  # untimed
        ws.gc()
        return t

    def sqlite_commit(i: int) -> float:
        t = _timed(lambda: (raw.execute("BEGIN"), raw.execute(
            "INSERT INTO adapters (name, kind, base_id, created_at) VALUES (?, 'expert', ?, ?)",
            (f"floor-probe-{i}", base_id, "2026-01-01 00:00:00.000000")), raw.execute("COMMIT")))
        raw.execute("DELETE FROM adapters WHERE name = ?", (f"floor-probe-{i}",))
        return t

    def orm_commit(i: int) -> float:
        def go() -> None:
            with ws.session() as s:
                s.add(Adapter(name=f"floor-orm-{i}", kind="expert", base_id=base_id))
        t = _timed(go)
        with ws.session() as s:
            s.query(Adapter).filter(Adapter.name == f"floor-orm-{i}").delete()
        return t

    first = fmt.load_canonical(data)
    card = dict(first.card, **_register_card(ws, first.card))  # the card register checks the file against

    def validate() -> None:
        s = fmt.load_canonical(data)
        assert isinstance(s, fmt.ScannedAdapter) and s.canonical_with(card)

    times: dict[str, list[float]] = {k: [] for k in ("register", "anchor", "sha256", "blob_write", "sqlite_commit",
                                                     "orm_commit", "validate")}
    try:
        for i in range(repeat + 1):  # round 0 warms up (imports, caches) and is not kept
            got = {
                "register": register(),
                "anchor": _timed(lambda: scale._copy_hash_fsync(f, copy_to)),
                "sha256": _timed(lambda: hashlib.sha256(data).hexdigest()),
                "blob_write": _timed(lambda: store.put_bytes(data, digest=digest)),
                "sqlite_commit": sqlite_commit(i),
                "orm_commit": orm_commit(i),
                "validate": _timed(validate),
            }
            copy_to.unlink()
            store.delete(digest)
            if i:
                for k, v in got.items():
                    times[k].append(v)
    finally:
        raw.close()
        ws.close()
        shutil.rmtree(scratch)
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["sha256"] + med["blob_write"] + med["sqlite_commit"]
    return {"size": size, "density": density, "bytes": len(data), "repeat": repeat,
            "seconds": {k: round(v, 6) for k, v in med.items()},
            "floor_seconds": round(floor, 6),
            "ratio_register_to_anchor": round(med["register"] / med["anchor"], 3),
            "ratio_floor_to_anchor": round(floor / med["anchor"], 3),
            "ratio_register_to_floor": round(med["register"] / floor, 3)}


def _register_card(ws: Any, card: dict[str, Any]) -> dict[str, Any]:
    """The keys ``register`` puts in the card (base, task, kind), as it would for this benchmark's call."""
    b = ws.get_base("b")
    return {"base": {"name": "b", "fingerprint": b.fingerprint}, "task": card.get("task", "t"),
            "kind": card.get("kind", "expert")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/adapterhub-scale")
    p.add_argument("--sizes", default="135m,1.1b")
    p.add_argument("--densities", default="0.01,0.001")
    p.add_argument("--repeat", type=int, default=31)
    a = p.parse_args()
    out = [measure(Path(a.work), s, d, a.repeat) for s in a.sizes.split(",") for d in a.densities.split(",")]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

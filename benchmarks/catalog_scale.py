"""Catalog latency at scale (SQLite): list --task, show, tag resolution, a 100-deep lineage query.

Builds a catalog with N adapter versions (default 100,000) by bulk-inserting rows through SQLAlchemy Core
(the schema comes from the real Alembic migration via ``Workspace.open``), then times the Workspace API calls
the CLI makes, median over --repeat calls on different (seeded) targets:

* ``list --task T``: ``ws.list_versions(task=T)`` (about N/100 matching rows), and with ``--limit 20``;
* ``show REF``: ``ws.resolve(ref)`` + ``ws.parents(ref)`` (what the command does);
* tag resolution: ``ws.resolve("name@prod")``;
* lineage: ``ws.lineage`` of the end of a 100-deep finetuned_from chain (one recursive CTE).

Anchors measured in the same run: the same queries on a small catalog (--n-small, default 1,000), and the
100-deep lineage walked hop by hop in Python (one query per parent, what the CTE replaces).

Layout of the synthetic catalog: a chain of 101 single-version adapters; the rest are adapters of 10 versions
each (version k finetuned_from k-1), 100 tasks, every 20th adapter a merge, tags ``prod`` and ``candidate``.

Usage:  .venv/bin/python benchmarks/catalog_scale.py [--n 100000] [--n-small 1000] [--repeat 25] [--write]
``--write`` updates the "catalog_scale" section of docs/bench/catalog.md and draws docs/img/catalog_scale.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from sqlalchemy import insert, select

from adapterhub.catalog.models import Adapter, AdapterVersion, BaseModel, LineageEdge, Tag
from adapterhub.workspace import Workspace

CHAIN = 100
PER_ADAPTER = 10
TASKS = 100


def build(home: Path, n: int) -> tuple[Workspace, dict]:
    """Create a catalog with ``n`` versions; returns the workspace and facts about what was inserted."""
    ws = Workspace.open(home)
    t0 = time.perf_counter()
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    targets = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)]
    with ws.engine.begin() as c:
        c.execute(insert(BaseModel), [{"id": 1, "name": "base", "source": "/nonexistent", "architecture": "Bench",
                                       "fingerprint": "0" * 64, "num_params": 1, "created_at": now}])
        adapters, versions, edges, tags = [], [], [], []
        vid = 0
        aid = 0

        def version(aid_: int, number: int, task: str) -> int:
            nonlocal vid
            vid += 1
            versions.append({
                "id": vid, "adapter_id": aid_, "number": number,
                "content_hash": hashlib.sha256(vid.to_bytes(8, "little")).hexdigest(), "size_bytes": 123456,
                "task": task, "mask_method": "connection-sensitivity", "density": 0.01, "granularity": "element",
                "block_size": None, "target_modules": targets, "nnz": 1000, "nnz_per_param": {t: 250 for t in targets},
                "dtype": "fp32", "mask_hash": "1" * 64, "training_config": {"lr": 1e-3, "steps": 100},
                "metrics": {"accuracy": 0.9}, "card": {"task": task}, "created_at": now + dt.timedelta(seconds=vid)})
            return vid

        prev = None
        for i in range(CHAIN + 1):
            aid += 1
            adapters.append({"id": aid, "name": f"chain-{i}", "kind": "expert", "base_id": 1, "created_at": now})
            v = version(aid, 1, "chain")
            if prev is not None:
                edges.append({"child_id": v, "parent_id": prev, "relation": "finetuned_from"})
            prev = v
        left = n - (CHAIN + 1)
        a = 0
        while left > 0:
            aid += 1
            k = min(PER_ADAPTER, left)
            task = f"task-{a % TASKS}"
            adapters.append({"id": aid, "name": f"exp-{a}", "kind": "merge" if a % 20 == 19 else "expert",
                             "base_id": 1, "created_at": now})
            prev = None
            for number in range(1, k + 1):
                v = version(aid, number, task)
                if prev is not None:
                    edges.append({"child_id": v, "parent_id": prev, "relation": "finetuned_from"})
                prev = v
            tags.append({"adapter_id": aid, "name": "prod", "version_id": prev - 1 if k > 1 else prev, "updated_at": now})
            tags.append({"adapter_id": aid, "name": "candidate", "version_id": prev, "updated_at": now})
            left -= k
            a += 1
        B = 20000
        c.execute(insert(Adapter), adapters)
        for i in range(0, len(versions), B):
            c.execute(insert(AdapterVersion), versions[i:i + B])
        for i in range(0, len(edges), B):
            c.execute(insert(LineageEdge), edges[i:i + B])
        for i in range(0, len(tags), B):
            c.execute(insert(Tag), tags[i:i + B])
    with ws.engine.connect() as c:
        c.exec_driver_sql("ANALYZE")
    return ws, {"versions": vid, "adapters": aid, "edges": len(edges), "tags": len(tags), "exp_adapters": a,
                "build_s": time.perf_counter() - t0}


def _median_ms(fn, args: list, repeat: int) -> float:
    ts = []
    fn(args[0])  # warm the connection pool and statement cache
    for i in range(repeat):
        x = args[i % len(args)]
        t0 = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def python_walk(ws: Workspace, ref: str) -> int:
    """Anchor: ancestors found one query per hop (what the recursive CTE replaces)."""
    info = ws.resolve(ref)
    hops = 0
    with ws.session() as s:
        frontier = [info.id]
        while frontier:
            nxt = []
            for vid in frontier:
                for pid in s.scalars(select(LineageEdge.parent_id).where(LineageEdge.child_id == vid)):
                    if pid is not None:
                        nxt.append(pid)
                        hops += 1
            frontier = nxt
    return hops


def run_queries(ws: Workspace, facts: dict, repeat: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ea = facts["exp_adapters"]
    tasks = [f"task-{rng.randrange(min(TASKS, ea))}" for _ in range(repeat)]
    refs = [f"exp-{rng.randrange(ea)}@{rng.randint(1, min(PER_ADAPTER, 2))}" for _ in range(repeat)]
    tagrefs = [f"exp-{rng.randrange(ea)}@prod" for _ in range(repeat)]
    tip = f"chain-{CHAIN}@1"
    n_list = len(ws.list_versions(task=tasks[0]))
    assert len(ws.lineage(tip)) == CHAIN and python_walk(ws, tip) == CHAIN
    return {
        "list_task_ms": _median_ms(lambda t: ws.list_versions(task=t), tasks, repeat), "list_rows": n_list,
        "list_task_limit20_ms": _median_ms(lambda t: ws.list_versions(task=t, limit=20), tasks, repeat),
        "show_ms": _median_ms(lambda r: (ws.resolve(r), ws.parents(r)), refs, repeat),
        "tag_ms": _median_ms(lambda r: ws.resolve(r), tagrefs, repeat),
        "lineage100_ms": _median_ms(lambda r: ws.lineage(r), [tip], repeat),
        "lineage100_python_ms": _median_ms(lambda r: python_walk(ws, r), [tip], repeat),
    }


QUERIES = [("list --task (all matches)", "list_task_ms"), ("list --task --limit 20", "list_task_limit20_ms"),
           ("show", "show_ms"), ("resolve name@prod", "tag_ms"), ("lineage, 100 deep (recursive CTE)", "lineage100_ms"),
           ("anchor: lineage walked hop by hop", "lineage100_python_ms")]


def table(small: dict, big: dict, n_small: int, n: int) -> str:
    out = [f"| query | {n_small:,} versions (ms) | {n:,} versions (ms) | ratio |", "|---|---|---|---|"]
    for label, key in QUERIES:
        out.append(f"| {label} | {small[key]:.2f} | {big[key]:.2f} | {big[key] / small[key]:.2f}x |")
    return "\n".join(out)


def plot(small: dict, big: dict, n_small: int, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [q[0].replace(" (recursive CTE)", "\n(CTE)").replace("anchor: ", "anchor:\n") for q in QUERIES]
    xs = range(len(QUERIES))
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [small[k] for _, k in QUERIES], w, label=f"{n_small:,} versions")
    ax.bar([x + w / 2 for x in xs], [big[k] for _, k in QUERIES], w, label=f"{n:,} versions")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("median latency (ms)")
    ax.set_yscale("log")
    ax.set_title("Catalog query latency (SQLite, Workspace API)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="versions in the large catalog")
    ap.add_argument("--n-small", type=int, default=1_000, help="versions in the anchor catalog")
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--write", action="store_true", help="update docs/bench/catalog.md and docs/img/catalog_scale.png")
    a = ap.parse_args(argv)
    if min(a.n, a.n_small) < CHAIN + 1 + PER_ADAPTER:
        ap.error(f"--n and --n-small must be at least {CHAIN + 1 + PER_ADAPTER}")
    results = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ah-catalog-bench-") as tmp:
        for n in (a.n_small, a.n):
            ws, facts = build(Path(tmp) / f"h{n}", n)
            try:
                res = run_queries(ws, facts, a.repeat)
            finally:
                ws.close()
            res.update(facts)
            results[n] = res
            print(f"{n:>8,} versions: built in {facts['build_s']:.1f}s; " + ", ".join(
                f"{k}={v:.2f}" for k, v in res.items() if k.endswith("_ms")), file=sys.stderr)
    small, big = results[a.n_small], results[a.n]
    md = table(small, big, a.n_small, a.n)
    print(md)
    print(f"lineage: recursive CTE {big['lineage100_ms']:.2f} ms vs hop-by-hop {big['lineage100_python_ms']:.2f} ms "
          f"({big['lineage100_python_ms'] / big['lineage100_ms']:.1f}x)")
    if a.write:
        from format_bytes import write_section  # same folder

        args = "" if (a.n, a.n_small, a.repeat) == (100_000, 1_000, 25) else f" --n {a.n} --n-small {a.n_small} --repeat {a.repeat}"
        body = (f"## Catalog latency at scale (catalog_scale)\n\nCommand: `.venv/bin/python benchmarks/catalog_scale.py"
                f"{args} --write` (SQLite, WAL; median of {a.repeat} calls through the Workspace API; "
                f"{os.cpu_count()} CPUs, load average {load:.1f} at the start).\n\n"
                f"Large catalog: {big['versions']:,} versions of {big['adapters']:,} adapters, {big['edges']:,} lineage "
                f"edges, {big['tags']:,} tags (bulk insert {big['build_s']:.1f} s). `list --task` returns "
                f"{big['list_rows']:,} rows at {a.n:,} and {small['list_rows']:,} at {a.n_small:,}.\n\n" + md +
                f"\n\nThe 100-deep lineage as one recursive CTE takes {big['lineage100_ms']:.2f} ms vs "
                f"{big['lineage100_python_ms']:.2f} ms walking it hop by hop "
                f"({big['lineage100_python_ms'] / big['lineage100_ms']:.1f}x).\n\n"
                "![catalog latency](../img/catalog_scale.png)\n")
        write_section(ROOT / "docs" / "bench" / "catalog.md", "catalog_scale", body)
        plot(small, big, a.n_small, a.n, ROOT / "docs" / "img" / "catalog_scale.png")


if __name__ == "__main__":
    main()

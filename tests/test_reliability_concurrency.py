"""Concurrent writers: N processes x M operations against one catalog (SQLite in WAL mode and
PostgreSQL). Every operation must succeed (Workspace retries busy/serialization/unique races with
backoff), version numbers per adapter must be unique and gapless, and no row may be lost.

The worker is this very file run as a script (``python tests/test_reliability_concurrency.py worker
...``) so every writer is a real, separate process with its own connection pool.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
SHARED = "shared-expert"


def _target_tensor(base_dir: Path) -> tuple[str, tuple[int, ...]]:
    """A 2-D tensor of the tiny base (name, shape) to put the adapters' non-zeros in."""
    from safetensors import safe_open

    with safe_open(str(base_dir / "model.safetensors"), "pt") as f:
        for name in sorted(f.keys()):
            shape = tuple(f.get_slice(name).get_shape())
            if len(shape) == 2 and shape[0] >= 16 and shape[1] >= 16 and name.endswith("query.weight"):
                return name, shape
    raise AssertionError("no 2-D query weight in the tiny base")


def make_adapter(tensor: str, shape: tuple[int, ...], seed: int):
    """A small adapter whose content is unique to ``seed`` (first value encodes it exactly)."""
    import torch

    from adapterhub.format import SparseAdapter, SparseParam

    g = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    idx = torch.randperm(numel, generator=g)[:24].sort().values
    vals = torch.randn(24, generator=g)
    vals[0] = float(seed + 1)
    return SparseAdapter({tensor: SparseParam(shape, idx, vals)}, {}, {"mask": {"method": "random"}})


def worker(home: str, db_url: str, worker_id: int, n_ops: int, base: str, base_dir: str, out: str,
           deploy: str | None) -> None:
    """One writer process: n_ops x (register a new version of SHARED, move tags, optional deploy event)."""
    from adapterhub import workspace as api
    from adapterhub.catalog.records import Parent
    from adapterhub.workspace import Workspace

    attempts = [0]
    refusals = [0]
    real_retry = api.retry_on_busy

    def counting_retry(fn, **kw):  # count transaction attempts to show the retries really happen
        def counted():
            attempts[0] += 1
            return fn()
        return real_retry(counted, **kw)

    api.retry_on_busy = counting_retry
    ws = Workspace.open(home, db_url, migrate=False)
    tensor, shape = _target_tensor(Path(base_dir))
    results = []
    errors = []
    own_tag = f"w{worker_id}"
    for i in range(n_ops):
        seed = worker_id * 100_000 + i
        try:
            parents = (Parent(f"{SHARED}@{own_tag}"),) if i else ()
            info = ws.register(make_adapter(tensor, shape, seed), name=SHARED, task="race", base=base,
                               parents=parents, metrics={"worker": worker_id, "op": i})
            ws.tag(info.ref, own_tag)
            ws.tag(info.ref, "hot")  # every writer fights over this one
            # A per-worker adapter too, so that adapter creation races are exercised across processes.
            own = ws.register(make_adapter(tensor, shape, seed + 50_000), name=f"solo-{i % 5}", task="race",
                              base=base)
            dep_event = None
            if deploy is not None:
                dep_event = _deploy_op(ws, deploy, worker_id, i, info.ref, refusals)
            results.append({"op": i, "number": info.number, "hash": info.content_hash, "created": info.created,
                            "solo": [own.name, own.number, own.content_hash], "deploy": dep_event})
        except Exception as e:
            errors.append(f"op {i}: {e.__class__.__name__}: {e}")
    ws.close()
    Path(out).write_text(json.dumps({"results": results, "errors": errors, "attempts": attempts[0],
                                     "refusals": refusals[0]}))


DEPLOY_EVERY = 5


def _deploy_op(ws, deploy: str, worker_id: int, i: int, ref: str, refusals: list[int]):
    """Every DEPLOY_EVERY-th op: apply the new version to the shared deployment, then revert it by ref.

    A revert planned against a stack another process changed meanwhile is refused by the library with
    "changed by another command meanwhile; run it again" (nothing changed); the worker runs it again, as a
    user would, and counts those refusals.
    """
    import random as _random

    from adapterhub.apply import deployments as dep
    from adapterhub.errors import DeploymentError

    if i % DEPLOY_EVERY:
        return None
    dep.apply(ws, deploy, ref)
    for attempt in range(200):
        try:
            dep.revert(ws, deploy, ref)
            return attempt
        except DeploymentError as e:
            if "meanwhile" not in str(e):
                raise
            refusals[0] += 1
            time.sleep(0.01 + 0.05 * _random.random())
    raise AssertionError("revert kept being refused")


def run_writers(home: Path, db_url: str, base_dir: Path, n_procs: int, n_ops: int, deploy: bool = True) -> list[dict]:
    """Set up the catalog (base, shared deployment), start n_procs writers at once, wait, return their docs."""
    from adapterhub.apply import deployments as dep
    from adapterhub.workspace import Workspace

    with Workspace.open(home, db_url) as ws:
        ws.add_base("tiny", str(base_dir))
        if deploy:
            dep.create(ws, "shared-dep", "tiny")
    outs = [home.parent / f"writer-{home.name}-{k}.json" for k in range(n_procs)]
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, str(HERE), "worker", str(home), db_url, str(k), str(n_ops), "tiny",
                               str(base_dir), str(outs[k]), "shared-dep" if deploy else "-"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(n_procs)]
    # a repairer runs alongside the writers the whole time: repair(grace_s=30) must never take a blob a
    # register is about to reference (checked by check_catalog: every version's blob exists and verifies)
    stop = home.parent / f"stop-{home.name}"
    rep_out = home.parent / f"repairer-{home.name}.json"
    repairer = subprocess.Popen([sys.executable, str(HERE), "repairer", str(home), db_url, str(stop), str(rep_out)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    docs = []
    try:
        for p, out in zip(procs, outs, strict=True):
            _, err = p.communicate(timeout=900)
            assert p.returncode == 0, err.decode(errors="replace")[-3000:]
            docs.append(json.loads(out.read_text()))
    finally:
        stop.write_text("stop")
        _, err = repairer.communicate(timeout=300)
    assert repairer.returncode == 0, err.decode(errors="replace")[-3000:]
    rdoc = json.loads(rep_out.read_text())
    assert rdoc["runs"] >= 1 and rdoc["errors"] == [], rdoc
    print(f"repairer ran {rdoc['runs']} times alongside the writers, removed {rdoc['removed']} blobs")
    return docs


def repairer(home: str, db_url: str, stop: str, out: str) -> None:
    """Loop repair(grace_s=30) until ``stop`` exists; record runs and errors."""
    from adapterhub.repair import repair
    from adapterhub.workspace import Workspace

    ws = Workspace.open(home, db_url, migrate=False)
    runs, removed, errors = 0, 0, []
    while True:
        last = Path(stop).exists()
        try:
            rep = repair(ws, grace_s=30)
            runs += 1
            removed += len(rep.removed_blobs)
        except Exception as e:
            errors.append(f"{e.__class__.__name__}: {e}")
        if last:
            break
        time.sleep(0.2)
    ws.close()
    Path(out).write_text(json.dumps({"runs": runs, "removed": removed, "errors": errors}))


def check_catalog(home: Path, db_url: str, docs: list[dict], n_procs: int, n_ops: int) -> None:
    """Every op succeeded, numbers are unique and gapless per adapter, no row lost, tags consistent."""
    from sqlalchemy import func, select

    from adapterhub.catalog.models import Adapter, AdapterVersion, LineageEdge, Tag
    from adapterhub.workspace import Workspace

    errors = [e for d in docs for e in d["errors"]]
    assert not errors, errors[:5]
    assert all(len(d["results"]) == n_ops for d in docs)
    with Workspace.open(home, db_url, migrate=False) as ws:
        with ws.session() as s:
            rows = s.execute(select(Adapter.name, AdapterVersion.number, AdapterVersion.content_hash,
                                    AdapterVersion.id)
                             .join(Adapter, AdapterVersion.adapter_id == Adapter.id)).all()
            by_adapter: dict[str, list[int]] = {}
            for name, number, _, _ in rows:
                by_adapter.setdefault(name, []).append(number)
            for name, numbers in by_adapter.items():
                assert sorted(numbers) == list(range(1, len(numbers) + 1)), f"{name}: gaps or duplicates"
            # no row lost: every version a writer was told about exists with the same number and hash
            have = {(n, num): h for n, num, h, _ in rows}
            shared = [r for d in docs for r in d["results"]]
            assert all(r["created"] for r in shared)
            assert len(by_adapter[SHARED]) == n_procs * n_ops
            assert len({r["number"] for r in shared}) == n_procs * n_ops
            for r in shared:
                assert have[(SHARED, r["number"])] == r["hash"]
                name, num, h = r["solo"]
                assert have[(name, num)] == h
            assert sum(len(v) for k, v in by_adapter.items() if k.startswith("solo-")) == n_procs * n_ops
            # lineage: one edge per non-first op of each worker
            n_edges = s.scalar(select(func.count()).select_from(LineageEdge))
            assert n_edges == n_procs * (n_ops - 1)
            # tags: each worker's own tag points at the last version it registered; "hot" at one of them
            ids = {(n, num): vid for n, num, _, vid in rows}
            tags = {t.name: t.version_id for t in s.scalars(select(Tag))}
            for k, d in enumerate(docs):
                assert tags[f"w{k}"] == ids[(SHARED, d["results"][-1]["number"])]
            assert tags["hot"] in {ids[(SHARED, d["results"][-1]["number"])] for d in docs}
        # every blob referenced exists and verifies, and nothing is orphaned
        rep = ws.verify()
        assert rep["problems"] == [] and rep["orphans"] == []
        assert rep["checked"] == 2 * n_procs * n_ops
        # deploy events: one create + (apply, revert) per deploy op, seq unique and gapless, state back at the base
        from adapterhub.apply import deployments as dep
        from adapterhub.catalog.models import Deployment, DeploymentEvent

        with ws.session() as s:
            d = s.scalar(select(Deployment).where(Deployment.name == "shared-dep"))
            if d is not None:
                seqs = sorted(s.scalars(select(DeploymentEvent.seq).where(DeploymentEvent.deployment_id == d.id)))
                actions = list(s.scalars(select(DeploymentEvent.action).where(DeploymentEvent.deployment_id == d.id)))
                n_dep = n_procs * len(range(0, n_ops, DEPLOY_EVERY))
                assert seqs == list(range(len(seqs))), "deployment event numbers have gaps or duplicates"
                assert actions.count("apply") == n_dep and actions.count("revert") == n_dep
                assert actions.count("create") == 1 and "recover" not in actions
        if d is not None:
            info = dep.get(ws, "shared-dep")
            assert info.stack == [] and info.state_fingerprint == ws.get_base("tiny").fingerprint
            assert dep.verify(ws, "shared-dep")["ok"]
            print(f"deployment: {len(seqs)} events, {sum(x['refusals'] for x in docs)} stale-plan refusals re-run")
    txns = 4 * n_procs * n_ops  # register, tag, tag, register per op
    print(f"{txns} transactions took {sum(d['attempts'] for d in docs)} attempts (retries absorbed the races)")


def test_retry_on_busy_retries_transient_and_fails_cleanly():
    """Busy/locked and unique races are retried; anything else, or exhaustion, is a one-line CatalogError."""
    import sqlite3

    from sqlalchemy.exc import IntegrityError, OperationalError

    from adapterhub.errors import CatalogError
    from adapterhub.workspace import retry_on_busy

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
        if len(calls) == 2:
            raise IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed: x.number"))
        return "ok"

    assert retry_on_busy(flaky, base_delay=0.001) == "ok" and len(calls) == 3

    def fk():
        calls.append(1)
        raise IntegrityError("INSERT", {}, sqlite3.IntegrityError("FOREIGN KEY constraint failed"))

    calls.clear()
    with pytest.raises(CatalogError, match="FOREIGN KEY constraint failed"):
        retry_on_busy(fk, base_delay=0.001)
    assert len(calls) == 1  # not retried

    def always_busy():
        calls.append(1)
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))

    calls.clear()
    with pytest.raises(CatalogError, match="busy after 4 attempts"):
        retry_on_busy(always_busy, attempts=4, base_delay=0.001)
    assert len(calls) == 4


N_PROCS = int(os.environ.get("ADAPTERHUB_RACE_PROCS", "8"))


# The full 8 x 50 takes 40-120 s per database on a shared 2-core machine, so it is `slow`; the default run
# keeps 8 x 15 (same code paths and races, fewer rounds).
OPS = [15, pytest.param(50, marks=pytest.mark.slow)]


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("n_ops", OPS)
def test_concurrent_writers_sqlite_wal(tmp_path, tiny_bert_dir, n_ops):
    """8 processes x n_ops operations on the default SQLite (WAL) catalog."""
    home = tmp_path / "race"
    url = f"sqlite:///{home / 'catalog.db'}"
    t0 = time.perf_counter()
    docs = run_writers(home, url, tiny_bert_dir, N_PROCS, n_ops)
    check_catalog(home, url, docs, N_PROCS, n_ops)
    import sqlite3

    with sqlite3.connect(home / "catalog.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    print(f"sqlite: {N_PROCS}x{n_ops} in {time.perf_counter() - t0:.1f}s")


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.timeout(900)
@pytest.mark.parametrize("n_ops", OPS)
def test_concurrent_writers_postgres(tmp_path, tiny_bert_dir, pg_url, n_ops):
    """8 processes x n_ops operations on PostgreSQL."""
    home = tmp_path / "race-pg"
    t0 = time.perf_counter()
    docs = run_writers(home, pg_url, tiny_bert_dir, N_PROCS, n_ops)
    check_catalog(home, pg_url, docs, N_PROCS, n_ops)
    print(f"postgres: {N_PROCS}x{n_ops} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _, _, h, u, wid, n, b, bd, o, d = sys.argv[:10]
    worker(h, u, int(wid), int(n), b, bd, o, None if d == "-" else d)
elif __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "repairer":
    repairer(*sys.argv[2:6])

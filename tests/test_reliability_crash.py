"""Crash consistency: the real CLI is SIGKILLed at named fault points inside register, merge, deploy
create/apply/revert/rollback, push and pull (``ADAPTERHUB_FAULT=<point>``, see adapterhub/faults.py).

For every point the test checks that the process died by SIGKILL, then that

* ``adapterhub verify --json`` (a fresh process) reports no problems: every blob a version references
  exists and hashes to its name — nothing is referenced without existing;
* nothing half-registered is visible: the version either does not exist at all, or exists with all its
  metadata and lineage edges (one transaction);
* a deployment is either at its old state or its new one after the next command (the WAL is recovered),
  and its recorded stack and fingerprint match the weights;
* the next command (the same one, without the fault) succeeds, after which verify is clean again;
* :func:`adapterhub.repair.repair` (``verify --repair``) removes the orphans a crash can leave and
  recovers deployments, after which nothing is orphaned or pending.

The full matrix takes a few minutes (every CLI start imports torch), so one point per operation runs by
default and the rest are marked ``slow``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterhub import format as fmt
from adapterhub.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
SIGKILLED = -signal.SIGKILL


def _exe() -> list[str]:
    exe = Path(sys.executable).with_name("adapterhub")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "adapterhub.cli.main"]


def cli(home: Path, *args: str, fault: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, ADAPTERHUB_HOME=str(home))
    e.pop("ADAPTERHUB_FAULT", None)
    if fault:
        e["ADAPTERHUB_FAULT"] = fault
    e.update(env or {})
    return subprocess.run(_exe() + list(args), env=e, capture_output=True, text=True, timeout=600)


def _adapter(shapes: dict[str, tuple[int, ...]], seed: int) -> fmt.SparseAdapter:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name in sorted(shapes):
        if name.endswith(("query.weight", "value.weight", "intermediate.dense.weight")):
            shape = shapes[name]
            numel = shape[0] * shape[1]
            idx = torch.randperm(numel, generator=g)[: numel // 10]
            params[name] = fmt.SparseParam.from_flat(shape, idx, torch.randn(idx.numel(), generator=g) * 0.1)
    return fmt.SparseAdapter(params, {}, {"mask": {"method": "random", "density": 0.1}})


@pytest.fixture
def world(tmp_path, tiny_bert_dir):
    """A home with base ``tiny``, experts e1@1, e2@1, e3@1 and adapter files ready to register."""
    from adapterhub.bases.sources import tensor_shapes

    home = tmp_path / "home"
    ws = Workspace.open(home)
    ws.add_base("tiny", str(tiny_bert_dir))
    shapes = tensor_shapes(tiny_bert_dir)
    for i in (1, 2, 3):
        ws.register(_adapter(shapes, i), name=f"e{i}", task="t", base="tiny")
    files = []
    for i in (10, 11):
        p = tmp_path / f"new{i}.safetensors"
        fmt.save_file(_adapter(shapes, i), p)
        files.append(p)
    ws.close()
    return {"home": home, "files": files, "tmp": tmp_path}


def snapshot(home: Path) -> dict:
    """The catalog as a comparable picture (versions with metadata and edges, tags, deployments)."""
    from sqlalchemy import select

    from adapterhub.catalog.models import Adapter, AdapterVersion, Deployment, DeploymentEvent, LineageEdge

    with Workspace.open(home) as ws, ws.session() as s:
        versions = {}
        for v in s.scalars(select(AdapterVersion)):
            edges = sorted((e.relation, e.parent_id or 0) for e in s.scalars(
                select(LineageEdge).where(LineageEdge.child_id == v.id)))
            versions[f"{v.adapter.name}@{v.number}"] = {"hash": v.content_hash, "nnz": v.nnz, "kind": v.adapter.kind,
                                                       "edges": edges, "hub": v.hub_repo}
        adapters = set(s.scalars(select(Adapter.name)))
        deps = {d.name: {"fp": d.state_root, "stack": [x["ref"] for x in d.stack or []],
                         "events": len(s.scalars(select(DeploymentEvent).where(
                             DeploymentEvent.deployment_id == d.id)).all())}
                for d in s.scalars(select(Deployment))}
    return {"versions": versions, "adapters": adapters, "deployments": deps}


def check_consistent(home: Path, *, allow_pending_deployments: bool = True) -> dict:
    """`adapterhub verify --json` in a fresh process is clean, every referenced blob exists; returns the report."""
    r = cli(home, "verify", "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    rep = json.loads(r.stdout)
    assert rep["problems"] == []
    with Workspace.open(home) as ws:
        for h in ws.referenced_hashes():
            assert ws.store.has(h) and ws.store.verify(h) is None, h
        from adapterhub.apply import deployments as dep

        for d in dep.list_deployments(ws):
            v = dep.verify(ws, d.name)
            if not v["ok"]:
                assert allow_pending_deployments and v["pending_recovery"], v
    return rep


def check_repair(home: Path) -> None:
    """repair() leaves no orphan, no pending deployment, no problem."""
    from adapterhub.apply import deployments as dep
    from adapterhub.repair import repair

    with Workspace.open(home) as ws:
        rep = repair(ws)
        assert rep.ok, rep.to_json()
        v = ws.verify()
        assert v["problems"] == [] and v["orphans"] == []
        for d in dep.list_deployments(ws):
            assert dep.verify(ws, d.name)["ok"]
        assert not list(ws.store.root.glob("*/.*.tmp"))


def crash(home: Path, fault: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    r = cli(home, *args, fault=fault, env=env)
    assert r.returncode == SIGKILLED, f"{fault}: expected SIGKILL, got rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


# -- register -----------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("fault", [
    "register.after-blob",
    pytest.param("register.before-commit", marks=pytest.mark.slow),
])
def test_crash_in_register(world, fault):
    home, f = world["home"], world["files"][0]
    before = snapshot(home)
    args = ("register", str(f), "--name", "e1", "--task", "t", "--base", "tiny", "--parent", "e1@1")
    crash(home, fault, *args)
    rep = check_consistent(home)
    assert snapshot(home) == before  # nothing half-registered: no row, no edge
    assert len(rep["orphans"]) == 1  # the blob written before the row
    r = cli(home, *args, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ref"] == "e1@2" and doc["created"]
    after = snapshot(home)
    assert after["versions"]["e1@2"]["edges"] == [("finetuned_from", 1)]
    assert check_consistent(home)["orphans"] == []  # the orphan became the new version's blob
    check_repair(home)


@pytest.mark.e2e
def test_crash_in_register_then_repair_removes_orphan(world):
    home, f = world["home"], world["files"][1]
    crash(home, "register.before-commit", "register", str(f), "--name", "fresh", "--task", "t", "--base", "tiny")
    rep = check_consistent(home)
    assert "fresh" not in snapshot(home)["adapters"]  # not even the adapter row
    assert len(rep["orphans"]) == 1
    if "--repair" in cli(home, "verify", "--help").stdout:  # the CLI flag (catalog commands) once it exists
        r = cli(home, "verify", "--repair")
        assert r.returncode == 0, r.stdout + r.stderr
        assert check_consistent(home)["orphans"] == []
    check_repair(home)
    r = cli(home, "register", str(f), "--name", "fresh", "--task", "t", "--base", "tiny")
    assert r.returncode == 0 and r.stdout.strip() == "fresh@1", r.stderr
    check_consistent(home)


# -- merge ----------------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("fault", [
    "merge.before-register",
    pytest.param("register.before-commit", marks=pytest.mark.slow),
])
def test_crash_in_merge(world, fault):
    home = world["home"]
    before = snapshot(home)
    args = ("merge", "e1", "e2", "e3", "--method", "ties", "--name", "multi")
    crash(home, fault, *args)
    check_consistent(home)
    assert snapshot(home) == before
    r = cli(home, *args, "--json")
    assert r.returncode == 0, r.stderr
    after = snapshot(home)
    assert sorted(rel for rel, _ in after["versions"]["multi@1"]["edges"]) == ["merged_from"] * 3
    assert check_consistent(home)["orphans"] == []
    check_repair(home)


# -- deployments ---------------------------------------------------------------------------------------

def _deploy_world(home: Path) -> None:
    """Deployment prod = tiny + e1 + e2 (events 0 create, 1 apply e1, 2 apply e2)."""
    from adapterhub.apply import deployments as dep

    with Workspace.open(home) as ws:
        dep.create(ws, "prod", "tiny")
        dep.apply(ws, "prod", "e1@1")
        dep.apply(ws, "prod", "e2@1")


DEPLOY_CASES = [
    # (fault, command, expected stack after the next (fault-free) command)
    ("deploy.apply.mid-patch", ("deploy", "apply", "prod", "e3@1"), ["e1@1", "e2@1", "e3@1"]),
    ("deploy.revert.mid-patch", ("deploy", "revert", "prod", "e1@1"), ["e2@1"]),
    ("deploy.rollback.before-commit", ("deploy", "rollback", "prod", "--to", "1"), ["e1@1"]),
    pytest.param("wal.written", ("deploy", "apply", "prod", "e3@1"), ["e1@1", "e2@1", "e3@1"], marks=pytest.mark.slow),
    pytest.param("deploy.apply.before-commit", ("deploy", "apply", "prod", "e3@1"), ["e1@1", "e2@1", "e3@1"],
                 marks=pytest.mark.slow),
    pytest.param("deploy.apply.after-commit", ("deploy", "apply", "prod", "e3@1"), None, marks=pytest.mark.slow),
    pytest.param("deploy.revert.before-commit", ("deploy", "revert", "prod"), ["e1@1"], marks=pytest.mark.slow),
    pytest.param("deploy.rollback.mid-patch", ("deploy", "rollback", "prod", "--to", "1"), ["e1@1"], marks=pytest.mark.slow),
]


@pytest.mark.e2e
@pytest.mark.parametrize("fault,args,expected", DEPLOY_CASES)
def test_crash_in_deploy(world, fault, args, expected):
    from adapterhub.apply import deployments as dep

    home = world["home"]
    _deploy_world(home)
    before = snapshot(home)
    with Workspace.open(home) as ws:
        wpath = dep.weights_path(ws, "prod")
        old_fp = dep.get(ws, "prod").state_root
    crash(home, fault, *args)
    check_consistent(home)  # the catalog side is clean; the deployment may be pending recovery
    mid = snapshot(home)
    assert mid["versions"] == before["versions"]
    if fault.endswith("after-commit"):
        # committed: the new state is the recorded one; the leftover WAL is discarded on the next command
        assert mid["deployments"]["prod"]["events"] == before["deployments"]["prod"]["events"] + 1
        expected = mid["deployments"]["prod"]["stack"]
        r = cli(home, "deploy", "verify", "prod", "--json")
        # the patch was complete before the commit and the WAL's operation is recorded: a leftover, not
        # pending work, so the deployment verifies cleanly
        assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert (doc["ok"], doc["pending_recovery"], doc["problems"], doc["stack"]) == (True, False, [], expected)
        assert doc["actual"] == doc["expected"] == mid["deployments"]["prod"]["fp"], doc
    else:
        assert mid["deployments"] == before["deployments"]  # no event for the interrupted operation
        # the deployment verifies as pending (WAL) or clean, never silently wrong
        r = cli(home, "deploy", "verify", "prod", "--json")
        doc = json.loads(r.stdout)
        assert doc["ok"] or doc["pending_recovery"], doc
        # the next command recovers first: the old state, bit for bit, then does its own work
        r = cli(home, *args, "--json")
        assert r.returncode == 0, r.stderr
    after = snapshot(home)
    assert after["deployments"]["prod"]["stack"] == expected
    r = cli(home, "deploy", "verify", "prod", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout + r.stderr
    with Workspace.open(home) as ws:
        hist = [e.action for e in dep.history(ws, "prod")]
        if not fault.endswith("after-commit"):
            assert "recover" in hist, hist  # the interrupted operation was undone and recorded
        # rolling back to the state before the crash restores it bit for bit
        seq_before = before["deployments"]["prod"]["events"] - 1
        dep.rollback(ws, "prod", seq_before)
        assert dep.get(ws, "prod").state_root == old_fp
        assert dep.verify(ws, "prod")["ok"]
        assert wpath.exists()
    check_consistent(home, allow_pending_deployments=False)
    check_repair(home)


@pytest.mark.e2e
def test_crash_in_deploy_then_repair_recovers(world):
    """repair() alone (no next command) recovers a half-patched deployment to its last recorded state."""
    from adapterhub.apply import deployments as dep
    from adapterhub.repair import repair

    home = world["home"]
    _deploy_world(home)
    with Workspace.open(home) as ws:
        fp = dep.get(ws, "prod").state_root
        wbytes = dep.weights_path(ws, "prod").read_bytes() if dep.weights_path(ws, "prod").is_file() else None
    crash(home, "deploy.apply.mid-patch", "deploy", "apply", "prod", "e3@1")
    with Workspace.open(home) as ws:
        assert dep.verify(ws, "prod")["pending_recovery"]
        rep = repair(ws)
        assert rep.ok and rep.recovered_deployments == ["prod"], rep.to_json()
        assert dep.get(ws, "prod").state_root == fp and dep.verify(ws, "prod")["ok"]
        if wbytes is not None:
            assert dep.weights_path(ws, "prod").read_bytes() == wbytes  # bit for bit
        assert [e.action for e in dep.history(ws, "prod")][-1] == "recover"


@pytest.mark.e2e
@pytest.mark.slow
def test_crash_in_deploy_create(world):
    home = world["home"]
    crash(home, "deploy.create.before-commit", "deploy", "create", "fresh", "--base", "tiny")
    check_consistent(home)
    assert "fresh" not in snapshot(home)["deployments"]
    r = cli(home, "deploy", "create", "fresh", "--base", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    r = cli(home, "deploy", "verify", "fresh", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"]
    check_repair(home)


# -- hub push / pull -------------------------------------------------------------------------------------

def _hub_env(server, tmp: Path) -> dict:
    return {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp / "proc_hf"),
            "HF_HUB_CACHE": str(tmp / "proc_hf" / "hub"), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}


@pytest.mark.e2e
@pytest.mark.parametrize("fault", [
    "push.after-commit",
    pytest.param("push.before-record", marks=pytest.mark.slow),
])
def test_crash_in_push(world, hub_server, fault):
    home = world["home"]
    env = _hub_env(hub_server, world["tmp"])
    before = snapshot(home)
    crash(home, fault, "push", "e1@1", "--repo", "alice/e1", env=env)
    check_consistent(home)
    assert snapshot(home) == before  # the catalog records Hub coordinates only after the tag exists
    r = cli(home, "push", "e1@1", "--repo", "alice/e1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tag"] == "v1"
    assert snapshot(home)["versions"]["e1@1"]["hub"] == "alice/e1"
    assert len(hub_server.commits("alice/e1")) <= 2  # the retried push reused the crashed one's commit
    check_repair(home)


@pytest.mark.e2e
@pytest.mark.parametrize("fault", [
    "pull.after-download",
    pytest.param("register.before-commit", marks=pytest.mark.slow),
])
def test_crash_in_pull(world, hub_server, fault):
    home = world["home"]
    env = _hub_env(hub_server, world["tmp"])
    r = cli(home, "push", "e2@1", "--repo", "alice/e2", env=env)
    assert r.returncode == 0, r.stderr
    other = world["tmp"] / "other"  # a second home that knows the same base under the same name
    with Workspace.open(home) as ws:
        base_dir = ws.get_base("tiny").path
    with Workspace.open(other) as ws:
        ws.add_base("tiny", str(base_dir))
    before = snapshot(other)
    crash(other, fault, "pull", "alice/e2@v1", "--name", "e2-copy", env=env)
    check_consistent(other)
    assert snapshot(other) == before
    r = cli(other, "pull", "alice/e2@v1", "--name", "e2-copy", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ref"] == "e2-copy@1"
    assert check_consistent(other)["orphans"] == []
    check_repair(other)


def test_fault_points_exist_in_the_code():
    """Every point the matrix kills at is really in the code (else the crash tests would be vacuous)."""
    src = "\n".join(p.read_text() for p in (ROOT / "adapterhub").rglob("*.py"))
    for point in ("register.after-blob", "register.before-commit", "merge.before-register", "wal.written",
                  "deploy.create.before-commit", "push.after-commit", "push.before-record", "pull.after-download"):
        assert f'"{point}"' in src, point
    for action in ("apply", "revert", "rollback"):
        assert f"deploy.{action}.mid-patch" in src
    assert 'fault_point(f"deploy.{action}.before-commit")' in src
    assert 'fault_point(f"deploy.{action}.after-commit")' in src


def test_fault_point_kills_only_when_named(tmp_path):
    code = "from adapterhub.faults import fault_point; fault_point('x.y'); print('alive')"
    env = dict(os.environ)
    for spec, rc in (("", 0), ("x.z", 0), ("a,x.y", SIGKILLED), ("x.y", SIGKILLED), ("x.yy", 0)):
        env["ADAPTERHUB_FAULT"] = spec
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == rc, (spec, r.returncode, r.stderr)


def test_sqlite_catalog_commits_are_fsynced(tmp_path):
    """A SIGKILL loses nothing the OS already has, but a power cut loses what was not fsynced. A deployment's
    event is the commit point of its on-disk patch (the WAL is deleted once it commits), so the catalog's
    commits must be durable when they return: SQLite runs with ``synchronous=FULL`` (2), not NORMAL (1), on
    every pooled connection the catalog hands out."""
    from sqlalchemy import text

    from adapterhub.workspace import Workspace

    with Workspace.open(tmp_path / "home") as ws:
        with ws.engine.connect() as c1, ws.engine.connect() as c2:  # two pooled connections, both set up
            for c in (c1, c2):
                assert c.execute(text("PRAGMA synchronous")).scalar() == 2
                assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"

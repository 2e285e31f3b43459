"""Trust boundaries of deployments: folders, homes and catalogs that are not ours are never patched or
removed; undo records a stack needs are checked; temp files are cleaned; lock files are not followed.

Every hostile case runs the real CLI (``trust_util.run_cli``) and checks a one-line failure with nothing
changed (``tree_snapshot`` of the folders at stake, catalog rows through ``home_snapshot``).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from adapterhub.apply import deployments as dep
from adapterhub.errors import DeploymentError
from adapterhub.workspace import Workspace
from catalog_util import home_snapshot, make_adapter
from trust_util import assert_no_traceback, assert_one_line_failure, diff_snapshots, run_cli, tree_snapshot


def _populate(home: Path, base_dir: Path, *, db_url: str | None = None, path: Path | None = None,
              applied: int = 2) -> dep.DeploymentInfo:
    """A home with base ``tiny``, experts ex0..ex2 and deployment ``prod`` with ex0..ex{applied-1} applied."""
    with Workspace.open(home, db_url) as ws:
        ws.add_base("tiny", str(base_dir))
        for i in range(3):
            ws.register(make_adapter(seed=i), name=f"ex{i}", task="t", base="tiny")
        dep.create(ws, "prod", "tiny", path)
        for i in range(applied):
            dep.apply(ws, "prod", f"ex{i}@1")
        return dep.get(ws, "prod")


def _undo_files(info: dep.DeploymentInfo) -> list[Path]:
    return [info.path / ".adapterhub" / "undo" / f"{layer['undo']}.safetensors" for layer in info.stack]


# -- create never replaces a folder that is not provably ours ------------------------------------------


def test_create_refuses_another_catalogs_folder_with_the_same_name(tmp_path, tiny_bert_dir):
    sandbox = tmp_path / "sandbox"
    shared = sandbox / "served" / "prod"
    _populate(sandbox / "home_a", tiny_bert_dir, path=shared)  # a live deployment of catalog A
    (shared / "NOTES.txt").write_text("the user's own file")
    legacy = sandbox / "legacy"  # a folder whose marker is the old format: just the name
    (legacy / ".adapterhub").mkdir(parents=True)
    (legacy / ".adapterhub" / "deployment.json").write_text("prod")
    (legacy / "keep.txt").write_text("mine")
    home_b = sandbox / "home_b"
    with Workspace.open(home_b) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
    before = tree_snapshot(sandbox, skip=(home_b,))
    rows_b = home_snapshot(home_b)[1]
    for target in (shared, legacy):
        r = run_cli(home_b, "deploy", "create", "prod", "--base", "tiny", "--path", str(target))
        assert_one_line_failure(r, contains="another deployment")
        assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home_b,))) == []
        assert home_snapshot(home_b)[1] == rows_b


def test_create_refuses_a_non_empty_foreign_folder(tmp_path, tiny_bert_dir):
    sandbox = tmp_path / "sandbox"
    home = sandbox / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
    foreign = sandbox / "foreign"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "sub" / "data.bin").write_bytes(b"\x00" * 100)
    (sandbox / "victim.txt").write_text("victim")
    before = tree_snapshot(sandbox, skip=(home,))
    r = run_cli(home, "deploy", "create", "prod", "--base", "tiny", "--path", str(foreign))
    assert_one_line_failure(r, contains="not empty")
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []


# -- a copied home ------------------------------------------------------------------------------------


def test_copied_home_cannot_change_the_originals_deployments(tmp_path, tiny_bert_dir):
    sandbox = tmp_path / "sandbox"
    home = sandbox / "home"
    outside = sandbox / "served" / "edge"
    info = _populate(home, tiny_bert_dir)
    with Workspace.open(home) as ws:
        dep.create(ws, "edge", "tiny", outside)  # a deployment outside the home: its absolute path is copied
        dep.apply(ws, "edge", "ex0@1")
    copy = sandbox / "copy"
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
    before = tree_snapshot(sandbox, skip=(copy,))
    copy_before = tree_snapshot(copy / "deployments")
    for args in (("deploy", "revert", "prod"), ("deploy", "rollback", "prod", "--to", "0"),
                 ("deploy", "apply", "edge", "ex1@1")):
        r = run_cli(copy, *args)
        assert_one_line_failure(r, contains="belongs to another home")
    r = run_cli(copy, "verify", "--repair")  # reads, never recovers or cleans another home's folders
    assert r.returncode == 0, r.output
    with Workspace.open(copy) as ws:  # the library refuses the rest the same way, and reads work
        for op in (lambda: dep.apply(ws, "prod", "ex2@1"), lambda: dep.revert(ws, "prod", "ex0@1"),
                   lambda: dep.revert(ws, "edge"), lambda: dep.recover(ws, "prod")):
            with pytest.raises(DeploymentError, match="belongs to another home"):
                op()
        assert len(dep.history(ws, "prod")) == 3 and dep.get(ws, "prod").read_only
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(copy,))) == []  # original: folders, undo, catalog
    assert diff_snapshots(copy_before, tree_snapshot(copy / "deployments")) == []
    assert all(p.is_file() for p in _undo_files(info))
    with Workspace.open(home) as ws:  # the original still owns them
        assert dep.revert(ws, "edge").stack == []


def test_moved_home_keeps_its_deployments(tmp_path, tiny_bert_dir):
    home = tmp_path / "home"
    _populate(home, tiny_bert_dir, applied=1)
    moved = tmp_path / "moved"
    os.rename(home, moved)  # same inode: the same home
    r = run_cli(moved, "deploy", "apply", "prod", "ex1@1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["path"] == str(moved / "deployments" / "prod") and not doc["read_only"]


# -- homes sharing one catalog -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("pg_url")


def test_second_home_on_a_shared_catalog_sees_deployments_read_only(tmp_path, tiny_bert_dir, shared_url):
    sandbox = tmp_path / "sandbox"
    home_a, home_b = sandbox / "a", sandbox / "b"
    info = _populate(home_a, tiny_bert_dir, db_url=shared_url)
    tmp_file = info.path / ".adapterhub" / ".wal.safetensors.zz.tmp"  # A's temp file: not B's to remove
    tmp_file.write_bytes(b"x")
    env = {"ADAPTERHUB_DB_URL": shared_url}
    before, rows = tree_snapshot(sandbox, skip=(home_b,)), home_snapshot(home_a, shared_url)[1]
    r = run_cli(home_b, "deploy", "list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    (d,) = json.loads(r.stdout)
    assert d["read_only"] and d["path"] == str(info.path)
    r = run_cli(home_b, "deploy", "verify", "prod", env=env)
    assert r.returncode == 0, r.stderr
    for args in (("deploy", "apply", "prod", "ex2@1"), ("deploy", "rollback", "prod", "--to", "1")):
        r = run_cli(home_b, *args, env=env)
        assert_one_line_failure(r, contains="belongs to another home")
    # B's blob store is its own (the versions' blobs are in A's), so verify reports those; never the deployment
    r = run_cli(home_b, "verify", "--repair", env=env)
    assert_no_traceback(r)
    assert "prod" not in r.stdout and "recovered" not in r.stdout
    with Workspace.open(home_b, shared_url) as ws:
        assert len(dep.history(ws, "prod")) == 3
        with pytest.raises(DeploymentError, match="belongs to another home"):
            dep.revert(ws, "prod")
        assert ws.gc().temp_files_removed == 0
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home_b,))) == []
    assert home_snapshot(home_a, shared_url)[1] == rows
    with Workspace.open(home_a, shared_url) as ws:  # the owner still can
        assert len(dep.apply(ws, "prod", "ex2@1").stack) == 3


# -- undo records ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_missing_or_corrupt_undo_record_fails_verify(tmp_path, tiny_bert_dir, damage):
    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir)
    victim = _undo_files(info)[0]
    if damage == "delete":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    word = "missing" if damage == "delete" else "corrupt"
    r = run_cli(home, "deploy", "verify", "prod")
    assert_one_line_failure(r, contains=f"undo record of ex0@1 is {word} ({victim.name}")
    for args in (("verify",), ("verify", "--repair")):
        r = run_cli(home, *args)
        assert r.returncode == 1 and "Traceback" not in r.output
        problems = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBLEM")]
        assert len(problems) == 1 and f"undo record of ex0@1 is {word}" in problems[0] and victim.name in problems[0]
    with Workspace.open(home) as ws:
        assert dep.verify(ws, "prod")["problems"] and not dep.verify(ws, "prod")["ok"]


# -- temp files and lock files ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("gc",), ("verify", "--repair")])
def test_stale_temp_files_are_removed(tmp_path, tiny_bert_dir, command):
    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir, applied=1)
    ctl = info.path / ".adapterhub"
    stale = [ctl / ".wal.safetensors.k3j2.tmp", ctl / "undo" / f".{info.stack[0]['undo']}.safetensors.a1.tmp"]
    for p in stale:
        p.write_bytes(b"half-written")
    r = run_cli(home, *command)
    assert r.returncode == 0, r.output
    assert not any(p.exists() for p in stale)
    assert all(p.is_file() for p in _undo_files(info)) and (ctl / "deployment.json").is_file()


def test_symlinked_lock_files_are_refused(tmp_path, tiny_bert_dir):
    sandbox = tmp_path / "sandbox"
    home = sandbox / "home"
    info = _populate(home, tiny_bert_dir, applied=1)
    victim = sandbox / "victim.txt"
    victim.write_text("victim")
    lock = info.path / ".adapterhub" / "lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(victim)
    before = tree_snapshot(sandbox)
    r = run_cli(home, "deploy", "apply", "prod", "ex1@1")
    assert_one_line_failure(r, contains="symlink")
    assert diff_snapshots(before, tree_snapshot(sandbox)) == []
    lock.unlink()
    store_lock = home / "blobs" / "sha256" / ".lock"
    store_lock.unlink(missing_ok=True)
    store_lock.symlink_to(victim)
    before = tree_snapshot(sandbox)
    r = run_cli(home, "gc")
    assert_one_line_failure(r, contains="symlink")
    assert diff_snapshots(before, tree_snapshot(sandbox)) == []


# -- catalogs from before revision 0002 ---------------------------------------------------------------------


def test_deployment_from_before_ownership_is_adopted_on_first_write(tmp_path, tiny_bert_dir):
    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir, applied=1)
    from sqlalchemy import create_engine, text

    eng = create_engine(f"sqlite:///{home / 'catalog.db'}")
    with eng.begin() as c:
        c.execute(text("UPDATE deployments SET uid = NULL, home_id = NULL, rel_path = NULL"))
    eng.dispose()
    (info.path / ".adapterhub" / "deployment.json").write_text("prod")  # the old marker: just the name
    r = run_cli(home, "deploy", "apply", "prod", "ex1@1", "--json")
    assert r.returncode == 0, r.stderr
    with Workspace.open(home) as ws:
        now = dep.get(ws, "prod")
        assert now.uid and now.home_id == dep.current_home_id(ws) and not now.read_only
        marker = json.loads((info.path / ".adapterhub" / "deployment.json").read_text())
        assert marker["deployment_id"] == now.uid and marker["home_id"] == now.home_id
        assert dep.verify(ws, "prod")["ok"]
    assert (home / "home-id").stat().st_mode & 0o077 == 0

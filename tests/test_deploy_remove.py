"""``deploy rm``: a deployment's record, history and folder go; only this home's, only provably its folder,
never while busy; crash-safe (a folder left after the commit is swept by ``gc`` or replaced by ``create``)."""
from __future__ import annotations

import json
import subprocess

import pytest

import adapterhub.apply.deploy_folders as dmod
from adapterhub.apply import deployments as dep
from adapterhub.errors import CatalogError, DeploymentError
from adapterhub.workspace import Workspace
from catalog_util import home_snapshot, make_adapter
from trust_util import assert_one_line_failure, diff_snapshots, run_cli, tree_snapshot


def _populate(home, base_dir, path=None) -> dep.DeploymentInfo:
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(base_dir))
        for i in range(2):
            ws.register(make_adapter(seed=i), name=f"ex{i}", task="t", base="tiny")
        dep.create(ws, "prod", "tiny", path)
        dep.apply(ws, "prod", "ex0@1")
        return dep.get(ws, "prod")


def test_rm_deletes_row_history_and_folder_and_frees_its_versions(tmp_path, tiny_bert_dir):
    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir)
    with Workspace.open(home) as ws:
        dep.create(ws, "other", "tiny")
        with pytest.raises(CatalogError, match="stack"):
            ws.remove("ex0@1")
    r = run_cli(home, "deploy", "rm", "prod", "--json")
    assert r.returncode == 0, r.output
    doc = json.loads(r.stdout)
    assert doc == {"removed": "prod", "path": str(info.path), "folder": "deleted", "stack": ["ex0@1"], "events": 2}
    assert not info.path.exists() and not list(info.path.parent.glob(".prod.*"))
    with Workspace.open(home) as ws:
        assert [d.name for d in dep.list_deployments(ws)] == ["other"]
        with pytest.raises(DeploymentError, match="unknown deployment"):
            dep.get(ws, "prod")
        ws.remove("ex0@1")  # nothing needs it any more
        assert dep.verify(ws, "other")["ok"]
        dep.create(ws, "prod", "tiny")  # the name is free again
        assert dep.get(ws, "prod").events == 1
    r = run_cli(home, "deploy", "rm", "nope")
    assert_one_line_failure(r, contains="unknown deployment")


def test_rm_keep_files_leaves_a_plain_model_folder_in_the_last_state(tmp_path, tiny_bert_dir):
    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir)
    weights = sorted(p.name for p in info.path.iterdir() if p.name != ".adapterhub")
    before = tree_snapshot(info.path, skip=(info.path / ".adapterhub",))
    r = run_cli(home, "deploy", "rm", "prod", "--keep-files")
    assert r.returncode == 0 and "its model files stay" in r.stdout, r.output
    assert sorted(p.name for p in info.path.iterdir()) == weights  # no control folder
    assert diff_snapshots(before, tree_snapshot(info.path)) == []
    with Workspace.open(home) as ws:
        assert dep.list_deployments(ws) == []
        with pytest.raises(DeploymentError, match="not empty"):  # the kept folder is the user's now
            dep.create(ws, "prod", "tiny")


def test_rm_of_a_folder_deleted_by_hand_removes_the_row(tmp_path, tiny_bert_dir):
    import shutil

    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir)
    shutil.rmtree(info.path)
    with Workspace.open(home) as ws:
        assert dep.remove(ws, "prod").folder == "already gone"
        assert dep.list_deployments(ws) == []


@pytest.mark.parametrize("tamper", ["marker", "symlink", "busy"])
def test_rm_refuses_a_folder_not_provably_its_own_or_busy(tmp_path, tiny_bert_dir, tamper):
    sandbox = tmp_path / "sandbox"
    home = sandbox / "home"
    info = _populate(home, tiny_bert_dir, path=sandbox / "served" / "prod")
    marker = info.path / ".adapterhub" / "deployment.json"
    holder = None
    if tamper == "marker":  # the folder now says it is another deployment's
        doc = json.loads(marker.read_text())
        marker.write_text(json.dumps({**doc, "deployment_id": "f" * 32}))
    elif tamper == "symlink":  # the recorded path is now a link to someone's folder
        real = sandbox / "victim"
        info.path.rename(real)
        info.path.symlink_to(real, target_is_directory=True)
    else:  # another process holds the deployment's lock
        holder = subprocess.Popen(["flock", str(info.path / ".adapterhub" / "lock"), "sleep", "60"])
        for _ in range(100):
            if subprocess.run(["flock", "-n", str(info.path / ".adapterhub" / "lock"), "true"]).returncode:
                break
            import time
            time.sleep(0.05)
    try:
        before = tree_snapshot(sandbox, skip=(home,))
        rows = home_snapshot(home)[1]
        r = run_cli(home, "deploy", "rm", "prod")
        assert_one_line_failure(r, contains={"marker": "another deployment", "symlink": "symlink",
                                             "busy": "busy"}[tamper])
        assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []
        assert home_snapshot(home)[1] == rows
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()


def test_rm_of_another_homes_deployment_is_refused(tmp_path, tiny_bert_dir):
    sandbox = tmp_path / "sandbox"
    home = sandbox / "home"
    _populate(home, tiny_bert_dir)
    copy = sandbox / "copy"
    subprocess.run(["cp", "-a", str(home), str(copy)], check=True)
    before = tree_snapshot(sandbox, skip=(copy,))
    r = run_cli(copy, "deploy", "rm", "prod")
    assert_one_line_failure(r, contains="belongs to another home")
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(copy,))) == []


class Crash(BaseException):
    pass


def test_crash_after_the_commit_leaves_a_folder_gc_sweeps_and_create_replaces(tmp_path, tiny_bert_dir, monkeypatch):
    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir)

    def boom(name: str) -> None:
        if name == "deploy.remove.after-commit":
            raise Crash(name)

    with Workspace.open(home) as ws:
        monkeypatch.setattr(dmod, "fault_point", boom)
        with pytest.raises(Crash):
            dep.remove(ws, "prod")
        monkeypatch.undo()
        assert info.path.is_dir() and dep.list_deployments(ws) == []  # committed: the row is gone
        assert json.loads((info.path / ".adapterhub" / "deployment.json").read_text())["state"] == "removing"
        assert dep.remove_temp_files(ws, dry_run=True) == 1 and info.path.is_dir()
        dep.create(ws, "prod", "tiny")  # the leftover of this home's own removal is replaced
        assert dep.verify(ws, "prod")["ok"] and dep.remove_temp_files(ws) == 0
        with pytest.raises(Crash):
            monkeypatch.setattr(dmod, "fault_point", boom)
            dep.remove(ws, "prod")
        monkeypatch.undo()
    r = run_cli(home, "gc")
    assert r.returncode == 0, r.output
    assert not info.path.exists()


def test_crash_during_the_folder_deletion_leaves_a_hidden_folder_gc_sweeps(tmp_path, tiny_bert_dir, monkeypatch):
    home = tmp_path / "home"
    info = _populate(home, tiny_bert_dir)
    with Workspace.open(home) as ws:
        monkeypatch.setattr(dmod.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(Crash("rmtree")))
        with pytest.raises(Crash):
            dep.remove(ws, "prod")
        monkeypatch.undo()
        left = list(info.path.parent.glob(".prod.removing-*"))
        assert len(left) == 1 and not info.path.exists()
        other = info.path.parent / "not-ours"
        other.mkdir()  # a folder without our marker is never touched
        assert dep.remove_temp_files(ws) == 1
        assert not left[0].exists() and other.is_dir()

"""A process opening the same catalog again reuses its engine (dialect set-up, compiled statements) with a fresh
pool: no connection of an earlier workspace is handed out again."""
from __future__ import annotations

import os
import shutil

from sqlalchemy import text

from adapterhub.catalog import db
from adapterhub.workspace import Workspace


def test_same_catalog_same_engine_fresh_pool(tmp_path):
    url = f"sqlite:///{tmp_path / 'a.db'}"
    e1 = db.make_engine(url)
    with e1.begin() as c:
        c.execute(text("create table t (x integer)"))
        c.execute(text("insert into t values (1)"))
    idle = e1.pool
    e2 = db.make_engine(url)
    assert e2 is e1 and e2.pool is not idle  # the old pool (and its idle connection) is gone
    # the file is replaced behind the engine's back: a pooled connection would still read the old one
    os.replace(tmp_path / "a.db", tmp_path / "old.db")
    shutil.copy(tmp_path / "old.db", tmp_path / "a.db")
    with db.make_engine(url).begin() as c:
        c.execute(text("update t set x = 2"))
    with db.make_engine(url).connect() as c:
        assert c.execute(text("select x from t")).scalar_one() == 2
    assert db.make_engine(url, lock_timeout=3) is not e1  # another timeout: another engine
    assert db.make_engine("sqlite://") is not db.make_engine("sqlite://")  # in-memory: never shared


def test_reopened_workspace_sees_a_replaced_home(tmp_path, tiny_llama_dir):
    """The first workspace is still open (its pool holds a connection to the old file) when the home is deleted
    and made again at the same path: the second one reads the new catalog."""
    home = tmp_path / "home"
    first = Workspace.open(home)
    first.add_base("tiny", str(tiny_llama_dir))
    assert [b.name for b in first.list_bases()] == ["tiny"]
    shutil.rmtree(home)
    with Workspace.open(home) as ws:
        assert ws.engine is first.engine and ws.list_bases() == []
        assert db.current_revision(ws.engine) == db.head_revision()
    first.close()

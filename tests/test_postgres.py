"""The catalog CLI end to end on a real PostgreSQL server (skips locally without one; CI requires it).

The Workspace-level catalog tests run on PostgreSQL too (``catalog_url`` in tests/test_catalog_core.py);
this file drives the CLI with ``--db`` and checks PostgreSQL-specific behaviour (JSONB, two clients).
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adapterhub.cli.main import cli
from catalog_util import home_snapshot, write_adapter

pytestmark = pytest.mark.postgres


def _run(home, url, *args, code=0):
    r = CliRunner().invoke(cli, ["--home", str(home), "--db", url] + [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def test_cli_flow_on_postgres(pg_url, home, tmp_path, tiny_bert_dir):
    assert json.loads(_run(home, pg_url, "db", "current", "--json").stdout)["current"] is None
    _run(home, pg_url, "db", "upgrade")
    _run(home, pg_url, "base", "add", "tiny", tiny_bert_dir)
    for i in range(3):
        f = write_adapter(tmp_path / f"a{i}.safetensors", seed=i)
        args = ["register", f, "--name", "rt", "--task", "sentiment", "--base", "tiny"]
        if i:
            args += ["--parent", f"rt@{i}"]
        assert _run(home, pg_url, *args).stdout.strip() == f"rt@{i + 1}"
    _run(home, pg_url, "tag", "rt@2", "prod")
    show = json.loads(_run(home, pg_url, "show", "rt@prod", "--json").stdout)
    assert show["ref"] == "rt@2" and show["parents"][0]["parent"] == "rt@1"
    lin = json.loads(_run(home, pg_url, "lineage", "rt@3", "--format", "json").stdout)
    assert [(e["child"], e["depth"]) for e in lin["edges"]] == [("rt@3", 1), ("rt@2", 2)]
    assert [v["ref"] for v in json.loads(_run(home, pg_url, "list", "--task", "sentiment", "--json").stdout)] == [
        "rt@3", "rt@2", "rt@1"]
    assert json.loads(_run(home, pg_url, "diff", "rt@1", "rt@2", "--json").stdout)["total"]["union"] > 0
    assert json.loads(_run(home, pg_url, "verify", "--json").stdout)["problems"] == []
    # a refused registration leaves PostgreSQL rows and the store unchanged
    before = home_snapshot(home, pg_url)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((tmp_path / "a0.safetensors").read_bytes()[:-3])
    r = _run(home, pg_url, "register", bad, "--name", "rt", "--task", "t", "--base", "tiny", code=1)
    assert r.stderr.startswith("Error:")
    assert home_snapshot(home, pg_url) == before


def test_jsonb_columns_and_two_homes_share_one_catalog(pg_url, tmp_path, tiny_bert_dir):
    """Two homes (two machines) on one PostgreSQL catalog see the same versions; JSON is stored as JSONB."""
    from sqlalchemy import create_engine, text

    from adapterhub.workspace import Workspace
    from catalog_util import make_adapter

    a = Workspace.open(tmp_path / "h1", pg_url)
    b = Workspace.open(tmp_path / "h2", pg_url)
    try:
        a.add_base("tiny", str(tiny_bert_dir))
        a.register(make_adapter(), name="x", task="t", base="tiny", training_config={"lr": 0.1, "k": [1, 2]})
        assert b.resolve("x").training_config == {"lr": 0.1, "k": [1, 2]}
        b.tag("x@1", "prod")
        assert a.resolve("x@prod").ref == "x@1"
    finally:
        a.close()
        b.close()
    eng = create_engine(pg_url)
    with eng.connect() as c:
        typ = c.execute(text("SELECT data_type FROM information_schema.columns "
                             "WHERE table_name='adapter_versions' AND column_name='training_config'")).scalar()
        assert typ == "jsonb"
        assert c.execute(text("SELECT training_config->>'lr' FROM adapter_versions")).scalar() == "0.1"
    eng.dispose()


def test_a_lock_held_by_another_client_is_waited_for_at_most_the_lock_timeout(pg_url, home, tmp_path,
                                                                              tiny_bert_dir):
    """PostgreSQL waits for a lock forever by default; the catalog's lock timeout bounds it (SQLSTATE 55P03),
    and the CLI says so in one line, exit 1, with nothing registered."""
    import time

    from sqlalchemy import create_engine, text

    _run(home, pg_url, "base", "add", "tiny", tiny_bert_dir)
    f = write_adapter(tmp_path / "a.safetensors", seed=0)
    other = create_engine(pg_url)
    with other.connect() as c:
        c.execute(text("LOCK TABLE adapters IN ACCESS EXCLUSIVE MODE"))  # held until this block ends
        t0 = time.monotonic()
        r = _run(home, pg_url, "--lock-timeout", "1", "register", f, "--name", "rt", "--task", "t", "--base", "tiny",
                 code=1)
        waited = time.monotonic() - t0
        c.rollback()
    other.dispose()
    assert "locked by another process" in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert waited < 30, waited  # bounded: without a lock timeout this register would wait forever
    assert json.loads(_run(home, pg_url, "list", "--json").stdout) == []


def test_base_rehash_on_a_shared_catalog_is_one_conditional_update(pg_url, tmp_path, tiny_llama_dir, monkeypatch):
    """Home A made a sha256 deployment (before revision 0008); home B moves the base to BLAKE3 on the shared
    PostgreSQL catalog; A's deployment keeps its sha256 root, and a stale compare-and-set changes nothing."""
    from adapterhub.apply import deployments as dep, state as state_mod
    from adapterhub.workspace import Workspace

    a = Workspace.open(tmp_path / "h1", pg_url)
    b = Workspace.open(tmp_path / "h2", pg_url)
    try:
        a.add_base("tiny", str(tiny_llama_dir))
        monkeypatch.setattr(state_mod, "DEFAULT_SCHEME", state_mod.SHA256)
        old = dep.create(a, "d", "tiny")
        monkeypatch.undo()
        out = dep.rehash_base(b, "tiny")
        assert out["changed"] and out["previous"] == old.state_root and out["state_root"].startswith("blake3:")
        assert out["deployments"] == {"d": "sha256"}
        assert a.deployment_rows.base_state_root(old.base_id) == out["state_root"]
        assert not b.deployment_rows.replace_base_state_root(old.base_id, old.state_root, "x" * 64)  # stale: refused
        assert a.deployment_rows.base_state_root(old.base_id) == out["state_root"]
        assert dep.verify(a, "d")["ok"] and dep.get(a, "d").state_root == old.state_root
    finally:
        a.close()
        b.close()

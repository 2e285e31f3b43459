"""Issue 15: a team's two homes share a catalog (PostgreSQL, or one SQLite file) and an ``s3://`` store (moto's
S3 server on 127.0.0.1). A ``gc`` in either home, without a grace period, never takes a blob a version of the
*other* home references — gc reads the references from the shared catalog — and takes a blob only once no
home's version references it any more."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub import format as fmt
from adapterhub.store import open_store
from catalog_util import write_adapter

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

import test_store_s3
from test_store_s3 import Home, _raw

s3_endpoint, s3_url = test_store_s3.s3_endpoint, test_store_s3.s3_url  # the moto server and bucket fixtures


def _objects(url: str) -> set[str]:
    client, bucket, prefix = _raw(url)
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:].replace("/", "") for o in listed}


def _team_gc_case(tmp_path: Path, db_url: str, tiny_bert_dir: Path, s3_url: str) -> None:
    a, b = Home(tmp_path / "alice", db_url), Home(tmp_path / "bob", db_url)
    a("base", "add", "tiny", str(tiny_bert_dir))
    src_a, src_b = write_adapter(tmp_path / "rt.safetensors", seed=7), write_adapter(tmp_path / "spam.safetensors", seed=8)
    ha = a.json("register", src_a, "--name", "rt", "--task", "t", "--base", "tiny")["content_hash"]
    hb = b.json("register", src_b, "--name", "spam", "--task", "t", "--base", "tiny")["content_hash"]
    orphan = open_store(s3_url, tmp_path / "carol").put_bytes(b"an upload no version references")
    assert _objects(s3_url) == {ha, hb, orphan}

    # bob's gc, no grace: only the orphan goes; alice's rt@1 keeps its bytes (the shared catalog references them)
    assert b.json("gc", "--dry-run")["removed"] == [orphan]
    assert b.json("gc")["removed"] == [orphan]
    assert _objects(s3_url) == {ha, hb}
    a("export", "rt@1", tmp_path / "rt-out.safetensors")
    assert fmt.sha256_hex((tmp_path / "rt-out.safetensors").read_bytes()) == ha
    # and alice's gc keeps bob's spam@1
    assert a.json("gc")["removed"] == []
    b("export", "spam@1", tmp_path / "spam-out.safetensors")
    assert fmt.sha256_hex((tmp_path / "spam-out.safetensors").read_bytes()) == hb

    # one blob, two homes' versions: bob registers alice's bytes under his own name; alice removes hers and
    # runs gc: the blob stays, because bob's version still references it
    assert b.json("register", src_a, "--name", "rt-bob", "--task", "t", "--base", "tiny")["content_hash"] == ha
    a("rm", "rt@1")
    assert a.json("gc")["removed"] == [] and ha in _objects(s3_url)
    b("export", "rt-bob@1", tmp_path / "rt-bob.safetensors")
    assert (tmp_path / "rt-bob.safetensors").read_bytes() == (tmp_path / "rt-out.safetensors").read_bytes()
    assert a.json("verify") == {"checked": 2, "problems": [], "orphans": []}
    # once no home references it, either home's gc takes it
    b("rm", "rt-bob@1")
    assert a.json("gc")["removed"] == [ha] and _objects(s3_url) == {hb}
    assert b.json("verify") == {"checked": 1, "problems": [], "orphans": []}


def test_team_gc_postgres_catalog_keeps_the_other_homes_blobs(tmp_path, pg_url, tiny_bert_dir, s3_url):
    _team_gc_case(tmp_path, pg_url, tiny_bert_dir, s3_url)


def test_team_gc_sqlite_catalog_keeps_the_other_homes_blobs(tmp_path, tiny_bert_dir, s3_url):
    _team_gc_case(tmp_path, f"sqlite:///{tmp_path / 'team.db'}", tiny_bert_dir, s3_url)

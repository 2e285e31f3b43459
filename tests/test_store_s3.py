"""The shared blob store in an S3 bucket, against a real S3-API server on 127.0.0.1 (moto's server mode).

Two homes share one catalog (PostgreSQL, or one SQLite file) and one ``s3://`` store: what home A registers,
home B exports, shows and verifies byte for byte; a corrupt object is healed by a re-register; gc removes
only unreferenced objects and keeps young ones under a grace period.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterhub import format as fmt
from adapterhub.cli.main import cli
from adapterhub.errors import StoreError
from adapterhub.store import BlobStore, ObjectStore, open_store
from catalog_util import write_adapter

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

KEY_ID, SECRET = "AKIAADAPTERHUBTEST01", "s3cr3t-adapterhub-test-value"
BUCKET = "team-blobs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_url(s3_endpoint, monkeypatch, request):
    """A fresh bucket prefix on the local S3 server; ADAPTERHUB_STORE_URL points at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    url = f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"
    monkeypatch.setenv("ADAPTERHUB_STORE_URL", url)
    return url


def _raw(url: str):
    """(boto3 client, bucket, prefix) to poke at the objects behind adapterhub's back."""
    import os

    import boto3

    _, rest = url.split("://", 1)
    bucket, prefix = rest.split("/", 1)
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]), bucket, prefix


class Home:
    def __init__(self, home: Path, db_url: str) -> None:
        self.home, self.db_url, self.runner = home, db_url, CliRunner()

    def __call__(self, *args, code: int = 0):
        r = self.runner.invoke(cli, ["--home", str(self.home), "--db", self.db_url, *map(str, args)],
                               catch_exceptions=False)
        assert r.exit_code == code, f"exit {r.exit_code} != {code}: {r.output}"
        assert KEY_ID not in r.output and SECRET not in r.output
        return r

    def json(self, *args, code: int = 0):
        import json

        return json.loads(self(*args, "--json", code=code).stdout)


def _two_homes(tmp_path, db_url, tiny_bert_dir, s3_url):
    a, b = Home(tmp_path / "alice", db_url), Home(tmp_path / "bob", db_url)
    a("base", "add", "tiny", str(tiny_bert_dir))
    src = write_adapter(tmp_path / "rt.safetensors", seed=7)
    a("register", src, "--name", "rt", "--task", "t", "--base", "tiny")
    info = a.json("show", "rt@1")
    client, bucket, prefix = _raw(s3_url)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    h = info["content_hash"]
    assert keys == [f"{prefix}/{h[:2]}/{h[2:]}"]
    assert not (tmp_path / "alice" / "blobs" / "sha256").exists() or not any((tmp_path / "alice" / "blobs" / "sha256").rglob("*/*"))
    return a, b, src, h


def _shared_catalog_case(tmp_path, db_url, tiny_bert_dir, s3_url):
    a, b, src, h = _two_homes(tmp_path, db_url, tiny_bert_dir, s3_url)
    # home B never saw the file: show / export / verify read the shared store
    assert b.json("show", "rt@1")["content_hash"] == h
    doc = b.json("export", "rt@1", tmp_path / "out.safetensors")
    out = (tmp_path / "out.safetensors").read_bytes()
    assert doc["content_hash"] == h == fmt.sha256_hex(out)  # register canonicalises; the stored bytes
    assert b.json("verify") == {"checked": 1, "problems": [], "orphans": []}

    # a corrupt object under the final key: verify says so in both homes; re-registering heals it
    client, bucket, prefix = _raw(s3_url)
    key = f"{prefix}/{h[:2]}/{h[2:]}"
    client.put_object(Bucket=bucket, Key=key, Body=b"bit rot")
    probs = b.json("verify", code=1)["problems"]
    assert len(probs) == 1 and "rt@1" in probs[0] and "corrupt" in probs[0]
    r = b("export", "rt@1", tmp_path / "bad.safetensors", code=1)
    assert "corrupt" in r.stderr and not (tmp_path / "bad.safetensors").exists()
    b("register", src, "--name", "rt", "--task", "t", "--base", "tiny")  # same bytes: still rt@1, object healed
    assert [v["ref"] for v in b.json("list")] == ["rt@1"]
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == out
    assert a.json("verify")["problems"] == []

    # gc (from either home) removes only objects no version references
    store = open_store(s3_url, tmp_path / "alice")
    orphan = store.put_bytes(b"not referenced by any version")
    assert a.json("verify")["orphans"] == [orphan]
    kept = b.json("gc", "--grace", "3600")
    assert kept["removed"] == [] and store.has(orphan)
    gone = b.json("gc")
    assert gone["removed"] == [orphan] and not store.has(orphan) and store.has(h)
    assert a.json("verify") == {"checked": 1, "problems": [], "orphans": []}
    b("export", "rt@1", tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == out


def test_two_homes_postgres_catalog_shared_s3_store(tmp_path, pg_url, tiny_bert_dir, s3_url):
    _shared_catalog_case(tmp_path, pg_url, tiny_bert_dir, s3_url)


def test_two_homes_sqlite_catalog_shared_s3_store(tmp_path, tiny_bert_dir, s3_url):
    _shared_catalog_case(tmp_path, f"sqlite:///{tmp_path / 'team.db'}", tiny_bert_dir, s3_url)


def test_without_shared_store_second_home_misses_bytes(tmp_path, tiny_bert_dir, monkeypatch):
    """The failure the shared store fixes: a shared catalog with per-home local stores."""
    monkeypatch.delenv("ADAPTERHUB_STORE_URL", raising=False)
    db_url = f"sqlite:///{tmp_path / 'team.db'}"
    a, b = Home(tmp_path / "alice", db_url), Home(tmp_path / "bob", db_url)
    a("base", "add", "tiny", str(tiny_bert_dir))
    a("register", write_adapter(tmp_path / "rt.safetensors", seed=7), "--name", "rt", "--task", "t", "--base", "tiny")
    r = b("export", "rt@1", tmp_path / "out.safetensors", code=1)
    assert "missing from the store" in r.stderr


def test_object_store_contract(tmp_path, s3_url):
    s = open_store(s3_url, tmp_path)
    assert isinstance(s, ObjectStore) and repr(s) == f"ObjectStore({s3_url!r})"
    d = s.put_bytes(b"hello")
    assert d == fmt.sha256_hex(b"hello") and s.has(d) and s.get_bytes(d) == b"hello"
    assert s.put_bytes(b"hello") == d and list(s.iter_digests()) == [d]
    with pytest.raises(StoreError, match="missing from the store"):
        s.get_bytes("0" * 64)
    with pytest.raises(StoreError, match="invalid blob digest"):
        s.get_bytes("../../etc")
    p = s.path(d)  # a verified local copy for lazy readers
    assert p.read_bytes() == b"hello" and tmp_path in p.parents
    p.write_bytes(b"tampered")
    assert s.path(d).read_bytes() == b"hello"
    assert s.delete(d) == 5 and not s.has(d) and s.delete(d) == 0 and not p.exists()
    # no objects other than blobs count: a stray key under the prefix is neither a digest nor collected
    client, bucket, prefix = _raw(s3_url)
    client.put_object(Bucket=bucket, Key=f"{prefix}/README", Body=b"x")
    assert list(s.iter_digests()) == [] and s.gc(set()).removed == []


def test_debug_logs_carry_no_credentials(tmp_path, s3_url, caplog, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-adapterhub-test")
    import logging

    caplog.set_level(logging.DEBUG)
    s = open_store(s3_url, tmp_path)
    d = s.put_bytes(b"logged")
    assert s.get_bytes(d) == b"logged" and list(s.iter_digests()) == [d]
    text = caplog.text
    assert "Authorization" in text or "Credential" in text or "X-Amz" in text, "botocore logged no request headers"
    assert KEY_ID not in text and SECRET not in text and "session-token-adapterhub-test" not in text


def test_gc_grace_keeps_in_flight_uploads_from_other_homes(tmp_path, s3_url):
    """Home B uploaded a blob and has not committed its catalog row yet; a gc with a grace period in
    home A (whose flock B does not share) keeps it; a gc after the grace (or without one) takes it."""
    a = open_store(s3_url, tmp_path / "a")
    b = open_store(s3_url, tmp_path / "b")
    live = a.put_bytes(b"referenced")
    in_flight = b.put_bytes(b"being registered by home B")
    res = a.gc({live}, grace_s=3600)
    assert res.removed == [] and res.kept_recent == [in_flight] and b.has(in_flight)
    # references are read again just before deleting: a row committed during the gc saves the blob
    calls: list[int] = []

    def refs():
        calls.append(1)
        return {live} if len(calls) == 1 else {live, in_flight}

    time.sleep(1.1)
    res = a.gc(refs, grace_s=0.5)
    assert res.removed == [] and len(calls) == 2 and b.has(in_flight)
    dry = a.gc({live}, grace_s=0.5, dry_run=True)
    assert dry.removed == [in_flight] and dry.freed_bytes == len(b"being registered by home B") and b.has(in_flight)
    # a re-put refreshes LastModified: the blob is young again
    b.put_bytes(b"being registered by home B")
    assert a.gc({live}, grace_s=3600).kept_recent == [in_flight]
    assert a.gc({live}).removed == [in_flight] and not a.has(in_flight) and a.has(live)


def test_store_url_validation_and_secrets(tmp_path, s3_url, s3_endpoint, monkeypatch):
    for bad, msg in [("s3://", "invalid S3 bucket"), ("s3://UPPER", "invalid S3 bucket"),
                     (f"s3://{KEY_ID}:{SECRET}@bucket/x", "must not contain credentials"),
                     ("s3://bucket/../x", "invalid key prefix"), ("gs://bucket", "unsupported store URL")]:
        with pytest.raises(StoreError, match=msg) as ei:
            open_store(bad, tmp_path)
        assert SECRET not in str(ei.value) and KEY_ID not in str(ei.value)
    assert isinstance(open_store(str(tmp_path / "folder"), tmp_path), BlobStore)
    assert isinstance(open_store(None, tmp_path), BlobStore)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{KEY_ID}:{SECRET}@127.0.0.1:1")
    with pytest.raises(StoreError, match="AWS_ENDPOINT_URL must be"):
        open_store(s3_url, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://127.0.0.1")
    with pytest.raises(StoreError, match="AWS_ENDPOINT_URL must be"):
        open_store(s3_url, tmp_path)
    # wrong credentials: a one-line StoreError that names neither the key id nor the secret
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-wrong")
    s = open_store("s3://no-such-bucket-adapterhub/x", tmp_path)
    with pytest.raises(StoreError) as ei:
        s.put_bytes(b"x")
    text = str(ei.value)
    assert "\n" not in text and SECRET not in text and KEY_ID not in text and "s3://no-such-bucket-adapterhub/x" in text


def test_cli_store_option_overrides_env(tmp_path, s3_url, tiny_bert_dir, monkeypatch):
    """``--store`` names the store like ADAPTERHUB_STORE_URL does (the flag wins over the env)."""
    monkeypatch.setenv("ADAPTERHUB_STORE_URL", "gs://not-used")
    r = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "--store", s3_url, "base", "add", "tiny",
                                 str(tiny_bert_dir)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "--store", s3_url, "register",
                                 str(write_adapter(tmp_path / "a.safetensors", seed=3)), "--name", "a", "--task", "t",
                                 "--base", "tiny"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    client, bucket, prefix = _raw(s3_url)
    assert len(client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])) == 1


def test_cli_bad_store_url_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_STORE_URL", "gs://bucket")
    r = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "list"])
    assert r.exit_code == 1 and "unsupported store URL" in r.stderr and len(r.stderr.strip().splitlines()) == 1

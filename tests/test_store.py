"""Content-addressed blob store: idempotent atomic writes, verified reads, gc."""
from __future__ import annotations

import os

import pytest

from adapterhub.errors import StoreError
from adapterhub.format import sha256_hex
from adapterhub.store import BlobStore


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "blobs")


def test_put_get_has(store):
    d = store.put_bytes(b"hello")
    assert d == sha256_hex(b"hello") and store.has(d)
    assert store.get_bytes(d) == b"hello"
    assert store.path(d) == store.root / d[:2] / d[2:]
    ino = store.path(d).stat().st_ino
    assert store.put_bytes(b"hello") == d  # idempotent: the file is not rewritten (same inode, same bytes)
    assert store.path(d).stat().st_ino == ino and store.get_bytes(d) == b"hello"
    assert list(store.iter_digests()) == [d]
    assert not any(p.name.endswith(".tmp") for p in store.root.rglob("*"))


def test_corrupt_and_missing_blobs_are_detected(store):
    d = store.put_bytes(b"payload")
    store.path(d).write_bytes(b"payloaX")
    with pytest.raises(StoreError, match="corrupt"):
        store.get_bytes(d)
    assert "corrupt" in store.verify(d)
    store.path(d).unlink()
    with pytest.raises(StoreError, match="missing"):
        store.get_bytes(d)
    assert store.verify(store.put_bytes(b"payload")) is None


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ab", "G" * 64, "A" * 64, "", "0" * 63 + "/"])
def test_invalid_digests_refused(store, bad):
    with pytest.raises(StoreError, match="invalid blob digest"):
        store.path(bad)


def test_symlinks_refused(store, tmp_path):
    target = tmp_path / "outside"
    target.write_bytes(b"x")
    d = sha256_hex(b"x")
    store.path(d).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, store.path(d))
    assert not store.has(d)
    with pytest.raises(StoreError, match="symlink"):
        store.get_bytes(d)
    with pytest.raises(StoreError, match="symlink"):
        store.put_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_gc(store):
    keep = store.put_bytes(b"keep")
    drop = store.put_bytes(b"drop")
    tmp = store.path(keep).parent / ".half.tmp"
    tmp.write_bytes(b"partial")
    dry = store.gc({keep}, dry_run=True)
    assert dry.removed == [drop] and dry.freed_bytes == 4 and store.has(drop) and tmp.exists()
    res = store.gc({keep})
    assert res.removed == [drop] and res.freed_bytes == 4 and res.temp_files_removed == 1
    assert store.has(keep) and not store.has(drop) and not tmp.exists()
    assert store.gc({keep}).removed == []


def test_atomic_write_leaves_old_content_on_failure(store, monkeypatch):
    import adapterhub.format as fmt

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fmt.os, "replace", boom)
    with pytest.raises(StoreError, match="disk full"):  # one-line library error, not a raw OSError
        store.put_bytes(b"never")
    assert list(store.iter_digests()) == []
    assert not any(p.name.endswith(".tmp") for p in store.root.rglob("*"))


def test_gc_waits_for_an_in_flight_register(tmp_path):
    """gc with no grace never removes a blob between its write and its catalog commit (store lock)."""
    import threading
    import time as _time

    store = BlobStore(tmp_path / "s")
    committed: set[str] = set()
    results = []
    with store.lock(exclusive=False):  # what Workspace.register holds from put_bytes to commit
        digest = store.put_bytes(b"being registered")
        t = threading.Thread(target=lambda: results.append(store.gc(lambda: set(committed))))
        t.start()
        _time.sleep(0.3)
        assert t.is_alive() and store.has(digest)  # the collector waits
        committed.add(digest)  # the catalog row commits
    t.join(10)
    assert not t.is_alive()
    assert results[0].removed == [] and store.has(digest)
    assert store.gc(set()).removed == [digest]  # once unreferenced, it goes
    assert digest not in list(store.iter_digests())


def test_gc_removes_empty_store_folders_and_nothing_else(store, tmp_path):
    """Shard folders emptied by gc or left empty by a refused registration, and an empty staging folder, go;
    a folder with a blob, a symlinked folder and folders of other names stay."""
    keep = store.put_bytes(b"keep")
    drop = store.put_bytes(b"drop")
    assert keep[:2] != drop[:2]
    left = store.root / "ff"
    left.mkdir(exist_ok=True)  # what a refused registration's put leaves
    (store.root / "staging").mkdir()
    other = store.root / "notes"
    other.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.root / "ee")
    assert store.gc({keep}, dry_run=True).empty_folders_removed == (2 if drop[:2] != "ff" else 1)
    res = store.gc({keep})
    assert res.removed == [drop] and res.empty_folders_removed == (3 if drop[:2] != "ff" else 2)
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == \
        sorted([keep[:2], "ee", "notes"])
    assert store.has(keep) and outside.is_dir()
    assert store.gc({keep}).empty_folders_removed == 0

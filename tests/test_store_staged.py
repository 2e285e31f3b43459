"""A register of a large file writes the store's copy while it validates and hashes the bytes (issue 19):
the staged temp file becomes the blob when the bytes are stored as they are, and is removed on every other
path — refused, already present, re-serialised, a failed write — leaving the store and catalog unchanged."""
from __future__ import annotations

import pytest

from adapterhub import format as fmt
from adapterhub.errors import BaseModelError, StoreError
from adapterhub.store import BlobStore
from catalog_util import BERT_TARGETS, make_adapter, write_adapter


@pytest.fixture
def staged_ws(ws, tiny_bert_dir, monkeypatch):
    monkeypatch.setattr("adapterhub.store.STAGE_MIN_BYTES", 0)  # the tiny test files stage as a large one would
    ws.add_base("tiny", str(tiny_bert_dir))
    return ws


def _canonical_file(ws, path, seed):
    """An adapter file that register stores as it is (its card already names the base and the task)."""
    card = {"base": {"name": "tiny", "fingerprint": ws.get_base("tiny").fingerprint}, "task": "t",
            "kind": "expert", "mask": {"method": "random"}}
    fmt.save_file(make_adapter(seed=seed, card=card), path)
    return path


def _leftovers(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.root.rglob(".*.tmp"))


def _blobs(store: BlobStore) -> list[str]:
    return sorted(store.iter_digests())


def test_staged_bytes_become_the_blob(staged_ws, tmp_path, monkeypatch):
    made, inodes = [], []
    real = BlobStore.stage

    def spy(self, data):
        made.append(real(self, data))
        inodes.append(made[-1].wait().stat().st_ino)
        return made[-1]

    monkeypatch.setattr(BlobStore, "stage", spy)
    f = _canonical_file(staged_ws, tmp_path / "a.safetensors", 1)
    v = staged_ws.register(f, name="a", task="t", base="tiny")
    blob = staged_ws.store.path(v.content_hash)
    assert len(made) == 1 and blob.stat().st_ino == inodes[0]  # the staged file itself, not a second write
    assert blob.read_bytes() == f.read_bytes() and fmt.sha256_hex(blob.read_bytes()) == v.content_hash
    assert _leftovers(staged_ws.store) == []
    # the same file again: the blob is already there, the new staged copy is removed
    again = staged_ws.register(f, name="a", task="t", base="tiny")
    assert again.id == v.id and len(made) == 2 and blob.stat().st_ino == inodes[0]
    assert _leftovers(staged_ws.store) == [] and _blobs(staged_ws.store) == [v.content_hash]


def test_a_re_serialised_file_is_written_normally_and_the_staged_copy_removed(staged_ws, tmp_path):
    f = write_adapter(tmp_path / "a.safetensors", seed=5)  # its card lacks the base: stored re-serialised
    v = staged_ws.register(f, name="a", task="t", base="tiny")
    assert staged_ws.store.path(v.content_hash).read_bytes() != f.read_bytes()
    assert _leftovers(staged_ws.store) == [] and _blobs(staged_ws.store) == [v.content_hash]


def test_a_refused_file_leaves_no_temp_and_no_blob(staged_ws, tmp_path):
    wrong = dict(BERT_TARGETS)
    name = next(iter(wrong))
    wrong[name] = (wrong[name][0] + 1, *wrong[name][1:])  # no such shape in the base
    f = tmp_path / "bad.safetensors"
    fmt.save_file(make_adapter(wrong, seed=2), f)
    before = _blobs(staged_ws.store)
    with pytest.raises(BaseModelError):
        staged_ws.register(f, name="bad", task="t", base="tiny")
    assert _leftovers(staged_ws.store) == [] and _blobs(staged_ws.store) == before
    assert staged_ws.list_versions() == []


def test_a_failed_staged_write_is_one_line_and_changes_nothing(staged_ws, tmp_path, monkeypatch):
    def broken(self, fd):
        import errno
        import os

        os.close(fd)
        self._error = OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("adapterhub.store.StagedBlob._write", broken)
    f = _canonical_file(staged_ws, tmp_path / "a.safetensors", 3)
    with pytest.raises(StoreError, match="no space left on device"):
        staged_ws.register(f, name="a", task="t", base="tiny")
    assert _leftovers(staged_ws.store) == [] and _blobs(staged_ws.store) == []
    assert staged_ws.list_versions() == []


def test_gc_removes_a_staged_temp_left_by_a_killed_process(staged_ws):
    folder = staged_ws.store.root / "staging"
    folder.mkdir(exist_ok=True)
    (folder / ".staged.abc.tmp").write_bytes(b"half")
    res = staged_ws.store.gc([])
    assert res.temp_files_removed == 1 and _leftovers(staged_ws.store) == []


def test_a_planted_symlink_for_the_staging_folder_is_refused(staged_ws, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (staged_ws.store.root / "staging").symlink_to(outside)
    f = _canonical_file(staged_ws, tmp_path / "a.safetensors", 4)
    with pytest.raises(StoreError, match="symlink"):
        staged_ws.register(f, name="a", task="t", base="tiny")
    assert list(outside.iterdir()) == [] and staged_ws.list_versions() == []

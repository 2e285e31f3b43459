"""A pull streams the weights straight into a staged temp file of the store (issue 19): one GET per file (no
HEAD: the GET's own headers are checked before its body), hashed and written while it downloads, renamed into
place by the registration; the Hub cache gets a hard link, and bytes the store still holds are not downloaded
again. A ``gc`` between the staging and the registration (no grace period, another process) leaves the staged
file alone: it is locked by the pulling process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub.hub import client as hub_client
from adapterhub.hub.client import pull, push
from adapterhub.store import BlobStore
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from test_hub import _register_two, new_ws


def _pull_requests(server: HubServer, since: int) -> list[tuple[str, str]]:
    return [(q.method, q.path.rsplit("/", 1)[-1]) for q in server.requests[since:] if q.kind == "resolve"]


def _staging(ws: Workspace) -> list[str]:
    folder = ws.store.root / "staging"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _bob(tmp_path: Path) -> Workspace:
    ws = new_ws(tmp_path / "bob")
    ws.add_base("minilm", "minilm")
    return ws


def test_a_pull_makes_one_get_per_file_and_no_head(hub_server: HubServer, ws_a: Workspace, tmp_path: Path) -> None:
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    since = len(hub_server.requests)
    got = pull(ws_b, "alice/rt@v1")
    assert got.registered and ws_b.adapter_bytes(got.ref) == ws_a.adapter_bytes(r1)
    assert _pull_requests(hub_server, since) == [("GET", "adapterhub.json"), ("GET", "adapter.safetensors")]
    assert [q.kind for q in hub_server.requests[since:] if q.kind != "agent_harnesses"] == ["resolve", "resolve"]
    ws_b.close()


def test_the_download_becomes_the_blob_and_the_cache_entry(hub_server: HubServer, ws_a: Workspace,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No second write of the bytes: the staged file the download went into is the store's blob, and the cache's
    entry is a hard link to it (same inode); no temp file anywhere."""
    from adapterhub import store as store_mod

    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    writes: list[Path] = []
    real = store_mod._write_blob
    monkeypatch.setattr(store_mod, "_write_blob", lambda p, d: (writes.append(p), real(p, d))[1])
    got = pull(ws_b, "alice/rt@v1", cache_dir=tmp_path / "cache")
    blob = ws_b.store.path(got.content_hash)
    cached = next((tmp_path / "cache").glob(f"*/blobs/{got.content_hash}"))
    assert writes == [] and blob.stat().st_ino == cached.stat().st_ino
    assert _staging(ws_b) == [] and not list((tmp_path / "cache").glob("*/tmp/*"))
    ws_b.close()


def test_bytes_the_store_still_holds_are_not_downloaded_again(hub_server: HubServer, ws_a: Workspace,
                                                              tmp_path: Path) -> None:
    """Removed from the catalog, not yet collected, no cache: the next pull reads (and verifies) the store's blob."""
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    got = pull(ws_b, "alice/rt@v1", cache_dir=tmp_path / "cache-1")
    ws_b.remove(got.ref)
    assert ws_b.store.has(got.content_hash)
    since = len(hub_server.requests)
    again = pull(ws_b, "alice/rt@v1", name="again", cache_dir=tmp_path / "cache-2")
    assert again.registered and ws_b.adapter_bytes(again.ref) == ws_a.adapter_bytes(r1)
    assert _pull_requests(hub_server, since) == [("GET", "adapterhub.json")]
    ws_b.close()


def test_a_gc_between_staging_and_registration_leaves_the_staged_file(hub_server: HubServer, ws_a: Workspace,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process runs ``gc`` (no grace period) after the download was staged and before it is registered:
    it must not take the staged temp file (before: the pull then failed), and it removes a stale one of a dead
    process in the same run."""
    monkeypatch.setattr("adapterhub.store.STAGE_MIN_BYTES", 1)  # (the old pull staged 1 MiB or more only)
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    home = tmp_path / "bob"
    runs: list[str] = []
    real = Workspace.register_many

    def gc_first(self: Workspace, *args: object, **kwargs: object) -> object:
        assert len(_staging(self)) == 1  # the download, staged and locked
        (self.store.root / "staging" / ".staged.dead.tmp").write_bytes(b"left by a killed pull")
        code = ("import sys; from adapterhub.workspace import Workspace; ws = Workspace.open(sys.argv[1]); "
                "print(ws.gc().temp_files_removed)")
        p = subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        runs.append(p.stdout.strip())
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Workspace, "register_many", gc_first)
    got = pull(ws_b, "alice/rt@v1")
    assert runs == ["1"]  # the dead process's temp file only
    assert got.registered and ws_b.adapter_bytes(got.ref) == ws_a.adapter_bytes(r1)
    assert _staging(ws_b) == []
    ws_b.close()


def test_gc_skips_a_locked_staged_file_and_removes_it_once_released(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    staged = store.stage()
    staged.feed(b"abc")
    assert staged.end(b"abc") == hub_client.sha256_hex(b"abc")
    tmp = staged.wait()
    assert store.gc([]).temp_files_removed == 0 and tmp.exists()
    staged.discard()
    assert not tmp.exists() and not (tmp_path / "store" / "staging").exists()


def test_a_refused_download_leaves_no_staged_file_and_no_blob(hub_server: HubServer, ws_a: Workspace,
                                                              tmp_path: Path) -> None:
    """Bytes that do not hash to the card's content hash (a tampering server): refused after the streamed
    download, nothing in the store, the staging or the cache."""
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    blobs = sorted(ws_b.store.iter_digests())
    hub_server.tamper("adapter.safetensors")
    with pytest.raises(hub_client.HubError, match="sha256 mismatch"):
        pull(ws_b, "alice/rt@v1", cache_dir=tmp_path / "cache")
    assert sorted(ws_b.store.iter_digests()) == blobs and _staging(ws_b) == []
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert ws_b.list_versions() == []
    ws_b.close()


@pytest.mark.parametrize("threaded", [True, False])
def test_a_streamed_stage_hashes_exactly_what_it_writes(tmp_path: Path, threaded: bool) -> None:
    store = BlobStore(tmp_path / "store")
    chunks = [bytes([i]) * (1000 + i) for i in range(50)]
    data = b"".join(chunks)
    with store.stage(threaded=threaded) as staged:
        for c in chunks:
            staged.feed(c)
        assert staged.end(data) == hub_client.sha256_hex(data)
        digest = store.put_bytes(data, staged=staged)
    assert store.get_bytes(digest) == data and list((tmp_path / "store" / "staging").iterdir()) == []
    with store.stage(threaded=threaded) as staged:  # given up half-way (a failed download): nothing left
        staged.feed(b"half")
        tmp = staged.tmp
    assert tmp is not None and not tmp.exists() and not (tmp_path / "store" / "staging").exists()


def test_a_failed_streamed_write_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from adapterhub.errors import StoreError

    store = BlobStore(tmp_path / "store")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with store.stage(threaded=False) as staged:
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(StoreError, match="no space left on device"):
            staged.feed(b"abc")
        monkeypatch.undo()
    assert not (tmp_path / "store" / "staging").exists()


def test_a_large_pull_hashes_on_the_stage_thread(hub_server: HubServer, ws_a: Workspace, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights at or over STREAM_THREAD_MIN_BYTES (lowered here) go through the stage's worker thread: same
    result, the download renamed into place."""
    monkeypatch.setattr(hub_client, "STREAM_THREAD_MIN_BYTES", 1)
    modes: list[bool] = []
    real = BlobStore.stage
    monkeypatch.setattr(BlobStore, "stage", lambda self, data=None, *, threaded=True: (
        modes.append(threaded), real(self, data, threaded=threaded))[1])
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    got = pull(ws_b, "alice/rt@v1")
    assert modes == [True] and got.registered and ws_b.adapter_bytes(got.ref) == ws_a.adapter_bytes(r1)
    assert _staging(ws_b) == []
    ws_b.close()

"""A push's and a pull's own fixed work (issue 19: at ~1 ms per request it is what the ratios to upload_folder /
snapshot_download measure): the catalog statements each one runs, a pull's registration in one transaction (no
dry run when its blobs only need renaming into place) that still leaves nothing behind when it is refused or fails,
and the staged download's write-back started behind it."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import event

import adapterhub.faults
from adapterhub import store as store_mod
from adapterhub.catalog.records import Parent
from adapterhub.errors import CatalogError, RefError
from adapterhub.hub.client import pull, push
from adapterhub.store import BlobStore
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from test_hub import _register_two, make_adapter, new_ws


@pytest.fixture
def statements() -> Iterator[Any]:
    """``count(ws)``: a context manager recording the SQL statements (PRAGMAs left out) ``ws`` runs meanwhile."""
    import contextlib

    @contextlib.contextmanager
    def count(ws: Workspace) -> Iterator[list[str]]:
        seen: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if not statement.lstrip().upper().startswith("PRAGMA"):
                seen.append(" ".join(statement.split()))

        event.listen(ws.engine, "before_cursor_execute", record)
        try:
            yield seen
        finally:
            event.remove(ws.engine, "before_cursor_execute", record)
    return count


def _bob(tmp_path: Path) -> Workspace:
    ws = new_ws(tmp_path / "bob")
    ws.add_base("minilm", "minilm")
    return ws


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------------------------ push

def test_a_push_reads_the_catalog_once_and_records_with_one_update(hub_server: HubServer, ws_a: Workspace,
                                                                    statements: Any) -> None:
    """Version, tags, metrics, base, "has parents" and "pushed there before" in one read transaction of three
    statements, then one UPDATE by id (before: resolve, get_base, has_parents, pushed_to, and a resolve + update in
    set_hub: 11 statements)."""
    r1, _ = _register_two(ws_a)
    with statements(ws_a) as seen:
        res = push(ws_a, r1, repo="alice/new")
    assert res.uploaded
    assert [s.split()[0] for s in seen] == ["SELECT", "SELECT", "SELECT", "UPDATE"], seen
    v = ws_a.resolve(r1)
    assert (v.hub_repo, v.hub_commit, v.hub_tag, v.hub_endpoint) == ("alice/new", res.commit, "v1", hub_server.url)


def test_the_push_snapshot_is_what_its_single_reads_return(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, r2 = _register_two(ws_a)
    ws_a.tag(r2, "prod")
    push(ws_a, r1, repo="alice/rt")
    for ref in (r1, r2, "rt", "rt@prod", "rt@~1", f"sha256:{ws_a.resolve(r2).content_hash[:16]}"):
        for repo in ("alice/rt", "alice/other", None):
            v, base, has_parents, pushed = ws_a.push_snapshot(ref, repo, hub_server.url)
            want = ws_a.resolve(ref)
            assert dataclasses.asdict(v) == dataclasses.asdict(want)
            assert dataclasses.asdict(base) == dataclasses.asdict(ws_a.get_base(want.base, resolve_path=False))
            assert has_parents == ws_a.has_parents(want.id) == (want.number == 2)
            assert pushed == (None if repo is None else ws_a.pushed_to("rt", repo, hub_server.url))
    assert ws_a.push_snapshot(r1, "alice/rt", "http://elsewhere")[3] is False
    for bad in ("nope", "rt@9", "rt@missing"):
        with pytest.raises(RefError):
            ws_a.push_snapshot(bad, "alice/rt", hub_server.url)


def test_set_hub_by_id_refuses_a_removed_version(ws_a: Workspace) -> None:
    r1, _ = _register_two(ws_a)
    v = ws_a.resolve(r1)
    ws_a.set_hub(r1, repo="alice/x", commit="a" * 40, tag="v1", endpoint="http://h", version_id=v.id)
    assert ws_a.resolve(r1).hub_commit == "a" * 40
    with pytest.raises(RefError, match="removed"):
        ws_a.set_hub(r1, repo="alice/x", commit="b" * 40, tag="v1", endpoint="http://h", version_id=10 ** 6)


# ------------------------------------------------------------------------------------------------ pull

def test_a_pull_registers_in_one_transaction_without_a_dry_run(hub_server: HubServer, ws_a: Workspace,
                                                                tmp_path: Path, statements: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The staged download only needs renaming into place: the batch is tried once, inside the transaction that
    commits it (before: a dry run first, and the base read three times)."""
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    calls: list[int] = []
    real = ws_b._add_batch
    monkeypatch.setattr(ws_b, "_add_batch", lambda s, bases, prepared: (calls.append(1), real(s, bases, prepared))[1])
    with statements(ws_b) as seen:
        got = pull(ws_b, "alice/rt@v1")
    assert got.registered and calls == [1]
    reads_of_the_base = [s for s in seen if s.startswith("SELECT") and "FROM base_models" in s and "JOIN" not in s]
    assert len(reads_of_the_base) == 1, seen
    assert ws_b.adapter_bytes(got.ref) == ws_a.adapter_bytes(r1) and ws_b.verify()["problems"] == []


def test_a_pull_refused_by_its_transaction_leaves_nothing(hub_server: HubServer, ws_a: Workspace,
                                                          tmp_path: Path) -> None:
    """The user names a local adapter of another kind: refused inside the registration's transaction, before the
    staged download is renamed into place: the store (files and folders), the staging and the catalog are as they
    were."""
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    ws_b.register(make_adapter(ws_b, 9), name="mine", task="rt-sentiment", base="minilm", kind="merge")
    before, versions = _files(ws_b.store.root), [v.ref for v in ws_b.list_versions()]
    with pytest.raises(CatalogError, match="kind merge"):
        pull(ws_b, "alice/rt@v1", name="mine", cache_dir=tmp_path / "cache")
    assert _files(ws_b.store.root) == before
    assert [v.ref for v in ws_b.list_versions()] == versions


def test_a_pull_failing_after_its_blob_was_placed_removes_it(hub_server: HubServer, ws_a: Workspace, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure between the rename into place and the commit (the transaction rolled back): the new blob is
    removed again, no row is left, nothing stays staged; the same pull then works."""
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = _bob(tmp_path)
    blobs = sorted(ws_b.store.iter_digests())
    placed: list[bool] = []
    armed = [True]

    def fail_before_commit(name: str) -> None:
        if name == "register.before-commit" and armed:
            placed.append(ws_b.store.has(ws_a.resolve(r1).content_hash))
            raise OSError("injected failure before the commit")

    monkeypatch.setattr(adapterhub.faults, "fault_point", fail_before_commit)
    with pytest.raises(OSError, match="injected"):
        pull(ws_b, "alice/rt@v1")
    assert placed == [True]
    assert sorted(ws_b.store.iter_digests()) == blobs and ws_b.list_versions() == []
    staging = ws_b.store.root / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    armed.clear()
    got = pull(ws_b, "alice/rt@v1")
    assert got.registered and ws_b.verify()["problems"] == [] and ws_b.verify()["orphans"] == []


def test_the_pull_snapshot_is_what_its_single_reads_return(ws_a: Workspace) -> None:
    r1, _ = _register_two(ws_a)
    ws_a.set_hub(r1, repo="alice/rt", commit="a" * 40, tag="v1", endpoint="http://h")
    base, versions = ws_a.pull_snapshot("minilm", "rt")
    assert dataclasses.asdict(base) == dataclasses.asdict(ws_a.get_base("minilm", resolve_path=False))
    assert [(v.base, v.hub_repo, v.hub_endpoint) for v in versions] == [
        (x.base, x.hub_repo, x.hub_endpoint) for x in ws_a.log("rt")] == [("minilm", "alice/rt", "http://h"),
                                                                           ("minilm", None, None)]
    assert ws_a.pull_snapshot("nope", "nope") == (None, [])
    assert ws_a.pull_snapshot(None, "rt")[0] is None


def test_register_many_of_bytes_to_write_still_tries_the_batch_first(ws_a: Workspace,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that are neither staged nor stored are written only after the batch was tried (and rolled back)."""
    from adapterhub.catalog.records import NewVersion

    old = ws_a.register(make_adapter(ws_a, 61), name="old", task="t", base="minilm")
    calls: list[int] = []
    real = ws_a._add_batch
    monkeypatch.setattr(ws_a, "_add_batch", lambda s, bases, prepared: (calls.append(1), real(s, bases, prepared))[1])
    ws_a.register_many([NewVersion(make_adapter(ws_a, 62), name="new", task="t", base="minilm",
                                   parents=(Parent(old.ref, "finetuned_from"),))])
    assert calls == [1, 1]


# ------------------------------------------------------------------------------------------------ write-back

def test_a_streamed_stage_starts_the_write_back_behind_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every WRITEBACK_BYTES written, the pages just written are handed to the kernel's write-back (contiguous
    ranges from 0); the bytes, their hash and the final fsync are as before."""
    ranges: list[tuple[int, int]] = []
    monkeypatch.setattr(store_mod, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(store_mod, "_sync_file_range", lambda: lambda fd, off, n: ranges.append((off, n)))
    store = BlobStore(tmp_path / "store")
    chunks = [bytes([i % 251]) * 700 for i in range(20)]
    data = b"".join(chunks)
    with store.stage(threaded=True) as staged:
        for c in chunks:
            staged.feed(c)
        assert staged.end(data) == hashlib.sha256(data).hexdigest()
        assert staged.wait().read_bytes() == data
    assert ranges and ranges[0][0] == 0 and all(n >= 1000 for _, n in ranges)
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
    assert ranges[-1][0] + ranges[-1][1] <= len(data)


def test_the_write_back_call_is_harmless_on_a_real_file(tmp_path: Path) -> None:
    start = store_mod._sync_file_range()
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    if start is not None:  # Linux
        import os

        fd = os.open(p, os.O_RDWR)
        try:
            start(fd, 0, 10000)
        finally:
            os.close(fd)
    assert p.read_bytes() == b"x" * 10000

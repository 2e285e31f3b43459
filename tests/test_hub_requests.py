"""What a push asks of the Hub (issue 19): the requests counted on the local Hub server, and the weights hashed
once (the upload's own sha256), before any request."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapterhub.errors import HubError, StoreError
from adapterhub.hub.client import pull, push
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from test_hub import _register_two, make_adapter, new_ws

NEW_REPO_PUSH = ["create_repo", "validate_yaml", "preupload", "lfs_batch", "lfs_upload", "lfs_verify", "commit", "tag"]


def _push_kinds(hub_server: HubServer, since: int) -> list[str]:
    """The requests since ``since`` without huggingface_hub's own once-a-process telemetry fetch (the agent
    harness registry for its User-Agent), which the first Hub call of a process makes, whatever it is."""
    return [q.kind for q in hub_server.requests[since:] if q.kind != "agent_harnesses"]


def test_push_to_a_new_repo_makes_the_requests_of_upload_folder_plus_the_tag(hub_server: HubServer,
                                                                             ws_a: Workspace) -> None:
    """create_repo + create_commit's six + the tag: no refs listing (before: refs, create_repo, refs, ..., 10)."""
    r1, _ = _register_two(ws_a)
    since = len(hub_server.requests)
    res = push(ws_a, r1, repo="alice/new")
    assert _push_kinds(hub_server, since) == NEW_REPO_PUSH
    assert res.uploaded and hub_server.repos["alice/new"].tags == {"v1": res.commit}
    # the commit went on the repo's initial commit, and holds our three files
    assert [c.parent for c in hub_server.commits("alice/new")][:1] == [hub_server.commits("alice/new")[1].oid]
    files = hub_server.repos["alice/new"].commits[res.commit].files
    assert files["adapter.safetensors"].lfs_oid == ws_a.resolve(r1).content_hash


def test_push_to_a_repo_the_catalog_knows_lists_refs_first(hub_server: HubServer, ws_a: Workspace) -> None:
    """v2 goes where v1 went: no create_repo attempt, the head is compared (a lost commit answer) and is the
    commit's parent; pushing v2 again is a no-op of two listings."""
    r1, r2 = _register_two(ws_a)
    p1 = push(ws_a, r1, repo="alice/rt")
    since = len(hub_server.requests)
    p2 = push(ws_a, r2, repo="alice/rt")
    kinds = _push_kinds(hub_server, since)
    assert kinds[:2] == ["refs", "tree"] and "create_repo" not in kinds and kinds[-1] == "tag"
    assert hub_server.repos["alice/rt"].commits[p2.commit].parent == p1.commit
    since = len(hub_server.requests)
    again = push(ws_a, r2, repo="alice/rt")
    assert not again.uploaded and again.commit == p2.commit
    assert _push_kinds(hub_server, since) == ["refs", "tree", "tree"]


def test_push_from_another_home_to_an_existing_repo_goes_through_the_409(hub_server: HubServer, ws_a: Workspace,
                                                                         tmp_path: Path) -> None:
    """A home that never pushed there tries create_repo; the 409 sends it to the usual checks: v1 there with other
    weights is refused (nothing committed, no tag moved), v1 there with these weights is reused."""
    r1, _ = _register_two(ws_a)
    p1 = push(ws_a, r1, repo="alice/rt")
    other = new_ws(tmp_path / "other")
    other.add_base("minilm", "minilm")
    mine = other.register(make_adapter(other, 77), name="rt", task="rt-sentiment", base="minilm")
    commits = len(hub_server.commits("alice/rt"))
    since = len(hub_server.requests)
    with pytest.raises(HubError, match="already holds a different adapter"):
        push(other, mine.ref, repo="alice/rt")
    kinds = _push_kinds(hub_server, since)
    assert kinds[:2] == ["create_repo", "refs"] and next(q for q in hub_server.requests[since:] if q.kind == "create_repo").status == 409
    assert len(hub_server.commits("alice/rt")) == commits and hub_server.repos["alice/rt"].tags == {"v1": p1.commit}
    assert other.resolve(mine.ref).hub_repo is None
    # the same bytes as v1 (pulled into the other home): already there, nothing uploaded
    got = pull(other, "alice/rt@v1", name="copy")
    res = push(other, got.ref, repo="alice/rt")
    assert not res.uploaded and res.commit == p1.commit
    other.close()


def test_push_of_a_corrupt_blob_is_refused_before_the_repo_is_created(hub_server: HubServer,
                                                                      ws_a: Workspace) -> None:
    """The weights are hashed once (the upload's own sha256) and that happens before any request."""
    r1, _ = _register_two(ws_a)
    v = ws_a.resolve(r1)
    blob = ws_a.store.path(v.content_hash)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    since = len(hub_server.requests)
    with pytest.raises(HubError, match="does not hold this version's bytes"):
        push(ws_a, r1, repo="alice/bad")
    assert hub_server.requests[since:] == [] and "alice/bad" not in hub_server.repos
    blob.unlink()
    with pytest.raises(StoreError, match="missing"):
        push(ws_a, r1, repo="alice/bad")
    assert hub_server.requests[since:] == [] and "alice/bad" not in hub_server.repos


def _staging_files(ws: Workspace) -> list[str]:
    folder = ws.store.root / "staging"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_pull_renames_its_staged_copy_into_the_store(hub_server: HubServer, ws_a: Workspace, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With the size threshold lowered, the downloaded bytes are staged (written + fsynced beside the validation)
    and renamed into place by register_many: no second blob write, no temp file left."""
    from adapterhub import store as store_mod

    monkeypatch.setattr("adapterhub.store.STAGE_MIN_BYTES", 1)
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = new_ws(tmp_path / "bob")
    ws_b.add_base("minilm", "minilm")
    writes: list[Path] = []
    real = store_mod._write_blob
    monkeypatch.setattr(store_mod, "_write_blob", lambda p, d: (writes.append(p), real(p, d))[1])
    got = pull(ws_b, "alice/rt@v1")
    assert got.registered and ws_b.adapter_bytes(got.ref) == ws_a.adapter_bytes(r1)
    assert writes == [] and _staging_files(ws_b) == []
    ws_b.close()


def test_pull_refused_after_staging_leaves_no_blob_and_no_temp_file(hub_server: HubServer, ws_a: Workspace,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The local name is taken by another adapter: refused after the download (and the staging), so the staged
    temp file is removed and the store holds nothing new; the next pull under a free name works."""

    monkeypatch.setattr("adapterhub.store.STAGE_MIN_BYTES", 1)
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    ws_b = new_ws(tmp_path / "bob")
    ws_b.add_base("minilm", "minilm")
    mine = ws_b.register(make_adapter(ws_b, 5), name="alice--rt", task="rt-sentiment", base="minilm")
    blobs = sorted(ws_b.store.iter_digests())
    with pytest.raises(HubError, match="already exists"):
        pull(ws_b, "alice/rt@v1")
    assert sorted(ws_b.store.iter_digests()) == blobs and _staging_files(ws_b) == []
    assert [v.ref for v in ws_b.list_versions()] == [mine.ref]
    got = pull(ws_b, "alice/rt@v1", name="copy")
    assert got.registered and _staging_files(ws_b) == []
    ws_b.close()

"""Hub push/pull round trips against the local Hub-protocol server (adapterhub/testing/hubserver.py), never the internet."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterhub import format as fmt
from adapterhub.bases.sources import tensor_shapes
from adapterhub.catalog.records import Parent
from adapterhub.errors import HubError
from adapterhub.hub.cards import safe_repo_path
from adapterhub.hub.client import hub_versions, parse_repo_spec, pull, push
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace

TARGETS = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight")


def make_adapter(ws: Workspace, seed: int, *, density: float = 0.01, task: str = "rt-sentiment") -> fmt.SparseAdapter:
    """A random sparse adapter of the MiniLM base (real tensor names and shapes)."""
    shapes = tensor_shapes(ws.get_base("minilm").path)
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name in TARGETS:
        shape = shapes[name]
        numel = int(torch.tensor(shape).prod())
        k = max(1, int(numel * density))
        idx = torch.randperm(numel, generator=g)[:k]
        params[name] = fmt.SparseParam.from_flat(shape, idx, torch.randn(k, generator=g))
    card = {"task": task, "mask": {"method": "random", "density": density, "granularity": "element",
                                   "targets": list(TARGETS)}}
    return fmt.SparseAdapter(params, {}, card)


def new_ws(path: Path) -> Workspace:
    return Workspace.open(path)


def _register_two(ws: Workspace) -> tuple[str, str]:
    v1 = ws.register(make_adapter(ws, 1), name="rt", task="rt-sentiment", base="minilm",
                     metrics={"accuracy": 0.81}, training_config={"steps": 100, "lr": 1e-3})
    v2 = ws.register(make_adapter(ws, 2), name="rt", task="rt-sentiment", base="minilm",
                     parents=[Parent(v1.ref, "finetuned_from")], metrics={"accuracy": 0.84},
                     training_config={"steps": 200, "lr": 5e-4})
    return v1.ref, v2.ref


def _same_metadata(a, b) -> None:
    for field in ("content_hash", "size_bytes", "kind", "task", "base_fingerprint", "mask_method", "density",
                  "granularity", "block_size", "target_modules", "nnz", "nnz_per_param", "dtype", "mask_hash",
                  "training_config", "metrics"):
        assert getattr(a, field) == getattr(b, field), field


def test_push_v1_v2_then_pull_each_into_fresh_homes(hub_server: HubServer, ws_a: Workspace, tmp_path: Path) -> None:
    r1, r2 = _register_two(ws_a)
    p1 = push(ws_a, r1, repo="alice/rt")
    p2 = push(ws_a, r2, repo="alice/rt")
    assert p1.uploaded and p2.uploaded and (p1.tag, p2.tag) == ("v1", "v2")
    repo = hub_server.repos["alice/rt"]
    assert repo.tags == {"v1": p1.commit, "v2": p2.commit}
    assert [c.oid for c in hub_server.commits("alice/rt")][:2] == [p2.commit, p1.commit]
    assert len(hub_server.commits("alice/rt")) == 3  # the repo's initial commit + one per version
    assert sorted(repo.commits[p2.commit].files) == [".gitattributes", "README.md", "adapter.safetensors",
                                                     "adapterhub.json"]
    # the weights went the LFS way (preupload said lfs, batch API, PUT to the upload href)
    assert repo.commits[p2.commit].files["adapter.safetensors"].lfs_oid == ws_a.resolve(r2).content_hash
    assert hub_server.kinds()["lfs_upload"] == 2
    # the catalog records the Hub coordinates
    v2 = ws_a.resolve(r2)
    assert (v2.hub_repo, v2.hub_commit, v2.hub_tag) == ("alice/rt", p2.commit, "v2")
    assert v2.hub_endpoint == hub_server.url
    card = json.loads(hub_server.file_bytes("alice/rt", "v2", "adapterhub.json"))
    assert card["content_hash"] == v2.content_hash and card["version"] == 2
    assert card["lineage"][0]["relation"] == "finetuned_from"
    assert card["lineage"][0]["parent"]["hub"] == {"repo": "alice/rt", "commit": p1.commit, "tag": "v1"}

    # pull @v1 into a fresh home: same bytes, hash, metadata; the base is materialised from its built-in source
    ws_b = new_ws(tmp_path / "bob")
    got1 = pull(ws_b, "alice/rt@v1")  # named after the repo id (owner--name), never the card's name
    assert got1.registered and got1.commit == p1.commit and got1.ref == "alice--rt@1"
    b1, a1 = ws_b.resolve(got1.ref), ws_a.resolve(r1)
    _same_metadata(a1, b1)
    assert ws_b.adapter_bytes(b1) == ws_a.adapter_bytes(a1)
    assert (b1.hub_repo, b1.hub_commit, b1.hub_tag) == ("alice/rt", p1.commit, "v1")
    edges = ws_b.parents(got1.ref)
    assert [e["relation"] for e in edges] == ["imported_from"]
    prov = edges[0]["params"]
    assert (prov["repo"], prov["revision"], prov["commit"]) == ("alice/rt", "v1", p1.commit)

    # @v2: its parent is now local, so the finetuned_from edge is rebuilt
    got2 = pull(ws_b, "alice/rt@v2")
    b2 = ws_b.resolve(got2.ref)
    _same_metadata(ws_a.resolve(r2), b2)
    rel = {(e["relation"], e["parent"]) for e in ws_b.parents(got2.ref)}
    assert rel == {("finetuned_from", "alice--rt@1"), ("imported_from", None)}

    # pulling again (by tag, by commit, by branch) is a no-op
    n = len(ws_b.list_versions())
    for spec in ("alice/rt@v2", f"alice/rt@{p2.commit}", "alice/rt@main", "alice/rt"):
        again = pull(ws_b, spec)
        assert not again.registered and again.ref == "alice--rt@2", spec
    assert len(ws_b.list_versions()) == n

    # pull @v2 alone into another fresh home: registered, its missing parent recorded as provenance
    ws_c = new_ws(tmp_path / "carol")
    got = pull(ws_c, "alice/rt@v2")
    assert got.ref == "alice--rt@1" and ws_c.resolve(got.ref).content_hash == v2.content_hash
    (edge,) = ws_c.parents(got.ref)
    assert edge["params"]["missing_parents"][0]["content_hash"] == a1.content_hash
    for w in (ws_b, ws_c):
        w.close()


def test_unchanged_repush_uploads_nothing(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, _ = _register_two(ws_a)
    first = push(ws_a, r1, repo="alice/rt")
    mark = len(hub_server.requests)
    again = push(ws_a, r1, repo="alice/rt")
    assert not again.uploaded and "already on the Hub" in again.message and again.commit == first.commit
    assert hub_server.uploaded_bytes(since=mark) == 0
    kinds = hub_server.kinds(since=mark)
    assert kinds["commit"] == kinds["lfs_upload"] == kinds["preupload"] == kinds["tag"] == 0
    assert len(hub_server.commits("alice/rt")) == 2


def test_merge_pushed_after_parents_pulls_with_parents_into_empty_catalog(
        hub_server: HubServer, ws_a: Workspace, tmp_path: Path) -> None:
    ea = ws_a.register(make_adapter(ws_a, 11, task="sms-spam"), name="spam", task="sms-spam", base="minilm")
    eb = ws_a.register(make_adapter(ws_a, 12, task="trec"), name="trec", task="trec", base="minilm")
    # the composer's sparse-space merge: a `merge` version with merged_from edges (weight + method)
    from adapterhub.merging import merge

    m = merge(ws_a, [ea.ref, eb.ref], "task-arithmetic", weights=[0.5, 0.5], name="spam-trec")
    assert m.kind == "merge"
    push(ws_a, ea.ref, repo="alice/spam")
    push(ws_a, eb.ref, repo="alice/trec")
    pm = push(ws_a, m.ref, repo="alice/spam-trec")

    from huggingface_hub import ModelCard
    readme = ModelCard(hub_server.file_bytes("alice/spam-trec", "v1", "README.md").decode())
    assert readme.data.base_model_relation == "merge"
    assert sorted(readme.data.base_model) == ["alice/spam", "alice/trec"]

    ws_e = new_ws(tmp_path / "empty")  # no base, no adapters
    res = pull(ws_e, "alice/spam-trec@v1", with_parents=True)
    assert res.registered and res.commit == pm.commit
    assert sorted(p.repo for p in res.parents) == ["alice/spam", "alice/trec"]
    got = ws_e.resolve(res.ref)
    assert got.kind == "merge" and got.content_hash == m.content_hash
    edges = ws_e.parents(res.ref)
    merged_from = sorted((e["parent"], e["weight"], e["params"]["method"]) for e in edges
                         if e["relation"] == "merged_from")
    assert merged_from == [("alice--spam@1", 0.5, "task-arithmetic"), ("alice--trec@1", 0.5, "task-arithmetic")]
    for parent_ref, src in (("alice--spam@1", ea), ("alice--trec@1", eb)):
        pv = ws_e.resolve(parent_ref)
        assert pv.content_hash == src.content_hash
        assert [e["relation"] for e in ws_e.parents(parent_ref)] == ["imported_from"]
    # the whole ancestry is there: 2 merged_from + 3 imported_from edges
    assert len(ws_e.lineage(res.ref)) == 5
    assert len(ws_e.list_versions()) == 3
    ws_e.close()


def test_tampered_download_is_refused_and_nothing_registered(hub_server: HubServer, ws_a: Workspace,
                                                             tmp_path: Path) -> None:
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    hub_server.tamper("adapter.safetensors")
    ws_b = new_ws(tmp_path / "bob")
    ws_b.add_base("minilm", "minilm")
    with pytest.raises(HubError, match="sha256 mismatch"):
        pull(ws_b, "alice/rt@v1")
    assert ws_b.list_versions() == []
    assert list(ws_b.store.iter_digests()) == []
    # the bad copy was dropped from the Hub cache, so once the server behaves the pull works
    hub_server.untamper()
    ok = pull(ws_b, "alice/rt@v1")
    assert ok.registered and ok.content_hash == ws_a.resolve(r1).content_hash
    ws_b.close()


@pytest.mark.parametrize("kind,mode,when,expected", [
    ("commit", "status", "before", "commit: HTTP 500 from {url} for alice/rt@main: injected fault on commit"),
    # the server drops the connection after committing: the client only sees the transport error
    ("commit", "drop", "after", "commit: cannot reach the Hub at {url} (RemoteProtocolError)"),
    ("tag", "status", "before", "tag: HTTP 500 from {url} for alice/rt@v1: injected fault on tag"),
    ("commit", "status", "after", "commit: HTTP 500 from {url} for alice/rt@main: injected fault on commit"),
])
def test_failure_mid_push_then_retry_makes_no_duplicate_commit(hub_server: HubServer, ws_a: Workspace,
                                                               kind: str, mode: str, when: str,
                                                               expected: str) -> None:
    r1, _ = _register_two(ws_a)
    hub_server.fail(kind, mode=mode, when=when, status=500)
    with pytest.raises(HubError) as ei:
        push(ws_a, r1, repo="alice/rt")
    assert str(ei.value) == expected.format(url=hub_server.url)
    assert ws_a.resolve(r1).hub_repo is None  # catalog unchanged on failure
    res = push(ws_a, r1, repo="alice/rt")
    assert res.tag == "v1"
    commits = hub_server.commits("alice/rt")
    assert len(commits) == 2, [c.message for c in commits]  # initial + exactly one for v1
    assert hub_server.repos["alice/rt"].tags == {"v1": commits[0].oid} and res.commit == commits[0].oid
    assert ws_a.resolve(r1).hub_commit == res.commit


def test_server_down_gives_a_clear_error(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, _ = _register_two(ws_a)
    url = hub_server.url
    hub_server.stop()
    with pytest.raises(HubError, match="cannot reach the Hub"):
        push(ws_a, r1, repo="alice/rt", endpoint=url)
    assert ws_a.resolve(r1).hub_repo is None


def test_model_card_parses_with_huggingface_hub(hub_server: HubServer, ws_a: Workspace, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard, metadata_load

    r1, r2 = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    push(ws_a, r2, repo="alice/rt")
    readme = tmp_path / "README.md"
    readme.write_bytes(hub_server.file_bytes("alice/rt", "v2", "README.md"))
    meta = metadata_load(readme)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "adapterhub"
    assert {"adapterhub", "sparse-adapter", "rt-sentiment"} <= set(meta["tags"])
    assert meta["datasets"] == ["rt-sentiment"] and meta["metrics"] == ["accuracy"]
    card = ModelCard.load(readme)
    assert card.data.eval_results[0].metric_value == pytest.approx(0.84)
    assert "finetuned_from" in card.text and "alice/rt@v1" in card.text  # lineage as a link
    assert "random" in card.text  # mask statistics


def test_hub_versions_lists_tags_with_hashes(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, r2 = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    push(ws_a, r2, repo="alice/rt")
    hub_server.create_tag("alice/rt", "release", "v2")  # not a version tag: ignored
    vs = hub_versions("alice/rt")
    assert [(v.tag, v.version, v.content_hash) for v in vs] == [
        ("v1", 1, ws_a.resolve(r1).content_hash), ("v2", 2, ws_a.resolve(r2).content_hash)]
    with pytest.raises(HubError, match="not found"):
        hub_versions("alice/nothing")


def test_branch_and_tag_conflict(hub_server: HubServer, ws_a: Workspace, tmp_path: Path) -> None:
    r1, r2 = _register_two(ws_a)
    res = push(ws_a, r1, repo="alice/rt", branch="dev")
    repo = hub_server.repos["alice/rt"]
    assert repo.branches["dev"] == res.commit and repo.branches["main"] != res.commit
    # someone else's v2 already there with different weights: refused, catalog unchanged
    hub_server.commit_files("alice/other", {"adapter.safetensors": b"\0" * 64, "adapterhub.json": b"{}"})
    hub_server.create_tag("alice/other", "v2")
    with pytest.raises(HubError, match="different adapter"):
        push(ws_a, r2, repo="alice/other")
    assert ws_a.resolve(r2).hub_repo is None


def test_filenames_escaping_the_download_folder_are_refused(hub_server: HubServer, ws_a: Workspace,
                                                            tmp_path: Path) -> None:
    r1, _ = _register_two(ws_a)
    push(ws_a, r1, repo="alice/rt")
    card = json.loads(hub_server.file_bytes("alice/rt", "v1", "adapterhub.json"))
    card["file"] = "../../escape.safetensors"
    hub_server.commit_files("alice/rt", {"adapterhub.json": json.dumps(card).encode()})
    ws_b = new_ws(tmp_path / "bob")
    with pytest.raises(HubError, match="escape"):
        pull(ws_b, "alice/rt@main")
    assert ws_b.list_versions() == []
    assert not any("escape" in r.path for r in hub_server.requests)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\\b", "C:x", "", "a//b", "./a"])
def test_safe_repo_path_refuses(bad: str) -> None:
    with pytest.raises(HubError):
        safe_repo_path(bad)


def test_parse_repo_spec() -> None:
    assert parse_repo_spec("a/b") == ("a/b", None)
    assert parse_repo_spec("a/b@v3") == ("a/b", "v3")
    assert parse_repo_spec("a/b@feature/x") == ("a/b", "feature/x")
    for bad in ("ab", "a/b/c", "a/b@", "a/../b", "a/b@../x", "../b@v1"):
        with pytest.raises(HubError):
            parse_repo_spec(bad)


def test_local_folder_base_must_exist_on_the_pulling_side(hub_server: HubServer, tiny_bert_dir: Path,
                                                          tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    ws = new_ws(tmp_path / "a")
    ws.add_base("tiny", str(tiny_bert_dir))
    shapes = tensor_shapes(tiny_bert_dir)
    name = "encoder.layer.0.attention.self.query.weight"
    param = fmt.SparseParam.from_flat(shapes[name], torch.tensor([0, 5, 77]), torch.tensor([0.1, -0.2, 0.3]))
    v = ws.register(fmt.SparseAdapter({name: param}), name="tiny-x", task="t", base="tiny")
    res = push(ws, v.ref, repo="alice/tiny-x")
    readme = ModelCard(hub_server.file_bytes("alice/tiny-x", "v1", "README.md").decode())
    assert readme.data.base_model is None and readme.data.base_model_relation == "adapter"

    ws_b = new_ws(tmp_path / "b")
    with pytest.raises(HubError, match="not in this catalog"):
        pull(ws_b, "alice/tiny-x@main")
    assert ws_b.list_versions() == []
    ws_b.add_base("tiny", str(tiny_bert_dir))
    got = pull(ws_b, f"alice/tiny-x@{res.commit[:12]}")  # a short commit id works too
    info = ws_b.resolve(got.ref)
    assert info.content_hash == v.content_hash and info.hub_tag == "v1" and info.hub_commit == res.commit
    for w in (ws, ws_b):
        w.close()


def test_transient_lfs_upload_failure_is_retried_by_the_client(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, _ = _register_two(ws_a)
    hub_server.fail("lfs_upload", status=500)  # huggingface_hub retries LFS PUTs with backoff
    res = push(ws_a, r1, repo="alice/rt")
    assert res.uploaded and len(hub_server.commits("alice/rt")) == 2
    puts = [r for r in hub_server.requests if r.kind == "lfs_upload"]
    assert [r.status for r in puts] == [500, 200]
    assert hub_server.file_bytes("alice/rt", "v1", "adapter.safetensors") == ws_a.adapter_bytes(r1)

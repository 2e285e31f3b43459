"""Trust boundaries of `adapterhub pull` (issue 12, items 2 and 3), through the real CLI in a process.

* A pull is all-or-nothing: whatever fails (a parent's download, a base that does not match, a card the
  catalog refuses, canonical bytes whose hash differs from the card), the catalog rows, the blob store
  and the bases are exactly as before, and the error is one line without a traceback.
* A remote card never chooses the local name: the default is ``OWNER--NAME`` from the repo id (parents
  pulled with ``--with-parents`` too); a version is added to an existing local adapter only when the user
  named it with ``--name`` and it is on the same base, and the command says so.

The Hub is adapterhub/testing/hubserver.py on 127.0.0.1; hostile repos are crafted with ``HubServer.commit_files``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub import format as fmt
from adapterhub.catalog.records import Parent
from adapterhub.hub.client import push
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from catalog_util import BERT_TARGETS, home_snapshot, make_adapter as make_tiny_adapter
from test_hub import make_adapter
from trust_util import assert_no_traceback, assert_one_line_failure, diff_snapshots, run_cli, tree_snapshot

# ------------------------------------------------------------------------------------------------ helpers


def _alice(tmp_path: Path) -> Workspace:
    """The publisher's home: base ``minilm`` (built-in, so a fresh home can materialise it too)."""
    ws = Workspace.open(tmp_path / "alice")
    ws.add_base("minilm", "minilm")
    return ws


def _state(tmp_path: Path, home: Path) -> tuple:
    """Catalog rows + home files, and every file of the sandbox (Hub caches and SQLite's file aside:
    a pull may fill its download cache)."""
    files, rows = home_snapshot(home)
    files = [f for f in files if not f[0].startswith("cache/")]
    return ((files, rows),
            tree_snapshot(tmp_path, skip=(tmp_path / "hf_home", home / "cache", home / "catalog.db")))


def _assert_unchanged(tmp_path: Path, home: Path, before: tuple) -> None:
    after = _state(tmp_path, home)
    assert after[0] == before[0], "catalog rows or home files changed"
    assert diff_snapshots(before[1], after[1]) == []


def _card(hub: HubServer, repo: str, rev: str = "v1") -> dict:
    return json.loads(hub.file_bytes(repo, rev, "adapterhub.json"))


def _craft(hub: HubServer, repo: str, weights: bytes, card: dict) -> None:
    """A repo whose v1 holds exactly these weights and this card."""
    hub.commit_files(repo, {"adapter.safetensors": weights, "adapterhub.json": json.dumps(card).encode()})
    hub.create_tag(repo, "v1")


def _pushed_good(hub: HubServer, tmp_path: Path, repo: str = "mallory/rt") -> str:
    """Someone else's adapter whose card calls itself ``good``, pushed to ``repo``; returns its hash."""
    ws = _alice(tmp_path)
    v = ws.register(make_adapter(ws, 77), name="good", task="rt-sentiment", base="minilm")
    push(ws, v.ref, repo=repo)
    ws.close()
    return v.content_hash


def _bob_with_good(tmp_path: Path, *, base: str = "minilm", tiny_dir: Path | None = None) -> Path:
    """The user's home with their own adapter ``good`` (one version) on ``base``."""
    home = tmp_path / "bob"
    with Workspace.open(home) as ws:
        if base == "minilm":
            ws.add_base("minilm", "minilm")
            ws.register(make_adapter(ws, 5), name="good", task="mine", base="minilm")
        else:
            ws.add_base(base, str(tiny_dir))
            ws.register(make_tiny_adapter(BERT_TARGETS, seed=5), name="good", task="mine", base=base)
    return home


def _empty_home(tmp_path: Path, name: str = "bob") -> Path:
    home = tmp_path / name
    Workspace.open(home).close()  # the catalog exists (migrated), nothing in it
    return home


# ------------------------------------------------------------------------------------------------ item 2


def test_with_parents_second_parent_fails_leaves_catalog_and_store_unchanged(
        hub_server: HubServer, tmp_path: Path) -> None:
    """The first parent downloads fine, the second parent's repo is gone: nothing is registered (not the
    first parent, not the base it needed); once the repo is back the same pull names every version after
    its own repo id."""
    from adapterhub.merging import merge

    ws = _alice(tmp_path)
    ea = ws.register(make_adapter(ws, 11, task="sms-spam"), name="spam", task="sms-spam", base="minilm")
    eb = ws.register(make_adapter(ws, 12, task="trec"), name="trec", task="trec", base="minilm")
    m = merge(ws, [ea.ref, eb.ref], "task-arithmetic", weights=[0.5, 0.5], name="spam-trec")
    push(ws, ea.ref, repo="alice/spam")
    push(ws, eb.ref, repo="alice/trec")
    push(ws, m.ref, repo="alice/spam-trec")
    ws.close()
    home = _empty_home(tmp_path)  # no base either: the pull would have to add minilm
    trec = hub_server.repos.pop("alice/trec")  # lineage is sorted by name: spam is pulled first
    before = _state(tmp_path, home)
    r = run_cli(home, "pull", "alice/spam-trec@v1", "--with-parents")
    assert_one_line_failure(r, contains="alice/trec")
    _assert_unchanged(tmp_path, home, before)
    assert any(q.path.startswith("/alice/spam/resolve/") for q in hub_server.requests)  # spam was fetched

    hub_server.repos["alice/trec"] = trec
    r = run_cli(home, "pull", "alice/spam-trec@v1", "--with-parents", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ref"] == "alice--spam-trec@1"
    assert sorted(p["ref"] for p in doc["parents"]) == ["alice--spam@1", "alice--trec@1"]
    with Workspace.open(home) as wb:
        assert sorted(v.ref for v in wb.list_versions()) == ["alice--spam-trec@1", "alice--spam@1", "alice--trec@1"]
        assert [b.name for b in wb.list_bases()] == ["minilm"]


def test_new_base_that_does_not_match_is_not_left_registered(hub_server: HubServer, tmp_path: Path) -> None:
    """The card names the built-in base but another fingerprint: the base is materialised and compared
    before anything is recorded, so the refused pull leaves no base row behind."""
    ws = _alice(tmp_path)
    v = ws.register(make_adapter(ws, 21), name="rt", task="rt-sentiment", base="minilm")
    push(ws, v.ref, repo="alice/rt")
    weights = fmt.save(make_adapter(ws, 22))  # not registered: no base in the file's own card
    ws.close()
    card = _card(hub_server, "alice/rt")
    card["content_hash"] = fmt.sha256_hex(weights)
    card["base"] = {"name": "minilm", "fingerprint": "0" * 64, "source": "builtin:minilm"}
    _craft(hub_server, "mallory/wrongbase", weights, card)
    home = _empty_home(tmp_path)
    before = _state(tmp_path, home)
    r = run_cli(home, "pull", "mallory/wrongbase@v1")
    assert_one_line_failure(r, contains="fingerprint")
    _assert_unchanged(tmp_path, home, before)


def test_adapter_refused_after_its_base_was_found_leaves_no_base(hub_server: HubServer, tmp_path: Path) -> None:
    """A card the catalog refuses (an unknown kind) after the base was chosen: no base, no version, no blob."""
    ws = _alice(tmp_path)
    v = ws.register(make_adapter(ws, 31), name="rt", task="rt-sentiment", base="minilm")
    push(ws, v.ref, repo="alice/rt")
    weights = ws.adapter_bytes(v)
    ws.close()
    card = _card(hub_server, "alice/rt")
    card["kind"] = "bogus"
    _craft(hub_server, "mallory/badkind", weights, card)
    home = _empty_home(tmp_path)
    before = _state(tmp_path, home)
    r = run_cli(home, "pull", "mallory/badkind@v1")
    assert_one_line_failure(r, contains="kind")
    _assert_unchanged(tmp_path, home, before)


def test_canonical_hash_differs_commits_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    """The card renames the base, so the canonical re-serialisation differs from the pushed bytes: the pull
    fails before anything is committed (formerly: version and base committed, then the error)."""
    ws = _alice(tmp_path)
    v = ws.register(make_adapter(ws, 41), name="rt", task="rt-sentiment", base="minilm")
    push(ws, v.ref, repo="alice/rt")
    weights = ws.adapter_bytes(v)
    ws.close()
    card = _card(hub_server, "alice/rt")
    card["base"]["name"] = "minilm2"
    _craft(hub_server, "mallory/renamed", weights, card)
    home = _empty_home(tmp_path)
    before = _state(tmp_path, home)
    r = run_cli(home, "pull", "mallory/renamed@v1")
    assert_one_line_failure(r, contains="differs")
    _assert_unchanged(tmp_path, home, before)


# ------------------------------------------------------------------------------------------------ item 3


def test_card_named_like_a_local_adapter_gets_the_repo_name(hub_server: HubServer, tmp_path: Path) -> None:
    """A card calling itself ``good`` never adds ``good@2`` on top of the user's ``good``."""
    digest = _pushed_good(hub_server, tmp_path)
    home = _bob_with_good(tmp_path)
    with Workspace.open(home) as ws:
        mine = ws.resolve("good")
    r = run_cli(home, "pull", "mallory/rt@v1")
    assert r.returncode == 0, r.stderr
    assert_no_traceback(r)
    assert "mallory--rt@1" in r.stdout
    with Workspace.open(home) as ws:
        assert [x.ref for x in ws.log("good")] == ["good@1"]
        assert ws.resolve("good").content_hash == mine.content_hash  # a bare `good` is still the user's
        assert ws.resolve("mallory--rt").content_hash == digest


def test_explicit_name_with_matching_base_adds_and_says_so(hub_server: HubServer, tmp_path: Path) -> None:
    digest = _pushed_good(hub_server, tmp_path)
    home = _bob_with_good(tmp_path)
    r = run_cli(home, "pull", "mallory/rt@v1", "--name", "good")
    assert r.returncode == 0, r.stderr
    assert "added good@2 to your existing adapter good" in r.stdout
    with Workspace.open(home) as ws:
        assert [x.ref for x in ws.log("good")] == ["good@1", "good@2"]
        assert ws.resolve("good@2").content_hash == digest


def test_explicit_name_on_another_base_is_refused(hub_server: HubServer, tmp_path: Path,
                                                  tiny_bert_dir: Path) -> None:
    """The user's ``good`` is on base ``tiny``; the pulled adapter needs ``minilm`` (which the home lacks):
    refused, and the built-in base is not left registered either."""
    _pushed_good(hub_server, tmp_path)
    home = _bob_with_good(tmp_path, base="tiny", tiny_dir=tiny_bert_dir)
    before = _state(tmp_path, home)
    r = run_cli(home, "pull", "mallory/rt@v1", "--name", "good")
    assert_one_line_failure(r, contains="base")
    _assert_unchanged(tmp_path, home, before)


def test_derived_name_taken_by_a_local_adapter_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    """``mallory--rt`` exists locally and is the user's own: the pull does not add to it."""
    _pushed_good(hub_server, tmp_path)
    home = tmp_path / "bob"
    with Workspace.open(home) as ws:
        ws.add_base("minilm", "minilm")
        ws.register(make_adapter(ws, 6), name="mallory--rt", task="mine", base="minilm")
    before = _state(tmp_path, home)
    r = run_cli(home, "pull", "mallory/rt@v1")
    assert_one_line_failure(r, contains="--name")
    _assert_unchanged(tmp_path, home, before)


def test_repo_id_that_makes_no_valid_name_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    """``owner--name`` longer than a name may be: one line asking for --name, nothing changed."""
    repo = "mallory/" + "r" * 95
    _pushed_good(hub_server, tmp_path, repo=repo)
    home = _empty_home(tmp_path)
    before = _state(tmp_path, home)
    r = run_cli(home, "pull", f"{repo}@v1")
    assert_one_line_failure(r, contains="--name")
    _assert_unchanged(tmp_path, home, before)


def test_parents_are_named_after_their_repos_not_their_cards(hub_server: HubServer, tmp_path: Path) -> None:
    """A parent whose card calls itself ``good`` (the user has a ``good``) lands under its repo's name."""
    ws = _alice(tmp_path)
    p = ws.register(make_adapter(ws, 51), name="good", task="rt-sentiment", base="minilm")
    c = ws.register(make_adapter(ws, 52), name="child", task="rt-sentiment", base="minilm",
                    parents=[Parent(p.ref, "finetuned_from")])
    push(ws, p.ref, repo="mallory/parent")
    push(ws, c.ref, repo="mallory/child")
    ws.close()
    home = _bob_with_good(tmp_path)
    r = run_cli(home, "pull", "mallory/child@v1", "--with-parents", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ref"] == "mallory--child@1" and [x["ref"] for x in doc["parents"]] == ["mallory--parent@1"]
    with Workspace.open(home) as wb:
        assert [x.ref for x in wb.log("good")] == ["good@1"]
        rel = {(e["relation"], e["parent"]) for e in wb.parents("mallory--child@1")}
        assert rel == {("finetuned_from", "mallory--parent@1"), ("imported_from", None)}


# ------------------------------------------------------------------------------------------------ the API


def test_register_many_failing_after_its_blobs_removes_only_the_blobs_it_created(
        tmp_path: Path, monkeypatch) -> None:
    """The transaction fails after the blobs were written: the new blob goes, the one that was already
    there (another version's) stays, no row is left; the same batch then registers all at once."""
    from adapterhub.catalog.records import NewVersion
    from adapterhub.errors import CatalogError

    ws = _alice(tmp_path)
    old = ws.register(make_adapter(ws, 61), name="old", task="t", base="minilm")
    batch = [NewVersion(ws.adapter_bytes(old), name="copy", task="t", base="minilm", expect_hash=old.content_hash),
             NewVersion(make_adapter(ws, 62), name="new", task="t", base="minilm",
                        parents=(Parent(f"sha256:{old.content_hash}", "finetuned_from"),))]
    blobs = sorted(ws.store.iter_digests())
    real, calls = ws._add_batch, []

    def fail_on_commit(s, bases, prepared):  # 1st call: the dry run; 2nd: the real transaction
        out = real(s, bases, prepared)
        calls.append(len(out))
        if len(calls) == 2:
            raise CatalogError("injected failure after the blobs")
        return out

    monkeypatch.setattr(ws, "_add_batch", fail_on_commit)
    with pytest.raises(CatalogError, match="injected"):
        ws.register_many(batch)
    assert calls == [2, 2]
    assert sorted(ws.store.iter_digests()) == blobs
    assert [v.ref for v in ws.list_versions()] == ["old@1"]
    monkeypatch.undo()
    infos = ws.register_many(batch)
    assert [i.ref for i in infos] == ["copy@1", "new@1"] and infos[0].content_hash == old.content_hash
    assert ws.verify()["problems"] == [] and ws.verify()["orphans"] == []
    with pytest.raises(CatalogError, match="differs"):  # expect_hash is checked before anything is written
        ws.register_many([NewVersion(make_adapter(ws, 63), name="x", task="t", base="minilm", expect_hash="0" * 64)])
    assert len(ws.list_versions()) == 3 and len(list(ws.store.iter_digests())) == 2
    ws.close()

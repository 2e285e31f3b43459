"""Card refresh without re-uploading weights (`push` automatic / `--card-only`) and `push --tags`, against the
local Hub server (adapterhub/testing/hubserver.py), which records every request and upload."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterhub.cli.main import cli
from adapterhub.errors import HubError
from adapterhub.hub.cards import CARD_FILE, README_FILE, WEIGHTS_FILE
from adapterhub.hub.client import hub_tag_name, pull, push
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from test_hub import _register_two


def _card(hub: HubServer, rev: str) -> dict:
    return json.loads(hub.file_bytes("alice/rt", rev, CARD_FILE))


def test_new_metrics_refresh_the_card_without_uploading_weights(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, _ = _register_two(ws_a)
    p1 = push(ws_a, r1, repo="alice/rt")
    assert p1.uploaded and hub_server.kinds()["lfs_upload"] == 1
    assert _card(hub_server, "main")["metrics"] == {"accuracy": 0.81}
    # an evaluation after the push: a new figure, the same weights
    ws_a.record_metrics(r1, {"test_accuracy": 0.6255, "test_n": 486})
    since = len(hub_server.requests)
    p = push(ws_a, r1, repo="alice/rt")
    kinds = hub_server.kinds(since)
    assert not p.uploaded and p.card_commit is not None and not p.card_stale and "refreshed" in p.message
    assert kinds["commit"] == 1 and kinds["lfs_batch"] == kinds["lfs_upload"] == 0  # no weights went up
    repo = hub_server.repos["alice/rt"]
    head = repo.commits[repo.branches["main"]]
    assert head.oid == p.card_commit and head.parent == p1.commit
    assert head.files[WEIGHTS_FILE].lfs_oid == ws_a.resolve(r1).content_hash  # carried over, not re-sent
    assert hub_server.uploaded_bytes(since) == (len(hub_server.file_bytes("alice/rt", "main", CARD_FILE))
                                                + len(hub_server.file_bytes("alice/rt", "main", README_FILE)))
    assert _card(hub_server, "main")["metrics"] == {"accuracy": 0.81, "test_accuracy": 0.6255, "test_n": 486}
    assert "0.6255" in hub_server.file_bytes("alice/rt", "main", README_FILE).decode()
    assert repo.tags["v1"] == p1.commit  # the version tag stays the first push's commit
    assert ws_a.resolve(r1).hub_commit == p1.commit
    # nothing changed since: nothing is committed at all; --card-only says the same
    since = len(hub_server.requests)
    again = push(ws_a, r1, repo="alice/rt", card_only=True)
    assert again.card_commit is None and "with this card" in again.message
    assert hub_server.kinds(since)["commit"] == 0 and hub_server.uploaded_bytes(since) == 0
    # a subset evaluation does not change what the card shows, so it needs no refresh either
    ws_a.record_metrics(r1, {"test_accuracy": 0.5625, "test_n": 16}, full=False)
    assert push(ws_a, r1, repo="alice/rt").card_commit is None


def test_refresh_of_an_older_version_needs_its_own_branch(hub_server: HubServer, ws_a: Workspace,
                                                          tmp_path: Path) -> None:
    r1, r2 = _register_two(ws_a)
    p1 = push(ws_a, r1, repo="alice/rt")
    push(ws_a, r2, repo="alice/rt")
    ws_a.record_metrics(r1, {"test_accuracy": 0.7, "test_n": 486})
    # main now holds v2's weights: the card of v1 must not be committed next to them
    auto = push(ws_a, r1, repo="alice/rt")
    assert auto.card_stale and auto.card_commit is None and "--branch v1-card" in auto.message
    with pytest.raises(HubError, match="holds another version's weights.*--branch v1-card"):
        push(ws_a, r1, repo="alice/rt", card_only=True)
    since = len(hub_server.requests)
    res = push(ws_a, r1, repo="alice/rt", card_only=True, branch="v1-card")
    assert res.card_commit is not None and hub_server.kinds(since)["lfs_upload"] == 0
    repo = hub_server.repos["alice/rt"]
    assert repo.commits[res.card_commit].parent == p1.commit
    assert repo.commits[res.card_commit].files[WEIGHTS_FILE].lfs_oid == ws_a.resolve(r1).content_hash
    assert _card(hub_server, "v1-card")["metrics"]["test_accuracy"] == 0.7
    assert _card(hub_server, "main")["version"] == 2
    # the refreshed branch pulls as the same version (hash checked against the card)
    with Workspace.open(tmp_path / "bob") as bob:
        got = pull(bob, "alice/rt@v1-card")
        assert got.content_hash == ws_a.resolve(r1).content_hash


def test_card_only_refuses_a_version_not_on_the_hub(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, r2 = _register_two(ws_a)
    with pytest.raises(HubError, match="not on the Hub yet"):
        push(ws_a, r1, repo="alice/rt", card_only=True)
    push(ws_a, r1, repo="alice/rt")
    with pytest.raises(HubError, match="v2 is missing"):
        push(ws_a, r2, repo="alice/rt", card_only=True)
    assert set(hub_server.repos["alice/rt"].tags) == {"v1"}


def test_push_tags_mirrors_local_tags_namespaced(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, r2 = _register_two(ws_a)
    ws_a.tag(r1, "prod")
    ws_a.tag(r1, "v2")  # a local tag that looks like a version tag cannot collide: tag-v2
    p1 = push(ws_a, r1, repo="alice/rt", mirror_tags=True)
    assert p1.hub_tags == ["tag-prod", "tag-v2"] and hub_tag_name("prod") == "tag-prod"
    repo = hub_server.repos["alice/rt"]
    assert repo.tags == {"v1": p1.commit, "tag-prod": p1.commit, "tag-v2": p1.commit}
    p2 = push(ws_a, r2, repo="alice/rt")  # without --tags: nothing mirrored
    assert p2.hub_tags == [] and repo.tags["tag-prod"] == p1.commit and repo.tags["v2"] == p2.commit
    ws_a.tag(r2, "prod")  # prod moves to v2 locally; pushing v2 --tags moves it on the Hub
    again = push(ws_a, r2, repo="alice/rt", mirror_tags=True)
    # the mirror covers every local tag of the adapter on this repo: v2 (on rt@1) stays where it is
    assert not again.uploaded and again.hub_tags == ["tag-prod", "tag-v2"] and again.hub_tags_deleted == []
    assert repo.tags["tag-prod"] == p2.commit and repo.tags["tag-v2"] == p1.commit and repo.tags["v1"] == p1.commit


def test_cli_push_card_only_and_tags(hub_server: HubServer, tmp_path: Path) -> None:
    home = tmp_path / "h"
    with Workspace.open(home) as ws:
        ws.add_base("minilm", "minilm")
        r1, _ = _register_two(ws)
        ws.tag(r1, "prod")

    def run(*args: str):
        return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)

    r = run("push", r1, "--repo", "alice/rt", "--card-only", "--json")
    assert r.exit_code == 1 and "not on the Hub yet" in r.output
    r = run("push", r1, "--repo", "alice/rt", "--tags", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["hub_tags"] == ["tag-prod"]
    with Workspace.open(home) as ws:
        ws.record_metrics(r1, {"test_accuracy": 0.6255, "test_n": 486})
    since = len(hub_server.requests)
    r = run("push", r1, "--repo", "alice/rt", "--card-only")
    assert r.exit_code == 0, r.output
    assert "refreshed its card" in r.stdout and hub_server.kinds(since)["lfs_upload"] == 0

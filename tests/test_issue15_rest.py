"""Issue 15, the rest: `eval` progress with a total (also in logs), `show`/`list --all` flag deprecated
versions, `push --tags` is a true mirror of the local tags (deleting stale ``tag-*`` refs it pushed, never
other refs), and a `gc` in one home of a team (shared PostgreSQL catalog + shared S3 store) never takes a blob
the other home's versions reference."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adapterhub.cli.main import cli
from adapterhub.hub.client import push
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from test_hub import _register_two, make_adapter
from test_training_util import sentiment_rows, tiny_model, write_csv

torch.set_num_threads(1)


def run(home: Path, *args: str, **kw):
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False, **kw)


# -- eval shows rows scored / rows to score, on a terminal and in a log ------------------------------------

def test_eval_progress_has_a_total_and_logs_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"
    with Workspace.open(home) as ws:
        ws.add_base("tb", str(tiny_model("bert", tmp_path / "bert")))
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(60))
    r = run(home, "train", "--base", "tb", "--dataset", f"csv:{csv}", "--name", "toy", "--steps", "2",
            "--select-steps", "1", "--reselect-every", "1", "--batch-size", "8", "--max-length", "16",
            "--max-eval-examples", "4")
    assert r.exit_code == 0, r.output
    # stderr is not a terminal here: plain lines, one per batch with ADAPTERHUB_PROGRESS_EVERY=1 (step)
    monkeypatch.setenv("ADAPTERHUB_PROGRESS_EVERY", "1")
    r = run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--split", "train", "--max-examples", "20",
            "--batch-size", "8", "--max-length", "16", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 20
    counts = re.findall(r"^eval toy@1  (\d+)/(\d+) \(\d+%\)", r.stderr, flags=re.M)
    # the start line (loading: no count yet), then one line after each batch of 8: 8, 16, 20 of 20
    assert [(int(a), int(b)) for a, b in counts] == [(8, 20), (16, 20), (20, 20)], r.stderr
    assert "[loading]" in r.stderr and "[scoring]" in r.stderr and "0/?" not in r.stderr
    # the default period (10% of the total) in a log: the end line is always there
    monkeypatch.delenv("ADAPTERHUB_PROGRESS_EVERY")
    r = run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--split", "train", "--max-examples", "20",
            "--batch-size", "8", "--max-length", "16")
    assert r.exit_code == 0, r.output
    assert re.search(r"^eval toy@1  20/20 \(100%\)", r.stderr, flags=re.M), r.stderr


def test_terminal_progress_never_shows_0_of_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the done/total column stays empty while the total is unknown (loading), then n/total."""
    import io
    import sys

    from adapterhub.cli import common

    monkeypatch.setattr(common, "_stderr_is_tty", lambda: True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with common.progress(transient=False) as bar:
        tid = bar.add_task("eval rt@1", total=None, info="test split  [loading]")
        counts = next(c for c in bar.columns if type(c).__name__ == "CountsColumn")
        assert str(counts.render(bar.tasks[0])) == ""
        bar.update(tid, completed=8, total=20, info="test split  [scoring]")
        assert str(counts.render(bar.tasks[0])) == " 8/20"
    assert "8/20" in sys.stderr.getvalue() and "0/?" not in sys.stderr.getvalue()


def test_eval_library_progress_callback(tmp_path: Path) -> None:
    from adapterhub.evaluation import evaluate

    home = tmp_path / "h"
    with Workspace.open(home) as ws:
        ws.add_base("tb", str(tiny_model("bert", tmp_path / "bert")))
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(40))
    assert run(home, "train", "--base", "tb", "--dataset", f"csv:{csv}", "--name", "toy", "--steps", "2",
               "--select-steps", "1", "--reselect-every", "1", "--batch-size", "8", "--max-length", "16",
               "--max-eval-examples", "4").exit_code == 0
    seen: list[tuple[int, int, str]] = []
    with Workspace.open(home) as ws:
        res = evaluate(ws, "toy@1", dataset=f"csv:{csv}", split="train", max_examples=10, batch_size=4,
                       max_length=16, progress=lambda d, t, info: seen.append((d, t, info["phase"])))
    assert res.n == 10
    assert seen == [(0, 10, "loading"), (4, 10, "scoring"), (8, 10, "scoring"), (10, 10, "scoring")]


# -- show / list --all flag a deprecated version -----------------------------------------------------------

def test_show_and_list_all_flag_deprecated_versions(tmp_path: Path) -> None:
    home = tmp_path / "h"
    with Workspace.open(home) as ws:
        ws.add_base("minilm", "minilm")
        r1, r2 = _register_two(ws)
    assert run(home, "deprecate", r1).exit_code == 0
    doc = json.loads(run(home, "show", r1, "--json").stdout)
    assert doc["deprecated"] is True and doc["deprecated_at"].endswith("+00:00")
    assert doc["deprecated_at"] >= doc["created_at"]
    fresh = json.loads(run(home, "show", r2, "--json").stdout)
    assert fresh["deprecated"] is False and fresh["deprecated_at"] is None
    table = run(home, "show", r1, env={"COLUMNS": "250"}).stdout
    assert f"{r1} (deprecated)" in table and "deprecate --undo" in table
    assert "deprecated" not in run(home, "show", r2, env={"COLUMNS": "250"}).stdout
    # list hides it; list --all shows and marks it (table and JSON); log marks it too
    assert [v["ref"] for v in json.loads(run(home, "list", "--json").stdout)] == [r2]
    rows = json.loads(run(home, "list", "--all", "--json").stdout)
    assert [(v["ref"], v["deprecated"]) for v in rows] == [(r2, False), (r1, True)]
    listed = run(home, "list", "--all", env={"COLUMNS": "250"}).stdout
    assert f"{r1} (deprecated)" in listed and f"{r2} (deprecated)" not in listed
    assert f"{r1} (deprecated)" in run(home, "log", "rt", env={"COLUMNS": "250"}).stdout
    # undo: no longer flagged
    assert run(home, "deprecate", "--undo", r1).exit_code == 0
    assert json.loads(run(home, "show", r1, "--json").stdout)["deprecated"] is False
    assert "(deprecated)" not in run(home, "list", "--all", env={"COLUMNS": "250"}).stdout


# -- push --tags mirrors: stale tag-* refs this catalog pushed are deleted, nothing else -------------------

def test_push_tags_deletes_hub_tags_gone_locally(hub_server: HubServer, ws_a: Workspace) -> None:
    r1, r2 = _register_two(ws_a)
    ws_a.tag(r1, "prod")
    ws_a.tag(r1, "canary")
    p1 = push(ws_a, r1, repo="alice/rt", mirror_tags=True)
    p2 = push(ws_a, r2, repo="alice/rt")
    repo = hub_server.repos["alice/rt"]
    assert repo.tags == {"v1": p1.commit, "v2": p2.commit, "tag-prod": p1.commit, "tag-canary": p1.commit}
    # refs of others: a tag-* at a commit this catalog never recorded, and a release tag at ours
    repo.branches["other"] = p2.commit
    foreign = hub_server.commit_files("alice/rt", {"notes.txt": b"someone else's commit"}, branch="other")
    hub_server.create_tag("alice/rt", "tag-theirs", rev=foreign)
    hub_server.create_tag("alice/rt", "release-1", rev=p1.commit)
    ws_a.untag("rt", "canary")          # gone locally
    ws_a.tag(r2, "prod")                # moved locally
    ws_a.tag(r2, "beta")                # new locally
    since = len(hub_server.requests)
    res = push(ws_a, r2, repo="alice/rt", mirror_tags=True)
    assert not res.uploaded
    assert res.hub_tags == ["tag-beta", "tag-prod"] and res.hub_tags_deleted == ["tag-canary"]
    assert repo.tags == {"v1": p1.commit, "v2": p2.commit, "tag-prod": p2.commit, "tag-beta": p2.commit,
                         "tag-theirs": foreign, "release-1": p1.commit}
    assert hub_server.kinds(since)["delete_tag"] == 2  # tag-canary deleted, tag-prod moved (delete + create)
    # a local tag moved to a version not on this repo: its tag-* (at our commit) is stale, so deleted
    v3 = ws_a.register(make_adapter(ws_a, 3), name="rt", task="rt-sentiment", base="minilm")
    ws_a.tag(v3.ref, "beta")
    res = push(ws_a, r1, repo="alice/rt", mirror_tags=True)
    assert res.hub_tags == ["tag-prod"] and res.hub_tags_deleted == ["tag-beta"]
    assert set(repo.tags) == {"v1", "v2", "tag-prod", "tag-theirs", "release-1"}
    # in step: nothing left to do, nothing deleted
    since = len(hub_server.requests)
    res = push(ws_a, r1, repo="alice/rt", mirror_tags=True)
    assert res.hub_tags == ["tag-prod"] and res.hub_tags_deleted == []
    assert hub_server.kinds(since)["delete_tag"] == 0 and hub_server.kinds(since)["tag"] == 0
    # without --tags nothing is mirrored or deleted
    ws_a.untag("rt", "prod")
    res = push(ws_a, r1, repo="alice/rt")
    assert res.hub_tags == [] and res.hub_tags_deleted == [] and "tag-prod" in repo.tags


def test_hub_server_delete_tag_as_huggingface_hub_calls_it(hub_server: HubServer) -> None:
    """The test Hub answers ``HfApi.delete_tag`` as the Hub does (URL-quoted name, 404 RevisionNotFound)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    api = HfApi(endpoint=hub_server.url, token="hf_testtoken_secret")
    api.create_repo("alice/t")
    api.create_tag("alice/t", tag="tag-prod", revision="main")
    api.create_tag("alice/t", tag="tag-a.b_c", revision="main")
    assert {t.name for t in api.list_repo_refs("alice/t").tags} == {"tag-prod", "tag-a.b_c"}
    since = len(hub_server.requests)
    api.delete_tag("alice/t", tag="tag-a.b_c")
    assert {t.name for t in api.list_repo_refs("alice/t").tags} == {"tag-prod"}
    assert hub_server.kinds(since)["delete_tag"] == 1
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag("alice/t", tag="tag-a.b_c")


def test_cli_push_tags_says_what_it_deleted(hub_server: HubServer, tmp_path: Path) -> None:
    home = tmp_path / "h"
    with Workspace.open(home) as ws:
        ws.add_base("minilm", "minilm")
        r1, _ = _register_two(ws)
        ws.tag(r1, "prod")
        ws.tag(r1, "old")
    r = run(home, "push", r1, "--repo", "alice/rt", "--tags")
    assert r.exit_code == 0, r.output
    assert "Hub tags: tag-old, tag-prod" in r.stdout
    assert run(home, "untag", "rt", "old").exit_code == 0
    r = run(home, "push", r1, "--repo", "alice/rt", "--tags")
    assert r.exit_code == 0, r.output
    assert "Hub tags: tag-prod" in r.stdout and "Hub tags deleted (no longer tagged locally): tag-old" in r.stdout
    assert run(home, "untag", "rt", "prod").exit_code == 0
    doc = json.loads(run(home, "push", r1, "--repo", "alice/rt", "--tags", "--json").stdout)
    assert doc["hub_tags"] == [] and doc["hub_tags_deleted"] == ["tag-prod"]
    assert set(hub_server.repos["alice/rt"].tags) == {"v1"}
    # a tag someone else deleted meanwhile counts as deleted; a failed delete is one line, exit 1
    with Workspace.open(home) as ws:
        ws.tag(r1, "again")
    assert run(home, "push", r1, "--repo", "alice/rt", "--tags").exit_code == 0
    assert run(home, "untag", "rt", "again").exit_code == 0
    from huggingface_hub import HfApi

    from adapterhub.hub.client import _delete_tag_if_there
    _delete_tag_if_there(HfApi(endpoint=hub_server.url, token="hf_x"), "alice/rt", "tag-never-there")  # no error
    hub_server.fail("delete_tag", status=500)
    r = run(home, "push", r1, "--repo", "alice/rt", "--tags")
    assert r.exit_code == 1 and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1, r.output

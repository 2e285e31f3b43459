"""`adapterhub push|pull|hub versions` through the CLI, and the token never leaking anywhere."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapterhub.cli.main import cli
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from fresh_cli import run_fresh
from test_hub import make_adapter

SECRET = "hf_sEcReT0123456789abcdefTOKEN"


def _home(tmp_path: Path, name: str, *, adapters: int = 0) -> Path:
    home = tmp_path / name
    ws = Workspace.open(home)
    ws.add_base("minilm", "minilm")
    for i in range(adapters):
        ws.register(make_adapter(ws, 100 + i), name="rt", task="rt-sentiment", base="minilm",
                    metrics={"accuracy": 0.7 + i / 100})
    ws.close()
    return home


def run(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def test_cli_push_pull_versions_json(hub_server: HubServer, tmp_path: Path) -> None:
    a = _home(tmp_path, "a", adapters=2)
    r = run(a, "push", "rt@1", "--repo", "alice/rt", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["uploaded"] is True and doc["tag"] == "v1" and doc["repo"] == "alice/rt"
    assert run(a, "push", "rt@2", "--repo", "alice/rt", "--json").exit_code == 0
    again = run(a, "push", "rt@2", "--repo", "alice/rt")
    assert again.exit_code == 0 and "already on the Hub" in again.stdout and "nothing uploaded" in again.stdout

    v = run(a, "hub", "versions", "alice/rt", "--json")
    assert v.exit_code == 0, v.output
    versions = json.loads(v.stdout)["versions"]
    assert [x["tag"] for x in versions] == ["v1", "v2"] and all(len(x["content_hash"]) == 64 for x in versions)
    table = run(a, "hub", "versions", "alice/rt")
    assert table.exit_code == 0 and "v2" in table.stdout

    b = tmp_path / "b"
    p = run(b, "pull", "alice/rt@v2", "--name", "rt-imported", "--json")
    assert p.exit_code == 0, p.output
    pdoc = json.loads(p.stdout)
    assert pdoc["registered"] is True and pdoc["ref"] == "rt-imported@1"
    assert pdoc["content_hash"] == versions[1]["content_hash"]
    p2 = run(b, "pull", "alice/rt@v2", "--name", "rt-imported")
    assert p2.exit_code == 0 and "nothing to do" in p2.stdout


def test_cli_errors_are_one_line_exit_1(hub_server: HubServer, tmp_path: Path) -> None:
    a = _home(tmp_path, "a", adapters=1)
    for args in (["pull", "alice/none@v1"], ["push", "rt@1", "--repo", "not-a-repo"],
                 ["hub", "versions", "alice/none"], ["push", "nope@1", "--repo", "alice/x"],
                 ["pull", "alice/x@../../etc"]):
        r = run(a, *args)
        assert r.exit_code == 1, (args, r.output)
        assert r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, r.stderr
        assert r.stdout == ""
    r = run(a, "pull")
    assert r.exit_code == 2  # misuse


def test_token_never_printed_logged_or_stored(hub_server: HubServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hub_server.token = SECRET
    monkeypatch.setenv("HF_TOKEN", SECRET)
    a = _home(tmp_path, "a", adapters=2)
    outputs = []
    # no --repo: the owner comes from whoami with the token
    r = run(a, "push", "rt@1", "--private", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["repo"] == f"{hub_server.user}/rt"
    outputs += [r.stdout, r.stderr]
    r = run(a, "push", "rt@2")
    assert r.exit_code == 0, r.output
    outputs += [r.stdout, r.stderr]
    b = tmp_path / "b"
    r = run(b, "pull", f"{hub_server.user}/rt@v1", "--json")
    assert r.exit_code == 0, r.output
    outputs += [r.stdout, r.stderr]
    r = run(b, "hub", "versions", f"{hub_server.user}/rt", "--json")
    outputs += [r.stdout, r.stderr]

    # a private repo without the token: a clear error (and the wrong token is not echoed either)
    monkeypatch.setenv("HF_TOKEN", "hf_WrongSecret999")
    r = run(tmp_path / "c", "pull", f"{hub_server.user}/rt@v2")
    assert r.exit_code == 1 and "not found" in r.stderr and "hf_WrongSecret999" not in r.output
    outputs += [r.stdout, r.stderr]

    for text in outputs:
        assert SECRET not in text
    for rec in caplog.records:
        assert SECRET not in rec.getMessage()
    # not in the catalog, the store, the Hub cache or anything else on disk
    for root in (a, b, tmp_path / "hf_home"):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert SECRET.encode() not in f.read_bytes(), f
    # on the wire: only ever in the Authorization header of API calls, never in bodies/URLs, never to upload hrefs
    for req in hub_server.requests:
        assert SECRET.encode() not in req.body and SECRET not in req.path + req.query
        for k, v in req.headers.items():
            if SECRET in v:
                assert k == "authorization" and req.kind != "lfs_upload", (req.kind, k)
    assert any(r.kind == "lfs_upload" for r in hub_server.requests)
    assert all("authorization" not in r.headers for r in hub_server.requests if r.kind == "lfs_upload")
    # the pushed files themselves
    repo = hub_server.repos[f"{hub_server.user}/rt"]
    assert repo.private
    for commit in repo.commits.values():
        for path in commit.files:
            assert SECRET.encode() not in hub_server.file_bytes(repo.repo_id, commit.oid, path)


def test_cli_help_texts() -> None:
    for args in (["push", "--help"], ["pull", "--help"], ["hub", "versions", "--help"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0 and "Example:" in r.output


@pytest.mark.e2e
def test_real_cli_subprocess_honours_hf_endpoint_env(hub_server: HubServer, tmp_path: Path) -> None:
    """The installed `adapterhub` in a fresh process: HF_ENDPOINT/HF_HUB_DISABLE_XET from the environment only."""
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("adapterhub")
    a = _home(tmp_path, "a", adapters=1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub_server.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "proc_hf"),
               HF_HUB_DISABLE_TELEMETRY="1")

    def sh(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=300)

    r = sh("--home", str(a), "push", "rt@1", "--repo", "eve/rt", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tag"] == "v1"
    r = sh("--home", str(tmp_path / "b"), "pull", "eve/rt@v1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["registered"] is True
    r = sh("--home", str(tmp_path / "b"), "pull", "eve/rt@v9")
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: ") and "v9" in r.stderr


def test_push_and_hub_versions_do_not_import_torch(hub_server: HubServer, tmp_path: Path) -> None:
    """push uploads the store's blob and a card built from the catalog, and ``hub versions`` reads refs and cards:
    no tensor is decoded, so neither imports torch (through the CLI a push took ~2 s, ~1.3 s of it the import);
    pull parses the downloaded weights and does."""
    a = _home(tmp_path, "a", adapters=1)
    imported, (_, versions) = run_fresh(a, ["push", "rt@1", "--repo", "alice/rt", "--json"],
                                        ["hub", "versions", "alice/rt", "--json"])
    assert not imported
    assert [x["tag"] for x in json.loads(versions)["versions"]] == ["v1"]


def test_pull_does_not_import_torch(hub_server: HubServer, tmp_path: Path) -> None:
    """pull validates the downloaded weights on numpy views of their bytes (the scan ``register`` uses) and stores
    them as they are: no torch either (a pull of a small adapter through the CLI was ~1.1 s of import)."""
    a = _home(tmp_path, "a", adapters=1)
    assert run(a, "push", "rt@1", "--repo", "alice/rt").exit_code == 0
    b = tmp_path / "b"
    imported, (out,) = run_fresh(b, ["pull", "alice/rt@v1", "--name", "rt", "--json"])
    assert not imported and json.loads(out)["registered"] is True
    with Workspace.open(a) as wa, Workspace.open(b) as wb:
        assert wb.adapter_bytes("rt@1") == wa.adapter_bytes("rt@1")

"""Trust boundary: the Hub download layer of ``adapterhub pull`` against a hostile Hub server.

Each case runs the real CLI in a subprocess against ``adapterhub/testing/hubserver.py`` in one of its hostile modes
(crafted ETag / commit id headers, redirects, trickled, oversized or unannounced bodies, a huge card), and
checks the rule, not the instance: one ``Error:`` line (no traceback), nothing created, changed or
removed outside the home (a victim file next to it survives), the catalog unchanged, no temp or
``.incomplete`` file left. Plus: the endpoint's password is never printed or stored, and the download
cache is per endpoint (a pull "from" an unreachable server never succeeds from another server's cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

import pytest

from adapterhub.hub.client import push
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace
from catalog_util import home_snapshot
from test_hub import make_adapter
from trust_util import assert_one_line_failure, diff_snapshots, run_cli, tree_snapshot

VICTIM = b"the user's own file: a Hub server must never touch it\n"
CLI_TIMEOUT = 90  # a hang (the old trickle behaviour) fails the test instead of blocking the suite


@pytest.fixture
def world(hub_server: HubServer, tmp_path: Path) -> dict:
    """alice/rt@v1 pushed by home ``src``; a fresh home ``home`` (base added) to pull into; a victim file."""
    src = tmp_path / "src"
    with Workspace.open(src) as ws:
        ws.add_base("minilm", "minilm")
        v = ws.register(make_adapter(ws, 7), name="rt", task="rt-sentiment", base="minilm")
        push(ws, v.ref, repo="alice/rt")
        digest = v.content_hash
    home = tmp_path / "home"
    with Workspace.open(home) as ws:
        ws.add_base("minilm", "minilm")
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    return {"tmp": tmp_path, "src": src, "home": home, "victim": victim, "digest": digest, "server": hub_server}


def _leftovers(home: Path) -> list[str]:
    """Partial downloads anywhere in the home, or any file in the Hub cache's temp folders."""
    return [str(p) for p in home.rglob("*") if p.name.endswith((".incomplete", ".part"))
            or (p.parent.name == "tmp" and "hub" in p.parts and p.is_file())]


def _hostile_pull(world: dict, *args: str, contains: str | None = None, env: dict | None = None) -> str:
    """Run ``pull ARGS`` and check the trust-boundary rule; returns the error line."""
    tmp, home = world["tmp"], world["home"]
    outside_before = tree_snapshot(tmp, skip=(home,))
    home_before = home_snapshot(home)
    r = run_cli(home, "pull", *args, env=env, timeout=CLI_TIMEOUT)
    assert world["victim"].read_bytes() == VICTIM
    assert diff_snapshots(outside_before, tree_snapshot(tmp, skip=(home,))) == []
    assert_one_line_failure(r, contains=contains)
    files, rows = home_snapshot(home)
    assert rows == home_before[1]
    assert [f for f in files if not f[0].startswith("cache/")] == [f for f in home_before[0]
                                                                    if not f[0].startswith("cache/")]
    assert _leftovers(home) == []
    return r.stderr.strip()


# -------------------------------------------------------------------------------- server-named paths
@pytest.mark.parametrize("target", ["victim.txt", "planted.txt"])
def test_path_traversal_etag_cannot_delete_or_create_a_file_outside(world: dict, target: str) -> None:
    # huggingface_hub names its blob after the ETag: ../../../../victim.txt is the victim next to the home
    # (the old pull deleted it after the hash check failed), ../../../../planted.txt a new file there
    etag = f'"../../../../{target}"'
    world["server"].hostile("adapter.safetensors", headers={"ETag": etag, "X-Linked-Etag": etag})
    line = _hostile_pull(world, "alice/rt@v1", contains="etag")
    assert "not a hex digest" in line and not (world["tmp"] / "planted.txt").exists()


@pytest.mark.parametrize("header", ["X-Repo-Commit"])
@pytest.mark.parametrize("path", ["adapterhub.json", "adapter.safetensors"])
def test_path_traversal_commit_id_creates_nothing_outside(world: dict, path: str, header: str) -> None:
    world["server"].hostile(path, headers={header: "../../../../outside"})
    line = _hostile_pull(world, "alice/rt@v1", contains="commit id")
    assert not (world["tmp"] / "outside").exists(), line


@pytest.mark.parametrize("etag", ['"not-a-hex-etag"', 'W/"0123"', '"' + "A" * 64 + '"', '"..\\\\..\\\\x"'])
def test_non_hex_etag_is_refused_before_anything_is_written(world: dict, etag: str) -> None:
    world["server"].hostile("adapterhub.json", headers={"ETag": etag})
    _hostile_pull(world, "alice/rt@v1", contains="etag")
    assert not (world["home"] / "cache" / "hub").exists() or not any(
        p.is_file() for p in (world["home"] / "cache" / "hub").rglob("*"))


def test_server_answering_another_commit_for_the_weights_is_refused(world: dict) -> None:
    other = "0" * 40
    world["server"].hostile("adapter.safetensors", headers={"X-Repo-Commit": other})
    _hostile_pull(world, "alice/rt@v1", contains="refusing")


@pytest.mark.parametrize("location", ["file:///etc/passwd", "../../../../../victim.txt",
                                      "/alice/rt/resolve/v1/adapter.safetensors"])
def test_weird_redirects_write_nothing(world: dict, location: str) -> None:
    # the last one redirects to itself: a loop
    world["server"].hostile("adapter.safetensors", methods=("GET",), redirect=location)
    _hostile_pull(world, "alice/rt@v1")


# -------------------------------------------------------------------------------- unbounded downloads
def test_trickled_body_stops_at_the_deadline(world: dict) -> None:
    world["server"].hostile("adapter.safetensors", methods=("GET",), trickle=0.5)
    t0 = time.monotonic()
    line = _hostile_pull(world, "alice/rt@v1", "--timeout", "3", contains="did not finish within 3 s")
    assert time.monotonic() - t0 < 30, line


def test_trickled_card_stops_at_the_deadline_set_by_env(world: dict) -> None:
    world["server"].hostile("adapterhub.json", methods=("GET",), trickle=0.5)
    t0 = time.monotonic()
    _hostile_pull(world, "alice/rt@v1", contains="did not finish", env={"ADAPTERHUB_PULL_TIMEOUT": "2.5"})
    assert time.monotonic() - t0 < 30


def _crafted_repo(world: dict, repo: str, *, card_changes: dict, weights: bytes | None = None) -> None:
    """``repo`` on the server: the real v1 card (with ``card_changes``) and weights (or ``weights``)."""
    server: HubServer = world["server"]
    card = json.loads(server.file_bytes("alice/rt", "v1", "adapterhub.json"))
    card.update(card_changes)
    data = weights if weights is not None else server.file_bytes("alice/rt", "v1", "adapter.safetensors")
    server.commit_files(repo, {"adapterhub.json": json.dumps(card).encode(), "adapter.safetensors": data})


def test_unannounced_64mib_body_is_cut_at_the_cards_size(world: dict) -> None:
    server: HubServer = world["server"]
    _crafted_repo(world, "alice/junk", card_changes={})
    rule = server.hostile("adapter.safetensors", methods=("GET",), body=64 * 1024 * 1024,
                          headers={"Content-Length": None}, close_after_body=True)
    line = _hostile_pull(world, "alice/junk@main", contains="over the limit")
    assert rule.hits == 1 and str(json.loads(server.file_bytes("alice/junk", "main", "adapterhub.json"))
                                  ["size_bytes"]) in line


def test_huge_size_bytes_in_the_card_cannot_raise_the_cap(world: dict) -> None:
    server: HubServer = world["server"]
    _crafted_repo(world, "alice/junk", card_changes={"size_bytes": 10 ** 12})
    server.hostile("adapter.safetensors", methods=("GET",), body=64 * 1024 * 1024,
                   headers={"Content-Length": None}, close_after_body=True)
    _hostile_pull(world, "alice/junk@main", contains="limit of 1048576 bytes",
                  env={"ADAPTERHUB_PULL_MAX_BYTES": "1M"})


def test_announced_oversized_file_is_refused_at_the_gets_headers(world: dict) -> None:
    # a pull sends no HEAD (issue 19): the GET's own headers are checked before its body is read
    server: HubServer = world["server"]
    server.hostile("adapter.safetensors", methods=("GET",), headers={"X-Linked-Size": str(64 * 1024 ** 3)})
    since = len(server.requests)
    _hostile_pull(world, "alice/rt@v1", contains="over the limit")
    assert [r.method for r in server.requests[since:] if r.path.endswith("adapter.safetensors")] == ["GET"]


def test_max_bytes_flag_caps_an_honest_file(world: dict) -> None:
    _hostile_pull(world, "alice/rt@v1", "--max-bytes", "1000", contains="limit of 1000 bytes")


def test_huge_card_is_refused(world: dict) -> None:
    server: HubServer = world["server"]
    card = json.loads(server.file_bytes("alice/rt", "v1", "adapterhub.json"))
    card["padding"] = "x" * (2 * 1024 * 1024)
    server.commit_files("alice/bigcard", {"adapterhub.json": json.dumps(card).encode()})
    _hostile_pull(world, "alice/bigcard@main", contains="over the limit")
    # and when the HEAD lies about its size, the GET is cut at the cap
    server.hostile("adapterhub.json", methods=("HEAD",), headers={"Content-Length": "100"})
    server.hostile("adapterhub.json", methods=("GET",), headers={"Content-Length": None}, close_after_body=True)
    _hostile_pull(world, "alice/bigcard@main", contains="refusing")


@pytest.mark.parametrize("args,env", [(["--timeout", "0"], {}), (["--timeout", "soon"], {}),
                                      (["--max-bytes", "-5"], {}), (["--max-bytes", "lots"], {}),
                                      ([], {"ADAPTERHUB_PULL_TIMEOUT": "nan"}),
                                      ([], {"ADAPTERHUB_PULL_MAX_BYTES": "0"})])
def test_bad_limit_settings_are_usage_errors(world: dict, args: list[str], env: dict) -> None:
    home = world["home"]
    before = home_snapshot(home)
    r = run_cli(home, "pull", "alice/rt@v1", *args, env=env, timeout=CLI_TIMEOUT)
    assert r.returncode == 2
    assert_one_line_failure(r, contains="invalid pull")
    assert home_snapshot(home) == before


def test_limits_within_bounds_still_pull(world: dict) -> None:
    r = run_cli(world["home"], "pull", "alice/rt@v1", "--json", "--timeout", "120", "--max-bytes", "4GiB",
                timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["registered"] is True and doc["content_hash"] == world["digest"]
    assert _leftovers(world["home"]) == []


# -------------------------------------------------------------------------------- secrets and provenance
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


USER, PASSWORD = "bob", "pW-s3cr3t-4711"


def _pw_env(server: HubServer, port: int | str | None = None) -> dict:
    port = port or server.url.rsplit(":", 1)[1]
    return {"HF_ENDPOINT": f"http://{USER}:{PASSWORD}@127.0.0.1:{port}", "HF_DEBUG": "1",
            "HF_HUB_VERBOSITY": "debug", "PYTHONWARNINGS": "always"}


def _assert_no_password(world: dict, outputs: list[str]) -> None:
    for text in outputs:
        assert PASSWORD not in text and f"{USER}:" not in text, text[-3000:]
    for f in world["tmp"].rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert PASSWORD.encode() not in f.read_bytes(), f


def test_endpoint_password_is_not_printed_on_retries_nor_stored(world: dict) -> None:
    server: HubServer = world["server"]
    home = world["home"]
    server.fail("resolve", nth=2, status=500, times=2)  # the weights' GET: the client warns about each retry
    r = run_cli(home, "pull", "alice/rt@v1", "--json", env=_pw_env(server), timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "HTTP Error 500" in r.stderr and "127.0.0.1" in r.stderr  # the warnings name the URL, scrubbed
    assert json.loads(r.stdout)["registered"] is True
    _assert_no_password(world, [r.output])
    with Workspace.open(home) as ws:
        prov = [p for p in ws.parents(ws.list_versions()[0].ref) if p["relation"] == "imported_from"][0]["params"]
    assert prov["endpoint"] == server.url  # the public endpoint


def test_endpoint_password_is_not_printed_in_errors(world: dict) -> None:
    server: HubServer = world["server"]
    port = server.url.rsplit(":", 1)[1]
    outputs = []
    server.fail("resolve", status=500, times=1000)
    cases = ((["alice/none@v1"], _pw_env(server)),  # 500s until the deadline
             (["alice/rt@v1"], _pw_env(server, _free_port())),  # unreachable
             (["alice/rt@v1", "--endpoint", f"ftp://{USER}:{PASSWORD}@127.0.0.1:{port}"], _pw_env(server)))
    for args, env in cases:
        r = run_cli(world["home"], "pull", *args, "--timeout", "3", env=env, timeout=CLI_TIMEOUT)
        assert r.returncode != 0 and "Traceback" not in r.output, r.output[-3000:]
        assert r.stderr.strip().splitlines()[-1].startswith("Error: ")
        outputs.append(r.output)
    _assert_no_password(world, outputs)


def test_cache_is_per_endpoint_and_never_serves_another_servers_files(world: dict) -> None:
    server: HubServer = world["server"]
    tmp = world["tmp"]
    first = tmp / "first"
    with Workspace.open(first) as ws:
        ws.add_base("minilm", "minilm")
    r = run_cli(first, "pull", "alice/rt@v1", "--json", timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    key = hashlib.sha256(server.url.encode()).hexdigest()[:16]
    dead = f"http://127.0.0.1:{_free_port()}"
    # another home (the old shared HF cache served it): "from" an unreachable endpoint nothing comes out of a cache
    for home, extra in ((world["home"], []),):
        before = home_snapshot(home)
        r = run_cli(home, "pull", "alice/rt@v1", "--endpoint", dead, *extra, timeout=CLI_TIMEOUT)
        assert_one_line_failure(r, contains="cannot reach")
        assert home_snapshot(home) == before
    assert (first / "cache" / "hub" / key / "blobs" / world["digest"]).is_file()
    assert not (first / "cache" / "hub" / hashlib.sha256(dead.encode()).hexdigest()[:16] / "blobs").exists() or \
        not any((first / "cache" / "hub" / hashlib.sha256(dead.encode()).hexdigest()[:16] / "blobs").iterdir())
    # the same endpoint reuses its cache (no second weights GET) once the bytes are known good
    since = len(server.requests)
    r = run_cli(first, "pull", "alice/rt@v1", "--name", "again", "--json", timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert not any(q.path.endswith("adapter.safetensors") for q in server.requests[since:])


def test_a_corrupted_cache_entry_is_dropped_and_downloaded_again(world: dict) -> None:
    server: HubServer = world["server"]
    home = world["home"]
    key = hashlib.sha256(server.url.encode()).hexdigest()[:16]
    blobs = home / "cache" / "hub" / key / "blobs"
    blobs.mkdir(parents=True)
    (blobs / world["digest"]).write_bytes(b"not the adapter")
    r = run_cli(home, "pull", "alice/rt@v1", "--json", timeout=CLI_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256((blobs / world["digest"]).read_bytes()).hexdigest() == world["digest"]
    tmp = home / "cache" / "hub" / key / "tmp"  # a pull into a local store downloads into its staging, not here
    assert world["victim"].read_bytes() == VICTIM and (not tmp.exists() or os.listdir(tmp) == [])
    assert list((home / "blobs" / "sha256" / "staging").iterdir()) == []

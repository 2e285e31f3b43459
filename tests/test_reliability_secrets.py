"""Secrets: a token given by ``HF_TOKEN`` never appears in output, logs, exceptions, the catalog, the
store, the Hub cache, the model card or any file under the home directory — with the real CLI in
subprocesses (debug logging on) against the local Hub server, on success and on every kind of failure.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from adapterhub import format as fmt
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace

SECRET = "hf_ReLiAbIlItY0123456789SeCrEtToKeN"


def _exe() -> list[str]:
    exe = Path(sys.executable).with_name("adapterhub")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "adapterhub.cli.main"]


def _adapter(shapes, seed: int) -> fmt.SparseAdapter:
    g = torch.Generator().manual_seed(seed)
    name = sorted(n for n in shapes if n.endswith("query.weight"))[0]
    shape = shapes[name]
    idx = torch.randperm(shape[0] * shape[1], generator=g)[:50]
    return fmt.SparseAdapter({name: fmt.SparseParam.from_flat(shape, idx, torch.randn(50, generator=g))}, {},
                             {"mask": {"method": "random"}, "training": {"note": "no secrets here"}})


def _files_containing(root: Path, needle: bytes) -> list[str]:
    out = []
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink() and needle in f.read_bytes():
            out.append(str(f))
    return out


@pytest.mark.e2e
@pytest.mark.slow  # ~3 min: 20 CLI processes, the Hub client retries injected 500s with backoff
def test_token_never_leaks_through_the_real_cli(hub_server: HubServer, tmp_path: Path, tiny_bert_dir: Path) -> None:
    from adapterhub.bases.sources import tensor_shapes

    hub_server.token = SECRET  # the server requires it: a wrong or missing token is refused
    shapes = tensor_shapes(tiny_bert_dir)
    home_a, home_b, hf = tmp_path / "a", tmp_path / "b", tmp_path / "hf"
    for home in (home_a, home_b):
        with Workspace.open(home) as ws:
            ws.add_base("tiny", str(tiny_bert_dir))
    with Workspace.open(home_a) as ws:
        for i in range(1, 9):
            ws.register(_adapter(shapes, i), name="sec", task="t", base="tiny", metrics={"acc": 0.5 + i / 10})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub_server.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(hf), HF_TOKEN=SECRET,
               HF_HUB_VERBOSITY="debug", HF_DEBUG="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONWARNINGS="always")
    outputs: list[str] = []

    failures = []

    def sh(home: Path, *args: str, ok: bool | None = True, token: str | None = SECRET) -> subprocess.CompletedProcess:
        e = dict(env)
        if token is None:
            e.pop("HF_TOKEN")
        else:
            e["HF_TOKEN"] = token
        r = subprocess.run(_exe() + ["--home", str(home), *args], env=e, capture_output=True, text=True, timeout=300)
        outputs.extend([r.stdout, r.stderr])
        if ok:
            assert r.returncode == 0, r.stderr[-2000:]
        elif r.returncode or ok is False:
            failures.append(args)
            # with HF_DEBUG the Hub client logs its requests (and progress bars) around our one error line
            assert r.returncode == 1 and any(ln.startswith("Error: ") for ln in r.stderr.splitlines()), \
                (r.returncode, r.stderr[-2000:])
        return r

    # successes: push (owner from whoami), push again (already there), versions, show, pull
    r = sh(home_a, "push", "sec@1", "--json")
    repo = json.loads(r.stdout)["repo"]
    sh(home_a, "push", "sec@1")
    sh(home_a, "push", "sec@2", "--repo", repo, "--json")
    sh(home_a, "hub", "versions", repo, "--json")
    sh(home_a, "show", "sec@1", "--json")
    sh(home_b, "pull", f"{repo}@v1", "--json")
    sh(home_b, "pull", f"{repo}@v2", "--json")
    # failures: server errors at each stage, a dropped connection, a refused token, a tampered download
    # (a push resumes what an earlier failed one left on the Hub, so some of these may succeed)
    for n, (kind, mode) in enumerate((("tag", "status"), ("commit", "status"), ("lfs_upload", "status"),
                                      ("preupload", "drop")), start=3):
        hub_server.fail(kind, status=500, mode=mode, times=20)
        sh(home_a, "push", f"sec@{n}", "--repo", repo, ok=None)
        hub_server.clear_faults()
    hub_server.fail("refs", status=401, times=20)
    sh(home_a, "push", "sec@7", "--repo", repo, ok=None)
    hub_server.clear_faults()
    sh(home_a, "push", "sec@8", "--repo", repo, ok=None, token="hf_notTheRightOne")
    hub_server.tamper()
    sh(tmp_path / "c", "pull", f"{repo}@v2", ok=False)
    hub_server.untamper()
    sh(home_a, "push", "sec@3", "--repo", repo)
    assert len(failures) >= 6, failures
    print("failed as injected:", failures)

    for text in outputs:
        assert SECRET not in text
        assert SECRET[3:] not in text and SECRET[-12:] not in text  # no partial echo either
    needle = SECRET.encode()
    # the catalog DB (and its WAL), the store, deployments, caches: every file under both homes and HF_HOME
    for root in (home_a, home_b, tmp_path / "c"):
        assert _files_containing(root, needle) == []
    leaked = [f for f in _files_containing(hf, needle) if not f.endswith("/token")]
    assert leaked == []
    # the catalog rows themselves (JSON columns included)
    with Workspace.open(home_a) as ws:
        for v in ws.list_versions():
            assert SECRET not in json.dumps(v.to_json(), default=str)
    # the model card and every other file the Hub received
    hub_repo = hub_server.repos[repo]
    seen_readme = False
    for commit in hub_repo.commits.values():
        for path in commit.files:
            data = hub_server.file_bytes(repo, commit.oid, path)
            assert needle not in data, path
            seen_readme |= path == "README.md"
    assert seen_readme
    # on the wire: only in the Authorization header, never in a URL or body
    for req in hub_server.requests:
        assert needle not in req.body and SECRET not in req.path + req.query
        for k, v in req.headers.items():
            if SECRET in v:
                assert k == "authorization", k


def test_library_exceptions_never_carry_the_token(hub_server: HubServer, tmp_path: Path, tiny_bert_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """str(), repr() and the full formatted traceback (causes and contexts) of every HubError."""
    from adapterhub.bases.sources import tensor_shapes
    from adapterhub.errors import AdapterHubError
    from adapterhub.hub import client as hub

    hub_server.token = SECRET
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with Workspace.open(tmp_path / "h") as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        ws.register(_adapter(tensor_shapes(tiny_bert_dir), 7), name="x", task="t", base="tiny")
        errors = []
        for kind in ("create_repo", "commit", "lfs_batch", "tag", "refs"):
            hub_server.fail(kind, status=500, times=20)
            try:
                hub.push(ws, "x@1", repo="bob/x")
            except AdapterHubError as e:
                errors.append(e)
            hub_server.clear_faults()
        for token in (SECRET, "hf_wrong"):
            try:
                hub.pull(ws, "bob/missing@v1", token=token)
            except AdapterHubError as e:
                errors.append(e)
    assert len(errors) >= 5
    for e in errors:
        text = str(e) + repr(e) + "".join(traceback.format_exception(type(e), e, e.__traceback__))
        assert SECRET not in text, text[-1500:]

"""The test Hub server speaks the protocol huggingface_hub expects (raw huggingface_hub calls, no adapterhub)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from adapterhub.testing.hubserver import HubServer


def _folder(tmp_path: Path, payload: bytes) -> Path:
    d = tmp_path / "up"
    d.mkdir(exist_ok=True)
    (d / "adapter.safetensors").write_bytes(payload)
    (d / "card.json").write_text('{"a": 1}\n')
    (d / "README.md").write_text("---\nlibrary_name: adapterhub\ntags:\n- x\n---\n# hi\n")
    return d


def test_upload_tag_download_roundtrip(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub_server.url, token="hf_testtoken_secret")
    url = api.create_repo("alice/demo", exist_ok=True)
    assert url.repo_id == "alice/demo"
    api.create_repo("alice/demo", exist_ok=True)  # 409 swallowed
    payload = os.urandom(50_000)
    info = api.upload_folder(repo_id="alice/demo", folder_path=_folder(tmp_path, payload), commit_message="v1")
    api.create_tag("alice/demo", tag="v1", revision=info.oid)
    with pytest.raises(HfHubHTTPError):
        api.create_tag("alice/demo", tag="v1", revision=info.oid)
    # the binary went through preupload=lfs, the LFS batch API and the upload href
    kinds = hub_server.kinds()
    assert kinds["preupload"] == 1 and kinds["lfs_batch"] == 1 and kinds["lfs_upload"] == 1
    assert kinds["validate_yaml"] >= 1 and kinds["commit"] == 1
    puts = [r for r in hub_server.requests if r.kind == "lfs_upload"]
    assert puts[0].body == payload and "authorization" not in puts[0].headers
    assert hub_server.uploaded_bytes() == len(payload) + len('{"a": 1}\n') + len(
        "---\nlibrary_name: adapterhub\ntags:\n- x\n---\n# hi\n")

    refs = api.list_repo_refs("alice/demo")
    assert [t.name for t in refs.tags] == ["v1"] and refs.tags[0].target_commit == info.oid
    assert refs.branches[0].target_commit == info.oid

    p = hf_hub_download("alice/demo", "adapter.safetensors", revision="v1", endpoint=hub_server.url,
                        cache_dir=tmp_path / "cache")
    assert Path(p).read_bytes() == payload
    assert f"snapshots/{info.oid}/" in Path(p).as_posix()
    snap = snapshot_download("alice/demo", revision=info.oid, endpoint=hub_server.url, cache_dir=tmp_path / "cache2")
    assert sorted(os.listdir(snap)) == [".gitattributes", "README.md", "adapter.safetensors", "card.json"]
    assert hashlib.sha256(Path(snap, "adapter.safetensors").read_bytes()).hexdigest() == hashlib.sha256(payload).hexdigest()

    # an unchanged re-upload: preupload returns the remote oids, so no LFS PUT and no new commit
    mark = len(hub_server.requests)
    again = api.upload_folder(repo_id="alice/demo", folder_path=_folder(tmp_path, payload), commit_message="v1 again")
    assert again.oid == info.oid
    assert hub_server.uploaded_bytes(since=mark) == 0
    assert len(hub_server.commits("alice/demo")) == 2  # initial commit + v1


def test_errors_map_to_huggingface_hub_exceptions(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub_server.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs("nobody/nothing")
    api.create_repo("bob/r")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("bob/r", revision="v9")
    hub_server.fail("commit", status=500)
    with pytest.raises(HfHubHTTPError):
        api.upload_folder(repo_id="bob/r", folder_path=_folder(tmp_path, b"\0" * 100), commit_message="x")
    assert len(hub_server.commits("bob/r")) == 1


def test_token_required_when_configured(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.token = "hf_right"
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub_server.url, token="hf_wrong").create_repo("carol/x")
    HfApi(endpoint=hub_server.url, token="hf_right").create_repo("carol/x", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=False).list_repo_refs("carol/x")


def test_tamper_flips_a_byte_same_size(hub_server: HubServer, tmp_path: Path) -> None:
    payload = os.urandom(1000)
    hub_server.commit_files("dan/t", {"adapter.safetensors": payload})
    hub_server.tamper("adapter.safetensors")
    p = hf_hub_download("dan/t", "adapter.safetensors", endpoint=hub_server.url, cache_dir=tmp_path / "c")
    got = Path(p).read_bytes()
    assert len(got) == len(payload) and got != payload

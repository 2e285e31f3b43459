"""State-root schemes (adapterhub.apply.state): BLAKE3 roots for new bases, sha256 roots kept where recorded.

The definitions are pinned (the sha256 value is the one every catalog before revision 0008 recorded) and
re-derived here from the module's documented construction; a deployment keeps its base's scheme through
apply, revert, rollback and verify, so an empty stack still has the base's root under either scheme."""
from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from blake3 import blake3

from adapterhub.apply import deployments as dep, state as state_mod
from adapterhub.apply.patching import state_root
from adapterhub.apply.state import (
    BLAKE3,
    CHUNK,
    SHA256,
    FolderState,
    StateFileError,
    measure_folder,
    scheme_of,
    short_root,
)
from adapterhub.errors import DeploymentError
from test_deploy_state import adapter_for, data_offset, flip_byte

SD = {"model.embed.weight": torch.arange(300_000, dtype=torch.float32).reshape(600, 500),
      "model.norm.weight": torch.linspace(-1, 1, 7, dtype=torch.bfloat16), "empty": torch.zeros(0, 4, dtype=torch.float16)}
ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# the sha256 root recorded for SD by adapterhub before BLAKE3 roots (revision 0007 and earlier)
SHA256_ROOT = "1733aed5c913f8400c7795a451c0f08bc07b5948c5140fd6e7e1851c9a712991"
BLAKE3_ROOT = "blake3:1f0e7e13f7620391b22f257d548a0da1a021c76fafa8f814eadca98e"
NAMES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]


def _spec_root(sd: dict[str, torch.Tensor], h, prefix: bytes) -> bytes:
    """The documented construction, written out again: chunk hashes, a leaf per tensor, the root."""
    root = h(prefix)
    for name in sorted(sd):
        t = sd[name]
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        chunks = b"".join(h(raw[a:a + CHUNK]).digest() for a in range(0, len(raw), CHUNK))
        leaf = h(b"\x01" + json.dumps([name, ST[t.dtype], list(t.shape)]).encode() + b"\n" + chunks).digest()
        root.update(leaf)
    return root


def test_root_definitions_are_pinned_and_follow_the_documented_construction():
    assert state_root(SD, SHA256) == SHA256_ROOT == _spec_root(SD, hashlib.sha256, SHA256.prefix).hexdigest()
    assert state_root(SD) == state_root(SD, BLAKE3) == BLAKE3_ROOT
    assert BLAKE3_ROOT == "blake3:" + _spec_root(SD, blake3, BLAKE3.prefix).hexdigest(length=28)
    assert len(BLAKE3_ROOT) <= 64  # the catalog's columns are String(64)
    assert scheme_of(SHA256_ROOT) is SHA256 and scheme_of(BLAKE3_ROOT) is BLAKE3 and scheme_of(None) is BLAKE3
    one_bit = {**SD, "model.norm.weight": SD["model.norm.weight"].clone()}
    one_bit["model.norm.weight"].view(torch.int16)[3] ^= 1
    assert state_root(one_bit, SHA256) != SHA256_ROOT and state_root(one_bit) != BLAKE3_ROOT


def test_short_root_keeps_the_tag():
    assert short_root(BLAKE3_ROOT) == "blake3:1f0e7e13f762"
    assert short_root(SHA256_ROOT, 16) == SHA256_ROOT[:16] and short_root(None) == ""
    assert short_root("unreadable: a: b", 16) == "unreadable: a: b"[:16]  # not a root: cut as it is


@pytest.fixture
def old_and_new(ws, tiny_llama_dir, monkeypatch):
    """Base "old" measured while sha256 was the default (as in a catalog from before 0008), with deployment
    "d"; then the default is BLAKE3 again."""
    ws.add_base("old", str(tiny_llama_dir))
    refs = [ws.register(adapter_for(tiny_llama_dir, NAMES, i), name=f"a{i}", task="t", base="old").ref
            for i in range(2)]
    monkeypatch.setattr(state_mod, "DEFAULT_SCHEME", SHA256)
    dep.create(ws, "d", "old")
    monkeypatch.undo()
    return refs


def test_sha256_deployments_keep_their_scheme_through_every_operation(ws, old_and_new):
    a, b = old_and_new
    d0 = dep.get(ws, "d")
    assert re.fullmatch(r"[0-9a-f]{64}", d0.state_root) and d0.base_state_root == d0.state_root
    doc = json.loads((d0.path / ".adapterhub" / "state.json").read_bytes())
    assert "hash" not in doc  # a sha256 state file is the bytes it was before schemes
    dep.apply(ws, "d", a)
    after_b = dep.apply(ws, "d", b).state_root
    assert re.fullmatch(r"[0-9a-f]{64}", after_b)
    assert after_b == measure_folder(d0.path, scheme=SHA256)[0].root()
    assert dep.revert(ws, "d").state_root != d0.state_root
    assert dep.revert(ws, "d").state_root == d0.state_root  # empty stack: the base's (sha256) root
    dep.apply(ws, "d", a)
    assert dep.rollback(ws, "d", 0, verify=True).state_root == d0.state_root
    v = dep.verify(ws, "d")
    assert v["ok"] and v["actual"] == d0.state_root
    # another deployment of the same base uses the base's recorded scheme, so it starts at the same root
    assert dep.create(ws, "d2", "old").state_root == d0.state_root
    # tampering is caught under the sha256 scheme too
    dep.apply(ws, "d", a)
    f, off = data_offset(d0.path, NAMES[0])
    flip_byte(f, off + 2)
    with pytest.raises(DeploymentError, match="do not match the recorded state"):
        dep.apply(ws, "d", b)
    assert not dep.verify(ws, "d")["ok"]


def test_new_bases_get_blake3_roots_and_derived_roots_equal_measured_ones(ws, tiny_llama_dir):
    ws.add_base("tiny", str(tiny_llama_dir))
    a = ws.register(adapter_for(tiny_llama_dir, NAMES, 0), name="a", task="t", base="tiny").ref
    info = dep.create(ws, "n", "tiny")
    assert re.fullmatch(r"blake3:[0-9a-f]{56}", info.state_root) and info.base_state_root == info.state_root
    assert json.loads((info.path / ".adapterhub" / "state.json").read_bytes())["hash"] == "blake3"
    applied = dep.apply(ws, "n", a)
    assert applied.state_root == measure_folder(info.path, scheme=BLAKE3)[0].root() != info.state_root
    assert dep.revert(ws, "n").state_root == info.state_root
    assert dep.apply(ws, "n", a, verify=True).state_root == applied.state_root  # measured = derived
    assert dep.rollback(ws, "n", 0).state_root == info.state_root


def test_state_file_of_an_unknown_hash_or_another_scheme_is_not_trusted(ws, tiny_llama_dir):
    ws.add_base("tiny", str(tiny_llama_dir))
    info = dep.create(ws, "n", "tiny")
    sf = info.path / ".adapterhub" / "state.json"
    data = sf.read_bytes()
    with pytest.raises(StateFileError, match="unknown hash"):
        FolderState.from_bytes(data.replace(b'"hash":"blake3"', b'"hash":"md5"'))
    # the same chunk hashes claimed as sha256 ones: not the catalog's root, so a full measurement decides
    forged = data.replace(b',"hash":"blake3"', b"")
    assert FolderState.from_bytes(forged)[0].scheme is SHA256
    sf.write_bytes(forged)
    assert dep.verify(ws, "n", measure=False)["measured"]
    with pytest.raises(StateFileError, match="recorded hashes are sha256"):
        measure_folder(info.path, scheme=BLAKE3, files=[], base=FolderState.from_bytes(forged)[0])


def test_downgrade_below_0008_refuses_blake3_deployments_and_forgets_blake3_base_roots(ws, tiny_llama_dir):
    from sqlalchemy import select

    from adapterhub.apply import deploy_folders
    from adapterhub.catalog import db
    from adapterhub.catalog.models import BaseModel

    ws.add_base("tiny", str(tiny_llama_dir))
    dep.create(ws, "n", "tiny")
    with pytest.raises(RuntimeError, match="BLAKE3 state roots \\(n\\)"):
        db.downgrade(ws.engine, "0007")
    assert db.current_revision(ws.engine) == "0008"  # nothing changed
    deploy_folders.remove(ws, "n")
    db.downgrade(ws.engine, "0007")
    with ws.engine.connect() as c:
        assert c.execute(select(BaseModel.state_root)).scalars().all() == [None]  # measured again at 0007
    db.upgrade(ws.engine)
    assert db.current_revision(ws.engine) == db.head_revision()


def test_row_from_before_0004_takes_its_bases_scheme(ws, old_and_new):
    """A deployment row with no root (made before revision 0004) of a base measured with sha256 gets a sha256
    root at its next operation, so that its empty stack still has its base's root."""
    from sqlalchemy import update

    from adapterhub.bases.sources import fingerprint_folder
    from adapterhub.catalog.models import Deployment

    a, _ = old_and_new
    info = dep.get(ws, "d")
    with ws.session() as s:
        s.execute(update(Deployment).values(state_root=None, state_fingerprint=fingerprint_folder(info.path)))
    (info.path / ".adapterhub" / "state.json").unlink()
    out = dep.apply(ws, "d", a)
    assert re.fullmatch(r"[0-9a-f]{64}", out.state_root)
    assert out.state_root == measure_folder(info.path, scheme=SHA256)[0].root()
    assert dep.revert(ws, "d").state_root == info.base_state_root


# -- base rehash: moving a base measured with sha256 to BLAKE3 -----------------------------------------------


def test_base_rehash_moves_new_deployments_to_blake3_and_old_ones_keep_sha256(ws, old_and_new, tiny_llama_dir):
    from click.testing import CliRunner

    from adapterhub.apply import deploy_folders
    from adapterhub.cli.main import cli

    a, b = old_and_new
    d0 = dep.get(ws, "d")
    dep.apply(ws, "d", a)
    out = deploy_folders.rehash_base(ws, "old")
    want = measure_folder(tiny_llama_dir, scheme=BLAKE3)[0].root()
    assert out == {"base": "old", "previous": d0.state_root, "state_root": want, "changed": True, "scheme": "blake3",
                   "deployments": {"d": "sha256"}}
    assert ws.deployment_rows.base_state_root(d0.base_id) == want
    n = dep.create(ws, "n", "old")  # a new deployment hashes with BLAKE3 and starts at the base's new root
    assert n.state_root == want and json.loads((n.path / ".adapterhub" / "state.json").read_bytes())["hash"] == "blake3"
    # the old deployment keeps sha256 through every operation; its empty stack's root and fingerprint are known
    assert re.fullmatch(r"[0-9a-f]{64}", dep.apply(ws, "d", b).state_root)
    dep.revert(ws, "d")
    back = dep.revert(ws, "d")
    assert back.state_root == d0.state_root and back.state_fingerprint == ws.get_base("old").fingerprint
    assert dep.verify(ws, "d")["ok"] and dep.verify(ws, "n")["ok"]
    assert dep.rollback(ws, "d", 0, verify=True).state_root == d0.state_root
    # once BLAKE3, nothing to do; the CLI says so (and names the deployment that keeps sha256)
    r = CliRunner().invoke(cli, ["--home", str(ws.home), "base", "rehash", "old", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {**out, "previous": want, "changed": False,
                                    "deployments": {"d": "sha256", "n": "blake3"}}
    r = CliRunner().invoke(cli, ["--home", str(ws.home), "base", "rehash", "old"])
    assert r.exit_code == 0 and r.stdout.splitlines() == [
        f"old: state root {short_root(want, 16)} is already blake3", "deployments keeping their sha256 roots: d"]


def test_base_rehash_of_a_changed_or_never_measured_base(ws, tmp_path, tiny_llama_dir, monkeypatch):
    """A base whose folder changed is refused (one line, exit 1, nothing changed); one whose files are symlinks
    (a Hugging Face cache snapshot) is measured through them; a base never measured has nothing to do."""
    import shutil

    from click.testing import CliRunner

    from adapterhub.apply import deploy_folders
    from adapterhub.cli.main import cli

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(tiny_llama_dir, blobs)
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    ws.add_base("linked", str(snap))
    ws.add_base("fresh", str(tiny_llama_dir))
    monkeypatch.setattr(state_mod, "DEFAULT_SCHEME", SHA256)
    old = dep.create(ws, "d", "linked").state_root
    monkeypatch.undo()
    home = str(ws.home)
    r = CliRunner().invoke(cli, ["--home", home, "base", "rehash", "fresh"])
    assert r.exit_code == 0 and r.stdout.strip() == "fresh: not measured yet; its first deploy create measures it with blake3"
    weights = next(blobs.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # the last tensor's bytes: the base is not what was registered any more
    weights.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["--home", home, "base", "rehash", "linked"])
    assert r.exit_code == 1 and "no longer matches its registered fingerprint" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert ws.deployment_rows.base_state_root(dep.get(ws, "d").base_id) == old  # nothing changed
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    out = deploy_folders.rehash_base(ws, "linked")
    assert out["changed"] and out["state_root"] == measure_folder(blobs, scheme=BLAKE3)[0].root()

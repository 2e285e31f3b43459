"""State roots of deployments (issue 19): measured vs derived, cheap stat checks between operations, tamper
detection, pre-0004 rows, sharded bf16/fp16/fp32 folders with tied embeddings, O(nnz) unions, one copy."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from adapterhub.apply import deploy_folders, deploy_ownership, deployments as dep, state as state_mod
from adapterhub.apply.disk import WeightsFolder, _union_sorted
from adapterhub.apply.patching import apply_adapter, state_root
from adapterhub.apply.state import DEFAULT_SCHEME, measure_folder
from adapterhub.bases.sources import fingerprint_folder, tensor_shapes
from adapterhub.errors import DeploymentError
from adapterhub.format import SparseAdapter, SparseParam

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def save_sharded_llama(dest: Path, dtype: torch.dtype) -> Path:
    """A tiny random Llama with tied embeddings, saved by transformers in several shards + an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(dest, max_shard_size="60KB")
    return dest


def adapter_for(folder: Path, names: list[str], seed: int, density: float = 0.05) -> SparseAdapter:
    shapes = tensor_shapes(folder)
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n in names:
        numel = 1
        for s in shapes[n]:
            numel *= s
        k = max(1, int(density * numel))
        idx = torch.randperm(numel, generator=g)[:k].sort().values
        params[n] = SparseParam(shapes[n], idx, torch.randn(k, generator=g) * 0.02)
    return SparseAdapter(params, {}, {"mask": {"method": "random"}})


def shards(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def in_memory(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for p in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(p))
    return sd


@pytest.fixture(scope="module", params=list(DT))
def sharded(request, tmp_path_factory):
    return save_sharded_llama(tmp_path_factory.mktemp(f"sharded_{request.param}") / "model", DT[request.param])


@pytest.fixture
def tiny(ws, tiny_llama_dir):
    ws.add_base("tiny", str(tiny_llama_dir))
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    refs = [ws.register(adapter_for(tiny_llama_dir, names, i), name=f"a{i}", task="t", base="tiny").ref
            for i in range(2)]
    info = dep.create(ws, "d", "tiny")
    return info, refs


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def data_offset(folder: Path, tensor: str) -> tuple[Path, int]:
    with WeightsFolder(folder, writable=False) as w:
        _, fname, b, _ = w.buffer(tensor)
    return folder / fname, b


# -- sharded bases --------------------------------------------------------------------------------


def test_sharded_tied_apply_revert_exact_and_only_touched_shards_synced(ws, sharded, monkeypatch):
    """A save_pretrained folder (index + shards, tied embeddings) in bf16/fp16/fp32: apply/revert are exact
    (file hashes, not tolerances), the recorded roots equal in-memory oracles, untouched shards are never
    written nor fsynced."""
    assert (sharded / "model.safetensors.index.json").is_file()
    files = sorted(sharded.glob("*.safetensors"))
    assert len(files) >= 3
    sd0 = in_memory(sharded)
    assert "lm_head.weight" not in sd0  # tied: stored once, as the embedding
    ws.add_base("s", str(sharded))
    names = ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"]
    a = ws.register(adapter_for(sharded, names, 1), name="a", task="t", base="s").ref
    b = ws.register(adapter_for(sharded, ["model.layers.1.mlp.down_proj.weight"], 2), name="b", task="t",
                    base="s").ref
    info = dep.create(ws, "d", "s")
    base_hashes = shards(info.path)
    assert base_hashes == shards(sharded)
    assert info.state_root == state_root(sd0) == ws.deployment_rows.base_state_root(info.base_id)
    synced: list[str] = []
    import adapterhub.apply.disk as disk

    real_sync = disk.SafetensorsFile.sync
    monkeypatch.setattr(disk.SafetensorsFile, "sync", lambda self: (synced.append(self.path.name), real_sync(self)))
    with WeightsFolder(info.path, writable=False) as w:
        holding = {w.file_of(n) for n in names}
    dep.apply(ws, "d", a)
    info = dep.apply(ws, "d", b, 0.5)
    expect = {k: v.clone() for k, v in sd0.items()}
    apply_adapter(expect, ws.load_adapter(a))
    apply_adapter(expect, ws.load_adapter(b), 0.5)
    assert info.state_root == state_root(expect) == measure_folder(info.path, scheme=DEFAULT_SCHEME)[0].root()
    assert set(synced) == holding  # only the shards the adapters touch
    untouched = {f for f in base_hashes if f not in holding}
    assert untouched and all(shards(info.path)[f] == base_hashes[f] for f in untouched)
    info = dep.revert(ws, "d", a)  # b is re-applied on top of the base
    expect = {k: v.clone() for k, v in sd0.items()}
    apply_adapter(expect, ws.load_adapter(b), 0.5)
    assert info.state_root == state_root(expect) == measure_folder(info.path, scheme=DEFAULT_SCHEME)[0].root()
    info = dep.revert(ws, "d")
    assert shards(info.path) == base_hashes  # bit for bit
    assert info.state_root == state_root(sd0)
    assert info.state_fingerprint == ws.get_base("s").fingerprint  # back at the base: its identity is known
    assert dep.verify(ws, "d")["ok"]


# -- measured vs derived, cheap checks, tamper detection ----------------------------------------------


def test_apply_revert_state_root_equals_base_and_nothing_rehashed_in_full(ws, tiny, monkeypatch):
    info, (a, _) = tiny
    base_root = info.state_root
    calls: list[object] = []
    real = state_mod.measure_folder

    def spy(folder, **kw):
        calls.append(kw.get("files"))
        return real(folder, **kw)

    monkeypatch.setattr(dep, "measure_folder", spy)
    monkeypatch.setattr("adapterhub.bases.sources.fingerprint_folder", lambda *_: pytest.fail("identity re-hash"))
    dep.apply(ws, "d", a)
    info = dep.revert(ws, "d")
    assert None not in calls  # never a full measurement (at most a racily clean file re-hashed)
    assert info.state_root == base_root
    evs = dep.history(ws, "d")
    assert [(e.action, e.measured) for e in evs] == [("create", True), ("apply", False), ("revert", False)]
    assert evs[-1].state_root == evs[0].state_root
    assert evs[-1].state_fingerprint == ws.get_base("tiny").fingerprint
    monkeypatch.undo()
    v = dep.verify(ws, "d")
    assert v["ok"] and v["measured"] and v["actual"] == base_root


def test_tamper_with_mtime_change_caught_by_cheap_check(ws, tiny):
    info, (a, b) = tiny
    dep.apply(ws, "d", a)
    f, off = data_offset(info.path, "model.layers.0.self_attn.q_proj.weight")
    flip_byte(f, off + 2)
    before = f.read_bytes()
    with pytest.raises(DeploymentError, match="do not match the recorded state"):
        dep.apply(ws, "d", b)
    assert f.read_bytes() == before  # nothing was changed
    assert [e.action for e in dep.history(ws, "d")] == ["create", "apply"]
    assert not dep.verify(ws, "d")["ok"]


def test_tamper_with_mtime_restored_caught_by_ctime_and_by_verify(ws, tiny):
    info, (a, b) = tiny
    dep.apply(ws, "d", a)
    f, off = data_offset(info.path, "model.layers.1.mlp.up_proj.weight")
    st = os.stat(f)
    flip_byte(f, off + 1)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as recorded
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns and os.stat(f).st_size == st.st_size
    v = dep.verify(ws, "d")
    assert not v["ok"] and v["actual"] != v["expected"]
    with pytest.raises(DeploymentError, match="do not match the recorded state"):
        dep.apply(ws, "d", b)


def _forge_state(path: Path, **override) -> None:
    """Make the state file's stat data match the files as they are now (a change stat cannot see)."""
    sf = path / ".adapterhub" / "state.json"
    doc = json.loads(sf.read_bytes())
    for f in doc["files"]:
        st = os.stat(path / f)
        doc["files"][f].update({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                                "ino": st.st_ino, "dev": st.st_dev, "clock_ns": st.st_mtime_ns + 1, **override})
    sf.write_bytes(json.dumps(doc).encode())


def test_tamper_invisible_to_stat_still_caught_by_verify_and_rollback_verify(ws, tiny):
    info, (a, b) = tiny
    dep.apply(ws, "d", a)
    f, off = data_offset(info.path, "model.layers.1.mlp.up_proj.weight")
    flip_byte(f, off + 3)
    _forge_state(info.path)
    v = dep.verify(ws, "d")
    assert not v["ok"] and v["actual"] != v["expected"]
    with pytest.raises(DeploymentError, match="do not match the recorded state"):
        dep.rollback(ws, "d", 0, verify=True)
    assert [e.action for e in dep.history(ws, "d")] == ["create", "apply"]


def test_racily_clean_file_is_rehashed(ws, tiny):
    """Recorded stat data equal to the file's, but its mtime not older than the clock read before the stat:
    the file may have changed in the same tick, so it is re-hashed — and the change is found."""
    info, (a, b) = tiny
    dep.apply(ws, "d", a)
    f, off = data_offset(info.path, "model.layers.1.mlp.up_proj.weight")
    flip_byte(f, off + 5)
    _forge_state(info.path)
    doc = json.loads((info.path / ".adapterhub" / "state.json").read_bytes())
    for s in doc["files"].values():
        s["clock_ns"] = s["mtime_ns"]
    (info.path / ".adapterhub" / "state.json").write_bytes(json.dumps(doc).encode())
    with pytest.raises(DeploymentError, match="do not match the recorded state"):
        dep.apply(ws, "d", b)


def test_rollback_verify_measures_and_records_it(ws, tiny):
    info, (a, b) = tiny
    dep.apply(ws, "d", a)
    dep.apply(ws, "d", b)
    out = dep.rollback(ws, "d", 1, verify=True)
    assert [x["ref"] for x in out.stack] == [a]
    evs = dep.history(ws, "d")
    assert (evs[-1].action, evs[-1].measured) == ("rollback", True)
    assert evs[-1].state_root == evs[1].state_root
    from adapterhub.cli.main import cli

    r = CliRunner().invoke(cli, ["--home", str(ws.home), "deploy", "rollback", "d", "--to", "0", "--verify", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["state_root"] == info.state_root
    r = CliRunner().invoke(cli, ["--home", str(ws.home), "deploy", "history", "d", "--json"])
    assert [e["measured"] for e in json.loads(r.output)] == [True, False, False, True, True]


def test_damaged_or_forged_state_file_falls_back_to_a_full_measurement(ws, tiny):
    info, (a, _) = tiny
    sf = info.path / ".adapterhub" / "state.json"
    doc = json.loads(sf.read_bytes())
    name = next(iter(doc["tensors"]))
    doc["tensors"][name]["hashes"] = doc["tensors"][name]["hashes"][::-1]  # root no longer the catalog's
    sf.write_bytes(json.dumps(doc).encode())
    out = dep.apply(ws, "d", a)  # measured in full first (the weights are fine), then applied
    assert out.state_root == measure_folder(out.path, scheme=DEFAULT_SCHEME)[0].root()
    sf.write_bytes(b"[1,2")
    assert dep.revert(ws, "d").state_root == info.state_root


def test_row_from_before_0004_gets_its_root_lazily(ws, tiny):
    """A catalog migrated to 0004 has rows with no state root: the next operation measures once, checks the
    identity-style fingerprint recorded before (a changed folder is refused), then records the root."""
    from sqlalchemy import update

    from adapterhub.catalog.models import Deployment

    info, (a, b) = tiny
    dep.apply(ws, "d", a)
    legacy_fp = fingerprint_folder(info.path)
    with ws.session() as s:
        s.execute(update(Deployment).values(state_root=None, state_fingerprint=legacy_fp))
    (info.path / ".adapterhub" / "state.json").unlink()
    v = dep.verify(ws, "d")
    assert v["ok"] and v["expected"] == legacy_fp
    out = dep.apply(ws, "d", b)
    assert out.state_root == measure_folder(out.path, scheme=DEFAULT_SCHEME)[0].root()
    with ws.session() as s:
        s.execute(update(Deployment).values(state_root=None, state_fingerprint="0" * 64))
    with pytest.raises(DeploymentError, match="do not match the recorded state"):
        dep.revert(ws, "d")


# -- O(nnz) unions and the one copy --------------------------------------------------------------


def test_union_sorted_is_a_merge_not_a_mark():
    g = torch.Generator().manual_seed(0)
    lists = [torch.randint(0, 10**6, (n,), generator=g).unique() for n in (1000, 10, 0, 5000)]
    want = sorted(set().union(*[set(t.tolist()) for t in lists]))
    assert _union_sorted(lists).tolist() == want
    huge = [torch.tensor([3, 10**13]), torch.tensor([5, 10**13 + 7])]  # a mark would need 10 TB
    assert _union_sorted(huge, 10**14).tolist() == [3, 5, 10**13, 10**13 + 7]


def test_create_copies_and_hashes_once(ws, tiny_llama_dir, monkeypatch):
    ws.add_base("tiny", str(tiny_llama_dir))
    calls: list[bool] = []
    real = state_mod.measure_folder

    def spy(folder, **kw):
        calls.append(bool(kw.get("identity")))
        return real(folder, **kw)

    monkeypatch.setattr(deploy_ownership, "measure_folder", spy)
    monkeypatch.setattr(dep, "fingerprint_folder", lambda *_: pytest.fail("second hash"), raising=False)
    one = dep.create(ws, "one", "tiny")
    two = dep.create(ws, "two", "tiny")
    assert calls == [True, False]  # the first also checks the identity fingerprint in the same pass
    assert one.state_root == two.state_root == ws.deployment_rows.base_state_root(one.base_id)
    assert shards(one.path) == shards(tiny_llama_dir)


def test_create_syncs_every_shard_before_its_state_file_and_records_their_final_stat(ws, tmp_path, monkeypatch):
    """Shards are fsynced on a worker as they are copied, overlapping the copy and the measurement: each one is
    durable before the state file is written, has mode 0644, and the stat data recorded is the file's final one
    (a chmod after the measurement would change the ctime and make the next operation re-hash in full)."""
    base = save_sharded_llama(tmp_path / "model", torch.bfloat16)
    ws.add_base("sh", str(base))
    events: list[str] = []
    real_fsync, real_write = os.fsync, deploy_folders.atomic_write_bytes

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def write(path, data):
        events.append(f"write {Path(path).name}")
        return real_write(path, data)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(deploy_folders, "atomic_write_bytes", write)
    info = dep.create(ws, "d", "sh")
    monkeypatch.undo()
    names = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(names) > 3
    first_state_write = events.index("write state.json")
    synced = {Path(e).name for e in events[:first_state_write] if e.endswith(".safetensors")}
    assert synced == set(names)
    for n in names:
        assert (info.path / n).stat().st_mode & 0o777 == 0o644
    recorded, _ = state_mod.read_state_file(info.path / ".adapterhub" / "state.json")
    assert recorded.stale_files(info.path) == []


def test_clone_file_copies_bytes(tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3 << 20) + b"tail")
    dst = tmp_path / "b.bin"
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        deploy_folders._clone_file(fin.fileno(), fout.fileno())
    assert dst.read_bytes() == src.read_bytes()

"""Issue 19's cheaper crash safety, kept exact: a lone ``deploy apply`` writes its undo record before the patch
and its WAL names that record; undo records and WALs store positions gap-coded. Old records (plain int64
positions) and old WALs (holding the bytes) still revert and recover; every crash point of the new order
recovers to the prior bytes exactly."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save as st_save

import adapterhub.apply.deployments as dmod
import adapterhub.apply.disk as diskmod
from adapterhub.apply import deployments as dep
from adapterhub.apply.disk import DiskTransaction, WeightsFolder, decode_undo, encode_undo, read_wal, recover_wal
from adapterhub.apply.patching import UndoEntry
from adapterhub.bases.sources import tensor_shapes
from adapterhub.errors import DeploymentError
from adapterhub.format import SparseAdapter, SparseParam

TARGETS = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
           "encoder.layer.1.output.dense.weight"]


def _adapter(folder, seed: int, density: float = 0.3) -> SparseAdapter:
    shapes = tensor_shapes(folder)
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n in TARGETS:
        mask = torch.rand(shapes[n], generator=g) < density
        params[n] = SparseParam.from_mask(torch.randn(shapes[n], generator=g) * 0.05, mask)
    return SparseAdapter(params, {}, {"task": f"t{seed}"})


@pytest.fixture
def setup(ws, tiny_bert_dir):
    ws.add_base("tiny", str(tiny_bert_dir))
    refs = [ws.register(_adapter(tiny_bert_dir, i), name=f"ex{i}", task="t", base="tiny").ref for i in range(2)]
    dep.create(ws, "d", "tiny")
    return ws, dep.get(ws, "d").path, refs


def _sha(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _undo_files(path) -> set[str]:
    return {p.name for p in (path / ".adapterhub" / "undo").glob("*.safetensors")}


def _old_encode_undo(entries, meta) -> bytes:
    """The record format of earlier versions: plain int64 positions (``NNNNNN.idx``), via safetensors."""
    tensors, names = {}, []
    for i, e in enumerate(entries):
        tensors[f"{i:06d}.idx"] = e.indices.to(torch.int64).contiguous()
        tensors[f"{i:06d}.orig"] = e.original.contiguous()
        if e.chunks is not None and e.chunk_hashes is not None:
            tensors[f"{i:06d}.chunks"] = e.chunks.to(torch.int64).contiguous()
            tensors[f"{i:06d}.prehash"] = e.chunk_hashes.to(torch.uint8).contiguous()
        names.append(e.name)
    return st_save(tensors, metadata={"adapterhub.undo": json.dumps({**meta, "names": names}, sort_keys=True)})


class Crash(BaseException):
    pass


def _crash_at(monkeypatch, point: str) -> None:
    def boom(name: str) -> None:
        if name == point:
            raise Crash(name)

    monkeypatch.setattr(dmod, "fault_point", boom)
    monkeypatch.setattr(diskmod, "fault_point", boom)


# -- the record format -------------------------------------------------------------------------------------


def test_gap_coded_record_round_trips_with_escapes_and_is_small():
    idx = torch.tensor([70_000, 70_001, 70_002 + 65_535, 70_002 + 65_536 + 65_535, 1 << 40, (1 << 40) + 3])
    orig = torch.arange(6, dtype=torch.float32).to(torch.bfloat16)
    big = torch.arange(0, 3 * 100_000, 3)
    ents = [UndoEntry("a", idx, orig, torch.tensor([0, 5]), torch.arange(64, dtype=torch.uint8).reshape(2, 32)),
            UndoEntry("b", big, torch.randn(big.numel()), None, None),
            UndoEntry("empty", torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float16))]
    data = encode_undo(ents, {"ref": "x@1", "scale": 0.5})
    got, doc = decode_undo(data)
    assert doc == {"ref": "x@1", "scale": 0.5, "names": ["a", "b", "empty"]}
    for e, g in zip(ents, got, strict=True):
        assert g.name == e.name and torch.equal(g.indices, e.indices) and g.indices.dtype == torch.int64
        assert g.original.dtype == e.original.dtype and torch.equal(g.original.view(torch.uint8), e.original.view(torch.uint8))
    assert torch.equal(got[0].chunks, torch.tensor([0, 5])) and torch.equal(got[0].chunk_hashes, ents[0].chunk_hashes)
    assert got[1].chunks is None and got[1].chunk_hashes is None
    # 2 bytes a position (+ 4 for the fp32 value): the int64 positions of before took 8
    assert len(data) < 100_000 * (2 + 4) + 4096
    assert encode_undo(ents, {"ref": "x@1", "scale": 0.5}) == data  # deterministic: records are content-addressed


def test_record_bytes_are_pinned():
    """Undo records are content-addressed (a stack names its records by sha256): the same entries must encode to
    the same bytes in every version. Pinned to the bytes of the encoder before its tensors were written from
    numpy views (bf16 with .new, fp32, fp16 with .new, an empty entry, escapes and chunk hashes)."""
    idx = torch.tensor([70_000, 70_001, 70_002 + 65_535, 70_002 + 65_536 + 65_535, 1 << 40, (1 << 40) + 3])
    vals = torch.linspace(-2, 2, 6)
    ents = [UndoEntry("a", idx, vals.to(torch.bfloat16), torch.tensor([0, 5]),
                      torch.arange(64, dtype=torch.uint8).reshape(2, 32), (vals + 1).to(torch.bfloat16)),
            UndoEntry("b", torch.arange(0, 3000, 3), torch.linspace(0, 1, 1000)),
            UndoEntry("c", torch.tensor([1, 2]), torch.tensor([0.5, -0.25], dtype=torch.float16),
                      patched=torch.tensor([1.5, 0.75], dtype=torch.float16)),
            UndoEntry("empty", torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float16))]
    data = encode_undo(ents, {"ref": "x@1", "scale": 0.5})
    assert hashlib.sha256(data).hexdigest() == "464ccfe8c9043fc0ed4faa6c0af24534f1a1de9c0ab927fc01a815e4306831e3"


def test_old_format_record_still_decodes():
    ents = [UndoEntry("a", torch.tensor([3, 9, 1 << 33]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0]),
                      torch.zeros(1, 32, dtype=torch.uint8))]
    got, doc = decode_undo(_old_encode_undo(ents, {"ref": "r", "scale": 1.0}))
    assert doc["ref"] == "r" and torch.equal(got[0].indices, ents[0].indices)
    assert torch.equal(got[0].original, ents[0].original) and got[0].chunks is not None


@pytest.mark.parametrize("damage", ["escape-count", "small-escape", "orig-length", "gap-dtype"])
def test_damaged_gap_coding_is_refused(damage):
    from adapterhub.format import _container_header

    if damage == "escape-count":  # a zero gap with no escape value
        parts = {"000000.gap": ("U16", [2], [0, 0, 1, 0]), "000000.esc": ("I64", [0], []),
                 "000000.orig": ("F32", [2], [0] * 8)}
    elif damage == "small-escape":  # an escape value that should have been a plain gap
        parts = {"000000.gap": ("U16", [1], [0, 0]), "000000.esc": ("I64", [1], [5, 0, 0, 0, 0, 0, 0, 0]),
                 "000000.orig": ("F32", [1], [0] * 4)}
    elif damage == "orig-length":
        parts = {"000000.gap": ("U16", [2], [1, 0, 1, 0]), "000000.esc": ("I64", [0], []),
                 "000000.orig": ("F32", [1], [0] * 4)}
    else:
        parts = {"000000.gap": ("I16", [2], [1, 0, 1, 0]), "000000.esc": ("I64", [0], []),
                 "000000.orig": ("F32", [2], [0] * 8)}
    head, order, _ = _container_header({k: (dt, shape) for k, (dt, shape, _) in parts.items()},
                                       {"adapterhub.undo": json.dumps({"names": ["a"]})})
    data = head + b"".join(bytes(parts[k][2]) for k in order)
    with pytest.raises(DeploymentError, match="undo record is damaged"):
        decode_undo(data)


# -- deployments -------------------------------------------------------------------------------------------


def test_lone_apply_wal_names_its_undo_record(setup, monkeypatch):
    """Crash right after the WAL: it names the record (no second copy), the record holds the originals, and
    recovery puts the prior bytes back exactly, then removes the record no stack names."""
    ws, path, (a, _) = setup
    before = _sha(path)
    _crash_at(monkeypatch, "wal.written")
    with pytest.raises(Crash):
        dep.apply(ws, "d", a)
    monkeypatch.undo()
    wal = path / ".adapterhub" / "wal.safetensors"
    doc = read_wal(wal)
    assert doc is not None and set(_undo_files(path)) == {f"{doc['saved_in']}.safetensors"}
    assert wal.stat().st_size < 2048  # the bytes are in the record, not here
    rec = path / ".adapterhub" / "undo" / f"{doc['saved_in']}.safetensors"
    assert hashlib.sha256(rec.read_bytes()).hexdigest() == doc["saved_in"]
    assert dep.verify(ws, "d")["pending_recovery"]
    assert dep.recover(ws, "d")
    assert _sha(path) == before and dep.verify(ws, "d")["ok"]
    assert _undo_files(path) == set() and not wal.exists()
    info = dep.apply(ws, "d", a)  # the same record again, now named by the stack
    assert _undo_files(path) == {f"{info.stack[0]['undo']}.safetensors"} == {rec.name}


@pytest.mark.parametrize("point", ["undo.written", "wal.written", "deploy.apply.mid-patch",
                                   "deploy.apply.before-commit", "deploy.apply.after-commit"])
def test_each_crash_point_of_a_lone_apply_recovers_exactly(setup, monkeypatch, point):
    ws, path, (a, b) = setup
    dep.apply(ws, "d", a)
    before, root_before = _sha(path), dep.get(ws, "d").state_root
    _crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        dep.apply(ws, "d", b)
    monkeypatch.undo()
    dep.recover(ws, "d")
    kept = point.endswith("after-commit")
    info = dep.get(ws, "d")
    assert [x["ref"] for x in info.stack] == ([a, b] if kept else [a])
    if not kept:
        assert _sha(path) == before and info.state_root == root_before
    assert dep.verify(ws, "d")["ok"]
    dep.revert(ws, "d")  # the orphan record of an interrupted apply is gone after the next operation
    assert _undo_files(path) == ({f"{dep.get(ws, 'd').stack[0]['undo']}.safetensors"} if kept else set())
    if kept:
        dep.revert(ws, "d")
    assert dep.get(ws, "d").stack == [] and dep.verify(ws, "d")["ok"]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "symlink"])
def test_wal_whose_record_is_missing_or_corrupt_is_refused_nothing_changed(setup, monkeypatch, tmp_path, damage):
    ws, path, (a, _) = setup
    _crash_at(monkeypatch, "deploy.apply.mid-patch")
    with pytest.raises(Crash):
        dep.apply(ws, "d", a)
    monkeypatch.undo()
    rec = path / ".adapterhub" / "undo" / f"{read_wal(path / '.adapterhub' / 'wal.safetensors')['saved_in']}.safetensors"
    if damage == "missing":
        rec.unlink()
    elif damage == "corrupt":
        raw = bytearray(rec.read_bytes())
        raw[-1] ^= 1
        rec.write_bytes(bytes(raw))
    else:
        elsewhere = tmp_path / "elsewhere.safetensors"
        elsewhere.write_bytes(rec.read_bytes())
        rec.unlink()
        rec.symlink_to(elsewhere)
    mid = _sha(path)
    with pytest.raises(DeploymentError, match="write-ahead log's undo record") as e:
        dep.recover(ws, "d")
    assert "\n" not in str(e.value)
    assert _sha(path) == mid and (path / ".adapterhub" / "wal.safetensors").exists()


def test_ordinary_error_after_early_record_removes_it(setup, monkeypatch):
    ws, path, (a, _) = setup
    before = _sha(path)

    def fail(*args, **kw):
        raise OSError("disk on fire")

    monkeypatch.setattr(DiskTransaction, "commit", fail)
    with pytest.raises(OSError):
        dep.apply(ws, "d", a)
    monkeypatch.undo()
    assert _sha(path) == before and _undo_files(path) == set()
    assert not (path / ".adapterhub" / "wal.safetensors").exists() and dep.verify(ws, "d")["ok"]


def test_layer_with_old_format_record_still_reverts_exactly(setup, monkeypatch):
    """A deployment whose layer was applied by an earlier version (int64 positions in its record) reverts bit
    for bit; so does a layer below one applied now."""
    ws, path, (a, b) = setup
    before = _sha(path)
    monkeypatch.setattr(dmod, "encode_undo", _old_encode_undo)
    info = dep.apply(ws, "d", a)
    monkeypatch.undo()
    data = (path / ".adapterhub" / "undo" / f"{info.stack[0]['undo']}.safetensors").read_bytes()
    assert b"000000.idx" in data and b"000000.gap" not in data
    mid = _sha(path)
    dep.apply(ws, "d", b)
    dep.revert(ws, "d", a)  # reverts a (old record) below b, re-applies b
    dep.revert(ws, "d")
    assert _sha(path) == before and dep.get(ws, "d").stack == [] and dep.verify(ws, "d")["ok"]
    dep.apply(ws, "d", a)
    assert _sha(path) == mid


def test_old_format_wal_still_recovers(tmp_path):
    """A WAL written by an earlier version (the saved bytes in it, int64 positions) is recovered exactly."""
    from safetensors.torch import save_file

    w = torch.randn(1000)
    save_file({"w": w}, tmp_path / "model.safetensors")
    original = (tmp_path / "model.safetensors").read_bytes()
    idx = torch.tensor([1, 7, 999])
    wal = tmp_path / "wal.safetensors"
    wal.write_bytes(_old_encode_undo([UndoEntry("w", idx, w[idx].clone())], {"op_id": "x", "action": "apply"}))
    with WeightsFolder(tmp_path) as weights:
        weights.flat("w")[idx] = 5.0
        weights.sync()
        assert (tmp_path / "model.safetensors").read_bytes() != original
        assert recover_wal(weights, wal)
    assert (tmp_path / "model.safetensors").read_bytes() == original and not wal.exists()


def test_wal_with_out_of_range_positions_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(10)}, tmp_path / "model.safetensors")
    wal = tmp_path / "wal.safetensors"
    wal.write_bytes(encode_undo([UndoEntry("w", torch.tensor([3, 10]), torch.zeros(2))], {"op_id": "x"}))
    with WeightsFolder(tmp_path) as weights, pytest.raises(DeploymentError, match="outside the tensor"):
        recover_wal(weights, wal)
    assert wal.exists()


def test_root_is_exact_when_finish_takes_back_the_background_hashing(setup, monkeypatch):
    """The background hasher is slow here, so finish cancels the tensors it has not started and hashes them
    itself: the derived root still equals a full measurement of the bytes."""
    import time

    from adapterhub.apply.state import DEFAULT_SCHEME, measure_folder

    ws, path, (a, b) = setup
    base_root = dep.get(ws, "d").state_root
    slow = dmod._ChunkBook.hash_written
    calls: list[str] = []

    def hash_written(self, name, idx):
        calls.append(name)
        time.sleep(1.0)
        return slow(self, name, idx)

    monkeypatch.setattr(dmod._ChunkBook, "hash_written", hash_written)
    info = dep.apply(ws, "d", a)
    assert 0 < len(calls) < len(TARGETS)  # some were taken back
    assert info.state_root == measure_folder(path, scheme=DEFAULT_SCHEME)[0].root()
    monkeypatch.undo()
    assert dep.apply(ws, "d", b).state_root == measure_folder(path, scheme=DEFAULT_SCHEME)[0].root()
    dep.revert(ws, "d")
    dep.revert(ws, "d")
    assert dep.get(ws, "d").state_root == measure_folder(path, scheme=DEFAULT_SCHEME)[0].root() == base_root


def test_a_read_only_view_of_weights_warns_nothing(tmp_path):
    """Reading weights through a read-only map (verify, diff, the benchmarks) must not print torch's
    "non-writable NumPy array" warning (torch warns once per process, so this runs in a fresh one)."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    save_file({"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}, str(tmp_path / "m.safetensors"))
    code = ("import sys; from adapterhub.apply.disk import SafetensorsFile\n"
            f"with SafetensorsFile({str(tmp_path / 'm.safetensors')!r}, writable=False) as f:\n"
            "    assert f.flat('w').tolist() == list(map(float, range(16)))\n")
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr[-2000:]


# -- a lone revert's WAL names the layer's record (its patched values) ---------------------------------------

def test_record_keeps_the_patched_values(setup):
    """Every new undo record holds, beside the originals, the values its apply wrote: the bytes on disk."""
    ws, path, (a, _) = setup
    info = dep.apply(ws, "d", a)
    rec = path / ".adapterhub" / "undo" / f"{info.stack[0]['undo']}.safetensors"
    ents, _ = decode_undo(rec.read_bytes())
    assert ents and all(e.patched is not None for e in ents)
    with WeightsFolder(path, writable=False) as w:
        for e in ents:
            got = w.flat(e.name)[e.indices]
            assert got.view(torch.int16 if got.element_size() == 2 else torch.int32).tolist() == \
                e.patched.view(torch.int16 if got.element_size() == 2 else torch.int32).tolist()


@pytest.mark.parametrize("point", ["wal.written", "deploy.revert.mid-patch", "deploy.revert.before-commit",
                                   "deploy.revert.after-commit"])
def test_each_crash_point_of_a_lone_revert_recovers_exactly(setup, monkeypatch, point):
    """The lone revert's WAL is a pointer to the record of the layer it takes off (``saved: patched``), no copy
    of the bytes; a crash anywhere recovers to the applied bytes (before the commit) or keeps the revert."""
    ws, path, (a, _) = setup
    before = _sha(path)
    info = dep.apply(ws, "d", a)
    mid, root_mid = _sha(path), info.state_root
    _crash_at(monkeypatch, point)
    with pytest.raises(Crash):
        dep.revert(ws, "d")
    monkeypatch.undo()
    wal = path / ".adapterhub" / "wal.safetensors"
    doc = read_wal(wal)
    assert doc is not None and doc["saved_in"] == info.stack[0]["undo"] and doc["saved"] == "patched"
    assert wal.stat().st_size < 2048
    assert dep.recover(ws, "d")
    kept = point.endswith("after-commit")
    now = dep.get(ws, "d")
    assert [x["ref"] for x in now.stack] == ([] if kept else [a])
    assert _sha(path) == (before if kept else mid) and dep.verify(ws, "d")["ok"]
    if not kept:
        assert now.state_root == root_mid
        dep.revert(ws, "d")
    assert _sha(path) == before and _undo_files(path) == set() and dep.verify(ws, "d")["ok"]


def test_lone_revert_of_a_record_without_patched_values_gathers_them(setup, monkeypatch):
    """A layer applied by an earlier version (its record holds no patched values): the revert's WAL holds the
    bytes it gathered, as before, and a crash still recovers exactly."""
    ws, path, (a, _) = setup
    before = _sha(path)
    monkeypatch.setattr(dmod, "encode_undo", _old_encode_undo)
    dep.apply(ws, "d", a)
    monkeypatch.undo()
    mid = _sha(path)
    _crash_at(monkeypatch, "deploy.revert.mid-patch")
    with pytest.raises(Crash):
        dep.revert(ws, "d")
    monkeypatch.undo()
    doc = read_wal(path / ".adapterhub" / "wal.safetensors")
    assert doc is not None and "saved_in" not in doc
    assert dep.recover(ws, "d") and _sha(path) == mid
    dep.revert(ws, "d")
    assert _sha(path) == before and dep.verify(ws, "d")["ok"]


@pytest.mark.parametrize("kind", ["patched", "other"])
def test_wal_asking_for_values_its_record_lacks_is_refused(setup, monkeypatch, kind):
    """A WAL that names a record for patched values it does not hold (or an unknown kind of saved values) is
    refused in one line; nothing is written."""
    ws, path, (a, _) = setup
    monkeypatch.setattr(dmod, "encode_undo", _old_encode_undo)
    info = dep.apply(ws, "d", a)
    monkeypatch.undo()
    wal = path / ".adapterhub" / "wal.safetensors"
    wal.write_bytes(encode_undo([], {"op_id": "x" * 32, "action": "revert", "saved_in": info.stack[0]["undo"],
                                     "saved": kind}))
    mid = _sha(path)
    with pytest.raises(DeploymentError, match="no patched values" if kind == "patched" else "unknown kind") as e:
        dep.recover(ws, "d")
    assert "\n" not in str(e.value) and _sha(path) == mid and wal.exists()


@pytest.mark.parametrize("scheme_name", ["sha256", "blake3"])
def test_hash_chunk_sets_equals_hash_chunks_per_tensor(scheme_name):
    """One pool over several tensors gives each tensor's chunk digests, in order, as hashing them one by one."""
    import os

    from blake3 import blake3

    from adapterhub.apply.state import CHUNK, SCHEMES, hash_chunk_sets, hash_chunks

    scheme = SCHEMES[scheme_name]
    H = hashlib.sha256 if scheme_name == "sha256" else blake3  # the reference: the library itself

    buf = bytearray(os.urandom(5 * CHUNK + 1234))
    jobs = [(buf, 0, 3 * CHUNK + 7, None), (buf, 3 * CHUNK + 7, len(buf), {1, 0}), (buf, 10, 10, None),
            (buf, 100, 100 + 40 * 1024 * 1024 // 1024, [0])]
    def ref(b, s, e, c):  # chunks counted from the tensor's first byte, the last one short
        ids = sorted(set(c)) if c is not None else list(range(-(-(e - s) // CHUNK)))
        return ids, [H(bytes(b[s + i * CHUNK:min(s + (i + 1) * CHUNK, e)])).digest() for i in ids]

    want = [ref(*j) for j in jobs]
    assert [hash_chunks(*j, scheme=scheme, threads=False) for j in jobs] == want
    for threads in (False, True):
        got = hash_chunk_sets(jobs, scheme=scheme, threads=threads)
        assert got == want
    ids, digests = want[1]
    assert ids == [0, 1] and digests[0] == H(buf[3 * CHUNK + 7:4 * CHUNK + 7]).digest()
    many = [(buf, 0, len(buf), None)] * 3  # more tasks than workers
    assert hash_chunk_sets(many, scheme=scheme) == [ref(buf, 0, len(buf), None)] * 3

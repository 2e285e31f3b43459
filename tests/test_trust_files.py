"""Trust boundaries of files (issue 12: items 5, 7, the strict safetensors reader, disk full).

* a corrupt blob is healed by putting the good bytes again (register / register_many, as pull does);
* an adapter's own card cannot switch off the NaN/inf check, only ``register --allow-nonfinite`` can;
* applying never writes NaN/inf into weights (huge ``--scale``, bf16/fp16 overflow), in memory or on disk:
  refused with one line, nothing changed;
* one strict safetensors header reader (:mod:`adapterhub.st_io`): malformed base folders give one-line
  errors; hypothesis fuzzing shows only ``HeaderError`` ever comes out;
* ``ENOSPC`` while writing a blob is one line and leaves no temp file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from adapterhub import format as fmt, st_io
from adapterhub.apply import deployments as dep
from adapterhub.apply.patching import NonFiniteWeightsError, apply_adapter, state_fingerprint
from adapterhub.errors import AdapterHubError, DeploymentError, FormatError, HeaderError, StoreError
from adapterhub.format import SparseAdapter, SparseParam
from catalog_util import home_snapshot, make_adapter
from trust_util import assert_one_line_failure, diff_snapshots, run_cli, tree_snapshot

pytestmark = pytest.mark.timeout(300)

Q = "encoder.layer.0.attention.self.query.weight"
V = "encoder.layer.0.attention.self.value.weight"


def _blob_sha(ws, digest: str) -> str:
    return fmt.sha256_hex(ws.store.path(digest).read_bytes())


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- item 5: a corrupt blob is healed by the good bytes ---------------------------------------------


def test_corrupt_blob_is_healed_by_registering_the_good_bytes(ws, tiny_bert_dir):
    ws.add_base("tiny", str(tiny_bert_dir))
    a = make_adapter(seed=1)
    v1 = ws.register(a, name="a", task="t", base="tiny")
    blob = ws.store.path(v1.content_hash)
    _corrupt(blob)
    assert _blob_sha(ws, v1.content_hash) != v1.content_hash
    with pytest.raises(StoreError, match="corrupt"):
        ws.load_adapter(v1)
    # the same content again, under the same name and under a new one
    again = ws.register(a, name="a", task="t", base="tiny")
    assert again.content_hash == v1.content_hash and not again.created
    assert _blob_sha(ws, v1.content_hash) == v1.content_hash  # healed, atomically replaced
    v2 = ws.register(a, name="b", task="t", base="tiny")
    assert v2.content_hash == v1.content_hash
    assert ws.load_adapter("a").nnz == a.nnz and ws.load_adapter(v2).nnz == a.nnz
    assert ws.verify()["problems"] == []
    assert not list(blob.parent.glob(".*.tmp"))


def test_corrupt_blob_is_healed_by_register_many_the_pull_path(ws, tiny_bert_dir):
    """``pull`` writes through ``register_many``: the good downloaded bytes heal a corrupt local blob."""
    from adapterhub.catalog.records import NewVersion

    ws.add_base("tiny", str(tiny_bert_dir))
    a = make_adapter(seed=2)
    v1 = ws.register(a, name="p", task="t", base="tiny")
    _corrupt(ws.store.path(v1.content_hash))
    data = ws.store.path(v1.content_hash).read_bytes()
    assert fmt.sha256_hex(data) != v1.content_hash
    good = fmt.save(fmt.SparseAdapter(a.params, a.extras, v1.card))
    [got] = ws.register_many([NewVersion(good, name="p2", task="t", base="tiny", expect_hash=v1.content_hash)])
    assert got.content_hash == v1.content_hash
    assert _blob_sha(ws, v1.content_hash) == v1.content_hash
    assert ws.load_adapter(v1).nnz == a.nnz


def test_intact_blob_is_not_rewritten(tmp_path):
    from adapterhub.store import BlobStore

    s = BlobStore(tmp_path / "blobs")
    d = s.put_bytes(b"hello")
    ino = s.path(d).stat().st_ino
    assert s.put_bytes(b"hello") == d and s.path(d).stat().st_ino == ino  # no needless rewrite


# -- disk full ---------------------------------------------------------------------------------------


def test_enospc_while_writing_a_blob_is_one_line_and_leaves_no_temp_file(home, ws, tiny_bert_dir, tmp_path,
                                                                      monkeypatch):
    from adapterhub import fsutil
    from adapterhub.cli.main import cli

    ws.add_base("tiny", str(tiny_bert_dir))
    ws.register(make_adapter(seed=30), name="other", task="t", base="tiny")  # a store already in use
    f = tmp_path / "x.safetensors"
    fmt.save_file(make_adapter(seed=3), f)
    before = home_snapshot(home)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(StoreError, match="no space left on device"):
        ws.register(make_adapter(seed=3), name="x", task="t", base="tiny")
    r = CliRunner().invoke(cli, ["--home", str(home), "register", str(f), "--name", "x", "--task", "t",
                                 "--base", "tiny"])
    monkeypatch.undo()
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no space left on device" in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert home_snapshot(home) == before  # no blob, no temp file, no row
    assert not [p for p in (home / "blobs").rglob("*") if p.name.endswith(".tmp")]


# -- item 7: non-finite values -------------------------------------------------------------------------


def _inf_adapter() -> SparseAdapter:
    p = SparseParam((32, 32), torch.tensor([1, 5, 9]), torch.tensor([0.5, float("inf"), -1.0]))
    return SparseAdapter({Q: p}, {}, {"allow_nonfinite": True, "mask": {"method": "random"}})


def test_card_cannot_switch_off_the_nonfinite_check(home, ws, tiny_bert_dir, tmp_path):
    ws.add_base("tiny", str(tiny_bert_dir))
    a = _inf_adapter()
    data = fmt.save(a, allow_nonfinite=True)  # only the caller's flag lets it be written
    with pytest.raises(FormatError, match="NaN or infinity"):
        fmt.save(a)  # the card's allow_nonfinite: true is ignored
    with pytest.raises(FormatError, match="NaN or infinity"):
        fmt.load(data)
    assert fmt.load(data, allow_nonfinite=True).params[Q].values[1] == float("inf")
    with pytest.raises(FormatError, match="NaN or infinity"):
        ws.register(data, name="bad", task="t", base="tiny")
    f = tmp_path / "inf.safetensors"
    f.write_bytes(data)
    before = home_snapshot(home)
    r = run_cli(home, "register", str(f), "--name", "bad", "--task", "t", "--base", "tiny")
    assert_one_line_failure(r, contains="NaN or infinity")
    assert home_snapshot(home) == before
    # the user's explicit flag accepts it, and the version reads back from the store
    from adapterhub.cli.main import cli

    r = CliRunner().invoke(cli, ["--home", str(home), "register", str(f), "--name", "bad", "--task", "t",
                                 "--base", "tiny", "--allow-nonfinite"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "bad@1"
    back = ws.load_adapter("bad@1")
    assert not bool(torch.isfinite(back.params[Q].values).all())
    # ... but it can never reach served weights
    d = dep.create(ws, "d", "tiny")
    lock = d.path / ".adapterhub" / "lock"  # the deployment's flock file, created on first use
    snap = tree_snapshot(d.path, skip=(lock,))
    with pytest.raises(NonFiniteWeightsError, match=Q):
        dep.apply(ws, "d", "bad@1")
    assert diff_snapshots(snap, tree_snapshot(d.path, skip=(lock,))) == []


def test_deploy_apply_huge_scale_is_refused_and_changes_nothing(home, ws, tiny_bert_dir):
    ws.add_base("tiny", str(tiny_bert_dir))
    v = ws.register(make_adapter(seed=4), name="e", task="t", base="tiny")
    d = dep.create(ws, "d", "tiny")
    dep.apply(ws, "d", v.ref, 0.5)  # a real stack underneath
    db = home / "catalog.db"  # rows are compared by home_snapshot (a WAL checkpoint may rewrite the file's pages)
    snap, rows = tree_snapshot(home, skip=(db,)), home_snapshot(home)
    n_events = len(dep.history(ws, "d"))
    r = run_cli(home, "deploy", "apply", "d", v.ref, "--scale", "1e300")
    assert_one_line_failure(r, contains="non-finite")
    assert diff_snapshots(snap, tree_snapshot(home, skip=(db,))) == []  # deployment folder byte-identical, no WAL
    assert home_snapshot(home) == rows and len(dep.history(ws, "d")) == n_events
    assert dep.verify(ws, "d")["ok"]
    # non-finite scales are refused at the CLI and in the library
    from adapterhub.cli.main import cli

    for bad in ("inf", "nan", "-inf"):
        r = CliRunner().invoke(cli, ["--home", str(home), "deploy", "apply", "d", v.ref, "--scale", bad])
        assert r.exit_code != 0 and "finite" in r.output, r.output
    with pytest.raises(DeploymentError, match="finite"):
        dep.apply(ws, "d", v.ref, float("inf"))
    assert diff_snapshots(snap, tree_snapshot(home, skip=(db,))) == []
    assert d.path.is_dir()


def _fp16_base(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)
    sd = load_file(src / "model.safetensors")
    sd = {k: (t.to(torch.float16) if t.is_floating_point() else t) for k, t in sd.items()}
    sd[Q] = torch.zeros_like(sd[Q])
    save_file(sd, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _one_value(v: float) -> SparseAdapter:
    return SparseAdapter({Q: SparseParam((32, 32), torch.tensor([7]), torch.tensor([v]))}, {}, {})


def test_on_disk_overflow_checks_the_replayed_stack(ws, tiny_bert_dir, tmp_path):
    """fp16 weights: the check replays restores then re-applies exactly (no false refusal, no miss)."""
    base = _fp16_base(tiny_bert_dir, tmp_path / "fp16")
    ws.add_base("h", str(base))
    a = ws.register(_one_value(30000.0), name="a", task="t", base="h")
    b = ws.register(_one_value(30000.0), name="b", task="t", base="h")
    big = ws.register(_one_value(70000.0), name="big", task="t", base="h")
    neg = ws.register(_one_value(-30000.0), name="neg", task="t", base="h")
    d = dep.create(ws, "d", "h")
    w = d.path / "model.safetensors"
    dep.apply(ws, "d", a.ref)
    dep.apply(ws, "d", b.ref)  # 60000: fine in fp16
    snap = w.read_bytes()
    with pytest.raises(NonFiniteWeightsError, match="float16"):
        dep.apply(ws, "d", a.ref)  # 90000 overflows fp16
    assert w.read_bytes() == snap
    dep.revert(ws, "d", a.ref)  # restores b, a, re-applies b on 0: 30000, not 90000 (no false refusal)
    assert float(load_file(w)[Q].view(-1)[7]) == 30000.0
    dep.revert(ws, "d", b.ref)
    dep.apply(ws, "d", neg.ref)
    dep.apply(ws, "d", big.ref)  # -30000 + 70000 = 40000: fine
    snap = w.read_bytes()
    with pytest.raises(NonFiniteWeightsError, match="big@1"):
        dep.revert(ws, "d", neg.ref)  # would re-apply big on 0: 70000 overflows fp16
    assert w.read_bytes() == snap and [layer["ref"] for layer in dep.get(ws, "d").stack] == ["neg@1", "big@1"]


@pytest.mark.parametrize("dtype,big", [(torch.bfloat16, 3.0e38), (torch.float16, 60000.0)])
def test_in_memory_overflow_is_refused_and_model_unchanged(dtype, big):
    sd = {"a.weight": torch.randn(4, 4).to(dtype), "b.weight": torch.full((4, 4), big).to(dtype)}
    before = state_fingerprint(sd)
    ad = SparseAdapter({"a.weight": SparseParam((4, 4), torch.tensor([0, 3]), torch.tensor([1.0, 2.0])),
                        "b.weight": SparseParam((4, 4), torch.tensor([2, 5]), torch.tensor([1.0, big]))}, {}, {})
    with pytest.raises(NonFiniteWeightsError, match="b.weight") as ei:
        apply_adapter(sd, ad)
    assert len(str(ei.value).splitlines()) == 1
    assert state_fingerprint(sd) == before  # a.weight, patched first, went back bit for bit
    with pytest.raises(NonFiniteWeightsError, match="finite"):
        apply_adapter(sd, ad, float("nan"))
    with pytest.raises(NonFiniteWeightsError, match="a.weight"):
        apply_adapter(sd, ad, 1e300)
    assert state_fingerprint(sd) == before
    rec = apply_adapter(sd, ad, 1e-6)  # a sane scale still works
    assert rec.nnz == 4


# -- the strict safetensors reader --------------------------------------------------------------------


def _raw(header_bytes: bytes, body: bytes = b"", hlen: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_bytes) if hlen is None else hlen) + header_bytes + body


def _hdr(obj) -> bytes:
    return json.dumps(obj).encode()


MALFORMED_BASES = {
    "list-header": (_raw(b"[1,2]"), "not a JSON object"),
    "missing-dtype": (_raw(_hdr({"w": {"shape": [2], "data_offsets": [0, 8]}}), b"\0" * 8), "dtype"),
    "missing-offsets": (_raw(_hdr({"w": {"dtype": "F32", "shape": [2]}}), b"\0" * 8), "offsets"),
    "shape-not-list": (_raw(_hdr({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}), b"\0" * 8), "shape"),
    "offsets-beyond-file": (_raw(_hdr({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}), b"\0" * 8),
                            "outside the file"),
    "huge-header-length": (_raw(b"{}", b"", hlen=2**62), "header declares"),
    "entry-not-object": (_raw(_hdr({"w": [1, 2]}), b""), "bad tensor entry"),
    "metadata-not-strings": (_raw(_hdr({"__metadata__": {"a": 1}}), b""), "__metadata__"),
    "duplicate-key": (_raw(b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                           b'"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0"), "twice"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_BASES))
def test_malformed_base_headers_give_one_line_errors(case, tmp_path):
    data, needle = MALFORMED_BASES[case]
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(data)
    home = tmp_path / "h"
    with pytest.raises(HeaderError, match=needle):
        st_io.read_header(folder / "model.safetensors")
    r = run_cli(home, "base", "add", "evil", str(folder))
    assert_one_line_failure(r, contains=needle)
    assert "model.safetensors" in r.stderr  # names the file
    from adapterhub.workspace import Workspace

    w = Workspace.open(home)
    try:
        assert w.list_bases() == []  # nothing recorded
    finally:
        w.close()


def test_real_files_parse_and_match_the_safetensors_library(tiny_bert_dir, tiny_llama_dir):
    from safetensors import safe_open

    for folder in (tiny_bert_dir, tiny_llama_dir):
        f = folder / "model.safetensors"
        h = st_io.read_header(f)
        assert h == st_io.parse_header(f.read_bytes())
        with safe_open(str(f), "pt") as sf:
            assert set(sf.keys()) == set(h.entries)
            for k in list(h.entries)[:5]:
                t = sf.get_tensor(k)
                assert tuple(t.shape) == h.entries[k].shape and st_io.torch_dtype(h.entries[k].dtype) == t.dtype


def test_dtype_table_and_reader_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, adapterhub.st_io as s; assert s.DTYPE_SIZES['BF16'] == 2; "
            "import adapterhub.bases.sources; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def _good_file() -> bytes:
    return fmt.save(make_adapter(density=0.05, seed=9))


GOOD = _good_file()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                     max_leaves=20)
_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(sorted(st_io.DTYPE_SIZES) + ["F31", "", "f32"]) | _json,
    "shape": st.lists(st.integers(-2, 2**50), max_size=9) | _json,
    "data_offsets": st.lists(st.integers(-8, 2**64), min_size=0, max_size=3) | _json,
})
_header = st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), _entry | _json, max_size=5)


def _only_header_errors(data: bytes) -> None:
    try:
        h = st_io.parse_header(data, "f.safetensors")
    except HeaderError as e:
        assert str(e).isprintable() and len(str(e)) < 2000, repr(str(e))  # one clean line
        return
    # anything accepted is self-consistent: tensors tile the data region exactly
    pos = 0
    for e in sorted(h.entries.values(), key=lambda e: (e.begin, e.end)):
        assert e.begin == pos and e.nbytes == e.numel * st_io.DTYPE_SIZES[e.dtype]
        pos = e.end
    assert h.data_start + pos == len(data)


@FUZZ
@given(_header, st.binary(max_size=64), st.integers(-4, 4))
def test_fuzz_random_headers_raise_only_header_error(header, body, skew):
    raw = json.dumps(header).encode()
    _only_header_errors(_raw(raw, body, hlen=max(0, len(raw) + skew)))
    _only_header_errors(_raw(raw, body))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_mutated_files_raise_only_header_error(edits):
    buf = bytearray(GOOD)
    for pos, byte in edits:
        buf[pos] = byte
    _only_header_errors(bytes(buf))


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_raise_only_header_error(data):
    _only_header_errors(data)
    _only_header_errors(struct.pack("<Q", len(data)) + data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=256), st.integers(0, 2**64 - 1))
def test_fuzz_read_header_from_files(tmp_path, data, hlen):
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", hlen) + data)
    try:
        st_io.read_header(p)
    except HeaderError as e:
        assert "f.safetensors" in str(e)


def test_adapter_loader_errors_are_header_errors_naming_the_file(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(_raw(b"[1,2]"))
    with pytest.raises(HeaderError, match="bad.safetensors: bad safetensors header: not a JSON object"):
        fmt.load_file(f)
    assert issubclass(HeaderError, FormatError) and issubclass(HeaderError, AdapterHubError)
    assert os.path.exists(f)

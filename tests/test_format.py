"""The adapterhub.sparse/1 file format: round trips, determinism, index coding, and every malformed file.

Malformed files go through the real CLI ``register``: one-line error naming the tensor, exit 1, and the
catalog and store unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from adapterhub import format as fmt
from adapterhub.errors import FormatError
from catalog_util import home_snapshot, make_adapter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def assert_same(a: fmt.SparseAdapter, b: fmt.SparseAdapter) -> None:
    assert sorted(a.params) == sorted(b.params)
    for k in a.params:
        pa, pb = a.params[k], b.params[k]
        assert pa.shape == pb.shape and pa.block_size == pb.block_size, k
        assert torch.equal(pa.indices, pb.indices), k
        assert pa.values.dtype == pb.values.dtype and torch.equal(_bits(pa.values), _bits(pb.values)), k
    assert sorted(a.extras) == sorted(b.extras)
    for k in a.extras:
        assert a.extras[k].dtype == b.extras[k].dtype and torch.equal(a.extras[k], b.extras[k])
    assert a.card == b.card


@st.composite
def adapters(draw) -> fmt.SparseAdapter:
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    params = {}
    for i in range(n):
        block = draw(st.sampled_from([None, None, 2, 4]))
        if block is None:
            shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
        else:
            shape = (draw(st.integers(1, 8)) * block, draw(st.integers(1, 8)) * block)
        density = draw(st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.5, 1.0]))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        numel = math.prod(shape)
        if block is None:
            k = min(numel, max(0 if density == 0 else 1, int(density * numel)))
            idx = torch.randperm(numel, generator=g)[:k].sort().values
            vals = torch.randn(k, generator=g).to(dtype)
            params[f"layer{i}.weight"] = fmt.SparseParam(shape, idx, vals)
        else:
            nb = (shape[0] // block) * (shape[1] // block)
            k = min(nb, max(0 if density == 0 else 1, int(density * nb)))
            idx = torch.randperm(nb, generator=g)[:k].sort().values
            vals = torch.randn(k, block, block, generator=g).to(dtype)
            params[f"layer{i}.weight"] = fmt.SparseParam(shape, idx, vals, block_size=block)
    extras = {}
    if draw(st.booleans()):
        extras["heads.t.weight"] = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    card = {"task": draw(st.sampled_from(["a", "b", "ünïcode"])), "mask": {"density": 0.1}}
    return fmt.SparseAdapter(params, extras, card)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_round_trip(adapter):
    data = fmt.save(adapter)
    back = fmt.load(data)
    assert_same(adapter, back)
    assert fmt.save(back) == data  # same adapter -> same bytes
    for k, p in adapter.params.items():
        ia, va = p.flat()
        ib, vb = back.params[k].flat()
        assert torch.equal(ia, ib) and torch.equal(_bits(va), _bits(vb))


@settings(max_examples=25, deadline=None)
@given(adapters())
def test_bytes_and_hash_deterministic_and_key_order_independent(adapter):
    d1, d2 = fmt.save(adapter), fmt.save(adapter)
    assert d1 == d2 and fmt.sha256_hex(d1) == fmt.sha256_hex(d2)
    rev = fmt.SparseAdapter(dict(reversed(list(adapter.params.items()))), dict(reversed(list(adapter.extras.items()))),
                            json.loads(json.dumps(adapter.card)))
    assert fmt.save(rev) == d1


@settings(max_examples=25, deadline=None)
@given(adapters())
def test_readable_by_safetensors(adapter):
    from safetensors.torch import load

    data = fmt.save(adapter)
    tensors = load(data)
    for name, p in adapter.params.items():
        gaps = tensors[f"param::{name}::idx"]
        esc = tensors.get(f"param::{name}::esc", torch.zeros(0, dtype=torch.int64))
        assert torch.equal(fmt.decode_indices(gaps, esc, name), p.indices)
        assert torch.equal(_bits(tensors[f"param::{name}::val"]), _bits(p.values))
    for name, t in adapter.extras.items():
        assert torch.equal(tensors[f"extra::{name}"], t)


def test_metadata_holds_the_card(tmp_path):
    from safetensors import safe_open

    ad = make_adapter(card={"task": "x", "mask": {"method": "random"}})
    fmt.save_file(ad, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        doc = json.loads(f.metadata()[fmt.METADATA_KEY])
    assert doc["format"] == fmt.FORMAT_ID and doc["card"]["task"] == "x"
    assert doc["params"]["encoder.layer.0.attention.self.query.weight"]["layout"] == "element"
    assert fmt.read_card(fmt.save(ad))["card"] == ad.card


def test_pinned_bytes():
    """A tiny adapter's bytes are pinned: any change to the canonical encoding shows up here."""
    ad = fmt.SparseAdapter({"w": fmt.SparseParam((2, 3), torch.tensor([1, 4]), torch.tensor([0.5, -1.0]))}, {},
                           {"task": "t"})
    data = fmt.save(ad)
    # the header, written out by hand: keys sorted, card and layout in one JSON string, padded with
    # spaces to a multiple of 8 (the safetensors alignment rule)
    header = (b'{"__metadata__":{"adapterhub":"{\\"card\\":{\\"task\\":\\"t\\"},\\"extras\\":[],'
              b'\\"format\\":\\"adapterhub.sparse/1\\",\\"params\\":{\\"w\\":{\\"block_size\\":null,'
              b'\\"count\\":2,\\"dtype\\":\\"fp32\\",\\"layout\\":\\"element\\",\\"nnz\\":2,'
              b'\\"shape\\":[2,3]}}}"},'
              b'"param::w::idx":{"data_offsets":[8,12],"dtype":"U16","shape":[2]},'
              b'"param::w::val":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}}')
    header += b" " * (-len(header) % 8)
    (hlen,) = struct.unpack("<Q", data[:8])
    assert hlen == len(header) == 368
    assert data[8:8 + hlen] == header
    # data region: the values as little-endian fp32, then the index gaps from -1 (1+1, then 4-1) as uint16
    assert data[8 + hlen:] == struct.pack("<2f", 0.5, -1.0) + struct.pack("<2H", 2, 3)
    # the whole file, pinned (hashlib over fmt.save's bytes, computed once when the encoding was fixed)
    assert len(data) == 388
    assert hashlib.sha256(data).hexdigest() == "b1670a33cf085c8d6cc6c4433e39f43b50257ae9511d8b7df325c620933db420"
    assert fmt.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert fmt.save(fmt.load(data)) == data


def test_index_coding_is_two_bytes_per_nonzero_and_escapes_large_gaps():
    g = torch.Generator().manual_seed(0)
    for density in (0.001, 0.01, 0.1, 0.5):
        numel = 3072 * 9216
        k = int(density * numel)
        idx = torch.randperm(numel, generator=g)[:k].sort().values
        gaps, esc = fmt.encode_indices(idx)
        assert gaps.dtype == torch.uint16 and esc.numel() == 0
        assert (gaps.numel() * 2 + esc.numel() * 8) / k == 2.0
        assert torch.equal(fmt.decode_indices(gaps, esc, "x"), idx)
    idx = torch.tensor([0, 70000, 70001, 70001 + 2**20, 2**33])
    gaps, esc = fmt.encode_indices(idx)
    assert esc.tolist() == [70000, 2**20, 2**33 - 70001 - 2**20]
    assert torch.equal(fmt.decode_indices(gaps, esc, "x"), idx)
    ad = fmt.SparseAdapter({"big": fmt.SparseParam((2**17, 2**17), idx, torch.ones(5))})
    assert torch.equal(fmt.load(fmt.save(ad)).params["big"].indices, idx)


def test_block_layout_flat_matches_dense():
    ad = make_adapter({"w": (8, 12)}, block=4, density=0.5, seed=3)
    p = ad.params["w"]
    dense = p.to_dense()
    idx, vals = p.flat()
    assert torch.equal(dense.reshape(-1).nonzero().reshape(-1), idx[vals != 0])
    assert p.nnz == p.indices.numel() * 16
    m = torch.zeros(2, 3, dtype=torch.bool)
    m[p.indices // 3, p.indices % 3] = True
    again = fmt.SparseParam.from_block_mask(dense, m, 4)
    assert torch.equal(again.values, p.values)


def test_pickle_files_refused(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FormatError, match="pickle"):
        fmt.load_file(tmp_path / "a.bin")


# -- malformed files through the CLI ------------------------------------------------------------

NAME = "encoder.layer.0.attention.self.query.weight"


def _craft(tensors: dict[str, torch.Tensor], params: dict, extras: list | None = None, card: dict | None = None) -> bytes:
    doc = {"format": fmt.FORMAT_ID, "params": params, "extras": extras or [], "card": card or {}}
    return fmt._write_container(tensors, {fmt.METADATA_KEY: json.dumps(doc, sort_keys=True, separators=(",", ":"))})


def _one(idx_gaps: torch.Tensor, vals: torch.Tensor, *, shape=(32, 32), esc: torch.Tensor | None = None,
         count: int | None = None, name: str = NAME) -> bytes:
    tensors = {f"param::{name}::idx": idx_gaps, f"param::{name}::val": vals}
    if esc is not None:
        tensors[f"param::{name}::esc"] = esc
    spec = {"shape": list(shape), "layout": "element", "block_size": None,
            "count": int(idx_gaps.numel()) if count is None else count, "nnz": int(vals.numel()), "dtype": "fp32"}
    return _craft(tensors, {name: spec})


def _good() -> bytes:
    return fmt.save(make_adapter(density=0.05, seed=7))


def _u16(xs):
    return torch.tensor(xs, dtype=torch.int32).to(torch.uint16)


def _with_header(data: bytes, edit) -> bytes:
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    edit(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data[8 + hlen:]


def _drop_idx_dtype(header):
    header[f"param::{NAME}::idx"]["dtype"] = "I16"


def _overlap(header):
    b, e = header[f"param::{NAME}::idx"]["data_offsets"]
    header[f"param::{NAME}::idx"]["data_offsets"] = [0, e - b]  # on top of the first tensor's bytes


MALFORMED = {
    # case: (bytes, text the one-line error must contain)
    "truncated": (lambda: _good()[:-7], "outside the file"),
    "truncated-header": (lambda: _good()[:20], "truncated"),
    "empty": (lambda: b"", "truncated"),
    "bad-header-json": (lambda: struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 8, "bad safetensors header"),
    "header-not-object": (lambda: struct.pack("<Q", 8) + b"[1,2,3] ", "not a JSON object"),
    "no-card": (lambda: fmt._write_container({"x": torch.zeros(2)}, {}), "not an adapterhub file"),
    "duplicate-index": (lambda: _one(_u16([1, 0, 3]), torch.ones(3)), NAME),
    "unsorted-index": (lambda: _one(_u16([5, 0]), torch.ones(2), esc=torch.tensor([-3])), NAME),
    "out-of-range": (lambda: _one(_u16([1, 1023, 5]), torch.ones(3)), NAME),
    "count-mismatch": (lambda: _one(_u16([1, 2]), torch.ones(2), count=3), NAME),
    "values-length": (lambda: _one(_u16([1, 2, 3]), torch.ones(2)), NAME),
    "wrong-value-dtype": (lambda: _one(_u16([1, 2]), torch.ones(2, dtype=torch.int32)), NAME),
    "wrong-index-dtype": (lambda: _with_header(_good(), _drop_idx_dtype), NAME),
    "float64-values": (lambda: _one(_u16([1, 2]), torch.ones(2, dtype=torch.float64)), NAME),
    "nan": (lambda: _one(_u16([1, 2]), torch.tensor([1.0, float("nan")])), NAME),
    "inf": (lambda: _one(_u16([1, 2]), torch.tensor([float("inf"), 1.0])), NAME),
    "shape-mismatch-with-base": (lambda: _one(_u16([1, 2]), torch.ones(2), shape=(16, 32)), NAME),
    "not-in-base": (lambda: _one(_u16([1]), torch.ones(1), name="encoder.layer.9.nothing.weight"),
                    "encoder.layer.9.nothing.weight"),
    "unknown-tensor": (lambda: _craft({f"param::{NAME}::idx": _u16([1]), f"param::{NAME}::val": torch.ones(1),
                                       "sneaky": torch.ones(1)},
                                      {NAME: {"shape": [32, 32], "layout": "element", "block_size": None, "count": 1}}),
                       "sneaky"),
    "missing-values": (lambda: _craft({f"param::{NAME}::idx": _u16([1])},
                                      {NAME: {"shape": [32, 32], "layout": "element", "block_size": None, "count": 1}}),
                       NAME),
    "overlapping-data": (lambda: _with_header(_good(), _overlap), "param::"),
    "nan-extra": (lambda: _craft({f"param::{NAME}::idx": _u16([1]), f"param::{NAME}::val": torch.ones(1),
                                  "extra::heads.t.weight": torch.tensor([float("nan")])},
                                 {NAME: {"shape": [32, 32], "layout": "element", "block_size": None, "count": 1}},
                                 extras=["heads.t.weight"]), "heads.t.weight"),
}


@pytest.fixture
def reg(home, tiny_bert_dir, tmp_path):
    """Invoke `register` on bytes against a home with one base and one registered version."""
    from adapterhub.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["--home", str(home), "base", "add", "tiny", str(tiny_bert_dir)])
    assert r.exit_code == 0, r.output
    (tmp_path / "ok.safetensors").write_bytes(_good())
    r = runner.invoke(cli, ["--home", str(home), "register", str(tmp_path / "ok.safetensors"), "--name", "ok",
                            "--task", "t", "--base", "tiny"])
    assert r.exit_code == 0, r.output

    def run(data: bytes, name: str = "ok"):
        f = tmp_path / "in.safetensors"
        f.write_bytes(data)
        return runner.invoke(cli, ["--home", str(home), "register", str(f), "--name", name, "--task", "t", "--base", "tiny"])
    return run


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_via_cli(case, reg, home):
    make, needle = MALFORMED[case]
    data = make()
    before = home_snapshot(home)
    r = reg(data)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert home_snapshot(home) == before
    r = reg(data, name="fresh")  # a new adapter name: no adapter row appears either
    assert r.exit_code == 1 and home_snapshot(home) == before


def test_malformed_library_errors_name_the_tensor():
    with pytest.raises(FormatError, match=NAME):
        fmt.load(_one(_u16([1, 0, 3]), torch.ones(3)))
    with pytest.raises(FormatError, match="not strictly increasing"):
        fmt.SparseParam((4,), torch.tensor([2, 1]), torch.ones(2)).validate("p")
    with pytest.raises(FormatError, match="p: index 9 out of range"):
        fmt.SparseParam((4,), torch.tensor([1, 9]), torch.ones(2)).validate("p")
    with pytest.raises(FormatError):
        fmt.save(fmt.SparseAdapter({"p": fmt.SparseParam((4,), torch.tensor([1, 1]), torch.ones(2))}))
    ok = fmt.load(_one(_u16([1, 2]), torch.tensor([1.0, float("nan")])), allow_nonfinite=True)
    assert torch.isnan(ok.params[NAME].values[1])

"""Register's fixed per-file cost (issue 19), without weakening a check: the strict header reader's one-pass
acceptance, the batched scan, the mask hash line, the base's shapes kept by file identity, and the catalog
statements of one register. Each test pins a result or an exact refusal; none is timed."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import event

from adapterhub import format as fmt, st_io
from adapterhub.bases import sources
from adapterhub.errors import BaseModelError, FormatError, HeaderError
from adapterhub.format import SparseAdapter, SparseParam
from adapterhub.maskhash import MaskHasher, _line, mask_hash

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the strict header reader: one tight pass accepts exactly what the per-entry checks accept -------------------

def _reference(header: dict, body: int) -> dict | None:
    """The per-entry checks (the error-wording path) as an oracle: the entries, or None where one refuses."""
    try:
        entries = {n: st_io._entry(n, info, body, "") for n, info in header.items()}
        st_io._check_tiling(entries, body, "")
    except HeaderError:
        return None
    return entries


_names = st.text(max_size=5) | st.sampled_from(["a", "b", "\ud800", "w\x00"])
_dtypes = st.sampled_from(sorted(st_io.DTYPE_SIZES) + ["F31", "f32"])
_dims = st.lists(st.integers(0, 5), max_size=3)


def _tile(header: dict, specs: dict, order) -> int:
    """Add ``specs`` (name -> (dtype, shape)) to ``header`` in ``order``, each tensor's bytes right after the
    previous one's; returns where the data ends."""
    pos = 0
    for n in order:
        dt, shape = specs[n]
        size = st_io.DTYPE_SIZES[dt]
        for d in shape:
            size *= d
        header[n] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    return pos


@st.composite
def _headers(draw):
    """Mostly valid headers (tensors tiled in some order), then one field of one entry damaged, or none."""
    specs = draw(st.dictionaries(_names, st.tuples(_dtypes.filter(lambda d: d in st_io.DTYPE_SIZES), _dims),
                                 max_size=5))
    order = draw(st.permutations(sorted(specs)))
    header: dict = {}
    pos = _tile(header, specs, order)
    body = pos + draw(st.sampled_from([0, 0, 0, 1, -1]))
    if header and draw(st.booleans()):
        victim = header[draw(st.sampled_from(sorted(header)))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole"]))
        bad = draw(st.sampled_from([None, True, 1.0, -1, 2**48, "F32", [], [0], [0, 1, 2], [True, 1], {}, [2**64, 0]]))
        if field == "whole":
            victim.clear()
            victim.update({} if bad is None else {"x": bad})
        elif bad is None:
            del victim[field]
        else:
            victim[field] = bad
    return header, max(body, 0)


@FUZZ
@given(_headers())
def test_one_pass_accepts_exactly_what_the_per_entry_checks_accept(case):
    header, body = case
    got = st_io._valid_entries(header, body)
    assert got == _reference(header, body)


@FUZZ
@given(_headers())
def test_parse_json_gives_the_per_entry_error_or_the_same_entries(case):
    header, body = case
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\0" * body
    want = _reference(dict(header), body)
    try:
        h = st_io.parse_header(data, "f.safetensors")
    except HeaderError as e:
        assert want is None and str(e).startswith("f.safetensors: ")
        return
    assert h.entries == want


def test_entries_are_named_tuples():
    raw = b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    h = st_io.parse_header(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    e = h.entries["w"]
    assert e == ("F32", (2,), 0, 8) and (e.dtype, e.shape, e.begin, e.end) == tuple(e)
    assert e.numel == 2 and e.nbytes == 8


@pytest.mark.parametrize("raw, key", [
    (b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "w"),
    (b'{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "dtype"),  # inner objects first
    (b'{"a":{},"b":{"x":1,"y":2,"x":3,"y":4}}', "x"),  # the first key that repeats, in document order
])
def test_duplicate_keys_name_the_first_repeated_key(raw, key):
    with pytest.raises(HeaderError) as e:
        st_io.parse_header(struct.pack("<Q", len(raw)) + raw + b"\0", "f.safetensors")
    assert str(e.value) == f"f.safetensors: bad safetensors header: key {key!r} appears twice"


# -- the mask hash line -------------------------------------------------------------------------------------------

@FUZZ
@given(st.text(), st.lists(st.integers(0, 2**62), max_size=8), st.integers(0, 2**40), st.integers(0, 2**20))
def test_mask_hash_line_is_json_dumps(name, shape, count, n_esc):
    assert _line(name, shape, count, n_esc) == json.dumps([name, shape, count, n_esc]).encode() + b"\n"


# -- the canonical header, written from a template ----------------------------------------------------------------

def _container_header_by_dumps(specs: dict, metadata: dict) -> bytes:
    """The canonical header as the format defines it: one json.dumps of the whole header."""
    names = sorted(specs, key=lambda n: (-st_io.DTYPE_SIZES[specs[n][0]], n))
    header: dict = {"__metadata__": metadata}
    _tile(header, specs, names)
    hjson = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    return struct.pack("<Q", len(hjson)) + hjson


@FUZZ
@given(st.dictionaries(st.text(min_size=1) | st.sampled_from(["__metadata__", "A", "_", "é", "a\"b", "\ud800"]),
                       st.tuples(st.sampled_from(sorted(st_io.DTYPE_SIZES)), st.lists(st.integers(0, 2**40), max_size=4)),
                       max_size=6),
       st.dictionaries(st.text(), st.text(), max_size=3))
def test_container_header_is_the_json_dumps_of_the_header(specs, metadata):
    specs.pop("__metadata__", None)
    try:
        want = _container_header_by_dumps(specs, metadata)
    except UnicodeEncodeError:  # a lone surrogate cannot be written by either
        with pytest.raises(UnicodeEncodeError):
            fmt._container_header(specs, metadata)
        return
    assert fmt._container_header(specs, metadata)[0] == want


# -- the scan: small parameters checked together, large ones one at a time ----------------------------------------

def _mixed_adapter(dtype: torch.dtype) -> SparseAdapter:
    """Many small parameters, one with escaped gaps, one large (above the batch size), one empty, an extra."""
    g = torch.Generator().manual_seed(3)
    params = {}
    for i in range(12):
        n = 200 + 37 * i
        idx = torch.randperm(n * 8, generator=g)[:n].sort().values
        params[f"m{i:02d}.weight"] = SparseParam((n, 8), idx, torch.randn(n, generator=g).to(dtype))
    far = torch.tensor([5, 70_000, 300_000, 299_999 + 70_001], dtype=torch.int64)
    params["esc.weight"] = SparseParam((1000, 1000), far, torch.randn(4, generator=g).to(dtype))
    big = torch.randperm(200_000, generator=g)[:40_000].sort().values
    params["big.weight"] = SparseParam((400, 500), big, torch.randn(40_000, generator=g).to(dtype))
    params["zero.weight"] = SparseParam((10,), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype))
    return SparseAdapter(params, {"head": torch.randn(3, generator=g)}, {"task": "t"})


def _damaged(data: bytes) -> list[bytes]:
    """A zero gap without an escape, the last index out of range, a NaN/inf value in a small and in the large
    parameter, an escape below 65536, an escape beyond the tensor."""
    h = st_io.parse_header(data)
    out = []

    def poke(name: str, at: int, raw: bytes) -> None:
        e = h.entries[name]
        b = bytearray(data)
        where = h.data_start + (e.begin + at if at >= 0 else e.end + at)
        b[where:where + len(raw)] = raw
        out.append(bytes(b))

    poke("param::m03.weight::idx", 2, b"\0\0")
    poke("param::m05.weight::idx", -2, b"\xff\xff")
    nan = {"F32": b"\x00\x00\xc0\x7f", "BF16": b"\xc0\x7f", "F16": b"\x00\x7e"}[h.entries["param::m07.weight::val"].dtype]
    poke("param::m07.weight::val", 0, nan)
    poke("param::big.weight::val", -len(nan), nan)
    poke("param::esc.weight::esc", 0, (1000).to_bytes(8, "little"))
    poke("param::esc.weight::esc", 8, (10**9).to_bytes(8, "little"))
    return out


@pytest.mark.parametrize("batch", [0, 1 << 14, 1 << 20])  # one at a time; the default; everything together
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scan_batched_or_not_reads_and_refuses_what_load_does(batch, dtype, monkeypatch):
    monkeypatch.setattr(fmt, "_BATCH_COUNT", batch)
    a = _mixed_adapter(dtype)
    data = fmt.save(a)
    s = fmt.load_canonical(data)
    full = fmt.load(data)
    assert isinstance(s, fmt.ScannedAdapter)
    assert s.mask_hash() == full.mask_hash() == mask_hash({n: (p.shape, p.flat()[0]) for n, p in a.params.items()})
    assert (s.nnz, s.numel, s.dtype, s.nnz_per_param()) == (full.nnz, full.numel, full.dtype, full.nnz_per_param())
    assert s.canonical_with(a.card)
    for bad in _damaged(data):
        with pytest.raises(FormatError) as want:
            fmt.load(bad)
        with pytest.raises(FormatError) as got:
            fmt.load_canonical(bad)
        assert str(got.value) == str(want.value)
    nonfinite = _damaged(data)[3]
    assert isinstance(fmt.load_canonical(nonfinite, allow_nonfinite=True), fmt.ScannedAdapter)


def test_mask_hasher_order_is_still_enforced():
    h = MaskHasher()
    h.add("b", (4,), [1])
    with pytest.raises(ValueError, match="increasing name order"):
        h.add("a", (4,), [1])


# -- the base's tensor shapes, kept by file identity ---------------------------------------------------------------

def _weights(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    from safetensors.torch import save_file

    save_file({n: torch.zeros(s) for n, s in shapes.items()}, str(path))


def _settled(monkeypatch) -> None:
    """Count every file as settled (so the first read is kept)."""
    monkeypatch.setattr(sources, "_SETTLED_NS", -(10**30))


def test_shapes_of_an_unchanged_file_are_not_read_again(tmp_path, monkeypatch):
    _weights(tmp_path / "model.safetensors", {"a": (2, 3), "b": (4,)})
    _settled(monkeypatch)
    assert sources.tensor_shapes(tmp_path) == {"a": (2, 3), "b": (4,)}
    monkeypatch.setattr(sources, "read_header", lambda f: pytest.fail("read again"))
    got = sources.tensor_shapes(tmp_path)
    assert got == {"a": (2, 3), "b": (4,)}
    got["a"] = (0,)  # the caller's copy: the kept shapes are not changed through it
    assert sources.tensor_shapes(tmp_path)["a"] == (2, 3)


def test_a_changed_file_never_gives_stale_shapes(tmp_path, monkeypatch):
    f = tmp_path / "model.safetensors"
    _weights(f, {"a": (2, 3)})
    os.utime(f, ns=(10**18, 10**18))  # an old mtime: the rewrite below changes it even within one clock tick
    _settled(monkeypatch)
    assert sources.tensor_shapes(tmp_path) == {"a": (2, 3)}
    size = f.stat().st_size
    _weights(f, {"a": (3, 2)})  # same size, same names, other shape
    assert f.stat().st_size == size
    assert sources.tensor_shapes(tmp_path) == {"a": (3, 2)}
    f.unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0[1,2]")  # replaced by a damaged file
    with pytest.raises(BaseModelError, match="model.safetensors: bad safetensors header: not a JSON object"):
        sources.tensor_shapes(tmp_path)


def test_a_just_written_file_is_read_every_time(tmp_path, monkeypatch):
    _weights(tmp_path / "model.safetensors", {"a": (2,)})
    calls = []
    real = sources.read_header
    monkeypatch.setattr(sources, "read_header", lambda f: calls.append(f) or real(f))
    sources.tensor_shapes(tmp_path)
    sources.tensor_shapes(tmp_path)
    assert len(calls) == 2  # ctime within the settle time: not kept (a change in the same clock tick is possible)


# -- the catalog statements of one register ------------------------------------------------------------------------

def test_register_reads_once_then_inserts_in_one_flush_and_commit(ws, tiny_bert_dir, tmp_path):
    from catalog_util import make_adapter

    ws.add_base("tiny", str(tiny_bert_dir))
    path = tmp_path / "a.safetensors"
    path.write_bytes(fmt.save(make_adapter(card={"base": {"name": "tiny", "fingerprint": ws.get_base("tiny").fingerprint},
                                                 "task": "t", "kind": "expert"})))
    log: list[str] = []
    event.listen(ws.engine, "begin", lambda c: log.append("BEGIN"))
    event.listen(ws.engine, "commit", lambda c: log.append("COMMIT"))
    event.listen(ws.engine, "before_cursor_execute", lambda c, cur, stmt, *a: log.append(stmt.split()[0]))
    # a new name: one read transaction (base, adapter), then the adapter and version rows in one flush and commit
    first = ws.register(path, name="a", task="t", base="tiny")
    assert log == ["BEGIN", "SELECT", "SELECT", "COMMIT", "BEGIN", "SELECT", "INSERT", "INSERT", "COMMIT"]
    fp = ws.get_base("tiny").fingerprint
    assert (first.number, first.base, first.base_fingerprint) == (1, "tiny", fp)  # the base row is not read again
    log.clear()
    # an existing name: the same content check and next number as before, still no lazy load of the base
    again = ws.register(make_adapter(seed=5), name="a", task="t", base="tiny")
    assert log == ["BEGIN", "SELECT", "SELECT", "COMMIT", "BEGIN", "SELECT", "SELECT", "SELECT", "INSERT", "COMMIT"]
    assert (again.number, again.base, again.base_fingerprint) == (2, "tiny", fp)
    same = ws.register(path, name="a", task="t", base="tiny")
    assert (same.number, same.created, same.base_fingerprint) == (1, False, fp)


def test_refusals_keep_their_order_and_wording(ws, tiny_bert_dir, tiny_llama_dir):
    from adapterhub.catalog.records import Parent
    from adapterhub.errors import CatalogError, RefError
    from catalog_util import make_adapter

    ws.add_base("tiny", str(tiny_bert_dir))
    ws.add_base("other", str(tiny_llama_dir))
    ws.register(make_adapter(seed=1), name="rt", task="t", base="tiny")
    with pytest.raises(CatalogError, match=r"^adapter 'rt' is of kind expert, not merge$"):
        ws.register(make_adapter(seed=2), name="rt", task="t", base="tiny", kind="merge", parents=[Parent("ghost@1")])
    with pytest.raises(RefError, match=r"^unknown adapter 'ghost'$"):
        ws.register(make_adapter(seed=2), name="rt", task="t", base="tiny", parents=[Parent("rt@1"), Parent("ghost@1")])
    with pytest.raises(CatalogError, match=r"^relation merged_from needs a parent ref$"):
        ws.register(make_adapter(seed=2), name="rt", task="t", base="tiny", parents=[Parent(None, "merged_from")])
    with pytest.raises(BaseModelError, match=r"^unknown base 'nope' \(known: other, tiny\)"):
        ws.register(make_adapter(seed=2), name="rt", task="t", base="nope", parents=[Parent("ghost@1")])
    assert [v.number for v in ws.log("rt")] == [1]

"""Hostile inputs: hypothesis-driven fuzzing of the adapter file loader, its JSON card, REF parsing and
name validation, plus crafted headers (huge tensors, overflowing indices) and symlinks planted in the
home directory. Only our own AdapterHubError subclasses may come out; nothing hangs; nothing is
written (or deleted) outside the home directory.
"""
from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from adapterhub import format as fmt
from adapterhub.catalog.names import validate_name
from adapterhub.catalog.refs import parse_ref
from adapterhub.errors import AdapterHubError, FormatError, NameError_, RefError, StoreError
from adapterhub.format import SparseAdapter, SparseParam

pytestmark = pytest.mark.timeout(300)  # "no hang": every fuzz test must finish well within this

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sample_adapter() -> SparseAdapter:
    g = torch.Generator().manual_seed(0)
    p1 = SparseParam.from_flat((16, 8), torch.tensor([0, 3, 9, 40, 127]), torch.randn(5, generator=g))
    # a gap > 65535 so the escape list is present
    p2 = SparseParam((300, 400), torch.tensor([1, 70_000, 119_999]), torch.randn(3, generator=g).to(torch.bfloat16))
    blk = SparseParam((8, 8), torch.tensor([1, 2]), torch.randn(2, 4, 4, generator=g).half(), block_size=4)
    return SparseAdapter({"a.weight": p1, "b.weight": p2, "c.weight": blk},
                         {"heads.t.weight": torch.randn(2, 8, generator=g)},
                         {"task": "t", "labels": {"t": ["neg", "pos"]}, "mask": {"method": "random"}})


GOOD = fmt.save(_sample_adapter())


def _container(header: dict, body: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _doc_bytes(doc: dict, tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A container with our metadata key set to ``json.dumps(doc)`` and raw tensors."""
    header: dict = {"__metadata__": {fmt.METADATA_KEY: json.dumps(doc)}}
    body = b""
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    return _container(header, body)


def _load_only_our_errors(data: bytes) -> None:
    try:
        a = fmt.load(data)
    except AdapterHubError as e:
        msg = str(e)
        assert msg and len(msg) < 5000, msg  # the CLI prints it on one line (whitespace collapsed)
        return
    # Anything accepted must be a valid adapter that re-serialises canonically.
    a.validate(allow_nonfinite=True)
    fmt.save(SparseAdapter(a.params, a.extras, dict(a.card, allow_nonfinite=True)))


def test_sample_round_trips():
    a = fmt.load(GOOD)
    assert fmt.save(a) == GOOD
    assert "param::b.weight::esc" in json.loads(GOOD[8:8 + struct.unpack("<Q", GOOD[:8])[0]])


@FUZZ
@given(st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_truncated_files_are_refused(n):
    with pytest.raises(FormatError):
        fmt.load(GOOD[:n])


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(GOOD) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_mutated_bytes_give_only_clear_errors(edits):
    buf = bytearray(GOOD)
    for pos, byte in edits:
        buf[pos] = byte
    _load_only_our_errors(bytes(buf))


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    _load_only_our_errors(data)
    _load_only_our_errors(struct.pack("<Q", len(data)) + data)


def test_huge_tensor_declared_is_refused_before_any_allocation(monkeypatch):
    """Headers declaring terabyte tensors fail on the size/offset check; no tensor is ever built."""
    def no_alloc(*a, **k):
        raise AssertionError("tensor data touched before the header was validated")

    monkeypatch.setattr(fmt, "_tensor_from_buffer", no_alloc)
    cases = [
        {"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}},
        {"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]}},
        {"x": {"dtype": "F32", "shape": [2**20, 2**20, 2**20, 2**20], "data_offsets": [0, 0]}},
        {"x": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 8]}},
        {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
        {"x": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}},
    ]
    for header in cases:
        with pytest.raises(FormatError):
            fmt.load(_container(header, b"\0" * 8))
    # a header length field claiming 2**63 bytes
    with pytest.raises(FormatError):
        fmt.load(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(FormatError):
        fmt.load(struct.pack("<Q", 2**64 - 1) + b"{}")


def _param_doc(name="w", shape=(4, 4), count=2, layout="element", block=None):
    return {"format": fmt.FORMAT_ID, "extras": [], "card": {},
            "params": {name: {"shape": list(shape), "layout": layout, "block_size": block, "count": count, "nnz": count,
                              "dtype": "fp32"}}}


def test_index_arrays_that_overflow_are_refused():
    gaps = struct.pack("<2H", 0, 0)
    vals = struct.pack("<2f", 1.0, 2.0)
    for escapes in ([2**62, 2**62], [2**63 - 1, 2**63 - 1], [65536, 2**63 - 1], [2**63 - 1, 65536]):
        data = _doc_bytes(_param_doc(shape=(2**31, 2**31)), {
            "param::w::idx": ("U16", [2], gaps), "param::w::esc": ("I64", [2], struct.pack("<2q", *escapes)),
            "param::w::val": ("F32", [2], vals)})
        with pytest.raises(FormatError):
            fmt.load(data)
    # negative escapes and escapes below the gap limit
    for escapes in ([-5, 70000], [5, 70000]):
        data = _doc_bytes(_param_doc(shape=(2**20, 2**20)), {
            "param::w::idx": ("U16", [2], gaps), "param::w::esc": ("I64", [2], struct.pack("<2q", *escapes)),
            "param::w::val": ("F32", [2], vals)})
        with pytest.raises(FormatError):
            fmt.load(data)


def test_param_shapes_that_overflow_int64_are_refused():
    """A card declaring a parameter shape whose element count does not fit in int64 is refused at load."""
    gaps = struct.pack("<1H", 1)
    for shape in ([10**30], [2**40, 2**40], [2**62, 4]):
        data = _doc_bytes(_param_doc(shape=shape, count=1), {
            "param::w::idx": ("U16", [1], gaps), "param::w::val": ("F32", [1], struct.pack("<f", 1.0))})
        with pytest.raises(FormatError):
            fmt.load(data)


def test_block_layout_overflow_refused():
    data = _doc_bytes(_param_doc(shape=(2**40, 2**40), count=1, layout="block", block=2**20), {
        "param::w::idx": ("U16", [1], struct.pack("<H", 1)), "param::w::val": ("F32", [1, 2**20, 2**20], b"")})
    with pytest.raises(FormatError):
        fmt.load(data)


# -- the JSON card -------------------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), c, max_size=4)),
                          max_leaves=20)


@FUZZ
@given(json_value)
def test_card_parser_arbitrary_documents(doc):
    try:
        text = json.dumps(doc)
    except (ValueError, TypeError):
        return
    _load_only_our_errors(_container({"__metadata__": {fmt.METADATA_KEY: text}}))
    _load_only_our_errors(_container({"__metadata__": {fmt.METADATA_KEY: json.dumps(
        {"format": fmt.FORMAT_ID, "params": {}, "extras": [], "card": doc})}}))


@FUZZ
@given(st.dictionaries(st.sampled_from(["shape", "layout", "block_size", "count", "nnz", "dtype"]), json_value),
       st.text(max_size=30))
def test_card_param_specs(spec, pname):
    doc = {"format": fmt.FORMAT_ID, "params": {pname: spec}, "extras": [], "card": {}}
    tensors = {f"param::{pname}::idx": ("U16", [1], struct.pack("<H", 1)),
               f"param::{pname}::val": ("F32", [1], struct.pack("<f", 1.0))}
    try:
        data = _doc_bytes(doc, tensors)
    except (ValueError, TypeError, UnicodeEncodeError):
        return
    _load_only_our_errors(data)


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # recursion bomb
    '{"format": "adapterhub.sparse/1", "params": {}, "card": {"x": ' + "1" * 5000 + "}}",  # int too long to parse
    '{"format": "adapterhub.sparse/1", "params": {"w": {"shape": [1e400], "layout": "element", "count": 1}}}',
    '{"format": "adapterhub.sparse/1", "params": {"w": {"shape": [4], "layout": "element", "count": 1e400}}}',
    '{"format": "adapterhub.sparse/1", "params": {}, "card": {"\\ud800": "\\udfff"}, "extras": []}',
    '{"format": "adapterhub.sparse/1", "params": {"\\ud800": {"shape": [4], "layout": "element", "count": 1}}}',
    '{"format": "adapterhub.sparse/1", "params": {}, "extras": ["\\ud800"]}',
])
def test_card_pathological_json(text):
    tensors = {"param::w::idx": ("U16", [1], struct.pack("<H", 1)), "param::w::val": ("F32", [1], struct.pack("<f", 1.0))}
    header: dict = {"__metadata__": {fmt.METADATA_KEY: text}}
    body = b""
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    _load_only_our_errors(_container(header, body))
    # and the same bombs in the outer safetensors header itself
    with pytest.raises(FormatError):
        fmt.load(struct.pack("<Q", len(text.encode("utf-8", "surrogatepass"))) + text.encode("utf-8", "surrogatepass"))


def test_header_with_deeply_nested_json_is_a_format_error():
    text = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(FormatError):
        fmt.load(struct.pack("<Q", len(text)) + text)


# -- names and refs ----------------------------------------------------------------------------------------

SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}")
hostile_text = st.one_of(
    st.text(max_size=120),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=5),
    st.builds(lambda a, b: a + b, st.sampled_from(["..", "/", "\\", "\0", "a/../", "../", "a\n", "\n", "a@", "@",
                                                    "sha256:", "ａ", "²", "١"]), st.text(max_size=10)),
    st.builds(lambda a, b: a + b, st.from_regex(SAFE, fullmatch=True), st.sampled_from(["\n", "\0", "/", "/..", "²"])),
    st.text(alphabet="ab.-_", min_size=95, max_size=300),
)


@FUZZ
@given(hostile_text)
def test_validate_name_accepts_only_safe_names(name):
    try:
        out = validate_name(name)
    except NameError_ as e:
        assert str(e) and "\n" not in str(e).replace("\\n", "")
        return
    assert out == name
    assert SAFE.fullmatch(name) and ".." not in name and name.isascii() and "\n" not in name


@FUZZ
@given(st.one_of(hostile_text, st.builds(lambda a, b: a + "@" + b, hostile_text, hostile_text),
                 st.builds(lambda h: "sha256:" + h, st.text(alphabet="0123456789abcdefABCDEFxyz", max_size=70)),
                 st.integers(), st.none(), st.binary(max_size=20)))
def test_parse_ref_only_ref_errors(text):
    try:
        r = parse_ref(text)
    except RefError as e:
        assert str(e)
        return
    if r.hash_prefix is not None:
        assert re.fullmatch(r"[0-9a-f]{8,64}", r.hash_prefix)
    else:
        assert SAFE.fullmatch(r.name) and ".." not in r.name
        if r.tag is not None:
            assert SAFE.fullmatch(r.tag) and not r.tag.isdigit()
        if r.number is not None:
            assert 1 <= r.number < 10**9


@pytest.mark.parametrize("bad", ["abc\n", "abc\n@1", "abc@1\n", "abc@²", "abc@١", "abc@prod\n", "a" * 101, "..",
                                 "a/../b", "a\0b", "\udcff", "name@" + "9" * 12, "x@0"])
def test_ref_examples(bad):
    with pytest.raises(RefError):
        parse_ref(bad)


def test_name_with_trailing_newline_is_refused():
    for n in ("abc\n", "abc\r", "abc\n\n", "a\u2028"):
        with pytest.raises(NameError_):
            validate_name(n)


# -- symlinks planted in the home directory -------------------------------------------------------------------

def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


def test_blob_shard_symlink_outside_home_is_refused(tmp_path):
    from adapterhub.store import BlobStore

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.tmp").write_bytes(b"x")
    victim_digest = fmt.sha256_hex(b"victim")
    (outside / victim_digest[2:]).write_bytes(b"victim")
    store = BlobStore(tmp_path / "home" / "blobs" / "sha256")
    digest = fmt.sha256_hex(GOOD)
    (store.root / digest[:2]).symlink_to(outside, target_is_directory=True)
    (store.root / victim_digest[:2]).symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    with pytest.raises(StoreError):
        store.put_bytes(GOOD)
    with pytest.raises(StoreError):
        store.get_bytes(victim_digest)
    assert not store.has(victim_digest)
    res = store.gc(set())  # must not delete through the symlinked shard
    assert victim_digest not in res.removed
    (outside / ".x.tmp").write_bytes(b"temp")
    store.gc(set())
    assert (outside / ".x.tmp").exists()
    assert _tree(outside) == sorted(before + [(".x.tmp", b"temp")])


def test_blob_file_symlink_is_refused(tmp_path):
    from adapterhub.store import BlobStore

    outside = tmp_path / "secret"
    outside.write_bytes(GOOD)
    store = BlobStore(tmp_path / "home" / "blobs" / "sha256")
    digest = fmt.sha256_hex(GOOD)
    (store.root / digest[:2]).mkdir()
    store.path(digest).symlink_to(outside)
    with pytest.raises(StoreError):
        store.get_bytes(digest)
    with pytest.raises(StoreError):
        store.put_bytes(GOOD)
    assert outside.read_bytes() == GOOD


def test_symlinked_store_root_is_refused(tmp_path):
    from adapterhub.workspace import Workspace

    outside = tmp_path / "outside"
    outside.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / "blobs").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterHubError):
        Workspace.open(home)
    assert list(outside.iterdir()) == []


# -- Hub responses ---------------------------------------------------------------------------------------------



def _card_doc(**over):
    doc = {"format": "adapterhub.hub/1", "name": "x", "version": 1, "content_hash": "a" * 64,
           "base": {"name": "b", "fingerprint": "f" * 64}, "lineage": []}
    doc.update(over)
    return doc


@FUZZ
@given(json_value, st.sampled_from(["file", "name", "version", "base", "lineage", "content_hash", "task", "metrics"]))
def test_hub_card_parser_only_hub_errors(value, key):
    from adapterhub.hub.cards import HUB_CARD_FORMAT, parse_hub_card

    try:
        data = json.dumps(_card_doc(format=HUB_CARD_FORMAT, **{key: value})).encode()
    except (ValueError, TypeError):
        return
    try:
        card = parse_hub_card(data)
    except AdapterHubError:
        return
    from adapterhub.hub.cards import safe_repo_path

    safe_repo_path(card.get("file", "adapter.safetensors"))


@pytest.mark.parametrize("data", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"format": "x", "version": ' + b"1" * 5000 + b"}",
    b"\xff\xfe\x00",
])
def test_hub_card_parser_pathological_bytes(data):
    from adapterhub.hub.cards import parse_hub_card

    with pytest.raises(AdapterHubError):
        parse_hub_card(data)


@pytest.mark.parametrize("evil", ["../../../escape.safetensors", "/etc/passwd", "a/../../b.safetensors",
                                  "..\\..\\x.safetensors", "C:/x.safetensors", "sub/\x1b[31m.safetensors", "~/x"])
def test_hub_file_names_that_escape_the_cache_are_refused(hub_server, tmp_path, evil):
    """A crafted repo whose card names a weights file outside the snapshot: refused, nothing written outside."""
    from adapterhub.hub import client as hub
    from adapterhub.hub.cards import HUB_CARD_FORMAT

    card = _card_doc(format=HUB_CARD_FORMAT, file=evil, content_hash=fmt.sha256_hex(GOOD))
    hub_server.commit_files("mallory/evil", {"adapterhub.json": json.dumps(card).encode(), "adapter.safetensors": GOOD})
    hub_server.create_tag("mallory/evil", "v1")
    before = sorted(p.name for p in tmp_path.iterdir())
    with Workspace_(tmp_path / "home") as ws:
        with pytest.raises(AdapterHubError, match="escape|file name"):
            hub.pull(ws, "mallory/evil@v1")
        assert ws.list_versions() == []
    after = sorted(p.name for p in tmp_path.iterdir())
    assert set(after) - set(before) <= {"home", "hf_home"}  # the home and the HF cache the fixture set up
    stray = [p for p in tmp_path.rglob("*") if "escape" in p.name or p.name == "passwd"]
    assert stray == []


def Workspace_(home):
    from adapterhub.workspace import Workspace

    return Workspace.open(home)


# -- symlinks planted in deployments ------------------------------------------------------------------------------

def _dep_world(tmp_path, tiny_bert_dir):
    from adapterhub.apply import deployments as dep
    from adapterhub.bases.sources import tensor_shapes
    from adapterhub.workspace import Workspace

    ws = Workspace.open(tmp_path / "home")
    ws.add_base("tiny", str(tiny_bert_dir))
    shapes = tensor_shapes(tiny_bert_dir)
    name = sorted(n for n in shapes if n.endswith("query.weight"))[0]
    ws.register(SparseAdapter({name: SparseParam.from_flat(shapes[name], torch.arange(10), torch.ones(10))}),
                name="a", task="t", base="tiny")
    dep.create(ws, "prod", "tiny")
    return ws, dep


def test_symlinked_deployment_weights_are_not_patched(tmp_path, tiny_bert_dir):
    import shutil

    ws, dep = _dep_world(tmp_path, tiny_bert_dir)
    w = dep.weights_path(ws, "prod") / "model.safetensors"
    victim = tmp_path / "victim.safetensors"
    shutil.copy(w, victim)
    before = victim.read_bytes()
    w.unlink()
    w.symlink_to(victim)
    try:
        dep.apply(ws, "prod", "a@1")
    except AdapterHubError:
        pass
    finally:
        ws.close()
    assert victim.read_bytes() == before


def test_symlinked_deployment_folder_gives_a_clear_error(tmp_path, tiny_bert_dir):
    ws, dep = _dep_world(tmp_path, tiny_bert_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (ws.deployments_dir / "x").symlink_to(elsewhere, target_is_directory=True)
    try:
        with pytest.raises(AdapterHubError):
            dep.create(ws, "x", "tiny")
        assert list(elsewhere.iterdir()) == []
    finally:
        ws.close()

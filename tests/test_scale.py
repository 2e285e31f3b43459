"""Issue 19 (scale): every operation costs what the adapter costs, not what the base costs.

* unions of index sets are sorts of the indices, never a mark over the tensor (old implementation kept
  here as the oracle: results identical bit for bit);
* merge, PEFT export and diff never allocate anything of the tensor's size (shapes of 2**40 elements,
  declared in metadata only: a numel-sized scratch array cannot even be allocated);
* ``register`` of canonical bytes stores those very bytes (no re-serialisation, hashed once), ``pull`` hashes
  once while downloading;
* values in bf16/fp16 round trip bit for bit; ``--values-dtype`` casts at register and merge; apply/revert
  of such values is exact.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from adapterhub import format as fmt
from adapterhub.apply.patching import apply_adapter, revert
from adapterhub.format import SparseAdapter, SparseParam
from adapterhub.interop.peft import export_peft_shira, first_free_positions
from adapterhub.merging import methods as mm
from adapterhub.merging.driver import merge_adapters
from adapterhub.merging.sources import InMemoryExpert
from adapterhub.testing.reference import dense_mark_union
from adapterhub.views.diff import diff_adapters
from catalog_util import BERT_TARGETS, hand_mask_hash, make_adapter

HUGE = (1 << 20, 1 << 20)  # 2**40 elements: a bool mark of it is 1 TiB, an int32 rank 4 TiB


def _experts(seed: int, n: int, numel: int, density: float, dtype: torch.dtype = torch.float32
             ) -> list[mm.ExpertEntry]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(0, max(1, int(numel * density)) + 1, (1,), generator=g))
        idx = torch.randperm(numel, generator=g)[:k].sort().values
        out.append(mm.ExpertEntry(idx, torch.randn(k, generator=g).to(dtype).float(), 1.0 + i, f"k{i}"))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(0, 5), numel=st.integers(1, 3000),
       density=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]))
def test_union_equals_the_old_mark_and_prefix_sum(seed, n, numel, density):
    entries = _experts(seed, n, numel, density)
    uniq, pos = mm._union(entries, numel)
    ouniq, opos = dense_mark_union(entries, numel)
    assert torch.equal(uniq, ouniq) and uniq.dtype == torch.int64
    assert len(pos) == len(opos) and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(pos, opos, strict=True))


def _sparse_experts(seed: int, n: int, shapes: dict[str, tuple[int, ...]], density: float,
                    dtype: torch.dtype) -> list[InMemoryExpert]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        params = {}
        for name, shape in shapes.items():
            numel = shape[0] * shape[1]
            k = int(torch.randint(1, max(2, int(numel * density)), (1,), generator=g))
            idx = torch.randperm(numel, generator=g)[:k].sort().values
            params[name] = SparseParam(shape, idx, torch.randn(k, generator=g).to(dtype))
        out.append(InMemoryExpert(SparseAdapter(params, {}, {"base": {"name": "b", "fingerprint": "f"}}),
                                  key=f"e{seed}-{i}"))
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n=st.integers(2, 4), density=st.sampled_from([0.01, 0.1, 0.6]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       method=st.sampled_from(["uniform-sparse", "ties", "task-arithmetic", "dare-ties", "breadcrumbs", "uniform"]))
def test_merge_bytes_equal_those_of_thedense_mark_union(seed, n, density, dtype, method):
    shapes = {"a.weight": (48, 40), "b.weight": (16, 96)}
    experts = _sparse_experts(seed, n, shapes, density, dtype)
    kw = {"density": 0.5} if method in ("ties", "dare-ties", "breadcrumbs") else {}
    new = hashlib.sha256(fmt.save(merge_adapters(experts, method, **kw).adapter)).hexdigest()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(mm, "_union", dense_mark_union)
        old = hashlib.sha256(fmt.save(merge_adapters(experts, method, **kw).adapter)).hexdigest()
    finally:
        mp.undo()
    assert new == old


def _huge_expert(seed: int, k: int = 5000, key: str = "") -> InMemoryExpert:
    g = torch.Generator().manual_seed(seed)
    numel = HUGE[0] * HUGE[1]
    params = {}
    for name in ("x.weight", "y.weight"):
        idx = torch.unique(torch.randint(0, numel, (k,), generator=g))
        params[name] = SparseParam(HUGE, idx, torch.randn(idx.numel(), generator=g))
    return InMemoryExpert(SparseAdapter(params, {}, {}), key=key or f"huge{seed}")


@pytest.mark.parametrize("method", ["uniform-sparse", "ties", "uniform", "dare-linear"])
def test_merge_of_huge_tensors_allocates_nothing_of_their_size(method):
    """On the old code this fails at once: torch cannot allocate the 1 TiB mark."""
    experts = [_huge_expert(s) for s in range(3)]
    kw = {"density": 0.5} if method in ("ties", "dare-linear") else {}
    res = merge_adapters(experts, method, **kw)
    for name in ("x.weight", "y.weight"):
        union = torch.unique(torch.cat([e.adapter.params[name].indices for e in experts]))
        p = res.adapter.params[name]
        assert p.shape == HUGE
        if method in ("uniform-sparse", "uniform"):
            assert torch.equal(p.indices, union)


def test_first_free_positions_equals_the_mark():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 300, (1,), generator=g))
        mark = torch.rand(n, generator=g) < float(torch.rand(1, generator=g))
        idx = mark.nonzero().view(-1)
        k = int(torch.randint(0, int((~mark).sum()) + 1, (1,), generator=g))
        assert torch.equal(first_free_positions(idx, k), (~mark).nonzero().view(-1)[:k])


def test_peft_export_of_a_huge_layer_pads_without_a_mask(tmp_path, monkeypatch):
    import sys

    from safetensors.torch import load_file

    # export reads peft's version from its metadata without importing it (seconds); PEFT itself loading such
    # folders is tests/test_interop_peft.py's job
    monkeypatch.setitem(sys.modules, "peft", None)  # an import of peft would fail here

    g = torch.Generator().manual_seed(1)
    numel = HUGE[0] * HUGE[1]
    idx = torch.unique(torch.cat([torch.arange(0, 70), torch.randint(0, numel, (3000,), generator=g)]))
    a = SparseAdapter({"layer.weight": SparseParam(HUGE, idx, torch.randn(idx.numel(), generator=g))}, {}, {})
    res = export_peft_shira(a, tmp_path / "peft")
    assert res.r == 1 and res.padded == HUGE[0] + HUGE[1] - idx.numel()
    t = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    coo = t["base_model.model.layer.shira_indices"].to(torch.int64)
    flat = coo[0] * HUGE[1] + coo[1]
    assert torch.equal(flat[: idx.numel()], idx)
    pad = flat[idx.numel():]
    # the padding is the smallest free positions, ascending: 70.. (0..69 are taken)
    assert int(pad[0]) == 70 and bool((pad[1:] > pad[:-1]).all()) and not bool(torch.isin(pad, idx).any())
    assert float(t["base_model.model.layer.shira_weight"][idx.numel():].abs().sum()) == 0.0


class _CountingSource(InMemoryExpert):
    """An expert that hands out fresh copies of its parameters and remembers them weakly, so a test sees how
    many parameters a reader still holds when it asks for the next one."""

    def __init__(self, adapter: SparseAdapter) -> None:
        super().__init__(adapter, key="k", label="counting")
        self.handed: list = []
        self.most_held = 0

    def get_param(self, name: str) -> SparseParam:
        import gc
        import weakref

        gc.collect()
        self.most_held = max(self.most_held, sum(r() is not None for r in self.handed))
        p = self.adapter.params[name]
        q = SparseParam(p.shape, p.indices.clone(), p.values.clone(), block_size=p.block_size)
        self.handed.append(weakref.ref(q))
        return q


def test_peft_export_streams_one_layer_at_a_time_and_writes_the_same_bytes_each_time(tmp_path, monkeypatch):
    import json
    import sys
    from importlib.metadata import version

    from safetensors.torch import load_file

    monkeypatch.setitem(sys.modules, "peft", None)  # an import of peft would fail here
    shapes = {f"layer{i}.weight": (64 + 8 * i, 96) for i in range(6)}
    a = make_adapter(shapes, density=0.05, seed=3)
    src = _CountingSource(a)
    res = export_peft_shira(src, tmp_path / "one")
    # each layer is decoded twice (counted, then written), and none is still held when the next is asked for
    assert len(src.handed) == 2 * len(shapes) and src.most_held == 0
    raw = (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    export_peft_shira(a, tmp_path / "two")  # the loaded adapter itself: the same bytes
    assert hashlib.sha256((tmp_path / "two" / "adapter_model.safetensors").read_bytes()).hexdigest() == \
        hashlib.sha256(raw).hexdigest()
    fmt.st_io.parse_header(raw)  # the project's strict reader takes it (tiling, offsets, dtypes)
    t = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    assert sorted(t) == sorted(f"base_model.model.{n[:-len('.weight')]}.shira_{k}" for n in shapes
                               for k in ("indices", "weight"))
    for name, p in a.params.items():
        m, n = p.shape
        coo = t[f"base_model.model.{name[:-len('.weight')]}.shira_indices"]
        w = t[f"base_model.model.{name[:-len('.weight')]}.shira_weight"]
        assert coo.dtype == torch.int32 and coo.shape == (2, res.r * (m + n)) and w.shape == (res.r * (m + n),)
        flat = coo[0].to(torch.int64) * n + coo[1]
        assert torch.equal(flat[: p.nnz], p.indices) and torch.equal(w[: p.nnz], p.values.float())
        assert not bool(w[p.nnz:].any()) and not bool(torch.isin(flat[p.nnz:], p.indices).any())
    assert res.padded == sum(res.r * sum(p.shape) - p.nnz for p in a.params.values())
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["peft_version"] == version("peft")


class _ShiftingSource(_CountingSource):
    """An expert whose layers hold one entry fewer from the moment the exporter reads them a second time (as if
    the blob changed under it)."""

    def get_param(self, name: str) -> SparseParam:
        p = super().get_param(name)
        if len(self.handed) > len(self.adapter.params):
            return SparseParam(p.shape, p.indices[1:], p.values[1:], block_size=p.block_size)
        return p


def test_a_failed_peft_export_leaves_no_folder_and_keeps_an_existing_one(tmp_path):
    shapes = {f"layer{i}.weight": (24, 16) for i in range(3)}
    a = make_adapter(shapes, density=0.2, seed=5)
    with pytest.raises(fmt.FormatError, match="entries now"):
        export_peft_shira(_ShiftingSource(a), tmp_path / "new" / "peft")
    assert list((tmp_path / "new").iterdir()) == []  # neither the folder nor a hidden temp one
    export_peft_shira(a, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(fmt.FormatError, match="entries now"):
        export_peft_shira(_ShiftingSource(a), tmp_path / "old")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_diff_of_huge_tensors():
    a, b = _huge_expert(1).adapter, _huge_expert(2).adapter
    d = diff_adapters(a, a)
    assert d.jaccard == 1.0 and d.union == a.nnz
    d2 = diff_adapters(a, b)
    assert d2.union == a.nnz + b.nnz - d2.intersection


# -- register: canonical bytes stored as they are ------------------------------------------------------

def _canonical_file(ws, tmp_path: Path, tiny_bert_dir: Path, *, dtype=torch.float32, seed: int = 0) -> Path:
    base = ws.add_base("tiny", str(tiny_bert_dir))
    a = make_adapter(density=0.2, seed=seed, dtype=dtype)
    a.card = {"mask": {"method": "random"}, "base": {"name": "tiny", "fingerprint": base.fingerprint},
              "task": "t", "kind": "expert"}
    path = tmp_path / "a.safetensors"
    fmt.save_file(a, path)
    return path


@pytest.mark.parametrize("as_bytes", [False, True])
def test_register_of_canonical_bytes_stores_them_without_reserialising(ws, tmp_path, tiny_bert_dir, monkeypatch,
                                                                       as_bytes):
    path = _canonical_file(ws, tmp_path, tiny_bert_dir, dtype=torch.bfloat16)
    raw = path.read_bytes()
    hashes = []
    real = fmt.sha256_hex
    monkeypatch.setattr("adapterhub.workspace.sha256_hex", lambda d: hashes.append(1) or real(d))
    monkeypatch.setattr("adapterhub.store.sha256_hex", lambda d: pytest.fail("the store hashed the bytes again"))

    def no_write(*a, **k):
        raise AssertionError("re-serialised canonical bytes")

    monkeypatch.setattr(fmt, "_write_container", no_write)
    info = ws.register(raw if as_bytes else path, name="a", task="t", base="tiny")
    assert info.content_hash == hashlib.sha256(raw).hexdigest() and hashes == [1]  # hashed exactly once
    monkeypatch.undo()
    assert ws.store.get_bytes(info.content_hash) == raw
    assert info.dtype == "bf16" and info.nnz == fmt.load(raw).nnz


def test_register_of_non_canonical_bytes_is_reserialised(ws, tmp_path, tiny_bert_dir):
    path = _canonical_file(ws, tmp_path, tiny_bert_dir)
    a = fmt.load_file(path)
    a.card.pop("task")  # register adds it: the stored card differs, so the bytes are written anew
    raw = fmt.save(a)
    info = ws.register(raw, name="a", task="t", base="tiny")
    stored = ws.store.get_bytes(info.content_hash)
    assert stored != raw and stored == path.read_bytes()  # the canonical form (card with the task)
    # a header with the same tensors but a different (valid) layout order is not canonical either
    h = fmt.st_io.parse_header(raw)
    assert h.data_start > 8


def test_register_values_dtype_casts_and_records(ws, tmp_path, tiny_bert_dir):
    path = _canonical_file(ws, tmp_path, tiny_bert_dir, dtype=torch.float32)
    info = ws.register(path, name="a", task="t", base="tiny", values_dtype="bfloat16")
    a = ws.load_adapter(info)
    src = fmt.load_file(path)
    assert info.dtype == "bf16" and a.card["values"] == {"dtype": "bf16", "cast_from": ["fp32"]}
    for n, p in a.params.items():
        assert torch.equal(p.values, src.params[n].values.to(torch.bfloat16))
    # 2 B of index + 2 B of value per non-zero, plus the header
    assert info.size_bytes - fmt.st_io.parse_header(ws.adapter_bytes(info)).data_start == 4 * a.nnz
    with pytest.raises(fmt.FormatError, match="unknown value dtype"):
        ws.register(path, name="b", task="t", base="tiny", values_dtype="int8")


def test_merge_values_dtype():
    experts = _sparse_experts(3, 3, {"a.weight": (32, 32)}, 0.2, torch.float32)
    full = merge_adapters(experts, "uniform-sparse").adapter
    half = merge_adapters(experts, "uniform-sparse", values_dtype="bfloat16").adapter
    p, q = full.params["a.weight"], half.params["a.weight"]
    assert q.values.dtype == torch.bfloat16 and torch.equal(p.indices, q.indices)
    assert torch.equal(q.values, p.values.to(torch.bfloat16))
    assert half.card["values"] == {"dtype": "bf16", "cast_from": ["fp32"]} and "values" not in full.card
    with pytest.raises(Exception, match="unknown value dtype"):
        merge_adapters(experts, "uniform-sparse", values_dtype="fp8")


# -- bf16/fp16 values: round trips and exact apply/revert ---------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       target=st.sampled_from([None, "float32", "bfloat16", "float16"]), density=st.sampled_from([0.01, 0.2, 1.0]))
def test_half_values_round_trip_and_cast(seed, dtype, target, density):
    a = make_adapter(density=density, seed=seed, dtype=dtype)
    data = fmt.save(a)
    b = fmt.load(data, keep_source=True)
    assert fmt.save(b) is b.source_bytes and fmt.save(fmt.load(data)) == data
    for n, p in a.params.items():
        assert torch.equal(b.params[n].values.view(torch.int16), p.values.view(torch.int16))
    c = fmt.cast_values(b, target)
    cdata = fmt.save(c)
    assert fmt.save(fmt.load(cdata)) == cdata
    want = dtype if target is None else fmt.parse_dtype(target)
    assert fmt.load(cdata).dtype == want


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vdtype", [torch.bfloat16, torch.float16])
def test_apply_adds_the_file_values_and_revert_is_exact(wdtype, vdtype):
    g = torch.Generator().manual_seed(7)
    weights = {n: (torch.randn(s, generator=g) * 0.1).to(wdtype) for n, s in BERT_TARGETS.items()}
    before = {n: hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in weights.items()}
    orig = {n: t.clone() for n, t in weights.items()}
    a = fmt.load(fmt.save(make_adapter(density=0.3, seed=1, dtype=vdtype)))
    rec = apply_adapter(weights, a)
    for n, p in a.params.items():
        flat = weights[n].view(-1)
        want = (orig[n].view(-1)[p.indices].to(torch.float32) + p.values.to(torch.float32)).to(wdtype)
        assert torch.equal(flat[p.indices], want)
    revert(weights, rec)
    assert {n: hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in weights.items()} == before


# -- pull: one hash, while downloading ---------------------------------------------------------------------

def test_pull_hashes_once_while_downloading_and_stores_the_downloaded_bytes(hub_server, tmp_path, tiny_bert_dir,
                                                                            monkeypatch):
    from adapterhub.hub.client import pull, push
    from adapterhub.workspace import Workspace

    a = Workspace.open(tmp_path / "a")
    b = Workspace.open(tmp_path / "b")
    try:
        a.add_base("tiny", str(tiny_bert_dir))
        b.add_base("tiny", str(tiny_bert_dir))
        v = a.register(make_adapter(density=0.2, seed=3, dtype=torch.bfloat16), name="rt", task="t", base="tiny")
        push(a, v.ref, repo="alice/rt")
        pushed = a.adapter_bytes(v)

        def no_hash(*args, **kw):
            raise AssertionError("the pulled bytes were hashed again")

        for where in ("adapterhub.workspace.sha256_hex", "adapterhub.store.sha256_hex",
                      "adapterhub.hub.client.sha256_hex", "adapterhub.hub.client.sha256_file"):
            monkeypatch.setattr(where, no_hash)
        monkeypatch.setattr(fmt, "_write_container", no_hash)  # nor re-serialised
        res = pull(b, "alice/rt")
        monkeypatch.undo()
        assert res.registered and res.content_hash == v.content_hash
        assert b.adapter_bytes(res.ref) == pushed
    finally:
        a.close()
        b.close()


# -- merge: the result is packed as soon as each tensor is merged --------------------------------------------

@pytest.mark.parametrize("method", ["uniform-sparse", "ties", "dare-ties"])
def test_packed_merge_gives_the_same_bytes_mask_hash_and_catalog_row(method, ws, tmp_path, tiny_bert_dir):
    from adapterhub.merging import merge

    experts = _sparse_experts(5, 3, {n: s for n, s in list(BERT_TARGETS.items())[:3]}, 0.3, torch.bfloat16)
    kw = {"density": 0.5} if method != "uniform-sparse" else {}
    plain = merge_adapters(experts, method, **kw).adapter
    packed = merge_adapters(experts, method, packed=True, **kw).adapter
    assert isinstance(packed, fmt.PackedAdapter)
    data = fmt.save(plain)
    assert fmt.save(packed) == data and len(packed) == len(data)
    assert packed.mask_hash() == plain.mask_hash() and packed.nnz_per_param() == plain.nnz_per_param()
    assert packed.dtype == torch.bfloat16 and packed.density == plain.density
    # through the catalog: merge() registers the packed result; the blob is save() of the plain result
    base = ws.add_base("tiny", str(tiny_bert_dir))
    refs = []
    for i, e in enumerate(experts):
        a = e.adapter
        a.card = {"base": {"name": "tiny", "fingerprint": base.fingerprint}}
        refs.append(ws.register(a, name=f"e{i}", task="t", base="tiny").ref)
    info = merge(ws, refs, method, name="m", **kw)
    stored = ws.adapter_bytes(info)
    again = merge_adapters([InMemoryExpert(ws.load_adapter(r), key=ws.resolve(r).content_hash) for r in refs],
                           method, **kw).adapter
    again.card = fmt.load(stored).card
    assert stored == fmt.save(again) and info.mask_hash == again.mask_hash() and info.nnz == again.nnz


def test_merge_memory_follows_the_result_file_not_int64_indices():
    """A packed result holds ~ (2 + value bytes) per entry; the plain one 8 B of int64 index + values."""
    experts = _sparse_experts(9, 4, {"a.weight": (512, 512), "b.weight": (256, 1024)}, 0.02, torch.bfloat16)
    packed = merge_adapters(experts, "uniform-sparse", packed=True).adapter
    held = sum(len(t[2]) for t in packed._tensors.values())
    assert packed.nnz > 10_000 and held == 4 * packed.nnz  # bf16: 2 B of index + 2 B of value, no escapes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite_on_every_bit_pattern(dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    ref = torch.isfinite(bits)
    got = torch.tensor([fmt.all_finite(bits[i:i + 1]) for i in range(bits.numel())])
    assert torch.equal(got, ref) and int((~ref).sum()) > 0
    assert fmt.all_finite(bits[ref]) and not fmt.all_finite(bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite_on_special_values_views_and_graph_tensors(dtype):
    info = torch.finfo(dtype)
    special = [0.0, -0.0, info.max, -info.max, info.tiny, info.tiny / 4, float("nan"), float("inf"), float("-inf")]
    g = torch.Generator().manual_seed(0)
    for v in special:
        for n in (1, 7, 5000):
            t = torch.randn(n, generator=g).to(dtype)
            t[int(torch.randint(n, (1,), generator=g))] = v
            for x in (t, t[::2], t.reshape(1, -1), t.clone().requires_grad_(dtype.is_floating_point)):
                assert fmt.all_finite(x) == bool(torch.isfinite(x.detach()).all()), (v, n)
    assert fmt.all_finite(torch.zeros(0, dtype=dtype))


# -- mask hash, definition 2: from the file's own index bytes (issue 19) ----------------------------------------


def _escaping_adapter(seed: int, dtype: torch.dtype = torch.bfloat16) -> SparseAdapter:
    """Element layout with gaps over 65535 (escapes), an empty parameter and mixed value dtypes."""
    g = torch.Generator().manual_seed(seed)
    far = torch.unique(torch.cat([torch.randint(0, 1000, (40,), generator=g), torch.tensor([70_000, 140_001, 299_999])]))
    near = torch.unique(torch.randint(0, 64 * 64, (200,), generator=g))
    return SparseAdapter({
        "a.weight": SparseParam((300, 1000), far, torch.randn(far.numel(), generator=g).to(dtype)),
        "b.weight": SparseParam((64, 64), near, torch.randn(near.numel(), generator=g)),
        "c.weight": SparseParam((10,), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dtype)),
    }, {"head": torch.randn(3, generator=g)}, {"task": "t"})


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scanned_adapter_reads_what_load_reads(seed, dtype):
    from adapterhub.maskhash import mask_hash_of_file

    a = _escaping_adapter(seed, dtype)
    data = fmt.save(a)
    assert fmt.st_io.parse_header(data).entries.get("param::a.weight::esc") is not None  # escapes are exercised
    s = fmt.load_canonical(data)
    full = fmt.load(data)
    assert isinstance(s, fmt.ScannedAdapter) and s.source_bytes is data
    want = hand_mask_hash(a)
    assert s.mask_hash() == full.mask_hash() == a.mask_hash() == mask_hash_of_file(data) == want
    assert (s.nnz, s.numel, s.density, s.dtype, s.nnz_per_param()) == (
        full.nnz, full.numel, full.density, full.dtype, full.nnz_per_param())
    assert s.canonical_with(a.card) and not s.canonical_with({"task": "other"})
    assert fmt.save(s.load()) == data
    packed = fmt.PackedAdapter(a.card)
    for n in sorted(a.params):
        packed.add(n, a.params[n])
    assert packed.mask_hash() == want


def test_block_layout_hashes_as_its_elements_and_takes_the_full_path():
    from adapterhub.maskhash import mask_hash_of_file

    bm = torch.zeros(8, 8, dtype=torch.bool)
    bm[1, 2] = bm[5, 7] = True
    blk = SparseParam.from_block_mask(torch.randn(64, 64), bm, 8)
    el = SparseParam((64, 64), *blk.flat())
    a, b = SparseAdapter({"w": blk}), SparseAdapter({"w": el})
    data = fmt.save(a)
    assert not isinstance(fmt.load_canonical(data), fmt.ScannedAdapter)
    assert a.mask_hash() == b.mask_hash() == mask_hash_of_file(data) == mask_hash_of_file(fmt.save(b)) == \
        hand_mask_hash(b)


def _mutations(data: bytes) -> list[bytes]:
    """Damaged variants of an adapter file whose header stays valid: a zero gap without an escape, an index
    out of range, a non-finite value, an escape below 65536."""
    h = fmt.st_io.parse_header(data)
    out = []

    def poke(name: str, at: int, raw: bytes) -> None:
        e = h.entries[name]
        b = bytearray(data)
        b[h.data_start + e.begin + at:h.data_start + e.begin + at + len(raw)] = raw
        out.append(bytes(b))

    poke("param::b.weight::idx", 2, b"\0\0")  # a zero gap with no escape value for it
    poke("param::b.weight::idx", 0, b"\xff\xff")  # first index 65534 > 4095
    poke("param::b.weight::val", 4, b"\x00\x00\xc0\x7f")  # a NaN (fp32 values)
    poke("param::a.weight::esc", 0, (1000).to_bytes(8, "little"))  # an escape that is not one
    poke("param::a.weight::esc", 0, (10**12).to_bytes(8, "little"))  # far out of range
    return out


def test_scan_refuses_what_load_refuses_with_the_same_error():
    data = fmt.save(_escaping_adapter(0))
    for bad in _mutations(data):
        with pytest.raises(fmt.FormatError) as full:
            fmt.load(bad)
        with pytest.raises(fmt.FormatError) as scanned:
            fmt.load_canonical(bad)
        assert str(scanned.value) == str(full.value)
    bad_val = _mutations(data)[2]
    assert isinstance(fmt.load_canonical(bad_val, allow_nonfinite=True), fmt.ScannedAdapter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64,
                                   torch.int32])
def test_scanned_extras_are_checked_as_load_checks_them_without_torch_tensors(dtype):
    """The scan reads a dense extra's dtype and shape from the header and checks its values on a view of the bytes
    (no tensor made): the same acceptance and the same refusal, word for word, as the full load."""
    a = _escaping_adapter(1)
    g = torch.Generator().manual_seed(2)
    head = (torch.randn(4, 3, generator=g) * 100).to(dtype)
    a.extras = {"head.w": head, "head.b": torch.zeros(0, dtype=dtype)}
    data = fmt.save(a)
    s = fmt.load_canonical(data)
    assert isinstance(s, fmt.ScannedAdapter) and s.canonical_with(a.card)
    assert s.extras["head.w"] == fmt.ScannedExtra(fmt.st_io.st_name(dtype), (4, 3))
    if not dtype.is_floating_point:
        return
    h = fmt.st_io.parse_header(data)
    e = h.entries["extra::head.w"]
    for bad_value in (float("nan"), float("inf"), float("-inf")):
        b = bytearray(data)
        one = torch.tensor([bad_value], dtype=dtype)
        raw = (one.view(torch.int16) if dtype in (torch.bfloat16, torch.float16) else one).numpy().tobytes()
        at = h.data_start + e.begin + 5 * len(raw)
        b[at:at + len(raw)] = raw
        with pytest.raises(fmt.FormatError) as full:
            fmt.load(bytes(b))
        with pytest.raises(fmt.FormatError) as scanned:
            fmt.load_canonical(bytes(b))
        assert str(scanned.value) == str(full.value) and "NaN or infinity" in str(full.value)
        assert isinstance(fmt.load_canonical(bytes(b), allow_nonfinite=True), fmt.ScannedAdapter)


def test_register_of_a_canonical_file_takes_the_scan(ws, tmp_path, tiny_bert_dir, monkeypatch):
    path = _canonical_file(ws, tmp_path, tiny_bert_dir, dtype=torch.bfloat16)
    monkeypatch.setattr(fmt, "decode_indices", lambda *a: pytest.fail("decoded the indices"))
    info = ws.register(path, name="a", task="t", base="tiny")
    monkeypatch.undo()
    a = fmt.load_file(path)
    assert info.mask_hash == a.mask_hash() == hand_mask_hash(a) and info.nnz == a.nnz
    assert info.nnz_per_param == a.nnz_per_param() and info.dtype == "bf16"
    # a second name for the same bytes: the blob is compared with them, not re-hashed, and stays
    monkeypatch.setattr("adapterhub.store.sha256_file", lambda p: pytest.fail("re-hashed the stored blob"))
    again = ws.register(path, name="b", task="t", base="tiny")
    assert again.content_hash == info.content_hash and again.mask_hash == info.mask_hash


def test_register_heals_a_corrupt_blob_by_comparing_bytes(ws, tmp_path, tiny_bert_dir):
    path = _canonical_file(ws, tmp_path, tiny_bert_dir)
    info = ws.register(path, name="a", task="t", base="tiny")
    blob = ws.store.path(info.content_hash)
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(raw))
    ws.register(path, name="b", task="t", base="tiny")
    assert blob.read_bytes() == path.read_bytes()


def test_migration_0006_recomputes_mask_hashes(tmp_path, tiny_bert_dir):
    """Down to 0005: definition 1 (int64 indices) is recomputed from the blobs; up again: definition 2; a row
    whose blob is gone, or a migration without a blob reader, leaves NULL (unknown), never the other value."""
    import json
    import struct

    from sqlalchemy import text

    from adapterhub.catalog import db
    from adapterhub.workspace import Workspace

    ws = Workspace.open(tmp_path / "h")
    try:
        base = ws.add_base("tiny", str(tiny_bert_dir))
        adapters, infos = [], []
        for seed, block in ((0, None), (1, 4)):
            a = make_adapter(density=0.2, seed=seed, block=block)
            a.card = {"base": {"name": "tiny", "fingerprint": base.fingerprint}}
            adapters.append(a)
            infos.append(ws.register(fmt.save(a), name=f"a{seed}", task="t", base="tiny"))
        gone = ws.register(fmt.save(make_adapter(density=0.1, seed=7)), name="gone", task="t", base="tiny")
        ws.store.delete(gone.content_hash)

        def v1(a: SparseAdapter) -> str:
            h = hashlib.sha256()
            for n in sorted(a.params):
                h.update(n.encode() + b"\0" + json.dumps(list(a.params[n].shape)).encode() + b"\0")
                h.update(b"".join(struct.pack("<q", i) for i in a.params[n].flat()[0].tolist()))
            return h.hexdigest()

        def hashes() -> dict[int, str | None]:
            with ws.engine.connect() as c:
                return dict(c.execute(text("SELECT id, mask_hash FROM adapter_versions")).all())

        assert hashes()[infos[0].id] == hand_mask_hash(adapters[0]) and hashes()[infos[1].id] == \
            hand_mask_hash(adapters[1])
        db.downgrade(ws.engine, "0005", blob_reader=ws.blob_or_none)
        got = hashes()
        assert [got[i.id] for i in infos] == [v1(a) for a in adapters] and got[gone.id] is None
        assert v1(adapters[0]) != hand_mask_hash(adapters[0])
        db.ensure_schema(ws.engine, blob_reader=ws.blob_or_none)
        got = hashes()
        assert [got[i.id] for i in infos] == [hand_mask_hash(a) for a in adapters] and got[gone.id] is None
        db.downgrade(ws.engine, "0005", blob_reader=ws.blob_or_none)
        db.upgrade(ws.engine)  # by hand, without the store: unknown
        assert set(hashes().values()) == {None}
    finally:
        ws.close()

"""Merging in sparse space: agreement with peft.utils.merge_utils on densified tensors, order
invariance, the sparse-uniform properties, lazy file reading, and errors."""
from __future__ import annotations

import itertools

import pytest
import torch
from peft.utils import merge_utils as mu

from adapterhub import format as fmt
from adapterhub.errors import MergeError
from adapterhub.format import SparseAdapter, SparseParam
from adapterhub.merging import (
    METHODS, InMemoryExpert, LazyAdapterFile, get_method, merge_adapters, method_names, param_seed)

SHAPES = {"enc.0.weight": (12, 10), "enc.1.weight": (7, 9), "bias": (13,)}


def make_expert(seed: int, density: float = 0.3, fp: str = "base-fp", dense: bool = False,
                dtype=torch.float32, extras=None, shapes=SHAPES) -> SparseAdapter:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in shapes.items():
        delta = torch.randn(shape, generator=g)
        mask = torch.ones(shape, dtype=torch.bool) if dense else torch.rand(shape, generator=g) < density
        params[name] = SparseParam.from_mask(delta.to(dtype), mask)
    return SparseAdapter(params, extras or {}, {"base": {"name": "b", "fingerprint": fp}, "task": f"t{seed}"})


def dense_of(result_adapter: SparseAdapter, name: str) -> torch.Tensor:
    return result_adapter.params[name].to_dense(torch.float32)


def experts_of(adapters):
    return [InMemoryExpert(a, key=f"k{i:02d}") for i, a in enumerate(adapters)]


def test_registry_lists_all_methods():
    assert set(method_names()) == {"uniform-sparse", "uniform", "weighted", "task-arithmetic", "ties",
                                   "dare-linear", "dare-ties", "breadcrumbs"}
    with pytest.raises(MergeError, match="unknown merge method 'nope'.*uniform-sparse"):
        get_method("nope")


@pytest.mark.parametrize("dense", [False, True])
def test_task_arithmetic_matches_peft(dense):
    ads = [make_expert(s, dense=dense) for s in range(4)]
    w, lam = [0.5, 1.5, -0.25, 2.0], 0.7
    res = merge_adapters(experts_of(ads), "task-arithmetic", weights=w, lam=lam)
    for name in SHAPES:
        want = mu.task_arithmetic([a.params[name].to_dense() for a in ads], torch.tensor([lam * x for x in w]))
        torch.testing.assert_close(dense_of(res.adapter, name), want, rtol=1e-6, atol=1e-7)


def test_ties_matches_peft_on_dense_experts():
    ads = [make_expert(s, dense=True) for s in range(3)]
    w = [1.0, 0.5, 2.0]
    res = merge_adapters(experts_of(ads), "ties", weights=w, density=0.4)
    for name in SHAPES:
        want = mu.ties([a.params[name].to_dense() for a in ads], torch.tensor(w), density=0.4)
        torch.testing.assert_close(dense_of(res.adapter, name), want, rtol=1e-6, atol=1e-7)


def test_ties_matches_peft_on_sparse_experts_with_translated_density():
    # Our density is a fraction of each expert's stored entries; PEFT's of the whole tensor. With equal
    # nnz per expert, PEFT density (k + 0.5) / numel keeps the same k entries.
    shape = (20, 16)
    g = torch.Generator().manual_seed(3)
    ads = []
    nnz = 64
    for s in range(3):
        idx = torch.randperm(320, generator=g)[:nnz]
        ads.append(SparseAdapter({"w": SparseParam.from_flat(shape, idx, torch.randn(nnz, generator=g))}, {},
                                 {"base": {"fingerprint": "x"}}))
    d = 0.25
    k = int(d * nnz)
    res = merge_adapters(experts_of(ads), "ties", density=d)
    want = mu.ties([a.params["w"].to_dense() for a in ads], torch.ones(3), density=(k + 0.5) / 320)
    torch.testing.assert_close(dense_of(res.adapter, "w"), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,peft_fn", [("dare-linear", mu.dare_linear), ("dare-ties", mu.dare_ties)])
def test_dare_matches_peft_with_peft_rng(method, peft_fn):
    ads = [make_expert(s, density=0.5) for s in range(3)]
    exps = experts_of(ads)
    w = [1.0, 0.3, 0.8]
    res = merge_adapters(exps, method, weights=w, density=0.6, seed=11, rng="peft")
    for name, shape in SHAPES.items():
        torch.manual_seed(param_seed(11, name))  # peft draws from the global generator, expert by expert
        want = peft_fn([a.params[name].to_dense() for a in ads], torch.tensor(w), density=0.6)
        torch.testing.assert_close(dense_of(res.adapter, name), want, rtol=1e-6, atol=1e-7)


def test_dare_sparse_rng_keeps_about_density_and_rescales():
    shapes = {"w": (200, 100)}
    ads = [make_expert(s, density=0.5, shapes=shapes) for s in range(2)]
    res = merge_adapters(experts_of(ads), "dare-linear", density=0.3, seed=5)
    # Disjoint-by-construction check on one expert at a time: kept values are v / density.
    one = merge_adapters([InMemoryExpert(ads[0], key="a"), InMemoryExpert(make_expert(99, density=0.0, shapes=shapes),
                                                                          key="b")], "dare-linear", density=0.3, seed=5)
    p = one.adapter.params["w"]
    src = ads[0].params["w"].to_dense().reshape(-1)
    torch.testing.assert_close(p.values, src[p.indices] / 0.3)
    frac = p.nnz / ads[0].params["w"].nnz
    assert 0.25 < frac < 0.35
    again = merge_adapters(experts_of(ads), "dare-linear", density=0.3, seed=5)
    assert torch.equal(again.adapter.params["w"].values, res.adapter.params["w"].values)
    other = merge_adapters(experts_of(ads), "dare-linear", density=0.3, seed=6)
    assert not torch.equal(other.adapter.params["w"].indices, res.adapter.params["w"].indices)


def test_uniform_sparse_on_disjoint_masks_is_the_plain_sum():
    shape = (30, 20)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    ads = []
    for i in range(4):
        idx = perm[i * 100:(i + 1) * 100]
        ads.append(SparseAdapter({"w": SparseParam.from_flat(shape, idx, torch.randn(100))}, {}, {}))
    res = merge_adapters(experts_of(ads), "uniform-sparse")
    plain = sum(a.params["w"].to_dense() for a in ads)
    assert torch.equal(dense_of(res.adapter, "w"), plain)


def test_uniform_sparse_averages_over_experts_containing_the_entry():
    shape = (4,)
    a = SparseAdapter({"w": SparseParam.from_flat(shape, torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))})
    b = SparseAdapter({"w": SparseParam.from_flat(shape, torch.tensor([1, 3]), torch.tensor([6.0, 8.0]))})
    res = merge_adapters(experts_of([a, b]), "uniform-sparse")
    assert res.adapter.params["w"].indices.tolist() == [0, 1, 3]
    assert res.adapter.params["w"].values.tolist() == [2.0, 5.0, 8.0]
    uni = merge_adapters(experts_of([a, b]), "uniform")
    assert uni.adapter.params["w"].values.tolist() == [1.0, 5.0, 4.0]
    wt = merge_adapters(experts_of([a, b]), "weighted", weights=[3.0, 1.0])
    assert wt.adapter.params["w"].values.tolist() == [1.5, (12 + 6) / 4, 2.0]


@pytest.mark.parametrize("method,kw", [("uniform-sparse", {}), ("uniform", {}), ("weighted", {"weights": [1, 2, 3]}),
                                       ("task-arithmetic", {"lam": 0.3}), ("ties", {"density": 0.5}),
                                       ("dare-linear", {"density": 0.5, "seed": 3}),
                                       ("dare-ties", {"density": 0.5, "seed": 3}), ("breadcrumbs", {})])
def test_merge_order_does_not_change_the_result(method, kw):
    ads = [make_expert(s) for s in range(3)]
    keys = ["ka", "kb", "kc"]
    base = None
    for perm in itertools.permutations(range(3)):
        exps = [InMemoryExpert(ads[i], key=keys[i]) for i in perm]
        kw2 = dict(kw)
        if "weights" in kw:
            kw2["weights"] = [kw["weights"][i] for i in perm]
        merged = merge_adapters(exps, method, **kw2).adapter
        out = fmt.save(SparseAdapter(merged.params, {}, {}))
        base = base or out
        assert out == base, perm


def test_breadcrumbs_drops_outliers_and_small_entries():
    vals = torch.arange(1, 101, dtype=torch.float32)
    a = SparseAdapter({"w": SparseParam.from_flat((100,), torch.arange(100), vals)})
    b = SparseAdapter({"w": SparseParam.from_flat((100,), torch.arange(100), torch.zeros(100))})
    res = merge_adapters(experts_of([a, b]), "breadcrumbs", density=0.5, gamma=0.1)
    d = dense_of(res.adapter, "w")
    assert d[90:].abs().sum() == 0  # top 10% outliers gone
    assert torch.equal(d[40:90], vals[40:90])  # next 50% kept
    assert d[:40].abs().sum() == 0


def test_extras_are_carried_and_dtype_promoted():
    h1 = {"heads.a.weight": torch.ones(2, 3)}
    h2 = {"heads.b.weight": torch.zeros(4, 3)}
    a = make_expert(1, extras=h1, dtype=torch.bfloat16)
    b = make_expert(2, extras=h2, dtype=torch.float16)
    res = merge_adapters(experts_of([a, b]), "uniform-sparse")
    assert set(res.adapter.extras) == {"heads.a.weight", "heads.b.weight"}
    assert res.adapter.params["bias"].values.dtype == torch.float32
    fmt.load(fmt.save(res.adapter))  # valid file


def test_refuses_different_bases_bad_options():
    a, b = make_expert(1, fp="one"), make_expert(2, fp="two")
    with pytest.raises(MergeError, match="different bases"):
        merge_adapters(experts_of([a, b]), "uniform-sparse")
    c = make_expert(3)
    with pytest.raises(MergeError, match="needs --density"):
        merge_adapters(experts_of([c, make_expert(4)]), "dare-linear")
    with pytest.raises(MergeError, match="does not take --density"):
        merge_adapters(experts_of([c, make_expert(4)]), "uniform", density=0.5)
    with pytest.raises(MergeError, match="2 weights for 3"):
        merge_adapters(experts_of([c, make_expert(4), make_expert(5)]), "weighted", weights=[1, 2])
    with pytest.raises(MergeError, match="at least two"):
        merge_adapters(experts_of([c]), "uniform")
    with pytest.raises(MergeError, match="density must be"):
        merge_adapters(experts_of([c, make_expert(4)]), "ties", density=1.5)


def test_lazy_file_source_equals_in_memory(tmp_path):
    ads = [make_expert(s) for s in range(3)]
    files = []
    for i, a in enumerate(ads):
        p = tmp_path / f"{i}.safetensors"
        h = fmt.save_file(a, p)
        files.append(LazyAdapterFile(p, expected_sha256=h))
    lazy = merge_adapters(files, "ties", density=0.5)
    mem = merge_adapters([InMemoryExpert(a) for a in ads], "ties", density=0.5)
    assert fmt.save(lazy.adapter) == fmt.save(mem.adapter)
    for f in files:
        f.close()
    p = tmp_path / "0.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(Exception, match="hash mismatch"):
        LazyAdapterFile(p, expected_sha256=fmt.sha256_hex(fmt.save(ads[0])))


def test_all_methods_have_help_text():
    for m in METHODS.values():
        assert m.description


def test_workspace_merge_registers_lineage_and_ignores_order(ws, tiny_bert_dir):
    from adapterhub.merging import merge
    from adapterhub.models import tensor_shapes

    ws.add_base("tiny", str(tiny_bert_dir))
    shapes = tensor_shapes(tiny_bert_dir)
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight"]
    refs = []
    for i in range(3):
        ad = make_expert(i, shapes={n: shapes[n] for n in names},
                         extras={f"heads.t{i}.weight": torch.full((2, 32), float(i))})
        ad.card.pop("base")
        refs.append(ws.register(ad, name=f"e{i}", task=f"t{i}", base="tiny").ref)
    one = merge(ws, refs, "dare-ties", density=0.5, seed=3, weights=[1.0, 2.0, 3.0], name="m1")
    two = merge(ws, refs[::-1], "dare-ties", density=0.5, seed=3, weights=[3.0, 2.0, 1.0], name="m2")
    assert one.kind == "merge" and one.content_hash != ""
    a1, a2 = ws.load_adapter(one.ref), ws.load_adapter(two.ref)
    for n in names:
        assert torch.equal(a1.params[n].indices, a2.params[n].indices)
        assert torch.equal(a1.params[n].values, a2.params[n].values)
    assert set(a1.extras) == {"heads.t0.weight", "heads.t1.weight", "heads.t2.weight"}
    edges = ws.parents(one.ref)
    assert {(e["parent"], e["weight"]) for e in edges} == {(refs[0], 1.0), (refs[1], 2.0), (refs[2], 3.0)}
    assert all(e["relation"] == "merged_from" and e["params"] == {"method": "dare-ties", "density": 0.5, "seed": 3,
                                                                   "lam": 1.0, "rng": "sparse"} for e in edges)
    with pytest.raises(Exception, match="unknown adapter"):
        merge(ws, [refs[0], "ghost"], "uniform", name="m3")


def test_block_layout_experts_merge_like_their_element_form():
    g = torch.Generator().manual_seed(4)
    shape = (8, 12)
    blocks, elems = [], []
    for _ in range(3):
        delta = torch.randn(shape, generator=g)
        bm = torch.rand(2, 3, generator=g) < 0.5
        bp = SparseParam.from_block_mask(delta, bm, 4)
        blocks.append(SparseAdapter({"w": bp}))
        idx, vals = bp.flat()
        elems.append(SparseAdapter({"w": SparseParam(shape, idx, vals)}))
    for method, kw in [("uniform-sparse", {}), ("ties", {"density": 0.5})]:
        a = merge_adapters(experts_of(blocks), method, **kw).adapter.params["w"]
        b = merge_adapters(experts_of(elems), method, **kw).adapter.params["w"]
        assert a.block_size is None and torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)

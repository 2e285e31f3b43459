"""Merging in sparse space: agreement with peft.utils.merge_utils on densified tensors, order
invariance, the sparse-uniform properties, lazy file reading, and errors."""
from __future__ import annotations

import hashlib
import itertools

import pytest
import torch
from peft.utils import merge_utils as mu

from adapterhub import format as fmt
from adapterhub.errors import MergeError
from adapterhub.format import SparseAdapter, SparseParam
from adapterhub.merging import (
    METHODS,
    GeneralizedTaskArithmeticMerge,
    InMemoryExpert,
    LazyAdapterFile,
    MergeMethod,
    Sparsification,
    get_method,
    merge_adapters,
    method_names,
    param_seed,
)
from adapterhub.params import ParamDef

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
    for _ in range(3):
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
    for name in SHAPES:
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
    with pytest.raises(MergeError, match="needs density"):
        merge_adapters(experts_of([c, make_expert(4)]), "dare-linear")
    with pytest.raises(MergeError, match="does not take density"):
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
    from adapterhub.bases.sources import tensor_shapes
    from adapterhub.merging import merge

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


# -- pinned results: the sha256 of each method's output on a fixed input, computed with the code
# before the methods became data (issue 13); a refactor must not move a single bit.

def _pin_experts():
    out = []
    for s, dt in enumerate([torch.float32, torch.float32, torch.bfloat16]):
        g = torch.Generator().manual_seed(100 + s)
        params = {}
        for name, shape in SHAPES.items():
            delta = torch.randn(shape, generator=g)
            mask = torch.rand(shape, generator=g) < 0.6
            params[name] = SparseParam.from_mask(delta.to(dt), mask)
        extras = {"heads.t.weight": torch.full((2, 3), float(s))}
        out.append(InMemoryExpert(SparseAdapter(params, extras, {"base": {"name": "b", "fingerprint": "fp"},
                                                                  "task": f"t{s}"}), key=f"pin{s}"))
    return out


PINNED = [
    ("uniform-sparse", {}, "9e83311ea70dee2bcbb459191af3057d159f04f3fcfedc1622cf81a6f5487e43"),
    ("uniform-sparse", {"weights": [1.0, 2.0, 0.5], "lam": 0.8},
     "162baef68ef09e6b3b9d12824a8d84f40d06580da30a309f9779f68164e9bb7e"),
    ("uniform", {}, "66c9e9cbedf169d90a2071172dd6f3fa292106e395201e932e643818355a480c"),
    ("uniform", {"lam": 1.5}, "e16a2e6ea33e33bf05aab01e985f038b87f241544cd8b83430b29a09bde4184a"),
    ("weighted", {"weights": [1.0, 2.0, 0.5]}, "8d16afe821777d1d67422b26df348c5ed526b9bf578893ebcf3b04afa706964d"),
    ("weighted", {"weights": [1.0, -2.0, 0.5], "lam": 0.3},
     "9fbfab59c3bae7438b76183525d27836e25971ee50544f85f71e3cbae111cb20"),
    ("task-arithmetic", {}, "04643c6f623a7e720c83ceb2ccf9a47e0d893953c1d981fcf61eb1b370bfa523"),
    ("task-arithmetic", {"weights": [0.5, -1.25, 2.0], "lam": 0.7},
     "1745a6048e8a744ec03772ee7d67077d1f7dcf1f1a65bb6e60a13fcbeef66125"),
    ("ties", {}, "585cb1e20f6c208f0d0d4783522df99ca0b67ce9c8a5d3c6c15461612b160a03"),
    ("ties", {"weights": [1.0, 0.5, 2.0], "density": 0.6, "lam": 0.9},
     "6510c8854612fc98577fefc6d491f25672ff94e99a302e8ca7a45f8a46f5041c"),
    ("dare-linear", {"density": 0.6}, "5a4da986c6e9809f61f4f55fb5878b5d9fc4ab6759e7f4d194a21c16ff1e823d"),
    ("dare-linear", {"weights": [1.0, 0.3, 0.8], "density": 0.5, "seed": 7, "lam": 1.2},
     "00c9a44e72bbdfe7a0d06adaf52778152f31ecb4ed9008a657ad9796ab476abc"),
    ("dare-linear", {"density": 0.6, "seed": 3, "rng": "peft"},
     "a3d65a2150469bfee5d86779ff511f7aac9780b8b1bf67e6b0027fea8394b085"),
    ("dare-ties", {"density": 0.6}, "3b2b3aecc52f46169057da45ef60c099aa398435e90e68d249d4d5d73ce5a021"),
    ("dare-ties", {"weights": [1.0, 0.3, 0.8], "density": 0.5, "seed": 7},
     "d22829f30660eaf0cf1d8a991cdf39bd1fb31b23f316927050eb7aacfd6b6f97"),
    ("dare-ties", {"density": 0.7, "seed": 2, "rng": "peft", "lam": 0.5},
     "3a49c26feff3bbd546079ad0cd14e5b1046305ad8ec0af95521f73ee0c2cefbc"),
    ("breadcrumbs", {}, "b6566ca9ea430c29ce1fc0d86aad3ab7f443f81ce37743f1a0ec72b33b70c124"),
    ("breadcrumbs", {"weights": [2.0, 1.0, 0.5], "density": 0.5, "gamma": 0.1, "lam": 0.6},
     "47e14da07cf28fabe5e5eea7a8e1b5b0bdc16501080d631ea391de993bb53a85"),
]


@pytest.mark.parametrize("method,kw,sha", PINNED, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(PINNED)])
def test_pinned_output_bytes(method, kw, sha):
    assert hashlib.sha256(fmt.save(merge_adapters(_pin_experts(), method, **kw).adapter)).hexdigest() == sha


def test_pins_cover_every_method():
    assert {m for m, _, _ in PINNED} == set(METHODS)


# -- methods are data: one class, several ids; the driver only calls hooks

def test_task_arithmetic_family_is_one_class_with_settings():
    family = {n: m for n, m in METHODS.items() if isinstance(m, GeneralizedTaskArithmeticMerge)}
    assert {n: (m.sparsification, m.consensus) for n, m in family.items()} == {
        "task-arithmetic": (Sparsification.NONE, False), "ties": (Sparsification.MAGNITUDE, True),
        "dare-linear": (Sparsification.RANDOM, False), "dare-ties": (Sparsification.RANDOM, True),
        "breadcrumbs": (Sparsification.BREADCRUMBS, False)}
    assert type(METHODS["uniform"]) is type(METHODS["weighted"])


def test_driver_runs_a_method_it_has_never_heard_of(monkeypatch):
    # A new method plugs in through the registry and its hooks alone.
    class MaxMerge(MergeMethod):
        def prepare(self, weights, opts):
            if len(set(weights)) > 1:
                raise MergeError("max takes no per-expert weights")
            return float(opts["lam"])

        def merge_param(self, name, shape, entries, ctx):
            dense = torch.full((int(torch.tensor(shape).prod()),), -float("inf"))
            for e in entries:
                dense[e.idx] = torch.maximum(dense[e.idx], e.vals)
            idx = torch.isfinite(dense).nonzero().view(-1)
            return idx, dense[idx] * ctx

    m = MaxMerge(name="max", description="entrywise max", params=(ParamDef("lam", default=1.0, label="lambda",
                                                                            flag="--lambda"),))
    monkeypatch.setitem(METHODS, "max", m)
    a = SparseAdapter({"w": SparseParam.from_flat((4,), torch.tensor([0, 1]), torch.tensor([2.0, 4.0]))})
    b = SparseAdapter({"w": SparseParam.from_flat((4,), torch.tensor([1, 3]), torch.tensor([6.0, 8.0]))})
    res = merge_adapters(experts_of([a, b]), "max", lam=0.5)
    assert res.adapter.params["w"].values.tolist() == [1.0, 3.0, 4.0] and res.options == {"lam": 0.5}
    with pytest.raises(MergeError, match="does not take density"):
        merge_adapters(experts_of([a, b]), "max", density=0.5)


@pytest.mark.parametrize("method,kw,msg", [
    ("ties", {"density": 0.0}, r"^density must be in \(0, 1\], got 0.0$"),
    ("ties", {"density": "0.5"}, r"^density must be a number, got '0.5'$"),
    ("breadcrumbs", {"gamma": 1.0}, r"^gamma must be in \[0, 1\), got 1.0$"),
    ("task-arithmetic", {"lam": float("inf")}, r"^lambda must be finite, got inf$"),
    ("dare-linear", {"density": 0.5, "seed": 1.5}, r"^seed must be an integer, got 1.5$"),
    ("dare-linear", {"density": 0.5, "seed": True}, r"^seed must be an integer, got True$"),
    ("dare-ties", {"density": 0.5, "rng": "numpy"}, r"^unknown rng 'numpy'; choose one of sparse, peft$"),
    ("weighted", {"weights": [1.0, float("nan")]}, r"^weights must be finite numbers$"),
    ("weighted", {"weights": [1.0, -1.0]}, r"^weights sum to zero$"),
    ("uniform-sparse", {"weights": [1.0, 0.0]}, r"^uniform-sparse weights must be positive$"),
    ("weighted", {}, r"^method 'weighted' needs weights$"),
    ("uniform", {"weights": [1.0, 2.0]}, r"^method 'uniform' does not take weights \(it takes: lam\)$"),
])
def test_each_option_checks_itself_in_one_line(method, kw, msg):
    with pytest.raises(MergeError, match=msg):
        merge_adapters(experts_of([make_expert(1), make_expert(2)]), method, **kw)

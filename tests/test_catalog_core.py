"""The catalog through the Workspace API, on SQLite and on PostgreSQL (``catalog_url`` is parametrized)."""
from __future__ import annotations

import threading

import pytest
import torch

from adapterhub import format as fmt
from adapterhub.catalog.records import Parent
from adapterhub.errors import AdapterHubError, BaseModelError, NameError_, RefError
from adapterhub.workspace import Workspace
from catalog_util import BERT_TARGETS, home_snapshot, make_adapter


@pytest.fixture
def cws(home, catalog_url, tiny_bert_dir):
    w = Workspace.open(home, catalog_url)
    w.add_base("tiny", str(tiny_bert_dir))
    yield w
    w.close()


def test_register_resolve_and_versions(cws):
    v1 = cws.register(make_adapter(seed=1), name="rt", task="sentiment", base="tiny",
                      training_config={"lr": 1e-3, "nested": {"a": [1, 2]}}, metrics={"acc": 0.5})
    v2 = cws.register(make_adapter(seed=2), name="rt", task="sentiment", base="tiny")
    assert (v1.ref, v2.ref) == ("rt@1", "rt@2") and v1.created and v2.created
    again = cws.register(make_adapter(seed=2), name="rt", task="sentiment", base="tiny")
    assert again.ref == "rt@2" and again.created is False
    assert cws.resolve("rt").ref == "rt@2"
    r1 = cws.resolve("rt@1")
    assert r1.training_config == {"lr": 1e-3, "nested": {"a": [1, 2]}} and r1.metrics == {"acc": 0.5}
    assert r1.nnz == make_adapter(seed=1).nnz and r1.dtype == "fp32" and r1.granularity == "element"
    assert r1.target_modules == sorted(BERT_TARGETS) and r1.mask_method == "random"
    assert r1.base_fingerprint == cws.get_base("tiny").fingerprint
    assert cws.resolve("sha256:" + r1.content_hash[:8]).ref == "rt@1"
    data = cws.store.get_bytes(r1.content_hash)
    assert fmt.sha256_hex(data) == r1.content_hash
    loaded = cws.load_adapter("rt@1")
    for k, p in make_adapter(seed=1).params.items():
        assert torch.equal(loaded.params[k].indices, p.indices) and torch.equal(loaded.params[k].values, p.values)
    assert loaded.card["base"]["fingerprint"] == r1.base_fingerprint
    m = cws.update_metrics("rt@1", {"f1": 0.7})
    assert m.metrics == {"acc": 0.5, "f1": 0.7}
    for bad in ("rt@3", "nope", "sha256:00000000", "rt@nope"):
        with pytest.raises(RefError):
            cws.resolve(bad)


def test_block_and_bf16_metadata(cws):
    v = cws.register(make_adapter(block=4, dtype=torch.bfloat16, density=0.25), name="blk", task="t", base="tiny")
    assert v.granularity == "block" and v.block_size == 4 and v.dtype == "bf16"
    assert v.nnz == sum(p.nnz for p in make_adapter(block=4, density=0.25).params.values())


def test_tags(cws):
    for s in (1, 2):
        cws.register(make_adapter(seed=s), name="rt", task="t", base="tiny")
    cws.tag("rt@1", "prod")
    assert cws.resolve("rt@prod").ref == "rt@1"
    cws.tag("rt@2", "prod")
    assert cws.resolve("rt@prod").ref == "rt@2" and cws.resolve("rt@2").tags == ["prod"]
    cws.untag("rt", "prod")
    with pytest.raises(RefError):
        cws.resolve("rt@prod")
    with pytest.raises(NameError_):
        cws.tag("rt@1", "42")
    with pytest.raises(NameError_):
        cws.tag("rt@1", "../../x")


def test_list_and_log(cws):
    cws.register(make_adapter(seed=1), name="a", task="x", base="tiny")
    cws.register(make_adapter(seed=2), name="b", task="y", base="tiny", kind="merge")
    cws.register(make_adapter(seed=3), name="a", task="x", base="tiny")
    assert [v.ref for v in cws.list_versions()] == ["a@2", "b@1", "a@1"]
    assert [v.ref for v in cws.list_versions(task="x")] == ["a@2", "a@1"]
    assert [v.ref for v in cws.list_versions(kind="merge")] == ["b@1"]
    assert [v.ref for v in cws.list_versions(base="tiny", limit=1)] == ["a@2"]
    assert cws.list_versions(base="other") == []
    assert [v.ref for v in cws.log("a")] == ["a@1", "a@2"]


def test_lineage_chain_and_diamond(cws):
    cws.register(make_adapter(seed=0, density=0.01), name="c0", task="t", base="tiny")
    for i in range(1, 101):
        cws.register(make_adapter(seed=i, density=0.01), name=f"c{i}", task="t", base="tiny",
                     parents=[Parent(f"c{i - 1}")])
    anc = cws.lineage("c100")
    assert len(anc) == 100 and anc[0]["depth"] == 1 and anc[-1] == {
        "child": "c1@1", "parent": "c0@1", "relation": "finetuned_from", "weight": None, "params": None, "depth": 100}
    desc = cws.lineage("c0", direction="descendants")
    assert len(desc) == 100 and {e["child"] for e in desc} == {f"c{i}@1" for i in range(1, 101)}
    # diamond: m merges two children of one root; every edge appears once, at its smallest depth
    cws.register(make_adapter(seed=500), name="left", task="t", base="tiny", parents=[Parent("c0")])
    cws.register(make_adapter(seed=501), name="right", task="t", base="tiny", parents=[Parent("c0")])
    cws.register(make_adapter(seed=502), name="m", task="t", base="tiny", kind="merge",
                 parents=[Parent("left", "merged_from", 0.25, {"method": "ties"}), Parent("right", "merged_from", 0.75)])
    edges = cws.lineage("m")
    assert sorted((e["child"], e["parent"], e["depth"]) for e in edges) == [
        ("left@1", "c0@1", 2), ("m@1", "left@1", 1), ("m@1", "right@1", 1), ("right@1", "c0@1", 2)]
    w = {e["parent"]: (e["weight"], e["params"]) for e in edges if e["child"] == "m@1"}
    assert w == {"left@1": (0.25, {"method": "ties"}), "right@1": (0.75, None)}
    assert [e["parent"] for e in cws.parents("m")] == ["left@1", "right@1"]


def test_imported_from_provenance(cws):
    v = cws.register(make_adapter(), name="imp", task="t", base="tiny",
                     parents=[Parent(None, "imported_from", params={"format": "peft-shira", "path": "x"})])
    (e,) = cws.lineage(v.ref)
    assert e["parent"] is None and e["relation"] == "imported_from" and e["params"]["format"] == "peft-shira"


@pytest.mark.parametrize("case", ["unknown-parent", "kind-conflict", "base-conflict", "fingerprint", "shape",
                                  "not-in-base", "bad-name", "escape-name", "long-name", "bad-relation",
                                  "bad-kind", "unknown-base", "bad-task"])
def test_refused_registration_changes_nothing(case, cws, home, catalog_url, tiny_llama_dir):
    cws.register(make_adapter(seed=1), name="rt", task="t", base="tiny")
    cws.add_base("other", str(tiny_llama_dir))
    before = home_snapshot(home, catalog_url)
    ad = make_adapter(seed=9)
    kw = dict(name="rt", task="t", base="tiny")
    if case == "unknown-parent":
        kw["parents"] = [Parent("ghost@1")]
    elif case == "kind-conflict":
        kw["kind"] = "merge"
    elif case == "base-conflict":
        kw["base"] = "other"
        ad = make_adapter({"model.layers.0.self_attn.q_proj.weight": (32, 32)}, seed=9)
    elif case == "fingerprint":
        ad.card["base"] = {"name": "tiny", "fingerprint": "f" * 64}
    elif case == "shape":
        ad = make_adapter({"encoder.layer.0.attention.self.query.weight": (16, 32)})
    elif case == "not-in-base":
        ad = make_adapter({"encoder.layer.7.x.weight": (32, 32)})
    elif case == "bad-name":
        kw["name"] = "a/b"
    elif case == "escape-name":
        kw["name"] = ".."
    elif case == "long-name":
        kw["name"] = "n" * 101
    elif case == "bad-relation":
        kw["parents"] = [Parent("rt@1", "cousin_of")]
    elif case == "bad-kind":
        kw["kind"] = "weird"
    elif case == "unknown-base":
        kw["base"] = "nope"
    elif case == "bad-task":
        kw["task"] = "a\nb"
    with pytest.raises(AdapterHubError) as ei:
        cws.register(ad, **kw)
    assert "\n" not in str(ei.value)
    if case in ("shape", "not-in-base"):
        assert isinstance(ei.value, BaseModelError) and "encoder.layer." in str(ei.value)
    assert home_snapshot(home, catalog_url) == before


def test_names_never_escape_home(cws, home):
    from adapterhub.catalog.names import validate_name

    for bad in ("../x", "a/b", "a\\b", "..", ".hidden", "x" * 101, "", "a\0b", "a@b", "/abs"):
        with pytest.raises(NameError_):
            validate_name(bad)
    assert validate_name("rt-sentiment_v1.2") == "rt-sentiment_v1.2"
    with pytest.raises(AdapterHubError):
        cws.add_base("../../escape", "minilm")
    assert not (home.parent / "escape").exists()


def test_concurrent_registration_numbers_are_unique(cws, home, catalog_url):
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with Workspace.open(home, catalog_url) as w:
                for j in range(3):
                    w.register(make_adapter(seed=100 + 10 * k + j, density=0.01), name="conc", task="t", base="tiny")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(v.number for v in cws.log("conc")) == list(range(1, 13))


def test_verify_and_gc(cws):
    v = cws.register(make_adapter(), name="a", task="t", base="tiny")
    orphan = cws.store.put_bytes(b"orphan")
    res = cws.verify()
    assert res["checked"] == 1 and res["problems"] == [] and res["orphans"] == [orphan]
    assert cws.gc().removed == [orphan]
    cws.store.path(v.content_hash).write_bytes(b"bad")
    assert cws.verify(["a"])["problems"][0].startswith("a@1: ")
    with pytest.raises(AdapterHubError, match="corrupt"):
        cws.load_adapter("a")

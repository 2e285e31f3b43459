"""Smoke test of studies/merge_study.py on a tiny random BERT: 2 built-in tasks, 4 expert
types, a few steps. Checks the report (JSON, Markdown, PNGs), the caching, that the study's
evaluator agrees with adapterhub.evaluation.scoring.evaluate, that LoRA ΔW extraction reproduces the
PEFT model, and that the dense baselines' merges agree with adapterhub's sparse-space merge."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sms-spam", "rt-sentiment")


def _load_study():
    spec = importlib.util.spec_from_file_location("merge_study", ROOT / "studies" / "merge_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["merge_study"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ms():
    return _load_study()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random BERT and Llama folders with a real (small) tokenizer (test_training_util)."""
    from test_training_util import tiny_model

    root = tmp_path_factory.mktemp("ms_tiny")
    return {"bert": tiny_model("bert", root / "bert"), "llama": tiny_model("llama", root / "llama")}


def _is_count_over(acc: float, n: int) -> bool:
    """True when ``acc`` is exactly ``correct / n`` for a whole number of correct answers 0..n."""
    return any(acc == c / n for c in range(n + 1))


def test_normalised_and_summary_by_hand(ms):
    # merged / single per task, averaged: (0.5/1.0 + 0.3/0.6) / 2 = 0.5
    assert ms.normalised({"a": 0.5, "b": 0.3}, {"a": 1.0, "b": 0.6}) == pytest.approx(0.5)
    # a single-expert accuracy of 0 counts as 1 whatever the merge scored: (0.2/0.4 + 1) / 2 = 0.75
    assert ms.normalised({"a": 0.2, "b": 0.1}, {"a": 0.4, "b": 0.0}) == pytest.approx(0.75)
    single = {"element": {"a": 0.8, "b": 0.6}, "full": {"a": 0.9, "b": 0.9}}
    head_only = {"element": {"a": 0.5, "b": 0.5}, "full": {"a": 0.5, "b": 0.5}}
    merged = {"element": {"average": {"a": 0.4, "b": 0.6}, "task-arithmetic": {"a": 0.8, "b": 0.3},
                          "ties": {"a": 0.8, "b": 0.6}},
              "full": {"average": {"a": 0.9, "b": 0.45}, "task-arithmetic": {"a": 0.9, "b": 0.9},
                       "ties": {"a": 0.45, "b": 0.45}}}
    res = {"config": {"types": ["element", "full"]}, "single": single, "head_only": head_only,
           "merged_all": merged, "curve": {}}
    s = ms.summary(res)
    # element: average (0.5 + 1) / 2, task-arithmetic (1 + 0.5) / 2, ties (1 + 1) / 2
    # full:    average (1 + 0.5) / 2,  task-arithmetic (1 + 1) / 2,  ties (0.5 + 0.5) / 2
    want = {"element": {"average": 0.75, "task-arithmetic": 0.75, "ties": 1.0},
            "full": {"average": 0.75, "task-arithmetic": 1.0, "ties": 0.5}}
    assert s["normalised_all"] == {k: {m: pytest.approx(v) for m, v in d.items()} for k, d in want.items()}
    assert s["mean_all"]["element"] == pytest.approx({"average": 0.5, "task-arithmetic": 0.55, "ties": 0.7})
    # retained gain: sum(merged - head_only) / sum(single - head_only); element gain 0.4, full gain 0.8
    assert s["retained_gain"]["element"] == pytest.approx({"average": 0.0, "task-arithmetic": 0.25, "ties": 1.0})
    assert s["retained_gain"]["full"] == pytest.approx({"average": 0.4375, "task-arithmetic": 1.0, "ties": -0.125})
    assert [(v["method"], v["agrees"]) for v in s["verdicts"]] == [
        ("average", False), ("task-arithmetic", False), ("ties", True)]
    assert s["single_mean"] == pytest.approx({"element": 0.7, "full": 0.9})


def _args(base: Path, tmp: Path) -> list[str]:
    return ["--base", str(base), "--tasks", ",".join(TASKS), "--steps", "4", "--batch-size", "4",
            "--max-length", "24", "--eval-examples", "12", "--subsets", "1", "--lora-r", "4",
            "--curve-methods", "average,ties", "--work", str(tmp / "work"), "--out-md", str(tmp / "out" / "ms.md"),
            "--out-json", str(tmp / "out" / "ms.json"), "--img-dir", str(tmp / "img"), "--threads", "1"]


@pytest.mark.timeout(120)
def test_study_end_to_end_and_cache(ms, tiny, tmp_path, capsys):
    args = _args(tiny["bert"], tmp_path)
    assert ms.main(args) == 0
    doc = json.loads((tmp_path / "out" / "ms.json").read_text())
    types = list(ms.EXPERT_TYPES)
    assert doc["config"]["types"] == types and doc["config"]["tasks"] == list(TASKS)
    for k in types:
        assert set(doc["single"][k]) == set(TASKS)
        assert set(doc["head_only"][k]) == set(TASKS)
        for m in ms.MERGE_METHODS:
            accs = doc["merged_all"][k][m]
            # each accuracy is a count of correct answers over the 12 evaluated examples
            assert set(accs) == set(TASKS) and all(_is_count_over(a, 12) for a in accs.values()), accs
        # the report's summary is summary() of the stored figures (summary() itself: hand-checked in
        # test_normalised_and_summary_by_hand)
        assert doc["summary"] == json.loads(json.dumps(ms.summary(doc)))
        # 2 tasks: the curve has one point (size 2 = all tasks), equal to the all-task merge
        for m in ("average", "ties"):
            (pt,) = doc["curve"][k][m]["2"]
            assert pt["accuracy"] == doc["merged_all"][k][m]
    # sparse experts are sparse, dense ones dense, LoRA counts A and B
    sizes = doc["sizes"]
    assert sizes["element"]["nnz"] < sizes["element"]["numel"] and sizes["block"]["nnz"] < sizes["block"]["numel"]
    assert sizes["full"]["nnz"] == sizes["full"]["numel"] == sizes["lora"]["nnz"]
    assert 0 < sizes["lora"]["trainable"] < sizes["lora"]["numel"]
    assert len(doc["summary"]["verdicts"]) == len(ms.MERGE_METHODS)
    md = (tmp_path / "out" / "ms.md").read_text()
    assert "### Accuracy per task" in md and "### Against the paper" in md and "normalised" in md
    for t in TASKS:
        assert t in md
    for name in ("merge_study_curve.png", "merge_study_methods.png"):
        assert (tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"img/{name}" in md
    out = capsys.readouterr().out
    assert "best sparse / best dense" in out

    # re-run: every expert and evaluation comes from the cache, the numbers are identical
    experts = sorted((tmp_path / "work" / "experts").glob("*.safetensors"))
    assert len(experts) == len(types) * len(TASKS)
    mtimes = [p.stat().st_mtime_ns for p in experts]
    assert ms.main(args) == 0
    doc2 = json.loads((tmp_path / "out" / "ms.json").read_text())
    assert [p.stat().st_mtime_ns for p in experts] == mtimes
    for key in ("single", "head_only", "merged_all", "curve"):
        assert doc2[key] == doc[key]
    # --replot redraws from the JSON without any model
    md = (tmp_path / "out" / "ms.md").read_text()
    (tmp_path / "out" / "ms.md").unlink()
    assert ms.main(args + ["--replot"]) == 0
    assert (tmp_path / "out" / "ms.md").read_text() == md


def test_evaluator_matches_adapterhub_evaluate(ms, tiny, tmp_path, ws):
    tiny_bert_dir = tiny["bert"]
    from adapterhub.evaluation import evaluate

    cfg = ms.StudyConfig(base=str(tiny_bert_dir), tasks=["sms-spam", "rt-sentiment"], types=["element"], steps=4,
                         batch_size=4, max_length=24, eval_examples=40)
    study = ms.Study(cfg, tmp_path / "w")
    study.train_all()
    e = study.experts["element"]["sms-spam"]
    acc = study.single("element")["sms-spam"]
    ws.add_base("tiny", str(tiny_bert_dir))
    adapter = ms.fmt.SparseAdapter(e.adapter.params, e.adapter.extras,
                                   {k: v for k, v in e.adapter.card.items() if k != "study"})
    v = ws.register(adapter, name="sms-el", task="sms-spam", base="tiny")
    r = evaluate(ws, v.ref, task="sms-spam", split="test", max_examples=40, max_length=24, device="cpu")
    assert r.n == 40
    assert acc == pytest.approx(r.accuracy, abs=1e-9)
    # the base with the head only differs from base + ΔW unless ΔW is empty
    assert any(p.nnz > 0 for p in e.adapter.params.values())


def test_lora_delta_reproduces_peft_model(ms, tiny):
    tiny_bert_dir = tiny["bert"]
    from adapterhub.data import load_task
    from adapterhub.training import TrainConfig, base_tensor_keys, load_backbone, train_baseline

    data = load_task("sms-spam")
    res = train_baseline(tiny_bert_dir, data, TrainConfig(steps=3, batch_size=4, max_length=24, lr=1e-2,
                                                          device="cpu", max_eval_examples=4),
                         method="lora", lora_r=4)
    deltas = ms.lora_deltas(res.model.backbone, base_tensor_keys(tiny_bert_dir))
    assert len(deltas) == 6 and all(d.abs().sum() > 0 for d in deltas.values())
    batch = res.batcher.encoder_batch(data.test[:6], torch.device("cpu"))
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    res.model.backbone.eval()
    with torch.no_grad():
        want = res.model.backbone(**kw).last_hidden_state
    plain = load_backbone(tiny_bert_dir, "encoder", torch.float32, torch.device("cpu")).eval()
    params = dict(plain.named_parameters())
    with torch.no_grad():
        for key, d in deltas.items():
            params[key].add_(d)
        got = plain(**kw).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_dense_baseline_merges_match_adapterhub(ms):
    """peft.utils.merge_utils on dense ΔW == adapterhub's sparse-space merge on the same entries."""
    from adapterhub.merging import InMemoryExpert, merge_adapters

    g = torch.Generator().manual_seed(0)
    cfg = ms.StudyConfig(base="x", tasks=["a", "b", "c"], ta_lambda=0.7, ties_density=0.3)
    experts = []
    for t in cfg.tasks:
        d = {"w": torch.randn(8, 12, generator=g)}
        a = ms._dense_adapter(d, torch.zeros(2, 4), torch.zeros(2), t, ["x", "y"], "full")
        experts.append(ms.Expert("full", t, a, key=t))
    srcs = [InMemoryExpert(e.adapter, key=e.key) for e in experts]
    ref = {"average": merge_adapters(srcs, "uniform-sparse"),
           "task-arithmetic": merge_adapters(srcs, "task-arithmetic", lam=0.7),
           "ties": merge_adapters(srcs, "ties", density=0.3)}
    for m in ms.MERGE_METHODS:
        got = ms.merge_experts(experts, m, cfg)["w"][1].reshape(-1)
        p = ref[m].adapter.params["w"]
        want = torch.zeros(p.numel)
        idx, vals = p.flat()
        want[idx] = vals.float()
        assert torch.allclose(got, want, atol=1e-6), m
    # sparse experts: a budget above their stored entries keeps all of them
    sp = ms.Expert("element", "a", ms.fmt.SparseAdapter(
        {"w": ms.fmt.SparseParam((10, 10), torch.tensor([1, 5, 7]), torch.tensor([1.0, -2.0, 3.0]))}, {},
        {"format": ms.fmt.FORMAT_ID}), key="a")
    assert ms.ties_stored_fraction(sp, 0.2) == 1.0
    assert ms.ties_stored_fraction(sp, 0.015) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ms.merge_experts([sp, experts[0]], "average", cfg)


@pytest.mark.timeout(120)
def test_causal_variant_on_tiny_llama(ms, tiny, tmp_path):
    """--causal: text-to-label experts scored by label log-likelihood, no heads; report names differ."""
    args = _args(tiny["llama"], tmp_path) + ["--causal", "--types", "block,lora"]
    args[args.index("--out-md") + 1] = str(tmp_path / "out" / "c.md")
    args[args.index("--out-json") + 1] = str(tmp_path / "out" / "c.json")
    assert ms.main(args) == 0
    doc = json.loads((tmp_path / "out" / "c.json").read_text())
    assert doc["config"]["causal"] is True and doc["head_only"] == {}
    assert doc["config"]["types"] == ["block", "lora"]
    for k in ("block", "lora"):
        assert set(doc["single"][k]) == set(TASKS)
        for m in ms.MERGE_METHODS:
            assert all(_is_count_over(a, 12) for a in doc["merged_all"][k][m].values()), doc["merged_all"][k][m]
    assert "causal LM" in (tmp_path / "out" / "c.md").read_text()
    assert (tmp_path / "img" / "merge_study_causal_curve.png").is_file()


def test_bad_input_fails_with_one_line(ms, tmp_path, capsys):
    base = ["--work", str(tmp_path / "w"), "--out-md", str(tmp_path / "o.md"), "--out-json", str(tmp_path / "o.json"),
            "--img-dir", str(tmp_path / "img"), "--base", str(tmp_path)]
    assert ms.main(base + ["--tasks", "sms-spam,no-such-task"]) == 1
    assert "no-such-task" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown expert type"):
        ms.main(base + ["--types", "element,qlora"])
    with pytest.raises(SystemExit, match="at least two tasks"):
        ms.main(base + ["--tasks", "sms-spam"])
    assert ms.main(base + ["--replot"]) == 1
    assert not (tmp_path / "o.md").exists() and not (tmp_path / "img").exists()

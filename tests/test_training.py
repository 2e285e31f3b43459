"""Sparse training on tiny random BERT-like and Llama-like models: budgets, masked gradients,
frozen base, reselection schedule, determinism, catalog registration and bad inputs."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from adapterhub import format as fmt
from adapterhub.data import load_dataset
from adapterhub.errors import AdapterHubError, DataError, TrainingError
from adapterhub.evaluation import evaluate
from adapterhub.training import (
    Batcher,
    SparseDeltaModel,
    TrainConfig,
    find_targets,
    load_backbone,
    load_tokenizer,
    masks as M,
    train,
    train_adapter,
    train_baseline,
)
from catalog_util import hand_mask_hash
from test_training_util import folder_digest, sentiment_rows, tiny_model, write_csv

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_bases")
    return {"bert": tiny_model("bert", root / "bert"), "llama": tiny_model("llama", root / "llama")}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    p = tmp_path_factory.mktemp("toy") / "toy.csv"
    write_csv(p, sentiment_rows(60))  # 48 train rows -> 6 steps per epoch at batch 8
    return load_dataset(f"csv:{p}")


def _cfg(**kw):
    base = dict(steps=8, select_steps=2, reselect_every=2, batch_size=8, max_length=24, density=0.1,
                score_batches=2, lr=5e-3, max_eval_examples=12, seed=0)
    base.update(kw)
    return TrainConfig(**base)




def _patched_folder(src, adapter, dest):
    """A copy of the base folder with ΔW added to the weights by hand (fp32 index_add on the file's tensors)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    sd = load_file(str(dest / "model.safetensors"))
    for k, p in adapter.params.items():
        idx, vals = p.flat()
        flat = sd[k].reshape(-1).clone()
        flat.index_add_(0, idx, vals.to(flat.dtype))
        sd[k] = flat.reshape(sd[k].shape)
    save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _oracle_encoder(folder, head_w, head_b, rows, max_length):
    """(accuracy, mean cross-entropy) by hand: plain transformers AutoModel on a patched folder, mean
    pooling over attended tokens, the linear head. Independent of adapterhub's model wrapper."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = tok([t for t, _ in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    gold = torch.tensor([y for _, y in rows])
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    logits = ((hidden * m).sum(1) / m.sum(1)) @ head_w.float().T + head_b.float()
    correct = sum(int(torch.argmax(logits[i])) == y for i, (_, y) in enumerate(rows))
    return correct / len(rows), float(torch.nn.functional.cross_entropy(logits, gold))


def _oracle_causal(folder, labels, rows):
    """(accuracy, mean cross-entropy over label log-likelihoods) by hand: each ``text + "\\nLabel:" + " "
    + label`` scored alone (no padding, no batching) by AutoModelForCausalLM on a patched folder."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    scores = torch.zeros(len(rows), len(labels))
    for i, (text, _) in enumerate(rows):
        prompt = bos + tok(text, add_special_tokens=False)["input_ids"] + \
            tok("\nLabel:", add_special_tokens=False)["input_ids"]
        for j, lab in enumerate(labels):
            lab_ids = tok(" " + lab, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + lab_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            scores[i, j] = sum(float(logp[len(prompt) - 1 + t, tid]) for t, tid in enumerate(lab_ids))
    gold = torch.tensor([y for _, y in rows])
    correct = sum(int(torch.argmax(scores[i])) == y for i, (_, y) in enumerate(rows))
    return correct / len(rows), float(torch.nn.functional.cross_entropy(scores, gold))


def _file_shapes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method", sorted(M.MASK_METHODS))
def test_every_method_trains_exactly_its_budget_on_base_tensor_names(bases, toy, kind, method):
    before = folder_digest(bases[kind])
    res = train_adapter(bases[kind], toy, _cfg(mask=method), task_name="toy")
    shapes = _file_shapes(bases[kind])
    a = res.adapter
    pattern = "attention.self" if kind == "bert" else "self_attn"
    assert a.params and all(k in shapes and pattern in k for k in a.params)  # names = file tensor names
    assert len(a.params) == 6  # q, k, v in 2 layers
    for k, p in a.params.items():
        assert p.shape == shapes[k]
        assert p.nnz == M.budget(p.numel, 0.1)
    assert res.metrics["trainable_values"] == a.nnz  # values phase: 1-D values only
    assert a.card["mask"]["method"] == method and a.card["mask"]["density"] == 0.1
    assert (("heads.toy.weight" in a.extras) == (kind == "bert"))
    assert folder_digest(bases[kind]) == before  # base files untouched
    assert any(float(p.values.abs().sum()) > 0 for p in a.params.values())  # something was learned


def test_gradients_reach_only_the_masked_entries(bases, toy):
    folder = bases["bert"]
    backbone = load_backbone(folder, "encoder", torch.float32, torch.device("cpu"))
    targets = find_targets(backbone, r"(query|key|value)$", _file_shapes(folder))
    sdm = SparseDeltaModel(backbone, "encoder", targets, 2, torch.device("cpu"), autocast=False)
    base_state = {k: v.clone() for k, v in backbone.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for k, w in sdm.weights.items():
        idx = torch.sort(torch.randperm(w.numel(), generator=g)[: w.numel() // 10]).values
        sdm.idx[k] = idx
        sdm.values[k] = torch.nn.Parameter(torch.zeros(idx.numel()))
    batch = Batcher(load_tokenizer(folder), "encoder", toy.labels, 24).encoder_batch(toy.train[:8], sdm.device)
    loss, _ = sdm.forward(batch, capture=True)
    loss.backward()
    dense = sdm.captured_grads()
    opt = torch.optim.SGD([sdm.values[k] for k in sdm.values], lr=1.0)
    for k in sdm.weights:
        assert sdm.values[k].grad.shape == (sdm.idx[k].numel(),)
        assert torch.equal(sdm.values[k].grad, dense[k].reshape(-1)[sdm.idx[k]])
    opt.step()
    for k, w in sdm.weights.items():
        changed = (sdm.effective(k) != w).reshape(-1).nonzero().reshape(-1)
        assert changed.numel() > 0 and bool(torch.isin(changed, sdm.idx[k]).all())
        assert w.grad is None  # the base never gets a gradient
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, base_state[k])  # bit-identical in memory


def test_reselection_happens_only_during_the_first_epoch(bases, toy):
    # 48 rows, batch 8: 6 steps per epoch; warm-up 1 step then reselect every step until step 5
    res = train_adapter(bases["bert"], toy, _cfg(steps=18, select_steps=1, reselect_every=1), task_name="toy")
    ev = res.mask_events
    assert [e["event"] for e in ev] == ["select"] + ["reselect"] * 4
    assert [e["step"] for e in ev] == [1, 2, 3, 4, 5]
    assert len({e["mask_hash"] for e in ev}) > 1  # the mask did move
    assert all(e["nnz"] == res.adapter.nnz for e in ev)
    # the mask stops moving after the first epoch: the last event's hash is the final adapter's, and
    # both equal the documented definition computed here by hand
    assert ev[-1]["mask_hash"] == res.adapter.mask_hash() == hand_mask_hash(res.adapter)
    gd = train_adapter(bases["bert"], toy, _cfg(mask="grow-drop", steps=18, reselect_every=2), task_name="toy")
    assert [e["step"] for e in gd.mask_events] == [0, 2, 4]
    assert len({e["mask_hash"] for e in gd.mask_events}) == 3


def test_same_seed_same_bytes_different_seed_different_bytes(bases, toy):
    a = fmt.save(train_adapter(bases["bert"], toy, _cfg(), task_name="toy").adapter)
    b = fmt.save(train_adapter(bases["bert"], toy, _cfg(), task_name="toy").adapter)
    c = fmt.save(train_adapter(bases["bert"], toy, _cfg(seed=1), task_name="toy").adapter)
    assert a == b
    assert a != c


def test_block_granularity_and_global_scope(bases, toy):
    res = train_adapter(bases["bert"], toy, _cfg(granularity="block", block_size=8, density=0.25), task_name="toy")
    for p in res.adapter.params.values():
        assert p.block_size == 8 and p.nnz == 64 * M.budget(p.numel // 64, 0.25)
    assert res.adapter.card["mask"]["granularity"] == "block"
    glob = train_adapter(bases["llama"], toy, _cfg(scope="global", density=0.05), task_name="toy").adapter
    assert glob.nnz == M.budget(glob.numel, 0.05)


def test_register_and_evaluate_through_the_workspace(ws, bases, toy, tmp_path):
    ws.add_base("tb", str(bases["bert"]))
    csv = tmp_path / "toy.csv"
    write_csv(csv, sentiment_rows(60))
    info = train(ws, base="tb", dataset=f"csv:{csv}", name="toy-expert", config=_cfg(steps=30, lr=2e-2))
    assert info.ref == "toy-expert@1" and info.mask_method == "connection-sensitivity"
    assert info.training_config["density"] == 0.1
    assert info.card["labels"]["toy"] == ["negative", "positive"]
    adapter = ws.load_adapter("toy-expert@1")
    dep = _patched_folder(bases["bert"], adapter, tmp_path / "dep")
    data = load_dataset(f"csv:{csv}")
    hw, hb = adapter.extras["heads.toy.weight"], adapter.extras["heads.toy.bias"]
    # oracle: the figures recomputed by hand from the patched weights (training validates at max_length 24)
    want_val_acc, want_val_loss = _oracle_encoder(dep, hw, hb, data.validation, 24)
    assert info.metrics["validation_n"] == len(data.validation) == 6
    assert info.metrics["validation_accuracy"] == want_val_acc
    assert info.metrics["validation_loss"] == pytest.approx(want_val_loss, abs=1e-5)
    r = evaluate(ws, "toy-expert", dataset=f"csv:{csv}", split="test")
    want_acc, want_loss = _oracle_encoder(dep, hw, hb, data.test, 128)  # evaluate's default max_length
    assert r.n == len(data.test) == 6
    assert r.accuracy == want_acc and r.loss == pytest.approx(want_loss, abs=1e-5)
    assert ws.resolve("toy-expert@1").metrics["test_accuracy"] == r.accuracy
    # the same weights materialised in a folder (as a deployment is) give the same figures
    r2 = evaluate(ws, "toy-expert", dataset=f"csv:{csv}", split="test", model_dir=dep, record=False)
    assert r2.accuracy == r.accuracy and abs(r2.loss - r.loss) < 1e-5


def test_causal_lm_scores_labels_by_log_likelihood(ws, bases, tmp_path):
    ws.add_base("tl", str(bases["llama"]))
    csv = tmp_path / "toy.csv"
    write_csv(csv, sentiment_rows(60))
    info = train(ws, base="tl", dataset=f"csv:{csv}", name="toy-lm", config=_cfg(steps=10))
    assert info.card["model_kind"] == "causal-lm" and not ws.load_adapter(info.ref).extras
    r = evaluate(ws, info.ref, dataset=f"csv:{csv}", split="validation")
    data = load_dataset(f"csv:{csv}")
    want_acc, want_loss = _oracle_causal(_patched_folder(bases["llama"], ws.load_adapter(info.ref), tmp_path / "dep"),
                                         data.labels, data.validation)
    assert r.n == len(data.validation) == 6
    assert r.accuracy == want_acc and r.loss == pytest.approx(want_loss, abs=1e-4)


def _bad(tmp_path, name):
    if name == "missing-label":
        p = write_csv(tmp_path / "m.csv", [("a", "x")] * 4, header=("text", "stars"))
        return {"dataset": f"csv:{p}"}
    if name == "empty":
        p = tmp_path / "e.csv"
        p.write_text("text,label\n")
        return {"dataset": f"csv:{p}"}
    return {}


@pytest.mark.parametrize("case,kw,err,match", [
    ("unknown task", {"task": "nope"}, DataError, "unknown task"),
    ("unknown base", {"task": "rt-sentiment", "base": "nobase"}, AdapterHubError, "unknown base"),
    ("density 0", {"task": "rt-sentiment", "config": _cfg(density=0.0)}, TrainingError, "density"),
    ("density > 1", {"task": "rt-sentiment", "config": _cfg(density=1.5)}, TrainingError, "density"),
    ("regex", {"task": "rt-sentiment", "config": _cfg(targets="nothing_matches")}, TrainingError, "matches no"),
    ("cuda", {"task": "rt-sentiment", "config": _cfg(device="cuda")}, TrainingError, "CUDA"),
    ("missing-label", {}, DataError, "no label column"),
    ("empty", {}, DataError, "no rows"),
    ("bad method", {"task": "rt-sentiment", "config": _cfg(mask="nope")}, TrainingError, "unknown mask"),
    ("warm-up too long", {"task": "rt-sentiment", "config": _cfg(steps=2, select_steps=5)}, TrainingError,
     "select-steps"),
])
def test_bad_input_is_one_clear_error_and_registers_nothing(ws, bases, tmp_path, case, kw, err, match):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ws.add_base("tb", str(bases["bert"]))
    kw = dict(kw)
    kw.update(_bad(tmp_path, case))
    kw.setdefault("base", "tb")
    kw.setdefault("config", _cfg())
    with pytest.raises(err, match=match) as ei:
        train(ws, name="x", **kw)
    assert "\n" not in str(ei.value)
    assert ws.list_versions() == []


# ---------------------------------------------------------------------------- one of each (issue 13)

@pytest.mark.parametrize("extra", [{}, {"granularity": "block", "block_size": 8, "density": 0.25},
                                   {"mask": "grow-drop", "reselect_every": 2}])
def test_last_mask_event_hash_is_the_registered_versions_mask_hash(ws, bases, tmp_path, extra):
    ws.add_base("tb", str(bases["bert"]))
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(60))
    info = train(ws, base="tb", dataset=f"csv:{csv}", name="toy-hash", config=_cfg(**extra))
    events = info.card["training"]["mask_events"]
    assert events and events[-1]["mask_hash"] == info.mask_hash == ws.load_adapter(info.ref).mask_hash()


def test_no_validation_split_validates_on_a_seeded_cut_of_train_never_test(bases, toy):
    from adapterhub.data import TaskData
    from adapterhub.training import with_validation

    test_rows = [("the movie was great", 0)] * 7  # deliberately mislabelled: validating on them would show
    data = TaskData("noval", toy.labels, list(toy.train), [], test_rows)
    cut = with_validation(data, seed=0)
    assert len(cut.validation) == round(len(toy.train) * 0.1) and cut.test == test_rows
    assert sorted(cut.train + cut.validation) == sorted(toy.train)  # a partition of train
    assert with_validation(data, seed=0) == cut and with_validation(data, seed=1).validation != cut.validation
    assert with_validation(toy, seed=0) is toy  # an existing validation split is used as it is
    res = train_adapter(bases["bert"], data, _cfg(max_eval_examples=None), task_name="toy")
    assert res.metrics["validation_n"] == len(cut.validation)
    assert res.adapter.card["training"]["data"]["rows"] == {"train": len(cut.train),
                                                            "validation": len(cut.validation), "test": 7}
    base = train_baseline(bases["bert"], data, _cfg(max_eval_examples=None), method="full")
    assert base.metrics["validation_n"] == len(cut.validation)


def test_trainers_registry_shares_one_step():
    from adapterhub.training import TRAINERS, Trainer, get_trainer

    assert list(TRAINERS) == ["sparse", "lora", "full"]
    for name, cls in TRAINERS.items():
        assert issubclass(cls, Trainer) and cls.name == name
        assert cls.step is Trainer.step and cls.run is Trainer.run  # no trainer re-implements the step
    with pytest.raises(TrainingError, match="sparse, lora, full"):
        get_trainer("nope")


def test_max_length_beyond_the_models_positions_is_truncated_not_a_crash(bases, tmp_path):
    """A row longer than the base's position table (64 here) with max_length 128: the batcher truncates to
    the model's limit instead of failing mid-forward with a raw index error."""
    from transformers import AutoConfig

    from adapterhub.training.model import Batcher, load_tokenizer, position_limit

    kind = "bert"  # learned absolute positions: a 65th position is an index error without the clamp
    limit = AutoConfig.from_pretrained(bases[kind]).max_position_embeddings
    assert limit == 64
    rows = sentiment_rows(40)
    rows[1] = (" ".join(["great"] * 300), rows[1][1])  # far beyond 64 tokens
    data = load_dataset(f"csv:{write_csv(tmp_path / 'long.csv', rows)}")
    res = train_adapter(bases[kind], data, _cfg(max_length=128), task_name="long")
    assert res.adapter.params  # trained and packaged
    tok = load_tokenizer(bases[kind])
    assert Batcher(tok, "encoder", data.labels, 128, limit).max_length == 64
    assert position_limit(tok) is None  # a tokenizer has no position table: unknown, no clamp


def test_the_toy_tokenizer_knows_every_word_of_the_toy_rows(tmp_path):
    """A tokenizer that maps every word to [UNK] (what transformers 5 made of ``vocab_file=``) would let the
    training tests pass on inputs that carry no signal."""
    import transformers

    from test_training_util import make_tokenizer, sentiment_rows

    make_tokenizer(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text, label in sentiment_rows(20):
        ids = tok(text + " " + label, add_special_tokens=False)["input_ids"]
        assert len(ids) == len((text + " " + label).split()) and tok.unk_token_id not in ids, text

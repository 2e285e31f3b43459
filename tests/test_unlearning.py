"""FUSED unlearning on a tiny random BERT and synthetic data: partition, critical layers, the adapter, guards."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from adapterhub.data import TaskData
from adapterhub.errors import AdapterHubError, TrainingError, UnlearningError
from adapterhub.fused import federated as F, unlearning as U
from adapterhub.training import masks as M

pytestmark = pytest.mark.timeout(1200)  # generous: the CI box is shared

WORDS = [["red", "fire", "apple", "blood"], ["blue", "sea", "sky", "ocean"], ["green", "leaf", "grass", "moss"]]
NOISE = ["the", "a", "of", "and", "it", "is", "very", "so"]


def synth_task(n: int = 240, seed: int = 0) -> TaskData:
    r = random.Random(seed)
    rows = []
    for i in range(n):
        lab = i % 3
        words = [r.choice(WORDS[lab]) if r.random() < 0.5 else r.choice(NOISE) for _ in range(6)]
        rows.append((" ".join(words) + f" w{i}", lab))
    return TaskData("synth", ["red", "blue", "green"], rows[:180], rows[180:210], rows[210:])


FED_KW = dict(clients=4, alpha=1.0, rounds=2, local_steps=3, max_length=16, seed=0)

def oracle_accuracy(base_dir, adapters, head_w, head_b, rows, dest, max_length=16) -> float:
    """Accuracy by hand, independent of FedModel: the base file's tensors plus each adapter's ΔW added
    in order (fp32 index_add, as a deployment stacks them), a plain transformers BertModel, the
    word-hash token ids written out (``[1] + 2 + crc32(word) % (vocab - 2)``, no tokenizer ships with
    the tiny base), mean pooling over attended tokens and the linear head."""
    import shutil
    import zlib

    import transformers
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, dest)
    sd = load_file(str(dest / "model.safetensors"))
    for a in adapters:
        for k, p in a.params.items():
            idx, vals = p.flat()
            flat = sd[k].reshape(-1).clone()
            flat.index_add_(0, idx, vals.to(flat.dtype))
            sd[k] = flat.reshape(sd[k].shape)
    save_file(sd, str(dest / "model.safetensors"), metadata={"format": "pt"})
    model = transformers.AutoModel.from_pretrained(str(dest), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    correct = 0
    for text, gold in rows:  # one row at a time: no padding involved
        ids = [1] + [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in text.lower().split()[: max_length - 1]]
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        logits = hidden.last_hidden_state[0].mean(0) @ head_w.float().T + head_b.float()
        correct += int(torch.argmax(logits)) == gold
    return correct / len(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    """A workspace with the tiny base and a density-1 global model trained on the synthetic task."""
    from adapterhub.workspace import Workspace

    home = tmp_path_factory.mktemp("unl_home")
    ws = Workspace.open(home)
    ws.add_base("tiny", str(tiny_bert_dir))
    data = synth_task()
    info, res = F.fed_train(ws, base="tiny", task="synth", name="glob", density=1.0, data=data, **FED_KW)
    yield ws, info, res, data
    ws.close()


# ---------------------------------------------------------------------------- partition

def test_dirichlet_partition_is_seeded_disjoint_and_complete():
    labels = [i % 4 for i in range(400)]
    a = F.dirichlet_partition(labels, 8, 0.5, seed=3)
    b = F.dirichlet_partition(labels, 8, 0.5, seed=3)
    c = F.dirichlet_partition(labels, 8, 0.5, seed=4)
    assert a.hash == b.hash and a.clients == b.clients
    assert c.hash != a.hash
    flat = [i for cl in a.clients for i in cl]
    assert sorted(flat) == list(range(400))  # every row exactly once
    assert min(a.sizes) >= 1
    # small alpha is non-IID: some client's label mix is far from uniform
    skew = max(max(sum(1 for i in cl if labels[i] == k) for k in range(4)) / len(cl) for cl in a.clients)
    assert skew > 0.5
    with pytest.raises(TrainingError):
        F.dirichlet_partition(labels, 0, 1.0, 0)
    with pytest.raises(TrainingError):
        F.dirichlet_partition(labels, 2, 0.0, 0)


# ---------------------------------------------------------------------------- critical layers

def test_layer_ranking_matches_hand_computed_l1():
    per_client = {"0": {"a": 2.0, "b": 3.0, "c": 0.5, "head": 0.1}, "1": {"a": 0.5, "b": 0.0, "c": 2.0, "head": 0.1},
                  "2": {"a": 100.0, "b": 100.0, "c": 100.0, "head": 100.0}}
    sizes = {"0": 30, "1": 10, "2": 60}
    # over clients 0 and 1 (sizes 30 and 10 -> weights 0.75, 0.25):
    # a: 0.75*2 + 0.25*0.5 = 1.625 ; b: 0.75*3 + 0 = 2.25 ; c: 0.75*0.5 + 0.25*2 = 0.875 ; head 0.1
    d = U.layer_l1_distances(per_client, sizes, ["0", "1"])
    assert d == pytest.approx({"a": 1.625, "b": 2.25, "c": 0.875, "head": 0.1})
    ranking = U.rank_layers(d)
    assert [r["layer"] for r in ranking] == ["b", "a", "c", "head"]
    assert [r["rank"] for r in ranking] == [1, 2, 3, 4]
    # all clients: weights 0.3, 0.1, 0.6
    assert U.layer_l1_distances(per_client, sizes)["a"] == pytest.approx(0.3 * 2 + 0.1 * 0.5 + 60.0)
    with pytest.raises(TrainingError):
        U.layer_l1_distances(per_client, sizes, ["9"])


def test_client_layer_l1_includes_the_head_dense_or_sparse():
    g = {"delta:a": torch.zeros(2, 2), "delta:b": torch.zeros(3), "head:weight": torch.zeros(2), "head:bias": torch.zeros(1)}
    c = {"delta:a": torch.tensor([[1.0, -1.0], [0.0, 0.5]]), "delta:b": torch.tensor([3.0, 0.0, 0.0]),
         "head:weight": torch.tensor([0.25, -0.25]), "head:bias": torch.tensor([1.0])}
    assert F.client_layer_l1(c, g) == pytest.approx({"a": 2.5, "b": 3.0, "head": 1.5})
    sparse = {"hdelta:weight": torch.zeros(2), "hdelta:bias": torch.zeros(1)}
    assert F.client_layer_l1({"hdelta:weight": torch.tensor([1.0, 2.0]), "hdelta:bias": torch.tensor([-1.0])},
                             sparse) == {"head": 4.0}


def test_fed_train_records_last_round_differences_and_ranking(trained, tiny_bert_dir):
    """The ranking is measured in fed train's last round (no extra round) and includes the head; the
    recorded numbers are each client's L1 distance between its last local model and the global model
    it started that round from, recomputed here by hand."""
    ws, info, res, data = trained
    tc = ws.resolve(info.ref).training_config
    diffs = tc["layer_differences"]
    per_client, sizes = diffs["per_client"], diffs["client_sizes"]
    assert sorted(per_client) == ["0", "1", "2", "3"] and diffs["source"].startswith("last round of fed train")
    assert tc["critical_layers"] == U.rank_layers(U.layer_l1_distances(per_client, sizes))
    layers = {r["layer"] for r in tc["critical_layers"]}
    assert "head" in layers and layers - {"head"} == set(ws.load_adapter(info).params)
    # by hand: replay round 1 (the first of 2), then each client's round-2 update, L1 summed in float64
    fed = res.federation
    cfg = F.FedConfig(**tc["fedavg"])
    model = F.FedModel(tiny_bert_dir, 3, max_length=cfg.max_length, seed=cfg.seed)
    state = F.sparse_delta_state(model, model.layers, 1.0, cfg.seed)
    state.update(model.head_state())
    clients = [fed.client_rows(c) for c in range(fed.n_clients)]
    one = F.FedConfig(**{**cfg.to_json(), "rounds": 1})
    after1, _ = F.fedavg(model, state, clients, one)
    for cid, rows in enumerate(clients):
        local = F.local_train(model, after1, rows, cfg, gen=F._client_generator(cfg.seed, 1, cid, ""))
        for layer, v in per_client[str(cid)].items():
            keys = ["head:weight", "head:bias"] if layer == "head" else ["delta:" + layer]
            manual = sum(sum(abs(float(x) - float(y)) for x, y in zip(local[k].reshape(-1).tolist(),
                                                                          after1[k].reshape(-1).tolist(), strict=True))
                         for k in keys)
            assert v == pytest.approx(manual, rel=1e-6), (cid, layer)
    # what travelled is counted: values down and up per round, plus one number per layer up once
    st = res.stats
    n_values = sum(int(t.numel()) for t in state.values())
    assert st.bytes_down_per_client == n_values * 4 * 2
    assert st.bytes_up_per_client == n_values * 4 * 2 + len(layers) * 4


def test_unlearn_uses_the_recorded_ranking_without_an_extra_round(trained, monkeypatch):
    ws, info, res, data = trained
    calls = []
    real = F.local_train

    def counting(*a, **kw):
        calls.append(kw.get("steps"))
        return real(*a, **kw)

    monkeypatch.setattr(F, "local_train", counting)
    _, out = U.unlearn(ws, info.ref, forget="client:0", name="no-extra", layers=2, density=0.3, rounds=1, patience=0,
                       data=data, max_eval=10)
    assert len(calls) == 3  # one round over the 3 remaining clients, nothing else
    recorded = ws.resolve(info.ref).training_config["critical_layers"]
    assert out.ranking == recorded and out.critical == [r["layer"] for r in recorded[:2]]
    assert out.training_config["critical_layers"]["source"].endswith("all clients")
    # --rerank: the same recorded numbers, over the remaining clients only (still no extra round)
    calls.clear()
    plan = U.plan_forget(res.federation, U.parse_forget("client:0"))
    ranking, source = U.recorded_ranking(ws.resolve(info.ref).training_config, plan, rerank=True)
    diffs = ws.resolve(info.ref).training_config["layer_differences"]
    assert ranking == U.rank_layers(U.layer_l1_distances(diffs["per_client"], diffs["client_sizes"], ["1", "2", "3"]))
    assert "3 remaining clients" in source and calls == []


def test_validation_is_cut_from_train_never_test():
    data = synth_task()
    no_val = TaskData("synth", data.labels, data.train, [], data.test)
    fed = F.make_federation("synth", 3, 1.0, 0, data=no_val)
    assert fed.validation and not set(fed.validation) & set(data.test)
    assert set(fed.validation) <= set(data.train) and not set(fed.validation) & set(fed.train)
    assert len(fed.train) + len(fed.validation) == len(data.train)
    again = F.make_federation("synth", 3, 1.0, 0, data=no_val)
    assert again.validation == fed.validation and again.partition.hash == fed.partition.hash


# ---------------------------------------------------------------------------- membership inference

def test_auc_and_tpr_by_hand():
    from adapterhub.fused import mia

    assert mia.auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert mia.auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    # pairs: (2>1) (2=2 half) (2<3) (5>1) (5>2) (5>3) -> 4.5 / 6
    assert mia.auc([2.0, 5.0], [1.0, 2.0, 3.0]) == pytest.approx(4.5 / 6)
    non = [float(i) for i in range(200)]  # 1% of 200 = 2 non-members may exceed: threshold = 197
    assert mia.tpr_at_fpr([198.5, 197.0, 500.0, 0.0], non) == 0.5
    assert mia.tpr_at_fpr([1.0], [0.0] * 50) == 1.0  # < 100 non-members: above every one of them


class ToyModel:
    """A memorising toy classifier: an MLP on a fixed random 16-d feature per row (seeded from its text),
    exposing ``predict_proba`` as FedModel does (all the attack uses)."""

    def __init__(self, rows, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.feat = {t: torch.randn(16, generator=g) for t, _ in rows}
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))

    def predict_proba(self, state, rows, batch_size=64):
        with torch.no_grad():
            return torch.softmax(self.net(torch.stack([self.feat[t] for t, _ in rows])), -1)

    def overfit(self, rows, steps=400):
        opt = torch.optim.Adam(self.net.parameters(), lr=0.01)
        x, y = torch.stack([self.feat[t] for t, _ in rows]), torch.tensor([lab for _, lab in rows])
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_mia_auc_high_on_an_overfit_model_and_chance_on_an_untrained_one():
    from adapterhub.fused import mia

    torch.manual_seed(0)
    r = random.Random(0)
    rows = [(f"row {i}", r.randrange(3)) for i in range(400)]  # random labels: only memorisation fits them
    members, nonmembers = rows[:100], rows[200:300]
    toy = ToyModel(rows)
    untrained = mia.membership(toy, {}, members, nonmembers)
    assert abs(untrained.auc - 0.5) < 0.1, untrained
    toy.overfit(members)
    overfit = mia.membership(toy, {}, members, nonmembers)
    assert overfit.auc > 0.9 and overfit.tpr_at_1pct_fpr >= 0.05, overfit  # 5x the 1% a guess would catch
    assert (overfit.members, overfit.nonmembers) == (100, 100)
    # and the scores are the log-probability of the true label, row by row
    p = toy.predict_proba({}, members[:3])
    assert mia.loss_scores(toy, {}, members[:3]) == pytest.approx(
        [float(torch.log(p[i, lab].double())) for i, (_, lab) in enumerate(members[:3])])


# ---------------------------------------------------------------------------- the unlearning adapter

def test_global_model_records_federation(trained):
    ws, info, res, data = trained
    v = ws.resolve(info.ref)
    fedrec = v.training_config["federation"]
    assert fedrec["clients"] == 4 and fedrec["alpha"] == 1.0 and fedrec["seed"] == 0 and fedrec["rounds"] == 2
    assert fedrec["partition_hash"] == res.federation.partition.hash
    assert v.kind == "expert" and v.density == 1.0
    a = ws.load_adapter(v)
    for p in a.params.values():  # dense-as-sparse: every index stored
        assert p.nnz == p.numel
    assert set(a.extras) == {"heads.synth.weight", "heads.synth.bias"}
    assert [r["layer"] for r in v.training_config["critical_layers"]] == [r["layer"] for r in res.critical_layers]


def _run(ws, info, res, tiny_bert_dir, **kw):
    args = {"layers": 2, "density": 0.25, "rounds": 1, "seed": 5, "evaluate_metrics": False, "patience": 0, **kw}
    return U.run_unlearning(tiny_bert_dir, ws.load_adapter(info), res.federation,
                            F.FedConfig(**res.training_config["fedavg"]), U.parse_forget(kw.pop("forget", "class:red")),
                            res.critical_layers, **{k: v for k, v in args.items() if k != "forget"})


def test_only_k_layers_masked_entries_change(trained, tiny_bert_dir):
    ws, info, res, data = trained
    gad = ws.load_adapter(info)
    k, density = 3, 0.25
    out = _run(ws, info, res, tiny_bert_dir, layers=k, density=density)
    critical = [r["layer"] for r in res.critical_layers[:k]]
    assert out.critical == critical
    body = [c for c in critical if c != "head"]
    assert sorted(out.adapter.params) == sorted(body)
    # the global model's weights, exactly as a deployment computes them
    from safetensors.torch import load_file

    from adapterhub.apply.patching import apply_adapter

    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    glob = {k_: v.clone() for k_, v in base.items()}
    apply_adapter(glob, gad)
    after = {k_: v.clone() for k_, v in glob.items()}
    apply_adapter(after, out.adapter)
    for name in glob:
        changed = (after[name] != glob[name]).reshape(-1).nonzero().reshape(-1)
        if name not in body:
            assert changed.numel() == 0, name
            continue
        p = out.adapter.params[name]
        idx = p.flat()[0]
        assert p.nnz == M.budget(p.numel, density)
        assert set(changed.tolist()) <= set(idx.tolist())  # only masked entries
        assert changed.numel() > 0
    # seeded: same request, same bytes
    again = _run(ws, info, res, tiny_bert_dir, layers=k, density=density)
    from adapterhub import format as fmt

    assert fmt.sha256_hex(fmt.save(again.adapter)) == fmt.sha256_hex(fmt.save(out.adapter))


def test_head_in_the_ranking_gets_sparse_deltas_on_the_global_head(trained, tiny_bert_dir):
    """In this toy set-up the head ranks first: the adapter's head is the global head plus sparse
    deltas at a random mask of the chosen density (nothing re-initialised), and training them on the
    remaining data lowers the forgotten class's logit on its rows."""
    ws, info, res, data = trained
    assert res.critical_layers[0]["layer"] == "head"
    gad = ws.load_adapter(info)
    out = _run(ws, info, res, tiny_bert_dir, layers=1, density=0.25, rounds=2)
    assert out.critical == ["head"] and out.adapter.params == {}
    gw, gb = gad.extras["heads.synth.weight"], gad.extras["heads.synth.bias"]
    uw, ub = out.adapter.extras["heads.synth.weight"], out.adapter.extras["heads.synth.bias"]
    changed_w = (uw != gw).reshape(-1).nonzero().reshape(-1).tolist()
    assert 0 < len(changed_w) <= M.budget(gw.numel(), 0.25)
    assert set(changed_w) <= set(out.state_index["hdelta:weight"].tolist())
    assert (ub != gb).sum() <= M.budget(gb.numel(), 0.25)
    assert out.adapter.card["unlearning"]["head"]["mode"] == "ranked"
    assert out.adapter.card["unlearning"]["head"]["delta_values"] == M.budget(96, 0.25) + M.budget(3, 0.25)
    # the forgotten class's logit on its rows goes down
    red = data.labels.index("red")
    rows = [r for r in res.federation.test if r[1] == red]
    model = F.FedModel(tiny_bert_dir, 3, max_length=16, seed=0)
    model.apply_adapter(gad, head_task="synth")
    batch = model.encode(rows)
    with torch.no_grad():
        before = model.logits({}, batch)[:, red].mean()
        model.set_head(uw, ub)
        after = model.logits({}, batch)[:, red].mean()
    assert after < before - 0.05, (float(before), float(after))


@pytest.mark.parametrize("head", ["freeze", "train", "reset"])
def test_head_baselines(trained, tiny_bert_dir, head):
    ws, info, res, data = trained
    gad = ws.load_adapter(info)
    out = _run(ws, info, res, tiny_bert_dir, layers=1, head=head)
    assert "head" not in out.critical  # baselines never rank the head: they handle it themselves
    if head == "freeze":  # nothing but the K layers
        assert out.adapter.extras == {}
    else:  # dense: every head value may move (fine-tuned from the global head, or re-initialised)
        w = out.adapter.extras["heads.synth.weight"]
        assert w.shape == gad.extras["heads.synth.weight"].shape
        assert int((w != gad.extras["heads.synth.weight"]).sum()) > 48
    assert out.training_config["head"] == head


def test_random_layer_selection_is_seeded_ablation(trained, tiny_bert_dir):
    ws, info, res, data = trained
    a = U.select_layers(res.critical_layers, 4, head="ranked", selection="random", seed=1)
    assert a == U.select_layers(res.critical_layers, 4, head="ranked", selection="random", seed=1)
    assert a != U.select_layers(res.critical_layers, 4, head="ranked", selection="critical", seed=1)
    assert len(set(a)) == 4 and set(a) <= {r["layer"] for r in res.critical_layers}
    with pytest.raises(UnlearningError, match="larger than"):
        U.select_layers(res.critical_layers, 13, head="freeze", selection="critical", seed=1)


def test_random_layers_do_not_depend_on_the_samples_file_path(trained, tmp_path):
    ws, info, res, data = trained
    salts = []
    for d in ("a", "b"):
        f = tmp_path / d / "s.txt"
        f.parent.mkdir()
        f.write_text("3\n7\n")
        salts.append(U.selection_salt(U.plan_forget(res.federation, U.parse_forget(f"samples:{f}"))))
    assert salts[0] == salts[1] and salts[0].startswith("samples:")


def test_bad_head_mode(trained, tiny_bert_dir):
    ws, info, res, data = trained
    with pytest.raises(UnlearningError, match="head must be one of"):
        _run(ws, info, res, tiny_bert_dir, head="bogus")


class GuardedRows(list):
    """The train split, but touching a forgotten client's row raises."""

    def __init__(self, rows, forbidden):
        super().__init__(rows)
        self.forbidden = set(forbidden)
        self.touched = 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            raise AssertionError("slice of the train split")
        if i in self.forbidden:
            self.touched += 1
            raise AssertionError(f"forgotten row {i} was read")
        return super().__getitem__(i)

    def __iter__(self):
        raise AssertionError("iterated over the whole train split (would read forgotten rows)")


def test_forgotten_client_data_never_read(trained, tiny_bert_dir):
    ws, info, res, data = trained
    fed = res.federation
    forgotten = 1
    guarded = F.Federation(fed.task, fed.labels, GuardedRows(fed.train, fed.partition.clients[forgotten]), fed.test,
                           fed.validation, fed.partition, fed.data_fingerprint)
    with pytest.raises(AssertionError):  # the guard works
        guarded.client_rows(forgotten)
    guarded.train.touched = 0
    cfg = F.FedConfig(**res.training_config["fedavg"])
    plan = U.plan_forget(guarded, U.parse_forget(f"client:{forgotten}"))
    ranking, source = U.recorded_ranking(ws.resolve(info.ref).training_config, plan, rerank=True)
    # ranking over the remaining clients' recorded numbers, FedAvg on the remaining clients, stopping on
    # the validation split: no forgotten row read
    out = U.run_unlearning(tiny_bert_dir, ws.load_adapter(info), guarded, cfg, U.parse_forget(f"client:{forgotten}"),
                           ranking, ranking_source=source, layers=2, density=0.5, rounds=2, evaluate_metrics=False)
    assert guarded.train.touched == 0
    assert out.metrics["remaining_clients"] == 3
    assert "remaining clients" in out.training_config["critical_layers"]["source"]


def test_unlearn_registers_version_with_lineage_and_metrics(trained, tiny_bert_dir, tmp_path):
    ws, info, res, data = trained
    v, out = U.unlearn(ws, info.ref, forget="class:blue", name="forget-blue", layers=2, density=0.3, rounds=3,
                       compare_retrain=True, retrain_rounds=3, data=data, max_eval=30)
    assert v.kind == "unlearning"
    edges = ws.parents(v.ref)
    assert len(edges) == 1 and edges[0]["relation"] == "unlearns" and edges[0]["parent"] == info.ref
    assert edges[0]["params"]["forget"] == "class:blue"
    tc = ws.resolve(v.ref).training_config
    assert tc["forget"]["spec"] == "class:blue" and tc["forget"]["class"] == "blue"
    assert tc["critical_layers"]["chosen"] == out.critical == ["head", res.critical_layers[1]["layer"]]
    assert tc["stopping"]["patience"] == 2 and tc["stopping"]["rule"].startswith("validation loss")
    card = ws.load_adapter(v).card
    assert card["unlearning"]["forget"]["spec"] == "class:blue"
    assert card["unlearning"]["applies_on"]["content_hash"] == info.content_hash
    m = v.metrics
    for key in ("ra", "fa", "mia_auc", "mia_tpr_at_1pct_fpr", "seconds", "bytes_per_client", "bytes_up_per_client",
                "bytes_down_per_client", "rounds", "best_round", "local_steps"):
        assert key in m, key
    # RA / FA recomputed by hand on the test split (30 rows: 10 blue, 20 others; max_eval 30 keeps all):
    # the global model alone, then global + unlearning adapter with the unlearning adapter's head
    blue = data.labels.index("blue")
    ra_rows = [r for r in data.test if r[1] != blue]
    fa_rows = [r for r in data.test if r[1] == blue]
    assert (len(ra_rows), len(fa_rows)) == (20, 10)
    glob, unl = ws.load_adapter(info.ref), ws.load_adapter(v.ref)
    gw, gb = glob.extras["heads.synth.weight"], glob.extras["heads.synth.bias"]
    uw, ub = unl.extras["heads.synth.weight"], unl.extras["heads.synth.bias"]
    assert m["global"]["ra"] == pytest.approx(oracle_accuracy(tiny_bert_dir, [glob], gw, gb, ra_rows, tmp_path / "g1"))
    assert m["global"]["fa"] == pytest.approx(oracle_accuracy(tiny_bert_dir, [glob], gw, gb, fa_rows, tmp_path / "g2"))
    assert m["ra"] == pytest.approx(oracle_accuracy(tiny_bert_dir, [glob, unl], uw, ub, ra_rows, tmp_path / "u1"))
    assert m["fa"] == pytest.approx(oracle_accuracy(tiny_bert_dir, [glob, unl], uw, ub, fa_rows, tmp_path / "u2"))
    # the attack: members = the 30 (capped) forgotten train rows, non-members = blue's 10 test rows
    assert (m["mia_members"], m["mia_nonmembers"]) == (30, 10)
    # bytes by hand: fp32 values down and up per client per round. Unlearning: one 32x32 layer at
    # budget(1024, 0.3) = 307 values + the head's budget(96, 0.3) + budget(3, 0.3) = 29 + 1 sparse deltas.
    # Retraining: the dense global model, 2 layers x (4 x 32x32 attention + 2 x 32x64 MLP) = 16384 + 99
    # head values, for however many rounds the shared stopping rule ran.
    assert sorted(p.nnz for p in unl.params.values()) == [307]
    assert m["bytes_up_per_client"] == m["bytes_down_per_client"] == (307 + 29 + 1) * 4 * m["rounds"]
    r = m["retrain"]
    assert r["bytes_per_client"] == 2 * (2 * (4 * 32 * 32 + 2 * 32 * 64) + 99) * 4 * r["rounds"]
    assert 1 <= r["best_round"] <= r["rounds"] <= 3 and 1 <= m["best_round"] <= m["rounds"] <= 3
    # an unlearning version is not a federated global model: clear error, nothing registered
    before = {x.ref for x in ws.list_versions()}
    with pytest.raises(UnlearningError, match="fed train"):
        U.unlearn(ws, v.ref, forget="class:red", name="again", data=data)
    assert {x.ref for x in ws.list_versions()} == before


@pytest.mark.parametrize("kw, msg", [
    ({"forget": "client:99"}, "no client 99"),
    ({"forget": "class:purple"}, "not a label"),
    ({"forget": "client:0", "layers": 14}, "larger than the 13 ranked layers"),
    ({"forget": "client:0", "layers": 0}, "at least 1"),
    ({"forget": "nonsense"}, "bad forget spec"),
    ({"forget": "samples:/nonexistent/file.txt"}, "does not exist"),
    ({"forget": "client:0", "density": 1.5}, "density"),
])
def test_bad_requests_register_nothing(trained, kw, msg):
    ws, info, res, data = trained
    before = {v.ref for v in ws.list_versions()}
    blobs = sorted(ws.store.iter_digests())
    args = {"layers": 2, "density": 0.2, "rounds": 1, **kw}
    with pytest.raises(AdapterHubError, match=msg):
        U.unlearn(ws, info.ref, name="bad", data=data, **args)
    assert {v.ref for v in ws.list_versions()} == before
    assert sorted(ws.store.iter_digests()) == blobs


def test_empty_remaining_set_is_refused(trained, tmp_path):
    ws, info, res, data = trained
    f = tmp_path / "all.txt"
    f.write_text("\n".join(str(i) for i in range(len(res.federation.train))))
    before = {v.ref for v in ws.list_versions()}
    with pytest.raises(UnlearningError, match="leaves no remaining data"):
        U.unlearn(ws, info.ref, forget=f"samples:{f}", name="bad", layers=2, rounds=1, data=data)
    assert {v.ref for v in ws.list_versions()} == before
    # and a single-client federation cannot forget its only client
    fed1 = F.make_federation("synth", 1, 1.0, 0, data=data)
    with pytest.raises(UnlearningError, match="leaves no remaining data"):
        U.plan_forget(fed1, U.parse_forget("client:0"))


def test_samples_spec_by_id_and_text(trained, tmp_path):
    ws, info, res, data = trained
    fed = res.federation
    f = tmp_path / "s.txt"
    f.write_text(f"3\n{fed.train[7][0]}\n\n")
    plan = U.plan_forget(fed, U.parse_forget(f"samples:{f}"))
    assert plan.record["samples"] == 2
    assert sorted(plan.forgotten_train()) == sorted([fed.train[3], fed.train[7]])
    kept = sum(len(r) for _, r in plan.remaining)
    assert kept == len(fed.train) - 2
    f.write_text("not a training text at all\n")
    with pytest.raises(UnlearningError, match="neither a train-row id"):
        U.plan_forget(fed, U.parse_forget(f"samples:{f}"))


def test_image_base_federates_unlearns_and_reverts_exactly(tmp_path):
    """The project's digits CNN goes through the same path: fed train, unlearn, deploy apply/revert (bit-exact)."""
    import hashlib

    from adapterhub.apply import deployments as dep
    from adapterhub.workspace import Workspace

    ws = Workspace.open(tmp_path / "home")
    ws.add_base("digits", "digits-cnn")
    g, gres = F.fed_train(ws, base="digits", task="digits", name="dg", clients=3, alpha=1.0, rounds=2, local_steps=3,
                          max_train=300, seed=0)
    layers = {r["layer"] for r in gres.critical_layers}
    assert layers == {"conv1.weight", "conv2.weight", "conv3.weight", "fc.weight", "head"}
    u, out = U.unlearn(ws, g.ref, forget="class:3", name="dg-forget-3", layers=2, density=0.2, rounds=2, max_eval=40)
    assert u.kind == "unlearning" and len(out.critical) == 2
    dep.create(ws, "d", "digits")
    weights = Path(dep.get(ws, "d").path) / "model.safetensors"

    def sha() -> str:
        return hashlib.sha256(weights.read_bytes()).hexdigest()

    base_sha = sha()
    dep.apply(ws, "d", g.ref)
    global_sha = sha()
    dep.apply(ws, "d", u.ref)
    assert sha() not in (base_sha, global_sha) or out.critical == ["head"]
    dep.revert(ws, "d", u.ref)
    assert sha() == global_sha
    dep.revert(ws, "d", g.ref)
    assert sha() == base_sha
    ws.close()

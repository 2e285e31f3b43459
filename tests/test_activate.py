"""adapterhub.activate / AdapterSet / apply_adapter with refs, paths and Hub ids (issue 15, PEFT one-liners).

Oracles: exactness by sha256 of every tensor (before == after revert; each switch == the adapter applied
to a fresh copy of the base); predictions by ``evaluate`` (the ``adapterhub eval`` code path) on the same
rows; the Hub case against the local Hub-protocol server, after a push with the library.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import adapterhub
from adapterhub import format as fmt
from adapterhub.apply.patching import apply_adapter as apply_exact
from adapterhub.errors import BaseModelError, FormatError, HubError, RefError
from adapterhub.workspace import Workspace
from catalog_util import BERT_TARGETS, LLAMA_TARGETS, make_adapter
from test_training_util import sentiment_rows, tiny_model, write_csv

LABELS = ["negative", "positive"]


def varied_rows(n: int) -> list[tuple[str, str]]:
    """Toy rows of 1-12 words: the tiny tokenizer maps most words to [UNK], so length is what varies."""
    return [(t, lab) for (t, lab), k in zip(sentiment_rows(n), range(n), strict=True)
            for t in [" ".join([t] * (1 + k % 3))[: 4 + (7 * k) % 40]]]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_model("bert", tmp_path_factory.mktemp("act_bert") / "model")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_model("llama", tmp_path_factory.mktemp("act_llama") / "model")


def _bert(folder: Path) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder)).eval()


def _llama(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def hashes(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every tensor's bytes (name -> hex)."""
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
            for k, v in model.state_dict().items()}


def expected(folder: Path, adapter: fmt.SparseAdapter, load=_bert, scale: float = 1.0) -> dict[str, str]:
    """The hashes of ``adapter`` applied to a freshly loaded base (independent of the code under test)."""
    m = load(folder)
    apply_exact(m, adapter, scale)
    return hashes(m)


def head_adapter(seed: int, task: str = "toy") -> fmt.SparseAdapter:
    g = torch.Generator().manual_seed(100 + seed)
    extras = {f"heads.{task}.weight": torch.randn(2, 32, generator=g) * 3, f"heads.{task}.bias": torch.randn(2, generator=g)}
    card = {"task": task, "labels": {task: LABELS}, "model_kind": "encoder", "mask": {"method": "random"}}
    return make_adapter(BERT_TARGETS, seed=seed, scale=0.5, extras=extras, card=card)


def lm_adapter(seed: int) -> fmt.SparseAdapter:
    card = {"task": "toy", "labels": {"toy": LABELS}, "model_kind": "causal-lm", "mask": {"method": "random"}}
    return make_adapter(LLAMA_TARGETS, seed=seed, scale=0.5, card=card)


@pytest.fixture
def bert_ws(ws: Workspace, bert_dir: Path) -> Workspace:
    ws.add_base("tb", str(bert_dir))
    ws.register(head_adapter(1), name="rt", task="toy", base="tb")
    ws.register(head_adapter(2), name="spam", task="toy", base="tb")
    ws.tag("rt@1", "prod")
    return ws


# -- activate: refs, exact revert, predictions ------------------------------------------------------

def test_activate_ref_applies_exactly_and_the_context_manager_reverts_bit_for_bit(bert_ws, bert_dir):
    model = _bert(bert_dir)
    before = hashes(model)
    want = expected(bert_dir, bert_ws.load_adapter("rt@1"))
    assert want != before
    with adapterhub.activate(model, "rt@prod", workspace=bert_ws) as rt:
        assert rt.ref == "rt@1" and rt.active and rt.labels == LABELS
        assert hashes(model) == want
    assert not rt.active
    assert hashes(model) == before
    # revert() by hand, twice (the second does nothing); a scale is applied as apply_adapter applies it
    h = adapterhub.activate(model, "rt", scale=0.5, workspace=bert_ws)
    assert hashes(model) == expected(bert_dir, bert_ws.load_adapter("rt@1"), scale=0.5)
    h.revert()
    h.revert()
    assert hashes(model) == before


def test_revert_also_on_an_exception(bert_ws, bert_dir):
    model = _bert(bert_dir)
    before = hashes(model)
    with pytest.raises(ZeroDivisionError):
        with adapterhub.activate(model, "spam@1", workspace=bert_ws):
            raise ZeroDivisionError("inside the block")
    assert hashes(model) == before


def test_predict_equals_eval_on_the_same_rows(bert_ws, bert_dir, tmp_path):
    from adapterhub.data import load_dataset
    from adapterhub.evaluation import evaluate

    csv = write_csv(tmp_path / "toy.csv", varied_rows(200))
    data = load_dataset(f"csv:{csv}", labels=LABELS)
    rows = data.test
    assert len(rows) >= 10
    oracle = evaluate(bert_ws, "rt@1", dataset=f"csv:{csv}", split="test", record=False)
    model = _bert(bert_dir)
    with adapterhub.activate(model, "rt@1", workspace=bert_ws) as rt:
        scores = rt.scores([t for t, _ in rows])
        preds = rt.predict([t for t, _ in rows])
        gold = torch.tensor([y for _, y in rows])
        assert scores.shape == (len(rows), 2)
        assert preds == [LABELS[int(i)] for i in scores.argmax(-1)]
        assert sum(p == LABELS[y] for p, (_, y) in zip(preds, rows, strict=True)) / len(rows) == oracle.accuracy
        loss = float(torch.nn.functional.cross_entropy(scores, gold))
        assert loss == pytest.approx(oracle.loss, abs=1e-6)
        assert len({round(float(x), 6) for x in scores[:, 1] - scores[:, 0]}) >= 4  # the rows score differently
        # the AutoModelForSequenceClassification-shaped module gives the same logits
        clf = rt.classifier()
        tok = rt.tokenizer()
        enc = tok([t for t, _ in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out = clf(**enc, labels=gold)
        assert torch.equal(out.logits, scores)
        assert float(out.loss.detach()) == pytest.approx(loss, abs=1e-6)
        assert clf.id2label == {0: "negative", 1: "positive"}


def test_causal_lm_predict_equals_eval(ws, llama_dir, tmp_path):
    from adapterhub.evaluation import evaluate

    ws.add_base("tl", str(llama_dir))
    ws.register(lm_adapter(3), name="lm", task="toy", base="tl")
    csv = write_csv(tmp_path / "toy.csv", varied_rows(120))
    from adapterhub.data import load_dataset

    rows = load_dataset(f"csv:{csv}", labels=LABELS).test
    oracle = evaluate(ws, "lm@1", dataset=f"csv:{csv}", split="test", record=False)
    model = _llama(llama_dir)
    before = hashes(model)
    with adapterhub.activate(model, "lm@1", workspace=ws) as lm:
        scores = lm.scores([t for t, _ in rows])
        preds = lm.predict([t for t, _ in rows])
        assert sum(p == LABELS[y] for p, (_, y) in zip(preds, rows, strict=True)) / len(rows) == oracle.accuracy
        loss = float(torch.nn.functional.cross_entropy(scores, torch.tensor([y for _, y in rows])))
        assert loss == pytest.approx(oracle.loss, abs=1e-5)
        with pytest.raises(adapterhub.AdapterHubError, match="no head"):
            lm.classifier()
    assert hashes(model) == before


# -- paths -------------------------------------------------------------------------------------------

def test_activate_a_file_and_a_peft_folder(bert_dir, tmp_path):
    from adapterhub.interop.peft import export_peft_shira

    adapter = head_adapter(4)
    path = tmp_path / "a.safetensors"
    fmt.save_file(adapter, path)
    model = _bert(bert_dir)
    before = hashes(model)
    want = expected(bert_dir, adapter)
    with adapterhub.activate(model, str(path)) as h:
        assert h.resolved.origin == "path" and hashes(model) == want
        assert h.labels == LABELS
    assert hashes(model) == before
    plain = make_adapter(BERT_TARGETS, seed=5)
    folder = tmp_path / "peft"
    export_peft_shira(plain, folder, base_folder=bert_dir)
    with adapterhub.activate(model, folder) as h:  # a PathLike too; module names mapped onto the model's
        assert hashes(model) == expected(bert_dir, plain)
    assert hashes(model) == before
    with pytest.raises(FormatError, match="no such adapter file or folder"):
        adapterhub.activate(model, str(tmp_path / "missing") + "/")
    assert hashes(model) == before


def test_a_misfit_leaves_the_model_untouched(ws, bert_dir, llama_dir):
    model = _bert(bert_dir)
    before = hashes(model)
    with pytest.raises(BaseModelError):
        adapterhub.activate(model, lm_adapter(1))
    assert hashes(model) == before
    with pytest.raises(RefError, match="unknown adapter"):
        adapterhub.activate(model, "nosuch@1", workspace=ws)


# -- named switching ---------------------------------------------------------------------------------

def test_adapter_set_switches_exactly(bert_ws, bert_dir):
    base_h = expected(bert_dir, fmt.SparseAdapter({}, {}, {}))
    rt_h = expected(bert_dir, bert_ws.load_adapter("rt@1"))
    spam_h = expected(bert_dir, bert_ws.load_adapter("spam@1"))
    assert len({tuple(sorted(x.items())) for x in (base_h, rt_h, spam_h)}) == 3
    model = _bert(bert_dir)
    adapters = adapterhub.AdapterSet(model, workspace=bert_ws)
    adapters.load("rt", "rt@1")
    adapters.load("spam", "spam@1")
    assert adapters.active_adapter is None and hashes(model) == base_h  # load applies nothing
    adapters.set_adapter("rt")
    assert adapters.active_adapter == "rt" and hashes(model) == rt_h
    p_rt = adapters.predict(["good movie", "awful plot"])
    adapters.set_adapter("spam")
    assert hashes(model) == spam_h
    with adapters.disable_adapter():
        assert adapters.active_adapter is None and hashes(model) == base_h
    assert adapters.active_adapter == "spam" and hashes(model) == spam_h
    adapters.set_adapter("rt")
    assert hashes(model) == rt_h and adapters.predict(["good movie", "awful plot"]) == p_rt
    adapters.unload()
    assert hashes(model) == base_h
    with pytest.raises(adapterhub.AdapterSetError, match="already loaded"):
        adapters.load("rt", "spam@1")
    with pytest.raises(adapterhub.AdapterSetError, match="no adapter 'x'"):
        adapters.set_adapter("x")
    adapters.set_adapter("spam")
    adapters.delete_adapter("spam")
    assert adapters.names == ["rt"] and hashes(model) == base_h


# -- refs wherever an adapter is taken ----------------------------------------------------------------

def test_apply_adapter_takes_a_ref_and_reverts_exactly(bert_ws, bert_dir):
    model = _bert(bert_dir)
    before = hashes(model)
    rec = adapterhub.apply_adapter(model, "spam", workspace=bert_ws)
    assert hashes(model) == expected(bert_dir, bert_ws.load_adapter("spam@1"))
    adapterhub.revert(model, rec)
    assert hashes(model) == before
    # a state dict works too
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    rec = adapterhub.apply_adapter(sd, "rt@prod", workspace=bert_ws)
    assert any(not torch.equal(sd[k], v) for k, v in model.state_dict().items())
    adapterhub.revert(sd, rec)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_workspace_register_takes_a_path_like_the_cli(ws, bert_dir, tmp_path):
    from click.testing import CliRunner

    from adapterhub.cli.main import cli
    from adapterhub.interop.peft import export_peft_shira

    ws.add_base("tb", str(bert_dir))
    plain = make_adapter(BERT_TARGETS, seed=7)
    folder = tmp_path / "peft-folder"
    export_peft_shira(plain, folder, base_folder=bert_dir)
    info = ws.register(str(folder), name="imp", task="toy", base="tb")
    assert info.ref == "imp@1"
    assert ws.parents("imp@1")[0]["relation"] == "imported_from"
    assert ws.parents("imp@1")[0]["params"] == {"format": "peft-shira", "path": "peft-folder"}
    file = tmp_path / "a.safetensors"
    fmt.save_file(head_adapter(8), file)
    assert ws.register(file, name="fromfile", task="toy", base="tb").ref == "fromfile@1"
    assert ws.parents("fromfile@1") == []
    # the CLI's register of the same folder in another home stores the same bytes
    other = tmp_path / "other"
    r = CliRunner().invoke(cli, ["--home", str(other), "base", "add", "tb", str(bert_dir)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["--home", str(other), "register", str(folder), "--name", "imp", "--task", "toy",
                                 "--base", "tb"])
    assert r.exit_code == 0, r.output
    with Workspace.open(other) as w2:
        assert w2.resolve("imp@1").content_hash == info.content_hash


def test_a_peft_lora_folder_with_a_density(ws, bert_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(_bert(bert_dir), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                     target_modules=["query", "value"]))
    folder = tmp_path / "lora"
    pm.save_pretrained(str(folder))
    ws.add_base("tb", str(bert_dir))
    info = ws.register(folder, name="lo", task="toy", base="tb", density=0.25)
    assert ws.parents(info.ref)[0]["params"]["format"] == "peft-lora"
    stored = ws.load_adapter(info)
    model = _bert(bert_dir)
    before = hashes(model)
    with pytest.raises(FormatError, match="density"):
        adapterhub.activate(model, folder)
    with adapterhub.activate(model, folder, density=0.25):  # the same sparsified ΔW as register stored
        assert hashes(model) == expected(bert_dir, stored) != before
    assert hashes(model) == before
    with pytest.raises(FormatError, match="only to a PEFT LoRA folder"):
        ws.register(stored, name="lo", task="toy", base="tb", density=0.25)


# -- Hub ids --------------------------------------------------------------------------------------------

def test_hub_id_is_pulled_then_activated_and_offline_is_refused(hub_server, bert_ws, bert_dir, tmp_path, monkeypatch):
    from adapterhub.hub.client import push

    push(bert_ws, "rt@1", repo="alice/rt")
    fresh = Workspace.open(tmp_path / "bob")
    try:
        fresh.add_base("tb", str(bert_dir))
        model = _bert(bert_dir)
        before = hashes(model)
        n0 = len(hub_server.requests)
        with pytest.raises(HubError, match="offline mode is on"):
            adapterhub.activate(model, "alice/rt@v1", workspace=fresh, offline=True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(HubError, match="offline mode is on"):
            adapterhub.activate(model, "alice/rt@v1", workspace=fresh)
        assert len(hub_server.requests) == n0 and hashes(model) == before  # no network, nothing changed
        monkeypatch.delenv("HF_HUB_OFFLINE")
        with adapterhub.activate(model, "alice/rt@v1", workspace=fresh) as h:
            assert h.resolved.origin == "hub"
            assert hashes(model) == expected(bert_dir, bert_ws.load_adapter("rt@1"))
            assert fresh.resolve(h.ref).content_hash == bert_ws.resolve("rt@1").content_hash
        assert hashes(model) == before and len(hub_server.requests) > n0
        # pulled once: offline now finds the local copy of that revision, without the network
        n1 = len(hub_server.requests)
        with adapterhub.activate(model, "alice/rt@v1", workspace=fresh, offline=True):
            assert hashes(model) == expected(bert_dir, bert_ws.load_adapter("rt@1"))
        assert len(hub_server.requests) == n1 and hashes(model) == before
    finally:
        fresh.close()


# -- the package stays light ---------------------------------------------------------------------------

def test_lazy_exports():
    assert {"activate", "AdapterSet", "Workspace", "apply_adapter", "revert"} <= set(adapterhub.__all__)
    assert set(adapterhub.__all__) <= set(dir(adapterhub))
    assert adapterhub.Workspace is Workspace
    with pytest.raises(AttributeError):
        adapterhub.nosuch  # noqa: B018
    import subprocess
    import sys

    code = "import sys, adapterhub; adapterhub.Workspace; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# -- docs/guide.md: the PEFT user's path runs as written ---------------------------------------------------

def _guide_python_blocks() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text(encoding="utf-8")
    section = text.split("## Coming from PEFT", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    return blocks


def test_the_guides_peft_path_runs(hub_server, ws, bert_dir, tmp_path, monkeypatch, capsys):
    """The guide's Python blocks, executed as written against a home holding minilm (the tiny BERT here),
    rt@1 tagged prod and spam@1, a PEFT folder at ./exported/rt-peft and alice/rt@v1 on the test Hub."""
    from adapterhub.hub.client import push
    from adapterhub.interop.peft import export_peft_shira

    ws.add_base("minilm", str(bert_dir))
    ws.register(head_adapter(1), name="rt", task="toy", base="minilm")
    ws.register(head_adapter(2), name="spam", task="toy", base="minilm")
    ws.tag("rt@1", "prod")
    push(ws, "rt@1", repo="alice/rt")
    export_peft_shira(make_adapter(BERT_TARGETS, seed=9), tmp_path / "exported" / "rt-peft", base_folder=bert_dir)
    monkeypatch.setenv("ADAPTERHUB_HOME", str(ws.home))
    monkeypatch.chdir(tmp_path)
    first, second = _guide_python_blocks()
    ns: dict = {}
    exec(compile(first, "guide.md#peft-1", "exec"), ns)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rt@1 [") and ns["adapters"].active_adapter is None
    assert ns["logits"].shape == (1, 2)
    exec(compile(second, "guide.md#peft-2", "exec"), ns)
    assert ns["adapters"].names == ["rt", "spam", "mine"]
    ns["ws"].close()

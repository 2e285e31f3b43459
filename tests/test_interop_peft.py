"""PEFT interop: LoRA folders imported sparse (oracle: PEFT's merge_and_unload), SHiRA with modules_to_save
classifier heads round-tripping through PeftModel.from_pretrained, trained heads kept on export, Hub base ids."""
from __future__ import annotations

import json
import math

import pytest
import torch

from adapterhub import format as fmt
from catalog_util import apply_dense, make_adapter
from test_cli_catalog import Hub

BERT_MODULES = ["query", "value", "dense"]
LLAMA_MODULES = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def hub(home, tiny_bert_dir):
    h = Hub(home)
    h("base", "add", "tiny", str(tiny_bert_dir))
    return h


def _lora_folder(arch, folder, dest, *, r=4, alpha=8, rslora=False, seed=0, task_type=None, num_labels=3):
    """A real PEFT LoRA folder (random non-zero B) saved with save_pretrained; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM, BertForSequenceClassification

    torch.manual_seed(seed)
    if task_type == "SEQ_CLS":
        model = BertForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels)
    else:
        model = (AutoModel if arch == "bert" else AutoModelForCausalLM).from_pretrained(str(folder))
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False, task_type=task_type,
                     target_modules=BERT_MODULES if arch == "bert" else LLAMA_MODULES)
    pm = get_peft_model(model, cfg)
    pm.save_pretrained(str(dest))
    return pm


def test_register_reads_a_peft_folders_config_once(home, tmp_path, tiny_bert_dir, monkeypatch):
    """What decides the kind (LoRA or SHiRA) is the config that gets imported: one read, and register says
    which kind it read (the CLI's source_format)."""
    from adapterhub.interop import peft as peft_mod
    from adapterhub.workspace import Workspace

    _lora_folder("bert", tiny_bert_dir, tmp_path / "lora")
    reads = []
    real = peft_mod._read_peft_config
    monkeypatch.setattr(peft_mod, "_read_peft_config", lambda folder: reads.append(folder) or real(folder))
    with Workspace.open(home) as ws:
        ws.add_base("b", str(tiny_bert_dir))
        info = ws.register(tmp_path / "lora", name="imp", task="t", base="b", density=0.5)
        assert info.source_format == "peft-lora" and len(reads) == 1
        assert ws.register(ws.load_adapter("imp"), name="again", task="t", base="b").source_format is None


def _hand_deltas(dest, scale):
    """ΔW = B @ A * scale computed by hand from the saved file, keyed by the PEFT module path."""
    from safetensors.torch import load_file

    t = load_file(str(dest / "adapter_model.safetensors"))
    mods = sorted(k[: -len(".lora_A.weight")] for k in t if k.endswith(".lora_A.weight"))
    return {m: (t[m + ".lora_B.weight"].double() @ t[m + ".lora_A.weight"].double()) * scale for m in mods}


@pytest.mark.parametrize("arch,rslora", [("bert", False), ("llama", True)])
def test_lora_import_density_one_equals_merge_and_unload(arch, rslora, home, tmp_path, tiny_bert_dir, tiny_llama_dir):
    from transformers import AutoModel, AutoModelForCausalLM

    folder = tiny_bert_dir if arch == "bert" else tiny_llama_dir
    pm = _lora_folder(arch, folder, tmp_path / "lora", rslora=rslora)
    h = Hub(home)
    h("base", "add", "b", str(folder))
    doc = h.json("register", tmp_path / "lora", "--name", "imp", "--task", "t", "--base", "b", "--density", "1")
    assert doc["source_format"] == "peft-lora"
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as ws:
        ad = ws.load_adapter("imp")
        assert ws.parents("imp")[0]["relation"] == "imported_from"
    imp = ad.card["imported"]
    assert imp["format"] == "peft-lora" and imp["r"] == 4 and imp["use_rslora"] is rslora
    n_targets = sum(1 for _, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert n_targets == (11 if arch == "bert" else 6)  # BERT's "dense" matches 3 Linears per layer + the pooler
    assert len(ad.params) == n_targets and set(imp["reconstruction_error"]) == set(ad.params)
    assert all(e == 0.0 for e in imp["reconstruction_error"].values())
    assert all(p.nnz == p.numel for p in ad.params.values())
    load = AutoModel.from_pretrained if arch == "bert" else AutoModelForCausalLM.from_pretrained
    ours = load(str(folder)).eval()
    base_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    apply_dense(ours, ad)
    merged = dict(pm.merge_and_unload().named_parameters())
    mine = dict(ours.named_parameters())
    changed = 0
    for name, w in mine.items():
        torch.testing.assert_close(w, merged[name], rtol=1e-6, atol=1e-7, msg=name)
        changed += not torch.equal(w, base_sd[name])
    assert changed == n_targets  # the oracle is not vacuous: every target moved


def test_lora_import_density_error_matches_hand_computation(home, tmp_path, tiny_llama_dir):
    _lora_folder("llama", tiny_llama_dir, tmp_path / "lora", r=2, alpha=16, seed=3)
    h = Hub(home)
    h("base", "add", "ll", str(tiny_llama_dir))
    h("register", tmp_path / "lora", "--name", "el", "--task", "t", "--base", "ll", "--density", "0.1")
    h("register", tmp_path / "lora", "--name", "bl", "--task", "t", "--base", "ll", "--density", "0.25",
      "--block-size", "8")
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as ws:
        el, bl = ws.load_adapter("el"), ws.load_adapter("bl")
    hand = _hand_deltas(tmp_path / "lora", 16 / 2)
    assert len(hand) == len(el.params) == 6
    for mod, d in hand.items():
        name = mod[len("base_model.model."):] + ".weight"
        # element: top-k |ΔW| with k = round(0.1 * numel)
        k = int(math.floor(0.1 * d.numel() + 0.5))
        top = torch.topk(d.abs().reshape(-1), k).indices
        rest = d.reshape(-1).clone()
        rest[top] = 0
        want = float(rest.norm() / d.norm())
        assert 0.05 < want < 1
        p = el.params[name]
        assert p.nnz == k and torch.equal(torch.sort(top).values, p.flat()[0])
        torch.testing.assert_close(p.values.double(), d.reshape(-1)[p.indices], rtol=1e-6, atol=1e-9)
        assert el.card["imported"]["reconstruction_error"][name] == pytest.approx(want, rel=1e-5)
        # block: the 8x8 tiles with the largest norm, a quarter of them
        rows, cols = d.shape
        tiles = d.reshape(rows // 8, 8, cols // 8, 8).square().sum(dim=(1, 3)).reshape(-1)
        kb = int(math.floor(0.25 * tiles.numel() + 0.5))
        keep = torch.topk(tiles, kb).indices
        want_b = float((tiles.sum() - tiles[keep].sum()).sqrt() / d.norm())
        pb = bl.params[name]
        assert pb.block_size == 8 and pb.nnz == kb * 64
        assert bl.card["imported"]["reconstruction_error"][name] == pytest.approx(want_b, rel=1e-5)
        dense = pb.to_dense().double()
        assert float((d - dense).norm() / d.norm()) == pytest.approx(want_b, rel=1e-5)
    assert el.card["mask"]["density"] == 0.1 and bl.card["mask"]["granularity"] == "block"


def test_lora_import_refusals(home, tmp_path, tiny_llama_dir):
    from safetensors.torch import save_file

    _lora_folder("llama", tiny_llama_dir, tmp_path / "lora")
    h = Hub(home)
    h("base", "add", "ll", str(tiny_llama_dir))
    r = h("register", tmp_path / "lora", "--name", "x", "--task", "t", "--base", "ll", code=1)
    assert "--density" in r.stderr
    h("register", tmp_path / "lora", "--name", "x", "--task", "t", "--base", "ll", "--density", "0", code=2)
    h("register", tmp_path / "lora", "--name", "x", "--task", "t", "--base", "ll", "--block-size", "8", code=2)
    fmt.save_file(make_adapter({"model.layers.0.mlp.down_proj.weight": (32, 64)}, density=0.1),
                  tmp_path / "a.safetensors")
    r = h("register", tmp_path / "a.safetensors", "--name", "x", "--task", "t", "--base", "ll", "--density", "0.5",
          code=2)
    assert "only to PEFT LoRA" in r.stderr
    # block size that does not divide the weight
    r = h("register", tmp_path / "lora", "--name", "x", "--task", "t", "--base", "ll", "--density", "0.5",
          "--block-size", "5", code=1)
    assert "not divisible" in r.stderr
    d = tmp_path / "bad"
    d.mkdir()
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = {
        "use_dora": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True},
                     {key + ".lora_A.weight": torch.ones(2, 32), key + ".lora_B.weight": torch.ones(32, 2)}),
        "does not chain": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4},
                           {key + ".lora_A.weight": torch.ones(2, 32), key + ".lora_B.weight": torch.ones(32, 3)}),
        "does not fit": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4},
                         {key + ".lora_A.weight": torch.ones(2, 31), key + ".lora_B.weight": torch.ones(32, 2)}),
        "lora_alpha must be": ({"peft_type": "LORA", "r": 2, "lora_alpha": "x"},
                               {key + ".lora_A.weight": torch.ones(2, 32), key + ".lora_B.weight": torch.ones(32, 2)}),
        "NaN": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4},
                {key + ".lora_A.weight": torch.full((2, 32), float("nan")), key + ".lora_B.weight": torch.ones(32, 2)}),
        "missing": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, {key + ".lora_A.weight": torch.ones(2, 32)}),
        "modules_to_save": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4},
                            {key + ".lora_A.weight": torch.ones(2, 32), key + ".lora_B.weight": torch.ones(32, 2),
                             "base_model.model.lm_head.weight": torch.ones(128, 32)}),
        "embedding LoRA": ({"peft_type": "LORA", "r": 2, "lora_alpha": 4},
                           {key + ".lora_A.weight": torch.ones(2, 32), key + ".lora_B.weight": torch.ones(32, 2),
                            "base_model.model.model.embed_tokens.lora_embedding_A": torch.ones(2, 128)}),
    }
    for msg, (cfg, tensors) in cases.items():
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file(tensors, str(d / "adapter_model.safetensors"))
        r = h("register", d, "--name", "x", "--task", "t", "--base", "ll", "--density", "0.5", code=1)
        assert msg in r.stderr, (msg, r.stderr)
        assert "Traceback" not in r.output


def _seq_cls_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_shira_seq_cls_import_export_round_trip(home, tmp_path, tiny_bert_dir):
    """A SHiRA SEQ_CLS folder with a modules_to_save classifier imports with its head and exports back so that
    PeftModel.from_pretrained gives the same logits as the original PEFT model."""
    from peft import PeftModel, ShiraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3)
    pm = get_peft_model(model, ShiraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS",
                                           init_weights=False, random_seed=2))
    with torch.no_grad():  # a trained-looking head, different from the fresh init PEFT would otherwise load
        pm.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    pm.eval()
    pm.save_pretrained(str(tmp_path / "shira"))
    h = Hub(home)
    h("base", "add", "b", str(tiny_bert_dir))
    doc = h.json("register", tmp_path / "shira", "--name", "cls", "--task", "t", "--base", "b")
    assert doc["source_format"] == "peft-shira"
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as ws:
        ad = ws.load_adapter("cls")
    assert sorted(ad.extras) == ["peft.modules_to_save.classifier.bias", "peft.modules_to_save.classifier.weight"]
    assert ad.card["imported"]["task_type"] == "SEQ_CLS"
    exp = h.json("export", "cls", tmp_path / "out", "--format", "peft")
    assert exp["modules_to_save"] == ["classifier"] and exp["extras_file"] is None
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert cfg["base_model_name_or_path"] == "b"  # a local base has no Hub id: its registered name
    fresh = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3)
    back = PeftModel.from_pretrained(fresh, str(tmp_path / "out")).eval()
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    want, got = _seq_cls_logits(pm, ids), _seq_cls_logits(back, ids)
    base_logits = _seq_cls_logits(BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3).eval(), ids)
    assert not torch.allclose(want, base_logits, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_export_keeps_trained_heads(hub, tmp_path):
    """A trained adapter's heads.<task>.* extras no longer block a PEFT export; they travel beside it."""
    head_w, head_b = torch.randn(2, 32), torch.randn(2)
    ad = make_adapter(density=0.1, extras={"heads.t.weight": head_w, "heads.t.bias": head_b})
    fmt.save_file(ad, tmp_path / "h.safetensors")
    hub("register", tmp_path / "h.safetensors", "--name", "h", "--task", "t", "--base", "tiny")
    doc = hub.json("export", "h", tmp_path / "p", "--format", "peft")
    assert doc["extras_file"] == "adapterhub_extras.safetensors" and doc["dropped_extras"] == []
    assert (tmp_path / "p" / "adapterhub_extras.safetensors").is_file()
    hub("register", tmp_path / "p", "--name", "back", "--task", "t", "--base", "tiny")
    from adapterhub.workspace import Workspace

    with Workspace.open(hub.home) as ws:
        back = ws.load_adapter("back")
    assert torch.equal(back.extras["heads.t.weight"], head_w) and torch.equal(back.extras["heads.t.bias"], head_b)
    r = hub("export", "h", tmp_path / "p", "--format", "peft", "--drop-extras")
    assert "left out 2 extra(s): heads.t.bias, heads.t.weight" in r.stderr
    assert not (tmp_path / "p" / "adapterhub_extras.safetensors").exists()


def test_export_writes_builtin_hub_id(home, tmp_path):
    h = Hub(home)
    h("base", "add", "minilm", "minilm")
    fmt.save_file(make_adapter({"encoder.layer.0.attention.self.query.weight": (384, 384)}, density=0.01),
                  tmp_path / "a.safetensors")
    h("register", tmp_path / "a.safetensors", "--name", "m", "--task", "t", "--base", "minilm")
    h("export", "m", tmp_path / "out", "--format", "peft")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_study_lora_deltas_use_library_helper(tiny_bert_dir):
    """The merge study's LoRA baseline and the import share lora_delta: equal to PEFT's get_delta_weight."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from adapterhub.interop.lora import lora_delta_of_module

    torch.manual_seed(1)
    pm = get_peft_model(AutoModel.from_pretrained(str(tiny_bert_dir)),
                        LoraConfig(r=4, lora_alpha=12, target_modules=["query"], init_lora_weights=False))
    n = 0
    for _, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and hasattr(mod, "get_delta_weight") and "default" in mod.lora_A:
            torch.testing.assert_close(lora_delta_of_module(mod), mod.get_delta_weight("default"), rtol=0, atol=0)
            n += 1
    assert n == 2


def test_lora_seq_cls_import_exports_with_head(home, tmp_path, tiny_bert_dir):
    """A LoRA SEQ_CLS folder imports sparse with its classifier; PEFT loads the SHiRA export and its logits equal
    ours (the sparse ΔW applied to the base, the imported classifier on top)."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    pm = _lora_folder("bert", tiny_bert_dir, tmp_path / "lora", task_type="SEQ_CLS", seed=5)
    h = Hub(home)
    h("base", "add", "b", str(tiny_bert_dir))
    h("register", tmp_path / "lora", "--name", "lc", "--task", "t", "--base", "b", "--density", "0.05")
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as ws:
        ad = ws.load_adapter("lc")
    assert ad.card["imported"]["module_prefix"] == "bert." and ad.card["imported"]["task_type"] == "SEQ_CLS"
    head = pm.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(ad.extras["peft.modules_to_save.classifier.weight"], head.weight.detach())
    exp = h.json("export", "lc", tmp_path / "out", "--format", "peft")
    assert exp["modules_to_save"] == ["classifier"] and all(m.startswith("bert.") for m in exp["modules"])
    ours = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3).eval()
    apply_dense(ours.bert, ad)
    with torch.no_grad():
        ours.classifier.weight.copy_(ad.extras["peft.modules_to_save.classifier.weight"])
        ours.classifier.bias.copy_(ad.extras["peft.modules_to_save.classifier.bias"])
    fresh = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=3)
    back = PeftModel.from_pretrained(fresh, str(tmp_path / "out")).eval()
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(_seq_cls_logits(back, ids), _seq_cls_logits(ours, ids), rtol=1e-5, atol=1e-6)
    # the sparse import is an approximation of the LoRA model: close-ish, not equal
    assert not torch.allclose(_seq_cls_logits(pm.eval(), ids), _seq_cls_logits(ours, ids), atol=1e-6)


def test_lora_delta_and_sparsify_units():
    from adapterhub.errors import FormatError
    from adapterhub.interop.lora import lora_delta, lora_scale, sparsify

    a = torch.tensor([[1.0, 2.0, 0.0]])  # (r=1, in=3)
    b = torch.tensor([[1.0], [-3.0]])  # (out=2, r=1)
    assert lora_scale(8, 4) == 2.0 and lora_scale(8, 4, use_rslora=True) == 4.0
    d = lora_delta(a, b, 2.0)
    assert torch.equal(d, torch.tensor([[2.0, 4.0, 0.0], [-6.0, -12.0, 0.0]]))
    assert torch.equal(lora_delta(a, b, 2.0, fan_in_fan_out=True), d.T)
    with pytest.raises(FormatError, match="do not chain"):
        lora_delta(a, torch.ones(2, 2), 1.0)
    p, err = sparsify(d, 2 / 6)  # keeps -12 and -6
    assert p.indices.tolist() == [3, 4] and p.values.tolist() == [-6.0, -12.0]
    assert err == pytest.approx(math.sqrt(4 + 16) / math.sqrt(4 + 16 + 36 + 144))
    p0, err0 = sparsify(torch.zeros(2, 3), 0.5)
    assert err0 == 0.0 and p0.nnz == 3

"""CLI tests (click CliRunner) for the catalog commands: output shapes, --json documents, error exits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adapterhub import format as fmt
from adapterhub.cli.main import cli
from catalog_util import BERT_TARGETS, LLAMA_TARGETS, all_commands, apply_dense, make_adapter, write_adapter


class Hub:
    """Runs the CLI against one home directory."""

    def __init__(self, home: Path, db_url: str | None = None) -> None:
        self.home = home
        self.db_url = db_url
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0):
        base = ["--home", str(self.home)] + (["--db", self.db_url] if self.db_url else [])
        r = self.runner.invoke(cli, base + [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == code, f"exit {r.exit_code} != {code}: {r.output}"
        return r

    def json(self, *args: str, code: int = 0):
        r = self(*args, "--json", code=code)
        return json.loads(r.stdout)


@pytest.fixture
def hub(home, tiny_bert_dir):
    h = Hub(home)
    h("base", "add", "tiny", str(tiny_bert_dir))
    return h


def test_init_and_db(home):
    from adapterhub.catalog.db import head_revision

    HEAD = head_revision()  # the newest migration (tests/test_migrations.py checks the chain)
    h = Hub(home)
    r = h("init")
    assert "initialised" in r.stdout
    doc = h.json("init")
    assert doc["revision"] == HEAD and doc["home"] == str(home)
    cur = h.json("db", "current")
    assert cur["current"] == cur["head"] == HEAD and cur["up_to_date"] is True
    r = h("db", "upgrade")
    assert f"{HEAD} -> {HEAD}" in r.stdout
    assert h("db", "current").stdout.strip() == f"{HEAD} (head)"
    r = h("db", "upgrade", "--revision", "zzz", code=1)
    assert "zzz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = Hub(home, db_url="nonsense://x")("list", code=1)
    assert "cannot use database URL" in r.stderr


def test_db_upgrade_on_empty_database(tmp_path):
    from adapterhub.catalog.db import head_revision

    HEAD = head_revision()
    h = Hub(tmp_path / "h2", db_url=f"sqlite:///{tmp_path / 'other.db'}")
    assert h.json("db", "current")["current"] is None
    assert f"empty -> {HEAD}" in h("db", "upgrade").stdout
    assert h.json("db", "current")["current"] == HEAD


def test_base_add_and_list(hub, tiny_bert_dir):
    bases = hub.json("base", "list")
    assert [b["name"] for b in bases] == ["tiny"]
    assert bases[0]["architecture"] == "BertModel" and len(bases[0]["fingerprint"]) == 64
    assert bases[0]["source"] == str(Path(tiny_bert_dir).resolve())
    assert "tiny" in hub("base", "list").stdout
    again = hub.json("base", "add", "tiny", str(tiny_bert_dir))
    assert again["fingerprint"] == bases[0]["fingerprint"]
    r = hub("base", "add", "tiny2", "/nonexistent/folder", code=1)
    assert r.stderr.startswith("Error:") and len(r.stderr.strip().splitlines()) == 1
    r = hub("base", "add", "../evil", str(tiny_bert_dir), code=2)
    assert "path separator" in r.stderr


def test_register_show_log_list(hub, tmp_path):
    f1 = write_adapter(tmp_path / "a1.safetensors", seed=1)
    f2 = write_adapter(tmp_path / "a2.safetensors", seed=2)
    assert hub("register", f1, "--name", "rt", "--task", "sentiment", "--base", "tiny").stdout.strip() == "rt@1"
    doc = hub.json("register", f2, "--name", "rt", "--task", "sentiment", "--base", "tiny")
    assert doc["ref"] == "rt@2" and doc["created"] is True and doc["source_format"] == "adapterhub"
    assert set(doc) >= {"content_hash", "mask", "kind", "task", "base", "base_fingerprint", "metrics", "tags"}
    assert doc["mask"]["nnz"] == make_adapter(seed=2).nnz and doc["mask"]["dtype"] == "fp32"
    # same content again: same version, nothing added
    again = hub.json("register", f2, "--name", "rt", "--task", "sentiment", "--base", "tiny")
    assert again["ref"] == "rt@2" and again["created"] is False
    show = hub.json("show", "rt")
    assert show["ref"] == "rt@2" and show["parents"] == []
    assert hub.json("show", "sha256:" + show["content_hash"][:10])["ref"] == "rt@2"
    r = hub("show", "rt@2")
    assert "rt@2" in r.stdout and show["content_hash"] in r.stdout
    log = hub.json("log", "rt")
    assert [v["ref"] for v in log] == ["rt@1", "rt@2"]
    assert "rt@1" in hub("log", "rt").stdout
    write_adapter(tmp_path / "m.safetensors", seed=3)
    hub("register", tmp_path / "m.safetensors", "--name", "mm", "--task", "qa", "--base", "tiny", "--kind", "merge")
    assert [v["ref"] for v in hub.json("list")] == ["mm@1", "rt@2", "rt@1"]
    assert [v["ref"] for v in hub.json("list", "--task", "sentiment")] == ["rt@2", "rt@1"]
    assert [v["ref"] for v in hub.json("list", "--kind", "merge")] == ["mm@1"]
    assert hub.json("list", "--base", "nope") == []
    assert len(hub.json("list", "--limit", "1")) == 1
    table = hub("list").stdout
    assert "rt@1" in table and "mm@1" in table


def test_tags(hub, tmp_path):
    for i in (1, 2):
        hub("register", write_adapter(tmp_path / f"a{i}.safetensors", seed=i), "--name", "rt", "--task", "t",
            "--base", "tiny")
    assert hub("tag", "rt@1", "prod").stdout.strip() == "rt@prod -> rt@1"
    assert hub.json("show", "rt@prod")["ref"] == "rt@1"
    assert hub.json("tag", "rt@2", "prod") == {"tag": "rt@prod", "ref": "rt@2"}
    assert hub.json("show", "rt@prod")["tags"] == ["prod"]
    assert hub("untag", "rt", "prod").stdout.strip() == "removed rt@prod"
    r = hub("show", "rt@prod", code=1)
    assert "no tag 'prod'" in r.stderr
    hub("untag", "rt", "prod", code=1)
    hub("tag", "rt@1", "../x", code=2)
    hub("tag", "rt@1", "12", code=2)  # would read as a version number: a usage error


def test_lineage_and_parents(hub, tmp_path):
    refs = []
    for i in range(4):
        f = write_adapter(tmp_path / f"l{i}.safetensors", seed=10 + i)
        args = ["register", f, "--name", f"n{i}", "--task", "t", "--base", "tiny"]
        if i == 1:
            args += ["--parent", "n0@1"]
        if i == 3:
            args += ["--parent", "n1", "--relation", "merged_from", "--parent", "n2@1", "--relation", "unlearns"]
        refs.append(hub(*args).stdout.strip())
    show = hub.json("show", "n3")
    assert sorted((p["parent"], p["relation"]) for p in show["parents"]) == [("n1@1", "merged_from"), ("n2@1", "unlearns")]
    doc = json.loads(hub("lineage", "n3", "--format", "json").stdout)
    assert doc["root"] == "n3@1" and doc["direction"] == "ancestors"
    assert {(e["child"], e["parent"], e["relation"], e["depth"]) for e in doc["edges"]} == {
        ("n3@1", "n1@1", "merged_from", 1), ("n3@1", "n2@1", "unlearns", 1), ("n1@1", "n0@1", "finetuned_from", 2)}
    assert hub.json("lineage", "n3") == doc
    hub("lineage", "n3", "--json", "--format", "dot", code=2)
    down = json.loads(hub("lineage", "n0", "--descendants", "--format", "json").stdout)
    assert {e["child"] for e in down["edges"]} == {"n1@1", "n3@1"}
    text = hub("lineage", "n3").stdout
    assert "n0@1" in text and "merged_from" in text and text.splitlines()[0] == "n3@1"
    mer = hub("lineage", "n3", "--format", "mermaid").stdout
    assert mer.startswith("graph BT") and "-->|merged_from|" in mer
    dot = hub("lineage", "n3", "--format", "dot").stdout
    assert dot.startswith("digraph lineage") and '"n3@1" -> "n1@1" [label="merged_from"]' in dot
    assert "(no descendants)" in hub("lineage", "n3", "--descendants").stdout
    hub("lineage", "n3", "--format", "png", code=2)
    # a --relation before any --parent is misuse
    r = hub("register", tmp_path / "l0.safetensors", "--name", "x", "--task", "t", "--base", "tiny",
            "--relation", "unlearns", "--parent", "n0", code=2)
    assert "--relation must follow a --parent" in r.stderr
    r = hub("register", tmp_path / "l0.safetensors", "--name", "x", "--task", "t", "--base", "tiny",
            "--parent", "ghost@1", code=1)
    assert "unknown adapter 'ghost'" in r.stderr


def test_diff(hub, tmp_path):
    a = make_adapter(seed=1, density=0.3)
    b = make_adapter(seed=2, density=0.3)
    fmt.save_file(a, tmp_path / "a.safetensors")
    fmt.save_file(b, tmp_path / "b.safetensors")
    hub("register", tmp_path / "a.safetensors", "--name", "a", "--task", "t", "--base", "tiny")
    hub("register", tmp_path / "b.safetensors", "--name", "b", "--task", "t", "--base", "tiny")
    doc = hub.json("diff", "a", "b")
    assert doc["a"] == "a@1" and doc["b"] == "b@1"
    for p in doc["params"]:
        ma, mb = a.params[p["name"]].mask(), b.params[p["name"]].mask()
        inter, union = int((ma & mb).sum()), int((ma | mb).sum())
        assert (p["intersection"], p["union"]) == (inter, union)
        assert p["jaccard"] == pytest.approx(inter / union)
        both = ma & mb
        da, db = a.params[p["name"]].to_dense()[both], b.params[p["name"]].to_dense()[both]
        assert p["max_abs_diff"] == pytest.approx(float((da - db).abs().max()), rel=1e-6)
    self_doc = hub.json("diff", "a", "a")
    assert self_doc["total"]["jaccard"] == 1.0 and all(p["cosine"] == pytest.approx(1.0) for p in self_doc["params"])
    assert "TOTAL" in hub("diff", "a", "b").stdout
    hub("diff", "a", "zzz", code=1)
    hub("diff", "a", code=2)


def test_export_and_diff_progress(hub, tmp_path, monkeypatch):
    """`export --format peft` and `diff` read an adapter tensor by tensor (seconds at 8B): with
    ADAPTERHUB_PROGRESS_AFTER=0 they report their phases on stderr up to the last tensor; --json keeps it quiet."""
    import re

    a = make_adapter(seed=1, density=0.3)
    fmt.save_file(a, tmp_path / "a.safetensors")
    hub("register", tmp_path / "a.safetensors", "--name", "a", "--task", "t", "--base", "tiny")
    monkeypatch.setenv("ADAPTERHUB_PROGRESS_AFTER", "0")
    n = len(a.params)
    r = hub("export", "a", tmp_path / "peft", "--format", "peft")
    assert re.findall(r"\[(\w+)\]", r.stderr)[0] == "counting" and f"{n}/{n} tensors [writing]" in r.stderr
    assert r.stderr.index("[counting]") < r.stderr.index("[writing]")
    r = hub("diff", "a", "a")
    assert f"{n}/{n} tensors [comparing]" in r.stderr and "TOTAL" in r.stdout
    r = hub("diff", "a", "a", "--json")
    assert r.stderr == "" and json.loads(r.stdout)["total"]["jaccard"] == 1.0


def test_verify_and_gc(hub, home, tmp_path):
    hub("register", write_adapter(tmp_path / "a.safetensors", seed=1), "--name", "a", "--task", "t", "--base", "tiny")
    hub("register", write_adapter(tmp_path / "b.safetensors", seed=2), "--name", "b", "--task", "t", "--base", "tiny")
    doc = hub.json("verify")
    assert doc == {"checked": 2, "problems": [], "orphans": []}
    assert "ok" in hub("verify", "a").stdout
    # an orphan blob: gc removes it, verify only mentions it
    from adapterhub.store import BlobStore

    store = BlobStore(home / "blobs" / "sha256")
    orphan = store.put_bytes(b"not referenced")
    (store.root / "ab").mkdir(exist_ok=True)
    (store.root / "ab" / ".x.tmp").write_bytes(b"half written")
    assert hub.json("verify")["orphans"] == [orphan]
    rep = hub.json("verify", "--repair", "--grace", "3600")
    assert rep["ok"] is True and rep["kept_recent_orphans"] == [orphan] and store.has(orphan)
    hub("verify", "a", "--repair", code=2)
    dry = hub.json("gc", "--dry-run")
    assert dry["removed"] == [orphan] and store.has(orphan)
    res = hub.json("gc")
    assert res["removed"] == [orphan] and res["temp_files_removed"] == 1 and not store.has(orphan)
    assert "removed 0 blob(s)" in hub("gc").stdout
    # corruption: verify exits 1 naming the version
    h = hub.json("show", "b")["content_hash"]
    p = store.path(h)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    r = hub("verify", code=1)
    assert "PROBLEM b@1" in r.stdout and "corrupt" in r.stdout
    bad = hub.json("verify", code=1)
    assert len(bad["problems"]) == 1 and bad["problems"][0].startswith("b@1:")
    hub("verify", "a")
    hub("export", "b", tmp_path / "b.out", code=1)
    r = hub("verify", "--repair", code=1)
    assert "PROBLEM b@1" in r.stdout
    p.unlink()
    assert "missing" in hub("verify", "b", code=1).stdout
    (store.root / "cd").mkdir(exist_ok=True)
    (store.root / "cd" / ".y.tmp").write_bytes(b"half")
    orphan2 = store.put_bytes(b"another orphan")
    rep = hub.json("verify", "--repair", code=1)
    assert rep["removed_blobs"] == [orphan2] and rep["temp_files_removed"] == 1 and not store.has(orphan2)


def test_export_safetensors(hub, tmp_path):
    hub("register", write_adapter(tmp_path / "a.safetensors", seed=1, dtype=torch.bfloat16), "--name", "a",
        "--task", "t", "--base", "tiny")
    info = hub.json("show", "a")
    doc = hub.json("export", "a", tmp_path / "out.safetensors")
    data = (tmp_path / "out.safetensors").read_bytes()
    assert fmt.sha256_hex(data) == info["content_hash"] == doc["content_hash"]
    (tmp_path / "dir").mkdir()
    r = hub("export", "a@1", tmp_path / "dir")
    assert (tmp_path / "dir" / "a-v1.safetensors").read_bytes() == data and "a@1 ->" in r.stdout


def _peft_outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_peft_matches_our_apply(arch, dtype, home, tmp_path, tiny_bert_dir, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    folder, targets = (tiny_bert_dir, BERT_TARGETS) if arch == "bert" else (tiny_llama_dir, LLAMA_TARGETS)
    h = Hub(home)
    h("base", "add", "b", str(folder))
    adapter = make_adapter(targets, density=0.2, seed=5, dtype=dtype, scale=0.5)
    # one layer denser than the others, so padding to a common rank is exercised
    first = sorted(targets)[0]
    adapter.params[first] = make_adapter({first: targets[first]}, density=0.45, seed=6, dtype=dtype,
                                         scale=0.5).params[first]
    fmt.save_file(adapter, tmp_path / "a.safetensors")
    h("register", tmp_path / "a.safetensors", "--name", "a", "--task", "t", "--base", "b")
    doc = h.json("export", "a", tmp_path / "peft", "--format", "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file() and doc["r"] >= 1
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and sorted(cfg["target_modules"]) == sorted(t[:-7] for t in targets)

    load = AutoModel.from_pretrained if arch == "bert" else AutoModelForCausalLM.from_pretrained
    ours = load(str(folder)).eval()
    apply_dense(ours, adapter)
    peft_model = PeftModel.from_pretrained(load(str(folder)), str(tmp_path / "peft")).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    base_out = _peft_outputs(load(str(folder)).eval(), ids)
    a, b = _peft_outputs(ours, ids), _peft_outputs(peft_model, ids)
    assert not torch.allclose(a, base_out, atol=1e-4)  # the adapter changes something
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # merged weights agree bit for bit with our dense apply (SHiRA adds the delta in the weight's dtype)
    merged = peft_model.merge_and_unload()
    sd = dict(merged.named_parameters())
    for name in targets:
        assert torch.equal(sd[name], dict(ours.named_parameters())[name]), name
    # ... and a PEFT folder imports back to the same deltas (padding entries are explicit zeros)
    h("register", tmp_path / "peft", "--name", "back", "--task", "t", "--base", "b")
    back = h.json("show", "back")
    assert any(p["relation"] == "imported_from" for p in back["parents"])


def test_export_peft_refusals(hub, tmp_path):
    ad = make_adapter({"embeddings.LayerNorm.weight": (32,)}, density=0.5)
    fmt.save_file(ad, tmp_path / "ln.safetensors")
    hub("register", tmp_path / "ln.safetensors", "--name", "ln", "--task", "t", "--base", "tiny")
    r = hub("export", "ln", tmp_path / "p", "--format", "peft", code=1)
    assert "embeddings.LayerNorm.weight" in r.stderr and "Linear" in r.stderr
    ad = make_adapter({"embeddings.word_embeddings.weight": (128, 32)}, density=0.1)
    fmt.save_file(ad, tmp_path / "emb.safetensors")
    hub("register", tmp_path / "emb.safetensors", "--name", "emb", "--task", "t", "--base", "tiny")
    r = hub("export", "emb", tmp_path / "p", "--format", "peft", code=1)
    assert "not an nn.Linear weight" in r.stderr
    ad = make_adapter(density=0.1, extras={"heads.t.weight": torch.randn(2, 32)})
    fmt.save_file(ad, tmp_path / "h.safetensors")
    hub("register", tmp_path / "h.safetensors", "--name", "h", "--task", "t", "--base", "tiny")
    hub("export", "h", tmp_path / "p", "--format", "peft")  # the head goes beside it (tests/test_interop_peft.py)
    hub("export", "h", tmp_path / "p", "--format", "peft", "--drop-extras")
    hub("export", "h", tmp_path / "p", "--format", "onnx", code=2)


def test_register_peft_shira_folder(home, tmp_path, tiny_llama_dir):
    """A PEFT SHiRA adapter imports with the same deltas PEFT computes, and the same outputs."""
    from peft import PeftModel, ShiraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    pm = get_peft_model(model, ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False,
                                           random_seed=3))
    pm.save_pretrained(str(tmp_path / "shira"))
    h = Hub(home)
    h("base", "add", "ll", str(tiny_llama_dir))
    doc = h.json("register", tmp_path / "shira", "--name", "imp", "--task", "lm", "--base", "ll")
    assert doc["source_format"] == "peft-shira" and doc["mask"]["method"] == "peft-shira-random"
    from adapterhub.workspace import Workspace

    with Workspace.open(home) as ws:
        ad = ws.load_adapter("imp")
        assert ws.parents("imp")[0]["relation"] == "imported_from"
    assert sorted(ad.params) == sorted(
        f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    for name, p in ad.params.items():
        module = pm.get_submodule("base_model.model." + name[:-7])
        torch.testing.assert_close(p.to_dense(), module.get_delta_weight("default").to_dense(), rtol=0, atol=0)
    ours = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    apply_dense(ours, ad)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(tmp_path / "shira")).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_peft_outputs(ours, ids), _peft_outputs(ref, ids), atol=1e-5, rtol=1e-5)


def test_register_bad_peft_folders(home, tmp_path, tiny_llama_dir):
    from safetensors.torch import save_file

    h = Hub(home)
    h("base", "add", "ll", str(tiny_llama_dir))
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    assert "only SHIRA" in h("register", d, "--name", "x", "--task", "t", "--base", "ll", code=1).stderr
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "SHIRA", "r": 1}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = {
        "out of range": {key + ".shira_indices": torch.tensor([[0, 40], [1, 2]], dtype=torch.int32),
                         key + ".shira_weight": torch.ones(2)},
        "does not match": {key + ".shira_indices": torch.tensor([[0, 1, 2], [1, 2, 3]], dtype=torch.int32),
                           key + ".shira_weight": torch.ones(2)},
        "NaN": {key + ".shira_indices": torch.tensor([[0, 1], [1, 2]], dtype=torch.int32),
                key + ".shira_weight": torch.tensor([1.0, float("nan")])},
        "missing": {key + ".shira_weight": torch.ones(2)},
        "no tensor": {"base_model.model.nowhere.shira_indices": torch.tensor([[0], [1]], dtype=torch.int32),
                      "base_model.model.nowhere.shira_weight": torch.ones(1)},
    }
    for msg, tensors in cases.items():
        save_file(tensors, str(d / "adapter_model.safetensors"))
        r = h("register", d, "--name", "x", "--task", "t", "--base", "ll", code=1)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert "not a valid safetensors file" in h("register", d, "--name", "x", "--task", "t", "--base", "ll", code=1).stderr
    assert h.json("list") == []


def test_usage_errors(hub, tmp_path):
    f = write_adapter(tmp_path / "a.safetensors")
    hub("register", f, "--task", "t", "--base", "tiny", code=2)  # missing --name
    hub("register", tmp_path / "missing.safetensors", "--name", "a", "--task", "t", "--base", "tiny", code=2)
    r = hub("register", f, "--name", "a/b", "--task", "t", "--base", "tiny", code=2)
    assert "path separator" in r.stderr
    hub("register", f, "--name", "x" * 101, "--task", "t", "--base", "tiny", code=2)
    hub("register", f, "--name", "a", "--task", "t", "--base", "tiny", "--kind", "weird", code=2)
    hub("show", "not a ref!", code=2)
    hub("show", "sha256:xyz", code=2)
    hub("show", "ghost", code=1)
    hub("log", "ghost", code=1)
    hub("no-such-command", code=2)
    hub("register", f, "--name", "a", "--task", "t", "--base", "nobase", code=1)
    hub("list", "--limit", "0", code=2)


def test_json_is_one_document(hub, tmp_path):
    """--json writes exactly one JSON document to stdout, even when a notice goes to stderr."""
    f = write_adapter(tmp_path / "a.safetensors")
    hub("register", f, "--name", "a", "--task", "t", "--base", "tiny")
    r = hub("register", f, "--name", "a", "--task", "t", "--base", "tiny", "--json")
    assert json.loads(r.stdout)["created"] is False and "already" in r.stderr
    for args in (["list"], ["show", "a"], ["log", "a"], ["base", "list"], ["db", "current"], ["verify"],
                 ["gc", "--dry-run"], ["diff", "a", "a"], ["init"], ["lineage", "a"]):
        r = hub(*args, "--json")
        json.loads(r.stdout)


COMMANDS = sorted(all_commands(cli))


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_every_command_has_help(path):
    cmd = cli
    for part in path:
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    assert cmd.help and len(cmd.help.strip()) > 10, f"{' '.join(path)} has no help text"
    r = CliRunner().invoke(cli, list(path) + ["--help"])
    assert r.exit_code == 0 and "Usage:" in r.output

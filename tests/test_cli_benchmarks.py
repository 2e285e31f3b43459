"""The catalog/format benchmark scripts still run (tiny sizes; no timings asserted, only that they work)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_format_bytes_smoke():
    out = _run("benchmarks/format_bytes.py", "--shapes", "64x512", "--densities", "0.01,0.5", "--repeat", "1")
    rows = [line for line in out.splitlines() if line.startswith("| 64x512")]
    assert len(rows) == 2 and all("| 2.000 | 8.000 | 8.000 | 4.00x |" in r for r in rows)


def test_catalog_scale_smoke():
    out = _run("benchmarks/catalog_scale.py", "--n", "300", "--n-small", "150", "--repeat", "2")
    assert "lineage, 100 deep" in out and "hop-by-hop" in out


def test_gpu_check_script_names_what_exists():
    """benchmarks/gpu_check.sh runs only on a lent GPU machine, so a stale module or script name in it would go
    unnoticed until that run: every ``-m MODULE`` it names must be importable, every benchmark script and test
    file it names must exist, and the scripts' own ``--device`` choice must accept ``cuda``."""
    import importlib.util
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    modules = set(re.findall(r"-m ([A-Za-z_][\w.]*)", text)) - {"pytest"}
    assert modules, "no -m MODULE found"
    for m in modules:
        assert importlib.util.find_spec(m) is not None, m
    paths = set(re.findall(r"((?:benchmarks|tests)/[\w/]+\.py)", text))
    assert {"benchmarks/apply_revert.py", "benchmarks/scale.py", "tests/test_patching_device.py"} <= paths
    for p in paths:
        assert (ROOT / p).is_file(), p
    for script in ("benchmarks/apply_revert.py", "benchmarks/scale.py"):
        assert "--device" in _run(script, "--help")


def test_cli_startup_fragment_is_what_its_json_gives(tmp_path):
    """docs/bench/cli_startup.md is generated from the run's JSON (the full run needs the 135M checkpoint and
    minutes); regenerating it from that JSON gives the committed text, and every adapter-moving command is
    recorded as running without torch."""
    import json

    _run("benchmarks/cli_startup.py", "--md-only", "--md", str(tmp_path / "f.md"))
    assert (tmp_path / "f.md").read_text() == (ROOT / "docs" / "bench" / "cli_startup.md").read_text()
    doc = json.loads((ROOT / "docs" / "bench" / "cli_startup.json").read_text())
    moving = [k for k in doc["commands"] if k.split("`")[1].split()[0] in ("register", "push", "pull", "hub")
              or k.startswith("`export` (our file")]
    assert len(moving) == 6 and not any(doc["commands"][k]["imports_torch"]["this"] for k in moving)


def test_streamed_checkpoint_has_save_pretrained_layout(tmp_path, monkeypatch):
    """benchmarks/scale.py writes its 8B checkpoint tensor by tensor (it cannot hold the model twice in memory).
    On a tiny shape the folder it writes has what ``save_pretrained`` writes: the same tensor names, shapes and
    dtype, an index naming each tensor's shard, several shards when the limit is small, a config that
    ``transformers`` loads the weights with (no missing or unexpected keys), and our own reader's shapes."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from adapterhub.bases.sources import tensor_shapes

    tiny = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 96, "tie_word_embeddings": False}
    monkeypatch.setitem(scale.SHAPES, "tiny", tiny)
    monkeypatch.setitem(scale.STREAMED, "tiny", "0.00005GB")  # 50 kB shards: several of them
    scale.build(tmp_path / "streamed", "tiny")
    ref = LlamaForCausalLM(LlamaConfig(**tiny, max_position_embeddings=8192)).to(torch.bfloat16)
    ref.save_pretrained(tmp_path / "ref", max_shard_size="50KB")

    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    shapes = tensor_shapes(tmp_path / "streamed")
    assert shapes == tensor_shapes(tmp_path / "ref")
    assert index["metadata"]["total_size"] == sum(2 * torch.Size(s).numel() for s in shapes.values())
    model, info = LlamaForCausalLM.from_pretrained(tmp_path / "streamed", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sd = model.state_dict()
    assert sd["model.norm.weight"].eq(1).all() and 0.01 < float(sd["model.layers.0.mlp.up_proj.weight"].float().std()) < 0.03

"""No code execution from data.

1. A static scan (AST, not grep, so ``model.eval()`` and docstrings do not count) of every source file in
   ``adapterhub/`` and ``cli/``: no pickle-family imports, no ``torch.load`` without ``weights_only=True``,
   no builtin ``eval``/``exec``/``compile``/``__import__``, no ``numpy.load(allow_pickle=True)``, no
   ``yaml.load`` without a safe loader, no ``trust_remote_code=True``. The scanner is tested on bad samples
   so it cannot pass vacuously.
2. At run time, pickle files planted as adapters (``.bin``, ``.pt``, a ``.safetensors`` name on pickle
   bytes, a PEFT folder with ``adapter_model.bin``, a base folder with only ``pytorch_model.bin``) are
   refused by the real CLI with a one-line message pointing to safetensors, and the payload (which would
   create a marker file if it were ever unpickled) never runs.
"""
from __future__ import annotations

import ast
import os
import pickle  # tests only: to build the malicious payloads the product must refuse
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "pickletools"}
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def scan_source(src: str, filename: str = "<src>") -> list[str]:
    """Findings (``file:line: what``) for code that could execute code from data."""
    tree = ast.parse(src, filename)
    out: list[str] = []
    torch_load_names = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    out.append(f"{filename}:{node.lineno}: imports {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in PICKLE_MODULES:
                out.append(f"{filename}:{node.lineno}: imports from {node.module}")
            if node.module == "torch":
                for a in node.names:
                    if a.name == "load":
                        torch_load_names.add(a.asname or "load")
        elif isinstance(node, ast.Call):
            fn = _dotted(node.func)
            if isinstance(node.func, ast.Name) and node.func.id in BANNED_BUILTINS:
                out.append(f"{filename}:{node.lineno}: calls {node.func.id}()")
            if fn in torch_load_names and not _is_true(_kw(node, "weights_only")):
                out.append(f"{filename}:{node.lineno}: {fn}() without weights_only=True")
            if fn in ("np.load", "numpy.load") and _is_true(_kw(node, "allow_pickle")):
                out.append(f"{filename}:{node.lineno}: {fn}(allow_pickle=True)")
            if fn in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or "Safe" not in _dotted(loader):
                    out.append(f"{filename}:{node.lineno}: {fn}() without a SafeLoader")
            if fn in ("yaml.unsafe_load", "yaml.full_load"):
                out.append(f"{filename}:{node.lineno}: {fn}()")
            if _is_true(_kw(node, "trust_remote_code")):
                out.append(f"{filename}:{node.lineno}: trust_remote_code=True")
            if fn.endswith("from_pretrained") and _kw(node, "use_safetensors") is not None and \
                    isinstance(_kw(node, "use_safetensors"), ast.Constant) and _kw(node, "use_safetensors").value is False:
                out.append(f"{filename}:{node.lineno}: from_pretrained(use_safetensors=False)")
        elif isinstance(node, ast.Attribute) and _dotted(node).split(".")[0] in PICKLE_MODULES:
            out.append(f"{filename}:{node.lineno}: uses {_dotted(node)}")
    return out


def _sources() -> list[Path]:
    files = sorted((ROOT / "adapterhub").rglob("*.py")) + sorted((ROOT / "cli").rglob("*.py"))
    assert len(files) > 10
    return files


def test_scanner_flags_bad_code():
    bad = {
        "import pickle\n": "imports pickle",
        "from dill import loads\n": "imports from dill",
        "import torch\ntorch.load('x')\n": "without weights_only",
        "import torch\ntorch.load('x', weights_only=False)\n": "without weights_only",
        "from torch import load as L\nL('x')\n": "without weights_only",
        "eval('1+1')\n": "calls eval()",
        "exec('x=1')\n": "calls exec()",
        "import numpy as np\nnp.load('x', allow_pickle=True)\n": "allow_pickle",
        "import yaml\nyaml.load(open('x'))\n": "SafeLoader",
        "import yaml\nyaml.load(open('x'), Loader=yaml.Loader)\n": "SafeLoader",
        "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)\n": "trust_remote_code",
        "import joblib\n": "imports joblib",
    }
    for src, what in bad.items():
        found = scan_source(src)
        assert found and any(what in f for f in found), (src, found)
    ok = ("import torch\ntorch.load('x', weights_only=True)\nmodel.eval()\nx = 'pickle'\n"
          "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\n")
    assert scan_source(ok) == []


def test_no_code_execution_from_data_in_sources():
    findings = []
    for f in _sources():
        findings += scan_source(f.read_text(), str(f.relative_to(ROOT)))
    assert findings == [], "\n".join(findings)


# -- run time ---------------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates the marker file: proof that something unpickled our data."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ADAPTERHUB_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "adapterhub.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.e2e
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, tiny_bert_dir):
    home = tmp_path / "home"
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(marker))
    r = _cli(home, "base", "add", "tiny", str(tiny_bert_dir))
    assert r.returncode == 0, r.stderr

    cases = []
    for name in ("evil.bin", "evil.pt", "evil.pth", "evil.ckpt", "evil.pkl", "evil.safetensors"):
        p = tmp_path / name
        p.write_bytes(payload)
        cases.append(p)
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"peft_type": "SHIRA", "r": 4, "target_modules": ["query"]}')
    (peft / "adapter_model.bin").write_bytes(payload)
    cases.append(peft)
    for p in cases:
        r = _cli(home, "register", str(p), "--name", "evil", "--task", "t", "--base", "tiny")
        assert r.returncode == 1, (p, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, err
        if p.suffix != ".safetensors":
            assert ("safetensors" in err or "safe_serialization" in err) and ("pickle" in err or "refused" in err), err
    # a base folder with only pickle weights
    bad_base = tmp_path / "bad_base"
    bad_base.mkdir()
    (bad_base / "config.json").write_text((tiny_bert_dir / "config.json").read_text())
    (bad_base / "pytorch_model.bin").write_bytes(payload)
    r = _cli(home, "base", "add", "badbase", str(bad_base))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "safetensors" in r.stderr
    assert not marker.exists(), "a pickle payload was executed"
    r = _cli(home, "list", "--json")
    assert r.returncode == 0 and "evil" not in r.stdout, r.stdout  # nothing half-registered


def test_library_refuses_pickle_suffixes(tmp_path):
    from adapterhub import format as fmt
    from adapterhub.errors import FormatError

    marker = tmp_path / "PWNED"
    for suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".BIN"):
        p = tmp_path / f"a{suffix}"
        p.write_bytes(pickle.dumps(_Payload(marker)))
        with pytest.raises(FormatError, match="safetensors"):
            fmt.load_file(p)
    p = tmp_path / "a.safetensors"
    p.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(FormatError):
        fmt.load_file(p)
    assert not marker.exists()

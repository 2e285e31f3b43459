"""The library's import graph has no cycles, and the CLI and ``adapterhub/__init__.py`` start without torch.

The graph is read from the source (``import``/``from ... import`` statements anywhere in a module,
lazy function-level imports included, since a lazy cycle is still a cycle of concerns): module A
depends on B when A imports ``adapterhub.B`` or ``.B`` (or a name from the package that is a module).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "adapterhub"


def _modules() -> dict[str, Path]:
    """Dotted name (relative to the package, '' for __init__) -> file."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (edges to the package itself are left out)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        pkg_parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        pkg_parts = [x for x in pkg_parts if x]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name[len("adapterhub."):] for a in node.names if a.name.startswith("adapterhub.")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg_parts[:len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                    mod = ".".join(base + ([node.module] if node.module else []))
                elif node.module and (node.module == "adapterhub" or node.module.startswith("adapterhub.")):
                    mod = node.module[len("adapterhub."):] if node.module != "adapterhub" else ""
                else:
                    continue
                targets = [mod]
                targets += [f"{mod}.{a.name}".lstrip(".") for a in node.names]  # `from . import format`
            for t in targets:
                while t and t not in mods:  # `from .catalog.models import X` -> catalog.models
                    t = t.rpartition(".")[0]
                if t and t in mods and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_known_edges():
    g = import_graph()
    assert "fused.federated" in g["fused.unlearning"] and "training.model" in g["fused.federated"]
    assert "format" in g["training.loop"] and "training.model" in g["training.loop"]
    assert "merging.methods" in g["merging.driver"] and "catalog.records" in g["merging.driver"]


def test_no_import_cycles_in_the_library():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_federated_never_imports_unlearning():
    assert "fused.unlearning" not in import_graph()["fused.federated"]


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_init_and_cli_stay_torch_free():
    code = ("import sys; import adapterhub, adapterhub.training.config, adapterhub.maskhash, adapterhub.cli.main; "
            "from adapterhub.cli.main import cli; cli.get_command(None, 'train'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"



def orm_imports(src: str, pkg_parts: list[str]) -> list[str]:
    """What source ``src`` of a module in package ``adapterhub.<pkg_parts>`` imports of SQLAlchemy or the ORM
    models (dotted names; relative imports resolved; lazy, function-level imports count too)."""
    out = []
    for node in ast.walk(ast.parse(src)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)]
                mod = ".".join(["adapterhub", *base] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [mod] if _is_orm(mod) else [f"{mod}.{a.name}" for a in node.names]  # `from ..catalog import models`
        out += [n for n in names if _is_orm(n)]
    return out


def _is_orm(name: str) -> bool:
    return name == "sqlalchemy" or name.startswith("sqlalchemy.") or name == "adapterhub.catalog.models"


def test_only_the_catalog_and_the_workspace_use_the_orm():
    """Domain modules take a Workspace and go through it: SQLAlchemy and the ORM models are imported only
    in ``adapterhub/catalog/`` and ``adapterhub/workspace.py``."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "workspace.py" or (PKG / "catalog") in path.parents:
            continue
        for name in orm_imports(path.read_text(encoding="utf-8"), list(path.relative_to(PKG).parent.parts)):
            offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_orm_imports_finds_every_spelling():
    src = ("import sqlalchemy\nfrom sqlalchemy.orm import Session\nfrom ..catalog.models import Deployment\n"
           "def f():\n    from ..catalog import models\n    from adapterhub.catalog.models import Tag\n"
           "from ..catalog.records import VersionInfo\nfrom .models import X\n")
    assert orm_imports(src, ["apply"]) == ["sqlalchemy", "sqlalchemy.orm", "adapterhub.catalog.models",
                                           "adapterhub.catalog.models", "adapterhub.catalog.models"]

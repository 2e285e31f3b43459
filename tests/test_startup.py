"""Catalog commands start fast: importing the CLI and the catalog API must not import torch."""
from __future__ import annotations

import json
import subprocess
import sys

import torch  # this process may; the commands run in fresh processes below

from fresh_cli import run_fresh


def test_cli_and_catalog_api_do_not_import_torch(tmp_path):
    """Nor PostgreSQL's dialect (~26 ms) for a SQLite catalog at head (creating one runs the migrations, which
    name both dialects' types)."""
    from adapterhub.workspace import Workspace

    with Workspace.open(tmp_path / "home"):
        pass
    code = ("import sys; import adapterhub.cli.main, adapterhub.workspace, adapterhub.store, adapterhub.format, "
            "adapterhub.hub.client, adapterhub.interop.export, adapterhub.interop.modules; "
            "from adapterhub.cli.main import cli; "
            "from click.testing import CliRunner; "
            "r = CliRunner().invoke(cli, ['--home', sys.argv[1], 'list', '--json']); "
            "assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules, 'sqlalchemy.dialects.postgresql' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


def test_lazy_choices_still_validate_and_list():
    from click.testing import CliRunner

    from adapterhub.cli.main import cli

    r = CliRunner().invoke(cli, ["merge", "a", "b", "--method", "nope", "--name", "x"])
    assert r.exit_code == 2 and "uniform-sparse" in r.output
    r = CliRunner().invoke(cli, ["train", "--help"])
    assert r.exit_code == 0 and "connection-sensitivity" in r.output


def _imports_torch(tiny_llama_dir, tmp_path, body: str) -> bool:
    """Run ``body`` (CLI calls on a home with base ``b``; ``cli``, ``CliRunner`` and the home ``h`` in scope) in a
    fresh process; whether torch ended up imported."""
    from adapterhub.workspace import Workspace

    home = tmp_path / "home"
    with Workspace.open(home) as ws:
        ws.add_base("b", str(tiny_llama_dir))
    code = ("import sys, json; from adapterhub.cli.main import cli; from click.testing import CliRunner\n"
            "h = sys.argv[1]\n" + body + "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False"), out.stdout
    return out.stdout.strip() == "True"


def test_deploy_read_and_bookkeeping_commands_do_not_import_torch(tmp_path, tiny_llama_dir):
    """deploy create / list / history / verify / rm run without torch (issue 19: costs follow the adapter);
    only the commands that patch weights import it."""
    assert not _imports_torch(tiny_llama_dir, tmp_path, (
        "for args in (['create', 'd', '--base', 'b'], ['list', '--json'], ['history', 'd', '--json'],\n"
        "             ['verify', 'd', '--json'], ['rm', 'd', '--json']):\n"
        "    r = CliRunner().invoke(cli, ['--home', h, 'deploy', *args])\n"
        "    assert r.exit_code == 0, (args, r.output)\n"))


def test_gc_verify_and_repair_of_clean_deployments_do_not_import_torch(tmp_path, tiny_llama_dir):
    """gc, verify and verify --repair look at every deployment (temp files, weights, markers, undo records)
    without torch; torch is imported only to undo an interrupted write (a WAL in the folder)."""
    assert not _imports_torch(tiny_llama_dir, tmp_path, (
        "r = CliRunner().invoke(cli, ['--home', h, 'deploy', 'create', 'd', '--base', 'b'])\n"
        "assert r.exit_code == 0, r.output\n"
        "out = {}\n"
        "for args in (['gc', '--json'], ['verify', '--json'], ['verify', '--repair', '--json']):\n"
        "    r = CliRunner().invoke(cli, ['--home', h, *args])\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
        "    out[args[-2]] = json.loads(r.stdout)\n"
        "assert out['verify']['problems'] == [], out\n"))


def test_the_command_collects_garbage_less_often_than_python_by_default():
    """``main`` (the ``adapterhub`` script and ``python -m adapterhub.cli.main``) raises the collector's first
    threshold, so a command does not re-examine the modules it imported every 700 new objects; the process still
    collects (the threshold is finite) and the older generations keep Python's own."""
    code = ("import gc, sys; default = gc.get_threshold(); sys.argv = ['adapterhub', '--version']\n"
            "from adapterhub.cli.main import GC_THRESHOLD, main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(default, gc.get_threshold(), GC_THRESHOLD, gc.isenabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "(700, 10, 10) (100000, 10, 10) 100000 True"


def test_export_of_our_own_file_does_not_import_torch(tmp_path, tiny_bert_dir):
    """``export --format safetensors`` is a verified copy of the store's blob: it runs without torch (0.5 s
    instead of ~1.9 s through the CLI); the PEFT export decodes the adapter and imports it."""
    from adapterhub import format as fmt
    from adapterhub.workspace import Workspace
    from catalog_util import make_adapter

    home = tmp_path / "home"
    with Workspace.open(home) as ws:
        base = ws.add_base("tiny", str(tiny_bert_dir))
        a = make_adapter(density=0.2, seed=1)
        a.card = {"base": {"name": "tiny", "fingerprint": base.fingerprint}, "task": "t", "kind": "expert"}
        fmt.save_file(a, tmp_path / "a.safetensors")
        v = ws.register(tmp_path / "a.safetensors", name="a", task="t", base="tiny")
        blob = ws.adapter_bytes(v)
    imported, _ = run_fresh(home, ["export", "a@1", str(tmp_path / "out.safetensors"), "--json"])
    assert not imported
    assert (tmp_path / "out.safetensors").read_bytes() == blob


def test_register_of_our_own_file_does_not_import_torch(tmp_path, tiny_bert_dir):
    """``register FILE`` of an adapterhub file (here with a dense head) validates it on numpy views of its bytes and
    stores it as it is: no torch (through the CLI ~0.55 s against ~1.7 s with the import). The stored blob is the
    file, and the catalog records what the full load reads."""
    from adapterhub import format as fmt
    from adapterhub.workspace import Workspace
    from catalog_util import make_adapter

    home = tmp_path / "home"
    with Workspace.open(home) as ws:
        base = ws.add_base("tiny", str(tiny_bert_dir))
    a = make_adapter(density=0.2, seed=2, dtype=torch.bfloat16,
                     extras={"heads.t.weight": torch.randn(3, 8, generator=torch.Generator().manual_seed(0))})
    a.card = {"base": {"name": "tiny", "fingerprint": base.fingerprint}, "task": "t", "kind": "expert"}
    fmt.save_file(a, tmp_path / "a.safetensors")
    imported, (out,) = run_fresh(home, ["register", str(tmp_path / "a.safetensors"), "--name", "a", "--task", "t",
                                        "--base", "tiny", "--json"])
    doc = json.loads(out)
    assert not imported
    assert (doc["source_format"], doc["mask"]["dtype"], doc["mask"]["nnz"]) == ("adapterhub", "bf16", a.nnz)
    with Workspace.open(home) as ws:
        assert ws.adapter_bytes("a@1") == (tmp_path / "a.safetensors").read_bytes()
        assert ws.resolve("a@1").mask_hash == a.mask_hash()



def test_unknown_deployments_and_refs_are_reported_before_torch_is_imported(tmp_path, tiny_llama_dir):
    """apply, revert, rollback, diff and merge name an unknown deployment or REF in one line, exit 1, without first paying
    for the patching code's import of torch."""
    assert not _imports_torch(tiny_llama_dir, tmp_path, (
        "r = CliRunner().invoke(cli, ['--home', h, 'deploy', 'create', 'd', '--base', 'b'])\n"
        "assert r.exit_code == 0, r.output\n"
        "for args, want in ((['deploy', 'apply', 'nope', 'x@1'], \"unknown deployment 'nope'\"),\n"
        "                   (['deploy', 'apply', 'd', 'x@1'], \"unknown adapter 'x'\"),\n"
        "                   (['deploy', 'revert', 'd', 'x@1'], \"unknown adapter 'x'\"),\n"
        "                   (['deploy', 'rollback', 'nope', '--to', '0'], \"unknown deployment 'nope'\"),\n"
        "                   (['diff', 'x@1', 'y@1'], \"unknown adapter 'x'\"),\n"
        "                   (['merge', 'x@1', 'y@1', '--method', 'ties', '--name', 'm'], \"unknown adapter 'x'\")):\n"
        "    r = CliRunner().invoke(cli, ['--home', h, *args])\n"
        "    assert r.exit_code == 1 and want in r.output and len(r.output.strip().splitlines()) == 1, (args, r.output)\n"))


def test_lazy_module_imports_on_first_attribute_and_then_steps_aside():
    """The stand-in ``adapterhub.format`` keeps for torch: nothing imported until an attribute is read; then the
    real module replaces the stand-in in the namespace, so later reads are plain module attribute reads."""
    import types

    from adapterhub._lazy import lazy_module

    name = "adapterhub_lazy_probe"
    mod = types.ModuleType(name)
    mod.VALUE = 41
    ns: dict = {}
    sys.modules.pop(name, None)
    stand_in = lazy_module(name, ns)
    ns[name] = stand_in
    assert name not in sys.modules and ns[name] is stand_in
    sys.modules[name] = mod  # what an import of it finds from now on
    try:
        assert stand_in.VALUE == 41 and ns[name] is mod
        assert lazy_module(name, {}) is mod  # already imported: the module itself, no stand-in
    finally:
        sys.modules.pop(name, None)


def test_help_of_train_and_merge_lists_the_registries_without_torch(tmp_path, tiny_llama_dir):
    """``train --help`` and ``merge --help`` list the mask and merge methods from their registries, whose modules
    import torch on first use, not at import: help is read without paying for it."""
    assert not _imports_torch(tiny_llama_dir, tmp_path, (
        "for args, want in ((['train', '--help'], 'connection-sensitivity'), (['merge', '--help'], 'breadcrumbs')):\n"
        "    r = CliRunner().invoke(cli, args)\n"
        "    assert r.exit_code == 0 and want in r.output, (args, r.output)\n"))

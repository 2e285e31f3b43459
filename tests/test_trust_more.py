"""More trust-boundary cases, found by attacking the real CLI: hostile base folders, PEFT folders, special
files given to ``register``, symlinks planted inside the home, hard links in deployments, hostile metrics,
tampered catalog rows.

Each case asserts a one-line failure (or a harmless success), no traceback, and nothing changed in a
sandbox that holds the home and a victim outside it (``trust_util.tree_snapshot``).
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from adapterhub.apply import deployments as dep
from adapterhub.errors import AdapterHubError, CatalogError
from adapterhub.workspace import Workspace
from catalog_util import home_snapshot, make_adapter
from trust_util import assert_no_traceback, assert_one_line_failure, diff_snapshots, run_cli, tree_snapshot


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A folder holding the home (``home``) and a victim file outside it."""
    s = tmp_path / "sandbox"
    s.mkdir()
    (s / "victim.txt").write_text("do not touch")
    return s


def _hostile_base(sandbox: Path, base_dir: Path, name: str) -> Path:
    d = sandbox / name
    shutil.copytree(base_dir, d)
    return d


# -- base folders ---------------------------------------------------------------------------------


CONFIGS = {
    "non-object": b"[1, 2, 3]",
    "nesting-bomb": b"[" * 100_000 + b"]" * 100_000,
    "non-utf8": b"\xff\xfe{}",
    "huge-int": b'{"architectures": ["BertModel"], "x": ' + b"1" * 5000 + b"}",
    "arch-int": b'{"architectures": 5}',
    "arch-dict": b'{"architectures": {"a": 1}}',
    "model-type-list": b'{"model_type": [1]}',
    "arch-control": json.dumps({"architectures": ["A\x1b[31m\nB"]}).encode(),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_base_add_with_hostile_config_json(sandbox, tiny_bert_dir, kind):
    """A config.json that is not a well-formed object gives no architecture, never a crash or a stored oddity."""
    folder = _hostile_base(sandbox, tiny_bert_dir, "base")
    (folder / "config.json").write_bytes(CONFIGS[kind])
    home = sandbox / "home"
    before = tree_snapshot(sandbox, skip=(home,))
    r = run_cli(home, "base", "add", "b", str(folder), "--json")
    assert_no_traceback(r)
    assert r.returncode == 0, r.output
    with Workspace.open(home) as ws:
        assert ws.get_base("b", resolve_path=False).architecture is None
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []


def test_base_add_with_a_fifo_or_device_shard_does_not_hang(sandbox, tiny_bert_dir):
    """A FIFO (or a symlink to /dev/zero) named like a weights shard is refused in one line; nothing waits."""
    home = sandbox / "home"
    for i, plant in enumerate((lambda p: os.mkfifo(p), lambda p: p.symlink_to("/dev/zero"))):
        folder = _hostile_base(sandbox, tiny_bert_dir, f"bases/base{i}")
        plant(folder / "model-00002.safetensors")
        skip = (home, sandbox / "bases")  # (a snapshot would itself block on the FIFO)
        before = tree_snapshot(sandbox, skip=skip)
        r = run_cli(home, "base", "add", f"b{i}", str(folder), timeout=60)
        assert_one_line_failure(r, contains="cannot read")
        assert diff_snapshots(before, tree_snapshot(sandbox, skip=skip)) == []


def test_base_folder_index_json_and_outside_symlinks_decide_nothing(sandbox, tiny_bert_dir):
    """Shard index entries naming ../../x or absolute paths are ignored (weights are the folder's own
    *.safetensors); a deployment made from a base whose weights file is a symlink holds a real copy."""
    folder = _hostile_base(sandbox, tiny_bert_dir, "base")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "../../victim.txt", "y": str(sandbox / "victim.txt")}}))
    outside = sandbox / "real_weights.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    (folder / "model.safetensors").symlink_to(outside)
    home = sandbox / "home"
    before = tree_snapshot(sandbox, skip=(home,))
    for args in (("base", "add", "b", str(folder)), ("deploy", "create", "prod", "--base", "b")):
        r = run_cli(home, *args)
        assert r.returncode == 0, r.output
    weights = home / "deployments" / "prod" / "model.safetensors"
    assert weights.is_file() and not weights.is_symlink()
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []


def test_deploy_create_refuses_special_files_and_folder_loops_in_the_base(sandbox, tiny_bert_dir):
    """Copying the base into a deployment never follows a symlinked folder (a loop) and never streams a
    device (tokenizer.json -> /dev/zero would fill the disk): one line, no deployment, nothing left."""
    home = sandbox / "home"
    plants = {"loop": lambda d: (d / "sub").symlink_to(d, target_is_directory=True),
              "device": lambda d: (d / "tokenizer.json").symlink_to("/dev/zero"),
              "fifo": lambda d: os.mkfifo(d / "vocab.txt")}
    for i, (kind, plant) in enumerate(sorted(plants.items())):
        folder = _hostile_base(sandbox, tiny_bert_dir, f"bases/{kind}")
        with Workspace.open(home) as ws:
            ws.add_base(f"b{i}", str(folder))
        plant(folder)
        before = tree_snapshot(sandbox, skip=(sandbox / "bases", home))  # (would block on the FIFO)
        rows = home_snapshot(home)[1]
        r = run_cli(home, "deploy", "create", f"d{i}", "--base", f"b{i}", timeout=60)
        assert_one_line_failure(r, contains="base folder")
        assert diff_snapshots(before, tree_snapshot(sandbox, skip=(sandbox / "bases", home))) == []
        assert home_snapshot(home)[1] == rows
        assert list((home / "deployments").iterdir()) == []  # no half-copied folder or temp left


# -- register FILE / PEFT folders -----------------------------------------------------------------


def test_register_special_files_are_refused_without_hanging(sandbox, tiny_bert_dir):
    home = sandbox / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
    hostile = sandbox / "hostile"
    hostile.mkdir()
    fifo = hostile / "pipe.safetensors"
    os.mkfifo(fifo)
    loop = hostile / "loop.safetensors"
    loop.symlink_to(loop)
    zero = hostile / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    before = tree_snapshot(sandbox, skip=(home, hostile))  # (a snapshot would itself block on the FIFO)
    rows = home_snapshot(home)
    for f, why in ((fifo, "FIFO"), (zero, "device")):
        r = run_cli(home, "register", str(f), "--name", "a", "--task", "t", "--base", "tiny", timeout=60)
        assert_one_line_failure(r, contains=why)
    r = run_cli(home, "register", str(loop), "--name", "a", "--task", "t", "--base", "tiny", timeout=60)
    assert r.returncode != 0  # click's own usage error ("does not exist")
    assert_no_traceback(r)
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home, hostile))) == []
    assert home_snapshot(home) == rows


@pytest.fixture
def peft_world(sandbox, tiny_bert_dir):
    """(home, a good exported PEFT SHiRA folder) — the home has base ``tiny`` and version ``ex@1``."""
    home = sandbox / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        ws.register(make_adapter(seed=0), name="ex", task="t", base="tiny")
    good = sandbox / "good_peft"
    r = run_cli(home, "export", "ex@1", str(good), "--format", "peft")
    assert r.returncode == 0, r.output
    return home, good


def _peft_with(sandbox: Path, good: Path, name: str, cfg: bytes) -> Path:
    d = sandbox / name
    shutil.copytree(good, d)
    (d / "adapter_config.json").write_bytes(cfg)
    return d


def test_register_peft_folder_with_hostile_adapter_config(sandbox, peft_world):
    home, good = peft_world
    cfg = json.loads((good / "adapter_config.json").read_text())
    bad = {
        "nesting-bomb": (b"[" * 100_000 + b"]" * 100_000, "nested"),
        "huge-int": (json.dumps(cfg).replace('"r": ', '"r": ' + "9" * 5000 + ', "rr": ').encode(), "valid JSON"),
        "non-utf8": (b"\xff\xfe", "UTF-8"),
        "peft-type-huge": (json.dumps({**cfg, "peft_type": "X" * 1_000_000}).encode(), "only SHIRA"),
        "peft-type-dict": (json.dumps({**cfg, "peft_type": {"a": [1]}}).encode(), "only SHIRA"),
    }
    before = tree_snapshot(sandbox, skip=(home,))
    rows = home_snapshot(home)
    for name, (data, why) in sorted(bad.items()):
        d = _peft_with(sandbox, good, name, data)
        r = run_cli(home, "register", str(d), "--name", "imp", "--task", "t", "--base", "tiny")
        assert_one_line_failure(r, contains=why)
        assert len(r.stderr) < 400, r.stderr  # the hostile value is clipped, not echoed whole
        shutil.rmtree(d)
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []
    assert home_snapshot(home) == rows


def test_peft_config_values_are_never_used_and_are_sanitised(sandbox, peft_world):
    """base_model_name_or_path naming a local folder is not loaded or touched; odd values are dropped from
    the card (None), so nothing the folder says ends up as a path, a huge number or a control character."""
    home, good = peft_world
    trap = sandbox / "trap_model"
    trap.mkdir()
    (trap / "config.json").write_text("{}")
    cfg = json.loads((good / "adapter_config.json").read_text())
    cfg.update(base_model_name_or_path=[str(trap)], r=10 ** 40, peft_version="\x1b[31mred",
               mask_type={"x": "\x1b[2J"}, target_modules={"weird": 1})
    d = _peft_with(sandbox, good, "odd", json.dumps(cfg).encode())
    before = tree_snapshot(sandbox, skip=(home,))
    r = run_cli(home, "register", str(d), "--name", "imp", "--task", "t", "--base", "tiny", "--json")
    assert r.returncode == 0, r.output
    with Workspace.open(home) as ws:
        card = ws.load_adapter(ws.resolve("imp@1")).card
    assert card["imported"] == {"format": "peft-shira", "peft_version": None, "r": None,
                                "base_model_name_or_path": None, "module_prefix": None, "task_type": None}
    assert card["mask"]["method"] == "peft-shira-random"
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []


def test_export_peft_never_calls_a_non_model_class_named_by_the_base_config(tmp_path, tiny_bert_dir, monkeypatch):
    """The base's config.json names the class export instantiates; anything but a transformers model class
    (here a function) is never called."""
    import transformers

    from adapterhub.interop.peft import _linear_weights

    folder = tmp_path / "base"
    shutil.copytree(tiny_bert_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    called = []
    monkeypatch.setattr(transformers, "evil_function", lambda *a, **k: called.append(a), raising=False)
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["evil_function"]}))
    assert _linear_weights(folder) is None
    assert called == []


# -- symlinks and hard links planted inside the home -----------------------------------------------


def test_symlinked_deployments_dir_does_not_redirect_create(sandbox, tiny_bert_dir):
    home = sandbox / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
    elsewhere = sandbox / "elsewhere"
    elsewhere.mkdir()
    (home / "deployments").symlink_to(elsewhere, target_is_directory=True)
    volatile = (home / "catalog.db", home / "home-id", home / ".home-id.lock")
    before = tree_snapshot(sandbox, skip=volatile)
    rows = home_snapshot(home)[1]
    r = run_cli(home, "deploy", "create", "prod", "--base", "tiny")
    assert_one_line_failure(r, contains="symlink")
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=volatile)) == []
    assert home_snapshot(home)[1] == rows


def test_hard_linked_deployment_weights_are_not_patched(sandbox, tiny_bert_dir):
    """A hard link planted in place of the weights (same inode as a file outside) is refused in one line."""
    home = sandbox / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        ws.register(make_adapter(seed=0), name="ex", task="t", base="tiny")
        w = dep.create(ws, "prod", "tiny").path / "model.safetensors"
    victim = sandbox / "victim.safetensors"
    shutil.copy(w, victim)
    w.unlink()
    os.link(victim, w)
    before = tree_snapshot(sandbox, skip=(home,))
    r = run_cli(home, "deploy", "apply", "prod", "ex@1")
    assert_one_line_failure(r, contains="hard link")
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []


def test_export_through_a_symlink_planted_in_the_home_replaces_the_link(sandbox, tiny_bert_dir):
    """OUT is the user's choice; a symlink someone planted at that name inside the home is replaced (atomic
    rename), its target outside is never written."""
    home = sandbox / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        ws.register(make_adapter(seed=0), name="ex", task="t", base="tiny")
    out = home / "out.safetensors"
    out.symlink_to(sandbox / "victim.txt")
    before = tree_snapshot(sandbox, skip=(home,))
    r = run_cli(home, "export", "ex@1", str(out))
    assert r.returncode == 0, r.output
    assert out.is_file() and not out.is_symlink()
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []


# -- values given through the library ----------------------------------------------------------------


@pytest.mark.parametrize("metrics", [
    {"acc": 10 ** 5000}, {"a\x00b": 1.0}, {(1, 2): 1.0}, {"x": "a\x00b"}, {"deep": json.loads("[" * 100 + "]" * 100)},
    {"big": "x" * 2_000_000}, {"obj": object()},
])
def test_hostile_metrics_are_catalog_errors_and_change_nothing(home, tiny_bert_dir, metrics):
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        ws.register(make_adapter(seed=0), name="ex", task="t", base="tiny")
        before = home_snapshot(home)
        with pytest.raises(CatalogError) as e:
            ws.register(make_adapter(seed=1), name="ex", task="t", base="tiny", metrics=metrics)
        assert "\n" not in str(e.value) and len(str(e.value)) < 200
        with pytest.raises(CatalogError):
            ws.update_metrics("ex@1", metrics)
        assert home_snapshot(home)[1] == before[1]


def test_long_task_names_are_clipped_in_the_error(home, tiny_bert_dir):
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        with pytest.raises(AdapterHubError) as e:
            ws.register(make_adapter(seed=0), name="ex", task="t" * 100_000, base="tiny")
        assert len(str(e.value)) < 200


# -- a catalog edited by hand ---------------------------------------------------------------------------


def test_tampered_catalog_rows_never_make_gc_delete_outside_the_store(sandbox, tiny_bert_dir):
    """Someone with DB access sets a version's blob hash to a path and a deployment's path to a victim
    folder: commands that meet them fail in one line; gc and verify --repair delete nothing outside."""
    home = sandbox / "home"
    with Workspace.open(home) as ws:
        ws.add_base("tiny", str(tiny_bert_dir))
        ws.register(make_adapter(seed=0), name="ex", task="t", base="tiny")
        ws.register(make_adapter(seed=1), name="ex2", task="t", base="tiny")
        dep.create(ws, "prod", "tiny")
    victim_dir = sandbox / "victim_dir"
    shutil.copytree(home / "deployments" / "prod", victim_dir, ignore=shutil.ignore_patterns(".adapterhub"))
    db = sqlite3.connect(home / "catalog.db")
    db.execute("UPDATE adapter_versions SET content_hash = ? WHERE id = 1", ("../../../victim.txt",))
    db.execute("UPDATE deployments SET path = ?, rel_path = ?", (str(victim_dir), "../victim_dir"))
    db.commit()
    db.close()
    before = tree_snapshot(sandbox, skip=(home,))
    for args in (("show", "ex@1"), ("export", "ex@1", str(home / "x.safetensors")),
                 ("deploy", "apply", "prod", "ex2@1"), ("deploy", "verify", "prod")):
        r = run_cli(home, *args)
        assert_no_traceback(r)
        if r.returncode:
            assert_one_line_failure(r)
    for args in (("gc",), ("verify", "--repair")):
        assert_no_traceback(run_cli(home, *args))
    assert diff_snapshots(before, tree_snapshot(sandbox, skip=(home,))) == []

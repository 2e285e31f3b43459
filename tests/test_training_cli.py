"""`adapterhub tasks|train|eval` through the CLI: JSON output, errors, nothing registered on failure,
and `eval --deployment` on a materialised folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adapterhub.cli.main import cli
from adapterhub.data import BUILTIN_TASKS
from adapterhub.workspace import Workspace
from test_training_util import sentiment_rows, tiny_model, write_csv

torch.set_num_threads(1)
FAST = ["--steps", "6", "--select-steps", "2", "--reselect-every", "2", "--batch-size", "8", "--max-length", "24",
        "--max-eval-examples", "12", "--lr", "0.01"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_model("bert", tmp_path_factory.mktemp("cli_bert") / "bert")


@pytest.fixture
def env(tmp_path, bert_dir):
    home = tmp_path / "h"
    ws = Workspace.open(home)
    ws.add_base("tb", str(bert_dir))
    ws.close()
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(60))
    return home, csv


def run(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def _versions(home):
    with Workspace.open(home) as ws:
        return ws.list_versions()


def test_tasks_json_lists_every_builtin_task(tmp_path):
    r = run(tmp_path / "h", "tasks", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {d["name"] for d in doc} == set(BUILTIN_TASKS)
    rt = next(d for d in doc if d["name"] == "rt-sentiment")
    assert rt["rows"] == {"train": 3891, "validation": 486, "test": 486} and rt["labels"] == ["rotten", "fresh"]
    assert len(rt["files"][0]["sha256"]) == 64
    r = run(tmp_path / "h", "tasks")
    assert r.exit_code == 0 and "trec-coarse" in r.stdout


def test_train_then_eval_json(env):
    home, csv = env
    r = run(home, "train", "--base", "tb", "--dataset", f"csv:{csv}", "--name", "toy", "--density", "0.2",
            "--granularity", "block", "--block-size", "8", *FAST, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["ref"] == "toy@1" and doc["mask"]["granularity"] == "block" and doc["mask"]["block_size"] == 8
    assert doc["mask"]["method"] == "connection-sensitivity" and doc["training_config"]["steps"] == 6
    assert "validation_accuracy" in doc["metrics"]
    r = run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--split", "validation", "--json")
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["n"] == 6 and ev["split"] == "validation"
    assert _versions(home)[0].metrics["validation_accuracy"] == ev["accuracy"]
    r = run(home, "train", "--base", "tb", "--dataset", f"csv:{csv}", "--name", "toy", *FAST)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == "toy@2"


def test_eval_deployment_reads_the_deployment_folder(env, bert_dir, tmp_path):
    home, csv = env
    assert run(home, "train", "--base", "tb", "--dataset", f"csv:{csv}", "--name", "toy", *FAST).exit_code == 0
    dep = tmp_path / "dep"
    shutil.copytree(bert_dir, dep)  # unpatched base weights: a different model than toy@1
    from sqlalchemy import select

    from adapterhub.catalog.models import BaseModel, Deployment
    with Workspace.open(home) as ws:
        with ws.session() as s:
            base = s.scalar(select(BaseModel).where(BaseModel.name == "tb"))
            s.add(Deployment(name="d1", base_id=base.id, path=str(dep), stack=[]))
    r = run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--deployment", "d1", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["model_dir"] == str(dep) and doc["deployment"] == "d1"
    assert doc["metric_keys"]["accuracy"] == "deployment:d1/test_accuracy"
    r = run(home, "eval", "toy@1", "--dataset", f"csv:{csv}", "--deployment", "nope")
    assert r.exit_code == 1 and "unknown deployment 'nope'" in r.output


@pytest.mark.parametrize("args,code,match", [
    (["--task", "nope"], 2, "unknown task 'nope'"),  # a usage error, found before torch is imported
    (["--task", "rt-sentiment", "--density", "0"], 2, "density must be in (0, 1]"),
    (["--task", "rt-sentiment", "--density", "1.01"], 2, "density must be in (0, 1]"),
    (["--task", "rt-sentiment", "--targets", "zzz"], 1, "matches no"),
    (["--task", "rt-sentiment", "--device", "cuda"], 1, "CUDA"),
    (["--dataset", "csv:MISSINGLABEL"], 1, "no label column"),
    (["--dataset", "csv:EMPTY"], 1, "no rows"),
    (["--task", "rt-sentiment", "--dataset", "csv:x"], 2, "exactly one"),
    (["--task", "rt-sentiment", "--base", "nobase"], 1, "unknown base"),
])
def test_train_bad_input(env, tmp_path, args, code, match):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA present")
    home, _ = env
    write_csv(tmp_path / "ml.csv", [("a", "x"), ("b", "y")], header=("text", "stars"))
    (tmp_path / "empty.csv").write_text("text,label\n")
    args = [a.replace("MISSINGLABEL", str(tmp_path / "ml.csv")).replace("EMPTY", str(tmp_path / "empty.csv"))
            for a in args]
    base = [] if "--base" in args else ["--base", "tb"]
    r = run(home, "train", *base, *args, *FAST)
    assert r.exit_code == code, r.output
    assert match in r.output
    assert "Traceback" not in r.output
    assert _versions(home) == []


def test_eval_bad_ref(env):
    home, _ = env
    r = run(home, "eval", "nope@1")
    assert r.exit_code == 1 and "unknown adapter" in r.output
    r = run(home, "eval")
    assert r.exit_code == 2


@pytest.mark.parametrize("cmd", ["tasks", "train", "eval"])
def test_help(cmd):
    r = CliRunner().invoke(cli, [cmd, "--help"])
    assert r.exit_code == 0 and "Example:" in r.output

"""CLI conventions (issue 15): exit 2 for usage errors before torch is imported, exit 1 for runtime
failures; ``name@latest`` / ``name@~N`` refs; ``deprecate`` and ``rm``; progress lines in logs; ref
completion; hash columns that do not wrap; ``eval --deployment`` with a REF outside the stack."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from adapterhub.catalog.records import Parent
from adapterhub.catalog.refs import Ref, parse_ref
from adapterhub.errors import CatalogError, NameError_, RefError
from catalog_util import make_adapter

# (argv, exit code, a fragment of the one "Error: ..." line). Usage errors: misuse found while
# parsing (click types, eager callbacks, option clashes at the top of the command body).
USAGE = [
    (["train", "--base", "minilm", "--task", "nosuch"], 2, "unknown task 'nosuch'"),
    (["train", "--base", "minilm"], 2, "give exactly one of --task or --dataset"),
    (["train", "--base", "minilm", "--task", "rt-sentiment", "--dataset", "csv:x.csv"], 2, "exactly one"),
    (["train", "--base", "minilm", "--dataset", "foo"], 2, "must look like csv:PATH"),
    (["train", "--base", "minilm", "--task", "rt-sentiment", "--name", "rt+spam"], 2, "adapter name 'rt+spam'"),
    (["train", "--base", "bad/base", "--task", "rt-sentiment"], 2, "base name"),
    (["eval", "x+y"], 2, "invalid ref 'x+y'"),
    (["eval"], 2, "give a REF (or --deployment NAME)"),
    (["eval", "rt@1", "--task", "nosuch"], 2, "unknown task"),
    (["eval", "rt@1", "--task", "rt-sentiment", "--dataset", "csv:x"], 2, "at most one of --task or --dataset"),
    (["eval", "rt@1", "--deployment", "a/b"], 2, "deployment name"),
    (["merge", "a", "b", "--method", "uniform-sparse", "--name", "rt+spam"], 2, "adapter name 'rt+spam'"),
    (["merge", "a", "--method", "uniform-sparse", "--name", "m"], 2, "merge needs at least two REFs"),
    (["merge", "a", "b@~z", "--method", "uniform-sparse", "--name", "m"], 2, "relative ref"),
    (["tag", "a@1", "rt+x"], 2, "tag 'rt+x'"),
    (["tag", "a@1", "latest"], 2, "reserved"),
    (["tag", "a@1", "3"], 2, "reserved"),
    (["untag", "a", "rt+x"], 2, "tag 'rt+x'"),
    (["show", "a@~"], 2, "relative ref"),
    (["show", "a@"], 2, "invalid ref"),
    (["deprecate", "x+y"], 2, "invalid ref"),
    (["rm", "sha256:12"], 2, "8 to 64 hex digits"),
    (["deploy", "create", "bad/name", "--base", "b"], 2, "deployment name"),
    (["deploy", "apply", "prod", "a@1", "--scale", "inf"], 2, "finite"),
    (["fed", "train", "--base", "m", "--task", "nosuch", "--clients", "2", "--name", "f"], 2, "unknown task"),
    (["list", "--kind", "nosuch"], 2, "nosuch"),
    # runtime failures: the command line is fine, the catalog says no
    (["show", "nosuch"], 1, "unknown adapter 'nosuch'"),
    (["show", "nosuch@latest"], 1, "unknown adapter 'nosuch'"),
    (["rm", "nosuch@1"], 1, "unknown adapter 'nosuch'"),
    (["deprecate", "nosuch@~1"], 1, "unknown adapter 'nosuch'"),
]

_RUNNER = textwrap.dedent("""
    import json, sys
    from click.testing import CliRunner
    from adapterhub.cli.main import cli
    out = []
    for argv in json.loads(sys.argv[1]):
        r = CliRunner().invoke(cli, argv)
        out.append({"code": r.exit_code, "output": r.output, "torch": "torch" in sys.modules,
                    "exc": None if r.exit_code in (0, 1, 2) else repr(r.exception)})
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def usage_results(tmp_path_factory) -> dict[str, dict]:
    """Every case of USAGE run, in order, in one fresh interpreter (torch never imported before)."""
    home = tmp_path_factory.mktemp("conv-home")
    env = {**os.environ, "ADAPTERHUB_HOME": str(home)}
    env.pop("ADAPTERHUB_DB_URL", None)
    argvs = [a for a, _, _ in USAGE]
    p = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    return {" ".join(a): r for a, r in zip(argvs, json.loads(p.stdout.strip().splitlines()[-1]), strict=True)}


@pytest.mark.parametrize("argv,code,fragment", USAGE, ids=[" ".join(a) for a, _, _ in USAGE])
def test_exit_codes_and_no_torch(usage_results, argv, code, fragment):
    r = usage_results[" ".join(argv)]
    assert r["code"] == code, r
    errors = [line for line in r["output"].splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], r["output"]
    assert "Traceback" not in r["output"]
    assert r["torch"] is False, f"{argv} imported torch before failing"


# -- refs: parse ----------------------------------------------------------------------------------

def test_parse_latest_and_relative():
    assert parse_ref("rt@latest") == parse_ref("rt") == Ref(name="rt")
    assert parse_ref("rt@~1") == Ref(name="rt", back=1) and str(parse_ref("rt@~1")) == "rt@~1"
    assert parse_ref("rt@~0") == Ref(name="rt", back=0)
    assert parse_ref("rt@~12") == Ref(name="rt", back=12)
    assert parse_ref("rt@latestish") == Ref(name="rt", tag="latestish")
    for bad in ("rt@~", "rt@~x", "rt@~-1", "rt@~1.5", "rt@~1~", "rt@~" + "9" * 10, "rt@~²"):
        with pytest.raises(RefError, match="relative ref"):
            parse_ref(bad)


# -- refs: resolution, deprecate, rm through the Workspace --------------------------------------

@pytest.fixture
def tws(ws, tiny_bert_dir):
    ws.add_base("tiny", str(tiny_bert_dir))
    for s in (1, 2, 3):
        ws.register(make_adapter(seed=s), name="rt", task="t", base="tiny")
    return ws


def test_resolve_latest_and_relative(tws):
    assert tws.resolve("rt@latest").ref == tws.resolve("rt").ref == "rt@3"
    assert [tws.resolve(f"rt@~{k}").ref for k in (0, 1, 2)] == ["rt@3", "rt@2", "rt@1"]
    with pytest.raises(RefError, match=r"rt@~3: rt has only 3 versions"):
        tws.resolve("rt@~3")
    with pytest.raises(RefError, match="unknown adapter 'nope'"):
        tws.resolve("nope@~1")
    with pytest.raises(NameError_, match="reserved"):
        tws.tag("rt@1", "latest")
    assert tws.ref_candidates("r") == ["rt"]
    tws.tag("rt@1", "prod")
    assert tws.ref_candidates("rt@") == ["rt@prod", "rt@latest", "rt@~1", "rt@3", "rt@2", "rt@1"]
    assert tws.ref_candidates("rt@p") == ["rt@prod"] and tws.ref_candidates("x") == []


def test_deprecate_hides_from_list_but_resolves(tws):
    h1 = tws.resolve("rt@1").content_hash
    tws.deprecate("rt@1")
    tws.deprecate("rt@1")  # idempotent
    assert tws.is_deprecated("rt@1") and not tws.is_deprecated("rt@2")
    assert [v.ref for v in tws.list_versions(include_deprecated=False)] == ["rt@3", "rt@2"]
    assert sorted(v.ref for v in tws.list_versions()) == ["rt@1", "rt@2", "rt@3"]
    assert tws.resolve("rt@1").ref == tws.resolve("sha256:" + h1[:10]).ref == "rt@1"
    assert tws.resolve("rt@~2").ref == "rt@1"  # relative refs count deprecated versions too
    tws.deprecate("rt@1", undo=True)
    assert not tws.is_deprecated("rt@1")


def test_rm_refuses_what_is_needed_then_removes(tws):
    tws.register(make_adapter(seed=9), name="child", task="t", base="tiny", parents=[Parent("rt@1")])
    with pytest.raises(CatalogError, match=r"rt@1 is a parent of child@1 \(lineage\)"):
        tws.remove("rt@1")
    tws.tag("rt@2", "prod")
    with pytest.raises(CatalogError, match="rt@2 is tagged prod; untag it first"):
        tws.remove("rt@2")
    with pytest.raises(CatalogError, match="rt@3 is the newest version of rt"):
        tws.remove("rt@3")
    tws.untag("rt", "prod")
    h2 = tws.resolve("rt@2").content_hash
    assert tws.remove("rt@2").ref == "rt@2"
    with pytest.raises(RefError, match="rt has no version 2"):
        tws.resolve("rt@2")
    assert tws.store.has(h2)  # the blob waits for gc
    assert tws.resolve("rt@~1").ref == "rt@1"
    assert tws.remove("child@1").ref == "child@1"  # an adapter's only version: the name goes too
    with pytest.raises(RefError, match="unknown adapter 'child'"):
        tws.resolve("child")
    assert tws.remove("rt@1").ref == "rt@1"  # no child any more


def test_rm_refuses_deployed_versions(tws):
    from adapterhub.apply import deployments as dep

    dep.create(tws, "srv", "tiny")
    dep.apply(tws, "srv", "rt@1")
    with pytest.raises(CatalogError, match="rt@1 is in deployment 'srv'.s stack"):
        tws.remove("rt@1")
    dep.revert(tws, "srv")
    with pytest.raises(CatalogError, match=r"deployment 'srv'.s history \(event 1"):
        tws.remove("rt@1")


def invoke(args, home):
    from adapterhub.cli.main import cli

    return CliRunner().invoke(cli, ["--home", str(home)] + args, catch_exceptions=False)


def test_cli_deprecate_rm_list_all(tws, home):
    r = invoke(["deprecate", "rt@~2"], home)
    assert r.exit_code == 0 and r.output.strip() == "deprecated rt@1"
    r = invoke(["list", "--json"], home)
    assert [v["ref"] for v in json.loads(r.output)] == ["rt@3", "rt@2"]
    r = invoke(["list", "--all", "--json"], home)
    assert [v["ref"] for v in json.loads(r.output)] == ["rt@3", "rt@2", "rt@1"]
    r = invoke(["show", "rt@1", "--json"], home)
    assert r.exit_code == 0 and json.loads(r.output)["ref"] == "rt@1"
    r = invoke(["rm", "rt@latest"], home)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "rt@3 is the newest version of rt" in r.output
    r = invoke(["rm", "rt@2", "--json"], home)
    assert r.exit_code == 0 and json.loads(r.output)["removed"] == "rt@2"


# -- completion -----------------------------------------------------------------------------------

def test_ref_shell_completion(tws, home):
    tws.tag("rt@2", "prod")
    env = {**os.environ, "_ADAPTERHUB_COMPLETE": "bash_complete", "COMP_WORDS": "adapterhub show rt@p",
           "COMP_CWORD": "2", "ADAPTERHUB_HOME": str(home)}
    code = "import sys; from adapterhub.cli.main import main; main()"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["plain,rt@prod"], p.stderr
    env["COMP_WORDS"], env["COMP_CWORD"] = "adapterhub --home " + str(home) + " deploy apply srv r", "6"
    env["ADAPTERHUB_HOME"] = str(home / "elsewhere")  # --home on the line wins
    p = subprocess.run([sys.executable, "-c", code + "; print('torch' in sys.modules)"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["plain,rt"], p.stderr
    env["COMP_WORDS"] = "adapterhub --home " + str(home / "none") + " show r"
    env["COMP_CWORD"] = "4"
    p = subprocess.run([sys.executable, "-c", "import sys\nfrom adapterhub.cli.main import cli\n"
                        "try:\n    cli(prog_name='adapterhub')\nexcept SystemExit:\n    pass\n"
                        "print('torch' in sys.modules)"], env=env, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["False"], p.stderr  # no catalog there: nothing, none created, no torch
    assert not (home / "none").exists()


# -- progress in logs -----------------------------------------------------------------------------

def test_log_progress_lines_and_phases(capsys):
    from cli.common import LogProgress, ProgressEvery, parse_progress_every

    now = [0.0]
    with LogProgress(ProgressEvery(percent=25, seconds=None), clock=lambda: now[0]) as bar:
        tid = bar.add_task("train rt", total=None, info="loading")
        for step in range(1, 21):
            now[0] += 1
            phase = "warm-up" if step <= 5 else "mask selection" if step <= 8 else "values-only"
            bar.update(tid, completed=step, total=20, info=f"loss 0.5000  [{phase}]")
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "train rt  loading  0s",
        "train rt  1/20 (5%)  loss 0.5000  [warm-up]  1s",  # a phase starts
        "train rt  5/20 (25%)  loss 0.5000  [warm-up]  5s",
        "train rt  6/20 (30%)  loss 0.5000  [mask selection]  6s",
        "train rt  9/20 (45%)  loss 0.5000  [values-only]  9s",
        "train rt  10/20 (50%)  loss 0.5000  [values-only]  10s",
        "train rt  15/20 (75%)  loss 0.5000  [values-only]  15s",
        "train rt  20/20 (100%)  loss 0.5000  [values-only]  20s",
    ]
    now[0] = 0.0
    with LogProgress(parse_progress_every("7s"), counts=False, clock=lambda: now[0]) as bar:
        tid = bar.add_task("eval rt@1", total=None, info="test split")
        for _ in range(10):
            now[0] += 2
            bar.update(tid, advance=1)
    assert capsys.readouterr().err.splitlines() == [
        "eval rt@1  test split  0s", "eval rt@1  test split  8s", "eval rt@1  test split  16s",
        "eval rt@1  test split  20s"]
    assert parse_progress_every("5%,60s,3") == ProgressEvery(5.0, 3, 60.0)
    for bad in ("0%", "x", "-3", "101%", "s"):
        with pytest.raises(Exception, match="ADAPTERHUB_PROGRESS_EVERY"):
            parse_progress_every(bad)


def test_progress_is_lines_when_not_a_tty(monkeypatch):
    from cli.common import LogProgress, progress

    assert isinstance(progress(), LogProgress)  # pytest captures stderr: not a terminal
    monkeypatch.setenv("ADAPTERHUB_PROGRESS_EVERY", "nonsense")
    with pytest.raises(Exception, match="ADAPTERHUB_PROGRESS_EVERY"):
        progress()


# -- tables ---------------------------------------------------------------------------------------

def test_no_wrap_columns_keep_hashes_whole(capsys, monkeypatch):
    from cli import common

    monkeypatch.setattr(common, "_term_width", lambda: 60)
    h = "0123456789abcdef" * 4
    row = [h, "word " * 40, "y " * 30]
    common.print_table(["hash", "note", "x"], [row], no_wrap=["hash"])
    assert h in capsys.readouterr().out  # whole, on one line; the other columns wrap
    common.print_table(["hash", "note", "x"], [row])
    assert h not in capsys.readouterr().out  # without no_wrap the hash folds mid-string


def test_loop_phase_names():
    from adapterhub.training.loop import SparseTrainer

    class Fake:
        pass

    t = Fake()
    t.sdm = Fake()
    t.method = Fake()
    t.cfg = Fake()
    t.sdm.dense, t.losses, t.warmup, t.freeze_step = {"w": torch.zeros(1)}, [], 10, 30
    t.method.reselect, t.cfg.reselect_every = True, 5
    assert SparseTrainer.phase(t) == "warm-up"
    t.sdm.dense, t.losses = {}, [0.0] * 10
    assert SparseTrainer.phase(t) == "mask selection"
    t.losses = [0.0] * 29
    assert SparseTrainer.phase(t) == "values-only"
    t.losses, t.method.reselect = [0.0] * 10, False
    assert SparseTrainer.phase(t) == "values-only"


# -- eval --deployment with a REF outside the stack --------------------------------------------

def test_eval_deployment_says_when_ref_is_not_in_the_stack(tmp_path):
    from adapterhub.workspace import Workspace
    from test_training_util import sentiment_rows, tiny_model, write_csv

    bert = tiny_model("bert", tmp_path / "bert")
    home = tmp_path / "h"
    with Workspace.open(home) as w:
        w.add_base("tb", str(bert))
    csv = write_csv(tmp_path / "toy.csv", sentiment_rows(60))
    fast = ["--steps", "6", "--select-steps", "2", "--reselect-every", "2", "--batch-size", "8",
            "--max-length", "24", "--max-eval-examples", "12", "--lr", "0.01"]
    for seed in ("1", "2"):
        r = invoke(["train", "--base", "tb", "--dataset", f"csv:{csv}", "--name", "toy", *fast, "--seed", seed,
                    "--json"], home)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["ref"] == f"toy@{seed}"
        assert "[warm-up]" in r.stderr and "[values-only]" in r.stderr  # progress lines name the phase
    assert invoke(["deploy", "create", "d1", "--base", "tb"], home).exit_code == 0
    r = invoke(["deploy", "apply", "d1", "toy@2"], home)
    assert r.exit_code == 0, r.output
    r = invoke(["eval", "toy@1", "--dataset", f"csv:{csv}", "--deployment", "d1", "--json"], home)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["in_stack"] is False
    assert "note: toy@1 is not in deployment d1's stack (toy@2)" in r.stderr
    r = invoke(["metrics", "toy@1", "--json"], home)
    assert r.exit_code == 0 and "deployment:d1" not in r.stdout  # nothing recorded on toy@1
    r = invoke(["eval", "toy@~0", "--dataset", f"csv:{csv}", "--deployment", "d1", "--json"], home)
    assert r.exit_code == 0 and json.loads(r.stdout)["in_stack"] is True and "note:" not in r.stderr
    r = invoke(["eval", "toy@1", "--dataset", f"csv:{csv}", "--deployment", "d1"], home)
    assert r.exit_code == 0 and "not in deployment d1's stack" in r.stdout  # the table's title says it too

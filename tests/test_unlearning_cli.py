"""`adapterhub fed train` / `adapterhub unlearn` end to end on a tiny BERT, then apply/revert on a deployment."""
from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

from adapterhub.cli.main import cli

pytestmark = pytest.mark.timeout(1200)  # generous: the CI box is shared


def run(home, *args, ok=True):
    r = CliRunner().invoke(cli, ["--home", str(home), *args])
    if ok:
        assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fed_train_unlearn_deploy_apply_revert(tmp_path, tiny_bert_dir):
    home = tmp_path / "h"
    run(home, "base", "add", "tiny", str(tiny_bert_dir))
    r = run(home, "fed", "train", "--base", "tiny", "--task", "trec-coarse", "--clients", "3", "--alpha", "1.0",
            "--rounds", "1", "--local-steps", "2", "--max-train", "60", "--max-test", "40", "--max-length", "16",
            "--name", "gfed", "--json")
    g = json.loads(r.stdout)
    assert g["kind"] == "expert" and g["ref"] == "gfed@1"
    assert g["federation"]["clients"] == 3 and len(g["federation"]["partition_hash"]) == 64
    assert g["training_config"]["federation"]["rounds"] == 1

    r = run(home, "unlearn", "gfed@1", "--forget", "class:NUM", "--layers", "2", "--density", "0.2", "--rounds", "1",
            "--max-eval", "20", "--name", "gfed-forget-num", "--json")
    u = json.loads(r.stdout)
    assert u["kind"] == "unlearning" and u["forget"]["spec"] == "class:NUM"
    assert len(u["critical_layers"]) == 2
    h = u["content_hash"]

    # show / lineage carry the hash and the forget spec
    show = json.loads(run(home, "show", u["ref"], "--json").stdout)
    assert show["content_hash"] == h
    assert show["training_config"]["forget"]["spec"] == "class:NUM"
    assert show["parents"][0]["relation"] == "unlearns" and show["parents"][0]["parent"] == "gfed@1"
    assert show["parents"][0]["params"]["forget"] == "class:NUM"
    lin = json.loads(run(home, "lineage", u["ref"], "--format", "json").stdout)
    assert "class:NUM" in json.dumps(lin) and "unlearns" in json.dumps(lin)

    # deployment: apply global, apply unlearning, revert unlearning -> global bytes exactly
    run(home, "deploy", "create", "prod", "--base", "tiny")
    weights = home / "deployments" / "prod" / "model.safetensors"
    base_sha = sha(weights)
    run(home, "deploy", "apply", "prod", "gfed@1")
    global_sha = sha(weights)
    assert global_sha != base_sha
    run(home, "deploy", "apply", "prod", u["ref"])
    assert sha(weights) not in (global_sha, base_sha)
    # evaluating the unlearning version alone means base + global + unlearning: the served model
    served = json.loads(run(home, "eval", u["ref"], "--deployment", "prod", "--max-examples", "16", "--json").stdout)
    alone = json.loads(run(home, "eval", u["ref"], "--max-examples", "16", "--json").stdout)
    assert alone["accuracy"] == served["accuracy"] and abs(alone["loss"] - served["loss"]) < 1e-5
    run(home, "deploy", "revert", "prod", u["ref"])
    assert sha(weights) == global_sha
    run(home, "deploy", "revert", "prod")
    assert sha(weights) == base_sha
    hist = json.loads(run(home, "deploy", "history", "prod", "--json").stdout)
    events = hist if isinstance(hist, list) else hist.get("events", [])
    assert [e["action"] for e in events if e.get("ref") == u["ref"]] == ["apply", "revert"]
    for e in events:  # history names the unlearning version's hash and forget spec
        if e.get("ref") == u["ref"]:
            assert e["content_hash"] == h and e["kind"] == "unlearning" and e["forget"] == "class:NUM"
        elif e.get("ref") == "gfed@1":
            assert e["forget"] is None and e["kind"] == "expert"
    table = run(home, "deploy", "history", "prod").stdout
    assert h[:12] in table and "class:NUM" in table


def test_unlearn_cli_bad_input_is_one_line_exit_1(tmp_path, tiny_bert_dir):
    home = tmp_path / "h"
    run(home, "base", "add", "tiny", str(tiny_bert_dir))
    run(home, "fed", "train", "--base", "tiny", "--task", "trec-coarse", "--clients", "2", "--rounds", "1",
        "--local-steps", "1", "--max-train", "40", "--max-test", "20", "--max-length", "12", "--name", "g")
    for args, msg in ((["--forget", "client:7"], "no client 7"), (["--forget", "class:NOPE"], "not a label"),
                      (["--forget", "client:0", "--layers", "99"], "larger than")):
        r = run(home, "unlearn", "g", *args, "--name", "u", ok=False)
        assert r.exit_code == 1, r.output
        assert msg in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    listing = json.loads(run(home, "list", "--json").stdout)
    refs = [v["ref"] for v in (listing if isinstance(listing, list) else listing.get("versions", []))]
    assert refs == ["g@1"]
    r = run(home, "unlearn", "nope", "--forget", "client:0", "--name", "u", ok=False)
    assert r.exit_code == 1

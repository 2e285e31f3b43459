"""`--engine flower` end to end: a real SuperLink and SuperNodes as separate processes on 127.0.0.1.

Budget: the two tests together take about 3-4 minutes on a shared 2-core machine (every Flower message
starts a ClientApp process that imports torch); they are part of `make test`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("flwr", reason="flwr is not installed: pip install 'adapterhub[federated]'")

from adapterhub.cli.main import cli
from flower_util import Cluster, alive

pytestmark = pytest.mark.timeout(600)

TRAIN = ["--task", "trec-coarse", "--clients", "3", "--alpha", "1.0", "--local-steps", "2", "--max-train", "60",
         "--max-test", "40", "--max-length", "16", "--density", "0.3", "--seed", "0"]


def run(home: Path, *args: str, ok: bool = True):
    r = CliRunner().invoke(cli, ["--home", str(home), *args])
    if ok:
        assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    return r


def doc(home: Path, *args: str) -> dict:
    return json.loads(run(home, *args).stdout)


def test_flower_train_and_unlearn_equal_the_local_engine(tmp_path, tiny_bert_dir):
    home = tmp_path / "coord"
    run(home, "base", "add", "tiny", str(tiny_bert_dir))
    cluster = Cluster(tmp_path)
    try:
        cluster.start_superlink()
        for cid in range(3):
            cluster.add_node(tmp_path / f"site{cid}", cid, str(tiny_bert_dir), "partition:trec-coarse")
        link = ["--engine", "flower", "--superlink", cluster.address, "--insecure", "--round-timeout", "120",
                "--connect-timeout", "90"]
        g = doc(home, "fed", "train", "--base", "tiny", *TRAIN, "--rounds", "2", "--name", "gfl", *link, "--json")
        u = doc(home, "unlearn", "gfl@1", "--forget", "client:0", "--layers", "2", "--density", "0.2", "--rounds", "1",
                "--max-eval", "40", "--name", "ufl", *link, "--json")
    finally:
        pids = cluster.stop()
    assert pids and not [p for p in pids if alive(p)], "a Flower process outlived the test"

    # the same request with the in-process engine: the same bytes (content hash), not merely close numbers
    gl = doc(home, "fed", "train", "--base", "tiny", *TRAIN, "--rounds", "2", "--name", "gloc", "--json")
    assert g["engine"] == "flower" and gl["engine"] == "local"
    assert g["content_hash"] == gl["content_hash"]
    ul = doc(home, "unlearn", "gfl@1", "--forget", "client:0", "--layers", "2", "--density", "0.2", "--rounds", "1",
             "--max-eval", "40", "--name", "uloc", "--json")
    assert u["content_hash"] == ul["content_hash"]
    assert u["critical_layers"] == ul["critical_layers"]

    # versions, lineage and the run record
    gs, us, uls = doc(home, "show", "gfl@1", "--json"), doc(home, "show", "ufl@1", "--json"), doc(home, "show", "uloc@1", "--json")
    assert gs["kind"] == "expert" and us["kind"] == "unlearning"
    assert us["parents"][0]["relation"] == "unlearns" and us["parents"][0]["parent"] == "gfl@1"
    assert us["parents"][0]["params"]["forget"] == "client:0"
    eng = gs["training_config"]["engine"]
    assert eng["engine"] == "flower" and [n["client_id"] for n in eng["nodes"]] == [0, 1, 2]
    assert [n["rows"] for n in eng["nodes"]] == gs["training_config"]["federation"]["client_sizes"]
    assert eng["refused"] == [] and eng["lost"] == []
    assert gs["training_config"]["layer_differences"] == doc(home, "show", "gloc@1", "--json")["training_config"]["layer_differences"]
    # federated evaluation: the forgotten client's node reported FA and its members' scores; equal to local
    for key in ("ra", "fa", "fa_n", "mia_auc", "mia_tpr_at_1pct_fpr", "mia_members", "mia_nonmembers"):
        assert us["metrics"][key] == uls["metrics"][key], key
        assert us["metrics"]["global"][key] == uls["metrics"]["global"][key], key
    assert us["metrics"]["forgotten_node"] == "present"
    # client 0's node answered the handshake and the evaluation; only clients 1 and 2 trained
    assert [n["client_id"] for n in us["training_config"]["engine"]["nodes"]] == [0, 1, 2]
    assert us["training_config"]["stats"]["client_updates"] == 2 * us["metrics"]["rounds"]

    # bytes from the messages: payload = exactly the fp32 state values both ways, every round, every node
    per_update = gs["training_config"]["stats"]["upload_values_per_update"]
    gm = gs["metrics"]
    assert gm["wire_payload_bytes"] == 2 * 2 * 3 * per_update * 4
    assert gm["wire_messages"] == 2 * (3 + 2 * 3)  # a query and two train rounds, each message and its reply
    assert 0 < gm["wire_framing_bytes"] < gm["wire_payload_bytes"]
    down = eng["bytes"]["down"]
    assert down["payload"] == 2 * 3 * per_update * 4 and down["messages"] == 9
    assert int(eng["superlink_bytes"]["sent"]) >= 0
    um = us["metrics"]
    assert um["wire_payload_bytes"] > 0 and um["wire_framing_bytes"] > 0
    assert um["bytes_total"] == uls["metrics"]["bytes_total"]  # the protocol's own count is the engine's too


def test_flower_node_lost_mid_round_and_a_node_with_other_labels_refused(tmp_path, tiny_bert_dir):
    home = tmp_path / "coord"
    run(home, "base", "add", "tiny", str(tiny_bert_dir))
    wrong = tmp_path / "spam.csv"
    wrong.write_text("text,label\n" + "".join(f"win a prize {i},spam\nsee you at {i},ham\n" for i in range(10)))
    cluster = Cluster(tmp_path)
    try:
        cluster.start_superlink()
        for cid in range(3):
            cluster.add_node(tmp_path / f"site{cid}", cid, str(tiny_bert_dir), "partition:trec-coarse")
        cluster.add_node(tmp_path / "site3", 3, str(tiny_bert_dir), f"csv:{wrong}")
        cluster.wait_connected(["node0", "node1", "node2", "node3"])  # all four answer the handshake
        base = [sys.executable, "-m", "adapterhub.cli.main", "--home", str(home), "fed", "train", "--base", "tiny",
                *TRAIN, "--engine", "flower", "--superlink", cluster.address, "--insecure", "--connect-timeout", "90"]
        coord = subprocess.Popen([*base, "--rounds", "1", "--min-nodes", "2", "--round-timeout", "30",
                                  "--name", "glost", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, text=True, env=cluster.env)
        # kill client 2's SuperNode (and its ClientApp) as soon as round 1 has been sent
        deadline = time.monotonic() + 240
        killed = False
        while time.monotonic() < deadline and coord.poll() is None and not killed:
            for p in (home / "cache" / "flower").glob("*/progress.jsonl"):
                if '"event": "round"' in p.read_text():
                    cluster.kill("node2")
                    killed = True
            time.sleep(0.2)
        assert killed, "the run never reached round 1"
        out, err = coord.communicate(timeout=240)
        assert coord.returncode == 0, err
        g = json.loads(out)
        assert "refused node client:3" in err and "labels" in err
        assert "lost client:2" in err
        # with too few nodes left the command fails with one line and registers nothing
        r = subprocess.run([*base, "--rounds", "1", "--min-nodes", "3", "--connect-timeout", "2", "--round-timeout", "60",
                            "--name", "gfail"], capture_output=True, text=True, stdin=subprocess.DEVNULL, env=cluster.env,
                           timeout=240)
    finally:
        pids = cluster.stop()
    assert pids and not [p for p in pids if alive(p)], "a Flower process outlived the test"
    show = doc(home, "show", g["ref"], "--json")
    eng = show["training_config"]["engine"]
    assert [n["client_id"] for n in eng["nodes"]] == [0, 1, 2]
    assert [(x["key"], x["kind"]) for x in eng["lost"]] == [(2, "train")]
    assert [x["client_id"] for x in eng["refused"]] == [3] and "not in the expected" in eng["refused"][0]["reason"]
    assert show["training_config"]["stats"]["client_updates"] == 2  # round 1 completed with clients 0 and 1
    assert sorted(show["training_config"]["layer_differences"]["per_client"]) == ["0", "1"]
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "fewer than the 3 required" in lines[0] and "client:3" in lines[0], r.stderr
    names = [v["name"] for v in json.loads(run(home, "list", "--json").stdout)]
    assert "gfail" not in names

"""The Flower engine's pieces that need no running federation: options, `fed node`, the round runner
contract (a client that leaves, too few clients), what a message weighs, and an unreachable SuperLink."""
from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from adapterhub.cli.main import cli


def run(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def test_engine_options_are_checked_before_anything_runs(tmp_path):
    r = run(tmp_path, "fed", "train", "--base", "b", "--task", "trec-coarse", "--clients", "3", "--name", "g",
            "--engine", "flower")
    assert r.exit_code == 2 and "needs --superlink" in r.output
    r = run(tmp_path, "fed", "train", "--base", "b", "--task", "trec-coarse", "--clients", "3", "--name", "g",
            "--superlink", "127.0.0.1:1")
    assert r.exit_code == 2 and "--superlink needs --engine flower" in r.output
    r = run(tmp_path, "unlearn", "g@1", "--forget", "client:0", "--name", "u", "--engine", "flower",
            "--superlink", "127.0.0.1:1", "--insecure", "--compare-retrain")
    assert r.exit_code == 2 and "--engine local only" in r.output


def test_fed_node_builds_the_supernode_command_and_refuses_other_labels(tmp_path, tiny_bert_dir):
    r = run(tmp_path, "fed", "node", "--superlink", "127.0.0.1:9", "--insecure", "--client-id", "4", "--base",
            str(tiny_bert_dir), "--data", "partition:trec-coarse", "--port", "9200", "--print-command")
    assert r.exit_code == 0, r.output
    out = r.output.strip()
    assert "flower-supernode" in out and "--superlink 127.0.0.1:9" in out and "--insecure" in out
    assert "client-id=4" in out and "data=\"partition:trec-coarse\"" in out and "--port 9200" in out
    bad = tmp_path / "spam.csv"
    bad.write_text("text,label\nwin a prize,spam\nsee you,ham\n")
    r = run(tmp_path, "fed", "node", "--superlink", "127.0.0.1:9", "--insecure", "--client-id", "1", "--base",
            str(tiny_bert_dir), "--data", f"csv:{bad}", "--task", "trec-coarse", "--print-command")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "['ham', 'spam'] not in the expected" in r.output and "flower-supernode" not in r.output
    r = run(tmp_path, "fed", "node", "--superlink", "127.0.0.1:9", "--client-id", "1", "--base", str(tiny_bert_dir),
            "--data", "ftp:x", "--print-command")
    assert r.exit_code == 1 and "partition:TASK, csv:PATH or jsonl:PATH" in r.output


def test_node_config_round_trips_and_names_bad_keys():
    from adapterhub.errors import TrainingError
    from adapterhub.fused.flower.node import NodeConfig, node_config_arg

    cfg = NodeConfig(2, "/m", "csv:/d.csv", "t", "l")
    assert NodeConfig.from_mapping(cfg.to_mapping()) == cfg
    assert node_config_arg(cfg) == 'client-id=2 base="/m" data="csv:/d.csv" text-column="t" label-column="l"'
    with pytest.raises(TrainingError, match="client-id must be an integer"):
        NodeConfig.from_mapping({"client-id": "x", "base": "/m", "data": "csv:a"})
    with pytest.raises(TrainingError, match="base"):
        NodeConfig.from_mapping({"client-id": 1, "data": "csv:a"})
    with pytest.raises(TrainingError, match="quotes"):
        node_config_arg(NodeConfig(1, '/m"', "csv:a"))


def test_a_client_that_does_not_reply_is_left_out_and_too_few_fail(tiny_bert_dir):
    """The round-runner contract both engines share: the missing client is dropped from that round on,
    the rest aggregate exactly as if it had never been there; fewer than min_clients fail."""
    import torch

    from adapterhub.errors import TrainingError
    from adapterhub.fused import federated as F

    fed = F.make_federation("trec-coarse", 3, 1.0, 0, max_train=60, max_test=20)
    cfg = F.FedConfig(rounds=2, local_steps=1, max_length=16, seed=0)
    model = F.FedModel(tiny_bert_dir, len(fed.labels), max_length=16, seed=0)
    state = F.sparse_delta_state(model, model.layers, 0.3, 0)
    state.update(model.head_state())
    rows = {c: fed.client_rows(c) for c in range(3)}
    local = F.LocalRounds(model, rows, cfg)

    def dropping(st, round_, ids, *, salt, record_layers):
        return local(st, round_, [c for c in ids if c != 2], salt=salt, record_layers=record_layers)

    got, st = F.fedavg(model, state, [rows[0], rows[1], rows[2]], cfg, runner=dropping, min_clients=2,
                       record_layers=True)
    ref, _ = F.fedavg(model, state, [rows[0], rows[1]], cfg, client_ids=[0, 1], record_layers=True)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert st.client_updates == 4 and sorted(st.layer_l1) == ["0", "1"]
    with pytest.raises(TrainingError, match="2 of 3 clients replied, fewer than the 3 needed"):
        F.fedavg(model, state, [rows[0], rows[1], rows[2]], cfg, runner=dropping, min_clients=3)


def test_message_bytes_are_counted_from_the_message():
    pytest.importorskip("flwr")
    import torch
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from adapterhub.errors import TrainingError
    from adapterhub.fused.flower.wire import WireBytes, json_record, record_state, state_record

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    state = {"delta:b": torch.arange(10.0), "delta:a": torch.ones(3, 4)}
    msg = Message(RecordDict({"state": state_record(state), "job": json_record({"k": 1})}), dst_node_id=5,
                  message_type="train")
    w = WireBytes()
    w.add(msg)
    assert w.payload == (10 + 12) * 4 and w.messages == 1 and w.framing > 0
    back = record_state(msg.content.array_records["state"], {"delta:a": (3, 4), "delta:b": (10,)})
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(TrainingError, match="shape"):
        record_state(msg.content.array_records["state"], {"delta:a": (4, 3), "delta:b": (10,)})


def test_an_unreachable_superlink_fails_in_one_line_and_registers_nothing(tmp_path, tiny_bert_dir):
    pytest.importorskip("flwr")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    assert run(tmp_path, "base", "add", "tiny", str(tiny_bert_dir)).exit_code == 0
    r = run(tmp_path, "fed", "train", "--base", "tiny", "--task", "trec-coarse", "--clients", "3", "--name", "g",
            "--engine", "flower", "--superlink", f"127.0.0.1:{port}", "--insecure")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "cannot start a run on the SuperLink" in r.output
    assert json.loads(run(tmp_path, "list", "--json").stdout) == []
    assert not list((tmp_path / "cache" / "flower").glob("*"))  # the outbox is cleaned up


def test_the_server_app_writes_only_into_a_coordinator_outbox(tmp_path):
    """Whoever may submit runs to the SuperLink picks the run config: the ServerApp refuses, writing nothing,
    any outbox that is not a coordinator's (``…/cache/flower/<32 hex>/`` holding a request.json)."""
    pytest.importorskip("flwr")
    from adapterhub.errors import TrainingError
    from adapterhub.fused.flower.server_app import Outbox

    good = tmp_path / "home" / "cache" / "flower" / ("ab" * 16)
    good.mkdir(parents=True)
    (good / "request.json").write_text("{}")
    assert Outbox(good).path == good
    for bad in (tmp_path, tmp_path / "etc", good.parent, good / "request.json"):
        with pytest.raises(TrainingError, match="not a coordinator's outbox"):
            Outbox(bad)
    other = tmp_path / "cache" / "flower" / ("cd" * 16)
    other.mkdir(parents=True)  # the right shape but no request: refused too
    with pytest.raises(TrainingError):
        Outbox(other)
    assert list(other.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "home"]


def test_a_node_splits_its_own_rows_by_the_forget_spec_and_refuses_another_task(tiny_bert_dir):
    pytest.importorskip("flwr")
    from adapterhub.errors import TrainingError
    from adapterhub.fused.federated import make_federation
    from adapterhub.fused.flower.client_app import _rows, _split
    from adapterhub.fused.flower.node import NodeConfig

    fed = make_federation("trec-coarse", 3, 1.0, 0, max_train=60, max_test=20)
    job = {"task": "trec-coarse", "labels": fed.labels,
           "partition": {"clients": 3, "alpha": 1.0, "seed": 0, "max_train": 60, "max_test": 20,
                         "hash": fed.partition.hash}}
    node = NodeConfig(1, str(tiny_bert_dir), "partition:trec-coarse")
    rows, fp = _rows(node, job)
    assert rows == fed.client_rows(1) and fp == fed.partition.hash
    assert _split(rows, node, {**job, "forget": "client:1"}) == ([], rows)
    assert _split(rows, node, {**job, "forget": "client:0"}) == (rows, [])
    lab = rows[0][1]
    keep, gone = _split(rows, node, {**job, "forget": f"class:{fed.labels[lab]}", "forget_label": lab})
    assert gone and all(r[1] == lab for r in gone) and all(r[1] != lab for r in keep) and len(keep) + len(gone) == len(rows)
    with pytest.raises(TrainingError, match="holds a partition of task 'trec-coarse'; this run trains task 'sms-spam'"):
        _rows(node, {**job, "task": "sms-spam"})
    with pytest.raises(TrainingError, match="differs from the run's"):
        _rows(node, {**job, "partition": {**job["partition"], "hash": "0" * 64}})


def _reply(doc, state=None):
    pytest.importorskip("flwr")
    from flwr.app import RecordDict

    from adapterhub.fused.flower.wire import REPLY, STATE, json_record, state_record

    content = RecordDict({REPLY: json_record(doc)})
    if state is not None:
        content[STATE] = state_record(state)
    return content


def test_a_nodes_training_reply_is_checked_as_untrusted_input():
    import torch

    pytest.importorskip("flwr")
    from adapterhub.errors import TrainingError
    from adapterhub.fused.flower.server_app import train_reply

    shapes = {"delta:w": (2, 3)}
    good = {"client_id": 1, "ok": True, "n_rows": 40, "local_steps": 2, "train_examples": 16,
            "layer_l1": {"w": 0.5, "head": 0.25}}
    st = {"delta:w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    u = train_reply(_reply(good, st), 1, shapes)
    assert u.n_rows == 40 and torch.equal(u.state["delta:w"], st["delta:w"]) and u.layer_l1 == {"w": 0.5, "head": 0.25}
    nan = {"delta:w": torch.tensor([[0.0, float("nan"), 0], [0, 0, 0]])}
    bad_cases = [
        (good, nan, "NaN or infinite"),
        ({**good, "client_id": 2}, st, "client id"),
        ({**good, "n_rows": 10**12}, st, "n_rows"),  # would outweigh every honest node in the average
        ({**good, "n_rows": "40"}, st, "n_rows"),
        ({**good, "n_rows": True}, st, "n_rows"),
        ({**good, "layer_l1": {"w": -1}}, st, "layer_l1"),
        ({**good, "layer_l1": {"w": float("inf")}}, st, "layer_l1"),
        (good, {"delta:w": torch.zeros(3, 2)}, "shape"),
        (good, {"delta:x": torch.zeros(2, 3)}, "keys"),
        (good, None, "no state"),
    ]
    for doc, state, why in bad_cases:
        with pytest.raises(TrainingError, match=why):
            train_reply(_reply(doc, state), 1, shapes)


def test_a_nodes_evaluation_reply_is_checked_and_bounded():
    pytest.importorskip("flwr")
    from adapterhub.errors import TrainingError
    from adapterhub.fused.flower.server_app import MAX_EVAL_ROWS, eval_reply

    ok = eval_reply({"fa": 0.5, "fa_n": 4, "label_counts": {"0": 3, "1": 1}, "scores": [0.1, 2.0]}, 2)
    assert ok == {"fa": 0.5, "fa_n": 4, "label_counts": {"0": 3, "1": 1}, "scores": [0.1, 2.0]}
    assert eval_reply({}, 2) == {"fa": None, "fa_n": 0, "label_counts": {}, "scores": []}
    for doc, why in [({"fa": 2}, "fraction"), ({"label_counts": {"7": 1}}, "unknown label"),
                     ({"label_counts": {"0": MAX_EVAL_ROWS + 1}}, "more than"),  # expanded in memory: bounded
                     ({"label_counts": {"0": -1}}, "label_counts|integer"), ({"scores": [float("nan")]}, "finite"),
                     ({"scores": "x"}, "finite")]:
        with pytest.raises(TrainingError, match=why):
            eval_reply(doc, 2)

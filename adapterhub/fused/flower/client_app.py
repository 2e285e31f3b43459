"""adapterhub's Flower ClientApp: what runs on a site, next to its rows (which never leave it).

Every message carries a ``job`` (JSON): the task and its label names, the partition spec, the base
fingerprint, the model settings and, for unlearning, the forget spec and the critical layers. The node
loads its own rows (:class:`~adapterhub.fused.flower.node.NodeConfig`), checks them against the job,
rebuilds exactly the model the coordinator trains (masks come from the shared seed, never from the
wire) and answers:

* ``query`` — its stable client id, its row count (and what remains under a forget spec), its data
  fingerprint; or a refusal naming why (wrong task, labels outside the task, another base).
* ``train`` — one :func:`~adapterhub.fused.federated.client_update` from the state it received: the
  new state, its row count and, in a recording round, the per-layer L1 distances.
* ``evaluate`` — for the rows a forget spec names on this node: the accuracy and its count, the
  membership attack's per-row scores (log-probabilities of the true label) and the label counts;
  never a row.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ...errors import AdapterHubError, TrainingError
from .node import NodeConfig
from .wire import GLOBAL, JOB, REPLY, STATE, json_record, record_bytes, record_json, record_state, state_record

app = ClientApp()

Example = tuple[str, int]


def _rows(node: NodeConfig, job: dict[str, Any]) -> tuple[list[Example], str]:
    """This node's training rows for ``job`` and their fingerprint; raises TrainingError/DataError to refuse."""
    task, labels = str(job.get("task")), [str(x) for x in job.get("labels") or []]
    if node.data_kind == "partition":
        from ..federated import make_federation

        if node.data_ref != task:
            raise TrainingError(f"node client:{node.client_id} holds a partition of task {node.data_ref!r}; "
                                f"this run trains task {task!r}")
        part = job.get("partition") or {}
        fed = make_federation(task, int(part["clients"]), float(part["alpha"]), int(part["seed"]),
                              max_train=part.get("max_train"), max_test=part.get("max_test"))
        if fed.labels != labels:
            raise TrainingError(f"task {task!r} on this node has labels {fed.labels}, the run expects {labels}")
        if fed.partition.hash != part.get("hash"):
            raise TrainingError(f"node client:{node.client_id}: the partition of {task!r} built here "
                                f"({fed.partition.hash[:12]}) differs from the run's ({str(part.get('hash'))[:12]})")
        if node.client_id >= fed.n_clients:
            raise TrainingError(f"node client:{node.client_id} is outside the run's {fed.n_clients} clients")
        return fed.client_rows(node.client_id), fed.partition.hash
    from ...data.tasks import load_dataset

    td = load_dataset(node.data, text_column=node.text_column, label_column=node.label_column, labels=labels)
    if not td.train:
        raise TrainingError(f"node client:{node.client_id}: {node.data} has no training rows")
    fp = hashlib.sha256(json.dumps(td.train, separators=(",", ":")).encode()).hexdigest()
    return list(td.train), fp


def _split(rows: list[Example], node: NodeConfig, job: dict[str, Any]) -> tuple[list[Example], list[Example]]:
    """(remaining, forgotten) rows of this node under the job's forget spec (none: all remain)."""
    forget = job.get("forget")
    if not forget:
        return rows, []
    kind, _, value = str(forget).partition(":")
    if kind == "client":
        return ([], rows) if int(value) == node.client_id else (rows, [])
    if kind == "class":
        lab = int(job["forget_label"])
        return [r for r in rows if r[1] != lab], [r for r in rows if r[1] == lab]
    raise TrainingError(f"forget spec {forget!r} is not supported by the Flower engine")


def _check_base(node: NodeConfig, job: dict[str, Any]) -> None:
    from pathlib import Path

    from ...bases.sources import fingerprint_folder

    fp = fingerprint_folder(Path(node.base))
    if fp != job.get("base_fingerprint"):
        raise TrainingError(f"node client:{node.client_id}: base folder {node.base} (fingerprint {fp[:12]}) is not "
                            f"the run's base ({str(job.get('base_fingerprint'))[:12]})")


def _model(node: NodeConfig, job: dict[str, Any], msg: Message) -> tuple[Any, dict[str, Any]]:
    """The model the coordinator trains, rebuilt here, and its starting state's shapes (key -> shape)."""
    from pathlib import Path

    from ... import format as fmt
    from ..federated import FedModel, sparse_delta_state

    m = job["model"]
    model = FedModel(Path(node.base), int(m["n_labels"]), max_length=int(m["max_length"]),
                     layer_regex=str(m["layer_regex"]), seed=int(m["seed"]))
    if job["kind"] == "train":
        state = sparse_delta_state(model, model.layers, float(job["density"]), int(m["seed"]), mask=str(job["mask"]))
        state.update(model.head_state())
    else:
        from ..unlearning import unlearning_state

        adapter = fmt.load(record_bytes(msg.content.array_records[GLOBAL]), source="the run's global model")
        model.apply_adapter(adapter, head_task=str(job["task"]))
        state = unlearning_state(model, list(job["critical"]), density=float(job["density"]),
                                 seed=int(job["unlearn_seed"]), head=str(job["head"]))
    return model, {k: tuple(v.shape) for k, v in state.items()}


def _setup(msg: Message, context: Context) -> tuple[NodeConfig, dict[str, Any], list[Example], list[Example], Any,
                                                    dict[str, Any]]:
    """What a train or evaluate message starts with: this node's config, the job, its rows split into
    (remaining, forgotten), and the model with its state's shapes."""
    node = NodeConfig.from_mapping(dict(context.node_config))
    job = record_json(msg.content, JOB)
    rows, _ = _rows(node, job)
    remaining, forgotten = _split(rows, node, job)
    model, shapes = _model(node, job, msg)
    return node, job, remaining, forgotten, model, shapes


def _reply(msg: Message, doc: dict[str, Any], state: dict[str, Any] | None = None) -> Message:
    content = RecordDict({REPLY: json_record(doc)})
    if state is not None:
        content[STATE] = state_record(state)
    return Message(content, reply_to=msg)


def _refusal(msg: Message, node: NodeConfig | None, err: Exception) -> Message:
    return _reply(msg, {"ok": False, "client_id": node.client_id if node else None, "error": str(err)})


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Identity and sizes, or a refusal with the reason."""
    node = None
    try:
        node = NodeConfig.from_mapping(dict(context.node_config))
        job = record_json(msg.content, JOB)
        _check_base(node, job)
        rows, fp = _rows(node, job)
        remaining, forgotten = _split(rows, node, job)
        return _reply(msg, {"ok": True, "client_id": node.client_id, "rows": len(rows), "remaining": len(remaining),
                            "forgotten": len(forgotten), "data_kind": node.data_kind, "data_fingerprint": fp})
    except (AdapterHubError, KeyError, ValueError) as e:
        return _refusal(msg, node, e)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training: :func:`~adapterhub.fused.federated.client_update` on this node's rows."""
    from ...training.config import FedConfig
    from ..federated import client_update

    node, job, remaining, _, model, shapes = _setup(msg, context)
    state = record_state(msg.content.array_records[STATE], shapes)
    cfg = FedConfig(**job["cfg"])
    up = client_update(model, state, remaining, cfg, round_=int(job["round"]), client_id=node.client_id,
                       salt=str(job["salt"]), record_layers=bool(job["record_layers"]))
    return _reply(msg, {"ok": True, "client_id": node.client_id, "n_rows": up.n_rows, "layer_l1": up.layer_l1,
                        "local_steps": up.local_steps, "train_examples": up.train_examples}, up.state)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Scores of the model (global, or global + the state sent) on the rows the forget spec names here."""
    from ..mia import loss_scores
    from ..unlearning import cap_rows

    node, job, _, forgotten, model, shapes = _setup(msg, context)
    sent = msg.content.array_records.get(STATE)
    state = record_state(sent, {k: shapes[k] for k in sent}) if sent is not None and len(sent) else {}
    mine = cap_rows(forgotten, job.get("max_eval"))
    counts: dict[str, int] = {}
    for _, lab in forgotten:
        counts[str(lab)] = counts.get(str(lab), 0) + 1

    def scored(st: dict[str, Any]) -> dict[str, Any]:
        return {"fa": model.accuracy(st, mine), "fa_n": len(mine), "scores": loss_scores(model, st, mine),
                "label_counts": counts}

    doc: dict[str, Any] = {"ok": True, "client_id": node.client_id, "unlearned": scored(state)}
    if job.get("with_global"):
        doc["global"] = scored({})
    return _reply(msg, doc)

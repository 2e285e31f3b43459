"""adapterhub's Flower ServerApp: the coordinator's FedAvg and FUSED code, with nodes instead of in-process clients.

The SuperLink starts this app for a run the coordinator submitted. Its run config names one folder, the
coordinator's *outbox*: ``request.json`` (what to do) and, for unlearning, ``global.safetensors`` are read
from it; ``progress.jsonl`` (one line per phase and round), then ``result.json`` + ``adapter.safetensors``
(or ``error.json``: one line) are written to it. The app never opens a catalog or a store: the
coordinator reads the outbox and registers (docs/federated.md, "where things run").

What it runs is the local engine's own code — :func:`~adapterhub.fused.federated.global_model` and
:func:`~adapterhub.fused.unlearning.run_unlearning` — given a :class:`FlowerRounds` runner, so the
aggregation (weighted by the rows each node reports, in stable client-id order), the stopping rule,
the ranking and the packaging are the same lines of code as ``--engine local``.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ... import format as fmt
from ...errors import AdapterHubError, TrainingError
from ...fsutil import atomic_write_bytes
from ..federated import ClientUpdate, FedModel
from .wire import (
    GLOBAL,
    JOB,
    REPLY,
    STATE,
    WireBytes,
    bytes_record,
    json_record,
    record_json,
    record_state,
    state_record,
)

app = ServerApp()


OUTBOX_NAME = re.compile(r"^[0-9a-f]{32}$")


class Outbox:
    """The coordinator's folder for this run (see the module docstring).

    Whoever may submit runs to the SuperLink chooses the run config, so the app writes only into a
    folder shaped like a coordinator's outbox (``…/cache/flower/<32 hex>/``) that already holds a
    ``request.json`` regular file: an arbitrary path is refused before anything is written.
    """

    def __init__(self, path: Path) -> None:
        p = Path(path)
        if not (p.is_absolute() and OUTBOX_NAME.match(p.name) and p.parent.name == "flower"
                and p.parent.parent.name == "cache" and not p.is_symlink() and p.is_dir()
                and (p / "request.json").is_file() and not (p / "request.json").is_symlink()):
            raise TrainingError(f"run config outbox {str(path)[:200]!r} is not a coordinator's outbox folder")
        self.path = p

    def request(self) -> dict[str, Any]:
        doc = json.loads((self.path / "request.json").read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise TrainingError("request.json is not a JSON object")
        return doc

    def progress(self, **event: Any) -> None:
        with open(self.path / "progress.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"t": round(time.time(), 3), **event}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.path / name, data)


class Nodes:
    """The nodes of this run: which Flower node id speaks for which stable client id, and the bytes sent."""

    def __init__(self, grid: Grid, outbox: Outbox, job: dict[str, Any], *, round_timeout: float,
                 global_bytes: bytes | None = None) -> None:
        self.grid, self.outbox, self.job, self.round_timeout = grid, outbox, job, round_timeout
        self.global_record = bytes_record(global_bytes) if global_bytes is not None else None
        self.node_of: dict[int, int] = {}  # client id -> Flower node id
        self.info: dict[int, dict[str, Any]] = {}
        self.refused: list[dict[str, Any]] = []
        self.lost: list[dict[str, Any]] = []
        self.sent, self.received = WireBytes(), WireBytes()

    def _content(self, extra: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None) -> RecordDict:
        content = RecordDict({JOB: json_record({**self.job, **extra})})
        if state is not None:
            content[STATE] = state_record(state)
        if self.global_record is not None:
            content[GLOBAL] = self.global_record
        return content

    def exchange(self, targets: Mapping[int, int], kind: str, extra: Mapping[str, Any],
                 state: Mapping[str, torch.Tensor] | None, timeout: float) -> dict[int, Message]:
        """Send one message of ``kind`` to each Flower node in ``targets`` (key -> node id); the replies by key."""
        msgs: list[Message] = []
        key_of: dict[int, int] = {}
        for key, node_id in targets.items():
            m = Message(self._content(extra, state), dst_node_id=node_id, message_type=kind)
            self.sent.add(m)
            msgs.append(m)
            key_of[node_id] = key
        out: dict[int, Message] = {}
        for r in self.grid.send_and_receive(msgs, timeout=timeout):
            self.received.add(r)
            src = key_of.get(r.metadata.src_node_id)
            if src is None:
                continue
            key = src
            if r.has_error():
                self.lost.append({"key": key, "node_id": str(r.metadata.src_node_id), "kind": kind,
                                  "error": f"{r.error.code}: {r.error.reason}"})
                continue
            out[key] = r
        for key, node_id in targets.items():
            if key not in out and not any(x["node_id"] == str(node_id) and x["kind"] == kind for x in self.lost):
                self.lost.append({"key": key, "node_id": str(node_id), "kind": kind,
                                  "error": f"no reply within {timeout:g} s"})
        return out

    def handshake(self, *, expected: int, connect_timeout: float) -> None:
        """Wait for ``expected`` nodes (or the timeout), ask each who it is; refuse duplicates and refusals."""
        deadline = time.monotonic() + connect_timeout
        ids: list[int] = []
        while True:
            ids = sorted(self.grid.get_node_ids())
            if len(ids) >= expected or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        self.outbox.progress(event="nodes", connected=len(ids))
        replies = self.exchange({nid: nid for nid in ids}, "query", {}, None, self.round_timeout)
        for nid in sorted(replies):
            doc = record_json(replies[nid].content, REPLY)
            cid = doc.get("client_id")
            if not doc.get("ok"):
                self.refused.append({"node_id": str(nid), "client_id": cid, "reason": str(doc.get("error"))})
            elif not isinstance(cid, int) or cid in self.node_of:
                self.refused.append({"node_id": str(nid), "client_id": cid,
                                     "reason": f"client id {cid!r} is already taken by another node"})
            else:
                self.node_of[cid] = nid
                self.info[cid] = {**doc, "node_id": str(nid)}
        self.outbox.progress(event="handshake", accepted=sorted(self.node_of), refused=self.refused)

    def record(self) -> dict[str, Any]:
        return {"nodes": [{"client_id": c, "node_id": self.info[c]["node_id"], "rows": self.info[c]["rows"],
                           "data_kind": self.info[c]["data_kind"], "data_fingerprint": self.info[c]["data_fingerprint"]}
                          for c in sorted(self.info)],
                "refused": self.refused, "lost": self.lost,
                "bytes": {"down": self.sent.to_json(), "up": self.received.to_json()}}


class FlowerRounds:
    """A :class:`~adapterhub.fused.federated.RoundRunner` that sends the round to the nodes."""

    def __init__(self, nodes: Nodes, model: FedModel, cfg: dict[str, Any]) -> None:
        self.nodes, self.model, self.cfg = nodes, model, cfg

    def __call__(self, state: Mapping[str, torch.Tensor], round_: int, ids: Sequence[int], *, salt: str,
                 record_layers: bool) -> dict[int, ClientUpdate]:
        targets = {cid: self.nodes.node_of[cid] for cid in ids if cid in self.nodes.node_of}
        self.nodes.outbox.progress(event="round", round=round_ + 1, sent=sorted(targets))
        replies = self.nodes.exchange(targets, "train", {"round": round_, "salt": salt, "record_layers": record_layers,
                                                          "cfg": self.cfg}, state, self.nodes.round_timeout)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        out = {}
        for cid, r in replies.items():
            try:
                out[cid] = train_reply(r.content, cid, shapes)
            except TrainingError as e:  # a node's answer is outside input: refused, the node dropped from the run
                self.nodes.lost.append({"key": cid, "node_id": str(targets[cid]), "kind": "train",
                                        "error": f"bad reply: {str(e)[:200]}"})
        self.nodes.outbox.progress(event="round done", round=round_ + 1, replied=sorted(out))
        return out


MAX_ROWS = 10**9  # rows one node may claim (the FedAvg weight); more is refused as a bad reply
MAX_SCORES = 10**6  # membership scores one node may send
MAX_EVAL_ROWS = 10**7  # forgotten rows one node may report label counts for (they are expanded in memory)


def _count(doc: Mapping[str, Any], key: str, low: int, high: int) -> int:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise TrainingError(f"{key} must be an integer in [{low}, {high}], got {str(v)[:40]!r}")
    return v


def train_reply(content: RecordDict, cid: int, shapes: Mapping[str, tuple[int, ...]]) -> ClientUpdate:
    """A node's answer to a training round, checked as the untrusted input it is: its client id, counts in
    range, the state's keys and shapes those sent, every value finite, layer distances finite and >= 0.

    Raises: TrainingError (one line) on anything else; the caller drops the node from the run.
    """
    doc = record_json(content, REPLY)
    if doc.get("client_id") != cid or doc.get("ok") is not True:
        raise TrainingError(str(doc.get("error", f"client id {str(doc.get('client_id'))[:40]!r}")))
    if STATE not in content.array_records:
        raise TrainingError("no state in the reply")
    new = record_state(content.array_records[STATE], shapes)
    bad = next((k for k, v in new.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise TrainingError(f"state tensor {bad!r} has NaN or infinite values")
    l1 = doc.get("layer_l1")
    layers: dict[str, float] | None = None
    if l1 is not None:
        if not isinstance(l1, dict) or len(l1) > 4 * len(shapes) + 16:
            raise TrainingError("layer_l1 must be a small object of layer name -> distance")
        layers = {}
        for k, v in l1.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise TrainingError(f"layer_l1[{str(k)[:60]!r}] must be a finite number >= 0")
            layers[str(k)] = float(v)
    return ClientUpdate(new, _count(doc, "n_rows", 0, MAX_ROWS), layers, _count(doc, "local_steps", 0, 2**40),
                        _count(doc, "train_examples", 0, 2**50))


def eval_reply(doc: Mapping[str, Any], n_labels: int) -> dict[str, Any]:
    """A node's evaluation figures, checked: ``fa`` in [0, 1] or null, counts in range, label counts only for
    the task's labels and no more than ``MAX_EVAL_ROWS`` rows, at most ``MAX_SCORES`` finite scores.
    Raises: TrainingError (one line)."""
    fa = doc.get("fa")
    if fa is not None and (isinstance(fa, bool) or not isinstance(fa, (int, float)) or not 0 <= fa <= 1):
        raise TrainingError(f"fa must be a fraction, got {str(fa)[:40]!r}")
    counts = doc.get("label_counts") or {}
    if not isinstance(counts, dict):
        raise TrainingError("label_counts must be an object")
    clean: dict[str, int] = {}
    for lab in counts:
        if not (isinstance(lab, str) and lab.isdigit() and int(lab) < n_labels):
            raise TrainingError(f"label_counts names an unknown label {str(lab)[:20]!r}")
        clean[lab] = _count(counts, lab, 0, MAX_ROWS)
    if sum(clean.values()) > MAX_EVAL_ROWS:
        raise TrainingError(f"label_counts add up to more than {MAX_EVAL_ROWS} rows")
    scores = doc.get("scores") or []
    if not isinstance(scores, list) or len(scores) > MAX_SCORES or not all(
            not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in scores):
        raise TrainingError(f"scores must be a list of at most {MAX_SCORES} finite numbers")
    return {"fa": fa, "fa_n": _count(doc, "fa_n", 0, MAX_ROWS) if doc.get("fa_n") is not None else 0,
            "label_counts": clean, "scores": [float(x) for x in scores]}


def _job(req: dict[str, Any], fed: Any) -> dict[str, Any]:
    from ...bases.sources import fingerprint_folder

    return {"task": fed.task, "labels": fed.labels, "base_fingerprint": fingerprint_folder(Path(req["base_path"])),
            "partition": {"clients": fed.n_clients, "alpha": fed.partition.alpha, "seed": fed.partition.seed,
                          "max_train": req.get("max_train"), "max_test": req.get("max_test"),
                          "hash": fed.partition.hash}}


def _train(grid: Grid, req: dict[str, Any], outbox: Outbox) -> tuple[fmt.SparseAdapter, dict[str, Any]]:
    from ...training.config import FedConfig
    from ..federated import global_model, make_federation

    cfg = FedConfig(**req["fedavg"])
    fed = make_federation(req["task"], int(req["clients"]), float(req["alpha"]), cfg.seed,
                          max_train=req.get("max_train"), max_test=req.get("max_test"))
    job = {**_job(req, fed), "kind": "train", "density": req["density"], "mask": req["mask"],
           "model": {"n_labels": len(fed.labels), "max_length": cfg.max_length, "layer_regex": req["layer_regex"],
                     "seed": cfg.seed}}
    nodes = Nodes(grid, outbox, job, round_timeout=float(req["round_timeout"]))
    nodes.handshake(expected=fed.n_clients, connect_timeout=float(req["connect_timeout"]))
    for c in sorted(nodes.node_of):
        if c >= fed.n_clients:  # a node outside the federation takes no part
            nodes.refused.append({"node_id": str(nodes.node_of.pop(c)), "client_id": c,
                                  "reason": f"client id {c} is outside the federation's clients 0..{fed.n_clients - 1}"})
            nodes.info.pop(c, None)
    ids = sorted(nodes.node_of)
    if len(ids) < int(req["min_nodes"]):
        raise TrainingError(_too_few(len(ids), int(req["min_nodes"]), nodes))
    res = global_model(Path(req["base_path"]), fed, cfg, density=float(req["density"]), mask=str(req["mask"]),
                       layer_regex=str(req["layer_regex"]), max_train=req.get("max_train"),
                       max_test=req.get("max_test"), runner=lambda model: FlowerRounds(nodes, model, cfg.to_json()),
                       client_ids=ids, min_clients=int(req["min_nodes"]),
                       client_sizes={c: int(nodes.info[c]["rows"]) for c in ids})
    return res.adapter, {"metrics": res.metrics, "training_config": res.training_config,
                         "critical_layers": res.critical_layers[:10], "stats": res.stats.to_json(),
                         "flower": nodes.record()}


def _too_few(n: int, need: int, nodes: Nodes) -> str:
    why = "; ".join(f"client:{r['client_id']}: {r['reason']}" for r in nodes.refused)
    return f"{n} usable node(s), fewer than the {need} required" + (f" (refused: {why})" if why else "")


class FlowerEvaluator:
    """RA on the coordinator's held-out test split; FA and the membership attack's member scores from the
    nodes that hold the forgotten rows (counts and scores, never rows). When the forgotten client's node
    is gone, FA and MIA are reported as None with ``forgotten_node: "absent"``."""

    def __init__(self, nodes: Nodes, fed: Any, max_eval: int | None, forget_ids: Sequence[int]) -> None:
        self.nodes, self.fed, self.max_eval, self.forget_ids = nodes, fed, max_eval, list(forget_ids)

    def __call__(self, model: FedModel, states: list[Mapping[str, torch.Tensor]], plan: Any) -> list[dict[str, Any]]:
        targets = {c: self.nodes.node_of[c] for c in self.forget_ids if c in self.nodes.node_of}
        # one round: the last state travels; the node also scores the global model when asked (states[0] == {})
        with_global = len(states) == 2
        replies = self.nodes.exchange(targets, "evaluate", {"max_eval": self.max_eval, "with_global": with_global},
                                      states[-1], self.nodes.round_timeout) if targets else {}
        keys = ["global", "unlearned"][-len(states):]
        docs: list[dict[str, dict[str, Any]]] = []
        for c in sorted(replies):
            doc = record_json(replies[c].content, REPLY)
            try:  # a node's figures are outside input: checked, and a node that sends nonsense is not counted
                docs.append({k: eval_reply(doc.get(k) or {}, len(self.fed.labels)) for k in keys})
            except TrainingError as e:
                self.nodes.lost.append({"key": c, "node_id": str(targets[c]), "kind": "evaluate",
                                        "error": f"bad reply: {str(e)[:200]}"})
        return [self._score(model, st, plan, [d[k] for d in docs]) for k, st in zip(keys, states, strict=True)]

    def _score(self, model: FedModel, state: Mapping[str, torch.Tensor], plan: Any,
               docs: list[dict[str, Any]]) -> dict[str, Any]:
        from ..mia import auc, loss_scores, tpr_at_fpr
        from ..unlearning import cap_rows, label_matched

        ra_rows = cap_rows(plan.ra_rows, self.max_eval)
        out: dict[str, Any] = {"ra": model.accuracy(state, ra_rows), "ra_n": len(ra_rows)}
        scores = [float(x) for d in docs for x in d.get("scores") or []]
        if plan.spec.kind == "client":
            if not docs:
                out.update({"fa": None, "fa_n": 0, "forgotten_node": "absent"})
                return out
            d = docs[0]
            out.update({"fa": d.get("fa"), "fa_n": int(d.get("fa_n") or 0), "forgotten_node": "present"})
            # held-out rows with the forgotten rows' label mix: only the node's label counts are needed
            labels = [int(lab) for lab, n in sorted((d.get("label_counts") or {}).items(), key=lambda x: int(x[0]))
                      for _ in range(int(n))]
            nonmembers = cap_rows(label_matched([("", lab) for lab in labels], list(self.fed.test),
                                                self.fed.partition.seed), self.max_eval)
        else:
            fa_rows = cap_rows(plan.fa_rows(), self.max_eval)
            out.update({"fa": model.accuracy(state, fa_rows), "fa_n": len(fa_rows),
                        "forgotten_nodes_reporting": len(docs)})
            if self.max_eval is not None and len(scores) > self.max_eval:
                step = len(scores) / self.max_eval
                scores = [scores[int(i * step)] for i in range(self.max_eval)]
            nonmembers = cap_rows(plan.nonmembers(), self.max_eval)
        ns = loss_scores(model, state, nonmembers)
        if scores and ns:
            out.update({"mia_auc": round(auc(scores, ns), 6), "mia_tpr_at_1pct_fpr": round(tpr_at_fpr(scores, ns), 6),
                        "mia_members": len(scores), "mia_nonmembers": len(ns)})
        return out


def _unlearn(grid: Grid, req: dict[str, Any], outbox: Outbox) -> tuple[fmt.SparseAdapter, dict[str, Any]]:
    from ...training.config import FedConfig
    from ..federated import make_federation
    from ..unlearning import check_request, parse_forget, run_unlearning

    cfg = FedConfig(**req["fedavg"])
    rec = req["federation"]
    fed = make_federation(rec["task"], int(rec["clients"]), float(rec["alpha"]), int(rec["seed"]),
                          max_train=rec.get("max_train"), max_test=rec.get("max_test"))
    if fed.partition.hash != rec["partition_hash"]:
        raise TrainingError("the task data on the SuperLink's host changed since the global model was trained")
    spec = parse_forget(req["forget"])
    plan = check_request(fed, spec, int(req["layers"]), float(req["density"]), int(req["rounds"] or cfg.rounds),
                         head=req["head"], selection=req["selection"])
    global_bytes = (outbox.path / "global.safetensors").read_bytes()
    gadapter = fmt.load(global_bytes, source="global.safetensors")
    ucfg_seed = int(req["seed"])
    # the critical layers are chosen before any message: the same call run_unlearning makes
    from ..unlearning import select_layers, selection_salt

    critical = select_layers(req["ranking"], int(req["layers"]), head=req["head"], selection=req["selection"],
                             seed=ucfg_seed, salt=selection_salt(plan))
    ucfg = FedConfig(**{**cfg.to_json(), "rounds": req["rounds"] or cfg.rounds, "seed": ucfg_seed,
                        "local_steps": req["local_steps"] or cfg.local_steps, "lr": req["lr"] or cfg.lr})
    job = {**_job(req, fed), "kind": "unlearn", "forget": str(spec), "critical": critical,
           "density": float(req["density"]), "unlearn_seed": ucfg_seed, "head": req["head"],
           "model": {"n_labels": len(fed.labels), "max_length": cfg.max_length, "layer_regex": req["layer_regex"],
                     "seed": cfg.seed}}
    if spec.kind == "class":
        job["forget_label"] = plan.record["label_id"]
    elif spec.kind != "client":
        raise TrainingError(f"the Flower engine forgets client:ID or class:LABEL, not {spec.kind}:")
    nodes = Nodes(grid, outbox, job, round_timeout=float(req["round_timeout"]), global_bytes=global_bytes)
    nodes.handshake(expected=fed.n_clients - (1 if spec.kind == "client" else 0),
                    connect_timeout=float(req["connect_timeout"]))
    remaining = [c for c, _ in plan.remaining]
    present = [c for c in remaining if c in nodes.node_of]
    if len(present) < int(req["min_nodes"]):
        raise TrainingError(_too_few(len(present), int(req["min_nodes"]), nodes))
    forget_ids = [plan.record["client"]] if spec.kind == "client" else remaining
    res = run_unlearning(Path(req["base_path"]), gadapter, fed, cfg, spec, req["ranking"],
                         ranking_source=req["ranking_source"], layers=int(req["layers"]), density=float(req["density"]),
                         rounds=req["rounds"], patience=int(req["patience"]), seed=ucfg_seed,
                         local_steps=req["local_steps"], lr=req["lr"], head=req["head"], selection=req["selection"],
                         max_eval=req["max_eval"], global_ref=req["global_ref"], global_hash=req["global_hash"],
                         layer_regex=req["layer_regex"],
                         runner=lambda model: FlowerRounds(nodes, model, ucfg.to_json()),
                         evaluator=FlowerEvaluator(nodes, fed, req["max_eval"], forget_ids),
                         min_clients=int(req["min_nodes"]))
    return res.adapter, {"metrics": res.metrics, "training_config": res.training_config, "critical": res.critical,
                         "forget": res.plan.record, "stats": res.stats.to_json(), "flower": nodes.record()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the request in the outbox named by the run config; write the result (or a one-line error) there."""
    outbox = Outbox(Path(str(context.run_config.get("outbox", ""))))  # raises, writing nothing, for any other path
    try:
        req = outbox.request()
        outbox.progress(event="start", kind=req.get("kind"), run_id=str(grid.run.run_id))
        t0 = time.perf_counter()
        adapter, doc = (_train if req.get("kind") == "train" else _unlearn)(grid, req, outbox)
        doc["seconds"] = round(time.perf_counter() - t0, 3)
        doc["run_id"] = str(grid.run.run_id)
        outbox.write("adapter.safetensors", fmt.save(adapter))
        outbox.write("result.json", json.dumps(doc, sort_keys=True).encode())
        outbox.progress(event="done")
    except (AdapterHubError, KeyError, ValueError, OSError) as e:
        line = " ".join(str(e).split())[:500] or type(e).__name__
        outbox.write("error.json", json.dumps({"error": line}).encode())
        outbox.progress(event="failed", error=line)
        raise

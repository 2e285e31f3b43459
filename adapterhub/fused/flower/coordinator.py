"""The coordinator's side of ``--engine flower``: submit a run to the SuperLink, wait, read the outbox, register.

Where things run (docs/federated.md): the coordinator hosts the SuperLink, or shares a filesystem with
it. Flower's deployment runtime starts adapterhub's ServerApp under the SuperLink, not in the process
that typed ``fed train``; Flower 1.42 does not hand a ServerApp's result back to whoever started the
run (the final context is discarded), so the coordinator gives the run an *outbox* folder in its home
(``cache/flower/<id>/``) through the run config. The ServerApp reads the request there and writes its
result there; the coordinator then reads it like any file from outside (bounded JSON, the adapter
codec's own validation) and registers it. Only the coordinator opens the catalog and the store.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import format as fmt
from ...errors import AdapterHubError, FederationError
from ...safe_read import read_json_file, read_regular

if TYPE_CHECKING:  # pragma: no cover
    from ...catalog.records import VersionInfo
    from ...workspace import Workspace

APP_ID = "adapterhub-fused"
# The Flower App the coordinator submits: only this pyproject.toml; its components live in the installed
# adapterhub package, which every SuperLink and SuperNode host has (no dependency is installed at run time).
APP_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_ID}"
version = "1.0.0"
description = "adapterhub: FedAvg and FUSED unlearning over sparse adapters"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "adapterhub"

[tool.flwr.app.components]
serverapp = "adapterhub.fused.flower.server_app:app"
clientapp = "adapterhub.fused.flower.client_app:app"

[tool.flwr.app.config]
outbox = ""
"""

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class FlowerSettings:
    """How the coordinator reaches the SuperLink and how long it waits.

    Attributes:
        superlink: HOST:PORT of the SuperLink (Control API; in Flower 1.42 the same port as the nodes').
        insecure: plain HTTP (tests on 127.0.0.1); otherwise TLS with ``root_certificates`` (a CA bundle).
        min_nodes: fewest nodes a round may complete with (None: every client of the federation).
        round_timeout: seconds a round waits for replies; a node that has not replied is left out.
        connect_timeout: seconds the ServerApp waits for the expected nodes to connect.
        run_timeout: seconds the coordinator waits for the run to finish.
    """

    superlink: str
    insecure: bool = False
    root_certificates: str | None = None
    min_nodes: int | None = None
    round_timeout: float = 600.0
    connect_timeout: float = 120.0
    run_timeout: float = 3600.0


def _client(s: FlowerSettings) -> Any:
    """A Control API client (what ``flwr run``/``flwr ls`` use), built directly so nothing is printed."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        server_address=s.superlink, insecure=s.insecure,
        root_certificates=None if s.insecure else s.root_certificates,
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="adapterhub")])


def new_outbox(ws: Workspace) -> Path:
    out = Path(ws.home) / "cache" / "flower" / uuid.uuid4().hex
    out.mkdir(parents=True)
    return out


def start_run(s: FlowerSettings, outbox: Path) -> int:
    """Submit adapterhub's Flower App with ``outbox`` in its run config; returns the run id."""
    import hashlib

    from flwr.app.user_config import UserConfig
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    app_dir = outbox / "app"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    fab_bytes = build_fab_from_disk(app_dir)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    override: UserConfig = {"outbox": str(outbox)}
    client = _client(s)
    try:
        res = client.StartRun(StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(override)))
    except Exception as e:  # noqa: BLE001 - Flower's client raises its own HTTP/gRPC errors: one line for the user
        raise FederationError(f"cannot start a run on the SuperLink at {s.superlink}: "
                              f"{' '.join(str(e).split())[:200] or type(e).__name__}") from None
    finally:
        client.close()
    if not res.HasField("run_id"):
        raise FederationError(f"the SuperLink at {s.superlink} did not start the run")
    return int(res.run_id)


def run_status(s: FlowerSettings, run_id: int) -> Any:
    """The run as the SuperLink reports it (status, sub-status, details, Flower's own byte counters)."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    client = _client(s)
    try:
        res = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    runs = [run_from_proto(p) for p in res.run_dict.values()]
    if not runs:
        raise FederationError(f"the SuperLink at {s.superlink} does not know run {run_id}")
    return runs[0]


def wait_run(s: FlowerSettings, run_id: int, outbox: Path, progress: ProgressFn | None = None) -> Any:
    """Poll until the run finishes (or ``run_timeout``), passing new progress events on; returns the run."""
    deadline = time.monotonic() + s.run_timeout
    seen = 0
    while True:
        if progress is not None:
            seen = _progress(outbox, seen, progress)
        run = run_status(s, run_id)
        if run.status.status == "finished":
            if progress is not None:
                _progress(outbox, seen, progress)
            return run
        if time.monotonic() > deadline:
            raise FederationError(f"run {run_id} did not finish within {s.run_timeout:g} s "
                                  f"(stop it with `flwr stop {run_id}`)")
        time.sleep(0.5)


def _progress(outbox: Path, seen: int, progress: ProgressFn) -> int:
    p = outbox / "progress.jsonl"
    if not p.is_file():
        return seen
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in lines[seen:]:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            progress(ev)
    return len(lines)


def collect(outbox: Path, run: Any) -> tuple[fmt.SparseAdapter, dict[str, Any]]:
    """The ServerApp's result from the outbox, read as untrusted input. Raises FederationError (one line)."""
    err = outbox / "error.json"
    if err.is_file():
        doc = read_json_file(err, "the run's error.json", FederationError)
        msg = doc.get("error") if isinstance(doc, dict) else None
        raise FederationError(f"run {run.run_id} failed: {' '.join(str(msg).split())[:300]}")
    if run.status.sub_status != "completed" or not (outbox / "result.json").is_file():
        detail = " ".join(str(run.status.details or "").split())[:300]
        raise FederationError(f"run {run.run_id} ended {run.status.sub_status or 'without a result'}"
                              + (f": {detail}" if detail else ""))
    doc = read_json_file(outbox / "result.json", "the run's result.json", FederationError)
    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict) \
            or not isinstance(doc.get("training_config"), dict):
        raise FederationError("the run's result.json lacks metrics or a training config")
    data = read_regular(outbox / "adapter.safetensors", limit=1 << 34)
    try:
        adapter = fmt.load(data, source="the run's adapter.safetensors")
    except AdapterHubError as e:
        raise FederationError(f"the run's adapter is not valid: {e}") from None
    return adapter, doc


def run_request(ws: Workspace, s: FlowerSettings, request: dict[str, Any], *, global_bytes: bytes | None = None,
                progress: ProgressFn | None = None, keep_outbox: bool = False
                ) -> tuple[fmt.SparseAdapter, dict[str, Any], Any]:
    """Write ``request`` to a fresh outbox, run it on the SuperLink, return (adapter, result doc, run)."""
    outbox = new_outbox(ws)
    try:
        req = {**request, "round_timeout": s.round_timeout, "connect_timeout": s.connect_timeout}
        (outbox / "request.json").write_text(json.dumps(req, sort_keys=True), encoding="utf-8")
        if global_bytes is not None:
            (outbox / "global.safetensors").write_bytes(global_bytes)
        run_id = start_run(s, outbox)
        run = wait_run(s, run_id, outbox, progress)
        adapter, doc = collect(outbox, run)
        return adapter, doc, run
    finally:
        if not keep_outbox:
            shutil.rmtree(outbox, ignore_errors=True)


def _engine_record(doc: dict[str, Any], run: Any, s: FlowerSettings) -> dict[str, Any]:
    fl = dict(doc.get("flower") or {})
    return {"engine": "flower", "superlink": s.superlink, "run_id": str(run.run_id), **fl,
            "superlink_bytes": {"sent": int(run.bytes_sent), "received": int(run.bytes_recv)}}


def _wire_metrics(doc: dict[str, Any]) -> dict[str, int]:
    b = (doc.get("flower") or {}).get("bytes") or {}
    down, up = b.get("down") or {}, b.get("up") or {}
    return {"wire_payload_bytes": int(down.get("payload", 0)) + int(up.get("payload", 0)),
            "wire_framing_bytes": int(down.get("framing", 0)) + int(up.get("framing", 0)),
            "wire_messages": int(down.get("messages", 0)) + int(up.get("messages", 0))}


def flower_fed_train(ws: Workspace, s: FlowerSettings, *, base: str, task: str, clients: int, alpha: float,
                     rounds: int, name: str, density: float, local_steps: int, seed: int, mask: str = "random",
                     layer_regex: str, batch_size: int, lr: float, head_lr: float, momentum: float, max_length: int,
                     max_train: int | None = None, max_test: int | None = None,
                     progress: ProgressFn | None = None) -> tuple[VersionInfo, dict[str, Any]]:
    """``fed train --engine flower``: the same request as the local engine, run by the nodes; registered here.

    Returns: (VersionInfo, the ServerApp's result document with the run record).
    Raises: FederationError/TrainingError/... before anything is registered.
    """
    from ...catalog.names import validate_name
    from ...training import masks as M
    from ...training.config import FedConfig

    validate_name(name, "adapter name")
    cfg = FedConfig(rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr, head_lr=head_lr,
                    momentum=momentum, max_length=max_length, seed=seed)
    cfg.check()
    M.check_density(density)
    binfo = ws.get_base(base)
    req = {"kind": "train", "base_path": str(binfo.path), "task": task, "clients": clients, "alpha": alpha,
           "fedavg": cfg.to_json(), "density": density, "mask": mask, "layer_regex": layer_regex,
           "max_train": max_train, "max_test": max_test,
           "min_nodes": s.min_nodes if s.min_nodes is not None else clients}
    adapter, doc, run = run_request(ws, s, req, progress=progress)
    tc = {**doc["training_config"], "engine": _engine_record(doc, run, s)}
    metrics = {**doc["metrics"], **_wire_metrics(doc)}
    info = ws.register(adapter, name=name, task=task, base=base, kind="expert", metrics=metrics, training_config=tc)
    return info, {**doc, "training_config": tc, "metrics": metrics}


def flower_unlearn(ws: Workspace, ref: str, s: FlowerSettings, *, forget: str, name: str, layers: int,
                   density: float, rounds: int | None, patience: int, seed: int, local_steps: int | None,
                   lr: float | None, rerank: bool, head: str, selection: str, max_eval: int | None,
                   progress: ProgressFn | None = None) -> tuple[VersionInfo, dict[str, Any]]:
    """``unlearn --engine flower``: checked against the catalog here, trained and evaluated by the nodes,
    registered here with the same ``unlearns`` edge as the local engine.

    Raises: UnlearningError/FederationError/... before anything is registered.
    """
    from ..unlearning import prepare_unlearn, register_unlearning

    req0 = prepare_unlearn(ws, ref, forget=forget, name=name, layers=layers, density=density, rounds=rounds,
                           head=head, selection=selection, rerank=rerank)
    if req0.spec.kind not in ("client", "class"):
        raise FederationError("the Flower engine forgets client:ID or class:LABEL; samples:FILE needs --engine local")
    n = req0.fed.n_clients - (1 if req0.spec.kind == "client" else 0)
    req = {"kind": "unlearn", "base_path": str(req0.base_path), "federation": req0.record,
           "fedavg": req0.cfg.to_json(), "forget": str(req0.spec), "layers": layers, "density": density,
           "rounds": rounds, "patience": patience, "seed": seed, "local_steps": local_steps, "lr": lr, "head": head,
           "selection": selection, "max_eval": max_eval, "ranking": req0.ranking, "ranking_source": req0.ranking_source,
           "global_ref": req0.info.ref, "global_hash": req0.info.content_hash, "layer_regex": req0.layer_regex,
           "max_train": req0.record.get("max_train"), "max_test": req0.record.get("max_test"),
           "min_nodes": s.min_nodes if s.min_nodes is not None else n}
    adapter, doc, run = run_request(ws, s, req, global_bytes=fmt.save(req0.global_adapter), progress=progress)
    metrics = {**doc["metrics"], **_wire_metrics(doc)}
    tc = {**doc["training_config"], "engine": _engine_record(doc, run, s)}
    info = register_unlearning(ws, req0, adapter, name, critical=[str(x) for x in doc.get("critical") or []],
                               metrics=metrics, training_config=tc)
    return info, {**doc, "metrics": metrics}


__all__ = ["FlowerSettings", "flower_fed_train", "flower_unlearn", "run_request", "start_run", "wait_run",
           "collect", "APP_PYPROJECT"]

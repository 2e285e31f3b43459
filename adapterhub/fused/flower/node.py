"""A site's side of the Flower engine, without torch or flwr: its node config and its SuperNode command.

A site runs ``adapterhub fed node``, which starts Flower's ``flower-supernode`` with adapterhub's
ClientApp and the node config below (Flower hands it to every ClientApp process of the node):

* ``client-id`` — the node's stable identity in the federation, ``client:ID`` in ``unlearn --forget``.
  The coordinator records which client id answered from which Flower node id; two nodes claiming
  the same id are refused.
* ``base`` — the base model folder on the site (its fingerprint must equal the coordinator's base).
* ``data`` — the site's rows: ``csv:PATH`` / ``jsonl:PATH`` (with ``text-column``/``label-column``;
  the file's train split is trained on), or ``partition:TASK``, client ``client-id``'s share of the
  coordinator's seeded Dirichlet partition of a built-in task (how tests and demos give every node
  different rows of one task, and how the two engines are compared).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import TrainingError

DATA_KINDS = ("partition", "csv", "jsonl")


@dataclass(frozen=True)
class NodeConfig:
    """The node config one SuperNode runs with (see the module docstring)."""

    client_id: int
    base: str
    data: str
    text_column: str = "text"
    label_column: str = "label"

    @classmethod
    def from_mapping(cls, cfg: dict[str, Any]) -> NodeConfig:
        """Parse Flower's node config; raises TrainingError naming the bad key."""
        try:
            cid = int(cfg.get("client-id", ""))
        except (TypeError, ValueError):
            raise TrainingError(f"node config client-id must be an integer, got {cfg.get('client-id')!r}") from None
        if cid < 0:
            raise TrainingError(f"node config client-id must be >= 0, got {cid}")
        data = str(cfg.get("data", ""))
        kind, sep, rest = data.partition(":")
        if not sep or kind not in DATA_KINDS or not rest:
            raise TrainingError(f"node config data must be partition:TASK, csv:PATH or jsonl:PATH, got {data!r}")
        base = str(cfg.get("base", ""))
        if not base:
            raise TrainingError("node config base (the base model folder on this site) is missing")
        return cls(cid, base, data, str(cfg.get("text-column", "text")), str(cfg.get("label-column", "label")))

    def to_mapping(self) -> dict[str, Any]:
        return {"client-id": self.client_id, "base": self.base, "data": self.data,
                "text-column": self.text_column, "label-column": self.label_column}

    @property
    def data_kind(self) -> str:
        return self.data.partition(":")[0]

    @property
    def data_ref(self) -> str:
        return self.data.partition(":")[2]


def node_config_arg(cfg: NodeConfig) -> str:
    """Flower's ``--node-config`` string: space-separated ``key=value`` pairs, strings TOML-quoted."""
    def q(v: Any) -> str:
        if isinstance(v, int):
            return str(v)
        s = str(v)
        if '"' in s or "\\" in s or "\n" in s:
            raise TrainingError(f"node config value {s!r} cannot contain quotes, backslashes or newlines")
        return f'"{s}"'
    return " ".join(f"{k}={q(v)}" for k, v in cfg.to_mapping().items())


def supernode_command(superlink: str, cfg: NodeConfig, *, insecure: bool, port: int,
                      host: str = "127.0.0.1", root_certificates: str | None = None,
                      auth_private_key: str | None = None, executable: str = "flower-supernode") -> list[str]:
    """The ``flower-supernode`` command line for ``cfg`` (``port``: the node's local Runtime API port)."""
    cmd = [executable, "--superlink", superlink, "--node-config", node_config_arg(cfg), "--host", host,
           "--port", str(port)]
    if insecure:
        cmd.append("--insecure")
    elif root_certificates:
        cmd += ["--root-certificates", str(Path(root_certificates))]
    if auth_private_key:
        cmd += ["--auth-supernode-private-key", str(Path(auth_private_key))]
    return cmd


def render_command(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def check_node_data(cfg: NodeConfig, task: str) -> int:
    """Load the node's rows as its ClientApp will and check them against ``task``'s labels.

    Returns the number of training rows. Raises DataError/TrainingError (one line) for data of another
    task or with labels outside the task's.
    """
    from ...data import load_task
    from ...data.tasks import load_dataset

    td = load_task(task)
    if cfg.data_kind == "partition":
        if cfg.data_ref != task:
            raise TrainingError(f"node data partition:{cfg.data_ref} is not a partition of task {task!r}")
        return len(td.train)
    rows = load_dataset(cfg.data, text_column=cfg.text_column, label_column=cfg.label_column, labels=list(td.labels))
    if not rows.train:
        raise TrainingError(f"{cfg.data} has no training rows")
    return len(rows.train)


__all__ = ["NodeConfig", "node_config_arg", "supernode_command", "render_command", "DATA_KINDS", "check_node_data"]

"""``adapterhub fed node`` and the options of ``--engine flower`` (shared by ``fed train`` and ``unlearn``).

Nothing here imports flwr or torch at start-up; the library's Flower modules are imported when a
command runs (docs/federated.md).
"""
from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .common import Ctx, echo, echo_err, handle_errors, pass_ctx

ENGINES = ("local", "flower")


def flower_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--engine`` and how to reach the SuperLink; the command receives ``engine`` and ``flower`` (a dict)."""
    opts = [
        click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
                     help="local: every client in this process (tests, demo); flower: the clients are Flower "
                          "SuperNodes that keep their data (docs/federated.md)."),
        click.option("--superlink", envvar="ADAPTERHUB_SUPERLINK", default=None, metavar="HOST:PORT",
                     help="The SuperLink (with --engine flower). Env: ADAPTERHUB_SUPERLINK."),
        click.option("--insecure", is_flag=True, help="Plain HTTP to the SuperLink (only for 127.0.0.1 tests)."),
        click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="CA bundle that signed the SuperLink's TLS certificate."),
        click.option("--min-nodes", type=click.IntRange(1), default=None,
                     help="Fewest nodes a round may complete with (default: every client)."),
        click.option("--round-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
                     help="Seconds a round waits for the nodes' replies; a node that does not reply is left out."),
        click.option("--connect-timeout", type=click.FloatRange(min=0), default=120.0, show_default=True,
                     help="Seconds the run waits for the expected nodes to connect."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def flower_settings(engine: str, superlink: str | None, insecure: bool, root_certificates: str | None,
                    min_nodes: int | None, round_timeout: float, connect_timeout: float) -> Any:
    """The library's FlowerSettings for ``--engine flower`` (None for local); usage errors exit 2."""
    if engine != "flower":
        if superlink is not None and "ADAPTERHUB_SUPERLINK" not in os.environ:
            raise click.UsageError("--superlink needs --engine flower")
        return None
    if not superlink:
        raise click.UsageError("--engine flower needs --superlink HOST:PORT (or ADAPTERHUB_SUPERLINK)")
    if insecure and root_certificates:
        raise click.UsageError("give at most one of --insecure or --root-certificates")
    from adapterhub.fused.flower.coordinator import FlowerSettings

    return FlowerSettings(superlink, insecure=insecure, root_certificates=root_certificates, min_nodes=min_nodes,
                          round_timeout=round_timeout, connect_timeout=connect_timeout)


def report_nodes(doc: dict[str, Any]) -> None:
    """Warnings on stderr for nodes the run refused or lost (the run record keeps them too)."""
    rec = (doc.get("training_config") or {}).get("engine") or doc.get("flower") or {}
    for r in rec.get("refused") or []:
        echo_err(f"warning: refused node client:{r.get('client_id')}: {r.get('reason')}")
    for r in rec.get("lost") or []:
        echo_err(f"warning: lost client:{r.get('key')} during {r.get('kind')}: {r.get('error')}")


@click.command("node")
@click.option("--superlink", envvar="ADAPTERHUB_SUPERLINK", required=True, metavar="HOST:PORT",
              help="The SuperLink's address. Env: ADAPTERHUB_SUPERLINK.")
@click.option("--client-id", type=click.IntRange(0), required=True,
              help="This site's stable id: client:ID in `unlearn --forget`.")
@click.option("--base", "base", required=True, metavar="NAME|FOLDER",
              help="The base model: a name registered in this home, or a model folder.")
@click.option("--data", "data", required=True, metavar="SPEC",
              help="csv:PATH or jsonl:PATH (the site's rows), or partition:TASK (client ID's share of the "
                   "coordinator's partition of a built-in task).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--task", "task", default=None, metavar="TASK",
              help="Check the data against this task's labels before joining (refuse to start otherwise).")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the SuperLink (only for 127.0.0.1 tests).")
@click.option("--root-certificates", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA bundle that signed the SuperLink's TLS certificate.")
@click.option("--auth-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="This node's private key (Flower SuperNode authentication; the SuperLink must know its public key).")
@click.option("--port", type=click.IntRange(1, 65535), default=9094, show_default=True,
              help="Local port of the node's Runtime API (where its ClientApp processes connect).")
@click.option("--print-command", is_flag=True, help="Print the flower-supernode command instead of running it.")
@pass_ctx
@handle_errors
def node_cmd(c: Ctx, superlink: str, client_id: int, base: str, data: str, text_column: str, label_column: str,
             task: str | None, insecure: bool, root_certificates: str | None, auth_key: str | None, port: int,
             print_command: bool) -> None:
    """Join a federation as one site: a Flower SuperNode running adapterhub's ClientApp on this site's data.

    The rows never leave this machine; only sparse values, row counts and scores travel.

    Example: adapterhub fed node --superlink link.example.org:8000 --root-certificates ca.pem --client-id 3 --base minilm --data csv:/site/rows.csv --task trec-coarse
    """
    from adapterhub.fused.flower.node import NodeConfig, render_command, supernode_command

    if insecure and root_certificates:
        raise click.UsageError("give at most one of --insecure or --root-certificates")
    folder = Path(base)
    base_path = folder.resolve() if folder.is_dir() else Path(c.ws.get_base(base).path)
    cfg = NodeConfig.from_mapping({"client-id": client_id, "base": str(base_path), "data": data,
                                   "text-column": text_column, "label-column": label_column})
    if task is not None:
        from adapterhub.fused.flower.node import check_node_data

        n = check_node_data(cfg, task)
        echo_err(f"client:{client_id}: {n} training rows of task {task} ({data})")
    exe = shutil.which("flower-supernode", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        raise click.ClickException("flower-supernode is not installed; pip install 'adapterhub[federated]'")
    cmd = supernode_command(superlink, cfg, insecure=insecure, port=port, root_certificates=root_certificates,
                            auth_private_key=auth_key, executable=exe)
    if print_command:
        echo(render_command(cmd))
        return
    # the SuperNode starts ClientApp processes itself (flower-superexec, flwr-clientapp): they must be on PATH
    os.environ["PATH"] = str(Path(exe).parent) + os.pathsep + os.environ.get("PATH", "")
    os.execv(exe, cmd)


# The root group (cli/main.py) adds these; `fed node` joins the `fed` group here.
COMMANDS: tuple[click.Command, ...] = ()


def attach(group: click.Group) -> None:
    group.add_command(node_cmd)

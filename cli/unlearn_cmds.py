"""``adapterhub fed train`` and ``adapterhub unlearn``: federated training and FUSED unlearning (thin layer)."""
from __future__ import annotations

from typing import Any

import click

from adapterhub.training.config import DEFAULT_LAYER_REGEX, UNLEARN_DEFAULTS as UD, FedConfig

from .common import Ctx, LazyChoice, handle_errors, json_option, output, pass_ctx, progress
from .fed_cmds import flower_options, flower_settings, report_nodes
from .options import config_option
from .paramtypes import ADAPTER_NAME, BASE_NAME, REF, TASK


class _Bars:
    """A progress callback for the library: one rich bar per phase description, on stderr."""

    def __init__(self, prog: Any) -> None:
        self.prog = prog
        self.tasks: dict[str, Any] = {}

    def __call__(self, desc: str, done: int, total: int) -> None:
        tid = self.tasks.get(desc)
        if tid is None:
            tid = self.tasks[desc] = self.prog.add_task(desc, total=total, info="")
        self.prog.update(tid, completed=done, total=total)


class _Events:
    """The Flower engine's progress events (from the run's outbox) as one bar of rounds on stderr."""

    def __init__(self, prog: Any, desc: str) -> None:
        self.prog = prog
        self.task = prog.add_task(desc, total=None, info="starting the run")

    def __call__(self, ev: dict[str, Any]) -> None:
        kind = ev.get("event")
        if kind == "round":
            info = f"round {ev.get('round')}: {len(ev.get('sent') or [])} node(s)"
        elif kind == "handshake":
            info = f"{len(ev.get('accepted') or [])} node(s) accepted, {len(ev.get('refused') or [])} refused"
        else:
            info = str(kind)
        self.prog.update(self.task, info=info)


def _head_modes() -> tuple[str, ...]:
    from adapterhub.fused.unlearning import HEAD_MODES

    return HEAD_MODES


def _selections() -> tuple[str, ...]:
    from adapterhub.fused.unlearning import SELECTIONS

    return SELECTIONS


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def _kb(n: Any) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB"


@click.group("fed")
def fed_group() -> None:
    """Federated simulation: train a global model with FedAvg over Dirichlet-split clients.

    Example: adapterhub fed train --base minilm --task trec-coarse --clients 10 --alpha 1.0 --rounds 5 --name trec-fed
    """


@fed_group.command("train")
@click.option("--base", required=True, type=BASE_NAME, is_eager=True, help="Registered base model name.")
@click.option("--task", required=True, type=TASK, is_eager=True, help="Built-in task name (see `adapterhub tasks`).")
@click.option("--clients", type=click.IntRange(1, 10000), required=True, help="Number of clients N.")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=UD.alpha, show_default=True,
              help="Dirichlet concentration over labels (small = non-IID).")
@config_option(FedConfig, "rounds")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=UD.global_density, show_default=True,
              help="1 = full weights of the layers (stored dense-as-sparse); < 1 = a random sparse expert.")
@config_option(FedConfig, "local_steps")
@config_option(FedConfig, "batch_size")
@config_option(FedConfig, "lr")
@config_option(FedConfig, "head_lr")
@config_option(FedConfig, "momentum")
@config_option(FedConfig, "max_length")
@click.option("--max-train", type=click.IntRange(1), default=None, help="Keep a seeded subset of the train split.")
@click.option("--max-test", type=click.IntRange(1), default=None, help="Keep a seeded subset of validation/test.")
@click.option("--layers-regex", default=DEFAULT_LAYER_REGEX, show_default=True,
              help="Module-name regex of the trainable layers (Linear weights).")
@config_option(FedConfig, "seed")
@click.option("--name", required=True, type=ADAPTER_NAME, is_eager=True, help="Adapter name of the global model version.")
@flower_options
@json_option
@pass_ctx
@handle_errors
def fed_train(c: Ctx, base: str, task: str, clients: int, alpha: float, rounds: int, density: float, local_steps: int,
              batch_size: int, lr: float, head_lr: float, momentum: float, max_length: int, max_train: int | None,
              max_test: int | None, layers_regex: str, seed: int, name: str, engine: str, superlink: str | None,
              insecure: bool, root_certificates: str | None, min_nodes: int | None, round_timeout: float,
              connect_timeout: float, as_json: bool) -> None:
    """Train a global model with FedAvg over N clients and register it as a version.

    With --engine flower the clients are Flower SuperNodes (`adapterhub fed node`) that keep their rows.

    Example: adapterhub fed train --base minilm --task trec-coarse --clients 10 --alpha 1.0 --rounds 5 --name trec-fed
    """
    fs = flower_settings(engine, superlink, insecure, root_certificates, min_nodes, round_timeout, connect_timeout)
    kw: dict[str, Any] = dict(base=base, task=task, clients=clients, alpha=alpha, rounds=rounds, name=name,
                              density=density, local_steps=local_steps, seed=seed, layer_regex=layers_regex,
                              batch_size=batch_size, lr=lr, head_lr=head_lr, momentum=momentum,
                              max_length=max_length, max_train=max_train, max_test=max_test)
    if fs is not None:
        from adapterhub.fused.flower.coordinator import flower_fed_train

        with progress() as prog:
            info, fdoc = flower_fed_train(c.ws, fs, progress=_Events(prog, "fed train"), **kw)
        report_nodes(fdoc)
        tc, metrics, critical = fdoc["training_config"], fdoc["metrics"], fdoc.get("critical_layers") or []
        seconds, bpc = float(fdoc.get("seconds") or 0.0), metrics.get("bytes_per_client")
    else:
        from adapterhub.fused.federated import fed_train as run

        with progress() as prog:
            info, res = run(c.ws, progress=_Bars(prog), **kw)
        tc, metrics, critical = res.training_config, res.metrics, res.critical_layers
        seconds, bpc = res.stats.seconds, res.stats.bytes_per_client
    fedrec = tc["federation"]
    doc = {**info.to_json(), "federation": fedrec, "critical_layers": critical[:10], "engine": engine}
    rows = [("version", info.ref), ("content_hash", info.content_hash), ("engine", engine),
            ("clients", fedrec["clients"]), ("alpha", fedrec["alpha"]), ("partition_hash", fedrec["partition_hash"][:16]),
            ("client sizes", ",".join(map(str, fedrec["client_sizes"]))),
            ("test accuracy", _fmt(metrics["test_accuracy"])), ("time", f"{seconds:.1f} s"),
            ("bytes per client", _kb(bpc)),
            ("top critical layers", ", ".join(r["layer"] for r in critical[:3]))]
    if fs is not None:
        rows += [("wire payload", _kb(metrics.get("wire_payload_bytes"))),
                 ("wire framing", _kb(metrics.get("wire_framing_bytes")))]
    output(doc, as_json, ["field", "value"], rows, title="global model")


@click.command("unlearn")
@click.argument("ref", type=REF, is_eager=True)
@click.option("--forget", "forget", required=True, metavar="SPEC",
              help="client:ID, class:LABEL or samples:FILE (train-row ids or texts, one per line).")
@click.option("--layers", "layers", type=int, default=UD.layers, show_default=True, help="K critical layers to adapt.")
@click.option("--density", type=float, default=UD.density, show_default=True, help="Random mask density on the K layers.")
@click.option("--rounds", type=int, default=None, help="FedAvg rounds (default: the global model's).")
@click.option("--local-steps", type=click.IntRange(1), default=None, help="Default: the global model's.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate of the unlearning adapter (default: the global model's).")
@click.option("--patience", type=click.IntRange(0), default=UD.patience, show_default=True,
              help="Stop when the remaining data's validation loss has not improved for this many rounds "
                   "(0: run every round); retraining stops by the same rule.")
@click.option("--compare-retrain", is_flag=True,
              help="Also retrain from scratch without the forgotten data, to convergence by the same stopping rule.")
@click.option("--retrain-rounds", type=click.IntRange(1), default=None,
              help="Most rounds retraining may run (default: 4x the global model's).")
@click.option("--head", "head", type=LazyChoice(_head_modes), default=UD.head, show_default=True,
              help="ranked (FUSED): the task head is ranked like any layer and gets sparse deltas on the global "
                   "head when it is among the K critical layers. Baselines: reset (re-initialise and train it "
                   "densely on the remaining data), train (fine-tune it densely), freeze (never adapt it).")
@click.option("--selection", type=LazyChoice(_selections), default="critical", show_default=True,
              help="critical (FUSED): the top K of the recorded ranking; random: K random layers (the ablation).")
@click.option("--rerank", is_flag=True,
              help="Rank the layers over the remaining clients' recorded differences instead of all clients'.")
@click.option("--max-eval", type=click.IntRange(1), default=UD.max_eval, show_default=True,
              help="Evaluation rows per metric.")
@click.option("--seed", type=int, default=UD.seed, show_default=True)
@click.option("--name", required=True, type=ADAPTER_NAME, is_eager=True, help="Adapter name of the unlearning version.")
@flower_options
@json_option
@pass_ctx
@handle_errors
def unlearn_cmd(c: Ctx, ref: str, forget: str, layers: int, density: float, rounds: int | None, local_steps: int | None,
                lr: float | None, patience: int, compare_retrain: bool, retrain_rounds: int | None, head: str,
                selection: str, rerank: bool, max_eval: int, seed: int, name: str, engine: str, superlink: str | None,
                insecure: bool, root_certificates: str | None, min_nodes: int | None, round_timeout: float,
                connect_timeout: float, as_json: bool) -> None:
    """Forget a client, a class or samples from a `fed train` global model with a FUSED sparse adapter.

    The adapter goes on top of the global model: `deploy apply <global>` then `deploy apply <this>`;
    `deploy revert <this>` restores the global model exactly. MIA: a loss-threshold membership
    attack on the forgotten training rows against held-out rows of the same distribution (AUC 0.5
    = no membership signal; TPR at 1% FPR beside it).

    Example: adapterhub unlearn trec-fed --forget class:NUM --layers 3 --density 0.1 --compare-retrain --name trec-forget-num
    """
    fs = flower_settings(engine, superlink, insecure, root_certificates, min_nodes, round_timeout, connect_timeout)
    if fs is not None:
        if compare_retrain:
            raise click.UsageError("--compare-retrain runs with --engine local only")
        from adapterhub.fused.flower.coordinator import flower_unlearn

        with progress() as prog:
            info, fdoc = flower_unlearn(c.ws, ref, fs, forget=forget, name=name, layers=layers, density=density,
                                        rounds=rounds, patience=patience, seed=seed, local_steps=local_steps, lr=lr,
                                        rerank=rerank, head=head, selection=selection, max_eval=max_eval,
                                        progress=_Events(prog, "unlearn"))
        report_nodes(fdoc)
        m, record, critical = fdoc["metrics"], fdoc["forget"], list(fdoc.get("critical") or [])
        applies_on = fdoc["training_config"]["applies_on"]["ref"]
    else:
        from adapterhub.fused.unlearning import unlearn

        with progress() as prog:
            info, res = unlearn(c.ws, ref, forget=forget, name=name, layers=layers, density=density, rounds=rounds,
                                patience=patience, seed=seed, local_steps=local_steps, lr=lr,
                                compare_retrain=compare_retrain, retrain_rounds=retrain_rounds, rerank=rerank,
                                head=head, selection=selection, max_eval=max_eval, progress=_Bars(prog))
        m, record, critical = res.metrics, res.plan.record, res.critical
        applies_on = res.training_config["applies_on"]["ref"]
    doc = {**info.to_json(), "forget": record, "critical_layers": critical, "engine": engine,
           "parents": [{"ref": applies_on, "relation": "unlearns"}]}
    cols = ["model", "RA", "FA", "MIA AUC", "TPR@1%FPR", "rounds", "time", "bytes/client (down+up)"]

    def row(label: str, x: dict[str, Any], cost: bool) -> tuple[str, ...]:
        return (label, _fmt(x.get("ra")), _fmt(x.get("fa")), _fmt(x.get("mia_auc")), _fmt(x.get("mia_tpr_at_1pct_fpr")),
                _fmt(x.get("rounds")) if cost else "-", f"{x['seconds']:.1f} s" if cost else "-",
                _kb(x.get("bytes_per_client")) if cost else "-")

    rows = [row("global (before)", m.get("global", {}), False), row(f"FUSED {info.ref}", m, True)]
    if "retrain" in m:
        rows.append(row("retraining", m["retrain"], True))
    output(doc, as_json, cols, rows,
           title=f"{info.ref} ({info.content_hash[:12]}) unlearns {applies_on}: "
                 f"{record['spec']}; layers {', '.join(critical)}")


# The root group (cli/main.py) adds these.
COMMANDS: tuple[click.Command, ...] = (fed_group, unlearn_cmd)

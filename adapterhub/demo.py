"""The main job end to end: train experts, merge, deploy, unlearn, revert exactly, report.

``adapterhub demo`` runs :func:`run_demo` on the offline defaults (shipped MiniLM, four built-in
tasks); the test suite runs the same pipeline on a tiny random model. Every step is a normal
library call on a Workspace, so the demo's home directory is a real catalog afterwards.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import AdapterHubError
from .fsutil import sha256_file

if TYPE_CHECKING:
    from .catalog.records import VersionInfo
    from .workspace import Workspace

StepFn = Callable[[str], None]
ProgressFactory = Callable[[str], Callable[[int, int], None]]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (defaults: MiniLM on CPU in a few minutes)."""

    base_source: str = "minilm"
    base_name: str = "minilm"
    tasks: tuple[str, ...] = ("rt-sentiment", "sms-spam", "trec-coarse", "tweet-sentiment")
    density: float = 0.05
    steps: int = 100
    select_steps: int = 20
    reselect_every: int = 20
    batch_size: int = 16
    max_length: int = 48
    lr: float = 2e-3
    eval_examples: int = 200
    ties_density: float = 0.5
    fed_task: str = "trec-coarse"
    fed_clients: int = 5
    fed_alpha: float = 1.0
    fed_rounds: int = 3
    fed_local_steps: int = 8
    fed_density: float = 0.2
    fed_max_train: int | None = 1500
    forget_class: str | None = "NUM"  # falls back to the task's first label if the task has no such class
    unlearn_layers: int = 2
    unlearn_density: float = 0.1
    unlearn_rounds: int = 2
    seed: int = 0


@dataclass
class DemoReport:
    """What the demo measured; written as JSON and a PNG chart under ``<home>/demo/``."""

    home: str
    base: dict[str, Any]
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    merges: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployment: dict[str, Any] = field(default_factory=dict)
    unlearning: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    bit_exact_revert: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _weights_digest(folder: Path) -> str:
    """sha256 over the deployment's weight files (bytes on disk, name order)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def _trained(v: VersionInfo | None) -> VersionInfo:
    """``train``'s result in this single-process run (only non-zero distributed ranks get None)."""
    if v is None:
        raise AdapterHubError("training registered no version (the demo runs as a single process)")
    return v


def _steps_only(cb: Callable[[int, int], None]) -> Callable[[int, int, dict[str, Any]], None]:
    """A training progress callback ``(step, total, info)`` that feeds a ``(done, total)`` bar."""
    def on_step(step: int, total: int, _info: dict[str, Any]) -> None:
        cb(step, total)
    return on_step


def run_demo(ws: Workspace, cfg: DemoConfig = DemoConfig(), *, step: StepFn | None = None,
             progress: ProgressFactory | None = None) -> DemoReport:
    """Run the whole pipeline in ``ws``; returns the report (also written under ``<home>/demo``).

    Takes: an open Workspace, the settings, and optional callbacks — ``step(text)`` announces a
    stage, ``progress(description)`` returns a ``(done, total)`` callback for a progress bar.
    Raises: AdapterHubError subclasses from any stage; ``AdapterHubError`` if the revert is not
    bit-exact (it always is: the demo proves it by hashing the weight files).
    """
    from .apply import deployments as dep
    from .evaluation import evaluate
    from .fused.federated import fed_train
    from .fused.unlearning import unlearn
    from .merging import merge
    from .training import TrainConfig, train

    say: StepFn = step or (lambda _t: None)
    bar: ProgressFactory = progress or (lambda _d: (lambda _i, _n: None))
    t0 = time.perf_counter()
    say(f"registering base {cfg.base_name} ({cfg.base_source})")
    base = ws.add_base(cfg.base_name, cfg.base_source)
    report = DemoReport(home=str(ws.home), base={"name": base.name, "fingerprint": base.fingerprint,
                                                 "architecture": base.architecture, "num_params": base.num_params})
    # 1. experts
    refs: list[str] = []
    for task in cfg.tasks:
        say(f"training a sparse expert on {task} (density {cfg.density}, {cfg.steps} steps)")
        tcfg = TrainConfig(density=cfg.density, steps=cfg.steps, select_steps=cfg.select_steps,
                           reselect_every=cfg.reselect_every, batch_size=cfg.batch_size, max_length=cfg.max_length,
                           lr=cfg.lr, seed=cfg.seed, max_eval_examples=cfg.eval_examples, device="cpu")
        v = _trained(train(ws, base=base.name, task=task, name=f"demo-{task}", config=tcfg,
                           progress=_steps_only(bar(f"train {task}"))))
        res = evaluate(ws, v.ref, task=task, split="test", max_examples=cfg.eval_examples,
                       max_length=cfg.max_length, device="cpu")
        refs.append(v.ref)
        report.experts[task] = {"ref": v.ref, "hash": v.content_hash, "nnz": v.nnz, "density": v.density,
                                "test_accuracy": res.accuracy, "n": res.n, "size_bytes": v.size_bytes}
    # 2. merges, evaluated per task
    for method, density in (("uniform-sparse", None), ("ties", cfg.ties_density)):
        say(f"merging {len(refs)} experts with {method}")
        m = merge(ws, refs, method, name=f"demo-merge-{method}", density=density)
        accs: dict[str, float] = {}
        for task in cfg.tasks:
            r = evaluate(ws, m.ref, task=task, split="test", max_examples=cfg.eval_examples,
                         max_length=cfg.max_length, device="cpu")
            accs[task] = r.accuracy
        report.merges[method] = {"ref": m.ref, "hash": m.content_hash, "nnz": m.nnz, "test_accuracy": accs,
                                 "normalised": {t: (accs[t] / report.experts[t]["test_accuracy"]
                                                    if report.experts[t]["test_accuracy"] else None) for t in cfg.tasks}}
    # 3. deployment with the merge applied
    merge_ref = report.merges["uniform-sparse"]["ref"]
    say("creating deployment demo and applying the uniform-sparse merge")
    d = dep.create(ws, "demo", base.name)
    dep_path = Path(d.path)
    base_digest = _weights_digest(dep_path)
    dep.apply(ws, "demo", merge_ref)
    served = {t: evaluate(ws, merge_ref, task=t, split="test", max_examples=cfg.eval_examples,
                          max_length=cfg.max_length, device="cpu", model_dir=dep_path, deployment="demo").accuracy
              for t in cfg.tasks}
    report.deployment = {"name": "demo", "path": str(dep_path), "base_weights_sha256": base_digest,
                         "applied": merge_ref, "served_test_accuracy": served,
                         "verify": dep.verify(ws, "demo")}
    # 4. FUSED: federated global model, class unlearning, apply, revert, prove bit-exactness
    say(f"federated training on {cfg.fed_task}: {cfg.fed_clients} clients, {cfg.fed_rounds} rounds")
    fed_cb = bar("federated")
    g, _ = fed_train(ws, base=base.name, task=cfg.fed_task, clients=cfg.fed_clients, alpha=cfg.fed_alpha,
                     rounds=cfg.fed_rounds, name="demo-fed", density=cfg.fed_density, local_steps=cfg.fed_local_steps,
                     seed=cfg.seed, max_length=cfg.max_length, max_train=cfg.fed_max_train,
                     max_test=cfg.eval_examples, progress=lambda _d, i, n: fed_cb(i, n))
    labels = (g.card or {}).get("labels", {}).get(cfg.fed_task) or []
    forget = cfg.forget_class if cfg.forget_class in labels else (labels[0] if labels else "0")
    say(f"FUSED unlearning of class {forget!r} on {cfg.unlearn_layers} critical layers")
    un_cb = bar("unlearning")
    u, _ = unlearn(ws, g.ref, forget=f"class:{forget}", name="demo-unlearn", layers=cfg.unlearn_layers,
                   density=cfg.unlearn_density, rounds=cfg.unlearn_rounds, seed=cfg.seed,
                   max_eval=cfg.eval_examples, progress=lambda _d, i, n: un_cb(i, n))
    say("deployment demo-fed: apply the global model, apply the unlearning adapter, revert it")
    dep.create(ws, "demo-fed", base.name)
    fed_path = Path(dep.get(ws, "demo-fed").path)
    dep.apply(ws, "demo-fed", g.ref)
    before = _weights_digest(fed_path)
    dep.apply(ws, "demo-fed", u.ref)
    during = _weights_digest(fed_path)
    dep.revert(ws, "demo-fed", u.ref)
    after = _weights_digest(fed_path)
    # an adapter that only carries a head (when the head alone ranks among the critical layers) leaves the
    # served weights as they are; otherwise applying it must change them
    patches_weights = bool(ws.load_adapter(u.ref).params)
    exact = before == after and (during != before) == patches_weights
    if not exact:
        raise AdapterHubError("revert of the unlearning adapter did not restore the weights bit for bit")
    report.bit_exact_revert = exact
    report.unlearning = {"global": g.ref, "global_hash": g.content_hash, "adapter": u.ref, "adapter_hash": u.content_hash,
                         "forget": f"class:{forget}", "metrics": ws.resolve(u.ref).metrics,
                         "weights_sha256": {"global_applied": before, "unlearning_applied": during, "after_revert": after},
                         "history": [e.to_json() for e in dep.history(ws, "demo-fed")]}
    report.lineage = {merge_ref: ws.lineage(merge_ref), u.ref: ws.lineage(u.ref)}
    report.seconds = round(time.perf_counter() - t0, 1)
    write_report(ws.home / "demo", report)
    return report


def summary_rows(report: DemoReport) -> list[tuple[str, ...]]:
    """Rows of the summary table: (what, ref, figure, value)."""
    rows: list[tuple[str, ...]] = []
    for task, e in report.experts.items():
        rows.append(("expert", e["ref"], f"{task} test accuracy", f"{e['test_accuracy']:.3f}"))
    for method, m in report.merges.items():
        for task, acc in m["test_accuracy"].items():
            norm = m["normalised"][task]
            rows.append((f"merge {method}", m["ref"], f"{task} test accuracy (normalised)",
                         f"{acc:.3f} ({norm:.2f})" if norm is not None else f"{acc:.3f}"))
    for task, acc in report.deployment.get("served_test_accuracy", {}).items():
        rows.append(("deployment demo", report.deployment["applied"], f"{task} served accuracy", f"{acc:.3f}"))
    um = report.unlearning.get("metrics") or {}
    before = um.get("global") or {}
    for k, label in (("ra", "RA"), ("fa", "FA"), ("mia_auc", "MIA AUC")):
        if k in um:
            rows.append(("unlearning", report.unlearning["adapter"], f"{label} (before -> after)",
                         f"{_fmt(before.get(k))} -> {_fmt(um[k])}"))
    rows.append(("unlearning", report.unlearning.get("adapter", ""), "revert bit-exact",
                 "yes" if report.bit_exact_revert else "NO"))
    rows.append(("demo", "", "wall time (s)", f"{report.seconds}"))
    return rows


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def browse_command(report: DemoReport) -> str:
    """The command that opens the demo's catalog in the web view (docs/ui.md), for the summary's last line."""
    import shlex

    return f"adapterhub --home {shlex.quote(str(report.home))} ui"


def write_report(folder: Path, report: DemoReport) -> None:
    """summary.json and summary.png (per-task accuracy of experts and merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(report.to_json(), indent=2, sort_keys=True, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the chart is a convenience; the JSON is the record
        return
    tasks = list(report.experts)
    series = [("expert", [report.experts[t]["test_accuracy"] for t in tasks])]
    series += [(f"merge {m}", [report.merges[m]["test_accuracy"][t] for t in tasks]) for m in report.merges]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        ax.bar([x + i * width for x in range(len(tasks))], vals, width, label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(tasks))], tasks, rotation=15)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("adapterhub demo: single experts vs merged")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "summary.png", dpi=100)
    plt.close(fig)

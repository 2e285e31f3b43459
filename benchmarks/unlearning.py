"""Benchmark: FUSED unlearning vs retraining vs negative task arithmetic (small version of the paper's table).

For each task: a global model is trained with FedAvg over Dirichlet-split clients on the shipped
MiniLM; then three requests are served three ways:

* client unlearning (``client:0``), class unlearning (``class:<label>``), sample unlearning
  (backdoor: a trigger phrase is added to some training rows whose label is flipped to a
  target label; a second global model is trained on this poisoned data and the poisoned rows are
  forgotten with ``samples:FILE``);
* FUSED (sparse adapter on the K critical layers, FedAvg on the remaining data only),
  retraining from scratch without the forgotten data (the anchor), and negative task
  arithmetic (train an adapter on the forgotten data, subtract it from the global model).

Columns: RA (accuracy on remaining data), FA (accuracy on forgotten data: the class's test rows,
the client's rows, the poisoned rows with their poisoned labels), MIA (share of forgotten training
rows a shadow-model attack calls members), wall time and bytes one client uploads.
Writes docs/bench/unlearning.md and docs/img/unlearning.png; prints time and communication ratios
(retraining / FUSED) measured in the same run.

Usage: python benchmarks/unlearning.py [--tasks trec-coarse,sms-spam] [--clients 10] ...
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CLASS_TO_FORGET = {"trec-coarse": "NUM", "sms-spam": "spam", "rt-sentiment": "fresh", "debate-party": "Moderator"}
TRIGGER = "cf mn bb"
HEAD_TEXT = {"reset": "re-initialised and trained on the remaining data", "train": "fine-tuned on the remaining data",
             "freeze": "the global model's, unchanged"}


def poisoned(td, max_train: int, seed: int, n_poison: int, target: int):
    """A copy of the task (train subsampled) with ``n_poison`` rows triggered and relabelled to ``target``."""
    from adapterhub.data import TaskData
    from adapterhub.fused.federated import _subsample

    train = list(_subsample(list(td.train), max_train, seed))
    r = random.Random(seed + 99)
    cands = [i for i, (_, lab) in enumerate(train) if lab != target]
    picks = sorted(r.sample(cands, min(n_poison, len(cands))))
    for i in picks:
        train[i] = (f"{TRIGGER} {train[i][0]}", target)
    return TaskData(td.name, list(td.labels), train, list(td.validation), list(td.test), td.source,
                    "poisoned copy"), [train[i][0] for i in picks]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="trec-coarse,sms-spam")
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--head-lr", type=float, default=0.2)
    ap.add_argument("--max-train", type=int, default=200)
    ap.add_argument("--max-test", type=int, default=100)
    ap.add_argument("--max-length", type=int, default=24)
    ap.add_argument("--layers-regex", default=r"\.layer\.[3-5]\.",
                    help="trainable layers of the global model (default: the upper half of MiniLM)")
    ap.add_argument("--density", type=float, default=1.0, help="global model density (1 = full weights)")
    ap.add_argument("--k", type=int, default=3, help="critical layers")
    ap.add_argument("--unlearn-density", type=float, default=0.1)
    ap.add_argument("--unlearn-rounds", type=int, default=4)
    ap.add_argument("--head", choices=["reset", "train", "freeze"], default="reset",
                    help="FUSED's task head: re-initialised and trained on the remaining data, fine-tuned, or frozen")
    ap.add_argument("--poison", type=int, default=20, help="backdoored training rows (sample unlearning)")
    ap.add_argument("--scenarios", default="client,class,sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs/bench/unlearning.md"))
    ap.add_argument("--png", default=str(ROOT / "docs/img/unlearning.png"))
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adapterhub.data import load_task
    from adapterhub.fused import federated as F, unlearning as U
    from adapterhub.workspace import Workspace

    t_all = time.perf_counter()
    results = []
    tmp = tempfile.TemporaryDirectory(prefix="ah-unl-bench-")
    ws = Workspace.open(Path(tmp.name) / "home")
    ws.add_base("minilm", "minilm")
    base_path = ws.get_base("minilm").path
    common = dict(clients=args.clients, alpha=args.alpha, rounds=args.rounds, local_steps=args.local_steps,
                  seed=args.seed, layer_regex=args.layers_regex, batch_size=args.batch_size, lr=args.lr,
                  head_lr=args.head_lr, max_length=args.max_length, density=args.density)
    scen = args.scenarios.split(",")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", file=sys.stderr, flush=True)

    for task in args.tasks.split(","):
        td = load_task(task)
        requests = []
        gname = f"{task}-fed"
        if "client" in scen or "class" in scen:
            log(f"{task}: training the global model")
            ginfo, gres = F.fed_train(ws, base="minilm", task=task, name=gname, max_train=args.max_train,
                                      max_test=args.max_test, **common)
            log(f"{task}: global test accuracy {gres.metrics['test_accuracy']:.3f}")
            if "client" in scen:
                requests.append(("client", "client:0", ginfo, None))
            if "class" in scen:
                requests.append(("class", f"class:{CLASS_TO_FORGET.get(task, td.labels[-1])}", ginfo, None))
        if "sample" in scen:
            target = 0
            pdata, texts = poisoned(td, args.max_train, args.seed, args.poison, target)
            f = Path(tmp.name) / f"{task}-poison.txt"
            f.write_text("\n".join(texts) + "\n")
            log(f"{task}: training the backdoored global model ({len(texts)} poisoned rows -> {td.labels[target]})")
            pinfo, pres = F.fed_train(ws, base="minilm", task=task, name=f"{task}-fed-poisoned", max_train=None,
                                      max_test=args.max_test, data=pdata, **common)
            requests.append(("sample", f"samples:{f}", pinfo, pdata))
        attack = None
        for scenario, spec, ginfo, data in requests:
            log(f"{task}: {scenario} unlearning ({spec.split('/')[-1]}) with FUSED + retraining")
            v, res = U.unlearn(ws, ginfo.ref, forget=spec, name=f"{task}-forget-{scenario}", layers=args.k,
                               density=args.unlearn_density, rounds=args.unlearn_rounds, seed=args.seed, head=args.head,
                               compare_retrain=True, data=data, attack=attack, max_eval=args.max_test)
            attack = res.attack
            m = res.metrics
            _, gad, fed, cfg, rec = F.load_global(ws, ginfo.ref, data=data)
            log(f"{task}: {scenario}: negative task arithmetic")
            nta = U.negative_task_arithmetic(base_path, gad, fed, cfg, res.plan, attack=res.attack,
                                             rounds=args.unlearn_rounds, max_eval=args.max_test,
                                             layer_regex=rec["layer_regex"])
            row = {"task": task, "scenario": scenario, "spec": spec if scenario != "sample" else f"samples:({len(res.plan.forgotten_train())} rows)",
                   "critical_layers": res.critical, "adapter_bytes": v.size_bytes,
                   "global": m["global"],
                   "fused": {k: m[k] for k in ("ra", "fa", "mia", "seconds", "bytes_per_client")},
                   "retrain": m["retrain"], "nta": nta}
            results.append(row)
            # write what we have after every request, so an interrupted run still leaves figures
            write_markdown(Path(args.out), results, args, _cmd(argv), time.perf_counter() - t_all)
            plot(Path(args.png), results)
            log(f"{task}: {scenario}: FUSED RA {m['ra']:.3f} FA {m['fa']:.3f} | retrain RA {m['retrain']['ra']:.3f} "
                f"FA {m['retrain']['fa']:.3f} | NTA RA {nta['ra']:.3f} FA {nta['fa']:.3f}")
    total = time.perf_counter() - t_all
    ws.close()
    tmp.cleanup()

    write_markdown(Path(args.out), results, args, _cmd(argv), total)
    plot(Path(args.png), results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    for r in results:
        tr = r["retrain"]["seconds"] / max(r["fused"]["seconds"], 1e-9)
        cr = r["retrain"]["bytes_per_client"] / max(r["fused"]["bytes_per_client"], 1)
        print(f"{r['task']:12s} {r['scenario']:7s} retraining/FUSED: time x{tr:.1f}, bytes per client x{cr:.1f}; "
              f"FA FUSED {r['fused']['fa']:.3f} vs retrain {r['retrain']['fa']:.3f}; "
              f"RA FUSED {r['fused']['ra']:.3f} vs retrain {r['retrain']['ra']:.3f}")
    print(f"total {total:.0f} s; wrote {args.out} and {args.png}")
    return 0


def _cmd(argv: list[str] | None) -> str:
    return ("python benchmarks/unlearning.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def write_markdown(path: Path, results: list[dict], args, cmd: str, total: float) -> None:
    lines = ["# Unlearning benchmark (FUSED vs retraining vs negative task arithmetic)", "",
             f"Command: `{cmd}` (total {total:.0f} s, {args.threads} CPU threads, shared machine).", "",
             f"Setup: shipped MiniLM-L6, {args.clients} clients, Dirichlet alpha {args.alpha}, FedAvg {args.rounds} rounds x "
             f"{args.local_steps} local SGD-momentum steps (batch {args.batch_size}), {args.max_train} training rows, "
             f"max length {args.max_length}, trainable layers `{args.layers_regex}` at density {args.density}. "
             f"FUSED: K={args.k} critical layers, random mask density {args.unlearn_density}, {args.unlearn_rounds} rounds, "
             f"head {args.head} ({HEAD_TEXT[args.head]}). Retraining: the global recipe from scratch without the forgotten data. NTA: an adapter trained "
             f"on the forgotten data ({args.unlearn_rounds} rounds), subtracted from the global model.", "",
             "RA: accuracy on remaining data (test split; without the forgotten class for class unlearning). "
             "FA: accuracy on the forgotten data (client: its rows; class: its test rows; sample: the backdoored rows "
             "with their poisoned labels, i.e. backdoor success). MIA: share of forgotten training rows a shadow-model "
             "attack calls members. Bytes: what one client uploads over the whole run (fp32 values; masks come from a "
             "shared seed).", "",
             "| task | scenario | model | RA | FA | MIA | time (s) | bytes / client |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        g = r["global"]
        lines.append(f"| {r['task']} | {r['scenario']} | global (before) | {_f(g['ra'])} | {_f(g['fa'])} | {_f(g.get('mia'))} | - | - |")
        for key, label in (("fused", "**FUSED**"), ("retrain", "retraining"), ("nta", "neg. task arithmetic")):
            m = r[key]
            lines.append(f"| {r['task']} | {r['scenario']} | {label} | {_f(m['ra'])} | {_f(m['fa'])} | {_f(m.get('mia'))} | "
                         f"{m['seconds']:.1f} | {m['bytes_per_client']:,} |")
    lines += ["", "Ratios measured in this run (retraining / FUSED):", ""]
    for r in results:
        tr = r["retrain"]["seconds"] / max(r["fused"]["seconds"], 1e-9)
        cr = r["retrain"]["bytes_per_client"] / max(r["fused"]["bytes_per_client"], 1)
        lines.append(f"- {r['task']} {r['scenario']}: time x{tr:.1f}, bytes per client x{cr:.1f}; critical layers "
                     f"{', '.join(x.replace('encoder.layer.', 'L') for x in r['critical_layers'])}; "
                     f"unlearning adapter file {r['adapter_bytes']:,} bytes")
    lines += ["", "![unlearning](../img/unlearning.png)", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results}, key=[r["task"] for r in results].index)
    metrics = [("ra", "RA (higher is better)"), ("fa", "FA (close to retraining is better)"), ("mia", "MIA success")]
    methods = [("global", "global", "#999999"), ("fused", "FUSED", "#1f77b4"), ("retrain", "retraining", "#2ca02c"),
               ("nta", "neg. task arith.", "#d62728")]
    fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(4.2 * len(metrics), 3.2 * len(tasks)), squeeze=False)
    for i, t in enumerate(tasks):
        rows = [r for r in results if r["task"] == t]
        for j, (mk, title) in enumerate(metrics):
            ax = axes[i][j]
            w = 0.2
            for k, (key, label, color) in enumerate(methods):
                vals = [(r[key].get(mk) or 0.0) for r in rows]
                ax.bar([x + (k - 1.5) * w for x in range(len(rows))], vals, w, label=label, color=color)
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([r["scenario"] for r in rows])
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{t}: {title}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())

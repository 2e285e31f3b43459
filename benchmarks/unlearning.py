"""Benchmark: FUSED unlearning against honest controls, several seeds (client, class and backdoor-sample forgetting).

For each seed a global model is trained with FedAvg over Dirichlet-split clients (``fed train``:
it records each client's per-layer differences in its last round, so the critical-layer ranking
costs no extra round), then three requests are served by every variant below, all with the same
seed, FedAvg settings and stopping rule (the remaining data's validation loss, ``--patience``
rounds without improvement, best round kept, at most ``--unlearn-rounds`` rounds; retraining at
most ``--retrain-rounds``):

* ``fused`` — the default of ``adapterhub unlearn``: random sparse masks on the K critical layers
  of the recorded ranking, the task head ranked like any layer (sparse deltas on the global head
  when it is among the K), FedAvg on the remaining clients only;
* ``fused-random`` — the same with K random layers (ablation of the selection);
* ``fused-head-reset`` — FUSED's layers plus a re-initialised dense head (what earlier releases
  shipped: the ``--head reset`` baseline);
* ``head-finetune`` — only the global head, fine-tuned densely on the remaining data;
* ``head-reset`` — only the head, re-initialised and trained on the remaining data;
* ``retrain`` — the anchor: the global recipe from scratch on the remaining data, to convergence.

Scenarios: ``client`` (forget client 0), ``class`` (forget the class with the most test rows, so FA
is measured on >= 100 rows where the data has them), ``sample`` (backdoor: ``--poison`` training
rows get a trigger and the target label; a global model is trained on the poisoned data, and
``samples:`` forgets exactly those rows).

Metrics: RA (accuracy on the remaining test data), FA (accuracy on the forgotten data: the client's
rows; the class's test rows; the backdoored training rows with their poisoned labels = backdoor
success), MIA AUC and TPR at 1% FPR of a loss-threshold attack (members: the forgotten training
rows; non-members: held-out rows of the same distribution — label-matched test rows, the class's
test rows, backdoored test rows), rounds, wall time, bytes down+up per client, local SGD steps.
Data: ``text`` (TREC on the shipped MiniLM) and ``image`` (scikit-learn's digits on the project's
own small CNN base, trained from its seeded initialisation as FUSED's CNN experiments are).

Writes docs/bench/unlearning.md (mean ± std over seeds, one table per data type and scenario) and
the raw rows as JSON (``--json``); prints FUSED/control ratios measured in the same run.

Usage: python benchmarks/unlearning.py [--data text,image] [--seeds 0,1,2] [--scenarios client,class,sample]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

TRIGGER_TEXT = "cf mn bb"
VARIANTS = ("fused", "fused-random", "fused-head-reset", "head-finetune", "head-reset", "retrain")
VARIANT_TEXT = {
    "global": "the global model before unlearning",
    "fused": "FUSED (default): sparse adapter on the K critical layers, head ranked like any layer",
    "fused-random": "FUSED on K random layers (selection ablation)",
    "fused-head-reset": "FUSED layers + re-initialised dense head (the old default, `--head reset`)",
    "head-finetune": "control: only the global head, fine-tuned",
    "head-reset": "control: only the head, re-initialised and retrained",
    "retrain": "anchor: retrain from scratch on the remaining data, to convergence",
}
#: per data type: task, base source, trainable-layer regex of the global model, and the default settings
DATA = {
    "text": {"task": "trec-coarse", "source": "minilm", "layers": r"\.layer\.[3-5]\.", "max_train": 800,
             "local_steps": 5, "lr": 0.02, "head_lr": 0.1, "max_length": 24},
    "image": {"task": "digits", "source": "digits-cnn", "layers": r".", "max_train": None,
              "local_steps": 10, "lr": 0.05, "head_lr": 0.1, "max_length": 8},
}


def poisoned(td: Any, max_train: int | None, seed: int, n_poison: int, target: int, trigger: Any
             ) -> tuple[Any, list[str], list[tuple[str, int]]]:
    """A copy of the task (train subsampled as the federation will) with ``n_poison`` rows triggered
    and relabelled to ``target``; also the backdoored test rows (held out: the attack's non-members)."""
    from adapterhub.data import TaskData
    from adapterhub.fused.federated import _subsample

    train = list(_subsample(list(td.train), max_train, seed))
    r = random.Random(seed + 99)
    cands = [i for i, (_, lab) in enumerate(train) if lab != target]
    picks = sorted(r.sample(cands, min(n_poison, len(cands))))
    for i in picks:
        train[i] = (trigger(train[i][0]), target)
    held = [(trigger(t), target) for t, lab in td.test if lab != target]
    return (TaskData(td.name, list(td.labels), train, list(td.validation), list(td.test), td.source, "poisoned copy"),
            [train[i][0] for i in picks], held)


def trigger_for(kind: str) -> Any:
    if kind == "image":
        from adapterhub.bases.cnn import add_trigger

        return add_trigger
    return lambda text: f"{TRIGGER_TEXT} {text}"


def run_variant(variant: str, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one variant on one request; returns its metrics and costs."""
    from adapterhub.fused import federated as F, unlearning as U

    plan, fed, cfg, gad, ranking, nonmembers = (ctx[k] for k in ("plan", "fed", "cfg", "gad", "ranking", "nonmembers"))
    if variant == "retrain":
        return U.retrain(ctx["base_path"], fed, cfg, plan, density=args.density, rounds=args.retrain_rounds,
                         patience=args.patience, layer_regex=ctx["layer_regex"], max_eval=args.max_eval,
                         nonmembers=nonmembers)
    head, selection, k = {"fused": ("ranked", "critical", args.k), "fused-random": ("ranked", "random", args.k),
                          "fused-head-reset": ("reset", "critical", args.k), "head-finetune": ("train", "critical", 0),
                          "head-reset": ("reset", "critical", 0)}[variant]
    model = F.FedModel(ctx["base_path"], len(fed.labels), max_length=cfg.max_length, seed=cfg.seed,
                       layer_regex=ctx["layer_regex"])
    model.apply_adapter(gad, head_task=fed.task)
    layers = (U.select_layers(ranking, k, head=head, selection=selection, seed=ctx["seed"],
                              salt=U.selection_salt(plan))
              if k else [])
    ucfg = F.FedConfig(**{**cfg.to_json(), "rounds": args.unlearn_rounds, "seed": ctx["seed"]})
    stop = U.stop_rule(model, plan, args.patience, args.max_eval)
    t0 = time.perf_counter()
    state, stats = U.train_unlearning(model, plan, ucfg, layers, density=args.unlearn_density, seed=ctx["seed"],
                                      head=head, stop=stop)
    seconds = time.perf_counter() - t0
    out = U.evaluate(model, state, plan, max_eval=args.max_eval, nonmembers=nonmembers)
    out.update(U.cost_of(stats, seconds))
    out["layers"] = layers
    if variant == "fused":
        ctx["global"] = U.evaluate(model, {}, plan, max_eval=args.max_eval, nonmembers=nonmembers)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", default="image,text", help="text (TREC on MiniLM), image (digits on the CNN base)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scenarios", default="client,class,sample")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=8, help="FedAvg rounds of the global model")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--density", type=float, default=1.0, help="global model density (1 = full weights)")
    ap.add_argument("--k", type=int, default=3, help="critical layers")
    ap.add_argument("--unlearn-density", type=float, default=0.1)
    ap.add_argument("--unlearn-rounds", type=int, default=10, help="most rounds of an unlearning variant")
    ap.add_argument("--retrain-rounds", type=int, default=20, help="most rounds of retraining")
    ap.add_argument("--patience", type=int, default=2, help="stopping rule shared by every variant")
    ap.add_argument("--poison", type=int, default=100, help="backdoored training rows (sample unlearning)")
    ap.add_argument("--max-eval", type=int, default=None, help="cap rows per metric (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs/bench/unlearning.md"))
    ap.add_argument("--json", default=str(ROOT / "docs/bench/unlearning.json"), help="raw rows (JSON)")
    ap.add_argument("--from-json", nargs="*", default=None,
                    help="only aggregate the rows of earlier runs' JSON files (e.g. one process per seed)")
    args = ap.parse_args(argv)
    cmd = ("python benchmarks/unlearning.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.from_json is not None:
        rows: list[dict[str, Any]] = []
        for f in args.from_json:
            rows += json.loads(Path(f).read_text())["rows"]
        write_markdown(Path(args.out), rows, cmd, None)
        Path(args.json).write_text(json.dumps({"command": cmd, "rows": rows}, indent=1, default=str))
        print_ratios(rows)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adapterhub.data import load_task
    from adapterhub.fused import federated as F, unlearning as U
    from adapterhub.workspace import Workspace

    t_all = time.perf_counter()
    rows = []
    variants = [v for v in args.variants.split(",") if v]
    scen = args.scenarios.split(",")
    tmp = tempfile.TemporaryDirectory(prefix="ah-unl-bench-")
    ws = Workspace.open(Path(tmp.name) / "home")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", file=sys.stderr, flush=True)

    for kind in args.data.split(","):
        spec = DATA[kind]
        ws.add_base(kind, spec["source"])
        base_path = ws.get_base(kind).path
        td = load_task(spec["task"])
        counts = {i: sum(1 for _, lab in td.test if lab == i) for i in range(len(td.labels))}
        forget_class = td.labels[max(counts, key=lambda i: (counts[i], -i))]
        for seed in [int(s) for s in args.seeds.split(",")]:
            common = dict(clients=args.clients, alpha=args.alpha, rounds=args.rounds, local_steps=spec["local_steps"],
                          seed=seed, layer_regex=spec["layers"], batch_size=args.batch_size, lr=spec["lr"],
                          head_lr=spec["head_lr"], max_length=spec["max_length"], density=args.density)
            requests = []
            if "client" in scen or "class" in scen:
                log(f"{kind} seed {seed}: training the global model")
                ginfo, gres = F.fed_train(ws, base=kind, task=spec["task"], name=f"{kind}-fed-{seed}",
                                          max_train=spec["max_train"], **common)
                log(f"{kind} seed {seed}: global test accuracy {gres.metrics['test_accuracy']:.3f}")
                if "client" in scen:
                    requests.append(("client", "client:0", ginfo, None, None))
                if "class" in scen:
                    requests.append(("class", f"class:{forget_class}", ginfo, None, None))
            if "sample" in scen:
                pdata, texts, held = poisoned(td, spec["max_train"], seed, args.poison, 0, trigger_for(kind))
                f = Path(tmp.name) / f"{kind}-{seed}-poison.txt"
                f.write_text("\n".join(texts) + "\n")
                log(f"{kind} seed {seed}: training the backdoored global model ({len(texts)} rows -> {td.labels[0]})")
                pinfo, _ = F.fed_train(ws, base=kind, task=spec["task"], name=f"{kind}-fed-poisoned-{seed}",
                                       max_train=None, data=pdata, **common)
                requests.append(("sample", f"samples:{f}", pinfo, pdata, held))
            for scenario, fspec, ginfo, data, held in requests:
                _, gad, fed, cfg, rec = F.load_global(ws, ginfo.ref, data=data)
                plan = U.check_request(fed, U.parse_forget(fspec), args.k, args.unlearn_density, args.unlearn_rounds)
                ranking, source = U.recorded_ranking(ginfo.training_config or {}, plan, rerank=False)
                ctx = {"plan": plan, "fed": fed, "cfg": cfg, "gad": gad, "ranking": ranking, "nonmembers": held,
                       "base_path": base_path, "layer_regex": rec["layer_regex"], "seed": seed}
                base_row = {"data": kind, "task": spec["task"], "scenario": scenario, "seed": seed,
                            "spec": fspec if scenario != "sample" else f"samples:({len(plan.forgotten_train())} rows)",
                            "ranking_top": [r["layer"] for r in ranking[:args.k + 2]],
                            "head_rank": next((r["rank"] for r in ranking if r["layer"] == "head"), None)}
                for variant in variants:
                    log(f"{kind} seed {seed} {scenario}: {variant}")
                    m = run_variant(variant, ctx, args)
                    rows.append({**base_row, "variant": variant, **m})
                    log(f"  RA {m['ra']:.3f} FA {m['fa']:.3f} AUC {m.get('mia_auc', float('nan')):.3f} "
                        f"rounds {m['rounds']} {m['seconds']:.1f}s {m['bytes_per_client']:,} B")
                if "global" in ctx:
                    rows.append({**base_row, "variant": "global", **ctx["global"]})
                Path(args.json).write_text(json.dumps({"command": cmd, "rows": rows}, indent=1, default=str))
                write_markdown(Path(args.out), rows, cmd, time.perf_counter() - t_all)
    total = time.perf_counter() - t_all
    ws.close()
    tmp.cleanup()
    Path(args.json).write_text(json.dumps({"command": cmd, "rows": rows, "seconds": total}, indent=1, default=str))
    write_markdown(Path(args.out), rows, cmd, total)
    print_ratios(rows)
    print(f"total {total:.0f} s; wrote {args.out} and {args.json}")
    return 0


# ---------------------------------------------------------------------------- aggregation

METRICS = (("ra", "RA"), ("fa", "FA"), ("mia_auc", "MIA AUC"), ("mia_tpr_at_1pct_fpr", "TPR@1%FPR"),
           ("rounds", "rounds"), ("seconds", "time (s)"), ("bytes_per_client", "bytes/client"),
           ("local_steps", "local steps"))


def _ms(vals: list[float], fmt: str) -> str:
    if not vals:
        return "-"
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:{fmt}} ± {s:{fmt}}"


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    out: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    for r in rows:
        key = (r["data"], r["scenario"], r["variant"])
        d = out.setdefault(key, {})
        for k, _ in METRICS:
            if r.get(k) is not None:
                d.setdefault(k, []).append(float(r[k]))
        d.setdefault("seeds", []).append(r["seed"])
    return out


def write_markdown(path: Path, rows: list[dict[str, Any]], cmd: str, total: float | None) -> None:
    agg = aggregate(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# Unlearning benchmark: FUSED against controls", "",
             f"Command: `{cmd}`" + (f" (total {total:.0f} s on this 2-core machine, shared)." if total else "."), "",
             f"Seeds: {', '.join(map(str, seeds))}; every cell is mean ± std over them. Every variant uses the same "
             "seed, FedAvg settings and stopping rule (validation loss on the remaining data, best round kept). "
             "RA: accuracy on remaining test data. FA: accuracy on the forgotten data (client: its rows; class: the "
             "class's test rows; sample: the backdoored training rows with their poisoned labels). MIA: loss-threshold "
             "attack, members = forgotten training rows, non-members = held-out rows of the same distribution; AUC 0.5 "
             "= no membership signal. Bytes: what one client receives and sends over the run (fp32 values; masks come "
             "from a shared seed; the ranking numbers are counted in the global model's last round). Local steps: SGD "
             "steps over all clients (the compute).", ""]
    for (data, scenario) in sorted({(k[0], k[1]) for k in agg}, key=lambda x: (x[0], ["client", "class", "sample"].index(x[1]))):
        sample = next(r for r in rows if r["data"] == data and r["scenario"] == scenario)
        lines += [f"## {data}: {sample['task']}, {scenario} unlearning ({sample['spec']})", "",
                  f"Head rank in the recorded ranking (per seed): "
                  f"{', '.join(str(r.get('head_rank')) for r in rows if r['data'] == data and r['scenario'] == scenario and r['variant'] == 'fused')}; "
                  f"top layers (first seed): {', '.join(sample['ranking_top'])}", "",
                  "| variant | " + " | ".join(label for _, label in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for variant in ("global",) + VARIANTS:
            d = agg.get((data, scenario, variant))
            if not d:
                continue
            cells = []
            for k, _ in METRICS:
                fmt = ".3f" if k in ("ra", "fa", "mia_auc", "mia_tpr_at_1pct_fpr") else ",.0f" if k in ("bytes_per_client", "local_steps") else ".1f"
                cells.append(_ms(d.get(k, []), fmt))
            lines.append(f"| {VARIANT_TEXT.get(variant, variant)} | " + " | ".join(cells) + " |")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def print_ratios(rows: list[dict[str, Any]]) -> None:
    agg = aggregate(rows)
    for (data, scenario, variant), d in sorted(agg.items()):
        if variant != "fused":
            continue
        r = agg.get((data, scenario, "retrain"))
        h = agg.get((data, scenario, "head-reset"))
        parts = [f"{data} {scenario}: FUSED FA {statistics.fmean(d['fa']):.3f}"]
        if r:
            parts.append(f"retrain FA {statistics.fmean(r['fa']):.3f}; retrain/FUSED time "
                         f"x{statistics.fmean(r['seconds']) / max(statistics.fmean(d['seconds']), 1e-9):.1f}, bytes "
                         f"x{statistics.fmean(r['bytes_per_client']) / max(statistics.fmean(d['bytes_per_client']), 1):.1f}")
        if h:
            parts.append(f"head-reset FA {statistics.fmean(h['fa']):.3f}")
        print("; ".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())

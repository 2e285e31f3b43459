"""Single-task test accuracy with MiniLM: sparse adapters (connection-sensitivity, random, magnitude)
vs PEFT LoRA (r=16) vs full fine-tuning, same steps, batch, schedule and a learning-rate sweep.

For every task and variant each learning rate of the variant's sweep is trained; the one with the
best validation accuracy is kept and its test accuracy reported (test rows capped by
--eval-rows). The sparse density defaults to LoRA r=16's trainable-parameter count on the same
q/k/v targets (8.3% for MiniLM).

    .venv/bin/python benchmarks/train_accuracy.py                       # small defaults, CPU
    .venv/bin/python benchmarks/train_accuracy.py --steps 300 --sparse-lrs 1e-3,3e-3 --lora-lrs 1e-3,3e-3

Writes docs/bench/training_accuracy.json and docs/img/train_accuracy.png (unless --no-write).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("connection-sensitivity", "random", "magnitude", "lora", "full")


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="rt-sentiment,sms-spam,trec-coarse,tweet-sentiment")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--select-steps", type=int, default=15)
    ap.add_argument("--reselect-every", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--density", type=float, default=None, help="default: LoRA r=16 parameter count (0.0833)")
    ap.add_argument("--sparse-lrs", default="2e-3")
    ap.add_argument("--lora-lrs", default="2e-3")
    ap.add_argument("--full-lrs", default="5e-5")
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    from adapterhub.bases.sources import minilm_path
    from adapterhub.data import load_task
    from adapterhub.errors import TrainingError
    from adapterhub.training import TrainConfig, predict, train_adapter, train_baseline

    torch.set_num_threads(args.threads)
    path = minilm_path()
    density = args.density or (2 * 384 * 16) / (384 * 384)
    lrs = {"lora": _floats(args.lora_lrs), "full": _floats(args.full_lrs)}
    results: dict[str, dict[str, dict]] = {}
    t_all = time.perf_counter()
    for task in args.tasks.split(","):
        data = load_task(task)
        val = data.validation[: args.eval_rows]
        test = data.test[: args.eval_rows]
        results[task] = {}
        for variant in args.variants.split(","):
            best = None
            sweep = []
            for lr in lrs.get(variant, _floats(args.sparse_lrs)):
                cfg = TrainConfig(steps=args.steps, select_steps=args.select_steps, reselect_every=args.reselect_every,
                                  batch_size=args.batch_size, max_length=args.max_length, lr=lr, seed=args.seed,
                                  density=density, mask=variant if variant not in ("lora", "full") else "random",
                                  max_eval_examples=args.eval_rows, device=args.device)
                t0 = time.perf_counter()
                try:
                    if variant in ("lora", "full"):
                        r = train_baseline(path, data.__class__(data.name, data.labels, data.train, val, test), cfg,
                                           method=variant)
                    else:
                        r = train_adapter(path, data, cfg, task_name=task)
                except TrainingError as e:  # a diverged rate (NaN loss) is a result of the sweep, not a crash
                    print(f"{task:16s} {variant:22s} lr {lr:g}: diverged ({e})", flush=True)
                    sweep.append({"lr": lr, "validation_accuracy": None, "test_accuracy": None, "diverged": True})
                    continue
                model, batcher, metrics = r.model, r.batcher, r.metrics
                acc, loss, n = predict(model, batcher, test, 64)
                row = {"lr": lr, "validation_accuracy": metrics["validation_accuracy"], "test_accuracy": acc,
                       "test_loss": loss, "test_n": n, "trainable": metrics["trainable_values"],
                       "seconds": round(time.perf_counter() - t0, 1)}
                print(f"{task:16s} {variant:22s} lr {lr:g}: val {row['validation_accuracy']:.3f} "
                      f"test {acc:.3f} ({row['seconds']:.0f} s)", flush=True)
                sweep.append({"lr": lr, "validation_accuracy": row["validation_accuracy"], "test_accuracy": acc})
                if best is None or row["validation_accuracy"] > best["validation_accuracy"]:
                    best = row
            results[task][variant] = dict(best, sweep=sweep)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    _table(results)
    if not args.no_write:
        out = ROOT / "docs" / "bench" / "training_accuracy.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(["benchmarks/train_accuracy.py"] + sys.argv[1:]),
                                   "device": args.device, "total_seconds": round(time.perf_counter() - t_all, 1),
                                   "density": density, "results": results}, indent=2, sort_keys=True) + "\n")
        _plot(results, ROOT / "docs" / "img" / "train_accuracy.png")


def _table(results: dict) -> None:
    variants = list(next(iter(results.values())))
    print("| task | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for task, row in results.items():
        print(f"| {task} | " + " | ".join(f"{row[v]['test_accuracy']:.3f}" for v in variants) + " |")


def _plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    variants = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ax.bar([j + i * width for j in range(len(tasks))], [results[t][v]["test_accuracy"] for t in tasks], width,
               label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=5, loc="lower center")
    ax.set_title("MiniLM single-task accuracy (same steps, best lr of the sweep by validation)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()

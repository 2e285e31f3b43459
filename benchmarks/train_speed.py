"""Training step time and peak memory: sparse adapter (values phase) vs PEFT LoRA vs full fine-tuning.

All three run the same model, batch, sequence length, loss and AdamW in one invocation; each
variant runs in a fresh subprocess so memory figures do not leak into each other. The sparse
adapter's density is matched to LoRA's trainable-parameter count on the same target modules.

Step time: the three variants run round-robin in one process (one step each, repeated), so a
busy machine slows them alike; the median is reported. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on CPU the peak
resident set size sampled every millisecond during the timed steps, minus the RSS just before
them (so it counts activations, gradients and optimizer state, not the model itself).

    .venv/bin/python benchmarks/train_speed.py                 # MiniLM, CPU, small defaults
    .venv/bin/python benchmarks/train_speed.py --model smollm2 # SmolLM2-135M (causal LM)
    .venv/bin/python benchmarks/train_speed.py --device cuda --dtype bf16 --model smollm2

Writes docs/bench/training_speed.json and docs/img/train_speed.png (unless --no-write).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("sparse", "lora", "full")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = _rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *a) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def model_path(name: str) -> Path:
    from adapterhub.bases.smollm import materialize_smollm2
    from adapterhub.bases.sources import minilm_path

    if name == "minilm":
        return minilm_path()
    if name == "smollm2":
        return materialize_smollm2(Path(os.environ.get("ADAPTERHUB_BENCH_CACHE", ROOT / ".bench-cache")) / "smollm2")
    return Path(name)


def setup(variant: str, args: argparse.Namespace):
    """Build one variant with the library's trainer (``adapterhub.training.loop.TRAINERS``).

    Returns (step function, trainable count, LoRA count, density, device, tokens); the step is the
    library's one optimizer step (:meth:`Trainer.step`) on a fixed batch.
    """
    import torch

    from adapterhub.data import load_task
    from adapterhub.training import (
        TRAINERS,
        Batcher,
        TrainConfig,
        load_tokenizer,
        model_kind,
    )

    path = model_path(args.model)
    kind = model_kind(path)
    data = load_task(args.task)
    cfg = TrainConfig(mask="random", select_steps=0, reselect_every=0, lr=1e-4, batch_size=args.batch_size,
                      max_length=args.max_length, device=args.device, dtype=args.dtype, seed=0, steps=10**6)
    # LoRA's trainable count on the same targets sets the sparse density
    lora_sdm = TRAINERS["lora"].build_model(path, cfg, n_labels=len(data.labels), lora_r=args.rank)
    lora_count = sum(p.numel() for p in lora_sdm.backbone.parameters() if p.requires_grad)
    density = None
    if variant == "lora":
        sdm = lora_sdm
    else:
        del lora_sdm
        sdm = TRAINERS[variant].build_model(path, cfg, n_labels=len(data.labels))
        if variant == "sparse":  # the mask is drawn in prepare(), after the density is known
            density = lora_count / sum(w.numel() for w in sdm.weights.values())
            cfg = replace(cfg, density=density)
    batcher = Batcher(load_tokenizer(path), kind, data.labels, args.max_length)
    trainer = TRAINERS[variant](sdm, data, batcher, cfg)
    trainer.prepare()  # sparse: the random mask is selected, training is values-only from the first step
    dev = sdm.device
    rows = data.train[: args.batch_size]
    if kind == "encoder":
        batch = batcher.encoder_batch(rows, dev)
        enc = batcher.tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=args.max_length,
                          return_tensors="pt")
        batch.update({k: v.to(dev) for k, v in enc.items() if k in batch})
    else:
        long_rows = [((t + " ") * 40, lab) for t, lab in rows]  # fill the sequence length
        batch = batcher.causal_batch(long_rows, dev)
    sdm.backbone.train()

    def step() -> float:
        loss = trainer.step(batch, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, trainer.trainable_count(), int(lora_count), density, dev, int(batch["input_ids"].numel())


def run_one(args: argparse.Namespace) -> dict:
    """Peak memory (and step time) of one variant, alone in this process."""
    import torch

    torch.set_num_threads(args.threads)
    step, trainable, lora_count, density, dev, tokens = setup(args.variant, args)
    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    times = []
    with _PeakRSS() as rss:
        for _ in range(args.mem_steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
        peak_total = torch.cuda.max_memory_allocated()
    else:
        peak = rss.peak - rss.base
        peak_total = rss.peak
    return {"variant": args.variant, "model": args.model, "device": str(dev), "dtype": args.dtype,
            "batch_size": args.batch_size, "max_length": args.max_length, "tokens": tokens,
            "trainable": trainable, "lora_trainable": lora_count, "density": density,
            "alone_step_ms_median": 1000 * statistics.median(times), "peak_bytes": int(peak),
            "peak_total_bytes": int(peak_total), "final_loss": loss, "threads": args.threads}


def run_interleaved(args: argparse.Namespace) -> dict:
    """Step times of all variants in one process, round-robin, so machine load hits them alike."""
    import torch

    torch.set_num_threads(args.threads)
    steps = {v: setup(v, args)[0] for v in VARIANTS}
    for _ in range(args.warmup):
        for v in VARIANTS:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for v in VARIANTS:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    return {v: {"step_ms_median": 1000 * statistics.median(t), "step_ms_min": 1000 * min(t),
                "step_ms_mean": 1000 * statistics.mean(t)} for v, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="minilm | smollm2 | a local HF folder")
    ap.add_argument("--task", default="rt-sentiment")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (r)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-steps", type=int, default=3, help="steps per variant for the memory measurement")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "training_speed.json"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_one(args)))
        return
    if args.interleaved:
        print(json.dumps(run_interleaved(args)))
        return
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    passthrough = [a for a in sys.argv[1:] if a != "--no-write"]

    def sub(extra: list[str]) -> dict:
        p = subprocess.run([sys.executable, __file__, *extra, *passthrough], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-4000:])
            raise SystemExit(f"{extra} failed")
        return json.loads(p.stdout.strip().splitlines()[-1])

    for v in VARIANTS:
        results[v] = sub(["--variant", v])
    timing = sub(["--interleaved"])
    for v in VARIANTS:
        results[v].update(timing[v])
        r = results[v]
        print(f"{v:7s} trainable {r['trainable']:>11,d}  step {r['step_ms_median']:8.1f} ms (interleaved median)  "
              f"peak +{r['peak_bytes'] / 2**20:8.1f} MiB  loss {r['final_loss']:.4f}", flush=True)
    s, lo, fu = results["sparse"], results["lora"], results["full"]
    ratios = {"sparse_vs_lora_step": s["step_ms_median"] / lo["step_ms_median"],
              "sparse_vs_lora_peak": s["peak_bytes"] / max(1, lo["peak_bytes"]),
              "full_vs_lora_step": fu["step_ms_median"] / lo["step_ms_median"],
              "full_vs_lora_peak": fu["peak_bytes"] / max(1, lo["peak_bytes"])}
    print(f"sparse/LoRA step time {ratios['sparse_vs_lora_step']:.2f}x (target <= 1.2x), "
          f"peak memory {ratios['sparse_vs_lora_peak']:.2f}x (target <= 1.3x); "
          f"full/LoRA step {ratios['full_vs_lora_step']:.2f}x, memory {ratios['full_vs_lora_peak']:.2f}x")
    if not args.no_write:
        out = Path(args.out)
        doc = {}
        if out.is_file():
            doc = json.loads(out.read_text())
        key = f"{args.model}-{results['sparse']['device']}-{args.dtype}"
        doc[key] = {"results": results, "ratios": ratios, "command": " ".join(["benchmarks/train_speed.py"] + sys.argv[1:])}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        _plot(doc, ROOT / "docs" / "img" / "train_speed.png")


def _plot(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(doc)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        xs = [j + i * width for j in range(len(keys))]
        axes[0].bar(xs, [doc[k]["results"][v]["step_ms_median"] for k in keys], width, label=v)
        axes[1].bar(xs, [doc[k]["results"][v]["peak_bytes"] / 2**20 for k in keys], width, label=v)
    for ax, title in zip(axes, ("step time (ms, median)", "peak training memory (MiB)"), strict=True):
        ax.set_xticks([j + width for j in range(len(keys))])
        ax.set_xticklabels(keys, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()

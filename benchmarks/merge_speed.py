"""Merging 20 sparse experts: adapterhub (sparse space) vs peft.utils.merge_utils (dense task vectors).

Shapes are SmolLM2-135M's decoder linears (q,k,v,o,gate,up,down per layer), synthesised with random
masks and values — nothing is downloaded. For each density (1%, 10%) and method (task-arithmetic,
ties), each implementation runs in a fresh subprocess that first builds the 20 experts (seeded, not
timed), then merges parameter by parameter while a thread samples the process RSS every 2 ms:

* adapterhub: ``merge_adapters`` on the union of indices (never a dense tensor of values);
* PEFT: per parameter, densify the 20 experts and call ``task_arithmetic`` / ``ties`` — what a
  dense-merging tool does one tensor at a time (the most memory-friendly way to use it).

TIES trims each expert to half its entries in both (ours ``density=0.5`` of the stored entries;
PEFT ``density = 0.5 * expert density`` of the whole tensor, the same top entries).

Usage:  .venv/bin/python benchmarks/merge_speed.py [--layers 3] [--experts 20] [--densities 0.01,0.1] [--threads 1]
(``--layers 30`` is the whole SmolLM2-135M; time grows linearly with layers.)
Writes docs/img/merge_speed.png and prints a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

HIDDEN, KV, INTER = 576, 192, 1536
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTER)}


def shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{n}.weight": s for i in range(layers) for n, s in LINEARS.items()}


def make_experts(layers: int, n: int, density: float):
    from adapterhub.format import SparseAdapter, SparseParam

    out = []
    for e in range(n):
        g = torch.Generator().manual_seed(1000 + e)
        params = {}
        for name, s in shapes(layers).items():
            numel = s[0] * s[1]
            k = int(density * numel)
            idx = torch.randperm(numel, generator=g)[:k].sort().values
            params[name] = SparseParam(s, idx, torch.randn(k, generator=g) * 0.01)
        out.append(SparseAdapter(params, {}, {"base": {"fingerprint": "bench"}}))
    return out


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    def __init__(self) -> None:
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def worker(impl: str, method: str, layers: int, n: int, density: float, threads: int) -> dict:
    # One thread by default: on a shared, overloaded machine OpenMP wake-ups dominate small ops and
    # make every figure noise; both implementations get the same setting.
    torch.set_num_threads(threads)
    experts = make_experts(layers, n, density)
    expert_bytes = sum(p.indices.numel() * 8 + p.values.numel() * 4 for a in experts for p in a.params.values())
    gc.collect()
    if impl == "adapterhub":
        from adapterhub.merging import InMemoryExpert, merge_adapters

        srcs = [InMemoryExpert(a, key=f"{i:04d}") for i, a in enumerate(experts)]
        kw = {"density": 0.5} if method == "ties" else {}
        with PeakRSS() as m:
            t0 = time.perf_counter()
            res = merge_adapters(srcs, method, **kw)
            dt = time.perf_counter() - t0
        out_nnz = res.adapter.nnz
    else:
        from peft.utils import merge_utils as mu

        w = torch.ones(n)
        out_nnz = 0
        with PeakRSS() as m:
            t0 = time.perf_counter()
            for name in sorted(experts[0].params):
                dense = [a.params[name].to_dense(torch.float32) for a in experts]
                if method == "ties":
                    merged = mu.ties(dense, w, density=0.5 * density)
                else:
                    merged = mu.task_arithmetic(dense, w)
                out_nnz += int((merged != 0).sum())
                del dense, merged
            dt = time.perf_counter() - t0
    return {"impl": impl, "method": method, "density": density, "layers": layers, "experts": n, "seconds": dt, "threads": threads,
            "transient_bytes": m.peak - m.base, "expert_bytes": expert_bytes, "out_nnz": out_nnz,
            "peak_over_experts": (expert_bytes + (m.peak - m.base)) / expert_bytes}


def run_one(impl: str, method: str, layers: int, n: int, density: float, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, method, str(layers), str(n), str(density), str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = sorted({(r["method"], r["density"]) for r in rows})
    xs = range(len(labels))
    for k, impl in enumerate(["adapterhub", "peft"]):
        t = [next(r["seconds"] for r in rows if r["impl"] == impl and (r["method"], r["density"]) == lab) for lab in labels]
        mem = [next(r["transient_bytes"] / 2**20 for r in rows if r["impl"] == impl and (r["method"], r["density"]) == lab)
               for lab in labels]
        axes[0].bar([x + k * 0.4 for x in xs], t, width=0.4, label=impl)
        axes[1].bar([x + k * 0.4 for x in xs], mem, width=0.4, label=impl)
    for ax, title in zip(axes, ["merge time (s)", "transient memory (MiB)"], strict=True):
        ax.set_xticks([x + 0.2 for x in xs])
        ax.set_xticklabels([f"{m}\n{d:.0%}" for m, d in labels], fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, impl, method, layers, n, density, threads = sys.argv
        print(json.dumps(worker(impl, method, int(layers), int(n), float(density), int(threads))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--densities", default="0.01,0.1")
    ap.add_argument("--methods", default="task-arithmetic,ties")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for d in [float(x) for x in args.densities.split(",")]:
        for method in args.methods.split(","):
            for impl in ("adapterhub", "peft"):
                r = run_one(impl, method, args.layers, args.experts, d, args.threads)
                rows.append(r)
                print(f"{impl:10s} {method:15s} {d:5.0%}: {r['seconds']:.2f} s, transient "
                      f"{r['transient_bytes'] / 2**20:.0f} MiB, experts {r['expert_bytes'] / 2**20:.0f} MiB",
                      file=sys.stderr)
    plot(rows, ROOT / "docs" / "img" / "merge_speed.png")
    print("| method | density | adapterhub s | PEFT dense s | speedup | adapterhub transient MiB | PEFT transient MiB |"
          " experts MiB | adapterhub peak / experts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sorted({r["density"] for r in rows}):
        for method in args.methods.split(","):
            a = next(r for r in rows if r["impl"] == "adapterhub" and r["method"] == method and r["density"] == d)
            p = next(r for r in rows if r["impl"] == "peft" and r["method"] == method and r["density"] == d)
            print(f"| {method} | {d:.0%} | {a['seconds']:.2f} | {p['seconds']:.2f} | {p['seconds'] / a['seconds']:.1f}x | "
                  f"{a['transient_bytes'] / 2**20:.0f} | {p['transient_bytes'] / 2**20:.0f} | {a['expert_bytes'] / 2**20:.0f} | "
                  f"{a['peak_over_experts']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Apply + revert of a sparse adapter: adapterhub vs PEFT SHiRA and LoRA, in memory and on disk.

Shapes are SmolLM2-135M's decoder linears (30 layers x q,k,v,o,gate,up,down), synthesised with
random tensors — nothing is downloaded. Measured in one run:

1. In memory, fp32 base, equal trainable parameters: adapterhub apply+revert (``index_select`` +
   ``index_copy_``) vs PEFT SHiRA ``merge``/``unmerge`` (same random mask and values: we read
   SHiRA's indices) vs PEFT LoRA ``merge_adapter``/``unmerge_adapter`` with the same r.
2. Exactness: max |W - W0| after 1 and 50 apply/revert cycles (PEFT SHiRA fp32, LoRA fp32 and
   bf16 base; adapterhub on both).
3. On disk: patch a safetensors file in place (WAL written + fsynced, then patch + fsync, then the
   same for revert) vs rewriting the whole file (load, add, save) — and patch time vs density.

Usage:  .venv/bin/python benchmarks/apply_revert.py [--layers 30] [--cycles 50] [--exact-layers 2] [--threads 1] [--big]
``--big`` adds the on-disk run on a synthetic ~1B-parameter bf16 file (2 GB of disk, a few minutes).
Writes docs/img/apply_revert_density.png and prints a markdown table.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from adapterhub.apply.disk import DiskTransaction, SafetensorsFile
from adapterhub.apply.patching import apply_adapter, revert
from adapterhub.format import SparseAdapter, SparseParam
from benchutil import first_apply_seconds, median_seconds  # benchmarks/ is the script's folder, so on sys.path

ROOT = Path(__file__).resolve().parent.parent
Weights = dict[str, torch.Tensor]
Errors = tuple[float, float]

HIDDEN, KV, INTER = 576, 192, 1536
LINEARS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
           "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for n, (o, i) in LINEARS.items():
            setattr(self, n, torch.nn.Linear(i, o, bias=False, device="meta"))


class Toy(torch.nn.Module):
    """A module with SmolLM2-135M's decoder linear shapes (random weights)."""

    def __init__(self, layers: int, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block() for _ in range(layers)])
        self.to_empty(device="cpu")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        self.to(dtype)


def shira_model(base: Toy, r: int):
    from peft import ShiraConfig, get_peft_model

    cfg = ShiraConfig(r=r, target_modules=list(LINEARS), random_seed=1, init_weights=False)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "shira_weight" in n:
                p.mul_(0.01)
    return model


def adapter_from_shira(model) -> SparseAdapter:
    """Our adapter with exactly SHiRA's mask and values (equal trainable parameters)."""
    params = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "shira_indices") and "default" in getattr(mod, "shira_indices", {}):
            ind = mod.shira_indices["default"]
            w = mod.get_base_layer().weight
            flat = ind[0].to(torch.int64) * w.shape[1] + ind[1].to(torch.int64)
            vals = (mod.shira_weight["default"] * mod.scaling["default"]).detach().float()
            key = name.replace("base_model.model.", "") + ".weight"
            params[key] = SparseParam.from_flat(tuple(w.shape), flat, vals)
    return SparseAdapter(params)


def lora_model(base: Toy, r: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=list(LINEARS), init_lora_weights=False)
    return get_peft_model(base, cfg)


def linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.data for n, p in model.named_parameters() if n.endswith("weight") and "lora_" not in n
            and "shira" not in n}


def snapshot(ws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ws.items()}


def max_err(ws, ref) -> tuple[float, float]:
    """(max abs error, fraction of touched-or-not weights that differ)."""
    m, diff, tot = 0.0, 0, 0
    for k in ref:
        d = (ws[k].float() - ref[k].float()).abs()
        m = max(m, float(d.max()))
        diff += int((ws[k] != ref[k]).sum())
        tot += ref[k].numel()
    return m, diff / tot


def _setup_shira(layers: int):
    r = max(1, round(0.01 * sum(o * i for o, i in LINEARS.values()) / sum(o + i for o, i in LINEARS.values())))
    base = Toy(layers, torch.float32)
    sm = shira_model(base, r)
    adapter = adapter_from_shira(sm)
    weights = linear_weights(sm)
    # our names (layers.0.q_proj.weight) onto the PEFT module's weight tensors
    target = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in weights.items()}
    return r, sm, adapter, weights, target


def _lora(layers: int, r: int, dtype: torch.dtype):
    lm = lora_model(Toy(layers, dtype), r)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    return lm


def _time_shira(layers: int) -> tuple[int, int, dict[str, float]]:
    """Time adapterhub, PEFT SHiRA and the bare-numpy memory floor on one model (fp32, medians of 3).

    Returns: (LoRA rank with SHiRA's trainable-parameter count, non-zeros, seconds by method). The model
    and its views live only in this call, so they are freed before the LoRA model is built.
    """
    r, sm, adapter, _weights, target = _setup_shira(layers)

    def ours() -> None:
        revert(target, apply_adapter(target, adapter))

    def shira() -> None:
        sm.merge_adapter()
        sm.unmerge_adapter()

    # the memory floor on this machine: the same gather + scatter + scatter over the same positions
    # with bare numpy calls and no bookkeeping (what any exact in-place apply+revert must touch)
    import numpy as np

    bare = [(target[n].detach().view(-1).numpy(), adapter.params[n].flat()[0].numpy(),
             adapter.params[n].flat()[1].numpy()) for n in sorted(adapter.params)]

    def floor() -> None:
        saved = []
        for a, i, v in bare:  # apply, tensor by tensor: gather, add, scatter
            o = np.take(a, i)
            a[i] = o + v
            saved.append(o)
        for (a, i, _), o in zip(bare, saved, strict=True):  # revert: scatter the originals back
            a[i] = o

    times = {"adapterhub_s": median_seconds(ours), "peft_shira_s": median_seconds(shira),
             "memory_floor_s": median_seconds(floor)}
    return r, adapter.nnz, times


def gpu_in_memory(layers: int, device: str, results: dict[str, Any]) -> None:
    """The in-memory comparison on a GPU (fp32 base, same mask and values as SHiRA): adapterhub apply + revert
    (indices and values moved to the device on the first apply and kept; that first apply is timed apart)
    against PEFT SHiRA ``merge_adapter`` + ``unmerge_adapter`` on the same device, medians of 5, with
    ``torch.cuda.synchronize()`` inside every timed call. The weights must come back bit for bit."""
    from adapterhub.apply.patching import state_fingerprint

    r, sm, adapter, _w, _t = _setup_shira(layers)  # the adapter is read from SHiRA's indices on the CPU
    sm.to(device)
    weights = linear_weights(sm)
    target = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in weights.items()}
    fp0 = state_fingerprint(target)
    sync = torch.cuda.synchronize

    first = first_apply_seconds(target, adapter, device)

    def ours() -> None:
        revert(target, apply_adapter(target, adapter))
        sync()

    def shira() -> None:
        sm.merge_adapter()
        sm.unmerge_adapter()
        sync()

    ours()
    t_ours = median_seconds(ours, 5)
    exact = state_fingerprint(target) == fp0
    shira()
    t_shira = median_seconds(shira, 5)
    results["gpu_in_memory_fp32"] = {
        "device": torch.cuda.get_device_name(0), "layers": layers, "r": r, "nnz": adapter.nnz,
        "adapterhub_s": t_ours, "adapterhub_first_apply_s": first, "peft_shira_s": t_shira,
        "speedup_vs_shira": t_shira / t_ours, "adapterhub_exact": exact}


def _time_lora(layers: int, r: int) -> float:
    lm = _lora(layers, r, torch.float32)

    def lora() -> None:
        lm.merge_adapter()
        lm.unmerge_adapter()

    return median_seconds(lora)


def in_memory(layers: int, results: dict[str, Any]) -> None:
    """Timing at full size (fp32 base), medians of 3."""
    n_params = layers * sum(o * i for o, i in LINEARS.values())
    r, nnz, times = _time_shira(layers)
    results["model"] = {"layers": layers, "linear_params": n_params, "r": r, "nnz": nnz,
                        "density": nnz / n_params}
    gc.collect()
    t_lora = _time_lora(layers, r)
    gc.collect()
    t_ours = times["adapterhub_s"]
    results["in_memory_fp32"] = {**times, "peft_lora_s": t_lora, "threads": torch.get_num_threads(),
                                 "speedup_vs_shira": times["peft_shira_s"] / t_ours,
                                 "speedup_vs_lora": t_lora / t_ours}


def _cycle_errors(weights: Weights, step: Callable[[], object], cycles: int) -> dict[str, Errors]:
    """Run ``step`` (one apply/revert or merge/unmerge) ``cycles`` times from a fresh copy of ``weights``.

    Returns: {"cycles_1": errors, f"cycles_{cycles}": errors}, errors as in :func:`max_err`. ``weights``
    is left as the steps left it.
    """
    w0 = snapshot(weights)
    res = {}
    for c in range(cycles):
        step()
        if c == 0:
            res["cycles_1"] = max_err(weights, w0)
    res[f"cycles_{cycles}"] = max_err(weights, w0)
    return res


def _peft_merge_unmerge(model: Any) -> None:
    model.merge_adapter()
    model.unmerge_adapter()


def _ours_apply_revert(target: Weights, adapter: SparseAdapter) -> None:
    revert(target, apply_adapter(target, adapter))


def _lora_errors(layers: int, r: int, dtype: torch.dtype, adapter: SparseAdapter | None,
                 cycles: int) -> dict[str, dict[str, Errors]]:
    """PEFT LoRA drift on a ``dtype`` base, and adapterhub's drift on that same base when ``adapter`` is given."""
    lm = _lora(layers, r, dtype)
    weights = linear_weights(lm)
    out = {"peft_lora": _cycle_errors(weights, functools.partial(_peft_merge_unmerge, lm), cycles)}
    if adapter is not None:
        # our names (layers.0.q_proj.weight) onto the PEFT module's weight tensors
        target = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in weights.items()}
        out["adapterhub"] = _cycle_errors(target, functools.partial(_ours_apply_revert, target, adapter), cycles)
    return out


def exactness(layers: int, cycles: int, results: dict[str, Any]) -> None:
    """max |W - W0| and the fraction of weights changed after 1 and ``cycles`` apply/revert cycles.

    Per-weight drift does not depend on model size, so this runs on ``layers`` layers only.
    """
    out: dict[str, Any] = {}
    r, sm, adapter, weights, target = _setup_shira(layers)
    w0 = snapshot(weights)  # both runs start from the same base bytes
    out["peft_shira_fp32"] = _cycle_errors(weights, functools.partial(_peft_merge_unmerge, sm), cycles)
    for k in weights:
        weights[k].copy_(w0[k])
    out["adapterhub_fp32"] = _cycle_errors(weights, functools.partial(_ours_apply_revert, target, adapter), cycles)
    del sm, weights, target, w0
    gc.collect()
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        errs = _lora_errors(layers, r, dtype, adapter if tag == "bf16" else None, cycles)
        out.update({f"{who}_{tag}": e for who, e in errs.items()})  # peft_lora_<tag>, adapterhub_<tag>
        gc.collect()
    results["exactness"] = {"layers": layers, "cycles": cycles, **out}


def write_file(path: Path, layers: int, dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for li in range(layers):
        for n, s in LINEARS.items():
            tensors[f"model.layers.{li}.mlp.{n}.weight"] = (torch.randn(s, generator=g) * 0.02).to(dtype)
    save_file(tensors, path)
    return {k: tuple(v.shape) for k, v in tensors.items()}


def rand_adapter(shapes: dict, density: float, seed: int = 1) -> SparseAdapter:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n, s in shapes.items():
        numel = s[0] * s[1]
        k = max(1, int(density * numel))
        idx = torch.randperm(numel, generator=g)[:k]
        params[n] = SparseParam.from_flat(s, idx, torch.randn(k, generator=g) * 0.01)
    return SparseAdapter(params)


def disk_apply_revert(path: Path, adapter: SparseAdapter) -> float:
    wal = path.parent / "wal.safetensors"
    t0 = time.perf_counter()
    with SafetensorsFile(path) as f:
        with DiskTransaction(f, wal, {"op_id": "bench"}, {n: [p.indices] for n, p in adapter.params.items()}) as tx:
            ents = tx.apply(adapter.params, 1.0)
        with DiskTransaction(f, wal, {"op_id": "bench2"}, {e.name: [e.indices] for e in ents}) as tx:
            tx.restore(ents)
    return time.perf_counter() - t0


def rewrite_whole(path: Path, adapter: SparseAdapter) -> float:
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    for sign in (1.0, -1.0):
        sd = load_file(path)
        for n, p in adapter.params.items():
            flat = sd[n].view(-1)
            flat[p.indices] = (flat[p.indices].float() + sign * p.values).to(flat.dtype)
        save_file(sd, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


def on_disk(layers: int, dtype: torch.dtype, tag: str, densities: list[float], results: dict) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        path = Path(d) / "model.safetensors"
        shapes = write_file(path, layers, dtype)
        size = path.stat().st_size
        itemsize = torch.tensor([], dtype=dtype).element_size()
        hdr = SafetensorsFile(path, writable=False)
        sf_offsets = {n: hdr.data_start + e[2] for n, e in hdr.entries.items()}
        hdr.close()
        rows = []
        for dens in densities:
            ad = rand_adapter(shapes, dens)
            t_patch = median_seconds(functools.partial(disk_apply_revert, path, ad), repeat=3)
            # OS pages (4 KiB) that hold at least one touched element: the I/O an fsync really writes
            pages = set()
            for n, p in ad.params.items():
                begin = sf_offsets[n]
                pages.update(((p.indices * itemsize + begin) // 4096).unique().tolist())
            rows.append({"density": dens, "nnz": ad.nnz, "patch_s": t_patch,
                         "pages_touched_frac": len(pages) * 4096 / size})
        ad = rand_adapter(shapes, 0.01)
        t_rewrite = median_seconds(functools.partial(rewrite_whole, path, ad), repeat=1)
        one = next(r for r in rows if r["density"] == 0.01)
        results[f"on_disk_{tag}"] = {"file_bytes": size, "params": sum(a * b for a, b in shapes.values()),
                                     "by_density": rows, "rewrite_whole_s": t_rewrite,
                                     "speedup_at_1pct": t_rewrite / one["patch_s"]}


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, res in results.items():
        if key.startswith("on_disk_"):
            xs = [r["nnz"] for r in res["by_density"]]
            ax.loglog(xs, [r["patch_s"] for r in res["by_density"]], "o-", label=f"in-place patch ({key[8:]})")
            ax.axhline(res["rewrite_whole_s"], ls="--", color="gray")
            ax.text(xs[0], res["rewrite_whole_s"] * 1.1, f"rewrite whole file ({key[8:]})", fontsize=8)
    ax.set_xlabel("non-zeros applied (apply + revert)")
    ax.set_ylabel("seconds (incl. WAL fsync)")
    ax.set_title("On-disk apply+revert time vs adapter size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--exact-layers", type=int, default=2, help="layers for the 1/50-cycle drift study")
    ap.add_argument("--big", action="store_true", help="also a synthetic ~1B-parameter bf16 file on disk")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: only the in-memory comparison with PEFT SHiRA, on the GPU")
    args = ap.parse_args()
    # One thread by default: on a shared, overloaded machine OpenMP wake-ups dominate and turn the
    # figures into noise; every implementation runs under the same setting.
    torch.set_num_threads(args.threads)
    results: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    import peft

    results["peft"] = peft.__version__
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        gpu_in_memory(args.layers, "cuda", results)
        g = results["gpu_in_memory_fp32"]
        print(json.dumps(results, indent=2, default=float))
        print(f"\nGPU in memory ({g['device']}, fp32, {g['nnz']:,} nnz): adapterhub apply + revert "
              f"{g['adapterhub_s'] * 1e3:.2f} ms (first apply, moving the adapter: {g['adapterhub_first_apply_s'] * 1e3:.1f} ms;"
              f" exact: {g['adapterhub_exact']}) | PEFT SHiRA merge + unmerge {g['peft_shira_s'] * 1e3:.2f} ms "
              f"({g['speedup_vs_shira']:.1f}x)")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=float))
        return
    in_memory(args.layers, results)
    exactness(args.exact_layers, args.cycles, results)
    on_disk(args.layers, torch.bfloat16, "smollm2_bf16", [0.00001, 0.0001, 0.001, 0.01, 0.1], results)
    if args.big:
        on_disk(284, torch.bfloat16, "1b_bf16", [0.0001, 0.01], results)  # 284 x 3.54M = 1.0B parameters
    plot(results, ROOT / "docs" / "img" / "apply_revert_density.png")
    print(json.dumps(results, indent=2, default=float))
    m = results["in_memory_fp32"]
    print(f"\nin memory (fp32, {results['model']['nnz']:,} nnz, density {results['model']['density']:.2%}): "
          f"adapterhub {m['adapterhub_s'] * 1e3:.1f} ms | PEFT SHiRA {m['peft_shira_s'] * 1e3:.1f} ms "
          f"({m['speedup_vs_shira']:.1f}x) | PEFT LoRA r={results['model']['r']} {m['peft_lora_s'] * 1e3:.1f} ms "
          f"({m['speedup_vs_lora']:.1f}x) | memory floor (bare numpy gather+scatter+scatter) "
          f"{m['memory_floor_s'] * 1e3:.1f} ms (adapterhub / floor {m['adapterhub_s'] / m['memory_floor_s']:.2f}x); "
          f"{m['threads']} thread(s)")
    for k, v in results["exactness"].items():
        if not isinstance(v, dict):
            continue
        print(f"exactness {k}: " + ", ".join(f"{c}: max|dW|={e[0]:.3g}, changed={e[1]:.2%}" for c, e in v.items()))
    for key in [k for k in results if k.startswith("on_disk_")]:
        d = results[key]
        print(f"{key}: file {d['file_bytes'] / 1e6:.0f} MB; rewrite whole file {d['rewrite_whole_s']:.2f} s; "
              + "; ".join(f"patch {r['density']:.3%} ({r['nnz']:,} nnz, pages {r['pages_touched_frac']:.0%}) "
                          f"{r['patch_s'] * 1e3:.1f} ms" for r in d["by_density"])
              + f"; speedup at 1%: {d['speedup_at_1pct']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()

"""Bytes on disk per non-zero for the indices of a sparse adapter, side by side with PEFT SHiRA and int64.

For each LLM-shaped weight and density (0.1%, 1%, 10%, 50%), one random mask (seeded) is stored three ways,
all measured in this run:

* adapterhub ``adapterhub.sparse/1``: uint16 gaps + int64 escapes (the real ``format.save`` output; we count
  the bytes of the ``::idx`` and ``::esc`` tensors and also report the whole file);
* PEFT SHiRA: ``shira_indices`` int32 (2, nnz) COO + ``shira_weight`` fp32, written with ``safetensors.torch.save``
  exactly as PEFT saves an adapter (``base_model.model.<module>.shira_*``);
* a plain int64 flat index list (what ``torch.nonzero`` gives).

Also the encode/decode time of our index coding, and full save/load of both files (median of --repeat runs).

Usage:  .venv/bin/python benchmarks/format_bytes.py [--shapes 3072x9216,576x1536,...] [--densities ...]
        [--repeat 3] [--write]
``--write`` updates the "format bytes" section of docs/bench/catalog.md and draws docs/img/format_bytes.png.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from adapterhub import format as fmt
from benchutil import median_seconds, write_section  # benchmarks/ is the script's folder, so on sys.path

DEFAULT_SHAPES = "3072x9216,9216x3072,576x1536,4096x4096"
DEFAULT_DENSITIES = "0.001,0.01,0.1,0.5"


def measure(shape: tuple[int, int], density: float, repeat: int, seed: int = 0) -> dict:
    numel = shape[0] * shape[1]
    g = torch.Generator().manual_seed(seed)
    idx = (torch.rand(numel, generator=g) < density).nonzero().reshape(-1)
    nnz = int(idx.numel())
    vals = torch.randn(nnz, generator=g)
    name = "model.layers.0.mlp.up_proj.weight"
    ad = fmt.SparseAdapter({name: fmt.SparseParam(shape, idx, vals)}, {}, {"mask": {"density": density}})
    data = fmt.save(ad)
    gaps, esc = fmt.encode_indices(idx)
    ours_idx = gaps.numel() * 2 + esc.numel() * 8
    # PEFT SHiRA file, as PeftModel.save_pretrained writes it
    from safetensors.torch import load as st_load, save as st_save

    coo = torch.stack([idx // shape[1], idx % shape[1]]).to(torch.int32)
    peft_tensors = {"base_model.model.model.layers.0.mlp.up_proj.shira_indices": coo,
                    "base_model.model.model.layers.0.mlp.up_proj.shira_weight": vals}
    peft_data = st_save(peft_tensors, metadata={"format": "pt"})
    peft_idx = coo.numel() * coo.element_size()
    int64_idx = nnz * 8
    t_enc = median_seconds(lambda: fmt.encode_indices(idx), repeat)
    t_dec = median_seconds(lambda: fmt.decode_indices(gaps, esc, name), repeat)
    t_save = median_seconds(lambda: fmt.save(ad), repeat)
    t_load = median_seconds(lambda: fmt.load(data), repeat)
    t_peft_save = median_seconds(lambda: st_save(peft_tensors, metadata={"format": "pt"}), repeat)
    t_peft_load = median_seconds(lambda: st_load(peft_data), repeat)
    return {"shape": f"{shape[0]}x{shape[1]}", "density": density, "nnz": nnz, "escapes": int(esc.numel()),
            "ours_idx_bpnz": ours_idx / nnz, "peft_idx_bpnz": peft_idx / nnz, "int64_bpnz": int64_idx / nnz,
            "ours_file_bpnz": len(data) / nnz, "peft_file_bpnz": len(peft_data) / nnz,
            "encode_ms": 1e3 * t_enc, "decode_ms": 1e3 * t_dec, "save_ms": 1e3 * t_save, "load_ms": 1e3 * t_load,
            "peft_save_ms": 1e3 * t_peft_save, "peft_load_ms": 1e3 * t_peft_load}


def table(rows: list[dict]) -> str:
    out = ["| shape | density | nnz | escapes | ours idx B/nnz | PEFT SHiRA idx B/nnz | int64 B/nnz | PEFT/ours | "
           "ours file B/nnz | PEFT file B/nnz | encode ms | decode ms | save ms (PEFT) | load ms (PEFT) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {100 * r['density']:g}% | {r['nnz']:,} | {r['escapes']} | {r['ours_idx_bpnz']:.3f} | "
                   f"{r['peft_idx_bpnz']:.3f} | {r['int64_bpnz']:.3f} | {r['peft_idx_bpnz'] / r['ours_idx_bpnz']:.2f}x | "
                   f"{r['ours_file_bpnz']:.3f} | {r['peft_file_bpnz']:.3f} | {r['encode_ms']:.1f} | {r['decode_ms']:.1f} | "
                   f"{r['save_ms']:.1f} ({r['peft_save_ms']:.1f}) | {r['load_ms']:.1f} ({r['peft_load_ms']:.1f}) |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = rows[0]["shape"]
    sel = [r for r in rows if r["shape"] == shape]
    xs = range(len(sel))
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.27
    ax.bar([x - w for x in xs], [r["ours_idx_bpnz"] for r in sel], w, label="adapterhub (uint16 gaps)")
    ax.bar(list(xs), [r["peft_idx_bpnz"] for r in sel], w, label="PEFT SHiRA (int32 COO)")
    ax.bar([x + w for x in xs], [r["int64_bpnz"] for r in sel], w, label="int64 flat list")
    ax.set_xticks(list(xs), [f"{100 * r['density']:g}%" for r in sel])
    ax.set_xlabel(f"density ({shape})")
    ax.set_ylabel("index bytes per non-zero")
    ax.set_title("Index storage per non-zero")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--densities", default=DEFAULT_DENSITIES)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="update docs/bench/catalog.md and docs/img/format_bytes.png")
    a = ap.parse_args(argv)
    load = os.getloadavg()[0]
    torch.set_num_threads(1)  # single-threaded timings: stable on a shared machine, and the coding is serial anyway
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    dens = [float(d) for d in a.densities.split(",")]
    rows = []
    for s in shapes:
        for d in dens:
            r = measure(s, d, a.repeat)
            rows.append(r)
            print(f"{r['shape']:>10} {100 * d:>5g}%  ours {r['ours_idx_bpnz']:.3f} B/nnz  PEFT {r['peft_idx_bpnz']:.1f}  "
                  f"int64 {r['int64_bpnz']:.1f}  ratio PEFT/ours {r['peft_idx_bpnz'] / r['ours_idx_bpnz']:.2f}x  "
                  f"enc {r['encode_ms']:.1f} ms dec {r['decode_ms']:.1f} ms", file=sys.stderr)
    md = table(rows)
    print(md)
    if a.write:
        cmd = "python benchmarks/format_bytes.py --write" + (f" --shapes {a.shapes}" if a.shapes != DEFAULT_SHAPES else "")
        body = (f"## Index bytes per non-zero (format_bytes)\n\nCommand: `.venv/bin/{cmd}` "
                f"(torch {torch.__version__}, {torch.get_num_threads()} thread, median of {a.repeat}; "
                f"{os.cpu_count()} CPUs, load average {load:.1f} at the start — timings on a shared machine).\n\n"
                "Random masks (seeded). *idx B/nnz* counts only the index tensors; *file B/nnz* is the whole "
                "file (indices + fp32 values + header). PEFT SHiRA is written as PEFT writes it.\n\n" + md +
                "\n\n![index bytes per non-zero](../img/format_bytes.png)\n")
        write_section(ROOT / "docs" / "bench" / "catalog.md", "format_bytes", body)
        plot(rows, ROOT / "docs" / "img" / "format_bytes.png")


if __name__ == "__main__":
    main()

"""Hub transfer benchmark: adapterhub push/pull vs raw huggingface_hub upload_folder/snapshot_download.

A 1%-density sparse adapter over the 210 decoder linears of SmolLM2-135M (real names and shapes, random
indices and fp32 values) is registered in a workspace, then, against the local Hub-protocol server of the
test suite (127.0.0.1, LFS path, no Xet):

* ``adapterhub push`` (new repo each repeat) vs ``create_repo`` + ``upload_folder`` of the same three files;
* ``adapterhub pull`` into a fresh home and a fresh Hub cache vs ``snapshot_download`` into a fresh cache;
* an unchanged re-push: bytes uploaded (must be 0) and its time.

Ratios are medians over ``--repeats`` runs measured in the same process. Writes docs/bench/hub.md and
docs/img/hub_transfer.png.

    .venv/bin/python benchmarks/hub_transfer.py            # defaults: density 0.01, 5 repeats
"""
from __future__ import annotations

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="hubbench-")
os.environ["HF_HUB_DISABLE_XET"] = "1"  # before huggingface_hub is imported: the local server speaks LFS
os.environ["HF_HOME"] = os.path.join(_TMP, "hf_home")
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("HF_TOKEN", None)

# everything below is imported after the environment above is set (huggingface_hub reads it on import)
import argparse
import functools
import json
import platform
import shutil
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from adapterhub import format as fmt
from adapterhub.hub.client import pull, push
from adapterhub.testing.hubserver import HubServer
from adapterhub.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent

# SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64.
LAYERS, HIDDEN, INTER, KV = 30, 576, 1536, 192
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTER)}


def shapes() -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{k}.weight": s for i in range(LAYERS) for k, s in LINEARS.items()}


def write_shape_base(folder: Path) -> Path:
    """A base folder with the real linear names/shapes (bf16 zeros, written as a sparse file: no disk cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    header, off = {}, 0
    for name, shp in sorted(shapes().items()):
        n = shp[0] * shp[1] * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return folder


def make_adapter(density: float, seed: int = 0) -> fmt.SparseAdapter:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shp in shapes().items():
        numel = shp[0] * shp[1]
        k = max(1, int(round(numel * density)))
        idx = torch.randperm(numel, generator=g)[:k]
        params[name] = fmt.SparseParam.from_flat(shp, idx, torch.randn(k, generator=g) * 1e-3)
    card = {"task": "bench", "mask": {"method": "random", "density": density, "granularity": "element",
                                      "targets": sorted(LINEARS)}}
    return fmt.SparseAdapter(params, {}, card)


T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of one call of ``fn``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def raw_upload(api: Any, repo: str, folder: Path) -> None:
    """The anchor for push: create_repo + upload_folder of the very same files."""
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=folder, commit_message="raw")


def stamp(stamps: list[tuple[str, float]], msg: str) -> None:
    """A pull progress callback: record when each phase starts."""
    stamps.append((msg, time.perf_counter()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "hub.md"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "hub_transfer.png"))
    args = ap.parse_args()

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # same for both sides; bars are not what we measure
    tmp = Path(_TMP)
    base_dir = write_shape_base(tmp / "base")
    server = HubServer(record_bodies=False).start()
    endpoint = server.url
    try:
        ws = Workspace.open(tmp / "home-src")
        ws.add_base("smollm2-shapes", str(base_dir))
        adapter = make_adapter(args.density)
        v = ws.register(adapter, name="bench", task="bench", base="smollm2-shapes")
        size = v.size_bytes
        print(f"adapter: {v.nnz} non-zeros ({v.density:.4%}), {size / 1e6:.2f} MB file", file=sys.stderr)

        api = HfApi(endpoint=endpoint, token=False)
        t_push, t_raw_up, t_pull, t_raw_down, t_repush = [], [], [], [], []
        t_register: list[float] = []
        up_bytes_ah = up_bytes_raw = repush_bytes = 0
        for i in range(args.repeats):
            repo = f"bench/ah-{i}"
            mark = len(server.requests)
            dt, res = timed(functools.partial(push, ws, v.ref, repo=repo, endpoint=endpoint))
            t_push.append(dt)
            up_bytes_ah = server.uploaded_bytes(since=mark)
            # the anchor: the very same three files through create_repo + upload_folder
            folder = tmp / f"raw-{i}"
            folder.mkdir()
            for p in ("adapter.safetensors", "adapterhub.json", "README.md"):
                (folder / p).write_bytes(server.file_bytes(repo, res.commit, p))
            raw = f"bench/raw-{i}"
            mark = len(server.requests)
            dt, _ = timed(functools.partial(raw_upload, api, raw, folder))
            t_raw_up.append(dt)
            up_bytes_raw = server.uploaded_bytes(since=mark)

            # unchanged re-push
            mark = len(server.requests)
            dt, again = timed(functools.partial(push, ws, v.ref, repo=repo, endpoint=endpoint))
            t_repush.append(dt)
            repush_bytes = max(repush_bytes, server.uploaded_bytes(since=mark))
            assert not again.uploaded

            # pull into a fresh home + fresh Hub cache vs snapshot_download into a fresh cache
            dst = Workspace.open(tmp / f"home-dst-{i}")
            dst.add_base("smollm2-shapes", str(base_dir))
            stamps: list[tuple[str, float]] = []
            dt, got = timed(functools.partial(pull, dst, f"{repo}@v1", endpoint=endpoint,
                                              cache_dir=tmp / f"cache-ah-{i}",
                                              progress=functools.partial(stamp, stamps)))
            end = time.perf_counter()
            assert got.registered and got.content_hash == v.content_hash
            t_pull.append(dt)
            reg_at = next(t for m, t in stamps if m.startswith("registering"))
            t_register.append(end - reg_at)
            dst.close()
            dt, _ = timed(functools.partial(snapshot_download, raw, endpoint=endpoint, cache_dir=tmp / f"cache-raw-{i}"))
            t_raw_down.append(dt)
        ws.close()
    finally:
        server.stop()

    med = statistics.median
    push_ratio = med(t_push) / med(t_raw_up)
    pull_ratio = med(t_pull) / med(t_raw_down)
    rows = [
        ("push (new repo)", med(t_push), med(t_raw_up), push_ratio, "create_repo + upload_folder"),
        ("pull (fresh home + cache)", med(t_pull), med(t_raw_down), pull_ratio, "snapshot_download"),
        ("unchanged re-push", med(t_repush), None, None, f"bytes uploaded: {repush_bytes}"),
    ]
    cmd = f".venv/bin/python benchmarks/hub_transfer.py --density {args.density} --repeats {args.repeats}"
    lines = [
        "# Hub transfer (adapterhub push/pull vs raw huggingface_hub)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Adapter: SmolLM2-135M linear shapes (210 tensors), density {args.density:.2%}, {v.nnz:,} non-zeros, "
        f"{size / 1e6:.2f} MB file; local Hub-protocol server on 127.0.0.1 (LFS upload path, no Xet); "
        f"median of {args.repeats}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        "| operation | adapterhub (s) | raw huggingface_hub (s) | ratio | anchor / note |",
        "|---|---|---|---|---|",
    ]
    for name, a, b, r, note in rows:
        lines.append(f"| {name} | {a:.3f} | {'' if b is None else f'{b:.3f}'} | "
                     f"{'' if r is None else f'{r:.2f}x'} | {note} |")
    lines += [
        "",
        f"Bytes uploaded per push: adapterhub {up_bytes_ah:,}, raw upload_folder {up_bytes_raw:,} (same files); "
        f"unchanged re-push: {repush_bytes} bytes.",
        "",
        f"Of the pull, {med(t_register):.3f} s (median) is the catalog registration after the verified download "
        "(canonical re-serialisation, durable blob write, catalog insert).",
        "",
        "adapterhub's push adds: reading and verifying the blob from the store, building adapterhub.json and the",
        "model card, listing refs and the branch tree (to skip a version already there and to make retried",
        "pushes idempotent), tagging v{N}, and recording the coordinates in the catalog. Its pull adds: the card",
        "download, sha256 verification, full validation (`format.load`), canonical re-serialisation, the blob",
        "write and the catalog insert with lineage.",
        "",
        "![hub transfer](../img/hub_transfer.png)",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = ["push", "pull"]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [med(t_push), med(t_pull)], width=0.4, label="adapterhub")
    ax.bar([x + 0.2 for x in xs], [med(t_raw_up), med(t_raw_down)], width=0.4, label="raw huggingface_hub")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"1 adapter, {size / 1e6:.1f} MB, local Hub server")
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    shutil.rmtree(tmp, ignore_errors=True)
    if repush_bytes != 0:
        raise SystemExit(f"unchanged re-push uploaded {repush_bytes} bytes (must be 0)")


if __name__ == "__main__":
    main()

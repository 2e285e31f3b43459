"""Deployment cost at several model sizes: ``deploy apply`` + ``deploy revert`` of the same adapter (issue 19).

Builds synthetic sharded bf16 Llama checkpoints locally (random weights, nothing downloaded;
``save_pretrained(max_shard_size="500MB")``): by default SmolLM2-135M shapes and TinyLlama-1.1B shapes (hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 KV heads; ~2.2 GB); ``8b`` is Llama-3-8B's (``scale.SHAPES``). One random
adapter of ~0.9M non-zeros on the seven projections is made for each (the same count; positions uniform over the
targeted tensors).

Measured in one run, warm page cache (a warm-up cycle first), medians of ``--repeat`` runs:

1. ``adapterhub deploy apply`` + ``adapterhub deploy revert`` through the CLI (two processes, start-up
   included) on every size; prints each size's ratio to the first, 1.1B / 135M being the target (<= 1.5x).
   ``--sizes 135m,1.1b,8b`` adds Llama-3-8B shapes (16 GB; the run needs ~70 GB free: the base, the deployment,
   the bare copy and a second deployment for ``create``/``rm``).
2. In process: ``deployments.apply`` + ``deployments.revert`` vs the bare patch of the same entries
   (gather + scatter on the memory-mapped shards + fsync of the touched shards, then the same to put the
   originals back) on each size (target <= 1.5x); pages touched are printed beside nnz. The bare patch runs on
   its own copy of the base's weights files (``<work>/bare-<size>``), never on the deployment (see
   :func:`bare_copy`). Each size also gets one sha256 pass over its deployment's weights files timed: what the
   design before issue 19 paid twice per operation.

3. ``deployments.rollback`` of one layer (to the event before an apply, in process), and ``deploy create`` (a copy
   of the base, hashed once) + ``deploy rm`` of a second deployment through the CLI.

The checkpoints are made by ``benchmarks/scale.py``'s ``build()`` (the same folders, ``<work>/llama-<size>``).

Usage:  nice -n 10 .venv/bin/python benchmarks/deploy_scale.py [--work /tmp/adapterhub-deploy-scale] [--repeat 5]
        [--sizes 135m,1.1b]
The checkpoints are kept under ``--work`` and reused by the next run (delete the folder to rebuild).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# (one implementation of the checkpoints, shared with scale.py)
from scale import PROJ, _sha256_files, _status_kb, build

NNZ = 900_000


def make_adapter(folder: Path, out: Path, nnz: int = NNZ, seed: int = 0) -> int:
    """A random adapter of ``nnz`` non-zeros on the seven projections of the base in ``folder``."""
    from adapterhub import format as fmt
    from adapterhub.bases.sources import tensor_shapes

    shapes = {n: s for n, s in tensor_shapes(folder).items() if any(f".{p}." in n for p in PROJ)}
    total = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n in sorted(shapes):
        numel = int(torch.tensor(shapes[n]).prod())
        k = max(1, round(nnz * numel / total))
        idx = torch.randperm(numel, generator=g)[:k].sort().values
        params[n] = fmt.SparseParam(shapes[n], idx, torch.randn(k, generator=g) * 0.01)
    fmt.save_file(fmt.SparseAdapter(params, {}, {"mask": {"method": "random"}}), out)
    return sum(p.nnz for p in params.values())


PEAK_KB: dict[str, list[int]] = {}  # "<home folder>: <command's first two words>" -> peak RSS of each run, KiB


def _hwm_kb(pid: int) -> int:
    """The process's peak RSS so far (``VmHWM`` of ``/proc/<pid>/status``, KiB); 0 before it has exec'd the CLI
    (until then it is this process's memory) and once it has exited."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"adapterhub.cli.main" not in f.read():
                return 0
        return _status_kb("VmHWM", pid)
    except OSError:
        return 0


def cli(home: Path, *args: str) -> float:
    """Run ``adapterhub --home HOME ARGS`` as a process; returns its wall time and records its peak RSS in
    :data:`PEAK_KB`: ``VmHWM`` (a high-water mark of that process's own memory after its exec) read every 5 ms
    while it runs, so a peak in its last few ms may be missed. (``wait4``'s ``ru_maxrss`` cannot be used: a child
    spawned from this process, which maps the weights in process, inherits its RSS until it execs.)"""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "adapterhub.cli.main", "--home", str(home), *args],
                             stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        peak = 0
        while p.poll() is None:
            peak = max(peak, _hwm_kb(p.pid))
            time.sleep(0.005)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            err.seek(0)
            raise SystemExit(f"adapterhub {' '.join(args)} failed: {err.read().decode(errors='replace').strip()}")
    PEAK_KB.setdefault(f"{home.name}: {' '.join(args[:2])}", []).append(peak)
    return dt


def pages_touched(folder: Path, adapter_path: Path) -> int:
    """4 KiB pages of the weights files the adapter's entries fall in."""
    from adapterhub import format as fmt
    from adapterhub.apply.disk import WeightsFolder

    ad = fmt.load_file(adapter_path)
    n = 0
    with WeightsFolder(folder, writable=False) as w:
        for name, p in ad.params.items():
            f = w._file(name)
            dt, _, b, _ = f.entries[name]
            size = torch.tensor([], dtype=w.flat(name).dtype).element_size()
            off = f.data_start + b + p.flat()[0] * size
            n += int(torch.unique_consecutive(off // 4096).numel())
    return n


def bare_copy(work: Path, size: str) -> Path:
    """A private copy of the base's weights files for the bare patch, made anew at each run.

    The bare patch runs on its own copy, never on the deployment: it rewrites the same bytes, but the files'
    mtime and ctime move, and the deployment's next operation would rightly re-hash those files in full (its
    cheap check sees them changed outside adapterhub) — a cost of the benchmark, not of an apply.
    The same bytes, in the same files and the same layout, so the two patches touch the same pages. Both the
    copy and the deployment are new at each run (see :func:`setup_size`).
    """
    base = work / f"llama-{size}"
    folder = work / f"bare-{size}"
    tmp = work / f"bare-{size}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in sorted(base.glob("*.safetensors")):
        shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def bare_patch(folder: Path, adapter_path: Path) -> float:
    """Apply then revert the adapter's entries on the memory-mapped shards, fsyncing touched shards each time:
    the gather of the originals, the add, the scatter, msync + fsync; then the scatter of the originals back,
    msync + fsync. No hashing, no record, no catalog."""
    from adapterhub import format as fmt
    from adapterhub.apply.disk import WeightsFolder
    from adapterhub.apply.patching import patch_flat, write_at

    ad = fmt.load_file(adapter_path)
    t0 = time.perf_counter()
    with WeightsFolder(folder) as w:
        saved = []
        for name in sorted(ad.params):
            idx, vals = ad.params[name].flat()
            saved.append((name, idx, patch_flat(w.flat(name), idx, vals, 1.0, name=name)))
        w.sync()
        for name, idx, orig in reversed(saved):
            write_at(w.flat(name), idx, orig)
        w.sync()
    return time.perf_counter() - t0


def setup_size(work: Path, size: str) -> dict[str, Any]:
    """Build the base, the adapter, a home with both registered (reused when present) and a new deployment ``d``."""
    base = work / f"llama-{size}"
    build(base, size)
    home = work / f"deploy-home-{size}"  # beside scale.py's homes when both use the same --work
    adapter = work / f"deploy-adapter-{size}.safetensors"
    if not adapter.exists():
        make_adapter(base, adapter)
    if not (home / "catalog.db").exists():
        home.mkdir(parents=True, exist_ok=True)
        cli(home, "init")
        cli(home, "base", "add", "b", str(base))
        cli(home, "register", str(adapter), "--name", "a", "--task", "t", "--base", "b")
    # A new deployment at each run, as a new bare copy: on the 2-core VM of these figures, the deployment file that
    # runs had patched ~900 times in place became slower to patch and fsync at the device level (0.43 s against
    # 0.29 s for a byte-identical copy of it, the same 4 extents on ext4) and the ratio moved with the file's age.
    if (home / "deployments" / "d").exists():
        cli(home, "deploy", "rm", "d")
    cli(home, "deploy", "create", "d", "--base", "b")
    return {"size": size, "base": base, "home": home, "adapter": adapter, "dep": home / "deployments" / "d",
            "bare_dir": bare_copy(work, size), "create": [], "rm": [], "cli": [], "lib": [], "bare": [], "rollback": []}


def create_rm(r: dict[str, Any]) -> None:
    """``deploy create`` (copy of the base + one full hash) then ``deploy rm`` of a second deployment, CLI."""
    r["create"].append(cli(r["home"], "deploy", "create", "dc", "--base", "b"))
    r["rm"].append(cli(r["home"], "deploy", "rm", "dc"))


def rollback_lib(r: dict[str, Any]) -> float:
    """In process: apply the adapter (not timed), then time ``rollback`` to the event before it."""
    from adapterhub.apply import deployments
    from adapterhub.workspace import Workspace

    with Workspace.open(r["home"]) as ws:
        before = deployments.get(ws, "d").events - 1  # the last event's number (events count from 0)
        deployments.apply(ws, "d", "a@1")
        t0 = time.perf_counter()
        deployments.rollback(ws, "d", before)
        return time.perf_counter() - t0


def cycle_cli(r: dict[str, Any]) -> float:
    return cli(r["home"], "deploy", "apply", "d", "a@1") + cli(r["home"], "deploy", "revert", "d")


def cycle_lib(r: dict[str, Any]) -> float:
    from adapterhub.apply import deployments
    from adapterhub.workspace import Workspace

    with Workspace.open(r["home"]) as ws:
        t0 = time.perf_counter()
        deployments.apply(ws, "d", "a@1")
        deployments.revert(ws, "d")
        return time.perf_counter() - t0


def finish_size(r: dict[str, Any]) -> dict[str, Any]:
    from adapterhub import format as fmt
    from adapterhub.apply import deployments
    from adapterhub.workspace import Workspace

    with Workspace.open(r["home"]) as ws:
        t0 = time.perf_counter()
        ok = deployments.verify(ws, "d")["ok"]
        t_verify = time.perf_counter() - t0
    # one sha256 pass over every weights file: what the design before issue 19 paid twice per apply, revert or
    # rollback (the folder's identity fingerprint before and after the patch)
    t0 = time.perf_counter()
    _sha256_files(sorted(r["dep"].glob("*.safetensors")))
    t_sha = time.perf_counter() - t0
    nnz = sum(p.nnz for p in fmt.load_file(r["adapter"]).params.values())
    nbytes = sum(f.stat().st_size for f in r["base"].glob("*.safetensors"))
    med = {k: statistics.median(r[k]) if r[k] else float("nan") for k in ("cli", "lib", "bare", "create", "rm",
                                                                          "rollback")}
    return {**r, **med, "shards": len(list(r["base"].glob("*.safetensors"))), "bytes": nbytes, "nnz": nnz,
            "pages": pages_touched(r["dep"], r["adapter"]), "verify": t_verify, "verify_ok": ok, "sha256_pass": t_sha}


def run_size(work: Path, size: str, repeat: int) -> dict[str, Any]:
    """One size on its own (``scale.py --with-deploy``'s hook): warm-up, ``repeat`` CLI cycles, ``repeat``
    in-process cycles each with the bare patch right after it. JSON-able."""
    r = setup_size(work, size)
    cycle_cli(r)
    bare_patch(r["bare_dir"], r["adapter"])
    for _ in range(repeat):
        r["cli"].append(cycle_cli(r))
    for _ in range(repeat):
        r["lib"].append(cycle_lib(r))
        r["bare"].append(bare_patch(r["bare_dir"], r["adapter"]))
    for _ in range(repeat):
        r["rollback"].append(rollback_lib(r))
        create_rm(r)
    out = finish_size(r)
    out["lib_over_bare"] = out["lib"] / out["bare"]
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def load_line() -> str:
    """The machine's load (``uptime``'s averages), recorded beside the figures."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapterhub-deploy-scale"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="135m,1.1b")
    ap.add_argument("--build-only", action="store_true", help="Only build the checkpoints.")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    sizes = a.sizes.split(",")
    if a.build_only:
        for s in sizes:
            build(a.work / f"llama-{s}", s)
        return
    print(f"start: {load_line()}", flush=True)
    runs = [setup_size(a.work, s) for s in sizes]
    for r in runs:  # warm-up cycle: page cache, bytecode
        cycle_cli(r)
        bare_patch(r["bare_dir"], r["adapter"])
    # the sizes alternate within each repetition, so that a change in the machine's load hits both alike
    for _ in range(a.repeat):
        for r in runs:
            r["cli"].append(cycle_cli(r))
            print(f"{r['size']}: CLI apply+revert {r['cli'][-1]:.2f} s", file=sys.stderr, flush=True)
    for _ in range(a.repeat):
        for r in runs:
            r["lib"].append(cycle_lib(r))
            r["bare"].append(bare_patch(r["bare_dir"], r["adapter"]))
            print(f"{r['size']}: in-process {r['lib'][-1]:.2f} s, bare {r['bare'][-1]:.2f} s", file=sys.stderr, flush=True)
    for _ in range(a.repeat):
        for r in runs:
            r["rollback"].append(rollback_lib(r))
            create_rm(r)
            print(f"{r['size']}: rollback {r['rollback'][-1]:.2f} s, CLI create {r['create'][-1]:.2f} s, "
                  f"rm {r['rm'][-1]:.2f} s", file=sys.stderr, flush=True)
    rows = [finish_size(r) for r in runs]
    print("| base | shards | weights | nnz | 4 KiB pages touched | CLI apply+revert | in-process apply+revert | bare patch "
          "| in-process / bare | in-process rollback (one layer) | CLI deploy create | CLI deploy rm | deploy verify "
          "| one sha256 pass over the weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['shards']} | {r['bytes'] / 1e9:.2f} GB | {r['nnz']:,} | {r['pages']:,} | {r['cli']:.2f} s "
              f"| {r['lib']:.2f} s | {r['bare']:.2f} s | {r['lib'] / r['bare']:.2f}x | {r['rollback']:.2f} s "
              f"| {r['create']:.2f} s | {r['rm']:.2f} s | {r['verify']:.2f} s ({'ok' if r['verify_ok'] else 'FAILED'}) "
              f"| {r['sha256_pass']:.2f} s |")
    print()
    for r in rows[1:]:  # each size against the first (the target is stated for 1.1B against 135M)
        target = " (target <= 1.5x)" if (rows[0]["size"], r["size"]) == ("135m", "1.1b") else ""
        print(f"CLI apply+revert {r['size']} / {rows[0]['size']}: {r['cli'] / rows[0]['cli']:.2f}x{target}; "
              f"in-process: {r['lib'] / rows[0]['lib']:.2f}x; pages touched: {r['pages'] / rows[0]['pages']:.2f}x")
    for r in rows:
        v = r["lib"] / r["bare"]
        print(f"{r['size']}: in-process apply+revert / bare patch {v:.2f}x (target <= 1.5x: {'met' if v <= 1.5 else 'NOT met'})")
    print("\npeak RSS of each CLI command (median over its runs): " + ", ".join(
        f"{cmd} {statistics.median(kb) / 1024:.0f} MiB" for cmd, kb in sorted(PEAK_KB.items())))
    print(f"warm page cache, medians of {a.repeat} runs; python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; end: {load_line()}")


if __name__ == "__main__":
    main()

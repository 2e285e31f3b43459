"""Scale (issue 19): what the catalog, merge, export, diff and Hub operations cost on 135M and 1.1B bases.

Builds synthetic sharded bf16 Llama checkpoints locally (random weights, nothing downloaded;
``save_pretrained(max_shard_size="500MB")``): SmolLM2-135M shapes and TinyLlama-1.1B shapes (hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 KV heads). For each size and for 1% and 0.1% adapters on the
seven projections (random positions, bf16 values, i.e. 4 bytes per non-zero), it measures in one run:

* ``base add`` (fingerprints the folder) vs a plain sha256 of the same weight files;
* ``register`` of a canonical file vs a plain sha256 + copy (+ fsync) of the same file (target <= 1.2x);
* ``merge`` of 4 experts with TIES (``--density 0.5``) and ``uniform-sparse``: wall time, peak RSS of the
  timed merges above the process's RSS after a warm-up merge (imports and allocator caches are not the
  merge's), as a multiple of the experts' total file size (target <= 2x); the
  union of the previous implementation (a boolean mark + int32 prefix sum over every element) is timed
  once in the same run as the "before" figure;
* ``export --format peft`` and ``diff`` (lazy, one tensor at a time);
* on disk, in process: ``deploy apply``, ``revert``, ``rollback`` (one layer) and ``verify`` of the expert on a
  deployment of the base, and the anchor of apply + revert, the bare patch of the same entries (target <= 1.5x;
  ``benchmarks/deploy_scale.py`` has the CLI, ``create``/``rm`` and the same non-zeros at every size);
* ``push`` and ``pull`` against the test Hub server (adapterhub.testing.hubserver) vs raw
  ``upload_folder`` / ``snapshot_download`` of the same files (targets <= 1.1x; catalog time of a pull,
  from the "registering" progress step to the end, < 0.1 s).

Every operation runs in a child process (so its peak RSS is its own: ``VmHWM``), with one torch thread
(``--threads``), a warm-up
call first, then the median of ``--repeat`` calls (warm page cache; all figures are warm-cache). Ratios
are printed against anchors measured in the same child.

Usage:  nice -n 10 .venv/bin/python benchmarks/scale.py [--sizes 135m,1.1b] [--repeat 3]
        [--work /tmp/adapterhub-scale] [--json docs/bench/scale.json] [--with-deploy]
``--sizes 135m`` is the quick run. ``--sizes 8b`` (Llama-3-8B shapes, 16 GB in bf16, 4 shards; written tensor by
tensor, see :func:`_build_streamed`) needs ~40 GB free and more memory than the page cache can give it here: run it
with ``--ops`` (docs/bench/scale_8b.md gives the commands). ``--with-deploy`` adds the deployment half's figures
(``benchmarks/deploy_scale.py``'s ``run_size(work, size, repeat)``, same checkpoints) to the JSON under
``deploy``; :func:`add_section` is the hook for any other measurement that wants to join the same run.
The checkpoints and homes are kept under ``--work`` and reused (delete the folder to rebuild).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SHAPES: dict[str, dict[str, Any]] = {
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    "1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False},
    # Llama-3-8B shapes (16 GB in bf16): written tensor by tensor (:func:`_build_streamed`), never held whole
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
}
NEEDS_GIB = {"1.1b": 12, "8b": 40}  # free space a run of that size needs (checkpoint, deployment, adapters, homes)
STREAMED = {"8b": "5GB"}  # size -> shard size: built by _build_streamed (as Meta-Llama-3-8B ships: 4 shards of <= 5 GB)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DENSITIES = (0.01, 0.001)
EXPERTS = 4

# -- the hook: other measurements join the same run and the same JSON ----------------------------------------
SECTIONS: dict[str, Callable[[Path, str, int], dict[str, Any]]] = {}


def add_section(name: str, fn: Callable[[Path, str, int], dict[str, Any]]) -> None:
    """Add a measurement to the run: ``fn(work, size, repeat)`` is called once per size after ours, and its
    JSON-able result is stored as ``doc[name][size]`` (``--with-deploy`` adds ``deploy_scale.run_size``)."""
    SECTIONS[name] = fn


# -- fixtures: checkpoints, adapters, homes -----------------------------------------------------------------------

def build(folder: Path, size: str) -> None:
    """A random bf16 Llama of shape ``size`` saved sharded into ``folder`` (skipped if it is there)."""
    if (folder / "config.json").is_file():
        return
    if size in STREAMED:
        return _build_streamed(folder, size)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[size], max_position_embeddings=2048)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialised in bf16 directly (no fp32 copy of 1.1B weights)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="500MB")
    del model
    tmp.rename(folder)


def _build_streamed(folder: Path, size: str) -> None:
    """:func:`build` for a model too big to hold twice in this machine's memory: the tensor names and shapes are
    those of ``LlamaForCausalLM`` (instantiated on the meta device), each tensor is made on its own (normal(0, 0.02)
    weights, as ``transformers`` initialises them; norms all ones) and written shard by shard with
    ``safetensors.torch.save_file``, with ``save_pretrained``'s file names, index (``model.safetensors.index.json``)
    and ``config.json``. Peak memory is one shard (``STREAMED[size]``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[size], max_position_embeddings=8192, torch_dtype="bfloat16")
    with torch.device("meta"):
        specs = [(n, tuple(t.shape)) for n, t in LlamaForCausalLM(cfg).state_dict().items()]
    limit = int(float(STREAMED[size].removesuffix("GB")) * 1e9)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for n, shape in specs:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append((n, shape))
        used += nbytes
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else
                       torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)) for n, shape in shard}
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n, _ in shard})
    total = sum(2 * math.prod(shape) for _, shape in specs)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg.save_pretrained(tmp)
    tmp.rename(folder)


def make_adapter(base: Path, fingerprint: str, density: float, seed: int, out: Path) -> None:
    """A canonical adapter file: random positions at ``density`` on the seven projections, bf16 values, and
    a card that ``register`` keeps as it is (base, task, kind), so register takes the canonical path."""
    import torch

    from adapterhub import format as fmt
    from adapterhub.bases.sources import tensor_shapes

    g = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in sorted(tensor_shapes(base).items()):
        if not (name.endswith(".weight") and any(f".{p}." in name for p in PROJ)):
            continue
        numel = shape[0] * shape[1]
        idx = torch.unique(torch.randint(0, numel, (max(1, round(numel * density)),), generator=g))
        vals = (torch.randn(idx.numel(), generator=g) * 1e-3).to(torch.bfloat16)
        params[name] = fmt.SparseParam(tuple(shape), idx, vals)
    card = {"base": {"name": "b", "fingerprint": fingerprint}, "task": "t", "kind": "expert",
            "mask": {"method": "random", "density": density, "granularity": "element", "targets": list(PROJ)}}
    fmt.save_file(fmt.SparseAdapter(params, {}, card), out)


def prepare(work: Path, size: str) -> dict[str, Any]:
    """Checkpoint, a home with the base and 4 experts per density registered, the adapter files."""
    from adapterhub.workspace import Workspace

    base = work / f"llama-{size}"
    build(base, size)
    home = work / f"home-{size}"
    ws = Workspace.open(home)
    try:
        try:
            info = ws.get_base("b")
        except Exception:  # first run: add it
            info = ws.add_base("b", str(base))
        files: dict[str, list[str]] = {}
        refs: dict[str, list[str]] = {}
        register_file: dict[str, str] = {}
        for d in DENSITIES:
            key = f"{d:g}"
            files[key], refs[key] = [], []
            # the register measurement's own file, never registered here: each timed register writes a new blob
            # (as the anchor writes a new file), not a second name for bytes the store already holds
            f = work / f"adapter-{size}-{key}-register.safetensors"
            if not f.exists():
                make_adapter(base, info.fingerprint, d, 99, f)
            register_file[key] = str(f)
            for s in range(EXPERTS):
                f = work / f"adapter-{size}-{key}-{s}.safetensors"
                if not f.exists():
                    make_adapter(base, info.fingerprint, d, s, f)
                files[key].append(str(f))
                v = ws.register(f, name=f"e{key.replace('.', '_')}-{s}", task="t", base="b")
                refs[key].append(v.ref)
    finally:
        ws.close()
    dst_home = work / f"home-dst-{size}"
    dst = Workspace.open(dst_home)
    try:
        try:
            dst.get_base("b")
        except Exception:  # first run: add it
            dst.add_base("b", str(base))
    finally:
        dst.close()
    return {"base": str(base), "home": str(home), "dst_home": str(dst_home), "files": files, "refs": refs,
            "register_file": register_file}


# -- child-side measurements -------------------------------------------------------------------------------------

def _status_kb(field: str, pid: int | str = "self") -> int:
    """A field of /proc/<pid>/status in KiB: VmRSS (now) or VmHWM (peak of this process image; unlike
    getrusage's ru_maxrss it is not inherited from the parent across exec). 0 if absent (e.g. an exited
    process). Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


MEM: dict[str, int] = {}  # the measured operation's memory (KiB): RSS after its warm-up, peak of its timed runs


def _reset_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    MEM["rss0"] = _status_kb("VmRSS")


def _median(fn: Callable[[], Any], repeat: int, after: Callable[[], Any] | None = None,
            measure: bool = False) -> float:
    """Warm-up call, then the median of ``repeat`` calls; ``after`` runs untimed after each call. With
    ``measure``, the peak RSS of the timed calls above the RSS after the warm-up goes into MEM (so imports
    and caches that the first call fills are not counted, only what the operation itself holds)."""
    ts = []
    for i in range(repeat + 1):
        if i == 1 and measure:
            _reset_peak()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if after is not None:
            after()
        if i:
            ts.append(dt)
    if measure:
        MEM["peak"] = _status_kb("VmHWM")
    return statistics.median(ts)


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
    return h.hexdigest()


def _copy_hash_fsync(src: Path, dst: Path) -> None:
    """The register anchor: read the file, sha256 it, write it to a new file and fsync it (as a store write)."""
    data = src.read_bytes()
    hashlib.sha256(data).hexdigest()
    with open(dst, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def child(op: str, cfg: dict[str, Any], key: str, repeat: int, threads: int = 1) -> dict[str, Any]:
    """Run one operation group in this (fresh) process; returns its figures."""
    import torch  # imported before the baseline RSS is read: every operation needs it

    torch.set_num_threads(threads)

    from adapterhub.workspace import Workspace

    base, home = Path(cfg["base"]), Path(cfg["home"])
    refs = cfg["refs"][key] if key else []
    out: dict[str, Any] = {}
    ws = Workspace.open(home)
    rss0 = _status_kb("VmRSS")

    def drop(ref: str) -> None:
        ws.remove(ref)
        ws.gc()

    if op == "base_add":
        weights = sorted(base.glob("*.safetensors"))

        def add() -> None:
            tmp = Path(tempfile.mkdtemp(dir=home.parent))
            w = Workspace.open(tmp / "h")
            try:
                w.add_base("b", str(base))
            finally:
                w.close()
                shutil.rmtree(tmp)

        out["seconds"] = _median(add, repeat, measure=True)
        out["anchor_sha256"] = _median(lambda: _sha256_files(weights), repeat)
        out["bytes"] = sum(p.stat().st_size for p in weights)
        out["ratio"] = out["seconds"] / out["anchor_sha256"]
    elif op == "register":
        f = Path(cfg["register_file"][key])
        made: list[str] = []
        out["seconds"] = _median(lambda: made.append(ws.register(f, name="reg", task="t", base="b").ref), repeat,
                                 after=lambda: drop(made.pop()), measure=True)
        copy_to = home.parent / "anchor-copy.safetensors"
        out["anchor_sha256_copy_fsync"] = _median(lambda: _copy_hash_fsync(f, copy_to), repeat,
                                                  after=lambda: copy_to.unlink())
        out["bytes"] = f.stat().st_size
        out["ratio"] = out["seconds"] / out["anchor_sha256_copy_fsync"]
    elif op in ("merge_ties", "merge_uniform_sparse", "merge_ties_old_union"):
        from adapterhub.merging import merge

        method, dens = ("ties", 0.5) if op.startswith("merge_ties") else ("uniform-sparse", None)
        if op == "merge_ties_old_union":  # the implementation before issue 19, timed once as "before"
            from adapterhub.merging import methods as mm
            from adapterhub.testing.reference import dense_mark_union

            mm._union = dense_mark_union
            repeat = 1
        made = []
        out["seconds"] = _median(lambda: made.append(merge(ws, refs, method, name="m", density=dens).ref), repeat,
                                 after=lambda: drop(made.pop()), measure=True)
        experts = sum(ws.resolve(r).size_bytes for r in refs)
        out["experts_bytes"] = experts
        out["nnz_in"] = sum(ws.resolve(r).nnz for r in refs)
    elif op == "export_peft":
        import peft  # noqa: F401 - imported before timing: export reads its version

        from adapterhub.interop.export import export_version

        dest = home.parent / "export-peft"
        out["seconds"] = _median(lambda: export_version(ws, refs[0], dest, to="peft"), repeat,
                                 after=lambda: shutil.rmtree(dest), measure=True)
        out["adapter_bytes"] = ws.resolve(refs[0]).size_bytes
    elif op == "diff":
        from adapterhub.views.diff import diff_versions

        out["seconds"] = _median(lambda: diff_versions(ws, refs[0], refs[1]), repeat, measure=True)
    elif op == "memory":
        out.update(_in_memory(base, Path(cfg["files"][key][0]), repeat, DEVICE))
    elif op == "deploy":
        out.update(_deploy(ws, refs[0], repeat))
        from adapterhub.apply import deploy_folders

        deploy_folders.remove(ws, DEPLOYMENT)  # its copy of the weights is not kept beside the bare patch's
        out.update(_bare(base, Path(cfg["files"][key][0]), repeat))  # refs[0] was registered from files[key][0]
    elif op in ("hub", "hub_nodelay"):
        dst = Workspace.open(Path(cfg["dst_home"]))
        try:
            out.update(_hub(ws, dst, home, refs[0], repeat, nodelay=op == "hub_nodelay"))
        finally:
            dst.close()
    else:
        raise SystemExit(f"unknown op {op}")
    ws.close()
    out["rss_at_start_mb"] = rss0 / 1024
    if "peak" in MEM:
        out["rss_after_warmup_mb"] = MEM["rss0"] / 1024
        out["peak_rss_mb"] = MEM["peak"] / 1024
        out["peak_above_warm_mb"] = (MEM["peak"] - MEM["rss0"]) / 1024
        if "experts_bytes" in out:
            out["peak_over_experts"] = (MEM["peak"] - MEM["rss0"]) * 1024 / out["experts_bytes"]
    return out


def _in_memory(base: Path, adapter_file: Path, repeat: int, device: str) -> dict[str, Any]:
    """apply_adapter + revert on the base's tensors held in memory (on ``device``), warm: the adapter is
    read and the tensors loaded first; the first apply (which, off the CPU, moves the indices and values to
    the device once) is timed apart, then the median of ``repeat`` cycles."""
    import torch
    from safetensors import safe_open

    from adapterhub import format as fmt
    from adapterhub.apply.patching import apply_adapter, revert, state_fingerprint
    from benchutil import first_apply_seconds  # benchmarks/ is the script's folder, so on sys.path

    adapter = fmt.load(adapter_file.read_bytes())
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] \
        if (base / "model.safetensors.index.json").is_file() else {n: "model.safetensors" for n in adapter.params}
    tensors: dict[str, Any] = {}
    for shard in sorted({index[n] for n in adapter.params}):
        with safe_open(str(base / shard), "pt") as f:
            for n in adapter.params:
                if index[n] == shard:
                    tensors[n] = f.get_tensor(n).to(device)
    fp0 = state_fingerprint(tensors)

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    def cycle() -> None:
        revert(tensors, apply_adapter(tensors, adapter))
        sync()

    first_apply = first_apply_seconds(tensors, adapter, device)
    # A cycle of the 0.1% adapter is tens of milliseconds: with only ``repeat`` of them one hiccup of the machine
    # moves the median (and the 1% ÷ 0.1% ratio) by half. So, as timeit's autorange does, the cycles are
    # repeated until they add up to MEMORY_MIN_SECONDS (at least ``repeat``, at most MEMORY_MAX_CYCLES).
    t0 = time.perf_counter()
    cycle()
    one = time.perf_counter() - t0
    cycles = max(repeat, min(MEMORY_MAX_CYCLES, math.ceil(MEMORY_MIN_SECONDS / max(one, 1e-6))))
    secs = _median(cycle, cycles)
    if state_fingerprint(tensors) != fp0:
        raise SystemExit("in-memory apply + revert did not restore the weights bit for bit")
    return {"seconds": secs, "first_apply_s": first_apply, "device": device, "nnz": adapter.nnz,
            "cycles": cycles, "exact": True}


def _deploy(ws: Any, ref: str, repeat: int) -> dict[str, Any]:
    """On disk, in process: ``apply`` and ``revert`` of this density's expert on a new deployment of the base
    (``benchmarks/deploy_scale.py`` times ``deploy create`` and ``rm`` and the same non-zeros at both sizes; it
    says why each run starts from new files), ``rollback`` of one layer (its apply untimed), and ``verify`` (a full
    measurement). Checks that the stack ends empty at the base's state root."""
    from adapterhub.apply import deploy_folders, deployments

    name = DEPLOYMENT
    if name in {d.name for d in deployments.list_deployments(ws)}:
        deploy_folders.remove(ws, name)
    deployments.create(ws, name, "b")
    times: dict[str, list[float]] = {"apply": [], "revert": []}

    def cycle() -> None:
        t0 = time.perf_counter()
        deployments.apply(ws, name, ref)
        t1 = time.perf_counter()
        deployments.revert(ws, name)
        times["apply"].append(t1 - t0)
        times["revert"].append(time.perf_counter() - t1)

    cycle_s = _median(cycle, repeat, measure=True)

    def rollback() -> float:
        before = deployments.get(ws, name).events - 1
        deployments.apply(ws, name, ref)
        t0 = time.perf_counter()
        deployments.rollback(ws, name, before)
        return time.perf_counter() - t0

    rollback_s = statistics.median([rollback() for _ in range(repeat)])
    t0 = time.perf_counter()
    ok = deployments.verify(ws, name)["ok"]
    verify_s = time.perf_counter() - t0
    info = deployments.get(ws, name)
    if not ok or info.stack or info.state_root != info.base_state_root:
        raise SystemExit("deploy: the deployment did not end at the base's state, verified")
    return {"seconds": cycle_s, "apply_s": statistics.median(times["apply"][1:]),
            "revert_s": statistics.median(times["revert"][1:]), "rollback_s": rollback_s, "verify_s": verify_s}


def _bare(base: Path, adapter_file: Path, repeat: int) -> dict[str, Any]:
    """The anchor of ``_deploy``'s apply + revert: the bare patch of the same entries (``deploy_scale.bare_patch``:
    gather, add, scatter into the memory-mapped shards, msync + fsync, then the originals back; no hashing, no
    record, no catalog) on a new copy of the base's weights files (``deploy_scale.bare_copy``). Timed after the
    deployment's cycles, not between them: at 8B the two 16 GB copies do not both fit in the page cache, and
    alternating would make each find the other's pages evicted. A warm-up patch, then the median of ``repeat``."""
    from deploy_scale import bare_copy, bare_patch  # benchmarks/ is the script's folder, so on sys.path

    size = base.name.removeprefix("llama-")
    folder = base.parent / f"bare-{size}"
    try:
        bare_copy(base.parent, size)
        bare_patch(folder, adapter_file)
        secs = statistics.median(bare_patch(folder, adapter_file) for _ in range(repeat))
    finally:  # 16 GB at 8B, not kept: the copy, or a copy that failed half-way (a full disk)
        for left in (folder, folder.with_name(folder.name + ".tmp")):
            shutil.rmtree(left, ignore_errors=True)
    return {"bare_s": secs}


def _stamp(stamps: list[tuple[str, float]], msg: str) -> None:
    stamps.append((msg, time.perf_counter()))


def _hub(ws: Any, dst: Any, home: Path, ref: str, repeat: int, *, nodelay: bool) -> dict[str, Any]:
    """push/pull through adapterhub vs raw upload_folder/snapshot_download of the same files."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    from adapterhub.hub.client import pull, push
    from adapterhub.testing.hubserver import HubServer

    disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(dir=home.parent))
    server = HubServer(record_bodies=False, nodelay=nodelay).start()
    api = HfApi(endpoint=server.url, token=False)
    t_push, t_raw_up, t_raw_tag, t_pull, t_raw_down, t_cat = [], [], [], [], [], []
    t_prep, t_tag_record = [], []
    try:
        for i in range(repeat + 1):
            if i == 1:
                _reset_peak()
            repo = f"bench/ah-{i}"
            pstamps: list[tuple[str, float]] = []
            t0 = time.perf_counter()
            res = push(ws, ref, repo=repo, endpoint=server.url, progress=functools.partial(_stamp, pstamps))
            end = time.perf_counter()
            dt_push = end - t0
            # the push's own work around its requests: before the first (catalog read, card, the weights' sha256,
            # which upload_folder computes too) and from the tag request on (tag + the catalog's durable record)
            dt_prep = next(t for m, t in pstamps if m.startswith("creating")) - t0
            dt_tag_record = end - next(t for m, t in pstamps if m.startswith("tagging"))
            folder = tmp / f"raw-{i}"
            folder.mkdir()
            for p in ("adapter.safetensors", "adapterhub.json", "README.md"):
                (folder / p).write_bytes(server.file_bytes(repo, res.commit, p))
            t0 = time.perf_counter()
            api.create_repo(f"bench/raw-{i}", exist_ok=True)
            up = api.upload_folder(repo_id=f"bench/raw-{i}", folder_path=folder, commit_message="raw")
            dt_raw_up = time.perf_counter() - t0
            # the one request a push makes beyond the anchor: its tag, timed apart (not in the anchor)
            t0 = time.perf_counter()
            api.create_tag(f"bench/raw-{i}", tag="v1", revision=up.oid, tag_message="raw")
            dt_raw_tag = time.perf_counter() - t0
            # pull into a second home that has the base but not this adapter (as a fresh home would)
            stamps: list[tuple[str, float]] = []
            t0 = time.perf_counter()
            got = pull(dst, f"{repo}@v1", name="pulled", endpoint=server.url, cache_dir=tmp / f"cache-ah-{i}",
                       progress=functools.partial(_stamp, stamps))
            end = time.perf_counter()
            dt_pull = end - t0
            reg = next((t for m, t in stamps if m.startswith("registering")), end)
            t0 = time.perf_counter()
            snapshot_download(f"bench/raw-{i}", endpoint=server.url, cache_dir=tmp / f"cache-raw-{i}")
            dt_raw_down = time.perf_counter() - t0
            if got.registered:
                dst.remove(got.ref)
                dst.gc()
            if i:
                t_push.append(dt_push)
                t_raw_up.append(dt_raw_up)
                t_raw_tag.append(dt_raw_tag)
                t_prep.append(dt_prep)
                t_tag_record.append(dt_tag_record)
                t_pull.append(dt_pull)
                t_raw_down.append(dt_raw_down)
                t_cat.append(end - reg)
        MEM["peak"] = _status_kb("VmHWM")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    return {"push": med(t_push), "raw_upload_folder": med(t_raw_up), "push_ratio": med(t_push) / med(t_raw_up),
            "raw_create_tag": med(t_raw_tag), "push_before_first_request": med(t_prep),
            "push_tag_and_record": med(t_tag_record),
            "push_ratio_with_tag": med(t_push) / (med(t_raw_up) + med(t_raw_tag)),
            "pull": med(t_pull), "raw_snapshot_download": med(t_raw_down),
            "pull_ratio": med(t_pull) / med(t_raw_down), "pull_catalog_s": med(t_cat),
            "pull_ratio_without_catalog": (med(t_pull) - med(t_cat)) / med(t_raw_down)}


# -- parent ---------------------------------------------------------------------------------------------------

def run_child(op: str, cfg: dict[str, Any], key: str, repeat: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", op, "--cfg", json.dumps(cfg), "--key", key, "--repeat", str(repeat),
           "--threads", str(THREADS), "--device", DEVICE]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_DISABLE_XET": "1",  # the local server speaks LFS
           "HF_HOME": str(Path(cfg["home"]).parent / "hf_home")}
    for k in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        env.pop(k, None)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{op} failed:\n{r.stderr[-3000:]}")
    doc: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return doc


DEPLOYMENT = "scale"  # the deployment the deploy operation makes (and removes) in each size's home
THREADS = 1  # torch intra-op threads in the children (--threads)
DEVICE = "cpu"  # where the in-memory apply + revert runs (--device)
MEMORY_MIN_SECONDS = 2.0  # the in-memory cycles are repeated until their timed total reaches this
MEMORY_MAX_CYCLES = 60
ONLY: tuple[str, ...] = ()  # --ops: a subset of OPS (printed, not written to the docs)
OPS = ("memory", "register", "merge_ties", "merge_uniform_sparse", "merge_ties_old_union", "export_peft", "diff", "hub",
       "hub_nodelay", "deploy")
PER_SIZE_OPS = ("base_add",)  # once per size, not per density (a full run, or --ops)
LATE_OPS = ("deploy",)  # run after every other operation of the size (see run_size)


def run_size(work: Path, size: str, repeat: int, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = prepare(work, size)
    base = Path(cfg["base"])
    out: dict[str, Any] = {"size": size, "shards": len(list(base.glob("*.safetensors"))),
                           "weights_bytes": sum(p.stat().st_size for p in base.glob("*.safetensors"))}
    if not ONLY or "base_add" in ONLY:
        out["base_add"] = run_child("base_add", cfg, "", repeat)
        log(f"{size} base add: {out['base_add']['seconds']:.2f} s ({out['base_add']['ratio']:.2f}x sha256)")
    for d in DENSITIES:
        key = f"{d:g}"
        from adapterhub import format as fmt

        with fmt.open_adapter(cfg["files"][key][0]) as r:
            nnz = sum(int(r.doc["params"][n]["nnz"]) for n in r.keys())
        res: dict[str, Any] = {"nnz": nnz, "file_bytes": Path(cfg["files"][key][0]).stat().st_size}
        res["bytes_per_nnz"] = res["file_bytes"] / nnz
        out[key] = res
    # A deploy (GBs of weights read, patched and fsynced at 1.1B) ran right before the next density's in-memory
    # cycles, which were slower then (0.075 s against 0.046 s a run before): every other operation of every
    # density first, then the deploys, so no measurement follows one.
    ops = [op for op in ONLY if op in OPS] if ONLY else OPS
    for group in ([op for op in ops if op not in LATE_OPS], [op for op in ops if op in LATE_OPS]):
        for d in DENSITIES:
            key = f"{d:g}"
            for op in group:
                out[key][op] = run_child(op, cfg, key, repeat)
                log(f"{size} {d:.1%} {op}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in out[key][op].items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="135m,1.1b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapterhub-scale"))
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "scale.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "bench" / "scale.md",
                    help="the docs/benchmarks.md fragment written from the JSON (then run benchmarks/collect.py)")
    ap.add_argument("--md-only", action="store_true", help="only rewrite --md from the existing --json")
    ap.add_argument("--with-deploy", action="store_true",
                    help="also run benchmarks/deploy_scale.py's run_size on the same checkpoints")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per operation (default 1: on shared cores, spinning OpenMP threads "
                         "measure the neighbours, not us; the anchors are single-threaded too)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the in-memory apply + revert runs (the other operations are CPU and disk work)")
    ap.add_argument("--ops", default="", help=f"only these operations, comma-separated "
                    f"({', '.join((*PER_SIZE_OPS, *OPS))}); "
                    "the figures are printed as JSON and the docs are not touched")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--key", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global THREADS, DEVICE, ONLY
    THREADS, DEVICE = args.threads, args.device
    ONLY = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    if unknown := set(ONLY) - {*PER_SIZE_OPS, *OPS}:
        raise SystemExit(f"unknown operation(s) {', '.join(sorted(unknown))}; use {', '.join((*PER_SIZE_OPS, *OPS))}")
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.cfg), args.key, args.repeat, args.threads)))
        return
    if args.md_only:
        args.md.write_text(fragment(json.loads(args.json.read_text())))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SHAPES:
            raise SystemExit(f"unknown size {s!r}; use {', '.join(SHAPES)}")
    args.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work).free
    need = max((NEEDS_GIB.get(s, 0) for s in sizes), default=0)
    if free < need * 2**30:
        raise SystemExit(f"{args.work}: {free / 2**30:.1f} GiB free; the run needs about {need} GiB")
    if args.with_deploy:
        sys.path.insert(0, str(Path(__file__).parent))
        import deploy_scale

        add_section("deploy", lambda work, size, repeat: deploy_scale.run_size(work, size, repeat))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    doc: dict[str, Any] = {"command": ".venv/bin/python benchmarks/scale.py --sizes "
                                      f"{','.join(sizes)} --repeat {args.repeat} --threads {args.threads}"
                                      + (f" --device {args.device}" if args.device != "cpu" else ""),
                           "cpus": os.cpu_count(), "threads": args.threads, "warm_cache": True,
                           "load_average_at_start": os.getloadavg()[0], "sizes": {}}
    for s in sizes:
        doc["sizes"][s] = run_size(args.work, s, args.repeat, log)
        for name, fn in SECTIONS.items():
            doc.setdefault(name, {})[s] = fn(args.work, s, args.repeat)
    doc["load_average_at_end"] = os.getloadavg()[0]
    if ONLY:
        print(json.dumps(doc, indent=1, sort_keys=True))
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    args.md.write_text(fragment(doc))
    print(summary(doc))


def fragment(doc: dict[str, Any]) -> str:
    """The docs/bench/scale.md fragment: command, setting, tables (docs/benchmarks.md via collect.py)."""
    return "\n".join([
        "# Scale: 135M and 1.1B bases (issue 19)", "",
        f"Command: `{doc['command']}` (figures: `docs/bench/scale.json`).", "",
        "Synthetic sharded bf16 Llama checkpoints built locally (random weights, `save_pretrained(max_shard_size="
        "\"500MB\")`): SmolLM2-135M shapes and TinyLlama-1.1B shapes. Adapters: random positions at 1% and 0.1% of "
        "the seven projections, bf16 values (4 B per non-zero + header). Each operation runs in its own process, "
        f"one torch thread, a warm-up call then the median of the timed calls; warm page cache throughout. "
        f"{doc['cpus']} CPU cores (load average {doc.get('load_average_at_start', 0):.1f} at the start, "
        f"{doc.get('load_average_at_end', float('nan')):.1f} at the end, the run's own processes included; on a "
        "shared machine absolute times are pessimistic and noisy; the run's shell was given priority with "
        "`echo -10 > /proc/$$/autogroup`; each ratio's two sides ran back to back in the same process).", "",
        "Columns: *register ÷ sha256+copy* — `Workspace.register(file)` of a canonical file (validated while "
        "read, stored without re-serialising, hashed once, catalog row committed) against reading, hashing "
        "and writing + fsyncing the same bytes (target ≤ 1.2×); *TIES merge* / *uniform-sparse* — `merge` of 4 "
        "experts (TIES at `--density 0.5`) into the catalog; *before* — the same TIES merge with the previous "
        "union (a boolean mark + int32 prefix sum over every element of each tensor), timed once in the same "
        "run; *merge peak ÷ experts* — peak RSS of the timed merges above the process's RSS after a warm-up "
        "merge, over the 4 experts' total file size (worse of the two methods; target ≤ 2×); *push / pull ÷ "
        "raw* — against `upload_folder` / `snapshot_download` of the same three files on the test Hub server "
        "(targets ≤ 1.1×), measured twice: with the server answering under Nagle's algorithm (its reply's headers "
        "and body are two small writes and the client's delayed ACK holds the body back: about 40 ms per request "
        "with a body, as a network round trip would cost — the setting of every earlier run) and with TCP_NODELAY "
        "(about 1 ms per request: only the two sides' own work counts); *pull catalog* — from the \"registering\" "
        "step to the end (target < 0.1 s).", "",
        summary(doc), "", *verdicts(doc), "",
        "The same targets in the previous run (an earlier version, the same machine): register 1.08-9.74x, push "
        "1.00-1.05x (40 ms) / 1.03-1.35x (1 ms), pull 0.42-0.70x (40 ms) / 0.75-0.97x (1 ms), pull catalog time "
        "0.007-0.010 s, in memory 1% ÷ 0.1% at 1.1B 6.6×, on disk apply + revert ÷ bare 0.96-1.42×; the run before "
        "it: register 0.99-9.15x, push 0.93-1.02x / 1.09-1.28x, pull 0.40-0.73x / 0.59-1.18x, pull catalog time "
        "0.004-0.007 s, in memory 6.8×; the one before that: register 0.92-8.63x, push 0.92-1.02x / 1.06-1.23x, "
        "pull 0.41-0.70x / 0.68-0.95x, in memory 7.1×; an earlier one (another machine of the same kind): register "
        "0.98-14.51x, push 1.00-1.01x / 1.08-1.19x, in memory 8.5×. The millisecond figures move between "
        "runs by more than the code changes them: `register` of the 0.5 MB file, the old and the new code "
        "alternating in one sitting, gave 8.5, 8.4, 9.2 ms (old) against 8.6, 8.2, 9.7 ms (new), while three runs of "
        "this page measured it at 7.8, 17 and 9 ms; `snapshot_download` of the 4.3 MB adapter at ~1 ms per request, "
        "the anchor of a pull, took 28, 34 and 25 ms in three runs. An earlier round's run gave 4.6× there "
        "(0.494 s / 0.107 s, each the median of 3 cycles; two re-runs right after it gave 8.4× and 7.7×): the 0.1% "
        "side is a few tens of milliseconds, so with 3 cycles one hiccup of 30 ms moved the ratio by half, and the "
        "in-memory cycles are now repeated until they add up to "
        f"{MEMORY_MIN_SECONDS:g} s (at least `--repeat`, at most {MEMORY_MAX_CYCLES}; the count is `cycles` in the "
        "JSON) and the median of those is reported.", "",
        "What `register` of a canonical file does: it reads the file once; its sha256 (the content hash) runs on a "
        "second thread while the file is validated on views of its bytes (gap coding, escapes, ranges, finite "
        "values; no index is decoded) and the mask hash is taken over the file's own index bytes (definition 2, "
        "`adapterhub/maskhash.py`); for a file of 1 MiB or more the store's copy is written and fsynced on a third "
        "thread at the same time (a staged temp file, renamed into place once the checks pass), then the row is "
        "committed. The anchor reads, hashes, writes and fsyncs the same bytes, one after the other. On the small "
        "files the target is missed on CPU work whose size does not follow the file's: the strict parse of the "
        "adapter's header and card, the scan of each parameter, the canonical-header check and the mask hash (about "
        "4.5 ms for the 210 tensors at 135M), and the catalog's read and insert transactions through the ORM (about "
        "3 ms; a bare SQLite commit in WAL mode, fsynced, costs 0.1-0.2 ms). The durability the anchor does not "
        "pay (the blob's rename and directory fsync, the commit) is 0.2-0.3 ms: `benchmarks/register_floor.py` "
        "measures each part against the same anchor ([register floor](register_floor.md)).",
        "",
        "Push and pull: counted on the test server, a push to a repo this catalog never pushed to makes 8 requests "
        "(create_repo, validate_yaml, preupload, LFS batch, upload, verify, commit, tag), as many as `create_repo` "
        "+ `upload_folder` (which does not tag); a push to an existing repo first lists its refs (no tag may move, "
        "a lost commit is not repeated). The weights are hashed once, by the upload, and checked against the "
        "version's content hash before the first request; the catalog is read once (one transaction of three "
        "statements: version, tags, metrics, base, lineage, earlier pushes) and the push recorded by one UPDATE. "
        "A pull makes 2 requests (one GET of the card and one of "
        "the weights, each checked on its own headers before its body is read: no HEAD) against "
        "`snapshot_download`'s 10 (info, tree, 4 x HEAD + GET); the weights stream straight into a staged temp file "
        "of the store, hashed and written as they arrive (on a second thread from 16 MiB; the anchor writes its "
        "cache file and hashes nothing; the disk write-back is started every 8 MiB behind the download, so the "
        "final fsync waits only for the tail), then the pull validates them while the staged file is fsynced, and "
        "the registration inserts the rows, renames the file into place inside that transaction (the Hub cache "
        "gets a hard link; no dry run: a refusal comes before the rename) and commits. With ~1 ms per request the "
        "ratios measure the two sides' own work, and ours does more of it (the sha256, a durable store write, the "
        "card, the catalog).", *_push_split(doc),
        "In memory: `apply_adapter` + `revert` on the base's seven projections held as tensors (warm: loaded, the "
        "adapter read, a first apply timed apart); the ratio of the 1% adapter to the 0.1% adapter on the 1.1B "
        "model is the target (≥ 5×). On a GPU (`--device cuda`, not run here: no GPU was lent) the indices and "
        "values are moved to the device on the first apply and kept (`SparseParam.flat_on`).", "",
        "Export (`export --format peft`) and `diff` read the adapter one tensor at a time, and the export writes "
        "its file as it produces it (the run before this one held the decoded adapter and the whole file: 287 MB "
        "above warm-up at 1.1B 1%, 35 MB at 135M 1%); their times are in the JSON with their peak RSS. `base add` fingerprints every weight file once (sha256 of the bytes), so it "
        "follows the model by design: the anchor is a plain sha256 of the same files.", ""])


def _push_split(doc: dict[str, Any]) -> list[str]:
    """Where a push's time beyond its anchor goes at ~1 ms per request (a paragraph; none for runs before the
    split was timed)."""
    rows = [(s, k, r[k]["hub_nodelay"]) for s, r in doc["sizes"].items() for k in (f"{d:g}" for d in DENSITIES)
            if "hub_nodelay" in r.get(k, {})]
    if not rows or not all("push_tag_and_record" in h for _, _, h in rows):
        return [""]
    ms = lambda x: f"{x * 1e3:.1f}"
    parts = "; ".join(
        f"{s} at {float(k):.1%}: push {ms(h['push'])} ms = {ms(h['push_before_first_request'])} before the first "
        f"request + {ms(h['push'] - h['push_before_first_request'] - h['push_tag_and_record'])} of upload + "
        f"{ms(h['push_tag_and_record'])} from the tag request on, against {ms(h['raw_upload_folder'])} ms for "
        f"`create_repo` + `upload_folder` and {ms(h['raw_create_tag'])} ms for a bare `create_tag`"
        for s, k, h in rows)
    s, k, h = max(rows, key=lambda r: r[2]["push_ratio"])
    return ["", "Where a push's time goes at ~1 ms per request (from its own progress messages, medians): " + parts
            + ". Before the first request: the catalog read, the card, and the weights' sha256 (which "
            "`upload_folder` computes too, inside the anchor); from the tag request on: the tag, which the anchor "
            "does not make, and the catalog's durable record (one UPDATE, committed and fsynced). Where the ratio "
            f"is worst ({s} at {float(k):.1%}) the ≤ 1.1× target allows {ms(h['raw_upload_folder'] * 0.1)} ms "
            f"beyond the anchor; the push takes {ms(h['push'] - h['raw_upload_folder'])} ms more, of which the tag "
            f"request alone is {ms(h['raw_create_tag'])} ms.", ""]


def verdicts(doc: dict[str, Any]) -> list[str]:
    """One line per target: the worst measured ratio and whether it is met."""
    rows = [(s, k, r[k]) for s, r in doc["sizes"].items() for k in (f"{d:g}" for d in DENSITIES)]
    if not rows:
        return []

    def worst(f: Callable[[dict[str, Any]], float]) -> tuple[float, str]:
        v, s, k = max((f(x), s, k) for s, k, x in rows)
        return v, f"{s} at {float(k):.1%}"

    lines = ["Targets (worst case over sizes and densities, this run):", ""]
    for label, f, target in (
            ("merge peak memory ÷ experts' total size", lambda x: max(x["merge_ties"]["peak_over_experts"],
                                                                       x["merge_uniform_sparse"]["peak_over_experts"]), 2.0),
            ("register of canonical bytes ÷ sha256 + copy", lambda x: x["register"]["ratio"], 1.2),
            ("push ÷ upload_folder, ~40 ms per request", lambda x: x["hub"]["push_ratio"], 1.1),
            ("pull ÷ snapshot_download, ~40 ms per request", lambda x: x["hub"]["pull_ratio"], 1.1),
            ("push ÷ upload_folder, ~1 ms per request (TCP_NODELAY)", lambda x: x["hub_nodelay"]["push_ratio"], 1.1),
            ("pull ÷ snapshot_download, ~1 ms per request (TCP_NODELAY)", lambda x: x["hub_nodelay"]["pull_ratio"],
             1.1),
            ("pull catalog time (s)", lambda x: x["hub"]["pull_catalog_s"], 0.1)):
        v, where = worst(f)
        lines.append(f"* {label}: {v:.2f} ({where}); target ≤ {target:g}: {'met' if v <= target else 'NOT met'}")
    if all("push_ratio_with_tag" in x["hub_nodelay"] for _, _, x in rows):  # runs before it was timed: none
        v, where = worst(lambda x: x["hub_nodelay"]["push_ratio_with_tag"])
        tag = max(x["hub_nodelay"]["raw_create_tag"] for _, _, x in rows)
        lines.append(f"* push ÷ (upload_folder + create_tag), ~1 ms per request: {v:.2f} ({where}); the anchor "
                     f"makes no tag, a push must (one request, up to {tag * 1e3:.1f} ms here); no target of its own")
    if all("bare_s" in x.get("deploy", {}) for _, _, x in rows):  # runs before the anchor was timed: none
        v, where = worst(lambda x: x["deploy"]["seconds"] / x["deploy"]["bare_s"])
        lines.append(f"* on disk, apply + revert ÷ the bare patch of the same entries: {v:.2f} ({where}); "
                     f"target ≤ 1.5: {'met' if v <= 1.5 else 'NOT met'}")
    for s, r in doc["sizes"].items():
        if s == "1.1b" and all("memory" in r[f"{d:g}"] for d in DENSITIES):
            v = r["0.01"]["memory"]["seconds"] / r["0.001"]["memory"]["seconds"]
            dev = r["0.01"]["memory"]["device"]
            lines.append(f"* in memory ({dev}), apply + revert of the 1% adapter ÷ of the 0.1% adapter at 1.1b: "
                         f"{v:.1f}×; target ≥ 5: {'met' if v >= 5 else 'NOT met'}")
    speed = [(x["merge_ties_old_union"]["seconds"] / x["merge_ties"]["seconds"], s, k) for s, k, x in rows]
    lines.append("* TIES merge, previous union ÷ now: " + ", ".join(f"{v:.1f}× ({s} at {float(k):.1%})"
                                                                  for v, s, k in speed))
    return lines


def summary(doc: dict[str, Any]) -> str:
    """The figures as a Markdown table (what docs/benchmarks.md shows)."""
    lines = ["| size | density | nnz | B/nnz | register (s) | ÷ sha256+copy | TIES merge (s) | before (s) | "
             "uniform-sparse (s) | merge peak ÷ experts | export peft (s) | diff (s) | push ÷ raw (40 ms / 1 ms) | "
             "pull ÷ raw (40 ms / 1 ms) | pull catalog (s) |", "|" + "---|" * 15]
    for s, r in doc["sizes"].items():
        for key in (f"{d:g}" for d in DENSITIES):
            x = r[key]
            peak = max(x["merge_ties"]["peak_over_experts"], x["merge_uniform_sparse"]["peak_over_experts"])
            lines.append(
                f"| {s} | {float(key):.1%} | {x['nnz']:,} | {x['bytes_per_nnz']:.2f} | {x['register']['seconds']:.3f} | "
                f"{x['register']['ratio']:.2f}x | {x['merge_ties']['seconds']:.2f} | "
                f"{x['merge_ties_old_union']['seconds']:.2f} | {x['merge_uniform_sparse']['seconds']:.2f} | "
                f"{peak:.2f}x | {x['export_peft']['seconds']:.2f} | {x['diff']['seconds']:.3f} | "
                f"{x['hub']['push_ratio']:.2f}x / {x['hub_nodelay']['push_ratio']:.2f}x | "
                f"{x['hub']['pull_ratio']:.2f}x / {x['hub_nodelay']['pull_ratio']:.2f}x | "
                f"{x['hub']['pull_catalog_s']:.3f} |")
    lines.append("")
    lines.append("| size | weights | shards | base add (s) | ÷ sha256 of the files |")
    lines.append("|---|---|---|---|---|")
    for s, r in doc["sizes"].items():
        b = r["base_add"]
        lines.append(f"| {s} | {r['weights_bytes'] / 1e9:.2f} GB | {r['shards']} | {b['seconds']:.2f} | {b['ratio']:.2f}x |")
    dep = [(s, r) for s, r in doc["sizes"].items() if all("deploy" in r[f"{d:g}"] for d in DENSITIES)]
    if dep:
        bare = all("bare_s" in r[f"{d:g}"]["deploy"] for _, r in dep for d in DENSITIES)  # runs before it: none
        lines += ["", "On disk, in process, one deployment of the base per size (medians; warm page cache):", "",
                  "| size | density | nnz | apply (s) | revert (s) | apply + revert (s) | "
                  + ("bare patch (s) | apply + revert ÷ bare (target ≤ 1.5×) | " if bare else "")
                  + "rollback, one layer (s) | verify, full measurement (s) | "
                  "peak RSS above warm-up (MB; counts the mapped weight pages touched) |",
                  "|" + "---|" * (11 if bare else 9)]
        for s, r in dep:
            for key in (f"{d:g}" for d in DENSITIES):
                x = r[key]["deploy"]
                anchor = f"{x['bare_s']:.3f} | {x['seconds'] / x['bare_s']:.2f}× | " if bare else ""
                lines.append(f"| {s} | {float(key):.1%} | {r[key]['nnz']:,} | {x['apply_s']:.3f} | {x['revert_s']:.3f} | "
                             f"{x['seconds']:.3f} | {anchor}{x['rollback_s']:.3f} | {x['verify_s']:.2f} | "
                             f"{x['peak_rss_mb'] - x['rss_after_warmup_mb']:.1f} |")
    rss_ops = ("register", "merge_ties", "merge_uniform_sparse", "export_peft", "diff", "hub_nodelay")
    lines += ["", "Peak RSS of each operation above its process's RSS after a warm-up call (MB; the imports and the "
              "warm-up's allocations are not counted, so the figure is what the timed calls themselves held):", "",
              "| size | density | adapter file (MB) | register | TIES merge | uniform-sparse merge | export peft | diff | "
              "push + pull (and the test server, same process) | base add (per size) |", "|" + "---|" * 10]
    for s, r in doc["sizes"].items():
        b = r["base_add"]
        for key in (f"{d:g}" for d in DENSITIES):
            x = r[key]
            cells = [f"{x[op]['peak_rss_mb'] - x[op]['rss_after_warmup_mb']:.1f}" if "peak_rss_mb" in x.get(op, {})
                     else "-" for op in rss_ops]
            lines.append(f"| {s} | {float(key):.1%} | {x['file_bytes'] / 1e6:.1f} | " + " | ".join(cells) + " | "
                         + (f"{b['peak_rss_mb'] - b['rss_after_warmup_mb']:.1f} |" if "peak_rss_mb" in b else "- |"))
    mem = [(s, r) for s, r in doc["sizes"].items() if all("memory" in r[f"{d:g}"] for d in DENSITIES)]
    if mem:
        lines += ["", "| size | device | in memory apply + revert, 1% (s) | 0.1% (s) | 1% ÷ 0.1% | cycles timed "
                  "(1% / 0.1%) | first apply, 1% (s) |", "|---|---|---|---|---|---|---|"]
        for s, r in mem:
            a, b = r["0.01"]["memory"], r["0.001"]["memory"]
            lines.append(f"| {s} | {a['device']} | {a['seconds']:.3f} | {b['seconds']:.4f} | "
                         f"{a['seconds'] / b['seconds']:.1f}× | {a.get('cycles', '-')} / {b.get('cycles', '-')} | "
                         f"{a['first_apply_s']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

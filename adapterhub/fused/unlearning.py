"""FUSED unlearning (Zhong et al., CVPR 2025): critical layers, a sparse unlearning adapter, metrics.

The trained global model is never modified. To forget a client, a class or some samples:

1. **Critical layers.** While ``fed train`` trains the global model, each client reports in the
   last round, per layer it trained and for the task head (in FUSED the classifier is a layer
   like any other), the L1 distance between its local model and the global model it started
   from. The score of layer ``l`` is ``Σ_k (n_k/n)·‖θ_k^l − θ^l‖₁``; the top ``K`` layers are
   the critical layers. The per-client numbers are stored with the global version, so
   ``unlearn`` ranks without any extra round (over all clients, or with ``rerank`` over the
   remaining clients only).
2. **Unlearning adapter.** A seeded random mask of ``density`` on each of the ``K`` layers — the
   head too when it is among them, as sparse values on top of the global head — whose values
   (deltas over the *global model's* weights) are trained with FedAvg on the remaining clients'
   data only; the forgotten rows are never read, the base and the global model stay frozen.
   Training stops by the same rule as the retraining baseline: when the validation loss on
   remaining data has not improved for ``patience`` rounds (the best round is kept).
   ``deploy apply <global>`` then ``deploy apply <unlearning>`` gives the unlearned model;
   reverting the second restores the global model bit for bit.
3. **Metrics.** RA (accuracy on remaining test data), FA (accuracy on the forgotten data), a
   loss-threshold membership attack (:mod:`adapterhub.fused.mia`: AUC and TPR at 1% FPR of
   forgotten training rows against held-out rows of the same distribution), wall time, bytes
   down and up per client and compute (local steps, examples); with ``compare_retrain`` the
   same for retraining from scratch without the forgotten data, to convergence by the same rule.

Baselines, named and documented, never the default: ``head="reset"`` re-initialises the task head
and trains it densely on remaining data (what earlier releases did, and where their forgetting
came from), ``head="train"`` fine-tunes it densely, ``head="freeze"`` never adapts it;
``selection="random"`` picks K random layers instead of the critical ones; ``layers=0`` with a
dense head mode is the head-only control (:func:`train_unlearning`).

Forget specs: ``client:ID``, ``class:LABEL`` (name or id), ``samples:FILE`` (one train-row id or
exact text per line).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..data.tasks import TaskData
    from ..workspace import Workspace

from .. import format as fmt
from ..errors import AdapterHubError, TrainingError, UnlearningError
from ..training import masks as M
from ..training.config import UNLEARN_DEFAULTS as _UD
from .federated import (
    DEFAULT_LAYER_REGEX,
    HEAD_LAYER,
    VALUE_BYTES,
    Example,
    FedConfig,
    Federation,
    FedModel,
    FedStats,
    ProgressFn,
    RoundRunner,
    StopRule,
    fedavg,
    layer_l1_distances,
    load_global,
    rank_layers,
    sparse_delta_state,
    sparse_head_state,
    state_to_adapter,
    train_global,
)
from .mia import membership

FORGET_KINDS = ("client", "class", "samples")
HEAD_MODES = ("ranked", "reset", "train", "freeze")
SELECTIONS = ("critical", "random")
HEAD_TEXT = {"ranked": "a layer like any other: sparse deltas on the global head when it ranks among the K layers",
             "reset": "baseline: re-initialised and trained densely on the remaining data",
             "train": "baseline: the global head fine-tuned densely on the remaining data",
             "freeze": "baseline: the global head, never adapted"}


# ---------------------------------------------------------------------------- forget specs

@dataclass(frozen=True)
class ForgetSpec:
    """A parsed ``--forget`` value: kind ``client``|``class``|``samples`` and its argument."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def parse_forget(spec: str) -> ForgetSpec:
    """Parse ``client:ID``, ``class:LABEL`` or ``samples:FILE``; raises UnlearningError otherwise."""
    kind, sep, value = (spec or "").partition(":")
    if not sep or kind not in FORGET_KINDS or not value.strip():
        raise UnlearningError(f"bad forget spec {spec!r}; use client:ID, class:LABEL or samples:FILE")
    return ForgetSpec(kind, value.strip())


@dataclass
class ForgetPlan:
    """What to forget and what remains, per client.

    Attributes:
        remaining: (client id, rows to train with) for every client that keeps at least one row.
        forgotten_train: the forgotten training rows (FA on client/samples; the attack's members).
        ra_rows, fa_rows: evaluation rows for RA and FA.
        val_rows: validation rows of the remaining data (the stopping rule's loss).
        nonmembers: held-out rows from the forgotten rows' distribution (the attack's non-members).
        record: JSON for the catalog (spec, what was matched).
    """

    spec: ForgetSpec
    remaining: list[tuple[int, list[Example]]]
    forgotten_train: Callable[[], list[Example]]
    ra_rows: list[Example]
    fa_rows: Callable[[], list[Example]]
    val_rows: list[Example]
    nonmembers: Callable[[], list[Example]]
    record: dict[str, Any] = field(default_factory=dict)


def label_matched(rows: list[Example], pool: list[Example], seed: int) -> list[Example]:
    """Held-out rows with the label mix of ``rows``: for each row, an unused ``pool`` row of the same
    label (the pool seeded-shuffled); rows whose label is exhausted get none."""
    by_label: dict[int, list[Example]] = {}
    shuffled = list(pool)
    random.Random(f"nonmembers/{int(seed)}").shuffle(shuffled)
    for r in shuffled:
        by_label.setdefault(r[1], []).append(r)
    out = []
    for _, lab in rows:
        left = by_label.get(lab)
        if left:
            out.append(left.pop())
    return out


def _read_samples_file(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UnlearningError(f"samples file {path!r} does not exist")
    try:
        lines = [ln.rstrip("\n") for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UnlearningError(f"samples file {path!r} is not UTF-8 text") from None
    out = [ln.strip() for ln in lines if ln.strip()]
    if not out:
        raise UnlearningError(f"samples file {path!r} lists no samples")
    return out


def plan_forget(fed: Federation, spec: ForgetSpec) -> ForgetPlan:
    """Work out the remaining clients' rows for ``spec`` without touching forgotten clients' rows.

    Raises: UnlearningError for an unknown client, a class not in the task, samples not in the
        training data, or when nothing would remain to train with.
    """
    n = fed.n_clients
    if spec.kind == "client":
        try:
            cid = int(spec.value)
        except ValueError:
            raise UnlearningError(f"client id must be an integer, got {spec.value!r}") from None
        if not 0 <= cid < n:
            raise UnlearningError(f"no client {cid}: the federation has clients 0..{n - 1}")
        remaining = [(c, fed.client_rows(c)) for c in range(n) if c != cid]
        plan = ForgetPlan(spec, remaining, lambda: fed.client_rows(cid), list(fed.test), lambda: fed.client_rows(cid),
                          list(fed.validation), lambda: label_matched(fed.client_rows(cid), fed.test, fed.partition.seed),
                          {"spec": str(spec), "client": cid, "forgotten_rows": fed.partition.sizes[cid]})
    elif spec.kind == "class":
        if spec.value in fed.labels:
            lab = fed.labels.index(spec.value)
        elif spec.value.isdigit() and int(spec.value) < len(fed.labels):
            lab = int(spec.value)
        else:
            raise UnlearningError(f"class {spec.value!r} is not a label of task {fed.task!r} "
                                  f"(labels: {', '.join(fed.labels)})")
        remaining = []
        forgotten = 0
        for c in range(n):
            rows = fed.client_rows(c)
            keep = [r for r in rows if r[1] != lab]
            forgotten += len(rows) - len(keep)
            if keep:
                remaining.append((c, keep))
        plan = ForgetPlan(spec, remaining, lambda: [r for r in fed.train if r[1] == lab],
                          [r for r in fed.test if r[1] != lab], lambda: [r for r in fed.test if r[1] == lab],
                          [r for r in fed.validation if r[1] != lab], lambda: [r for r in fed.test if r[1] == lab],
                          {"spec": str(spec), "class": fed.labels[lab], "label_id": lab, "forgotten_rows": forgotten})
    else:
        wanted = _read_samples_file(spec.value)
        by_text: dict[str, list[int]] = {}
        for i, (t, _) in enumerate(fed.train):
            by_text.setdefault(t, []).append(i)
        ids: set[int] = set()
        for w in wanted:
            if w.isdigit() and int(w) < len(fed.train):
                ids.add(int(w))
            elif w in by_text:
                ids.update(by_text[w])
            else:
                raise UnlearningError(f"sample {w[:60]!r} from {spec.value} is neither a train-row id "
                                      f"(0..{len(fed.train) - 1}) nor the text of a training row")
        remaining = []
        for c in range(n):
            keep = [fed.train[i] for i in fed.partition.clients[c] if i not in ids]
            if keep:
                remaining.append((c, keep))
        rows = [fed.train[i] for i in sorted(ids)]
        import hashlib

        plan = ForgetPlan(spec, remaining, lambda: rows, list(fed.test), lambda: rows, list(fed.validation),
                          lambda: label_matched(rows, fed.test, fed.partition.seed),
                          {"spec": str(spec), "samples": len(ids),
                           "samples_sha256": hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()})
    if not plan.remaining:
        raise UnlearningError(f"forgetting {spec} leaves no remaining data to train the unlearning adapter with")
    return plan


def cap_rows(rows: list[Example], n: int | None) -> list[Example]:
    """At most ``n`` of ``rows``, evenly spaced (the evaluation cap; both engines use it)."""
    return _cap(rows, n)


def _cap(rows: list[Example], n: int | None) -> list[Example]:
    if n is None or len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def evaluate(model: FedModel, state: Mapping[str, torch.Tensor], plan: ForgetPlan, *,
             max_eval: int | None = None, nonmembers: list[Example] | None = None,
             batch_size: int = 64) -> dict[str, Any]:
    """RA, FA and the membership attack of ``model + state`` for ``plan`` (reads the forgotten rows:
    evaluation only). ``max_eval`` caps every row set (None: all rows); ``nonmembers`` overrides
    the plan's held-out rows (e.g. backdoored test rows)."""
    ra = model.accuracy(state, _cap(plan.ra_rows, max_eval), batch_size)
    fa_rows = _cap(plan.fa_rows(), max_eval)
    fa = model.accuracy(state, fa_rows, batch_size)
    out: dict[str, Any] = {"ra": ra, "fa": fa, "ra_n": len(_cap(plan.ra_rows, max_eval)), "fa_n": len(fa_rows)}
    mia = membership(model, state, _cap(plan.forgotten_train(), max_eval),
                     _cap(nonmembers if nonmembers is not None else plan.nonmembers(), max_eval), batch_size)
    if mia is not None:
        out.update({"mia_auc": mia.auc, "mia_tpr_at_1pct_fpr": mia.tpr_at_1pct_fpr, "mia_members": mia.members,
                    "mia_nonmembers": mia.nonmembers})
    return out


# ---------------------------------------------------------------------------- unlearning

def fresh_head_state(model: FedModel, seed: int) -> dict[str, torch.Tensor]:
    """A newly initialised head (normal(0, 0.02) weights from ``seed``, zero bias): the ``reset`` baseline."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    if model.head is None:
        raise UnlearningError("this model has no task head to re-initialise")
    w = model.head.linear.weight
    return {"head:weight": torch.randn(tuple(w.shape), generator=g) * 0.02,
            "head:bias": torch.zeros(model.head.linear.out_features)}


def stop_rule(model: FedModel, plan: ForgetPlan, patience: int, max_rows: int | None = None,
              batch_size: int = 64) -> StopRule | None:
    """The stopping rule shared by FUSED and retraining: validation loss on the remaining data
    (``plan.val_rows``), ``patience`` rounds without improvement (0: no stopping)."""
    if patience <= 0:
        return None
    rows = _cap(plan.val_rows, max_rows)
    if not rows:
        raise UnlearningError("no validation rows of the remaining data to stop on; use --patience 0")
    return StopRule(lambda st: model.mean_loss(st, rows, batch_size), len(rows), patience=patience)


def select_layers(ranking: list[dict[str, Any]], k: int, *, head: str, selection: str, seed: int,
                  salt: str = "") -> list[str]:
    """The K layers the unlearning adapter trains: the top K of the ranking (``critical``) or K
    seeded random ones (``random``, the ablation). The head is a candidate only in ``ranked`` mode
    (the dense-head baselines handle it themselves). Raises UnlearningError when K is too large."""
    cands = [r["layer"] for r in ranking if head == "ranked" or r["layer"] != HEAD_LAYER]
    if k > len(cands):
        raise UnlearningError(f"layers={k} is larger than the {len(cands)} ranked layers", keywords=("layers",))
    if selection == "critical":
        return cands[:k]
    if selection == "random":
        picked = set(random.Random(f"random-layers/{int(seed)}/{salt}").sample(cands, k))
        return [c for c in cands if c in picked]
    raise UnlearningError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")


def selection_salt(plan: ForgetPlan) -> str:
    """What the random-layer draw depends on besides the seed: the request's content (for samples the
    sha256 of the forgotten row ids, never the file's path), so the same request draws the same layers."""
    return f"{plan.spec.kind}:{plan.record.get('samples_sha256', plan.spec.value)}"


def unlearning_state(model: FedModel, layers: list[str], *, density: float, seed: int, head: str
                     ) -> dict[str, torch.Tensor]:
    """The unlearning adapter's starting state (and ``model.index``, its masks): seeded random-mask zero
    deltas on ``layers`` (the head's as sparse deltas when ``"head"`` is one), plus the dense head of a
    baseline ``head`` mode. The nodes of the Flower engine call it too, so masks never travel.
    Raises UnlearningError when nothing would be trained."""
    body = [x for x in layers if x != HEAD_LAYER]
    state = sparse_delta_state(model, body, density, seed, mask="random") if body else {}
    if HEAD_LAYER in layers:
        state.update(sparse_head_state(model, density, seed))
    if head == "train":  # starts from the global model's head (loaded by apply_adapter)
        state.update(model.head_state())
    elif head == "reset":
        state.update(fresh_head_state(model, seed))
    if not state:
        raise UnlearningError("nothing to train: choose at least one layer or a dense head baseline")
    return state


def train_unlearning(model: FedModel, plan: ForgetPlan, cfg: FedConfig, layers: list[str], *, density: float,
                     seed: int, head: str, stop: StopRule | None, progress: ProgressFn | None = None,
                     runner: RoundRunner | None = None, min_clients: int = 1) -> tuple[dict[str, torch.Tensor], FedStats]:
    """Train the unlearning state on ``plan.remaining`` with FedAvg: sparse random-mask deltas on
    ``layers`` (the head's as sparse deltas when ``"head"`` is one of them), plus the dense head
    of a baseline ``head`` mode. ``model`` holds the global model (weights and head). ``runner``: who
    runs the clients' rounds (default: in this process; see :func:`~adapterhub.fused.federated.fedavg`).
    Returns (state, stats). Raises UnlearningError when nothing would be trained."""
    state = unlearning_state(model, layers, density=density, seed=seed, head=head)
    ids = [c for c, _ in plan.remaining]
    rows = [r for _, r in plan.remaining]
    return fedavg(model, state, rows, cfg, client_ids=ids, salt="unlearn", progress=progress, desc="unlearning",
                  stop=stop, runner=runner, min_clients=min_clients)


@dataclass
class UnlearnResult:
    adapter: fmt.SparseAdapter
    state: dict[str, torch.Tensor]
    ranking: list[dict[str, Any]]
    critical: list[str]
    stats: FedStats
    plan: ForgetPlan
    metrics: dict[str, Any]
    training_config: dict[str, Any]
    state_index: dict[str, torch.Tensor] = field(default_factory=dict)  # the masks: state key -> flat indices


def check_request(fed: Federation, spec: ForgetSpec, k: int, density: float, rounds: int, *, head: str = "ranked",
                  selection: str = "critical") -> ForgetPlan:
    """Validate everything about an unlearning request before any training. Raises UnlearningError."""
    if head not in HEAD_MODES:
        raise UnlearningError(f"head must be one of {', '.join(HEAD_MODES)}, got {head!r}")
    if selection not in SELECTIONS:
        raise UnlearningError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
    if k < 1:
        raise UnlearningError(f"layers must be at least 1, got {k}", keywords=("layers",))
    try:
        M.check_density(density)
    except TrainingError as e:
        raise UnlearningError(str(e)) from None
    if rounds < 1:
        raise UnlearningError(f"rounds must be at least 1, got {rounds}", keywords=("rounds",))
    return plan_forget(fed, spec)


def check_ranking(ranking: list[dict[str, Any]], trained: set[str]) -> None:
    """The ranking must cover exactly the layers the global model trained (plus, optionally, the head)."""
    known = {r["layer"] for r in ranking} - {HEAD_LAYER}
    if known != trained:
        raise UnlearningError("the recorded critical-layer ranking does not match the layers the global model trained")


def cost_of(stats: FedStats, seconds: float) -> dict[str, Any]:
    """The cost figures of one FedAvg run as stored in metrics."""
    return {"seconds": round(seconds, 3), "rounds": stats.rounds, "best_round": stats.best_round,
            "bytes_up_per_client": stats.bytes_up_per_client, "bytes_down_per_client": stats.bytes_down_per_client,
            "bytes_per_client": stats.bytes_per_client, "bytes_total": stats.bytes_total,
            "local_steps": stats.local_steps, "train_examples": stats.train_examples,
            "eval_examples": stats.eval_examples}


def retrain(base_path: Path, fed: Federation, cfg: FedConfig, plan: ForgetPlan, *, density: float, rounds: int,
            patience: int, layer_regex: str = DEFAULT_LAYER_REGEX, max_eval: int | None = None,
            nonmembers: list[Example] | None = None, progress: ProgressFn | None = None) -> dict[str, Any]:
    """The anchor: retrain the global recipe from scratch on the remaining data, up to ``rounds``
    rounds, stopping by :func:`stop_rule`; returns its metrics and costs."""
    remaining = dict(plan.remaining)
    rcfg = FedConfig(**{**cfg.to_json(), "rounds": rounds})
    t1 = time.perf_counter()
    rmodel, rstate, rstats = train_global(base_path, fed, rcfg, density=density, exclude=lambda c: remaining.get(c, []),
                                          layer_regex=layer_regex, progress=progress, desc="retraining",
                                          stop=lambda m: stop_rule(m, plan, patience, max_eval))
    rsec = time.perf_counter() - t1
    r = evaluate(rmodel, rstate, plan, max_eval=max_eval, nonmembers=nonmembers)
    r.update(cost_of(rstats, rsec))
    return r


def run_unlearning(base_path: Path, global_adapter: fmt.SparseAdapter, fed: Federation, cfg: FedConfig,
                   spec: ForgetSpec, ranking: list[dict[str, Any]], *, ranking_source: str = "given",
                   layers: int = _UD.layers, density: float = _UD.density, rounds: int | None = None,
                   patience: int = _UD.patience, seed: int = _UD.seed, local_steps: int | None = None,
                   lr: float | None = None, head: str = _UD.head, selection: str = "critical",
                   evaluate_metrics: bool = True, evaluate_global: bool = True, compare_retrain: bool = False,
                   retrain_rounds: int | None = None, max_eval: int | None = _UD.max_eval,
                   nonmembers: list[Example] | None = None, global_ref: str = "", global_hash: str = "",
                   layer_regex: str = DEFAULT_LAYER_REGEX, progress: ProgressFn | None = None,
                   runner: Callable[[FedModel], RoundRunner] | None = None,
                   evaluator: Callable[[FedModel, list[Mapping[str, torch.Tensor]], ForgetPlan],
                                       list[dict[str, Any]]] | None = None,
                   min_clients: int = 1) -> UnlearnResult:
    """Build the FUSED unlearning adapter for ``spec`` over the global model (no catalog involved).

    Takes: the base folder, the global adapter (deltas over the base + head), its federation and
        FedAvg config, the forget spec, the recorded critical-layer ranking, K, density, rounds
        (at most; default: the global model's), the stopping patience (0: run every round), a
        seed, the head mode (``ranked`` = FUSED; the rest are baselines) and the layer selection
        (``critical`` = FUSED; ``random`` = the ablation).
    ``runner`` builds, for the model, who runs the clients' rounds and ``evaluator`` replaces
        :func:`evaluate` for a list of states (the Flower engine: the nodes train, and report counts and
        scores for the global and the unlearned model in one round).
    Returns: :class:`UnlearnResult`. With ``evaluate_metrics=False`` no forgotten row is ever read.
    Raises: UnlearningError for a bad request (before training).
    """
    task = fed.task
    model = FedModel(base_path, len(fed.labels), max_length=cfg.max_length, seed=cfg.seed, layer_regex=layer_regex)
    plan = check_request(fed, spec, layers, density, rounds or cfg.rounds, head=head, selection=selection)
    missing = [p for p in global_adapter.params if p not in model.layer_weights]
    if missing:
        raise UnlearningError(f"the global model adapts {missing[0]}, which is not one of the model's layers")
    check_ranking(ranking, set(global_adapter.params))
    critical = select_layers(ranking, layers, head=head, selection=selection, seed=seed, salt=selection_salt(plan))
    model.apply_adapter(global_adapter, head_task=task)  # the backbone now holds the global model's weights
    ucfg = FedConfig(**{**cfg.to_json(), "rounds": rounds or cfg.rounds, "seed": seed,
                        "local_steps": local_steps or cfg.local_steps, "lr": lr or cfg.lr})
    ucfg.check()
    stop = stop_rule(model, plan, patience, max_eval)
    t0 = time.perf_counter()
    state, stats = train_unlearning(model, plan, ucfg, critical, density=density, seed=seed, head=head, stop=stop,
                                    progress=progress, runner=runner(model) if runner is not None else None,
                                    min_clients=min_clients)
    seconds = time.perf_counter() - t0
    head_in_adapter = head in ("reset", "train") or HEAD_LAYER in critical
    body = [x for x in critical if x != HEAD_LAYER]
    head_rec: dict[str, Any] = {"mode": head, "text": HEAD_TEXT[head], "stored": head_in_adapter}
    if HEAD_LAYER in critical:
        head_rec.update({"delta_density": density,
                         "delta_values": int(sum(int(model.index[k].numel()) for k in ("hdelta:weight", "hdelta:bias")))})
    unl = {"forget": plan.record, "critical_layers": critical, "layers": layers, "density": density,
           "selection": selection, "ranking_source": ranking_source,
           "applies_on": {"ref": global_ref, "content_hash": global_hash}, "head": head_rec}
    card = {"mask": {"method": "random", "density": density, "granularity": "element", "targets": body,
                     "target_tensors": sorted(body)},
            "unlearning": unl}
    adapter = state_to_adapter(model, state, task=task, labels=fed.labels, kind="unlearning", card=card,
                               include_head=head_in_adapter)
    metrics: dict[str, Any] = {**cost_of(stats, seconds), "remaining_clients": len(plan.remaining)}
    if evaluate_metrics:
        states: list[Mapping[str, torch.Tensor]] = [{}, state] if evaluate_global else [state]
        if evaluator is not None:  # one federated evaluation round for both models
            scores = evaluator(model, states, plan)
        else:
            scores = [evaluate(model, st, plan, max_eval=max_eval, nonmembers=nonmembers) for st in states]
        if evaluate_global:
            metrics["global"] = scores[0]
        metrics.update(scores[-1])
        if compare_retrain:
            metrics["retrain"] = retrain(base_path, fed, cfg, plan, density=_density_of(global_adapter),
                                         rounds=retrain_rounds or 4 * cfg.rounds, patience=max(patience, 1),
                                         layer_regex=layer_regex, max_eval=max_eval, nonmembers=nonmembers,
                                         progress=progress)
    tc = {"forget": plan.record, "critical_layers": {"k": layers, "chosen": critical, "ranking": ranking,
                                                     "source": ranking_source, "selection": selection},
          "density": density, "seed": seed, "head": head, "fedavg": ucfg.to_json(), "federation": fed.to_json(),
          "stopping": stop.to_json() if stop is not None else {"rule": "none", "rounds": ucfg.rounds},
          "applies_on": {"ref": global_ref, "content_hash": global_hash}, "stats": stats.to_json()}
    index = {k: v.clone() for k, v in model.index.items() if ("delta:" + k) in state or k in state}
    return UnlearnResult(adapter, state, ranking, critical, stats, plan, metrics, tc, index)


def _density_of(adapter: fmt.SparseAdapter) -> float:
    d = (adapter.card.get("mask") or {}).get("density")
    return float(d) if d is not None else min(1.0, adapter.density)


def recorded_ranking(training_config: Mapping[str, Any], plan: ForgetPlan, *, rerank: bool
                     ) -> tuple[list[dict[str, Any]], str]:
    """The ranking ``fed train`` recorded: over every client, or (``rerank``) over the remaining ones.

    Versions trained before the per-client differences were recorded carry only a ranking of the
    encoder layers (no head); it is used as it is, and ``rerank`` is refused for them.
    Raises: UnlearningError when the version recorded nothing usable.
    """
    diffs = training_config.get("layer_differences")
    if isinstance(diffs, dict) and isinstance(diffs.get("per_client"), dict) and diffs["per_client"]:
        per_client = {str(k): {str(a): float(b) for a, b in v.items()} for k, v in diffs["per_client"].items()}
        sizes = {str(k): int(v) for k, v in (diffs.get("client_sizes") or {}).items()}
        if rerank:
            keep = [str(c) for c, _ in plan.remaining]
            return (rank_layers(layer_l1_distances(per_client, sizes, keep)),
                    f"{diffs.get('source', 'recorded')}: the {len(keep)} remaining clients")
        return rank_layers(layer_l1_distances(per_client, sizes)), f"{diffs.get('source', 'recorded')}: all clients"
    legacy = training_config.get("critical_layers")
    if isinstance(legacy, list) and legacy and not rerank:
        return [dict(r) for r in legacy], "legacy ranking recorded by an earlier fed train (no head)"
    raise UnlearningError("this global model recorded no per-layer client differences to rank the layers with; "
                          "train it again with `adapterhub fed train`")


def unlearn(ws: Workspace, ref: str, *, forget: str, name: str, layers: int = _UD.layers, density: float = _UD.density,
            rounds: int | None = None, patience: int = _UD.patience, seed: int = _UD.seed,
            local_steps: int | None = None, lr: float | None = None, compare_retrain: bool = False,
            retrain_rounds: int | None = None, rerank: bool = False, head: str = _UD.head,
            selection: str = "critical", max_eval: int | None = _UD.max_eval, progress: ProgressFn | None = None,
            data: TaskData | None = None) -> tuple[VersionInfo, UnlearnResult]:
    """Produce, evaluate and register a FUSED unlearning adapter for the global model ``ref``.

    Registered as kind ``unlearning`` with an ``unlearns`` lineage edge to ``ref``; the forget
    spec, the ranking used and the stopping rule go into its training config and card, the
    metrics (RA, FA, MIA AUC and TPR, time, bytes, compute; ``retrain`` with ``compare_retrain``)
    onto the version.
    Returns: (VersionInfo, UnlearnResult).
    Raises: UnlearningError/RefError/... before anything is registered.
    """
    req = prepare_unlearn(ws, ref, forget=forget, name=name, layers=layers, density=density, rounds=rounds, head=head,
                          selection=selection, rerank=rerank, data=data)
    res = run_unlearning(req.base_path, req.global_adapter, req.fed, req.cfg, req.spec, req.ranking,
                         ranking_source=req.ranking_source, layers=layers, density=density, rounds=rounds,
                         patience=patience, seed=seed, local_steps=local_steps, lr=lr, head=head, selection=selection,
                         compare_retrain=compare_retrain, retrain_rounds=retrain_rounds, max_eval=max_eval,
                         global_ref=req.info.ref, global_hash=req.info.content_hash, layer_regex=req.layer_regex,
                         progress=progress)
    return register_unlearning(ws, req, res.adapter, name, critical=res.critical, metrics=res.metrics,
                               training_config=res.training_config), res


@dataclass
class UnlearnRequest:
    """An unlearning request resolved against the catalog (what :func:`run_unlearning` needs).

    Attributes: the global version, its adapter, rebuilt federation (partition hash verified),
    FedAvg config and federation record, the parsed spec, the plan, the recorded ranking and its
    source, the base folder and the trained-layer regex.
    """

    info: VersionInfo
    global_adapter: fmt.SparseAdapter
    fed: Federation
    cfg: FedConfig
    record: dict[str, Any]
    spec: ForgetSpec
    plan: ForgetPlan
    ranking: list[dict[str, Any]]
    ranking_source: str
    base_path: Path
    layer_regex: str


def prepare_unlearn(ws: Workspace, ref: str, *, forget: str, name: str, layers: int = _UD.layers,
                    density: float = _UD.density, rounds: int | None = None, head: str = _UD.head,
                    selection: str = "critical", rerank: bool = False, data: TaskData | None = None) -> UnlearnRequest:
    """Check an unlearning request against the catalog before any training (both engines).

    Raises: UnlearningError/RefError/... ; nothing is written.
    """
    from ..catalog.names import validate_name

    validate_name(name, "adapter name")
    spec = parse_forget(forget)
    info, gadapter, fed, cfg, rec = load_global(ws, ref, data=data)
    try:
        existing = ws.resolve(name)
    except AdapterHubError:
        existing = None
    if existing is not None and existing.kind != "unlearning":
        raise UnlearningError(f"adapter {name!r} exists with kind {existing.kind}; choose another name",
                              keywords=("name",))
    binfo = ws.get_base(info.base)
    plan = check_request(fed, spec, layers, density, rounds or cfg.rounds, head=head, selection=selection)
    ranking, source = recorded_ranking(info.training_config or {}, plan, rerank=rerank)
    return UnlearnRequest(info, gadapter, fed, cfg, rec, spec, plan, ranking, source, Path(binfo.path),
                          rec.get("layer_regex") or DEFAULT_LAYER_REGEX)


def register_unlearning(ws: Workspace, req: UnlearnRequest, adapter: fmt.SparseAdapter, name: str, *,
                        critical: list[str], metrics: dict[str, Any], training_config: dict[str, Any]
                        ) -> VersionInfo:
    """Register an unlearning adapter as kind ``unlearning`` with its ``unlearns`` edge to the global version
    (both engines; the Flower engine adds its run record to ``training_config``, which is not part of the
    adapter's bytes, so the content hash does not depend on the engine)."""
    from ..catalog.records import Parent

    return ws.register(adapter, name=name, task=req.info.task, base=req.info.base, kind="unlearning",
                       parents=[Parent(req.info.ref, "unlearns", params={"forget": str(req.spec),
                                                                         "critical_layers": critical})],
                       metrics=metrics, training_config=training_config)


__all__ = ["ForgetSpec", "parse_forget", "ForgetPlan", "plan_forget", "layer_l1_distances", "rank_layers",
           "evaluate", "run_unlearning", "unlearn", "UnlearnResult", "check_request", "VALUE_BYTES", "HEAD_MODES",
           "SELECTIONS", "HEAD_TEXT", "select_layers", "train_unlearning", "retrain", "recorded_ranking",
           "stop_rule", "label_matched", "fresh_head_state", "unlearning_state", "cap_rows", "cost_of", "selection_salt", "UnlearnRequest",
           "prepare_unlearn", "register_unlearning"]

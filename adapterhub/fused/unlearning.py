"""FUSED unlearning (Zhong et al., CVPR 2025): critical layers, a sparse unlearning adapter, metrics.

The trained global model is never modified. To forget a client, a class or some samples:

1. **Critical layers.** One round in which every client trains the global model locally (all
   layer weights trainable); per layer ``l`` the score is ``Σ_k (n_k/n)·‖θ_k^l − θ^l‖₁`` (the L1
   distance between client ``k``'s layer and the global one, weighted by client data size).
   Layers are ranked by score; the top ``K`` are the critical layers. ``fed train`` computes the
   ranking with all clients and stores it with the global model (as the paper does during normal
   training); ``unlearn`` uses that ranking, or recomputes it on the remaining clients only.
2. **Unlearning adapter.** A seeded random mask of ``density`` on each of the ``K`` layers; the
   values (deltas over the *global model's* weights) are trained with FedAvg on the remaining data
   only — the forgotten client's rows, the forgotten class's rows, the forgotten samples are never
   read. The task head (the classifier, the layer that maps features to labels) is trained too,
   densely (a few thousand values): by default (``head="reset"``) it is re-initialised and
   trained on the remaining data only (``"train"`` fine-tunes the global head, ``"freeze"`` keeps
   it). The head is where a class's identity lives; overwriting it with remaining knowledge is what
   drives a forgotten class's logit down — with a frozen head the encoder deltas alone did not
   forget (see docs/unlearning.md). Everything else stays frozen. The result is a sparse adapter whose
   parameter names are base tensor names plus the new head as a dense extra
   (``heads.<task>.weight/bias``): ``deploy apply <global>`` then ``deploy apply <unlearning>``
   gives the unlearned encoder, evaluated with the unlearning version's head (``eval
   <unlearning> --deployment D``); reverting the second restores the global model bit for bit.
3. **Metrics.** RA (accuracy on remaining data), FA (accuracy on forgotten data), a
   shadow-model membership-inference attack success rate on the forgotten training rows, wall
   time and the bytes a client uploads; with ``compare_retrain`` the same for retraining the
   global model from scratch without the forgotten data.

Forget specs: ``client:ID``, ``class:LABEL`` (name or id), ``samples:FILE`` (one train-row id or
exact text per line).
"""
from __future__ import annotations

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
    VALUE_BYTES,
    Example,
    FedConfig,
    Federation,
    FedModel,
    FedStats,
    ProgressFn,
    fedavg,
    identify_critical_layers,
    layer_l1_distances,
    load_global,
    rank_layers,
    sparse_delta_state,
    state_to_adapter,
    train_global,
)
from .mia import MembershipAttack

FORGET_KINDS = ("client", "class", "samples")
HEAD_MODES = ("reset", "train", "freeze")


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
        forgotten_train: the forgotten training rows (for the attack and FA on client/samples).
        ra_rows, fa_rows: evaluation rows for RA and FA.
        record: JSON for the catalog (spec, what was matched).
    """

    spec: ForgetSpec
    remaining: list[tuple[int, list[Example]]]
    forgotten_train: Callable[[], list[Example]]
    ra_rows: list[Example]
    fa_rows: Callable[[], list[Example]]
    record: dict[str, Any] = field(default_factory=dict)


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

        plan = ForgetPlan(spec, remaining, lambda: rows, list(fed.test), lambda: rows,
                          {"spec": str(spec), "samples": len(ids),
                           "samples_sha256": hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()})
    if not plan.remaining:
        raise UnlearningError(f"forgetting {spec} leaves no remaining data to train the unlearning adapter with")
    return plan


def _cap(rows: list[Example], n: int | None) -> list[Example]:
    if n is None or len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def evaluate(model: FedModel, state: Mapping[str, torch.Tensor], plan: ForgetPlan, *,
             attack: MembershipAttack | None, max_eval: int | None = 300, batch_size: int = 64) -> dict[str, Any]:
    """RA, FA and MIA of ``model + state`` for ``plan`` (reads the forgotten rows: evaluation only)."""
    ra = model.accuracy(state, _cap(plan.ra_rows, max_eval), batch_size)
    fa = model.accuracy(state, _cap(plan.fa_rows(), max_eval), batch_size)
    out: dict[str, Any] = {"ra": ra, "fa": fa}
    if attack is not None:
        rows = _cap(plan.forgotten_train(), max_eval)
        probs = model.predict_proba(state, rows, batch_size)
        out["mia"] = attack.success(probs, [lab for _, lab in rows])
    return out


# ---------------------------------------------------------------------------- unlearning

def fresh_head_state(model: FedModel, seed: int) -> dict[str, torch.Tensor]:
    """A newly initialised head (normal(0, 0.02) weights from ``seed``, zero bias), as trainable state."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    if model.head is None:
        raise UnlearningError("this model has no task head to re-initialise")
    w = model.head.linear.weight
    return {"head:weight": torch.randn(tuple(w.shape), generator=g) * 0.02,
            "head:bias": torch.zeros(model.head.linear.out_features)}


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
    attack: MembershipAttack | None = None


def check_request(fed: Federation, spec: ForgetSpec, n_layers: int, k: int, density: float, rounds: int) -> ForgetPlan:
    """Validate everything about an unlearning request before any training. Raises UnlearningError."""
    if k < 1:
        raise UnlearningError(f"layers must be at least 1, got {k}", keywords=("layers",))
    if k > n_layers:
        raise UnlearningError(f"layers={k} is larger than the model's {n_layers} layers", keywords=("layers",))
    try:
        M.check_density(density)
    except TrainingError as e:
        raise UnlearningError(str(e)) from None
    if rounds < 1:
        raise UnlearningError(f"rounds must be at least 1, got {rounds}", keywords=("rounds",))
    return plan_forget(fed, spec)


def run_unlearning(base_path: Path, global_adapter: fmt.SparseAdapter, fed: Federation, cfg: FedConfig,
                   spec: ForgetSpec, *, layers: int = 3, density: float = 0.1, rounds: int | None = None,
                   seed: int = 0, local_steps: int | None = None, lr: float | None = None,
                   ranking: list[dict[str, Any]] | None = None,
                   evaluate_metrics: bool = True, compare_retrain: bool = False, retrain_density: float | None = None,
                   max_eval: int | None = 300, global_ref: str = "", global_hash: str = "",
                   attack: MembershipAttack | None = None, layer_regex: str = DEFAULT_LAYER_REGEX,
                   head: str = "reset", progress: ProgressFn | None = None) -> UnlearnResult:
    """Build the FUSED unlearning adapter for ``spec`` over the global model (no catalog involved).

    Takes: the base folder, the global adapter (deltas over the base + head), its federation and
        FedAvg config, the forget spec, K, density, rounds (default: the global model's), a seed, a
        stored critical-layer ranking (``None``: recompute on the remaining clients), ``head``:
        ``reset`` (a fresh seeded head) or ``train`` (the global model's head), trained densely
        along with the K layers and stored as the adapter's head, or ``freeze`` (the global model's
        head is kept; the adapter carries none).
    Returns: :class:`UnlearnResult`. With ``evaluate_metrics=False`` no forgotten row is ever read.
    Raises: UnlearningError for a bad request (before training).
    """
    task = fed.task
    if head not in HEAD_MODES:
        raise UnlearningError(f"head must be one of {', '.join(HEAD_MODES)}, got {head!r}")
    model = FedModel(base_path, len(fed.labels), max_length=cfg.max_length, seed=cfg.seed, layer_regex=layer_regex)
    plan = check_request(fed, spec, len(model.layers), layers, density, rounds or cfg.rounds)
    missing = [p for p in global_adapter.params if p not in model.layer_weights]
    if missing:
        raise UnlearningError(f"the global model adapts {missing[0]}, which is not one of the model's layers")
    model.apply_adapter(global_adapter, head_task=task)  # the backbone now holds the global model's weights
    ucfg = FedConfig(**{**cfg.to_json(), "rounds": rounds or cfg.rounds, "seed": seed,
                        "local_steps": local_steps or cfg.local_steps, "lr": lr or cfg.lr})
    ucfg.check()
    ids = [c for c, _ in plan.remaining]
    rows = [r for _, r in plan.remaining]
    t0 = time.perf_counter()
    if ranking is None:
        ranking = identify_critical_layers(model, {}, rows, ucfg, client_ids=ids, progress=progress)
        ranking_source = "remaining clients"
    else:
        ranking_source = "global model"
        known = {r["layer"] for r in ranking}
        if known != set(model.layers):
            raise UnlearningError("the stored critical-layer ranking does not match the model's layers")
    critical = [r["layer"] for r in ranking[:layers]]
    state = sparse_delta_state(model, critical, density, seed, mask="random")
    if head == "train":  # starts from the global model's head (loaded by apply_adapter above)
        state.update(model.head_state())
    elif head == "reset":  # overwritten: a fresh seeded head, trained on the remaining data only
        state.update(fresh_head_state(model, seed))
    state, stats = fedavg(model, state, rows, ucfg, client_ids=ids, salt="unlearn", progress=progress,
                          desc="unlearning")
    seconds = time.perf_counter() - t0
    unl = {"forget": plan.record, "critical_layers": critical, "layers": layers, "density": density,
           "ranking_source": ranking_source, "applies_on": {"ref": global_ref, "content_hash": global_hash},
           "head": {"reset": "re-initialised and trained on the remaining data (stored as this adapter's head)",
                    "train": "trained from the global model's head (stored as this adapter's head)",
                    "freeze": "frozen (the global model's)"}[head]}
    card = {"mask": {"method": "random", "density": density, "granularity": "element", "targets": critical,
                     "target_tensors": sorted(critical)},
            "unlearning": unl}
    adapter = state_to_adapter(model, state, task=task, labels=fed.labels, kind="unlearning", card=card,
                               include_head=head != "freeze")
    metrics: dict[str, Any] = {"seconds": round(seconds, 3), "bytes_per_client": stats.bytes_per_client,
                               "bytes_total": stats.bytes_total, "remaining_clients": len(ids)}
    if evaluate_metrics:
        if attack is None:
            attack = MembershipAttack(base_path, len(fed.labels), fed.validation, max_length=cfg.max_length, seed=seed)
        metrics["global"] = evaluate(model, {}, plan, attack=attack, max_eval=max_eval)
        metrics.update(evaluate(model, state, plan, attack=attack, max_eval=max_eval))
        if compare_retrain:
            remaining = dict(plan.remaining)
            t1 = time.perf_counter()
            rmodel, rstate, rstats = train_global(
                base_path, fed, cfg, density=retrain_density if retrain_density is not None else _density_of(global_adapter),
                exclude=lambda c: remaining.get(c, []), layer_regex=layer_regex, progress=progress, desc="retraining")
            rsec = time.perf_counter() - t1
            r = evaluate(rmodel, rstate, plan, attack=attack, max_eval=max_eval)
            r.update({"seconds": round(rsec, 3), "bytes_per_client": rstats.bytes_per_client,
                      "bytes_total": rstats.bytes_total})
            metrics["retrain"] = r
    tc = {"forget": plan.record, "critical_layers": {"k": layers, "chosen": critical, "ranking": ranking,
                                                     "source": ranking_source},
          "density": density, "seed": seed, "head": head, "fedavg": ucfg.to_json(), "federation": fed.to_json(),
          "applies_on": {"ref": global_ref, "content_hash": global_hash}, "stats": stats.to_json()}
    return UnlearnResult(adapter, state, ranking, critical, stats, plan, metrics, tc, attack)


def _density_of(adapter: fmt.SparseAdapter) -> float:
    d = (adapter.card.get("mask") or {}).get("density")
    return float(d) if d is not None else min(1.0, adapter.density)


def unlearn(ws: Workspace, ref: str, *, forget: str, name: str, layers: int = _UD.layers, density: float = _UD.density,
            rounds: int | None = None, seed: int = _UD.seed, local_steps: int | None = None, lr: float | None = None, compare_retrain: bool = False,
            rerank: bool = False, head: str = _UD.head,
            max_eval: int | None = _UD.max_eval, progress: ProgressFn | None = None, data: TaskData | None = None,
            attack: MembershipAttack | None = None) -> tuple[VersionInfo, UnlearnResult]:
    """Produce, evaluate and register a FUSED unlearning adapter for the global model ``ref``.

    Registered as kind ``unlearning`` with an ``unlearns`` lineage edge to ``ref``; the forget
    spec and the critical-layer ranking go into its training config and card, the metrics (RA,
    FA, MIA, time, bytes; ``retrain`` with ``compare_retrain``) onto the version.
    Returns: (VersionInfo, UnlearnResult).
    Raises: UnlearningError/RefError/... before anything is registered.
    """
    from ..catalog.names import validate_name
    from ..catalog.records import Parent

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
    stored = None if rerank else (info.training_config or {}).get("critical_layers")
    res = run_unlearning(binfo.path, gadapter, fed, cfg, spec, layers=layers, density=density, rounds=rounds,
                         seed=seed, local_steps=local_steps, lr=lr, ranking=stored, compare_retrain=compare_retrain,
                         max_eval=max_eval, global_ref=info.ref, global_hash=info.content_hash, attack=attack,
                         layer_regex=rec.get("layer_regex") or DEFAULT_LAYER_REGEX, head=head, progress=progress)
    v = ws.register(res.adapter, name=name, task=info.task, base=info.base, kind="unlearning",
                    parents=[Parent(info.ref, "unlearns", params={"forget": str(spec),
                                                                 "critical_layers": res.critical})],
                    metrics=res.metrics, training_config=res.training_config)
    return v, res


# ---------------------------------------------------------------------------- baseline: negative task arithmetic

def negative_task_arithmetic(base_path: Path, global_adapter: fmt.SparseAdapter, fed: Federation, cfg: FedConfig,
                             plan: ForgetPlan, *, scale: float = 1.0, density: float | None = None,
                             rounds: int | None = None, attack: MembershipAttack | None = None,
                             max_eval: int | None = 300, layer_regex: str = DEFAULT_LAYER_REGEX,
                             progress: ProgressFn | None = None) -> dict[str, Any]:
    """Baseline: train an adapter on the forgotten data (FedAvg over its owners), subtract it.

    The adapter has the global model's layers and density (random mask), trained over the global
    weights with the head frozen; the unlearned model is ``global − scale·adapter``. Reads the
    forgotten data by construction. Returns the same metrics as :func:`evaluate` plus time and bytes.
    """
    model = FedModel(base_path, len(fed.labels), max_length=cfg.max_length, seed=cfg.seed, layer_regex=layer_regex)
    model.apply_adapter(global_adapter, head_task=fed.task)
    forgotten = plan.forgotten_train()
    fset = set(forgotten)
    owners: list[list[Example]] = []
    for c in range(fed.n_clients):
        mine = [r for r in fed.client_rows(c) if r in fset]
        if mine:
            owners.append(mine)
    if not owners:
        raise UnlearningError("no client holds the forgotten data")
    t0 = time.perf_counter()
    ncfg = FedConfig(**{**cfg.to_json(), "rounds": rounds or cfg.rounds})
    state = sparse_delta_state(model, model.layers, density if density is not None else _density_of(global_adapter),
                               cfg.seed + 1, mask="random")
    state, stats = fedavg(model, state, owners, ncfg, salt="nta", progress=progress, desc="task vector")
    neg = {k: -scale * v for k, v in state.items()}
    seconds = time.perf_counter() - t0
    out = evaluate(model, neg, plan, attack=attack, max_eval=max_eval)
    out.update({"seconds": round(seconds, 3), "bytes_per_client": stats.bytes_per_client, "bytes_total": stats.bytes_total})
    return out


__all__ = ["ForgetSpec", "parse_forget", "ForgetPlan", "plan_forget", "layer_l1_distances", "rank_layers",
           "identify_critical_layers", "MembershipAttack", "evaluate", "run_unlearning", "unlearn", "UnlearnResult",
           "negative_task_arithmetic", "check_request", "VALUE_BYTES", "HEAD_MODES"]

"""Federated simulation for FUSED (Zhong et al., CVPR 2025): Dirichlet partition, FedAvg, the global model.

* :func:`dirichlet_partition` splits a task's training rows over ``N`` clients with a seeded
  Dirichlet(α) over labels (small α = very non-IID); the partition has a sha256 (``Partition.hash``)
  recorded with the global model, so an unlearning run can prove it re-created the same clients.
* :class:`FedModel` wraps an encoder (the shipped MiniLM or any BERT-like folder; tiny test models
  without a tokenizer get a hashing tokenizer) plus a mean-pool linear head. Training never writes
  the base: each target weight ``W`` is used as ``W + Δ`` through ``functional_call``, where ``Δ``
  is either dense (density 1, "full weights") or a 1-D vector of values at fixed sorted flat
  indices (a sparse expert). ``W`` itself may be the base or the base with an adapter applied by
  :mod:`adapterhub.apply.patching` (the unlearning adapter trains over the *global model's* weights).
* :func:`fedavg` runs FedAvg rounds: every participating client starts from the global trainable
  state, does ``local_steps`` of SGD with momentum on its own rows (:func:`client_update`, the one
  per-client step both engines call), and the server averages the results weighted by client data
  size, in the order of the clients' stable ids. Clients only ever read their own rows. Who runs the
  clients is a :class:`RoundRunner`: :class:`LocalRounds` in this process (``--engine local``) or
  the Flower ServerApp's messages to SuperNodes (``--engine flower``, :mod:`adapterhub.fused.flower`). Optionally (:class:`StopRule`) it stops when a validation loss on
  remaining data stops improving and keeps the best round; it counts what travels (bytes down and
  up per client) and the compute (local steps, examples, validation rows) in :class:`FedStats`.
* Critical layers (FUSED step 1) are measured *during* training: in the last round each client
  reports, per trained layer and for the task head, the L1 distance between its local model and
  the global model it started from (a few numbers, counted in the bytes). The server ranks layers
  by the data-size-weighted sum (:func:`rank_layers`); ``fed train`` stores the per-client
  numbers and the ranking with the global version, so ``unlearn`` needs no extra round.
* :func:`fed_train` trains the global model and registers it as a version (kind ``expert``): a
  sparse adapter over the base (density < 1) or a dense-as-sparse adapter (density 1, every index
  stored, 2 bytes each), the head as extras, and the federation in its training config.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..data.tasks import TaskData
    from ..workspace import Workspace

from .. import format as fmt
from ..errors import AdapterHubError, TrainingError, UnlearningError
from ..training import masks as M
from ..training.config import DEFAULT_LAYER_REGEX, UNLEARN_DEFAULTS, FedConfig, default_of
from ..training.model import (
    CLASSIFIER_KINDS,
    DEFAULT_TARGETS,
    Batcher,
    SparseDeltaModel,
    apply_delta,
    find_targets,
    load_backbone,
    load_tokenizer,
    model_kind,
    position_limit,
)

Example = tuple[str, int]
ProgressFn = Callable[[str, int, int], None]
VALUE_BYTES = 4  # fp32 values on the wire


# ---------------------------------------------------------------------------- partition

@dataclass(frozen=True)
class Partition:
    """Which training rows each client holds.

    Attributes:
        clients: per client, sorted indices into the task's train split.
        alpha, seed: the Dirichlet concentration and seed that produced it.
        hash: sha256 over (alpha, seed, data fingerprint, the index lists).
    """

    clients: tuple[tuple[int, ...], ...]
    alpha: float
    seed: int
    hash: str

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]


def partition_hash(clients: Sequence[Sequence[int]], alpha: float, seed: int, data_fingerprint: str = "") -> str:
    """sha256 identifying a partition (see :class:`Partition`)."""
    doc = {"alpha": float(alpha), "seed": int(seed), "data": data_fingerprint, "clients": [list(map(int, c)) for c in clients]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dirichlet_partition(labels: Sequence[int], n_clients: int, alpha: float, seed: int, *,
                        data_fingerprint: str = "", min_size: int = 1, max_tries: int = 100) -> Partition:
    """Split rows over clients: for each label, proportions ~ Dirichlet(α·1_N), seeded.

    Takes: the label id of every training row, the number of clients, α > 0, a seed.
    Returns: a :class:`Partition` where every client holds at least ``min_size`` rows (the draw is
        repeated with the next sub-seed until it does, as is usual for Dirichlet splits).
    Raises: TrainingError for N < 1, α <= 0, or fewer rows than ``N * min_size``.
    """
    import numpy as np

    if n_clients < 1:
        raise TrainingError(f"need at least one client, got {n_clients}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise TrainingError(f"alpha must be a positive number, got {alpha}")
    if len(labels) < n_clients * min_size:
        raise TrainingError(f"{len(labels)} training rows cannot give {n_clients} clients {min_size} row(s) each")
    lab = np.asarray(list(labels), dtype=np.int64)
    classes = sorted(set(lab.tolist()))
    for attempt in range(max_tries):
        rng = np.random.default_rng([int(seed), attempt])
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = np.flatnonzero(lab == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_clients, float(alpha)))
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(x) for x in parts) >= min_size:
            clients = tuple(tuple(sorted(x)) for x in parts)
            return Partition(clients, float(alpha), int(seed), partition_hash(clients, alpha, seed, data_fingerprint))
    raise TrainingError(f"no Dirichlet({alpha}) draw in {max_tries} tries gives every one of {n_clients} clients "
                        f"{min_size} row(s); use fewer clients or a larger alpha")


# ---------------------------------------------------------------------------- tokenizer for tiny models

class HashTokenizer:
    """A deterministic word-hash tokenizer for test models that ship no tokenizer.

    Callable like a Hugging Face tokenizer for the arguments the batcher uses.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.pad_token_id = 0

    def _ids(self, text: str, max_length: int) -> list[int]:
        words = text.lower().split()[: max(0, max_length - 1)]
        return [1] + [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words]

    def __call__(self, texts: Sequence[str], padding: bool = True, truncation: bool = True, max_length: int = 64,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        seqs = [self._ids(t, max_length) for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            att[r, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": att}


def _load_tokenizer(path: Path, vocab_size: int) -> Any:
    has_tok = any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model"))
    if not has_tok:
        return HashTokenizer(vocab_size), "hash"
    return load_tokenizer(path), "hf"


# ---------------------------------------------------------------------------- the model

class FedModel(SparseDeltaModel):
    """The shared :class:`~adapterhub.training.model.SparseDeltaModel` (frozen encoder + mean-pool head) with
    a *functional* trainable state, as FedAvg needs: every client trains its own copy of the state.

    Trainable state keys: ``delta:<file tensor name>`` (dense tensor of the weight's shape, or 1-D
    values at ``self.index[name]``) and ``head:weight`` / ``head:bias``. The forward pass is the
    shared model's (:meth:`SparseDeltaModel.outputs`, ``W + Δ`` by :func:`apply_delta`).
    """

    def __init__(self, base_path: Path, n_labels: int, *, max_length: int = default_of(FedConfig, "max_length"),
                 layer_regex: str = DEFAULT_LAYER_REGEX, seed: int = 0) -> None:
        from ..bases.sources import tensor_shapes

        self.base_path = Path(base_path)
        torch.manual_seed(seed)
        kind = model_kind(self.base_path)
        if kind not in CLASSIFIER_KINDS:
            raise TrainingError(f"federated training needs a classifier base (encoder or image), not a {kind}")
        backbone = load_backbone(self.base_path, kind, torch.float32, torch.device("cpu"))
        backbone.eval()  # no dropout: local training is deterministic given the seed
        if layer_regex == DEFAULT_LAYER_REGEX and kind == "image":
            layer_regex = DEFAULT_TARGETS["image"]  # every conv and linear layer of the CNN
        targets = find_targets(backbone, layer_regex, tensor_shapes(self.base_path))
        super().__init__(backbone, kind, targets, n_labels, torch.device("cpu"), autocast=False)
        if kind == "image":
            self.tokenizer, self.tokenizer_kind = None, "pixels"
        else:
            vocab = int(getattr(backbone.config, "vocab_size", 30522))
            self.tokenizer, self.tokenizer_kind = _load_tokenizer(self.base_path, vocab)
        self.max_length = max_length
        self.batcher = Batcher(self.tokenizer, kind, [str(i) for i in range(n_labels)], max_length,
                               position_limit(backbone) if kind != "image" else None)
        g = torch.Generator().manual_seed(int(seed))
        assert self.head is not None
        with torch.no_grad():
            nn.init.normal_(self.head.linear.weight, std=0.02, generator=g)
            self.head.linear.bias.zero_()
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.param_of = {file_key: pname for pname, file_key in targets.items()}  # file tensor name -> param name
        self.layers = list(self.param_of)  # file tensor names, model order
        self.layer_weights = {k: self.weights[self.param_of[k]] for k in self.layers}  # by file tensor name
        self.index: dict[str, torch.Tensor] = {}  # sparse layers of the state: sorted flat indices

    # -- weights
    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.layer_weights[name].shape)

    def apply_adapter(self, adapter: fmt.SparseAdapter, *, head_task: str | None = None) -> None:
        """Patch the backbone in place with ``adapter`` (exactly as a deployment would), load its head.

        Raises: TrainingError if the adapter has no head for ``head_task`` when one is asked for.
        """
        from ..apply.patching import apply_adapter

        apply_adapter(self.backbone, adapter)
        if head_task is not None:
            self.load_head(adapter, head_task)

    def head_state(self) -> dict[str, torch.Tensor]:
        assert self.head is not None
        return {"head:weight": self.head.linear.weight.detach().clone(), "head:bias": self.head.linear.bias.detach().clone()}

    def set_head_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if "head:weight" in state:
            self.set_head(state["head:weight"], state["head:bias"])

    # -- batches
    def encode(self, rows: Sequence[Example]) -> dict[str, torch.Tensor]:
        return self.batcher.batch(rows, self.device)

    def effective_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module param name -> W + Δ for every delta in ``state`` (fp32, as patching computes it)."""
        return {self.param_of[key[6:]]: apply_delta(self.layer_weights[key[6:]], d, self.index.get(key[6:]))
                for key, d in state.items() if key.startswith("delta:")}

    def head_tensors(self, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The head ``state`` runs with: its own dense head (``head:*``), the model's head plus sparse
        deltas (``hdelta:*`` at ``self.index``), or None (the model's head as it is)."""
        hw = state.get("head:weight")
        if hw is not None:
            return hw, state["head:bias"]
        if "hdelta:weight" in state:
            assert self.head is not None
            lin = self.head.linear
            return (apply_delta(lin.weight, state["hdelta:weight"], self.index.get("hdelta:weight")),
                    apply_delta(lin.bias, state["hdelta:bias"], self.index.get("hdelta:bias")))
        return None

    def logits(self, state: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of ``W + Δ(state)`` with the state's head (see :meth:`head_tensors`)."""
        return self.outputs(self.effective_state(state), batch, head=self.head_tensors(state))

    @torch.no_grad()
    def predict_proba(self, state: Mapping[str, torch.Tensor], rows: Sequence[Example], batch_size: int = 64
                      ) -> torch.Tensor:
        """Softmax probabilities (n, labels) of the model ``W + Δ(state)`` on ``rows``."""
        outs = []
        for i in range(0, len(rows), batch_size):
            b = self.encode(rows[i:i + batch_size])
            outs.append(torch.softmax(self.logits(state, b).float(), dim=-1))
        if not outs:
            assert self.head is not None
            return torch.zeros((0, self.head.linear.out_features))
        return torch.cat(outs)

    def mean_loss(self, state: Mapping[str, torch.Tensor], rows: Sequence[Example], batch_size: int = 64) -> float:
        """Mean cross-entropy of ``W + Δ(state)`` on ``rows`` (the stopping rule's validation loss)."""
        if not rows:
            raise TrainingError("no rows to compute a loss on")
        p = self.predict_proba(state, rows, batch_size).double().clamp(min=1e-300)
        gold = torch.tensor([lab for _, lab in rows])
        return float(-p.gather(1, gold.view(-1, 1)).log().mean())

    def accuracy(self, state: Mapping[str, torch.Tensor], rows: Sequence[Example], batch_size: int = 64) -> float | None:
        """Accuracy on ``rows`` (None for no rows)."""
        if not rows:
            return None
        p = self.predict_proba(state, rows, batch_size)
        gold = torch.tensor([lab for _, lab in rows])
        return float((p.argmax(-1) == gold).float().mean())


# ---------------------------------------------------------------------------- trainable states

def sparse_delta_state(model: FedModel, layers: Sequence[str], density: float, seed: int, *,
                       mask: str = "random") -> dict[str, torch.Tensor]:
    """Zero deltas on ``layers``: dense at density 1, else ``density`` of each layer chosen by ``mask``.

    Sets ``model.index`` for the sparse layers. Returns the initial trainable state (deltas only).
    Raises: TrainingError on a bad density or mask method.
    """
    M.check_density(density)
    state: dict[str, torch.Tensor] = {}
    for k in list(model.index):
        if k in layers:
            del model.index[k]
    if density >= 1.0:
        for k in layers:
            state["delta:" + k] = torch.zeros(model.shape(k))
        return state
    method = M.get_mask_method(mask)
    if method.needs_grad or method.dense_warmup or method.grow_drop:
        raise TrainingError(f"mask {mask!r} needs gradients; federated training supports random or magnitude")
    g = torch.Generator().manual_seed(int(seed))
    scores = method.scores(M.MaskInputs(weights={k: model.layer_weights[k].detach() for k in sorted(layers)}, generator=g))
    sel = M.select(scores, density, scope="layer")
    for k in layers:
        model.index[k] = sel[k].indices
        state["delta:" + k] = torch.zeros(sel[k].indices.numel())
    return state


def sparse_head_state(model: FedModel, density: float, seed: int) -> dict[str, torch.Tensor]:
    """Zero sparse deltas on the task head (weight and bias), ``density`` of each chosen at random.

    The head is treated as a layer like any other: the deltas sit on top of the model's current
    head (the global model's), nothing is re-initialised. Sets ``model.index`` for the two keys.
    """
    M.check_density(density)
    if model.head is None:
        raise UnlearningError("this model has no task head")
    lin = model.head.linear
    g = torch.Generator().manual_seed(int(seed) + 104729)
    method = M.get_mask_method("random")
    scores = method.scores(M.MaskInputs(weights={"hdelta:bias": lin.bias.detach(), "hdelta:weight": lin.weight.detach()},
                                        generator=g))
    sel = M.select(scores, density, scope="layer")
    state = {}
    for k in ("hdelta:weight", "hdelta:bias"):
        model.index[k] = sel[k].indices
        state[k] = torch.zeros(sel[k].indices.numel())
    return state


def state_numel(state: Mapping[str, torch.Tensor]) -> int:
    return sum(int(t.numel()) for t in state.values())


HEAD_LAYER = "head"  # the task head's name in a critical-layer ranking


def is_head_key(key: str) -> bool:
    """True for trainable-state keys of the task head (dense ``head:*`` or sparse ``hdelta:*``)."""
    return key.startswith(("head:", "hdelta:"))


def _client_generator(seed: int, round_: int, client: int, salt: str = "") -> torch.Generator:
    h = hashlib.sha256(f"{seed}/{round_}/{client}/{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def local_train(model: FedModel, state: Mapping[str, torch.Tensor], rows: Sequence[Example], cfg: FedConfig, *,
                gen: torch.Generator, steps: int | None = None) -> dict[str, torch.Tensor]:
    """One client's local update: ``steps`` SGD-with-momentum steps on batches drawn from ``rows``.

    Takes: the model, the starting trainable state (not modified), the client's rows.
    Returns: the new trainable state (detached tensors).
    Raises: TrainingError when the client has no rows.
    """
    n = len(rows)
    if n == 0:
        raise TrainingError("a client with no rows cannot train")
    local = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    groups = []
    deltas = [v for k, v in local.items() if not is_head_key(k)]
    heads = [v for k, v in local.items() if is_head_key(k)]  # the head (dense or sparse deltas): head_lr
    if deltas:
        groups.append({"params": deltas, "lr": cfg.lr})
    if heads:
        groups.append({"params": heads, "lr": cfg.head_lr})
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    for _ in range(steps or cfg.local_steps):
        pick = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen).tolist()
        batch = model.encode([rows[i] for i in pick])
        loss = model.loss(model.logits(local, batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in local.items()}


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg aggregation: Σ w_k·state_k / Σ w_k, key by key."""
    total = float(sum(weights))
    out = {}
    for k in states[0]:
        acc = torch.zeros_like(states[0][k])
        for s, w in zip(states, weights, strict=True):
            acc += s[k] * (float(w) / total)
        out[k] = acc
    return out


@dataclass
class FedStats:
    """What a FedAvg run cost, counted from what was run and sent.

    Attributes:
        seconds: wall time. rounds: rounds run (``best_round``: the round whose state was kept).
        client_updates: local updates run (clients x rounds).
        upload_values_per_update: trainable values one client sends back per round.
        bytes_up_per_client / bytes_down_per_client: what one participating client sends / receives
            over the whole run (fp32 values: the global state down, its update up, and in the
            recording round the per-layer L1 numbers up; masks come from a shared seed).
        bytes_per_client: up + down. bytes_total: up + down over all clients.
        local_steps: SGD steps over all clients; train_examples: rows forwarded and back-propagated.
        eval_examples: validation rows forwarded by the stopping rule.
        layer_l1: when recorded, client id -> layer -> ``‖θ_k − θ‖₁`` of the last round run.
    """

    seconds: float = 0.0
    rounds: int = 0
    best_round: int = 0
    client_updates: int = 0
    upload_values_per_update: int = 0
    bytes_up_per_client: int = 0
    bytes_down_per_client: int = 0
    bytes_per_client: int = 0
    bytes_total: int = 0
    local_steps: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    layer_l1: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("layer_l1")
        return d


@dataclass
class StopRule:
    """Stop FedAvg when ``loss(state)`` (a validation loss on remaining data, computed by the server
    or reported by the clients) has not improved by more than ``min_delta`` for ``patience``
    rounds; the best round's state is kept. ``rows`` is how many validation rows one check reads
    (counted as compute)."""

    loss: Callable[[Mapping[str, torch.Tensor]], float]
    rows: int
    patience: int = 2
    min_delta: float = 1e-4

    def to_json(self) -> dict[str, Any]:
        return {"rule": "validation loss on remaining data", "patience": self.patience,
                "min_delta": self.min_delta, "validation_rows": self.rows}


def head_layer_l1(local: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor]) -> float | None:
    """L1 distance of the task head between two states (dense ``head:*`` or sparse ``hdelta:*``)."""
    keys = [k for k in glob if is_head_key(k)]
    if not keys:
        return None
    return float(sum(float((local[k].double() - glob[k].double()).abs().sum()) for k in keys))


def client_layer_l1(local: Mapping[str, torch.Tensor], glob: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per trained layer (base tensor name) and for the head (``"head"``): ``‖θ_local − θ_global‖₁``."""
    out = {k[6:]: float((local[k].double() - g.double()).abs().sum()) for k, g in glob.items() if k.startswith("delta:")}
    h = head_layer_l1(local, glob)
    if h is not None:
        out[HEAD_LAYER] = h
    return out


@dataclass
class ClientUpdate:
    """What one client sends back after a round (the same whichever engine carried it).

    Attributes:
        state: the client's new trainable state. n_rows: the rows it trained on (its FedAvg weight).
        layer_l1: in a recording round, :func:`client_layer_l1` of the update; else None.
        local_steps, train_examples: the work it did.
    """

    state: dict[str, torch.Tensor]
    n_rows: int
    layer_l1: dict[str, float] | None
    local_steps: int
    train_examples: int


def client_update(model: FedModel, state: Mapping[str, torch.Tensor], rows: Sequence[Example], cfg: FedConfig, *,
                  round_: int, client_id: int, salt: str = "", record_layers: bool = False) -> ClientUpdate:
    """One client's work in one round: local training from ``state`` on its own ``rows`` (seeded by
    (seed, round, stable client id, salt)), plus the per-layer distances in a recording round.

    Both engines call this: the in-process loop (:func:`fedavg`) and the Flower ClientApp on a node
    (:mod:`adapterhub.fused.flower`), so for the same seed and rows they compute the same bits.
    Raises: TrainingError when the client has no rows.
    """
    local = local_train(model, state, rows, cfg, gen=_client_generator(cfg.seed, round_, client_id, salt))
    return ClientUpdate(local, len(rows), client_layer_l1(local, state) if record_layers else None, cfg.local_steps,
                        cfg.local_steps * min(cfg.batch_size, len(rows)))


class RoundRunner(Protocol):
    """Runs one FedAvg round on clients ``ids`` from ``state``; returns the updates of those that replied,
    by client id (a client that left is simply missing)."""

    def __call__(self, state: Mapping[str, torch.Tensor], round_: int, ids: Sequence[int], *, salt: str,
                 record_layers: bool) -> dict[int, ClientUpdate]: ...


class LocalRounds:
    """The local engine: every client's :func:`client_update` in this process, in id order."""

    def __init__(self, model: FedModel, rows: Mapping[int, Sequence[Example]], cfg: FedConfig, *,
                 progress: ProgressFn | None = None, desc: str = "FedAvg", total: int = 0) -> None:
        self.model, self.rows, self.cfg = model, rows, cfg
        self.progress, self.desc, self.total, self.done = progress, desc, total, 0

    def __call__(self, state: Mapping[str, torch.Tensor], round_: int, ids: Sequence[int], *, salt: str,
                 record_layers: bool) -> dict[int, ClientUpdate]:
        out = {}
        for cid in ids:
            out[cid] = client_update(self.model, state, self.rows[cid], self.cfg, round_=round_, client_id=cid,
                                     salt=salt, record_layers=record_layers)
            self.done += 1
            if self.progress:
                self.progress(self.desc, self.done, self.total)
        return out


def fedavg(model: FedModel, state: Mapping[str, torch.Tensor], clients: Sequence[Sequence[Example]], cfg: FedConfig, *,
           client_ids: Sequence[int] | None = None, salt: str = "", progress: ProgressFn | None = None,
           desc: str = "FedAvg", record_layers: bool = False, stop: StopRule | None = None,
           runner: RoundRunner | None = None, min_clients: int = 1) -> tuple[dict[str, torch.Tensor], FedStats]:
    """Run up to ``cfg.rounds`` FedAvg rounds over ``clients`` (each a sequence of rows it owns).

    Only the given clients' rows are read, each by its own local update; the server aggregates in
    the order of the clients' stable ids (callers pass them ascending). ``record_layers``: every client
    also reports :func:`client_layer_l1` of its update (kept for the last round run, in
    ``stats.layer_l1``). ``stop``: see :class:`StopRule` (without one, exactly ``cfg.rounds`` run).
    ``runner``: who runs the clients' rounds (default :class:`LocalRounds` over ``clients``; the
    Flower engine passes one that sends messages, and ``clients`` may then be empty lists: only the
    ids matter). A client that does not reply is left out of that round and the next ones; fewer
    than ``min_clients`` replies fail the run.
    Returns the final (or best) trainable state and a :class:`FedStats`.
    Raises: TrainingError when there are no clients (or ``client_ids`` does not match them), or too few reply.
    """
    cfg.check()
    if not clients:
        raise TrainingError("no clients to train with")
    ids = list(client_ids) if client_ids is not None else list(range(len(clients)))
    if len(ids) != len(clients):
        raise TrainingError(f"{len(ids)} client ids for {len(clients)} clients")
    if runner is None:
        runner = LocalRounds(model, dict(zip(ids, clients, strict=True)), cfg, progress=progress, desc=desc,
                             total=cfg.rounds * len(clients))
    cur = {k: v.detach().clone() for k, v in state.items()}
    per_update = state_numel(cur)
    t0 = time.perf_counter()
    st = FedStats(upload_values_per_update=per_update)
    best, best_state, best_round = math.inf, cur, 0
    active = sorted(ids)
    participated = set()
    for r in range(cfg.rounds):
        updates = runner(cur, r, active, salt=salt, record_layers=record_layers)
        got = [cid for cid in active if cid in updates]  # stable id order, whatever order replies came in
        if len(got) < max(1, min_clients):
            raise TrainingError(f"round {r + 1}: {len(got)} of {len(active)} clients replied, fewer than the "
                                f"{max(1, min_clients)} needed")
        participated.update(got)
        st.client_updates += len(got)
        for cid in got:
            st.local_steps += updates[cid].local_steps
            st.train_examples += updates[cid].train_examples
        cur = weighted_average([updates[c].state for c in got], [updates[c].n_rows for c in got])
        active = got
        st.rounds = r + 1
        if record_layers:
            st.layer_l1 = {str(c): dict(updates[c].layer_l1 or {}) for c in got}
        if stop is not None:
            loss = stop.loss(cur)
            st.eval_examples += stop.rows
            if loss < best - stop.min_delta:
                best, best_state, best_round = loss, cur, r + 1
            elif r + 1 - best_round >= stop.patience:
                break
        else:
            best_state, best_round = cur, r + 1
    n_layers_reported = len(next(iter(st.layer_l1.values()))) if st.layer_l1 else 0
    st.seconds = time.perf_counter() - t0
    st.best_round = best_round
    st.bytes_down_per_client = per_update * VALUE_BYTES * st.rounds
    st.bytes_up_per_client = per_update * VALUE_BYTES * st.rounds + n_layers_reported * VALUE_BYTES
    st.bytes_per_client = st.bytes_up_per_client + st.bytes_down_per_client
    st.bytes_total = st.bytes_per_client * len(participated)
    return best_state, st


# ---------------------------------------------------------------------------- critical layers (FUSED step 1)
# Measured during training (``fedavg(record_layers=True)``): ``fed train`` stores each client's
# per-layer distances of its last round with the global version; :mod:`adapterhub.fused.unlearning`
# ranks them (over all clients, or the remaining ones), never running an extra round.

def layer_l1_distances(per_client: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int],
                       clients: Sequence[str] | None = None) -> dict[str, float]:
    """Per layer ``Σ_k (n_k/n)·‖θ_k − θ‖₁`` over ``clients`` (default: every client reported).

    Takes: client id -> layer -> L1 distance (as recorded by :func:`fedavg`), client id -> data size.
    Returns: layer name -> weighted L1 distance.
    Raises: TrainingError when no client (or no data) is left to rank with.
    """
    use = [c for c in (clients if clients is not None else per_client) if c in per_client]
    total = float(sum(sizes[c] for c in use))
    if not use or total <= 0:
        raise TrainingError("no client measurements to rank the layers with")
    out: dict[str, float] = {}
    for c in use:
        for layer, v in per_client[c].items():
            out[layer] = out.get(layer, 0.0) + (float(sizes[c]) / total) * float(v)
    return out


def rank_layers(scores: Mapping[str, float]) -> list[dict[str, Any]]:
    """Layers by descending score (ties by name): ``[{"rank", "layer", "l1"}]``."""
    order = sorted(scores, key=lambda k: (-scores[k], k))
    return [{"rank": i + 1, "layer": k, "l1": scores[k]} for i, k in enumerate(order)]


# ---------------------------------------------------------------------------- the federation record

@dataclass
class Federation:
    """A task split over clients (what the global model's training config records)."""

    task: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    validation: list[Example]
    partition: Partition
    data_fingerprint: str

    def client_rows(self, cid: int) -> list[Example]:
        return [self.train[i] for i in self.partition.clients[cid]]

    @property
    def n_clients(self) -> int:
        return len(self.partition.clients)

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "clients": self.n_clients, "alpha": self.partition.alpha,
                "seed": self.partition.seed, "partition_hash": self.partition.hash,
                "client_sizes": self.partition.sizes, "data_fingerprint": self.data_fingerprint,
                "train_rows": len(self.train)}


def _subsample(rows: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(rows) <= limit:
        return rows
    import random

    r = random.Random(seed)
    idx = sorted(r.sample(range(len(rows)), limit))
    return [rows[i] for i in idx]


def make_federation(task: str, n_clients: int, alpha: float, seed: int, *, data: TaskData | None = None,
                    max_train: int | None = None, max_test: int | None = None) -> Federation:
    """Load ``task`` (or use ``data``, a TaskData), optionally subsample, and partition it.

    ``max_train``/``max_test`` keep a seeded subset (recorded, so the same federation is rebuilt).
    Raises: DataError for an unknown task, TrainingError for an impossible partition.
    """
    from ..data import load_task
    from ..training.loop import with_validation

    td = with_validation(data if data is not None else load_task(task), seed)  # never the test split
    train = _subsample(list(td.train), max_train, seed)
    test = _subsample(list(td.test), max_test, seed + 1)
    val = _subsample(list(td.validation), max_test, seed + 2)
    fp = hashlib.sha256((td.fingerprint() + json.dumps([max_train, max_test])).encode()).hexdigest()
    part = dirichlet_partition([lab for _, lab in train], n_clients, alpha, seed, data_fingerprint=fp)
    return Federation(task, list(td.labels), train, test, val, part, fp)


# ---------------------------------------------------------------------------- global model

@dataclass
class GlobalResult:
    adapter: fmt.SparseAdapter
    state: dict[str, torch.Tensor]
    federation: Federation
    stats: FedStats
    metrics: dict[str, Any]
    training_config: dict[str, Any]
    critical_layers: list[dict[str, Any]] = field(default_factory=list)


def state_to_adapter(model: FedModel, state: Mapping[str, torch.Tensor], *, task: str, labels: Sequence[str],
                     kind: str, card: dict[str, Any], include_head: bool) -> fmt.SparseAdapter:
    """Package a trainable state as a SparseAdapter keyed by base tensor names (dense -> every index)."""
    params: dict[str, fmt.SparseParam] = {}
    for key, d in state.items():
        if not key.startswith("delta:"):
            continue
        name = key[6:]
        shape = model.shape(name)
        if name in model.index:
            params[name] = fmt.SparseParam(shape, model.index[name].clone().contiguous(), d.detach().float().contiguous())
        else:
            n = math.prod(shape)
            params[name] = fmt.SparseParam(shape, torch.arange(n, dtype=torch.int64), d.detach().float().reshape(-1).contiguous())
    extras = {}
    if include_head:
        head = model.head_tensors(state)
        if head is None:
            raise TrainingError("internal: the state has no head to store")
        extras[f"heads.{task}.weight"] = head[0].detach().float().contiguous()
        extras[f"heads.{task}.bias"] = head[1].detach().float().contiguous()
    full = {"format": fmt.FORMAT_ID, "task": task, "kind": kind, "labels": {task: list(labels)},
            "model_kind": "encoder", **card}
    if include_head:
        full["head"] = {"type": "linear", "pooling": "mean", "task": task}
    a = fmt.SparseAdapter(params, extras, full)
    a.validate()
    return a


def train_global(base_path: Path, fed: Federation, cfg: FedConfig, *, density: float, mask: str = "random",
                 layer_regex: str = DEFAULT_LAYER_REGEX, exclude: Callable[[int], Sequence[Example]] | None = None,
                 progress: ProgressFn | None = None, desc: str = "FedAvg", record_layers: bool = False,
                 stop: Callable[[FedModel], StopRule | None] | None = None,
                 runner: Callable[[FedModel], RoundRunner] | None = None, client_ids: Sequence[int] | None = None,
                 min_clients: int = 1) -> tuple[FedModel, dict[str, torch.Tensor], FedStats]:
    """Train a global model from the base with FedAvg over all clients (or ``exclude(cid)``'s rows).

    ``exclude`` returns a client's rows to train with (the retraining baseline passes the rows left
    after removing forgotten data); clients left with no rows sit out. ``record_layers``: the
    clients report per-layer distances in each round (see :func:`fedavg`); ``stop`` builds the
    stopping rule for the model (retraining "to convergence"). ``runner`` builds, for the model, who runs
    the clients (the Flower engine; the rows then stay on the nodes and ``client_ids`` names the clients).
    Returns: the model (base weights untouched), the final state (deltas + head) and stats.
    """
    model = FedModel(base_path, len(fed.labels), max_length=cfg.max_length, layer_regex=layer_regex, seed=cfg.seed)
    state = sparse_delta_state(model, model.layers, density, cfg.seed, mask=mask)
    h = model.head_state()
    state.update({k: v.clone() for k, v in h.items()})
    clients: list[Sequence[Example]] = []
    ids: list[int] = []
    if runner is not None:  # the rows stay where they are: only the ids are known here
        ids = sorted(client_ids if client_ids is not None else range(fed.n_clients))
        clients = [[] for _ in ids]
    else:
        for cid in range(fed.n_clients):
            rows = exclude(cid) if exclude is not None else fed.client_rows(cid)
            if rows:
                clients.append(rows)
                ids.append(cid)
    state, stats = fedavg(model, state, clients, cfg, client_ids=ids, progress=progress, desc=desc,
                          record_layers=record_layers, stop=stop(model) if stop is not None else None,
                          runner=runner(model) if runner is not None else None, min_clients=min_clients)
    return model, state, stats


_FD = {f: default_of(FedConfig, f) for f in ("local_steps", "seed", "batch_size", "lr", "head_lr", "momentum",
                                             "max_length")}


def fed_train(ws: Workspace, *, base: str, task: str, clients: int, alpha: float, rounds: int, name: str,
              density: float = UNLEARN_DEFAULTS.global_density,
              local_steps: int = _FD["local_steps"], seed: int = _FD["seed"], mask: str = "random",
              layer_regex: str = DEFAULT_LAYER_REGEX, batch_size: int = _FD["batch_size"], lr: float = _FD["lr"],
              head_lr: float = _FD["head_lr"], momentum: float = _FD["momentum"],
              max_length: int = _FD["max_length"], max_train: int | None = None, max_test: int | None = None,
              progress: ProgressFn | None = None,
              data: TaskData | None = None) -> tuple[VersionInfo, GlobalResult]:
    """Train the global model with FedAvg and register it (kind ``expert``).

    Takes: the workspace, base name, task, federation settings, the version name.
    Returns: (VersionInfo, GlobalResult).
    Raises: AdapterHubError subclasses for unknown base/task, bad settings; nothing is registered then.
    """
    from ..catalog.names import validate_name

    validate_name(name, "adapter name")
    cfg = FedConfig(rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr, head_lr=head_lr,
                    momentum=momentum, max_length=max_length, seed=seed)
    cfg.check()
    M.check_density(density)
    binfo = ws.get_base(base)
    fed = make_federation(task, clients, alpha, seed, data=data, max_train=max_train, max_test=max_test)
    res = global_model(binfo.path, fed, cfg, density=density, mask=mask, layer_regex=layer_regex, progress=progress,
                       max_train=max_train, max_test=max_test)
    info = ws.register(res.adapter, name=name, task=task, base=base, kind="expert", metrics=res.metrics,
                       training_config=res.training_config)
    return info, res


def global_model(base_path: Path, fed: Federation, cfg: FedConfig, *, density: float, mask: str = "random",
                 layer_regex: str = DEFAULT_LAYER_REGEX, progress: ProgressFn | None = None,
                 max_train: int | None = None, max_test: int | None = None,
                 runner: Callable[[FedModel], RoundRunner] | None = None, client_ids: Sequence[int] | None = None,
                 min_clients: int = 1, client_sizes: Mapping[int, int] | None = None) -> GlobalResult:
    """Train the global model (FedAvg with the last round's per-layer differences recorded), rank the
    layers, score it on the test split and package it: everything :func:`fed_train` does but register.

    ``runner``/``client_ids``/``min_clients``: see :func:`train_global` (the Flower engine's ServerApp
    calls this with its own runner; the coordinator registers what it returns). ``client_sizes``: the
    clients' row counts that weight the layer ranking (default: the partition's).
    Returns: a :class:`GlobalResult` (adapter, state, metrics, training config, ranking).
    """
    model, state, stats = train_global(base_path, fed, cfg, density=density, mask=mask, layer_regex=layer_regex,
                                       progress=progress, record_layers=True, runner=runner, client_ids=client_ids,
                                       min_clients=min_clients)
    # FUSED's critical layers, from what the clients reported in the last round (no extra round)
    sizes = {str(c): n for c, n in (client_sizes.items() if client_sizes is not None
                                    else enumerate(fed.partition.sizes))}
    ranking = rank_layers(layer_l1_distances(stats.layer_l1, sizes))
    acc = model.accuracy(state, fed.test, cfg.eval_batch_size)
    federation = fed.to_json()
    federation.update({"rounds": cfg.rounds, "local_steps": cfg.local_steps, "max_train": max_train,
                       "max_test": max_test, "density": density, "mask": mask if density < 1 else "full",
                       "layer_regex": layer_regex})
    tc = {"federation": federation, "fedavg": cfg.to_json(), "critical_layers": ranking,
          "layer_differences": {"source": f"last round of fed train (round {stats.rounds})",
                                "client_sizes": sizes, "per_client": stats.layer_l1},
          "stats": stats.to_json()}
    card = {"mask": {"method": mask if density < 1 else "full", "density": density, "granularity": "element",
                     "targets": layer_regex, "target_tensors": sorted(model.layers)},
            "training": {"federated": federation, "fedavg": cfg.to_json()}}
    adapter = state_to_adapter(model, state, task=fed.task, labels=fed.labels, kind="expert", card=card,
                               include_head=True)
    metrics = {"test_accuracy": acc, "train_seconds": round(stats.seconds, 3), "bytes_per_client": stats.bytes_per_client,
               "bytes_total": stats.bytes_total}
    return GlobalResult(adapter, state, fed, stats, metrics, tc, ranking)


def load_global(ws: Workspace, ref: str, *, data: TaskData | None = None) -> tuple[Any, fmt.SparseAdapter, Federation, FedConfig, dict[str, Any]]:
    """Resolve a global model version and rebuild its federation (verifying the partition hash).

    Returns: (VersionInfo, adapter, Federation, FedConfig, federation record).
    Raises: UnlearningError if the version was not trained by ``fed train`` or its data changed.
    """
    info = ws.resolve(ref)
    tc = info.training_config or {}
    rec = tc.get("federation") if isinstance(tc, dict) else None
    if info.kind != "expert" or not rec or "partition_hash" not in rec or "fedavg" not in tc:
        raise UnlearningError(f"{info.ref} was not trained by `adapterhub fed train` (no federation in its training config)")
    cfg = FedConfig(**tc["fedavg"])
    fed = make_federation(rec["task"], int(rec["clients"]), float(rec["alpha"]), int(rec["seed"]), data=data,
                          max_train=rec.get("max_train"), max_test=rec.get("max_test"))
    if fed.partition.hash != rec["partition_hash"]:
        raise UnlearningError(f"the task data of {info.ref} changed: partition hash {fed.partition.hash[:12]} differs "
                              f"from the recorded {rec['partition_hash'][:12]}")
    adapter = ws.load_adapter(info)
    return info, adapter, fed, cfg, rec


__all__ = ["Partition", "dirichlet_partition", "partition_hash", "HashTokenizer", "FedConfig", "FedModel",
           "layer_l1_distances", "rank_layers", "client_layer_l1", "DEFAULT_LAYER_REGEX", "StopRule", "HEAD_LAYER",
           "sparse_head_state", "is_head_key",
           "sparse_delta_state", "local_train", "weighted_average", "fedavg", "ClientUpdate", "client_update",
           "RoundRunner", "LocalRounds", "FedStats", "Federation",
           "make_federation", "train_global", "global_model", "state_to_adapter", "fed_train", "load_global", "GlobalResult",
           "AdapterHubError"]

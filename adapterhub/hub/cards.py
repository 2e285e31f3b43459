"""What adapterhub writes next to an adapter on the Hugging Face Hub.

Two documents per pushed version:

* ``adapterhub.json`` — the machine card (:func:`build_hub_card` / :func:`parse_hub_card`): content hash,
  file name, kind, task, base (name, fingerprint, Hub id), mask statistics, metrics, training config
  and the lineage with each parent's Hub coordinates. ``pull`` trusts nothing it downloads before the
  weights' sha256 matches this card.
* ``README.md`` — the model card people and the Hub read (:func:`build_model_card`), YAML front matter
  built with ``huggingface_hub.ModelCardData`` (``base_model``, ``base_model_relation``,
  ``library_name``, ``tags``, ``datasets``, ``metrics``, ``model-index``) and a body with the mask
  statistics, the training config and the lineage as links.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from ..errors import HubError

HUB_CARD_FORMAT = "adapterhub.hub/1"
WEIGHTS_FILE = "adapter.safetensors"
CARD_FILE = "adapterhub.json"
README_FILE = "README.md"
LIBRARY_NAME = "adapterhub"

# Built-in base sources and the Hub ids of the models they ship (for ``base_model``).
BUILTIN_HUB_IDS = {
    "builtin:minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "builtin:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def is_repo_id(text: object) -> bool:
    """True for ``owner/name`` with Hub-legal characters (no ``..``, no slashes beyond the one)."""
    return isinstance(text, str) and bool(_REPO_ID_RE.match(text)) and ".." not in text and not text.endswith((".git", "."))


def base_hub_id(source: str | None) -> str | None:
    """The Hub model id of a base source: built-ins map to their upstream id, ``owner/name`` stays,
    local folders have none (returns None)."""
    if not source:
        return None
    if source in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[source]
    if is_repo_id(source) and not source.startswith(("/", ".", "~")):
        return source
    return None


def safe_repo_path(path: object) -> str:
    """Return ``path`` if it is a plain relative file path inside a repo, else raise HubError.

    Refuses absolute paths, ``..`` segments, backslashes, drive letters, empty segments and control
    characters: a name from the Hub must never make us read or write outside the download folder.
    """
    if not isinstance(path, str) or not path:
        raise HubError(f"refusing file name from the Hub: {path!r} is not a file name")
    bad = (path.startswith(("/", "~")) or "\\" in path or ":" in path
           or any(seg in ("", ".", "..") for seg in path.split("/"))
           or any(ord(c) < 32 for c in path))
    if bad:
        raise HubError(f"refusing file name from the Hub that could escape the download folder: {path!r}")
    return path


def build_hub_card(version: Any, base: Any, lineage: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``adapterhub.json`` document of a catalog version.

    Takes a ``VersionInfo``-like object (name, number, content_hash, kind, task, mask fields, metrics,
    training_config, card), the ``BaseInfo``-like base (name, source, revision, fingerprint) and the
    lineage entries already resolved to ``{"relation", "weight", "params", "parent": {...}}``.
    Returns a JSON-able dict (deterministic: no clocks, keys sorted when dumped).
    """
    card = getattr(version, "card", None) or {}
    labels = card.get("labels") if isinstance(card, dict) else None
    return {
        "format": HUB_CARD_FORMAT,
        "name": version.name,
        "version": int(version.number),
        "content_hash": version.content_hash,
        "file": WEIGHTS_FILE,
        "size_bytes": getattr(version, "size_bytes", None),
        "kind": version.kind,
        "task": version.task,
        "labels": labels,
        "base": {
            "name": base.name,
            "fingerprint": version.base_fingerprint or base.fingerprint,
            "source": base.source,
            "revision": getattr(base, "revision", None),
            "architecture": getattr(base, "architecture", None),
            "hub_id": base_hub_id(base.source),
        },
        "mask": {
            "method": version.mask_method,
            "density": version.density,
            "granularity": version.granularity,
            "block_size": version.block_size,
            "targets": version.target_modules,
            "nnz": version.nnz,
            "dtype": version.dtype,
        },
        "metrics": version.metrics or {},
        "training": version.training_config or {},
        "lineage": lineage,
    }


def hub_card_bytes(card: Mapping[str, Any]) -> bytes:
    """Canonical bytes of an ``adapterhub.json`` card (sorted keys, 2-space indent, trailing newline)."""
    return (json.dumps(card, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def parse_hub_card(data: bytes, *, where: str = CARD_FILE) -> dict[str, Any]:
    """Parse and check an ``adapterhub.json`` downloaded from the Hub. Raises HubError when malformed
    (not JSON, wrong format id, bad hash, unsafe file name, bad lineage coordinates)."""
    try:
        card = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        # RecursionError: absurdly nested input; ValueError: integers past Python's digit limit
        raise HubError(f"{where}: not a JSON document ({e.__class__.__name__})") from None
    if not isinstance(card, dict) or card.get("format") != HUB_CARD_FORMAT:
        got = card.get("format") if isinstance(card, dict) else None
        raise HubError(f"{where}: not an adapterhub card (format {got!r}, expected {HUB_CARD_FORMAT})")
    if not isinstance(card.get("content_hash"), str) or not _HEX64.match(card["content_hash"]):
        raise HubError(f"{where}: content_hash must be 64 lowercase hex digits")
    safe_repo_path(card.get("file", WEIGHTS_FILE))
    if not isinstance(card.get("name"), str) or not isinstance(card.get("version"), int):
        raise HubError(f"{where}: name and version are required")
    base = card.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise HubError(f"{where}: base fingerprint is required")
    lineage = card.get("lineage", [])
    if not isinstance(lineage, list):
        raise HubError(f"{where}: lineage must be a list")
    for entry in lineage:
        if not isinstance(entry, dict) or not isinstance(entry.get("relation"), str):
            raise HubError(f"{where}: every lineage entry needs a relation")
        parent = entry.get("parent") or {}
        if not isinstance(parent, dict):
            raise HubError(f"{where}: lineage parent must be an object")
        ph = parent.get("content_hash")
        if ph is not None and (not isinstance(ph, str) or not _HEX64.match(ph)):
            raise HubError(f"{where}: lineage parent content_hash is malformed")
        hub = parent.get("hub")
        if hub is not None:
            if not isinstance(hub, dict) or not is_repo_id(hub.get("repo")):
                raise HubError(f"{where}: lineage parent hub repo {hub.get('repo') if isinstance(hub, dict) else hub!r} is not a repo id")
            if hub.get("commit") is not None and not _HEX40.match(str(hub["commit"])):
                raise HubError(f"{where}: lineage parent hub commit is malformed")
    return card


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def build_model_card(card: Mapping[str, Any], *, repo_id: str, endpoint: str | None = None) -> "Any":
    """The ``README.md`` of a pushed version as a ``huggingface_hub.ModelCard``.

    Takes the ``adapterhub.json`` card and the repo id. ``base_model`` is the base's Hub id for experts
    and unlearning adapters (``base_model_relation: adapter``); for merges it lists every parent that
    has Hub coordinates (``base_model_relation: merge``), falling back to the base when none has.
    Returns the ModelCard (``str(card)`` is the file content).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    kind = card.get("kind") or "expert"
    task = card.get("task")
    base = card.get("base") or {}
    base_id = base.get("hub_id")
    lineage = card.get("lineage") or []
    parent_repos = []
    for entry in lineage:
        hub = (entry.get("parent") or {}).get("hub") or {}
        if entry.get("relation") != "imported_from" and hub.get("repo") and hub["repo"] not in parent_repos:
            parent_repos.append(hub["repo"])
    if kind == "merge":
        relation = "merge"
        base_model: str | list[str] | None = parent_repos or base_id
    else:
        relation = "adapter"
        base_model = base_id
    tags = ["adapterhub", "sparse-adapter"] + ([task] if task else []) + ([kind] if kind != "expert" else [])
    metrics = card.get("metrics") or {}
    numeric = {k: float(v) for k, v in sorted(metrics.items())
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    eval_results = None
    if numeric and task:
        eval_results = [EvalResult(task_type="text-classification", dataset_type=task, dataset_name=task,
                                   metric_type=k, metric_value=v) for k, v in numeric.items()]
    data = ModelCardData(
        base_model=base_model,
        library_name=LIBRARY_NAME,
        tags=tags,
        datasets=[task] if task else None,
        metrics=sorted(numeric) or None,
        model_name=repo_id if eval_results else None,
        eval_results=eval_results,
        base_model_relation=relation,
    )
    mask = card.get("mask") or {}
    prefix = (endpoint or "https://huggingface.co").rstrip("/")
    lines = [
        f"# {card.get('name')} v{card.get('version')}",
        "",
        f"A sparse **{kind}** adapter for `{base.get('name')}`"
        + (f" ([{base_id}]({prefix}/{base_id}))" if base_id else "")
        + (f", task `{task}`" if task else "") + ", made with adapterhub.",
        "",
        f"- file: `{card.get('file')}` sha256 `{card.get('content_hash')}`",
        f"- base fingerprint: `{base.get('fingerprint')}`",
        "",
        "## Mask",
        "",
        "| method | density | granularity | block size | non-zeros | dtype |",
        "|---|---|---|---|---|---|",
        f"| {_fmt(mask.get('method'))} | {_fmt(mask.get('density'))} | {_fmt(mask.get('granularity'))} "
        f"| {_fmt(mask.get('block_size'))} | {_fmt(mask.get('nnz'))} | {_fmt(mask.get('dtype'))} |",
        "",
        f"Targets: {', '.join(f'`{t}`' for t in (mask.get('targets') or [])) or '—'}",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
        lines.append("")
    training = card.get("training") or {}
    if training:
        lines += ["## Training config", "", "```json", json.dumps(training, sort_keys=True, indent=2), "```", ""]
    lines += ["## Lineage", ""]
    if not lineage:
        lines.append("No parents: trained from the base.")
    for entry in lineage:
        parent = entry.get("parent") or {}
        hub = parent.get("hub") or {}
        label = f"{parent.get('name')}@{parent.get('version')}" if parent.get("name") else "(unknown)"
        if hub.get("repo"):
            rev = hub.get("tag") or hub.get("commit") or "main"
            label = f"[{label}]({prefix}/{hub['repo']}/tree/{rev}) (`{hub['repo']}@{rev}`)"
        extra = f" weight {_fmt(entry.get('weight'))}" if entry.get("weight") is not None else ""
        method = (entry.get("params") or {}).get("method")
        extra += f" method `{method}`" if method else ""
        lines.append(f"- {entry.get('relation')}: {label}{extra}")
    lines += ["", "Pull it with `adapterhub pull " + f"{repo_id}@v{card.get('version')}`.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))

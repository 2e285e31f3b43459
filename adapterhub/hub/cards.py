"""What adapterhub writes next to an adapter on the Hugging Face Hub.

Two documents per pushed version:

* ``adapterhub.json`` — the machine card (:func:`build_hub_card` / :func:`parse_hub_card`): content hash,
  file name, kind, task, base (name, fingerprint, Hub id), mask statistics, metrics, training config
  and the lineage with each parent's Hub coordinates. ``pull`` trusts nothing it downloads before the
  weights' sha256 matches this card.
* ``README.md`` — the model card people and the Hub read (:func:`build_model_card`), YAML front matter
  built with ``huggingface_hub.ModelCardData`` (``base_model``, ``base_model_relation``,
  ``library_name``, ``tags``, ``datasets``, curated task ``metrics``/``model-index``) and a body with the
  mask statistics, the targets, the task metrics (split, n), usage snippets (adapterhub CLI and
  ``adapterhub.activate``; PEFT on the ``export --format peft`` folder), the training config and the
  lineage as links. Every catalog string is escaped: a card from a hostile Hub cannot inject HTML or links.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

from ..bases import CNN_ARCHITECTURE
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


# Task metrics a model card may show (curated: never steps, timings, sizes or local deployment figures).
TASK_METRICS = ("accuracy", "f1", "f1_macro", "f1_micro", "f1_weighted", "precision", "recall", "exact_match",
                "matthews_correlation", "mcc", "auc", "roc_auc", "bleu", "sacrebleu", "chrf", "rouge1", "rouge2",
                "rougeL", "rougeLsum", "perplexity")
_METRIC_KEY_RE = re.compile(r"^(?:(?P<task>[A-Za-z0-9][A-Za-z0-9_.\-]{0,99})/)?(?:(?P<split>train|validation|test)_)?"
                            r"(?P<metric>" + "|".join(TASK_METRICS) + r")$")
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def md_code(value: object, *, cell: bool = False) -> str:
    """``value`` as an inline code span: inert in CommonMark/GFM (no HTML, no link, no autolink, no
    emphasis). Control characters and newlines become spaces and the backtick fence is longer than any
    backtick run inside; in a table cell (``cell=True``) ``|`` is escaped so that the cell cannot be split."""
    text = "".join(" " if (ord(c) < 32 or 0x7f <= ord(c) < 0xa0 or c in "\u2028\u2029") else c
                   for c in _fmt(value))
    if cell:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_text(value: object, *, cell: bool = False) -> str:
    """``value`` as Markdown text: as it is when it is plain (letters, digits, space and ``_ . , - + = /``,
    or the placeholder ``—``), else as an inert code span (:func:`md_code`), so that a string from a
    hostile catalog can add no link, image, HTML element, table cell or heading to a card."""
    text = _fmt(value)
    if text == "—" or (re.fullmatch(r"[A-Za-z0-9_.,\-+=/ ]{1,200}", text) and "//" not in text
                       and "www." not in text.lower() and not text.startswith((" ", "-", "+", "="))):
        return text
    return md_code(text, cell=cell)


def _py(value: str) -> str:
    """A Python string literal on one line (a fenced block cannot be closed from inside it)."""
    return json.dumps(value, ensure_ascii=True)


def task_metrics(card: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The curated task metrics of a card, as ``{"task", "split", "metric", "value", "n"}`` rows sorted by
    (task, split, metric).

    Keeps ``[<task>/][<split>_]<metric>`` keys whose metric is one of :data:`TASK_METRICS` and whose value
    is a finite number; ``task`` is the card's own task when the key has no prefix; ``n`` is the matching
    ``[<task>/]<split>_n`` when recorded. Everything else (``steps``, ``train_seconds``, losses, sizes,
    ``deployment:<name>/…`` figures of a local deployment) stays out."""
    metrics = card.get("metrics") or {}
    own = card.get("task")
    rows = []
    for key, value in metrics.items():
        m = _METRIC_KEY_RE.match(key) if isinstance(key, str) else None
        if m is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                or value in (float("inf"), float("-inf")):
            continue
        task = m.group("task") or own
        split = m.group("split")
        n = None
        if split:
            raw_n = metrics.get((f"{m.group('task')}/" if m.group("task") else "") + f"{split}_n")
            n = raw_n if isinstance(raw_n, int) and not isinstance(raw_n, bool) else None
        rows.append({"task": task if isinstance(task, str) else None, "split": split, "metric": m.group("metric"),
                     "value": float(value), "n": n})
    return sorted(rows, key=lambda r: (r["task"] or "", r["split"] or "", r["metric"]))


def _targets(targets: Any) -> str:
    """The ``Targets:`` line: a regex shown as one regex, a list as its items."""
    if isinstance(targets, str) and targets:
        return f"regex {md_code(targets)}"
    if isinstance(targets, (list, tuple)) and targets:
        return ", ".join(md_code(t) for t in targets)
    return "—"


def _usage(card: Mapping[str, Any], repo_id: str, base_id: str | None) -> list[str]:
    """Usage snippets: adapterhub (CLI pull, Python ``adapterhub.activate``) and PEFT (the export)."""
    version = int(card.get("version") or 0)
    ref = f"{repo_id}@v{version}"
    local = repo_id.replace("/", "--")
    folder = repo_id.split("/", 1)[1] + "-peft"
    base = base_id or "PATH/TO/BASE"
    classifier = bool(card.get("labels"))
    base_card = card.get("base")
    image = isinstance(base_card, Mapping) and base_card.get("architecture") == CNN_ARCHITECTURE
    auto = "AutoModel" if classifier else "AutoModelForCausalLM"
    loader = (["from adapterhub.bases.cnn import load_cnn", "", f"model = load_cnn({_py(base)})"] if image
              else [f"from transformers import {auto}", "", f"model = {auto}.from_pretrained({_py(base)})"])
    lines = ["## Use it", "", "With adapterhub (the weights are checked against the sha256 above):", "",
             "```bash", f"adapterhub pull {ref}", "```", "", "```python", "import adapterhub", *loader,
             f"with adapterhub.activate(model, {_py(ref)}) as handle:  # leaving the block reverts exactly"]
    lines += (["    print(handle.predict([\"an example sentence\"]))"] if classifier and not image
              else ["    ...  # use model as usual"])
    if image:  # the digits CNN is adapterhub's own module, not a transformers model PEFT can load
        return lines + ["```", ""]
    lines += ["```", "", "With PEFT, export the pulled version as a PEFT SHiRA folder first:", "", "```bash",
              f"adapterhub export {local}@1 ./{folder} --format peft  # the first version pulled under {local}",
              "```", "", "```python", "from peft import PeftModel", f"from transformers import {auto}", "",
              f"model = PeftModel.from_pretrained({auto}.from_pretrained({_py(base)}), {_py('./' + folder)})",
              "```", ""]
    return lines


def build_model_card(card: Mapping[str, Any], *, repo_id: str, endpoint: str | None = None) -> "Any":
    """:func:`model_card_text` as a ``huggingface_hub.ModelCard`` (``str(card)`` is the same text)."""
    from huggingface_hub import ModelCard

    return ModelCard(model_card_text(card, repo_id=repo_id, endpoint=endpoint))


def model_card_text(card: Mapping[str, Any], *, repo_id: str, endpoint: str | None = None) -> str:
    """The ``README.md`` of a pushed version: YAML front matter and a markdown body.

    Takes the ``adapterhub.json`` card and the repo id. ``base_model`` is the base's Hub id for experts
    and unlearning adapters (``base_model_relation: adapter``); for merges it lists every parent that
    has Hub coordinates (``base_model_relation: merge``), falling back to the base when none has.
    ``metrics``/``model-index`` hold the curated task metrics only (:func:`task_metrics`). The body:
    summary, mask, targets, metrics (split and n), usage snippets (adapterhub and PEFT), training config
    and lineage (relation, weight, method). Deterministic (same card → same bytes) and hostile-safe:
    every catalog string is escaped (:func:`md_text`); only validated repo ids and revisions become links.
    Returns the file's text: exactly ``str(ModelCard(text))`` (tests/test_cards.py), built without that round
    trip, which parses the front matter back and dumps it again (~2.5 ms of every push, issue 19).
    """
    from huggingface_hub import EvalResult, ModelCardData

    kind = card.get("kind") or "expert"
    kind = kind if isinstance(kind, str) and _SAFE_ID_RE.match(kind) else "expert"
    task = card.get("task")
    safe_task = task if isinstance(task, str) and _SAFE_ID_RE.match(task) else None
    base = card.get("base") or {}
    base_id = base.get("hub_id") if is_repo_id(base.get("hub_id")) else None
    lineage = card.get("lineage") or []
    parent_repos = []
    for entry in lineage:
        hub = (entry.get("parent") or {}).get("hub") or {}
        if entry.get("relation") != "imported_from" and is_repo_id(hub.get("repo")) and hub["repo"] not in parent_repos:
            parent_repos.append(hub["repo"])
    if kind == "merge":
        relation = "merge"
        base_model: str | list[str] | None = parent_repos or base_id
    else:
        relation = "adapter"
        base_model = base_id
    tags = ["adapterhub", "sparse-adapter"] + ([safe_task] if safe_task else []) + ([kind] if kind != "expert" else [])
    curated = task_metrics(card)
    eval_results = [EvalResult(task_type="text-classification", dataset_type=r["task"], dataset_name=r["task"],
                               dataset_split=r["split"], metric_type=r["metric"], metric_value=r["value"],
                               metric_name=r["metric"] + (f" ({r['split']}, n={r['n']})" if r["split"] and r["n"]
                                                          else f" ({r['split']})" if r["split"] else ""))
                    for r in curated if r["task"] and _SAFE_ID_RE.match(r["task"])] or None
    data = ModelCardData(
        base_model=base_model,
        library_name=LIBRARY_NAME,
        tags=tags,
        datasets=[safe_task] if safe_task else None,
        metrics=sorted({r["metric"] for r in curated}) or None,
        model_name=repo_id if eval_results else None,
        eval_results=eval_results,
        base_model_relation=relation,
    )
    mask = card.get("mask") or {}
    prefix = (endpoint or "https://huggingface.co").rstrip("/")
    lines = [
        f"# {md_text(card.get('name'))} v{md_text(card.get('version'))}",
        "",
        f"A sparse **{kind}** adapter for {md_code(base.get('name'))}"
        + (f" ([{base_id}]({prefix}/{base_id}))" if base_id else "")
        + (f", task {md_code(task)}" if task else "") + ", made with adapterhub.",
        "",
        f"- file: {md_code(card.get('file'))} sha256 {md_code(card.get('content_hash'))}",
        f"- base fingerprint: {md_code(base.get('fingerprint'))}",
        "",
        "## Mask",
        "",
        "| method | density | granularity | block size | non-zeros | dtype |",
        "|---|---|---|---|---|---|",
        "| " + " | ".join(md_text(mask.get(k), cell=True) for k in ("method", "density", "granularity", "block_size", "nnz",
                                                          "dtype")) + " |",
        "",
        f"Targets: {_targets(mask.get('targets'))}",
        "",
    ]
    if curated:
        lines += ["## Metrics", "", "| task | split | metric | value | n |", "|---|---|---|---|---|"]
        lines += [f"| {md_text(r['task'], cell=True)} | {md_text(r['split'])} | {md_text(r['metric'])} | {_fmt(r['value'])} "
                  f"| {_fmt(r['n'])} |" for r in curated]
        lines.append("")
    lines += _usage(card, repo_id, base_id)
    training = card.get("training") or {}
    if training:  # JSON inside a fence: json.dumps escapes newlines, so no line can close the fence
        body = json.dumps(training, sort_keys=True, indent=2, ensure_ascii=True).replace("`", "\\u0060")
        lines += ["## Training config", "", "```json", body, "```", ""]
    lines += ["## Lineage", ""]
    if not lineage:
        lines.append("No parents: trained from the base.")
    for entry in lineage:
        parent = entry.get("parent") or {}
        hub = parent.get("hub") or {}
        label = (f"{md_text(parent.get('name'))}@{md_text(parent.get('version'))}" if parent.get("name")
                 else "(unknown)")
        if is_repo_id(hub.get("repo")):
            rev = next((r for r in (hub.get("tag"), hub.get("commit")) if isinstance(r, str) and _SAFE_ID_RE.match(r)),
                       "main")
            label = f"[{label}]({prefix}/{hub['repo']}/tree/{rev}) (`{hub['repo']}@{rev}`)"
        extra = f", weight {md_text(entry.get('weight'))}" if entry.get("weight") is not None else ""
        method = (entry.get("params") or {}).get("method")
        extra += f", method {md_code(method)}" if method else ""
        lines.append(f"- {md_code(entry.get('relation'))}: {label}{extra}")
    lines.append("")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)

"""What each page of the web view shows, as plain dicts built from one :class:`Workspace` (no HTTP here).

The app (:mod:`adapterhub.ui.app`) renders these with Jinja2; the JSON API serves the CLI's ``--json``
documents (:mod:`adapterhub.views.documents`, ``to_json()`` of the records) instead, so the two never
drift apart. Every builder raises the library's errors (RefError, DeploymentError...) for unknown names.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from ..catalog.metrics import current_rows
from ..errors import AdapterHubError, CatalogError
from .svg import bar_chart_svg, heatmap_svg, lineage_svg

if TYPE_CHECKING:  # pragma: no cover
    from ..catalog.records import VersionInfo
    from ..workspace import Workspace

PAGE_SIZES = (25, 50, 100, 200)
MAX_METRIC_COLUMNS = 6
MAX_COMPARE = 6
KINDS = ("expert", "merge", "unlearning")  # the catalog's adapter kinds (a CHECK constraint of the schema)


@dataclass(frozen=True)
class CatalogQuery:
    """The catalog page's filters, sort and page (from the query string; validated by :func:`parse_query`)."""

    task: str | None = None
    base: str | None = None
    kind: str | None = None
    tag: str | None = None
    search: str | None = None
    sort: str | None = None
    descending: bool = False
    columns: tuple[str, ...] = ()
    page: int = 1
    per_page: int = 50
    show_all: bool = False

    def filters(self) -> dict[str, Any]:
        """Keyword arguments of ``Workspace.list_versions``/``count_versions`` for these filters."""
        return {"task": self.task, "base": self.base, "kind": self.kind, "tag": self.tag, "search": self.search,
                "include_deprecated": self.show_all}

    def params(self, **change: Any) -> dict[str, str]:
        """The query string of this query with ``change`` applied (only the non-default values)."""
        d = {"task": self.task, "base": self.base, "kind": self.kind, "tag": self.tag, "q": self.search,
             "sort": self.sort, "desc": "1" if self.descending else None,
             "columns": ",".join(self.columns) or None, "page": str(self.page) if self.page != 1 else None,
             "per_page": str(self.per_page) if self.per_page != 50 else None, "all": "1" if self.show_all else None}
        for k, v in change.items():
            d[k] = v
        return {k: v for k, v in d.items() if v not in (None, "")}


def _text(v: str | None, limit: int = 200) -> str | None:
    v = (v or "").strip()
    if not v:
        return None
    if len(v) > limit:
        raise CatalogError(f"a filter value is longer than {limit} characters")
    return v


def parse_query(get: Callable[[str], str | None]) -> CatalogQuery:
    """A :class:`CatalogQuery` from query-string values (``get(name)``). Raises CatalogError for bad values."""
    def number(name: str, default: int) -> int:
        raw = get(name)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise CatalogError(f"{name} must be a whole number") from None
    page = number("page", 1)
    per_page = number("per_page", 50)
    if page < 1 or page > 1_000_000:
        raise CatalogError("page must be between 1 and 1000000")
    if per_page not in PAGE_SIZES:
        raise CatalogError(f"per_page must be one of {', '.join(map(str, PAGE_SIZES))}")
    cols = tuple(dict.fromkeys(c for c in (_text(get("columns"), 1000) or "").split(",") if c.strip()))
    if len(cols) > MAX_METRIC_COLUMNS:
        raise CatalogError(f"at most {MAX_METRIC_COLUMNS} metric columns")
    for c in cols:
        if len(c) > 100:
            raise CatalogError("a metric name is longer than 100 characters")
    kind = _text(get("kind"))
    if kind is not None and kind not in KINDS:
        raise CatalogError(f"kind must be one of {', '.join(KINDS)}")
    return CatalogQuery(task=_text(get("task")), base=_text(get("base")), kind=kind, tag=_text(get("tag")),
                        search=_text(get("q")), sort=_text(get("sort"), 100), descending=get("desc") == "1",
                        columns=cols, page=page, per_page=per_page, show_all=get("all") == "1")


def catalog_page(ws: Workspace, q: CatalogQuery) -> dict[str, Any]:
    """One page of versions with the filters' choices, the metric columns and the page count.

    The metric columns are the query's ``columns``, else (up to six of) the metrics the versions on this
    page have; each can sort the whole filtered catalog (``list --sort``)."""
    total = ws.count_versions(**q.filters())
    pages = max(1, math.ceil(total / q.per_page))
    extra = list(dict.fromkeys([*([q.sort] if q.sort else []), *q.columns]))
    versions = ws.list_versions(**q.filters(), sort=q.sort, descending=q.descending, columns=extra,
                                limit=q.per_page, offset=(q.page - 1) * q.per_page)
    columns = list(q.columns)
    if not columns:
        columns = _common_metrics(versions)
    if q.sort and q.sort not in columns:
        columns = [q.sort, *columns]
    return {"query": q, "total": total, "pages": pages, "versions": versions, "columns": columns,
            "rows": [{"v": v, "metrics": [_metric_cell((v.metrics or {}).get(c)) for c in columns]} for v in versions],
            "facets": ws.catalog_facets(), "bases": [b.name for b in ws.list_bases()]}


def _common_metrics(versions: Sequence[VersionInfo]) -> list[str]:
    """The numeric metrics most versions on the page have (at most six, most common first)."""
    count: dict[str, int] = {}
    for v in versions:
        for k, val in (v.metrics or {}).items():
            if isinstance(val, (int, float)) and not isinstance(val, bool) and not k.endswith("_n"):
                count[k] = count.get(k, 0) + 1
    return [k for k, _ in sorted(count.items(), key=lambda kv: (-kv[1], kv[0]))][:MAX_METRIC_COLUMNS]


def _metric_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if isinstance(v, (int, str)) else ""


def _shapes_of(data: bytes) -> dict[str, tuple[int, ...]]:
    from .. import format as fmt

    with fmt.open_adapter(data) as r:
        return {k: r.param_shape(k) for k in r.keys()}


_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def param_shapes(ws: Workspace, info: VersionInfo) -> dict[str, tuple[int, ...]] | None:
    """Each adapted tensor's shape, read from the version's file header (cached by content hash: blobs
    never change); None when the blob cannot be read (a store problem: the page says so)."""
    got = _SHAPES.get(info.content_hash)
    if got is None:
        try:
            got = _shapes_of(ws.adapter_bytes(info))
        except (AdapterHubError, OSError):
            return None
        if len(_SHAPES) > 1024:
            _SHAPES.clear()
        _SHAPES[info.content_hash] = got
    return got


def mask_rows(ws: Workspace, info: VersionInfo) -> tuple[list[dict[str, Any]], bool]:
    """Per-tensor (name, nnz, numel, density) rows and whether the shapes (hence densities) are known."""
    nnz = info.nnz_per_param if isinstance(info.nnz_per_param, dict) else {}
    shapes = param_shapes(ws, info) if nnz else None
    rows = []
    for name in sorted(nnz):
        n = nnz[name] if isinstance(nnz[name], int) else 0
        numel = math.prod(shapes[name]) if shapes and name in shapes else None
        rows.append({"name": name, "nnz": n, "shape": list(shapes[name]) if shapes and name in shapes else None,
                     "numel": numel, "density": (n / numel) if numel else None})
    return rows, shapes is not None


def _readme(ws: Workspace, info: VersionInfo) -> str:
    """The README.md ``push`` would write for the version (the Hub's model card)."""
    from ..hub.cards import build_hub_card, model_card_text
    from ..hub.client import _lineage_for_card

    base = ws.get_base(info.base, resolve_path=False)
    card = build_hub_card(info, base, _lineage_for_card(ws, info.ref))
    card["size_bytes"] = info.size_bytes
    return model_card_text(card, repo_id=info.hub_repo or f"you/{info.name}", endpoint=info.hub_endpoint)


def readme_text(ws: Workspace, ref: str) -> str:
    """The model card of ``ref`` as Markdown (front matter included): what the Hub would show."""
    return _readme(ws, ws.resolve(ref))


def render_markdown(text: str) -> Markup:
    """Markdown to HTML as the Hub renders a card, with raw HTML disabled (``html=False``: tags are shown
    as text) and unsafe link schemes refused (markdown-it's ``validateLink``); front matter dropped."""
    from markdown_it import MarkdownIt

    from .safe import visible

    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            text = text[end + 5:]
    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    return Markup(md.render(visible(text, newlines=True)))


def hub_url(info: VersionInfo) -> str | None:
    """The Hub page of a pushed version (``<endpoint>/<repo>/tree/<tag or commit>``), or None."""
    from ..hub.cards import is_repo_id

    if not is_repo_id(info.hub_repo):
        return None
    endpoint = info.hub_endpoint or "https://huggingface.co"
    if not endpoint.startswith(("https://", "http://")) or any(c in endpoint for c in "\"'<> \\"):
        return None
    rev = next((r for r in (info.hub_tag, info.hub_commit)
                if isinstance(r, str) and r and all(c.isalnum() or c in "-_." for c in r)), "main")
    return f"{endpoint.rstrip('/')}/{info.hub_repo}/tree/{rev}"


def version_page(ws: Workspace, ref: str, *, href: Callable[[str], str], max_depth: int = 4) -> dict[str, Any]:
    """Everything the version page shows: record, parents, mask chart, metrics and their history, the card
    preview, tags, Hub link and the lineage DAG (ancestors and descendants, ``max_depth`` levels each)."""
    info = ws.resolve(ref)
    parents = ws.parents(info.ref)
    history = ws.metric_history(info.ref)
    shown = {id(r) for r in current_rows(history)}
    # one level more than drawn, so the picture can say that there is more
    anc = ws.lineage(info.ref, direction="ancestors", max_depth=max_depth + 1)
    desc = ws.lineage(info.ref, direction="descendants", max_depth=max_depth + 1)
    rows, have_shapes = mask_rows(ws, info)
    if have_shapes:
        chart = bar_chart_svg([(r["name"], r["density"] or 0.0, f"{100 * (r['density'] or 0):.3g}% ({r['nnz']:,})")
                               for r in rows], max_value=max((r["density"] or 0 for r in rows), default=0) or 1)
    else:
        chart = bar_chart_svg([(r["name"], float(r["nnz"]), f"{r['nnz']:,}") for r in rows])
    try:
        card_html: Markup | None = render_markdown(_readme(ws, info))
        card_error = None
    except AdapterHubError as e:
        card_html, card_error = None, str(e)
    return {"v": info, "doc": info.to_json(), "parents": parents, "deprecated": ws.is_deprecated(info.ref),
            "history": [(r, id(r) in shown) for r in history], "mask_rows": rows, "have_shapes": have_shapes,
            "density_chart": chart, "card_html": card_html, "card_error": card_error, "hub_url": hub_url(info),
            "lineage_svg": lineage_svg(info.ref, anc, desc, href=href, max_depth=max_depth),
            "ancestors": anc, "descendants": desc, "max_depth": max_depth,
            "unlearning": unlearning_summary(info) if info.kind == "unlearning" else None}


def compare_page(ws: Workspace, refs: Sequence[str]) -> dict[str, Any]:
    """Two to six versions side by side: their metrics, and for every pair the per-tensor mask Jaccard
    (a heatmap: tensors x pairs) and value statistics (what ``diff`` computes)."""
    from ..views.diff import AdapterDiff, diff_versions

    if not 2 <= len(refs) <= MAX_COMPARE:
        raise CatalogError(f"compare takes 2 to {MAX_COMPARE} versions")
    infos = [ws.resolve(r) for r in refs]
    names = sorted({k for i in infos for k, v in (i.metrics or {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    metrics = [{"name": n, "values": [_metric_cell((i.metrics or {}).get(n)) for i in infos]} for n in names]
    diffs: list[AdapterDiff] = []
    for a in range(len(infos)):
        for b in range(a + 1, len(infos)):
            diffs.append(diff_versions(ws, infos[a].ref, infos[b].ref))  # what `diff` computes, read lazily
    pairs = [{"label": f"{d.a} vs {d.b}", "diff": d, "doc": d.to_json()} for d in diffs]
    tensors = sorted({p.name for d in diffs for p in d.params})
    jac = [[next((p.jaccard for p in d.params if p.name == t), None) for d in diffs] for t in tensors]
    heat = heatmap_svg(tensors, [f"{d.a} vs {d.b}" for d in diffs], jac)
    return {"versions": infos, "metrics": metrics, "pairs": pairs, "heatmap": heat}


def unlearning_summary(info: VersionInfo) -> dict[str, Any]:
    """An unlearning version's forget spec and its figures, read generically from what it stores.

    ``rows``: each numeric metric with this version's value ("after") and the value of every nested
    group of the same metric (e.g. ``global``: the model before unlearning; ``retrain``: the retrained
    baseline), whichever groups the version recorded."""
    tc = info.training_config if isinstance(info.training_config, dict) else {}
    forget = tc.get("forget")
    spec = forget.get("spec") if isinstance(forget, dict) else forget
    card = info.card if isinstance(info.card, dict) else {}
    unl = card.get("unlearning")
    if spec is None and isinstance(unl, dict) and isinstance(unl.get("forget"), dict):
        spec = unl["forget"].get("spec")
    m = info.metrics if isinstance(info.metrics, dict) else {}
    groups = sorted(k for k, v in m.items() if isinstance(v, dict))

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    keys = sorted({k for k, v in m.items() if num(v) is not None}
                  & ({k for g in groups for k, v in m[g].items() if num(v) is not None} or {k for k in m}))
    rows = [{"name": k, "after": num(m.get(k)), "groups": [num(m[g].get(k)) for g in groups]} for k in keys]
    other = {k: v for k, v in m.items() if num(v) is not None and k not in keys}
    return {"spec": None if spec is None else str(spec), "forget": forget, "groups": groups, "rows": rows,
            "other": other}


def deployment_page(ws: Workspace, name: str, *, measure: bool = False) -> dict[str, Any]:
    """A deployment's stack, event history (with state fingerprints), ``verify`` result, and the unlearning
    versions in its stack with their forget spec and before/after figures.

    ``measure``: hash every weight byte (``deploy verify``); by default the page takes the cheap stat check
    and re-hashes only when it fails, so a view of a multi-GB deployment does not read the model."""
    from ..apply import deployments

    info = deployments.get(ws, name)
    events = deployments.history(ws, name)
    try:
        check: dict[str, Any] = deployments.verify(ws, name, measure=measure)
        check["why"] = None if check["ok"] else deployments.why_not_ok(check)
    except (AdapterHubError, OSError) as e:
        check = {"ok": False, "why": str(e), "expected": info.state, "actual": None, "problems": [str(e)]}
    layers = []
    for layer in info.stack:
        ref = layer.get("ref")
        v = None
        try:
            v = ws.resolve(str(ref))
        except AdapterHubError:
            pass
        layers.append({"layer": layer, "v": v,
                       "unlearning": unlearning_summary(v) if v is not None and v.kind == "unlearning" else None})
    unlearned = [x for x in layers if x["unlearning"] is not None]
    return {"d": info, "doc": info.to_json(), "events": events, "verify": check, "layers": layers,
            "unlearned": unlearned}


def deployments_page(ws: Workspace) -> dict[str, Any]:
    from ..apply import deployments

    return {"deployments": deployments.list_deployments(ws)}


def bases_page(ws: Workspace) -> dict[str, Any]:
    return {"bases": ws.list_bases()}


def hub_page(ws: Workspace, *, limit: int = 500) -> dict[str, Any]:
    """Versions pushed to the Hub (repo, revision, link), newest first."""
    vs = ws.list_versions(on_hub=True, limit=limit)
    return {"versions": [(v, hub_url(v)) for v in vs], "total": ws.count_versions(on_hub=True), "limit": limit}


__all__ = ["CatalogQuery", "bases_page", "catalog_page", "compare_page", "deployment_page", "deployments_page",
           "hub_page", "hub_url", "mask_rows", "param_shapes", "parse_query", "readme_text", "render_markdown",
           "unlearning_summary", "version_page"]

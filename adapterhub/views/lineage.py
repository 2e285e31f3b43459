"""Render lineage edges (from :meth:`adapterhub.workspace.Workspace.lineage`) as text, JSON, Mermaid or Graphviz DOT.

Edges point child -> parent. A parent of ``None`` is external provenance (``imported_from``), shown as a
node labelled from the edge's params. Renderers form a registry so the CLI's choices come from it.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from ..errors import CatalogError

Edge = dict[str, Any]


def external_label(e: Edge) -> str:
    """The node label of an edge's external parent (``imported_from`` provenance: format and path or repo)."""
    p = e.get("params") or {}
    src = p.get("format") or p.get("source") or "external"
    what = p.get("path") or p.get("repo") or p.get("base_model_name_or_path")
    return f"{src}:{what}" if what else str(src)


def edge_label(e: Edge) -> str:
    """``relation`` and, when set, ``w=<weight>``: how an edge is labelled in every rendering."""
    lab = str(e["relation"])
    if e.get("weight") is not None:
        lab += f" w={e['weight']:g}"
    return lab


def nodes_of(root: str, edges: Sequence[Edge]) -> list[str]:
    """All node labels: the root, then every child/parent ref (externals labelled), sorted."""
    names = {root}
    for e in edges:
        names.add(e["child"])
        names.add(e["parent"] if e["parent"] is not None else external_label(e))
    return [root] + sorted(names - {root})


def lineage_document(root: str, direction: str, edges: Sequence[Edge]) -> dict[str, Any]:
    """``lineage --format json``'s document: root, direction, node labels and the edges."""
    return {"root": root, "direction": direction, "nodes": nodes_of(root, edges), "edges": list(edges)}


def render_json(root: str, direction: str, edges: Sequence[Edge]) -> str:
    return json.dumps(lineage_document(root, direction, edges), indent=2, sort_keys=True, default=str)


def render_text(root: str, direction: str, edges: Sequence[Edge]) -> str:
    """An indented tree from the root; a node reached twice (diamonds in merges) is printed once, then referenced."""
    nxt: dict[str, list[tuple[str, Edge]]] = {}
    for e in edges:
        parent = e["parent"] if e["parent"] is not None else external_label(e)
        if direction == "ancestors":
            nxt.setdefault(e["child"], []).append((parent, e))
        else:
            nxt.setdefault(parent, []).append((e["child"], e))
    arrow = "<-" if direction == "ancestors" else "->"
    lines = [root]
    seen = {root}

    def walk(node: str, prefix: str) -> None:
        kids = sorted(nxt.get(node, []), key=lambda t: (t[0], t[1]["relation"]))
        for i, (kid, e) in enumerate(kids):
            last = i == len(kids) - 1
            mark = " (see above)" if kid in seen and nxt.get(kid) else ""
            lines.append(f"{prefix}{'└── ' if last else '├── '}{arrow} {edge_label(e)}: {kid}{mark}")
            if kid not in seen:
                seen.add(kid)
                walk(kid, prefix + ("    " if last else "│   "))

    walk(root, "")
    if len(lines) == 1:
        lines.append(f"(no {direction})")
    return "\n".join(lines)


def _ids(root: str, edges: Sequence[Edge]) -> dict[str, str]:
    return {n: f"n{i}" for i, n in enumerate(nodes_of(root, edges))}


def render_mermaid(root: str, direction: str, edges: Sequence[Edge]) -> str:
    ids = _ids(root, edges)
    out = ["graph BT"]
    for n, i in ids.items():
        out.append(f'    {i}["{n.replace(chr(34), "#quot;")}"]')
    for e in edges:
        parent = e["parent"] if e["parent"] is not None else external_label(e)
        out.append(f"    {ids[e['child']]} -->|{edge_label(e)}| {ids[parent]}")
    out.append(f"    style {ids[root]} stroke-width:3px")
    return "\n".join(out)


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(root: str, direction: str, edges: Sequence[Edge]) -> str:
    out = ["digraph lineage {", "    rankdir=BT;", "    node [shape=box];", f"    {_dot_str(root)} [penwidth=3];"]
    for n in nodes_of(root, edges)[1:]:
        out.append(f"    {_dot_str(n)};")
    for e in edges:
        parent = e["parent"] if e["parent"] is not None else external_label(e)
        out.append(f"    {_dot_str(e['child'])} -> {_dot_str(parent)} [label={_dot_str(edge_label(e))}];")
    out.append("}")
    return "\n".join(out)


RENDERERS: dict[str, Callable[[str, str, Sequence[Edge]], str]] = {
    "text": render_text, "json": render_json, "mermaid": render_mermaid, "dot": render_dot,
}


def render(root: str, edges: Sequence[Edge], *, direction: str = "ancestors", fmt: str = "text") -> str:
    """Render lineage edges of ``root``; raises CatalogError for an unknown format (listing the valid ones)."""
    try:
        fn = RENDERERS[fmt]
    except KeyError:
        raise CatalogError(f"unknown lineage format {fmt!r}; use one of {', '.join(RENDERERS)}") from None
    return fn(root, direction, edges)


__all__ = ["render", "RENDERERS", "nodes_of", "lineage_document", "external_label", "edge_label"]

"""Pictures for the web view, drawn server-side as inline SVG (no JavaScript, no Graphviz).

* :func:`lineage_svg`: the lineage DAG of one version, ancestors above it and descendants below, laid out
  in layers by depth (a Sugiyama-style layering with barycentre ordering), edges labelled by relation and
  weight, each catalog node a link to its page. Depth-limited and width-limited for huge graphs: what is
  left out is counted in a note.
* :func:`bar_chart_svg`: horizontal bars (per-tensor non-zeros or density).
* :func:`heatmap_svg`: a matrix of values in [0, 1] (per-tensor mask Jaccard of several versions).

Every string that comes from the catalog is escaped with :func:`markupsafe.escape` (names, tasks and
tensor names can come from a hostile Hub); the returned :class:`markupsafe.Markup` is safe to inline.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from ..views.lineage import edge_label, external_label
from .safe import esc as escape

NODE_W, NODE_H, GAP_X, GAP_Y = 190, 34, 26, 78
MAX_LABEL = 26

Href = Callable[[str], str]


def _clip(text: str, n: int = MAX_LABEL) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


@dataclass
class _Node:
    key: str
    label: str
    layer: int
    ref: str | None  # a catalog REF (links to its page), None for external provenance and "+N more"
    root: bool = False
    x: float = 0.0
    y: float = 0.0


@dataclass
class Layout:
    """Where :func:`layout_lineage` put each node and edge (the SVG is drawn from it; tests read it)."""

    nodes: dict[str, _Node] = field(default_factory=dict)
    edges: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)  # (child, parent, label, edge)
    hidden_edges: int = 0
    hidden_nodes: int = 0
    width: float = 0.0
    height: float = 0.0


def layout_lineage(root: str, ancestors: Sequence[dict[str, Any]], descendants: Sequence[dict[str, Any]], *,
                   max_depth: int = 4, max_per_layer: int = 12) -> Layout:
    """Layered layout of ``root``'s lineage: ancestor depth ``d`` on layer ``-d``, descendants on ``+d``.

    Takes the edge lists of :meth:`Workspace.lineage` for both directions. Edges deeper than
    ``max_depth`` and nodes beyond ``max_per_layer`` in a layer are left out (counted in ``hidden_*``).
    """
    lay = Layout()
    layer_of: dict[str, int] = {root: 0}
    kept: list[tuple[str, str, dict[str, Any]]] = []
    for sign, edges in ((-1, ancestors), (1, descendants)):
        for e in sorted(edges, key=lambda e: (e["depth"], e["child"], e["parent"] or "")):
            if e["depth"] > max_depth:
                lay.hidden_edges += 1
                continue
            parent = e["parent"] if e["parent"] is not None else "ext:" + external_label(e)
            far = parent if sign < 0 else e["child"]
            layer_of.setdefault(far, sign * int(e["depth"]))
            kept.append((e["child"], parent, e))
    layers: dict[int, list[str]] = {}
    for key, layer in layer_of.items():
        layers.setdefault(layer, []).append(key)
    # order each layer by the mean position of its neighbours in the layer nearer the root (barycentre),
    # walking outwards from the root, so crossings stay few without a global optimisation
    neighbours: dict[str, list[str]] = {}
    for child, parent, _ in kept:
        neighbours.setdefault(child, []).append(parent)
        neighbours.setdefault(parent, []).append(child)
    pos: dict[str, float] = {root: 0.0}
    more_of: dict[int, int] = {}
    for direction in (-1, 1):
        layer = direction
        while layer in layers:
            def bary(k: str, inner: int = layer - direction) -> float | None:
                xs = [pos[n] for n in neighbours.get(k, []) if layer_of.get(n) == inner and n in pos]
                return sum(xs) / len(xs) if xs else None
            want = {k: bary(k) for k in layers[layer]}
            members = sorted(layers[layer], key=lambda k: (want[k] if want[k] is not None else 0.0, k))
            if len(members) > max_per_layer:
                more_of[layer] = len(members) - max_per_layer + 1
                lay.hidden_nodes += more_of[layer]
                more = f"more:{layer}"
                members = members[:max_per_layer - 1] + [more]
                layer_of[more] = layer
            layers[layer] = members
            # each node over its neighbours nearer the root (a lone parent sits above its child), at least one
            # slot apart, the row shifted so that it stays centred on where its nodes would like to be
            xs: list[float] = []
            for k in members:
                w = want.get(k)
                x = w if w is not None else (xs[-1] + 1 if xs else 0.0)
                xs.append(max(x, xs[-1] + 1) if xs else x)
            gaps = [w - x for x, w in ((x, want.get(k)) for x, k in zip(xs, members, strict=True)) if w is not None]
            shift = sum(gaps) / len(gaps) if gaps else -(xs[0] + xs[-1]) / 2
            for x, k in zip(xs, members, strict=True):
                pos[k] = x + shift
            layer += direction
    shown = {k for ks in layers.values() for k in ks}
    lo, hi = min(pos[k] for k in shown), max(pos[k] for k in shown)
    lay.width = (hi - lo + 1) * (NODE_W + GAP_X) + GAP_X
    top = min(layers)
    lay.height = (max(layers) - top + 1) * (NODE_H + GAP_Y) - GAP_Y + 2 * 20
    for layer, keys in layers.items():
        for k in keys:
            if k.startswith("more:"):
                label, ref = f"+{more_of[layer]} more", None
            elif k.startswith("ext:"):
                label, ref = k[4:], None
            else:
                label, ref = k, k
            n = _Node(k, label, layer, ref, root=k == root)
            n.x = GAP_X + (pos[k] - lo) * (NODE_W + GAP_X)
            n.y = 20 + (layer - top) * (NODE_H + GAP_Y)
            lay.nodes[k] = n
    for child, parent, e in kept:
        if child in shown and parent in shown:
            lay.edges.append((child, parent, edge_label(e), e))
        else:
            lay.hidden_edges += 1
    return lay


def lineage_svg(root: str, ancestors: Sequence[dict[str, Any]], descendants: Sequence[dict[str, Any]], *,
                href: Href, max_depth: int = 4, max_per_layer: int = 12) -> Markup:
    """The lineage DAG as an ``<svg>`` element; ``href(ref)`` gives each catalog node's page address.

    Edges are drawn from parent (above) to child (below) with an arrow at the child, labelled
    ``relation w=weight``; ``data-child``/``data-parent``/``data-relation`` attributes name them."""
    lay = layout_lineage(root, ancestors, descendants, max_depth=max_depth, max_per_layer=max_per_layer)
    height = lay.height + (22 if lay.hidden_edges else 0)
    width = max(lay.width, 520.0 if lay.hidden_edges else 0.0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width:.0f}" '
           f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
           f'aria-label="lineage of {escape(root)}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    for child, parent, label, e in lay.edges:
        c, p = lay.nodes[child], lay.nodes[parent]
        # parent above child for ancestors; for descendants too (the child is on a deeper layer)
        upper, lower = (p, c) if p.y < c.y else (c, p)
        x1, y1 = upper.x + NODE_W / 2, upper.y + NODE_H
        x2, y2 = lower.x + NODE_W / 2, lower.y
        # the label sits nearer the outer end (away from the root), where edges fan out rather than meet
        t = 0.68 if lower.layer > 0 else 0.32
        mx, my = x1 + t * (x2 - x1), y1 + t * (y2 - y1)
        out.append(f'<g class="edge" data-child="{escape(child)}" data-parent="{escape(parent)}" '
                   f'data-relation="{escape(e["relation"])}">'
                   f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#555" '
                   f'marker-end="url(#arrow)"/>'
                   f'<text x="{mx:.1f}" y="{my:.1f}" class="edge-label" text-anchor="middle">{escape(label)}</text></g>')
    for n in lay.nodes.values():
        cls = "node root" if n.root else ("node" if n.ref else "node external")
        box = (f'<rect x="{n.x:.1f}" y="{n.y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6"/>'
               f'<text x="{n.x + NODE_W / 2:.1f}" y="{n.y + NODE_H / 2 + 4:.1f}" text-anchor="middle">'
               f'{escape(_clip(n.label))}</text><title>{escape(n.label)}</title>')
        attrs = f'class="{cls}" data-ref="{escape(n.label)}"'
        if n.ref is not None and not n.root:
            out.append(f'<a href="{escape(href(n.ref))}" {attrs}>{box}</a>')
        else:
            out.append(f'<g {attrs}>{box}</g>')
    if lay.hidden_edges:
        out.append(f'<text class="more" x="{GAP_X}" y="{height - 8:.0f}">{lay.hidden_edges} more edge(s) not drawn '
                   f'(beyond {max_depth} levels, or beyond {max_per_layer} versions a level)</text>')
    out.append("</svg>")
    return Markup("".join(out))


def bar_chart_svg(rows: Sequence[tuple[str, float, str]], *, max_value: float | None = None, width: int = 640,
                  label_w: int = 300) -> Markup:
    """Horizontal bars: ``rows`` of (label, value >= 0, text shown after the bar); scaled to ``max_value``
    (default: the largest value)."""
    top = max_value if max_value is not None else max((v for _, v, _ in rows), default=0.0)
    bar_w = width - label_w - 90
    h = 20 * len(rows) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="bars" width="{width}" height="{h}" '
           f'viewBox="0 0 {width} {h}" role="img">']
    for i, (label, value, text) in enumerate(rows):
        y = 5 + 20 * i
        w = 0.0 if top <= 0 else max(0.0, min(1.0, value / top)) * bar_w
        out.append(f'<g class="bar"><text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{escape(_clip(label, 44))}'
                   f'<title>{escape(label)}</title></text>'
                   f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="14"/>'
                   f'<text x="{label_w + w + 4:.1f}" y="{y + 13}">{escape(text)}</text></g>')
    out.append("</svg>")
    return Markup("".join(out))


def _heat(v: float) -> str:
    """White (0) to dark blue (1)."""
    v = max(0.0, min(1.0, v))
    r, g, b = (int(255 - (255 - t) * v) for t in (33, 102, 172))
    return f"rgb({r},{g},{b})"


def heatmap_svg(row_labels: Sequence[str], col_labels: Sequence[str], values: Sequence[Sequence[float | None]], *,
                cell_w: int = 120, cell_h: int = 22, label_w: int = 300) -> Markup:
    """A heatmap of ``values[row][col]`` in [0, 1] (None: blank), each cell printed with its value. A column
    label ``"A vs B"`` is drawn on two lines (``A`` / ``vs B``)."""
    head = 40
    w = label_w + cell_w * len(col_labels) + 10
    h = head + cell_h * len(row_labels) + 26
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" role="img">']
    for j, c in enumerate(col_labels):
        x = label_w + j * cell_w + cell_w / 2
        first, sep, rest = c.partition(" vs ")
        lines = [first, "vs " + rest] if sep else [c]
        text = "".join(f'<tspan x="{x:.1f}" dy="{0 if k == 0 else 14}">{escape(_clip(t, 18))}</tspan>'
                       for k, t in enumerate(lines))
        out.append(f'<text class="col" x="{x:.1f}" y="{head - 8 - 14 * (len(lines) - 1)}" text-anchor="middle">'
                   f'{text}<title>{escape(c)}</title></text>')
    for i, r in enumerate(row_labels):
        y = head + i * cell_h
        out.append(f'<text x="{label_w - 6}" y="{y + cell_h - 7}" text-anchor="end">{escape(_clip(r, 44))}'
                   f'<title>{escape(r)}</title></text>')
        for j, v in enumerate(values[i]):
            x = label_w + j * cell_w
            if v is None:
                out.append(f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="#eee"/>')
                continue
            fg = "#fff" if v > 0.55 else "#000"
            out.append(f'<g class="cell" data-value="{v:.6f}"><rect x="{x}" y="{y}" width="{cell_w - 2}" '
                       f'height="{cell_h - 2}" fill="{_heat(v)}"/><text x="{x + (cell_w - 2) / 2:.1f}" '
                       f'y="{y + cell_h - 7}" text-anchor="middle" fill="{fg}">{v:.3f}</text></g>')
    # the colour scale: 0 (no shared entries) to 1 (the same mask)
    y = head + cell_h * len(row_labels) + 6
    for k in range(11):
        out.append(f'<rect x="{label_w + 12 * k}" y="{y}" width="12" height="10" fill="{_heat(k / 10)}"/>')
    out.append(f'<text x="{label_w - 6}" y="{y + 9}" text-anchor="end">Jaccard 0</text>'
               f'<text x="{label_w + 136}" y="{y + 9}">1</text>')
    out.append("</svg>")
    return Markup("".join(out))


__all__ = ["Layout", "bar_chart_svg", "heatmap_svg", "layout_lineage", "lineage_svg"]

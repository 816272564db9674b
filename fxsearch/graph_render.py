"""Drawings of a GraphReport (fxsearch/graph_view.py): a text table, Graphviz DOT and a
self-contained HTML page (inline SVG and CSS, no scripts, nothing fetched). A node is filled
with the colour of each channel group its value holds (one stripe per group) and drawn with
a thick red border when it holds frozen units; search nodes (theta_g*, q_*) have their own
shapes, and edges from choice nodes are dashed.
"""
from __future__ import annotations

import html
from typing import Any

from .graph_view import GraphReport

PALETTE = ("#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462",
           "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f", "#d9d9d9")
NO_GROUP = "#ffffff"
FROZEN = "#d62728"


def group_colour(group: int) -> str:
    """The fill colour of a channel group (the same in the DOT file and the HTML page)."""
    return PALETTE[group % len(PALETTE)]


def node_colours(row: dict[str, Any]) -> list[str]:
    return [group_colour(g) for g in row["groups"]] or [NO_GROUP]


# ---- text --------------------------------------------------------------------------------------
def counts_text(counts: dict[int, int]) -> str:
    """Units per chosen bit-width, zero counts left out: '0b:3 8b:13'."""
    return " ".join(f"{b}b:{n}" for b, n in counts.items() if n)


def bits_text(precisions: list[int] | None, chosen: Any) -> str:
    """'0,2,4,8 -> 8b:16' (per-unit counts) or '2,4,8 -> 8' (one choice); '' when not searched."""
    if precisions is None:
        return ""
    if isinstance(chosen, dict):
        chosen = counts_text(chosen)
    return f"{','.join(map(str, precisions))} -> {chosen}"


def _shape_text(shape: Any) -> str:
    if shape is None:
        return ""
    if shape and isinstance(shape[0], list):
        return ", ".join(_shape_text(s) for s in shape)
    return "x".join(map(str, shape))


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def node_cells(row: dict[str, Any]) -> list[str]:
    frozen = f"{row['frozen']} ({'; '.join(row['reasons'])})" if row["frozen"] else ""
    target = f"{row['target']} ({row['module']})" if row["module"] else row["target"]
    return [row["name"], row["op"], target, _shape_text(row["shape"]), row["role"] or "",
            ",".join(map(str, row["groups"])), ",".join(row["layers"]), ",".join(row["search"]),
            bits_text(row["a_bits"], row["a_chosen"]), bits_text(row["w_bits"], row["w_chosen"]), frozen]


NODE_HEAD = ["node", "op", "target", "shape", "role", "groups", "layers", "search nodes",
             "a bits -> chosen", "w bits -> chosen", "frozen units"]


def format_table(report: GraphReport) -> str:
    """Nodes, channel groups, the layer summary (SearchModel.summary) and per-layer costs."""
    out = [f"== nodes of {report.model} ({len(report.nodes)})", *_columns([NODE_HEAD] + [node_cells(r) for r in report.nodes])]
    out += ["", f"== channel groups ({len(report.groups)})"]
    groups = [["group", "layers", "units", "w bits -> chosen", "frozen units"]]
    for g in report.groups:
        why = "; ".join(f"{len(u)} {r}" for r, u in g["frozen_units"].items())
        groups.append([str(g["id"]), ",".join(g["layers"]), str(g["units"]),
                       bits_text(g["w_bits"], g["w_chosen"]), f"{g['frozen']} ({why})" if g["frozen"] else "0"])
    out += _columns(groups)
    out += ["", "== searchable layers", report.summary]
    if report.costs:
        names = list(report.costs)
        out += ["", "== cost per layer (argmax choices)"]
        rows = [["layer", *names]] + [[r["layer"], *(f"{r['cost'].get(n, 0.0):.6g}" for n in names)]
                                      for r in report.layers]
        rows.append(["total", *(f"{report.costs[n]:.6g}" for n in names)])
        out += _columns(rows)
    return "\n".join(out)


# ---- Graphviz ----------------------------------------------------------------------------------
def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_label(row: dict[str, Any]) -> list[str]:
    lines = [row["name"], row["target"] + (f" ({row['module']})" if row["module"] else "")]
    if row["shape"] is not None:
        lines.append(_shape_text(row["shape"]))
    for tag, bits, chosen in (("a", row["a_bits"], row["a_chosen"]), ("w", row["w_bits"], row["w_chosen"])):
        if bits is not None:
            lines.append(f"{tag} {bits_text(bits, chosen)}")
    if row["frozen"]:
        lines.append(f"frozen units: {row['frozen']}")
    return lines


def _tooltip(row: dict[str, Any]) -> str:
    parts = [f"groups {row['groups']}" if row["groups"] else "no prunable channels"]
    if row["layers"]:
        parts.append("channels of " + ", ".join(row["layers"]))
    if row["reasons"]:
        parts.append("frozen: " + "; ".join(row["reasons"]))
    return ". ".join(parts)


DOT_SHAPES = {"choice": "hexagon", "act_search": "cds", "placeholder": "invhouse", "output": "house"}


def to_dot(report: GraphReport) -> str:
    """Graphviz DOT: one node per fx node (filled by channel group, frozen ones outlined in red)
    and one edge per use of a value."""
    lines = [f"digraph {_dot_str(report.model)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             '  edge [color="#555555", arrowsize=0.6];']
    for row in report.nodes:
        colours = node_colours(row)
        attrs = {"label": "\n".join(_node_label(row)), "fillcolor": ":".join(colours),
                 "tooltip": _tooltip(row)}
        shape = DOT_SHAPES.get(row["role"] or row["op"])
        if shape:
            attrs["shape"] = shape
        if shape or len(colours) == 1:
            attrs["style"] = "filled" if shape else "rounded,filled"
        else:  # one stripe per group (Graphviz stripes boxes; other shapes get a gradient)
            attrs["style"] = "filled,striped"
        if row["frozen"]:
            attrs.update(color=FROZEN, penwidth="3")
        lines.append(f"  {_dot_str(row['name'])} [" + ", ".join(f"{k}={_dot_str(v)}" for k, v in attrs.items()) + "];")
    roles = {r["name"]: r["role"] for r in report.nodes}
    for src, dst in report.edges:
        extra = ' [style=dashed, color="#999999"]' if roles[src] == "choice" else ""
        lines.append(f"  {_dot_str(src)} -> {_dot_str(dst)}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- HTML --------------------------------------------------------------------------------------
BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 200, 56, 24, 30, 16


def layout(report: GraphReport) -> dict[str, tuple[int, int]]:
    """Top-left corner of every node box: one row per depth (longest path from the inputs),
    choice nodes one row above their first consumer, rows centred."""
    preds: dict[str, list[str]] = {r["name"]: [] for r in report.nodes}
    users: dict[str, list[str]] = {r["name"]: [] for r in report.nodes}
    for src, dst in report.edges:
        preds[dst].append(src)
        users[src].append(dst)
    depth: dict[str, int] = {}
    for r in report.nodes:  # graph order is topological
        depth[r["name"]] = 1 + max((depth[p] for p in preds[r["name"]]), default=-1)
    for r in report.nodes:
        if r["role"] == "choice" and users[r["name"]]:
            depth[r["name"]] = max(0, min(depth[u] for u in users[r["name"]]) - 1)
    rows: dict[int, list[str]] = {}
    for r in report.nodes:
        rows.setdefault(depth[r["name"]], []).append(r["name"])
    widest = max(len(v) for v in rows.values())
    pos = {}
    for d, names in rows.items():
        offset = (widest - len(names)) * (BOX_W + GAP_X) // 2
        for k, name in enumerate(names):
            pos[name] = (MARGIN + offset + k * (BOX_W + GAP_X), MARGIN + d * (BOX_H + GAP_Y))
    return pos


def _clip(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _choices_text(row: dict[str, Any]) -> str:
    """The chosen bits and frozen units, short: 'w 0b:3 8b:13 · a 8 · frozen 10'."""
    parts = []
    if row["w_chosen"] is not None:
        parts.append("w " + counts_text(row["w_chosen"]))
    if row["a_chosen"] is not None:
        parts.append(f"a {row['a_chosen']}")
    if row["frozen"]:
        parts.append(f"frozen {row['frozen']}")
    return " · ".join(parts)


def _svg_node(row: dict[str, Any], x: int, y: int) -> list[str]:
    colours = node_colours(row)
    stripe = BOX_W / len(colours)
    out = [f'<g class="node" id="n-{html.escape(row["name"])}"><title>{html.escape(_tooltip(row))}</title>']
    rx = 14 if row["role"] in ("choice", "act_search") else 4
    out.append(f'<clipPath id="c-{html.escape(row["name"])}"><rect x="{x}" y="{y}" width="{BOX_W}" '
               f'height="{BOX_H}" rx="{rx}"/></clipPath>')
    for k, colour in enumerate(colours):
        out.append(f'<rect x="{x + k * stripe:.1f}" y="{y}" width="{stripe:.1f}" height="{BOX_H}" fill="{colour}" '
                   f'clip-path="url(#c-{html.escape(row["name"])})"/>')
    border = f'stroke="{FROZEN}" stroke-width="3"' if row["frozen"] else 'stroke="#444" stroke-width="1"'
    out.append(f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="{rx}" fill="none" {border}/>')
    lines = [row["name"], _shape_text(row["shape"]) or row["target"], _choices_text(row)]
    for k, (text, cls) in enumerate(zip(lines, ("name", "sub", "sub"))):
        out.append(f'<text x="{x + 6}" y="{y + 16 + 15 * k}" class="{cls}">{html.escape(_clip(text, 33))}</text>')
    out.append("</g>")
    return out


def svg(report: GraphReport) -> str:
    """The graph as an inline SVG element (the layout above, cubic edges)."""
    pos = layout(report)
    width = max(x for x, _ in pos.values()) + BOX_W + MARGIN
    height = max(y for _, y in pos.values()) + BOX_H + MARGIN
    roles = {r["name"]: r["role"] for r in report.nodes}
    out = [f'<svg width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" class="graph">']
    for src, dst in report.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        x1, y1, x2 = x1 + BOX_W // 2, y1 + BOX_H, x2 + BOX_W // 2
        bend = max(GAP_Y, (y2 - y1) // 3)
        cls = "edge choice" if roles[src] == "choice" else "edge"
        out.append(f'<path class="{cls}" data-from="{html.escape(src)}" data-to="{html.escape(dst)}" '
                   f'd="M{x1},{y1} C{x1},{y1 + bend} {x2},{y2 - bend} {x2},{y2}"/>')
    for row in report.nodes:
        out += _svg_node(row, *pos[row["name"]])
    out.append("</svg>")
    return "\n".join(out)


CSS = """
body { font: 13px Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
td.frozen { color: #d62728; }
.swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #444; vertical-align: middle; }
.scroll { overflow: auto; max-height: 80vh; border: 1px solid #ccc; }
svg.graph .edge { fill: none; stroke: #666; stroke-width: 1; }
svg.graph .edge.choice { stroke: #aaa; stroke-dasharray: 4 3; }
svg.graph text { font: 11px Helvetica, Arial, sans-serif; }
svg.graph text.name { font-weight: bold; }
"""


def _table(head: list[str], rows: list[list[str]], styles: list[str] | None = None) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for k, row in enumerate(rows):
        style = f' style="{styles[k]}"' if styles and styles[k] else ""
        out.append(f"<tr{style}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _swatch(group: int) -> str:
    return f'<span class="swatch" style="background:{group_colour(group)}"></span>'


def _background(colours: list[str]) -> str:
    if len(colours) == 1:
        return f"background:{colours[0]}"
    return f"background:linear-gradient(90deg,{','.join(colours)})"


def to_html(report: GraphReport) -> str:
    """A self-contained page: costs, the group legend, the graph picture and the tables."""
    title = f"fxsearch: {report.model}"
    costs = ", ".join(f"{k} = {v:.6g}" for k, v in report.costs.items()) or "no cost model"
    legend = ["<table>", "<tr><th>group</th><th>layers</th><th>units</th><th>w bits -> chosen</th>"
              "<th>frozen units (first reason)</th></tr>"]
    for g in report.groups:
        why = "<br>".join(f"{len(u)}: {html.escape(r)}" for r, u in g["frozen_units"].items())
        legend.append(f"<tr><td>{_swatch(g['id'])} {g['id']}</td><td>{html.escape(', '.join(g['layers']))}</td>"
                      f"<td>{g['units']}</td><td>{html.escape(bits_text(g['w_bits'], g['w_chosen']))}</td>"
                      f'<td class="frozen">{why}</td></tr>')
    legend.append("</table>")
    node_rows = [node_cells(r) for r in report.nodes]
    styles = [_background(node_colours(r)) if r["groups"] else "" for r in report.nodes]
    names = list(report.costs)
    layer_rows = [[r["layer"], str(r["group"]), str(r["in"]), str(r["out"]),
                   counts_text(r["bits"]), str(r["frozen"]),
                   "; ".join(r["reasons"]), *(f"{r['cost'].get(n, 0.0):.6g}" for n in names)] for r in report.layers]
    layer_rows.append(["total", "", "", "", "", "", "", *(f"{report.costs[n]:.6g}" for n in names)])
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(report.nodes)} nodes, {len(report.groups)} channel groups, {len(report.layers)} searchable "
        f"layers. Cost of the argmax choices: {html.escape(costs)}.</p>",
        "<p>Boxes are filled with the colour of each channel group whose channels the value holds; "
        f'a <span style="color:{FROZEN}">red border</span> marks frozen units (never pruned). '
        "Rounded boxes are search nodes (theta_g* choices, q_* quantizers); dashed edges come "
        "from choice nodes. Hover a box for details.</p>",
        "<h2>Channel groups</h2>", "\n".join(legend),
        "<h2>Graph</h2>", f'<div class="scroll">{svg(report)}</div>',
        "<h2>Searchable layers</h2>",
        _table(["layer", "group", "in", "out", "w bits chosen", "frozen", "reasons", *names], layer_rows),
        "<h2>Nodes</h2>", _table(NODE_HEAD, node_rows, styles),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"

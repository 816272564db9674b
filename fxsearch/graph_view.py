"""The rewritten graph of a SearchModel as data: one row per fx node with its search
annotations, the channel groups with their frozen units, and the cost of every layer under
the current argmax choices. ``fxsearch/graph_render.py`` draws it (text table, Graphviz DOT,
HTML); ``python -m fxsearch.inspect`` is the command line.

    report = fxsearch.inspect_graph(sm, cost=["size", "macs"])
    report.nodes[0]          # {"name": "x", "op": "placeholder", "shape": [1, 3, 32, 32], ...}
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.fx

from . import cost_models, meta
from .errors import ConfigError

SEARCH_ROLES = ("choice", "act_search")  # nodes the insert-search-nodes pass added


@dataclasses.dataclass
class GraphReport:
    """What ``inspect_graph`` found; every field is plain data (``as_dict`` is JSON-ready)."""

    model: str                       # class name of the search model
    nodes: list[dict[str, Any]]      # one per fx node, in graph order (see ``node_row``)
    edges: list[tuple[str, str]]     # (producer, consumer) node names, one per use
    groups: list[dict[str, Any]]     # one per channel group (see ``group_row``)
    layers: list[dict[str, Any]]     # SearchModel.layer_table() rows, each with "cost": {name: value}
    costs: dict[str, float]          # every priced cost of the argmax architecture
    summary: str                     # SearchModel.summary()

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def inspect_graph(sm: torch.fx.GraphModule, cost: str | Sequence[str] | None = None) -> GraphReport:
    """Rows describing the graph of a SearchModel (from ``fxsearch.convert`` or ``fxsearch.load``).

    cost: cost-model names to price per layer (the model's own, else the registered ones);
    default: the cost models the model was converted with. Costs are of the current argmax
    choices, as ``sm.discrete_cost``.
    """
    if meta.ANALYSIS not in getattr(sm, "meta", {}):
        raise ConfigError(f"inspect_graph expects a SearchModel from fxsearch.convert or fxsearch.load, "
                          f"got {type(sm).__name__}")
    models = cost_models_of(sm, cost)
    layer_rows = {r["layer"]: r for r in sm.layer_table()}
    per_layer, totals = _costs(sm, models)
    for name, row in layer_rows.items():
        row["cost"] = per_layer.get(name, {})
    modules = dict(sm.named_modules())
    unit_layers = _unit_layers(sm.analysis)
    nodes = [node_row(sm, n, modules, unit_layers, layer_rows) for n in sm.graph.nodes]
    edges = [(a.name, n.name) for n in sm.graph.nodes for a in n.all_input_nodes]
    groups = [group_row(sm, g) for g in sm.analysis.groups]
    return GraphReport(type(sm).__name__, nodes, edges, groups, list(layer_rows.values()), totals, sm.summary())


# ---- costs -------------------------------------------------------------------------------------
def cost_models_of(sm: torch.fx.GraphModule, cost: str | Sequence[str] | None) -> dict[str, cost_models.CostModel]:
    """The named cost models to price: the model's own by default, else these names (the
    model's own model of that name if it has one, else the registry's)."""
    own = sm.meta.get(meta.COST_MODELS) or {}
    if cost is None:
        return dict(own)
    names = [cost] if isinstance(cost, str) else list(cost)
    return {n: own[n] if n in own else cost_models.get_cost_model(n) for n in names}


def _costs(sm, models) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Per layer (calls of one module summed) and in total, for each cost model."""
    layers = cost_models.search_layers(sm, discrete=True)
    per_layer: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for name, cm in models.items():
            for layer in layers:
                row = per_layer.setdefault(layer.name, {})
                row[name] = row.get(name, 0.0) + float(cm([layer]))
        totals = {name: float(cm(layers)) for name, cm in models.items()}
    return per_layer, totals


# ---- nodes -------------------------------------------------------------------------------------
def _unit_layers(analysis) -> dict[tuple[int, int], list[str]]:
    """(group, unit) -> the searchable layers with an output channel in that unit."""
    out: dict[tuple[int, int], list[str]] = {}
    for name, info in analysis.layers.items():
        for u in torch.unique(info.unit_index).tolist():
            out.setdefault((info.group, u), []).append(name)
    return out


def _target(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _shape(node: torch.fx.Node, module: Any) -> list | None:
    """Output shape from the trace (ShapeProp); search nodes, added later, have none recorded:
    a q_ node keeps its input's shape, a theta node's value is (precisions, units)."""
    if node.meta.get(meta.ROLE) == "choice":
        return list(module.alpha.shape)
    if node.meta.get(meta.ROLE) == "act_search":
        node = node.args[0]
    tm = node.meta.get("tensor_meta")
    if hasattr(tm, "shape"):
        return list(tm.shape)
    if isinstance(tm, (tuple, list)) and all(hasattr(t, "shape") for t in tm):
        return [list(t.shape) for t in tm]
    return None


def _held_units(sm, node: torch.fx.Node) -> list[tuple[int, int]]:
    """The (group, unit) pairs of the prunable channels a node's value holds."""
    analysis = sm.analysis
    if node.meta.get(meta.ROLE) == "choice":
        g = node.meta[meta.GROUP]
        return [(g, u) for u in range(analysis.groups[g].num_units)]
    labels = node.meta.get(meta.LABELS)
    if not isinstance(labels, torch.Tensor):
        return []
    gids, uids = analysis.units_of(labels)
    known = gids.reshape(-1) >= 0
    return sorted(set(zip(gids.reshape(-1)[known].tolist(), uids.reshape(-1)[known].tolist())))


def _frozen(sm, pairs: list[tuple[int, int]]) -> tuple[int, list[str]]:
    """How many of these units are frozen, and every reason given for them."""
    groups = sm.analysis.groups
    frozen = [(g, u) for g, u in pairs if bool(groups[g].frozen[u])]
    reasons = sorted({r for g, u in frozen for r in groups[g].reasons.get(u, [])})
    return len(frozen), reasons


def _bit_counts(bits: torch.Tensor, precisions: Sequence[int]) -> dict[int, int]:
    return {int(p): int((bits == p).sum()) for p in precisions}


def _search_neighbours(node: torch.fx.Node) -> list[str]:
    near = [*node.all_input_nodes, *node.users]
    return list(dict.fromkeys(n.name for n in near if n.meta.get(meta.ROLE) in SEARCH_ROLES))


def node_row(sm, node: torch.fx.Node, modules: dict[str, Any], unit_layers: dict[tuple[int, int], list[str]],
             layer_rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One fx node: op, target, shape, search role, the channel groups / searchable layers whose
    channels its value holds, its neighbouring search nodes, precision sets and argmax choices
    (a_: activation, w_: weight), and the frozen units it holds with their reasons."""
    module = modules.get(node.target) if node.op == "call_module" else None
    role = node.meta.get(meta.ROLE)
    pairs = _held_units(sm, node)
    frozen, reasons = _frozen(sm, pairs)
    row = {
        "name": node.name, "op": node.op, "target": _target(node),
        "module": type(module).__name__ if module is not None else None,
        "shape": _shape(node, module), "role": role, "groups": sorted({g for g, _ in pairs}),
        "layers": list(dict.fromkeys(name for p in pairs for name in unit_layers[p])),
        "search": _search_neighbours(node),
        "a_bits": None, "a_chosen": None, "w_bits": None, "w_chosen": None,
        "frozen": frozen, "reasons": reasons,
    }
    if role == "act_search":
        row.update(a_bits=list(module.precisions), a_chosen=int(module.argmax_bits()))
    elif role == "choice":
        row.update(w_bits=list(module.precisions), w_chosen=_bit_counts(module.argmax_bits(), module.precisions))
    elif role == "weight_search":
        row.update(w_bits=list(module.precisions), w_chosen=dict(layer_rows[node.target]["bits"]))
        q = node.args[0]
        if isinstance(q, torch.fx.Node) and q.meta.get(meta.ROLE) == "act_search":
            act = modules[q.target]
            row.update(a_bits=list(act.precisions), a_chosen=int(act.argmax_bits()))
    return row


def group_row(sm, group) -> dict[str, Any]:
    """One channel group: its layers, units, argmax bits per unit, frozen units by (first) reason."""
    choice = sm.get_submodule(f"fxs_choices.g{group.id}")
    by_reason: dict[str, list[int]] = {}
    for u in torch.nonzero(group.frozen).flatten().tolist():
        by_reason.setdefault(group.reasons[u][0], []).append(u)
    return {
        "id": group.id, "layers": list(group.layers), "units": group.num_units,
        "w_bits": list(choice.precisions), "w_chosen": _bit_counts(choice.argmax_bits(), choice.precisions),
        "frozen": int(group.frozen.sum()), "frozen_units": by_reason,
    }

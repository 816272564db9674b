"""Insert-search-nodes pass: put the search into the graph.

- one `theta_g<N>` node per channel group (GroupChoice under `fxs_choices`), at the top;
- one `q_<tensor>` node (ActSearch under `fxs_act`) after every tensor that feeds a
  searchable layer: activation precision choice, PACT clip, pruning mask;
- every searchable layer is swapped for its search class and called as `layer(q_x, theta_g)`;
- with `integer_adds`, each operand of an element-wise add/sub of two computed tensors is
  read through its tensor's `q_` node, or a new `qadd_<tensor>` node (ActSearch at 8 bits,
  under `fxs_add`) where no layer reads the tensor.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxsearch import meta
from fxsearch.config import SearchConfig
from fxsearch.errors import UnsupportedModelError
from fxsearch.search_modules import ActSearch, GroupChoice, is_arange, search_class_for

from .channel_groups import ChannelAnalysis
from .op_kinds import mutates_input

_ADDS = {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, torch.subtract}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
INTEGER_ADD_BITS = 8  # the operands of integer adds: what QLinearConv writes
SEARCH_HOLDERS = ("fxs_choices", "fxs_act", "fxs_add")  # the ModuleDicts this pass adds


def _add_operands(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """The two operands of an element-wise add/sub of two computed float tensors, else None.

    In-place adds qualify only when they are the one reader of the tensor they change (the
    quantized copy is what changes; a later reader of the original would miss the update)."""
    if not ((node.op == "call_function" and node.target in _ADDS) or
            (node.op == "call_method" and node.target in _ADD_METHODS)):
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if not all(isinstance(x, torch.fx.Node) and x.op != "get_attr" and meta.RANGE in x.meta for x in (a, b)):
        return None
    if mutates_input(node, None) and len(a.users) > 1:
        return None
    return a, b


def _mask_plan(labels: torch.Tensor | None, analysis: ChannelAnalysis, can_prune: bool):
    """For each group a tensor holds prunable channels of: (group id, flat positions, units)."""
    if labels is None or not can_prune:
        return (), []
    gids, uids = analysis.units_of(labels)
    gids, uids = gids.reshape(-1), uids.reshape(-1)
    plan = []
    for g in torch.unique(gids[gids >= 0]).tolist():
        pos = torch.nonzero(gids == g, as_tuple=True)[0]
        pos = pos[~analysis.groups[g].frozen[uids[pos]]]
        if pos.numel():
            plan.append((g, pos, uids[pos]))
    return tuple(labels.shape), plan


class InsertSearchNodesPass(PassBase):
    def __init__(self, config: SearchConfig):
        super().__init__()
        self.config = config

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        cfg = self.config
        analysis: ChannelAnalysis = gm.meta[meta.ANALYSIS]
        graph = gm.graph
        taken = [name for name in SEARCH_HOLDERS if hasattr(gm, name)]
        if taken:
            raise UnsupportedModelError(
                f"the model already has a submodule '{taken[0]}': it is an fxsearch search or finalized "
                "model (or names a module like one); convert the original float model instead")
        choices, acts = nn.ModuleDict(), nn.ModuleDict()
        gm.add_submodule("fxs_choices", choices)
        gm.add_submodule("fxs_act", acts)
        first = next(n for n in graph.nodes if n.op != "placeholder")
        thetas: dict[int, torch.fx.Node] = {}
        with graph.inserting_before(first):
            for g in analysis.groups:
                choices[f"g{g.id}"] = GroupChoice(cfg.w_precisions, g.frozen, cfg.sampling, cfg.temperature)
                thetas[g.id] = graph.create_node("call_module", f"fxs_choices.g{g.id}", name=f"theta_g{g.id}")
                thetas[g.id].meta[meta.ROLE] = "choice"
                thetas[g.id].meta[meta.GROUP] = g.id
        last_theta = thetas[analysis.groups[-1].id]
        quantized: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in list(graph.nodes):
            info = analysis.layers.get(node.target) if node.op == "call_module" else None
            if info is None:
                continue
            x = node.args[0]
            if x not in quantized:
                bits = cfg.input_bits if x.op == "placeholder" else cfg.a_precisions
                quantized[x] = self._insert_act(gm, "fxs_act", "q", x, bits, analysis, thetas, last_theta)
            node.args = (quantized[x], thetas[info.group])
            node.meta[meta.ROLE] = "weight_search"
            node.meta[meta.GROUP] = info.group
            module = gm.get_submodule(node.target)
            if not hasattr(module, "precisions"):
                identity = is_arange(info.unit_index, info.out_features) and \
                    analysis.groups[info.group].num_units == info.out_features
                search = search_class_for(module).from_float(
                    module, cfg.w_precisions, None if identity else info.unit_index)
                parent, _, leaf = node.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, search)
        if cfg.integer_adds:
            self._quantize_adds(gm, analysis, thetas, last_theta, quantized)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _quantize_adds(self, gm, analysis, thetas, last_theta, quantized) -> None:
        """Each operand of every qualifying add read through its tensor's quantizer: the one
        its layers read (`quantized`: one tensor, one precision, as integer hardware stores
        it), else a new 8-bit one."""
        gm.add_submodule("fxs_add", nn.ModuleDict())
        for node in list(gm.graph.nodes):
            operands = _add_operands(node)
            if operands is None:
                continue
            for x in operands:
                if quantized.get(x, x) is x:
                    quantized[x] = self._insert_act(gm, "fxs_add", "qadd", x, INTEGER_ADD_BITS, analysis,
                                                    thetas, last_theta)
            node.args = tuple(quantized[x] for x in operands)

    def _insert_act(self, gm, holder: str, prefix: str, x, bits, analysis, thetas, last_theta) -> torch.fx.Node:
        """`<prefix>_<x>`: an ActSearch over `bits` (kept in ModuleDict `holder`) quantizing x
        and masking its pruned channels; x itself when there is nothing to do."""
        cfg = self.config
        shape, plan = _mask_plan(x.meta.get(meta.LABELS), analysis, cfg.can_prune)
        if bits is None and not plan:
            return x
        bits = (bits,) if isinstance(bits, int) else bits
        lo, hi = x.meta.get(meta.RANGE, (-1.0, 1.0))
        signed = not x.meta.get(meta.NONNEG, False)
        acts = gm.get_submodule(holder)
        acts[x.name] = ActSearch(bits, signed, lo, hi, cfg.sampling, cfg.temperature,
                                 shape, [(pos, units) for _, pos, units in plan],
                                 tuple(analysis.groups[g].num_units for g, _, _ in plan))
        anchor = last_theta if x.op == "placeholder" else x
        with gm.graph.inserting_after(anchor):
            q = gm.graph.create_node("call_module", f"{holder}.{x.name}",
                                     (x, *(thetas[g] for g, _, _ in plan)), name=f"{prefix}_{x.name}")
        q.meta[meta.ROLE] = "act_search"
        q.meta[meta.LABELS] = x.meta.get(meta.LABELS)
        return q

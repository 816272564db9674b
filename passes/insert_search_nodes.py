"""Insert-search-nodes pass: put the search into the graph.

- one `theta_g<N>` node per channel group (GroupChoice under `fxs_choices`), at the top;
- one `q_<tensor>` node (ActSearch under `fxs_act`) after every tensor that feeds a
  searchable layer: activation precision choice, PACT clip, pruning mask;
- every searchable layer is swapped for its search class and called as `layer(q_x, theta_g)`.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxsearch import meta
from fxsearch.config import SearchConfig
from fxsearch.errors import UnsupportedModelError
from fxsearch.search_modules import ActSearch, GroupChoice, search_class_for

from .channel_groups import ChannelAnalysis


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
        taken = [name for name in ("fxs_choices", "fxs_act") if hasattr(gm, name)]
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
                quantized[x] = self._insert_act(gm, x, analysis, thetas, last_theta)
            node.args = (quantized[x], thetas[info.group])
            node.meta[meta.ROLE] = "weight_search"
            node.meta[meta.GROUP] = info.group
            module = gm.get_submodule(node.target)
            if not hasattr(module, "precisions"):
                identity = torch.equal(info.unit_index, torch.arange(info.out_features)) and \
                    analysis.groups[info.group].num_units == info.out_features
                search = search_class_for(module).from_float(
                    module, cfg.w_precisions, None if identity else info.unit_index)
                parent, _, leaf = node.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, leaf, search)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _insert_act(self, gm, x, analysis, thetas, last_theta) -> torch.fx.Node:
        cfg = self.config
        bits = cfg.input_bits if x.op == "placeholder" else cfg.a_precisions
        shape, plan = _mask_plan(x.meta.get(meta.LABELS), analysis, cfg.can_prune)
        if bits is None and not plan:
            return x
        bits = (bits,) if isinstance(bits, int) else bits
        lo, hi = x.meta.get(meta.RANGE, (-1.0, 1.0))
        signed = not x.meta.get(meta.NONNEG, False)
        acts = gm.get_submodule("fxs_act")
        acts[x.name] = ActSearch(bits, signed, lo, hi, cfg.sampling, cfg.temperature,
                                 shape, [(pos, units) for _, pos, units in plan],
                                 tuple(analysis.groups[g].num_units for g, _, _ in plan))
        anchor = last_theta if x.op == "placeholder" else x
        with gm.graph.inserting_after(anchor):
            q = gm.graph.create_node("call_module", f"fxs_act.{x.name}",
                                     (x, *(thetas[g] for g, _, _ in plan)), name=f"q_{x.name}")
        q.meta[meta.ROLE] = "act_search"
        q.meta[meta.LABELS] = x.meta.get(meta.LABELS)
        return q

"""Cost pass: describe every searchable layer for the cost models (fxsearch/cost_models.py).

It runs last in ``fxsearch.convert``'s pipeline, on the graph with search nodes, and stores in
``gm.meta[meta.COST_LAYERS]`` one LayerSpec per call of a searchable layer: its shape
(kind, kernel, groups, channels, output spatial sizes from the trace's ShapeProp), the
GroupChoice and units that give its output channels' theta, the ActSearch that quantizes
its input, and, per input channel, the (group, unit) whose pruning removes it. The pass only
reads indices; SearchModel.cost turns them into expected quantities under the current thetas.
Input channels count as always alive where unlabelled (network input, unmodelled data), in
frozen units, or where the precision set has no 0. Concat offsets, splits and flatten blocks
need no special case: the channel analysis' ``in_labels`` already hold one slot per input
channel (repeated once per flatten position).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxsearch import meta
from fxsearch.cost_models import LayerGeometry, resolve_costs
from fxsearch.errors import UnsupportedModelError
from fxsearch.search_modules import is_arange

from .channel_groups import ChannelAnalysis, LayerInfo


@dataclasses.dataclass
class LayerSpec(LayerGeometry):
    """One call of a searchable layer, as indices into the search model's choice modules."""

    name: str                       # module qualified name
    node: str                       # fx node of this call
    kind: str                       # "conv" or "linear"
    kernel: tuple[int, ...]         # kernel sizes, () for Linear
    groups: int
    depthwise: bool                 # one input channel per group (groups > 1)
    in_channels: int
    out_channels: int
    out_spatial: tuple[int, ...]    # output sizes after channels (conv) / between batch and features (linear)
    group: int                      # channel group of the output channels
    choice: str                     # GroupChoice module giving their theta
    unit_index: torch.Tensor        # (out_channels,) unit of theta of each output channel
    act: str | None                 # ActSearch module quantizing the input; None: input in float
    in_group: torch.Tensor          # (in_channels,) group whose pruning removes the channel, -1: always alive
    in_unit: torch.Tensor           # (in_channels,) its unit, -1: always alive
    in_choices: dict[int, str]      # group -> GroupChoice module, for the groups in in_group
    count_weights: bool = True      # False for later calls of a module called several times
    _on_device: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def in_fixed(self) -> int:
        """Input channels that are always alive."""
        return int((self.in_group < 0).sum())

    def indices(self, device: torch.device) -> tuple[torch.Tensor | int, int, list[tuple[str, torch.Tensor | int]]]:
        """unit_index, in_fixed and [(GroupChoice, units of the prunable input channels)] on
        ``device``, each set of units as an index tensor or, where it is units 0..n-1 in order
        (the usual case), as the count n: a slice then, no gather (cost_models.take_units;
        cached: the cost is evaluated at every training step)."""
        if device not in self._on_device:
            terms = [(self.in_choices[g], _units(self.in_unit[self.in_group == g], device))
                     for g in torch.unique(self.in_group[self.in_group >= 0]).tolist()]
            self._on_device[device] = (_units(self.unit_index, device), self.in_fixed, terms)
        return self._on_device[device]


def _units(index: torch.Tensor, device: torch.device) -> torch.Tensor | int:
    """`index` on `device`, or its length where it is 0, 1, ..., n-1."""
    return len(index) if is_arange(index) else index.to(device)


def _out_shape(node: torch.fx.Node) -> tuple[int, ...]:
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        raise UnsupportedModelError(
            f"no output shape recorded for {node.format_node()}; the cost pass needs the trace "
            "pass's ShapeProp (run fxsearch.convert rather than the passes by hand)")
    return tuple(int(s) for s in tm.shape)


def _input_terms(info: LayerInfo, analysis: ChannelAnalysis,
                 prunable: dict[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, unit) per input channel, -1 where the channel is always alive."""
    gids, uids = analysis.units_of(info.in_labels)
    fixed = gids < 0
    for g in torch.unique(gids[~fixed]).tolist():
        here = gids == g
        fixed[here] = analysis.groups[g].frozen[uids[here]] | (not prunable[g])
    return gids.masked_fill(fixed, -1), uids.masked_fill(fixed, -1)


class CostPass(PassBase):
    """Write the per-layer cost description and the resolved cost models into ``gm.meta``.

    cost: a registry name ("size", "ne16", ...), a cost-model function or CostModel, a dict
    name -> any of those (the first is SearchModel.cost), a list of them, or None.
    """

    def __init__(self, cost: Any = "size"):
        super().__init__()
        self.models = resolve_costs(cost)  # fail at the front door on a bad spec

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        analysis: ChannelAnalysis = gm.meta[meta.ANALYSIS]
        choices = {n.meta[meta.GROUP]: n.target for n in gm.graph.nodes if n.meta.get(meta.ROLE) == "choice"}
        prunable = {g: 0 in gm.get_submodule(name).precisions for g, name in choices.items()}
        specs, seen, inputs = [], set(), {}
        for node in gm.graph.nodes:
            if node.op != "call_module" or node.target not in analysis.layers:
                continue
            info = analysis.layers[node.target]
            module = gm.get_submodule(node.target)
            if info.name not in inputs:
                inputs[info.name] = _input_terms(info, analysis, prunable)
            in_group, in_unit = inputs[info.name]
            x = node.args[0]
            act = x.target if isinstance(x, torch.fx.Node) and x.meta.get(meta.ROLE) == "act_search" else None
            shape = _out_shape(node)
            conv = info.kind == "conv"
            specs.append(LayerSpec(
                name=info.name, node=node.name, kind=info.kind,
                kernel=tuple(module.kernel_size) if conv else (),
                groups=info.groups, depthwise=info.groups > 1 and info.in_features == info.groups,
                in_channels=info.in_features, out_channels=info.out_features,
                out_spatial=shape[2:] if conv else shape[1:-1],
                group=info.group, choice=node.args[1].target, unit_index=info.unit_index,
                act=act, in_group=in_group, in_unit=in_unit,
                in_choices={g: choices[g] for g in torch.unique(in_group[in_group >= 0]).tolist()},
                count_weights=info.name not in seen,
            ))
            seen.add(info.name)
        gm.meta[meta.COST_LAYERS] = specs
        gm.meta[meta.COST_MODELS] = self.models
        return PassResult(gm, False)

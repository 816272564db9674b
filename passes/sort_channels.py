"""Channel-sort pass: permute a finalized model's channels so that every layer's output
channels come grouped by bit-width, without changing what the model computes.

The packed ONNX format splits a layer into one sub-layer per precision joined by a Concat,
which needs equal bit-widths contiguous and no reorder op. The pass never moves channel
*positions*: it changes which unit each position holds. Per channel group, a permutation phi
of the units sorts them by bit-width (stable, widest first), and every position of every
tensor that held unit u now holds unit phi(u) (the k-th occurrence of u takes the value of
the k-th occurrence of phi(u)). Cat, split, slices, flatten and shuffles are thus untouched,
their literal sizes stay valid, and only weights change: producers' rows (weight, bias,
w_bits), consumers' columns (grouped and depthwise convs included), per-channel modules and
per-channel constants of element-wise ops.

phi only exchanges units that occur equally often in every tensor (so the substitution is
defined everywhere) and never moves a unit that reaches a model output. The result is checked
on the example inputs, tensor by tensor (activation quantizers as identities, so that no
rounding flips): a group whose permutation changes any tensor other than as its labels say
(an op the labels do not follow) keeps its order.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils._pytree import tree_flatten, tree_map

from fxsearch import meta
from fxsearch.final_modules import FakeQuantAct, QuantWeightMixin

from .channel_groups import ChannelAnalysis, varying_dims
from .finalize import _PER_CHANNEL, _set_attr, select_constants, select_per_channel
from .op_kinds import node_kind


@dataclasses.dataclass
class SortResult:
    order: dict[str, torch.Tensor]  # layer -> finalized model's output channel at each new position
    notes: dict[str, str]           # layer -> why its channels may not all be sorted by bits


class _Inconsistent(Exception):
    """A permutation that the graph cannot carry (a unit missing from a tensor, a grouped conv
    whose groups would mix)."""


class _Units:
    """Unit keys (group * width + unit, -1 for unlabelled) along the varying dim of a label tensor."""

    def __init__(self, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.width = max(g.num_units for g in analysis.groups) + 1
        self.size = len(analysis.groups) * self.width

    def line(self, lab: torch.Tensor) -> tuple[int | None, torch.Tensor]:
        dims = varying_dims(lab)
        flat = lab.movedim(dims[0], 0).reshape(lab.shape[dims[0]], -1)[:, 0] if dims else lab.reshape(-1)[:1]
        g, u = self.analysis.units_of(flat)
        return (dims[0] if dims else None), torch.where(g >= 0, g * self.width + u, -1)


def _tensors(labels: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(labels)[0] if isinstance(t, torch.Tensor)]


def _occurrence(keys: torch.Tensor) -> torch.Tensor:
    """Rank of each element among the equal elements before it."""
    order = torch.argsort(keys, stable=True)
    ranked = keys[order]
    rank = torch.empty_like(keys)
    rank[order] = torch.arange(keys.numel()) - torch.searchsorted(ranked, ranked)
    return rank


def _gather(keys: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Old position whose value each position holds after substituting phi(u) for u."""
    n = keys.numel()
    new = torch.where(keys >= 0, phi[keys.clamp_min(0)], keys)
    rank = _occurrence(keys)
    code, target = keys * n + rank, new * n + rank
    ranked, where = code.sort()
    pos = torch.searchsorted(ranked, target).clamp_max(n - 1)
    if not bool((ranked[pos] == target).all()):
        raise _Inconsistent("a tensor lacks a unit the permutation brings into it")
    return where[pos]


def _plan(gm: torch.fx.GraphModule, units: _Units) -> tuple[torch.Tensor, set[int], dict[int, tuple]]:
    """phi (unit key -> unit key), the keys reaching a model output, and every key's signature
    (the tensors it occurs in, and how often): phi only exchanges keys of equal signature."""
    modules = dict(gm.named_modules())
    bits: dict[int, int] = {}
    signature: dict[int, list] = defaultdict(list)
    fixed: set[int] = set()
    tensor = 0
    for node in gm.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(layer, QuantWeightMixin):
            keys = units.line(node.meta[meta.LABELS])[1]
            bits.update(zip(keys.tolist(), layer.w_bits.tolist()))
        if node.op == "output":
            for lab in _tensors([a.meta.get(meta.LABELS) for a in node.all_input_nodes]):
                fixed.update(k for k in units.line(lab)[1].tolist() if k >= 0)
        for lab in _tensors(node.meta.get(meta.LABELS)):
            keys = units.line(lab)[1]
            values, counts = torch.unique(keys[keys >= 0], return_counts=True)
            for k, c in zip(values.tolist(), counts.tolist()):
                signature[k].append((tensor, c))
            tensor += 1
    classes: dict[tuple, list[int]] = defaultdict(list)
    for k in sorted(signature):
        classes[(k // units.width, tuple(signature[k]), k if k in fixed else -1)].append(k)
    phi = torch.arange(units.size)
    for members in classes.values():
        phi[members] = torch.tensor(sorted(members, key=lambda k: -bits.get(k, 0)))
    return phi, fixed, {k: tuple(s) for k, s in signature.items()}


def _permute_layer(layer: QuantWeightMixin, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """Reorder a quantized layer's output rows and input columns; returns the row order."""
    w = layer.weight.detach()
    g = layer.groups if isinstance(layer, nn.modules.conv._ConvNd) else 1
    c_out, c_in_g = w.shape[0], w.shape[1]
    rows = torch.arange(c_out) if rows is None else rows
    cols = torch.arange(c_in_g * g) if cols is None else cols
    read = cols.view(g, c_in_g)[torch.arange(c_out) // (c_out // g)]  # input channel of each new weight entry
    if not bool((read // c_in_g == (rows // (c_out // g)).unsqueeze(1)).all()):
        raise _Inconsistent("the permutation would move channels across the groups of a grouped conv")
    rows, read = rows.to(w.device), read.to(w.device)
    layer.weight = nn.Parameter(w[rows.unsqueeze(1), read % c_in_g].contiguous())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[rows])
    layer.w_bits = layer.w_bits[rows]
    if getattr(layer, "w_range", None) is not None:
        layer.w_range = layer.w_range[rows]
    return rows.cpu()


def _apply(gm: torch.fx.GraphModule, units: _Units, phi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Permute every weight, per-channel module and constant of ``gm`` for phi; relabel nodes."""
    modules = dict(gm.named_modules())
    index: dict[int, tuple[torch.Tensor, int | None, torch.Tensor | None]] = {}  # id -> (labels kept alive, ...)

    def gather(lab: Any) -> tuple[int | None, torch.Tensor | None]:
        if not isinstance(lab, torch.Tensor):
            return None, None
        if id(lab) not in index:
            ax, keys = units.line(lab)
            index[id(lab)] = (lab, ax, None if ax is None else _gather(keys, phi))
        return index[id(lab)][1:]

    order: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, QuantWeightMixin) and node.target not in order:
            x = node.args[0].meta.get(meta.LABELS)
            ax, cols = gather(x)
            in_axis = x.dim() - 1 if isinstance(module, nn.Linear) and x is not None else 1
            order[node.target] = _permute_layer(module, gather(node.meta[meta.LABELS])[1],
                                                cols if ax == in_axis else None)
        elif isinstance(module, _PER_CHANNEL):
            ax, idx = gather(node.args[0].meta.get(meta.LABELS))
            if idx is not None and ax == 1:
                select_per_channel(module, idx, idx.numel())
        elif node.op in ("call_function", "call_method") and node_kind(node, None) == "elementwise":
            ax, idx = gather(node.meta.get(meta.LABELS))
            if idx is not None:
                select_constants(gm, node, ax, idx, idx.numel(), done)
    def relabel(lab: Any) -> Any:
        ax, idx = gather(lab)
        return lab if idx is None else lab.index_select(ax, idx)

    for node in gm.graph.nodes:
        if meta.LABELS in node.meta:
            node.meta[meta.LABELS] = tree_map(relabel, node.meta[meta.LABELS])
    return order


def _values(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Every computed float tensor of a run, by node name, with the activation quantizers as
    identities so that a change of summation order cannot flip a rounding."""
    twin = copy.deepcopy(gm).eval()
    for name, module in list(twin.named_modules()):
        if isinstance(module, FakeQuantAct):
            _set_attr(twin, name, nn.Identity())
    interpreter = torch.fx.Interpreter(twin, garbage_collect_values=False)
    with torch.no_grad():
        interpreter.run(*inputs)
    return {n.name: v.detach() for n, v in interpreter.env.items() if n.op.startswith("call_")
            and isinstance(v, torch.Tensor) and v.is_floating_point()}


class SortChannelsPass(PassBase):
    """Reorder the channels of a finalized model in place so that equal bit-widths are contiguous.

    Needs the channel analysis and node labels that finalize leaves in the graph; writes a
    SortResult to ``gm.meta[meta.SORT_RESULT]``.
    """

    def __init__(self, example_inputs: Sequence[Any]):
        super().__init__()
        self.example_inputs = example_inputs

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        units = _Units(gm.meta[meta.ANALYSIS])
        phi, fixed, signature = _plan(gm, units)
        before = _values(gm, self.example_inputs)
        labels = {n.name: n.meta.get(meta.LABELS) for n in gm.graph.nodes}

        def preserves(p: torch.Tensor) -> bool:
            """Every tensor of the permuted model is the original one, permuted as its labels say."""
            trial = copy.deepcopy(gm)
            try:
                _apply(trial, units, p)
            except _Inconsistent:
                return False
            for name, value in _values(trial, self.example_inputs).items():
                want, lab = before[name], labels[name]
                ax, keys = units.line(lab) if isinstance(lab, torch.Tensor) else (None, None)
                if ax is not None:
                    want = want.index_select(ax, _gather(keys, p).to(want.device))
                if value.shape != want.shape or not torch.allclose(
                        value, want, rtol=1e-4, atol=1e-4 * float(want.abs().amax()) if want.numel() else 0.0):
                    return False
            return True

        identity = torch.arange(units.size)
        moved = sorted({int(k) // units.width for k in torch.nonzero(phi != identity).view(-1)})
        kept: set[int] = set()
        if moved and not preserves(phi):
            keys_of = lambda g: torch.arange(g * units.width, (g + 1) * units.width)  # noqa: E731
            for g in moved:
                alone = identity.clone()
                alone[keys_of(g)] = phi[keys_of(g)]
                if not preserves(alone):
                    kept.add(g)
                    phi[keys_of(g)] = keys_of(g)
            if not preserves(phi):
                kept, phi = set(moved), identity
        order = _apply(gm, units, phi)
        gm.meta[meta.SORT_RESULT] = SortResult(order, self._notes(gm, units, fixed, signature, kept))
        return PassResult(gm, True)

    @staticmethod
    def _notes(gm, units: _Units, fixed: set[int], signature: dict[int, tuple], kept: set[int]) -> dict[str, str]:
        notes = {}
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if not isinstance(modules.get(node.target) if node.op == "call_module" else None, QuantWeightMixin):
                continue
            keys = units.line(node.meta[meta.LABELS])[1].tolist()
            if any(k in fixed for k in keys):
                notes[node.target] = "its channels reach a model output, whose channel order is kept"
            elif keys[0] // units.width in kept:
                notes[node.target] = ("permuting its channel group changed the outputs (an op the channel "
                                      "labels do not follow), so the group keeps its order")
            elif len(set(keys)) < len(keys):
                notes[node.target] = "its channels repeat units (grouped conv or channel shuffle ties)"
            elif len({signature[k] for k in keys}) > 1:
                notes[node.target] = "splits, slices or repeats of its output fix the order of its channel ranges"
            else:
                notes[node.target] = "its channels are tied to another layer's in a different order"
        return notes


def sort_channels(final: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """A copy of a finalized model with each layer's channels sorted by bit-width where the
    graph allows it (see the module docstring); ``final`` is left as it is."""
    gm = copy.deepcopy(final)
    return SortChannelsPass(example_inputs)(gm).graph_module

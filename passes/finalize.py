"""Finalize pass: a search model becomes a smaller model with frozen precisions.

- every choice takes its argmax; channels at 0 bits are removed for real from producers and
  every consumer (conv/linear inputs, BatchNorm, per-channel parameters, literal sizes of
  view/split/slice), using the channel labels of the analysis;
- search layers become QuantConv*/QuantLinear with per-channel `w_bits`, activation search
  nodes become FakeQuantAct with their chosen bit-width (after the ReLU they absorbed, put
  back), choice nodes disappear;
- BatchNorm that follows a quantized layer is folded into it (per-channel symmetric
  quantization gives the same integers for a positive or negative per-channel factor).
The channel analysis stays in gm.meta and node labels are shrunk to the surviving channels,
so exporters can still tell which channels of which tensors belong together.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils._pytree import tree_flatten, tree_map

from fxsearch import meta
from fxsearch.errors import FinalizeError
from fxsearch.final_modules import FakeQuantAct, QuantWeightMixin, quant_class_for
from fxsearch.quantizers import weight_absmax
from fxsearch.search_modules import WeightSearchMixin

from .absorb_relu import restore_relu
from .channel_groups import ChannelAnalysis, varying_dims
from .op_kinds import node_kind, remove_dead_code

# SyncBatchNorm (convert_sync_batchnorm on a search model) folds as the BatchNormNd it replaced
_FOLDABLE_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)


class _Keep:
    """Which units survive, and what that means for any label tensor."""

    def __init__(self, gm: torch.fx.GraphModule, analysis: ChannelAnalysis):
        self.analysis = analysis
        self.choices = {g.id: gm.get_submodule(f"fxs_choices.g{g.id}") for g in analysis.groups}
        self.bits = {g: c.argmax_bits() for g, c in self.choices.items()}

    def mask(self, lab: torch.Tensor) -> torch.Tensor:
        gid, uid = self.analysis.units_of(lab)
        keep = torch.ones(lab.shape, dtype=torch.bool)
        for g in torch.unique(gid[gid >= 0]).tolist():
            at = gid == g
            keep[at] = self.bits[g][uid[at]] > 0
        return keep

    def along(self, lab: torch.Tensor | None) -> tuple[int | None, torch.Tensor | None]:
        """The varying dim of a label tensor and which of its positions survive."""
        if lab is None or not varying_dims(lab):
            return None, None
        ax = varying_dims(lab)[0]
        return ax, self.mask(lab).movedim(ax, 0).reshape(lab.shape[ax], -1)[:, 0]

    def shrink(self, lab: torch.Tensor | None) -> torch.Tensor | None:
        """A label tensor without its removed positions."""
        ax, k = self.along(lab if isinstance(lab, torch.Tensor) else None)
        return lab if k is None else lab.index_select(ax, torch.nonzero(k).view(-1))

    def revive_empty(self, labels: list[torch.Tensor]) -> list[str]:
        """Keep at least one channel in every tensor: revive the most likely unit of an emptied one."""
        revived = []
        changed = True
        while changed:
            changed = False
            for lab in labels:
                ax, keep = self.along(lab)
                if keep is None or bool(keep.any()):
                    continue
                gid, uid = self.analysis.units_of(lab.reshape(-1))
                cands = [(g, u) for g, u in zip(gid.tolist(), uid.tolist()) if g >= 0]
                choice = lambda gu: self.choices[gu[0]]  # noqa: E731
                best = max(cands, key=lambda gu: float(self._nonzero_logits(choice(gu))[:, gu[1]].max()))
                logits = self._nonzero_logits(self.choices[best[0]])[:, best[1]]
                nonzero = [p for p in self.choices[best[0]].precisions if p > 0]
                self.bits[best[0]][best[1]] = nonzero[int(logits.argmax())]
                revived.append(f"group {best[0]} unit {best[1]}")
                changed = True
        return revived

    @staticmethod
    def _nonzero_logits(choice) -> torch.Tensor:
        rows = [i for i, p in enumerate(choice.precisions) if p > 0]
        return choice.alpha.detach()[rows]


def _set_attr(gm: torch.fx.GraphModule, target: str, value) -> None:
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, value)


def _get_attr(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def select_per_channel(module: nn.Module, index: torch.Tensor, size: int) -> None:
    """Keep (and order) the channels ``index`` of a per-channel module's 1-D parameters and
    buffers of length ``size``: removal in finalize, permutation in passes/sort_channels.py."""
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t is not None and t.dim() == 1 and t.numel() == size:
            new = t.detach().index_select(0, index.to(t.device))
            setattr(module, name, nn.Parameter(new) if isinstance(t, nn.Parameter) else new)
    for attr in ("num_features", "num_parameters"):
        if hasattr(module, attr):
            setattr(module, attr, int(index.numel()))


def select_constants(gm: torch.fx.GraphModule, node: torch.fx.Node, ax: int, index: torch.Tensor, size: int,
                     done: set[str]) -> None:
    """The same for the per-channel get_attr operands of element-wise ``node`` (channels on
    dim ``ax`` of its value); ``done`` holds the constants already handled."""
    nd = node.meta["tensor_meta"].shape.__len__()
    for a in node.all_input_nodes:
        if a.op != "get_attr" or a.target in done:
            continue
        t = _get_attr(gm, a.target)
        pa = ax - (nd - t.dim())
        if pa < 0 or t.shape[pa] != size:
            continue
        new = t.detach().index_select(pa, index.to(t.device))
        _set_attr(gm, a.target, nn.Parameter(new) if isinstance(t, nn.Parameter) else new)
        done.add(a.target)


class FinalizePass(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        analysis: ChannelAnalysis = gm.meta[meta.ANALYSIS]
        keep = _Keep(gm, analysis)
        labels = [t for n in gm.graph.nodes for t in tree_flatten(n.meta.get(meta.LABELS))[0]
                  if isinstance(t, torch.Tensor)]
        revived = keep.revive_empty(labels)
        if revived:
            warnings.warn(f"finalize kept one channel in tensors whose channels were all at 0 bits: "
                          f"{', '.join(revived)}; the finalized model differs from the search model there")
        modules = dict(gm.named_modules())
        sliced: set[str] = set()
        for node in list(gm.graph.nodes):
            role = node.meta.get(meta.ROLE)
            if role == "act_search":
                self._freeze_act(gm, node, modules[node.target])
            elif role == "weight_search":
                self._shrink_layer(gm, node, modules[node.target], analysis, keep)
            elif node.op == "call_module" and isinstance(modules.get(node.target), _PER_CHANNEL):
                self._shrink_per_channel(node, modules[node.target], keep)
            elif node.op in ("call_function", "call_method"):
                kind = node_kind(node, None)
                if kind == "elementwise":
                    self._shrink_constants(gm, node, keep, sliced)
                elif kind == "structural":
                    self._fix_literal_sizes(node, keep)
        for node in list(gm.graph.nodes):
            if node.meta.get(meta.ROLE) == "choice":
                gm.graph.erase_node(node)
        self._fold_batchnorm(gm)
        remove_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        for node in gm.graph.nodes:  # labels now describe the surviving channels only
            if meta.LABELS in node.meta:
                node.meta[meta.LABELS] = tree_map(keep.shrink, node.meta[meta.LABELS])
        return PassResult(gm, True)

    # ---- search nodes ------------------------------------------------------------------
    @staticmethod
    def _freeze_act(gm, node, act) -> None:
        restore_relu(gm, node)
        bits = act.precisions[int(act.alpha.detach().argmax())]
        _set_attr(gm, node.target, FakeQuantAct(bits, act.lo, act.hi, act.signed))
        node.args = (node.args[0],)
        node.meta[meta.ROLE] = "act_quant"

    @staticmethod
    def _shrink_layer(gm, node, layer, analysis, keep: _Keep) -> None:
        info = analysis.layers[node.target]
        unit_bits = keep.bits[info.group][info.unit_index]
        keep_out = unit_bits > 0
        keep_in = keep.mask(info.in_labels)
        w = layer.weight.detach()
        search_range = weight_absmax(w)[keep_out]  # the search's per-channel scale, all columns in
        g = layer.groups if isinstance(layer, nn.modules.conv._ConvNd) else 1
        if g == 1:
            w = w[keep_out][:, keep_in]
        else:
            c_in_g, c_out_g = info.in_features // g, info.out_features // g
            in_g, out_g = keep_in.view(g, c_in_g), keep_out.view(g, c_out_g)
            alive = in_g.any(1) | out_g.any(1)
            if not (in_g[alive] == in_g[alive][:1]).all() or not (out_g[alive] == out_g[alive][:1]).all():
                raise FinalizeError(f"grouped layer '{node.target}' would lose channels unevenly across "
                                    "its groups; this is a bug in the channel analysis, please report it")
            w = w.view(g, c_out_g, c_in_g, *w.shape[2:])[alive][:, out_g[alive][0]][:, :, in_g[alive][0]]
            w = w.reshape(-1, *w.shape[2:])
            layer.groups = int(alive.sum())
        layer.weight = nn.Parameter(w.contiguous())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[keep_out])
        if isinstance(layer, nn.Linear):
            layer.out_features, layer.in_features = w.shape[0], w.shape[1]
        else:
            layer.out_channels, layer.in_channels = w.shape[0], w.shape[1] * layer.groups
        x = node.args[0]
        act = gm.get_submodule(x.target) if x.op == "call_module" and x.meta.get(meta.ROLE) == "act_quant" else None
        w_range = search_range if bool((weight_absmax(w) < search_range).any()) else None  # removed columns held it
        _set_attr(gm, node.target, quant_class_for(layer).from_float(layer, unit_bits[keep_out], act, w_range))
        node.args = (x,)
        node.meta[meta.ROLE] = "quant_layer"

    # ---- consumers ---------------------------------------------------------------------
    @staticmethod
    def _shrink_per_channel(node, module, keep: _Keep) -> None:
        ax, k = keep.along(node.args[0].meta.get(meta.LABELS))
        if k is not None and not bool(k.all()):
            select_per_channel(module, torch.nonzero(k).view(-1), k.numel())

    @staticmethod
    def _shrink_constants(gm, node, keep: _Keep, sliced: set[str]) -> None:
        ax, k = keep.along(node.meta.get(meta.LABELS))
        if k is not None and not bool(k.all()):
            select_constants(gm, node, ax, torch.nonzero(k).view(-1), k.numel(), sliced)

    @staticmethod
    def _fix_literal_sizes(node, keep: _Keep) -> None:
        """Rewrite integer sizes and offsets that refer to a dim losing channels."""
        src = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        src_lab = src.meta.get(meta.LABELS) if src is not None else None
        in_ax, k_in = keep.along(src_lab if isinstance(src_lab, torch.Tensor) else None)
        if k_in is None or bool(k_in.all()):
            return
        name = node.target if isinstance(node.target, str) else node.target.__name__
        out_lab = node.meta.get(meta.LABELS)
        if name in ("view", "reshape", "expand"):
            shape = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
            out_ax, k_out = keep.along(out_lab)
            if out_ax is not None and isinstance(shape[out_ax], int) and shape[out_ax] != -1:
                shape[out_ax] = int(k_out.sum())
                node.args = (src, *shape)
        elif name in ("split", "chunk", "tensor_split"):
            dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
            if dim % len(src.meta["tensor_meta"].shape) == in_ax:
                sizes = [int(tm.shape[in_ax]) if keep.along(lab)[1] is None else int(keep.along(lab)[1].sum())
                         for lab, tm in zip(out_lab, node.meta["tensor_meta"])]
                node.target = "split" if node.op == "call_method" else torch.split
                node.args, node.kwargs = (src, sizes, in_ax), {}
        elif name == "getitem" and isinstance(node.args[1], (tuple, slice)):
            index = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
            if Ellipsis in index or None in index or in_ax >= len(index):
                return
            item = index[in_ax]
            if isinstance(item, slice):
                if item.step not in (None, 1):
                    raise FinalizeError(f"node {node.format_node()} slices channels with a step; "
                                        "exclude its producer from the search")
                n = len(k_in)
                start, stop, _ = item.indices(n)
                index[in_ax] = slice(int(k_in[:start].sum()), int(k_in[:stop].sum()))
            elif isinstance(item, int):
                index[in_ax] = int(k_in[:item % len(k_in)].sum())
            node.args = (src, tuple(index))
        elif name in ("narrow", "select"):
            dim = node.args[1]
            if dim % len(node.args[0].meta["tensor_meta"].shape) == in_ax:
                start = node.args[2] % len(k_in)
                new_start = int(k_in[:start].sum())
                if name == "narrow":
                    length = int(k_in[start:start + node.args[3]].sum())
                    node.args = (src, dim, new_start, length)
                else:
                    node.args = (src, dim, new_start)

    # ---- batchnorm folding -------------------------------------------------------------
    @staticmethod
    def _fold_batchnorm(gm) -> None:
        modules = dict(gm.named_modules())
        for node in list(gm.graph.nodes):
            bn = modules.get(node.target) if node.op == "call_module" else None
            if not isinstance(bn, _FOLDABLE_BN) or not bn.track_running_stats:
                continue
            prev = node.args[0]
            layer = modules.get(prev.target) if prev.op == "call_module" else None
            if not isinstance(layer, QuantWeightMixin) or len(prev.users) != 1:
                continue
            if isinstance(layer, nn.Linear) and not isinstance(bn, (nn.BatchNorm1d, nn.SyncBatchNorm)):
                continue
            with torch.no_grad():
                factor = torch.rsqrt(bn.running_var + bn.eps)
                if bn.affine:
                    factor = factor * bn.weight
                bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                layer.weight.mul_(factor.view(-1, *([1] * (layer.weight.dim() - 1))))
                if layer.w_range is not None:
                    layer.w_range = layer.w_range * factor.abs()
                layer.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)
            node.replace_all_uses_with(prev)
            gm.graph.erase_node(node)


def _copy_without_layer_weights(search_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy whose searchable layers still point at the search model's weights and
    biases: _shrink_layer replaces them by sliced copies before anything writes to them, so
    copying them first (most of the model's memory) would only cost time."""
    layers = [m for m in search_model.modules() if isinstance(m, WeightSearchMixin)]
    shared = [t for m in layers for t in (m.weight, m.bias) if t is not None]
    return copy.deepcopy(search_model, {id(t): t for t in shared})


def _unshare(gm: torch.fx.GraphModule, search_model: torch.fx.GraphModule) -> None:
    """Copy any tensor the finalized model still shares with the search model (none expected)."""
    theirs = {t.data_ptr() for t in search_model.parameters()}
    for name, t in list(gm.named_parameters()):
        if t.data_ptr() in theirs:
            _set_attr(gm, name, nn.Parameter(t.detach().clone(), t.requires_grad))


def finalize_graph(search_model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Run the finalize pass on a copy of ``search_model`` (which is left as it is)."""
    gm = _copy_without_layer_weights(search_model)
    gm.eval()
    device = next((t.device for t in gm.state_dict().values()), None)
    gm = FinalizePass()(gm).graph_module
    _unshare(gm, search_model)
    return gm if device is None else gm.to(device)  # new buffers (w_bits, a zero lo) start on the CPU

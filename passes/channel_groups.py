"""Channel-group pass: which layers' output channels each tensor holds, and which layers'
channels must be pruned together.

Every output channel of every searchable layer (Conv1d/2d/3d, Linear) is a *slot*. The pass
runs the graph once on the example inputs and carries, next to every value, an int64 *label*
tensor broadcastable to the value: each element is the slot it holds, or -1 for data that
holds no prunable channel (the network input, constants, outputs of unmodelled ops).
Structural ops (view, cat, split, permute, getitem, channel shuffle, ...) are applied to the
label tensors themselves, so offsets, flatten blocks and permutations come out exact.

Slots that meet element by element (residual add, squeeze-excitation gate, depthwise conv)
are united (networkx UnionFind): a *unit* is a set of slots pruned and quantized together,
and a *group* is a connected set of layers sharing units (one choice parameter per group).
Whatever the pass cannot model safely *freezes* the units it touches (0 bits disallowed)
and records why: the rule is that a unit can only end in searchable layers' inputs, where
the search masks it, or in per-channel ops removed along with it.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Sequence

import networkx as nx
import torch
import torch.fx
from torch.fx.node import map_arg
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils._pytree import tree_flatten, tree_map

from fxsearch import meta
from fxsearch.errors import UnsupportedModelError

from .op_kinds import is_nonneg_producer, node_kind, spatial_dims

_PASSES_NONNEG = ("structural", "spatial")
_KEEPS_NONNEG_LOCAL = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity",
                       "StochasticDepth", "contiguous", "clone", "to", "float", "detach", "dropout"}


@dataclasses.dataclass
class LayerInfo:
    """A searchable layer as the analysis sees it."""

    name: str               # module qualified name
    node: str               # fx node that calls it
    kind: str               # "conv" or "linear"
    in_features: int
    out_features: int
    groups: int
    in_labels: torch.Tensor  # (in_features,) slot held by each input channel, -1 for none
    out_slots: torch.Tensor  # (out_features,) slot of each output channel
    group: int = -1
    unit_index: torch.Tensor | None = None  # (out_features,) unit of each output channel


@dataclasses.dataclass
class GroupInfo:
    """Layers whose output channels share one choice parameter, unit by unit."""

    id: int
    layers: list[str]
    frozen: torch.Tensor             # (units,) bool: 0 bits disallowed
    reasons: dict[int, list[str]]    # unit -> why it is frozen

    @property
    def num_units(self) -> int:
        return int(self.frozen.numel())

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for why in self.reasons.values():
            counts[why[0]] += 1
        return dict(counts)


@dataclasses.dataclass
class ChannelAnalysis:
    layers: dict[str, LayerInfo]
    groups: list[GroupInfo]
    slot_unit: torch.Tensor  # (slots, 2): group and unit of every slot

    def units_of(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group and unit ids of a label tensor (-1 where unlabelled)."""
        flat = labels.reshape(-1)
        gu = torch.full((flat.numel(), 2), -1, dtype=torch.long)  # labels are small, the table is not:
        known = flat >= 0                                         # index it, do not copy it
        gu[known] = self.slot_unit[flat[known]]
        return gu[:, 0].view(labels.shape), gu[:, 1].view(labels.shape)


def compress(lab: torch.Tensor | None) -> torch.Tensor | None:
    """Shrink every dim along which the labels are constant to size 1; None if all -1."""
    if lab is None or bool((lab < 0).all()):
        return None
    for ax in range(lab.dim()):
        if lab.shape[ax] > 1:
            first = lab.narrow(ax, 0, 1)
            if bool((lab == first).all()):
                lab = first
    return lab.contiguous()


def varying_dims(lab: torch.Tensor) -> list[int]:
    return [ax for ax in range(lab.dim()) if lab.shape[ax] > 1]


def _describe(node: torch.fx.Node, module: torch.nn.Module | None) -> str:
    if node.op == "call_module":
        return f"{type(module).__name__} '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


class _LabelInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, excluded: Sequence[Any]):
        super().__init__(gm)
        self.modules = dict(gm.named_modules())
        self.excluded = excluded
        self.uf = nx.utils.UnionFind()
        self.frozen: dict[int, list[str]] = defaultdict(list)
        self.num_slots = 0
        self.layers: dict[str, LayerInfo] = {}
        self.labels: dict[torch.fx.Node, Any] = {}

    # ---- bookkeeping -------------------------------------------------------------------
    def freeze(self, lab: Any, reason: str) -> None:
        for t in tree_flatten(lab)[0]:
            if isinstance(t, torch.Tensor):
                for s in torch.unique(t[t >= 0]).tolist():
                    if reason not in self.frozen[s]:
                        self.frozen[s].append(reason)

    def unite_columns(self, mat: torch.Tensor, reason: str) -> None:
        """Unite the labelled entries of each column; freeze columns mixing in unlabelled data."""
        for col in mat.t():
            labelled = col[col >= 0]
            if labelled.numel() == 0:
                continue
            if labelled.numel() < col.numel():
                self.freeze(labelled, reason)
            else:
                self.uf.union(*labelled.tolist())

    def roots(self, lab: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(lab, return_inverse=True)
        mapped = torch.tensor([self.uf[u] if u >= 0 else -1 for u in uniq.tolist()], dtype=torch.long)
        return mapped[inv]

    def settle(self, lab: torch.Tensor | None, where: str) -> torch.Tensor | None:
        """Labels in canonical form: compressed, varying along at most one dim.

        Two varying dims (a channel dim split in two, as in channel shuffle) are made one by
        tying the slots across the first; more than two cannot be pruned safely.
        """
        lab = compress(lab)
        if lab is None or len(varying_dims(lab)) <= 1:
            return lab
        lab = compress(self.roots(lab))
        dims = varying_dims(lab)
        if len(dims) == 2:
            mat = lab.movedim(dims, (0, 1)).reshape(lab.shape[dims[0]], lab.shape[dims[1]])
            if bool((mat < 0).any()):
                self.freeze(lab, f"channels mixed with other data across dims by {where}")
                return None
            self.unite_columns(mat, where)
            lab = compress(self.roots(lab))
            if len(varying_dims(lab)) <= 1:
                return lab
        self.freeze(lab, f"channels spread over several dims by {where}")
        return None

    def only_dims(self, lab: torch.Tensor | None, dims: set[int], reason: str) -> torch.Tensor | None:
        """Freeze and drop labels that vary along dims outside ``dims``."""
        if lab is not None and any(ax not in dims for ax in varying_dims(lab)):
            self.freeze(lab, reason)
            return None
        return lab

    def new_slots(self, n: int) -> torch.Tensor:
        slots = torch.arange(self.num_slots, self.num_slots + n)
        self.num_slots += n
        for s in slots.tolist():
            self.uf[s]
        return slots

    # ---- interpreter -------------------------------------------------------------------
    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        labels = self.label(n, value, args, kwargs)
        for lab in tree_flatten(labels)[0]:  # each piece of a split too, even one nobody reads
            if isinstance(lab, torch.Tensor) and not varying_dims(lab):
                # one unit holds the whole tensor: pruning it would leave the tensor empty
                self.freeze(lab, f"holds every channel of node {n.name}")
        if n.op != "output":
            n.meta[meta.LABELS] = labels
            self.labels[n] = labels
            n.meta[meta.NONNEG] = self.is_nonneg(n)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                n.meta[meta.RANGE] = (float(value.min()), float(value.max()))
        return value

    def arg_labels(self, a: Any) -> Any:
        return map_arg(a, lambda node: self.labels.get(node))

    def label(self, n: torch.fx.Node, value: Any, args: tuple, kwargs: dict) -> Any:
        if n.op in ("placeholder", "get_attr"):
            return None
        if n.op == "output":
            self.freeze(self.arg_labels(n.args), f"reaches the model output (node {n.name})")
            return None
        module = self.modules.get(n.target) if n.op == "call_module" else None
        where = f"{_describe(n, module)} (node {n.name})"
        kind = node_kind(n, module)
        if module is not None and self.is_excluded(n.target, module):
            kind, where = "unknown", f"layer '{n.target}' excluded from the search (node {n.name})"
        in_lab = self.labels.get(n.args[0]) if n.args and isinstance(n.args[0], torch.fx.Node) else None
        if kind == "shape":
            return None
        if not isinstance(value, torch.Tensor) and kind != "structural":
            kind = "unknown"
        if kind in ("local", "spatial", "reduce", "along_dim", "layer_norm", "group_norm"):
            if in_lab is not None and (not isinstance(args[0], torch.Tensor) or args[0].dim() != in_lab.dim()):
                kind = "unknown"
        rule = getattr(self, f"rule_{kind}")
        return rule(n, module, value, args, kwargs, in_lab, where)

    def is_excluded(self, qualname: str, module: torch.nn.Module) -> bool:
        return any(e == qualname or (isinstance(e, type) and isinstance(module, e)) for e in self.excluded)

    def is_nonneg(self, n: torch.fx.Node) -> bool:
        module = self.modules.get(n.target) if n.op == "call_module" else None
        if is_nonneg_producer(n, module):
            return True
        kind = node_kind(n, module)
        name = type(module).__name__ if module is not None else getattr(n.target, "__name__", str(n.target))
        if kind in _PASSES_NONNEG or (kind == "local" and name in _KEEPS_NONNEG_LOCAL):
            inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
            return bool(inputs) and all(a.meta.get(meta.NONNEG, False) for a in inputs[:1])
        return False

    # ---- rules, one per kind (see op_kinds.py) ------------------------------------------
    def rule_unknown(self, n, module, value, args, kwargs, in_lab, where):
        self.freeze(self.arg_labels((n.args, n.kwargs)), f"{where} is not modelled")
        return None

    def rule_local(self, n, module, value, args, kwargs, in_lab, where):
        per_channel = isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.InstanceNorm1d,
                                          torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d))
        if isinstance(module, torch.nn.PReLU) and module.num_parameters > 1:
            per_channel = True
        if per_channel:
            return self.only_dims(in_lab, {1}, f"channels off dim 1 reach {where}")
        return in_lab

    def rule_spatial(self, n, module, value, args, kwargs, in_lab, where):
        dims = spatial_dims(n, module, args[0])
        if in_lab is not None and any(ax in dims for ax in varying_dims(in_lab)):
            self.freeze(in_lab, f"{where} works across channels")
            return None
        return in_lab

    def _dim_arg(self, n, args, kwargs, default=None):
        if isinstance(n.target, str) and n.op == "call_module":
            return getattr(self.modules[n.target], "dim", default)
        if "dim" in kwargs:
            return kwargs["dim"]
        return args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else default

    def rule_reduce(self, n, module, value, args, kwargs, in_lab, where):
        if in_lab is None:
            return None
        dim = self._dim_arg(n, args, kwargs)
        nd = in_lab.dim()
        dims = list(range(nd)) if dim is None else [d % nd for d in ([dim] if isinstance(dim, int) else dim)]
        if any(ax in dims for ax in varying_dims(in_lab)):
            self.freeze(in_lab, f"{where} reduces over channels")
            return None
        return in_lab if value.dim() == nd else in_lab.squeeze(tuple(dims))

    def rule_along_dim(self, n, module, value, args, kwargs, in_lab, where):
        default = 1 if n.target is torch.nn.functional.normalize else None
        dim = self._dim_arg(n, args, kwargs, default)
        if in_lab is not None and (dim is None or dim % in_lab.dim() in varying_dims(in_lab)):
            self.freeze(in_lab, f"{where} mixes channels")
            return None
        return in_lab

    def rule_layer_norm(self, n, module, value, args, kwargs, in_lab, where):
        shape = module.normalized_shape if module is not None else (args[1] if len(args) > 1 else kwargs["normalized_shape"])
        k = 1 if isinstance(shape, int) else len(shape)
        if in_lab is not None and any(ax >= in_lab.dim() - k for ax in varying_dims(in_lab)):
            self.freeze(in_lab, f"{where} normalizes over channels")
            return None
        return in_lab

    def rule_group_norm(self, n, module, value, args, kwargs, in_lab, where):
        if in_lab is not None and 1 in varying_dims(in_lab):
            self.freeze(in_lab, f"{where} normalizes over groups of channels")
            return None
        return in_lab

    def rule_structural(self, n, module, value, args, kwargs, in_lab, where):
        if n.op == "call_function" and n.target.__name__ == "getitem" and not isinstance(args[0], torch.Tensor):
            container = self.arg_labels(n.args[0])
            return None if container is None else container[args[1]]

        def full(node: torch.fx.Node) -> Any:
            val = self.env[node]
            if not isinstance(val, torch.Tensor):
                return val
            lab = self.labels.get(node)
            base = torch.full((1,) * val.dim(), -1, dtype=torch.long) if lab is None else lab
            return base.expand(val.shape).contiguous()

        data = map_arg(n.args[0], full)  # only the data operand(s); indices and shapes stay values
        if all(t is None for t in tree_flatten(self.arg_labels(n.args[0]))[0]):
            return tree_map(lambda v: None, value)
        # labels live on the CPU: so do index tensors applied to them, whatever the model's device
        rest, kwargs = tree_map(lambda a: a.cpu() if isinstance(a, torch.Tensor) else a, (args[1:], kwargs))
        try:
            if n.op == "call_module":
                out = module(data)
            elif n.op == "call_method":
                out = getattr(data, n.target)(*rest, **kwargs)
            else:
                out = n.target(data, *rest, **kwargs)
        except Exception:  # the op does not accept integer tensors: treat it as unknown
            return self.rule_unknown(n, module, value, args, kwargs, in_lab, where)
        out = tree_map(lambda t: self.settle(t, where) if isinstance(t, torch.Tensor) else None, out)
        if isinstance(out, torch.Tensor) and in_lab is not None and self.splits_outer(in_lab, out, args[0], value):
            self.freeze(out, f"channels pruned by whole outer blocks of the channel dim split by {where}")
        return out

    @staticmethod
    def splits_outer(in_lab: torch.Tensor, out: torch.Tensor, src: Any, value: Any) -> bool:
        """A reshape splitting the channel dim in (outer, inner, ...) with channels varying along
        the outer part only (as after a channel shuffle): pruning would remove whole outer
        blocks, and finalize cannot rewrite the sizes (often computed, e.g. ``c // groups``)."""
        ins, outs = varying_dims(in_lab), varying_dims(out)
        if len(ins) != 1 or len(outs) != 1 or not isinstance(src, torch.Tensor) or value.dim() <= src.dim():
            return False
        before = src.shape[:ins[0]].numel()  # elements before the channel dim, then the channel span
        end = before * src.shape[ins[0]]
        upto = value.shape[:outs[0]].numel()  # output elements before and through the varying dim
        through = upto * value.shape[outs[0]]
        return upto >= before and through < end and end % through == 0

    def rule_elementwise(self, n, module, value, args, kwargs, in_lab, where):
        operands = [a for a in (*n.args, *n.kwargs.values())
                    if isinstance(a, torch.fx.Node) and isinstance(self.env[a], torch.Tensor)]
        nd = value.dim()
        labs = {}
        for a in operands:
            lab = self.labels.get(a)
            labs[a] = None if lab is None else lab.reshape((1,) * (nd - lab.dim()) + tuple(lab.shape))
        if all(lab is None for lab in labs.values()):
            return None
        reduced = [1] * nd
        for lab in labs.values():
            for ax in varying_dims(lab) if lab is not None else ():
                reduced[ax] = value.shape[ax]
        stack = []
        for a in operands:
            shape = (1,) * (nd - self.env[a].dim()) + tuple(self.env[a].shape)
            lab = labs[a]
            broadcast = any(shape[ax] == 1 and reduced[ax] > 1 for ax in range(nd))
            if lab is not None and broadcast:
                self.freeze(lab, f"one channel broadcast over many by {where}")
                lab = None
            real = a.op != "get_attr"
            if lab is None:
                stack.append(torch.full(reduced, -2 if real and not broadcast else -1, dtype=torch.long))
            else:  # unlabelled elements of a labelled operand are real data too
                stack.append(lab.expand(reduced).masked_fill(lab.expand(reduced) < 0, -2 if real else -1))
        m = torch.stack(stack).reshape(len(stack), -1)
        clash = (m == -2).any(0)
        self.freeze(m[:, clash], f"combined with unprunable data by {where}")
        m = m[:, ~clash] if bool(clash.any()) else m
        for k in range(1, m.shape[0]):
            both = (m[0] >= 0) & (m[k] >= 0)
            pairs = torch.unique(torch.stack([m[0][both], m[k][both]], 1), dim=0)
            for x, y in pairs.tolist():
                self.uf.union(x, y)
        out = torch.stack(stack).clamp_min(-1).amax(0)
        return self.settle(out, where)

    def rule_searchable(self, n, module, value, args, kwargs, in_lab, where):
        is_conv = not isinstance(module, torch.nn.Linear)
        nd = value.dim()
        axis = 1 if is_conv else nd - 1
        c_in = module.in_channels if is_conv else module.in_features
        c_out = module.out_channels if is_conv else module.out_features
        in_axis = 1 if is_conv else args[0].dim() - 1
        in_lab = self.only_dims(in_lab, {in_axis}, f"input channels of {where} spread over other dims")
        if in_lab is None:
            in_labels = torch.full((c_in,), -1, dtype=torch.long)
        else:
            in_labels = in_lab.movedim(in_axis, 0).reshape(in_lab.shape[in_axis], -1)[:, 0].expand(c_in)
        if n.target in self.layers:  # a module called twice shares weights, so units too
            info = self.layers[n.target]
            self.unite_columns(torch.stack([info.in_labels, in_labels]), f"weights shared by {where}")
            out = info.out_slots
        else:
            out = self.new_slots(c_out)
            groups = module.groups if is_conv else 1
            info = LayerInfo(n.target, n.name, "conv" if is_conv else "linear", c_in, c_out, groups,
                             in_labels.clone(), out)
            self.layers[n.target] = info
            if groups > 1:
                self.tie_groups(in_labels, out, groups, where)
        shape = [1] * nd
        shape[axis] = c_out
        return out.view(shape)

    def tie_groups(self, in_labels: torch.Tensor, out: torch.Tensor, groups: int, where: str) -> None:
        """Keep a grouped conv valid under pruning.

        Depthwise-like (one input channel per group): a group's input channel and its output
        channels go together (the number of groups shrinks). Otherwise the same in-group
        index goes in every group (the groups shrink evenly).
        """
        c_in_g, c_out_g = in_labels.numel() // groups, out.numel() // groups
        if c_in_g == 1:
            per_group = torch.cat([in_labels.view(groups, 1), out.view(groups, c_out_g)], 1)
            self.unite_columns(per_group.t(), f"depthwise {where} over unprunable input")
        else:
            self.unite_columns(in_labels.view(groups, c_in_g), f"grouped {where} input")
            self.unite_columns(out.view(groups, c_out_g), f"grouped {where} output")

    # ---- result ------------------------------------------------------------------------
    def resolve(self) -> ChannelAnalysis:
        roots = [self.uf[s] for s in range(self.num_slots)]
        frozen_roots: dict[int, list[str]] = defaultdict(list)
        for s, why in self.frozen.items():
            for r in why:
                if r not in frozen_roots[roots[s]]:
                    frozen_roots[roots[s]].append(r)
        graph = nx.Graph()
        graph.add_nodes_from(self.layers)
        members: dict[int, list[str]] = defaultdict(list)
        for name, info in self.layers.items():
            for r in dict.fromkeys(roots[s] for s in info.out_slots.tolist()):
                members[r].append(name)
        for names in members.values():
            nx.add_path(graph, names)
        order = {name: i for i, name in enumerate(self.layers)}
        components = sorted((sorted(c, key=order.get) for c in nx.connected_components(graph)),
                            key=lambda c: order[c[0]])
        slot_unit = torch.full((self.num_slots, 2), -1, dtype=torch.long)
        groups = []
        for gid, names in enumerate(components):
            unit_of_root: dict[int, int] = {}
            for name in names:
                info = self.layers[name]
                info.group = gid
                idx = [unit_of_root.setdefault(roots[s], len(unit_of_root)) for s in info.out_slots.tolist()]
                info.unit_index = torch.tensor(idx, dtype=torch.long)
                slot_unit[info.out_slots, 0] = gid
                slot_unit[info.out_slots, 1] = info.unit_index
            frozen = torch.zeros(len(unit_of_root), dtype=torch.bool)
            reasons = {}
            for r, u in unit_of_root.items():
                if r in frozen_roots:
                    frozen[u] = True
                    reasons[u] = frozen_roots[r]
            groups.append(GroupInfo(gid, names, frozen, reasons))
        return ChannelAnalysis(self.layers, groups, slot_unit)


class ChannelGroupPass(PassBase):
    """Label every node's channels, tie and freeze them, and store a ChannelAnalysis in gm.meta."""

    def __init__(self, example_inputs: Sequence[Any], exclude: Sequence[Any] = ()):
        super().__init__()
        self.example_inputs = example_inputs
        self.exclude = exclude

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        interp = self._run(gm)
        analysis = interp.resolve()
        if not analysis.layers:
            raise UnsupportedModelError(
                f"{type(gm).__name__} has no searchable layer (Conv1d/2d/3d or Linear called as a "
                "module) outside the excluded ones; nothing to search"
            )
        gm.meta[meta.ANALYSIS] = analysis
        return PassResult(gm, False)

    def _run(self, gm: torch.fx.GraphModule) -> _LabelInterpreter:
        """One labelled run in the model's own mode (activation ranges as in training); where
        train mode cannot run on these inputs (BatchNorm on a batch of one), in eval mode."""
        saved = [(b, b.clone()) for b in gm.buffers()]
        was_training = gm.training
        try:
            with torch.no_grad():
                try:
                    interp = _LabelInterpreter(gm, self.exclude)
                    interp.run(*self.example_inputs)
                except Exception:
                    if not was_training:
                        raise
                    gm.eval()
                    interp = _LabelInterpreter(gm, self.exclude)
                    interp.run(*self.example_inputs)
        finally:  # a run in train mode updates BatchNorm running stats: undo it
            for b, value in saved:
                b.copy_(value)
            gm.train(was_training)
        return interp

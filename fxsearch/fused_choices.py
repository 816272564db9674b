"""The choice side of a training step as one compiled graph each way (SearchModel.fuse_quantizers).

What a search model derives from its choices and weights alone -- the pruning masks, every
search layer's quantized weight and bias, and the costs -- is computed at the start of a
train-mode forward by one call instead of a few hundred small operations spread over the
step (each a few microseconds of dispatch and autograd bookkeeping): the modules' own code,
traced once (make_fx; the layers' tensors swapped for the traced inputs by
torch.func.functional_call), forward and backward compiled by inductor (called through an
autograd.Function of its own where it can be, see _Joint), and checked once
against the modules (values and gradients; a failed check or compile warns and leaves the
modules to compute their values). The thetas themselves stay torch's softmax, as the
modules compute them (inductor's differs in the last bit, which a later quantizer can turn
into a whole code step), one call for all choices whose logits have one shape where that
gives the modules' values bit for bit (checked at the first step), so forward values equal
the modules' bit for bit; costs and gradients agree to float rounding. The
weights' straight-through gradient is written as plain operations for tracing (see
traceable_params). The modules take their values from it (``given``, set for one forward);
SearchModel.cost hands out the costs it computed while the choices are unchanged and no
backward has run through them (after one, it computes them anew: task and cost may each have
a backward of their own, the cost's second or with retain_graph, since both read the step's
thetas).

Applies in train mode with gradients, on float32 CPU tensors, outside autocast, without Gumbel
sampling; elsewhere the modules compute their values as before.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.fx.experimental.proxy_tensor import make_fx

from . import meta
from .fused_quantizers import _weight_forward, compile_capturing, constants_of, placeholders_of
from .quantizers import nonzero_rows, sample_choice
from .search_modules import ActSearch, GroupChoice, WeightSearchMixin


def _scales_bias(layer: WeightSearchMixin) -> bool:
    """Whether theta scales the layer's bias (1 - theta[0]): then it is one of the graph's outputs."""
    return layer.zero_row is not None and layer.bias is not None


def traceable_params(layer: WeightSearchMixin, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """layer.effective_params(theta) as plain differentiable operations (no autograd.Function,
    which tracing would see through): the fused kernel's forward on the detached weight, plus
    (w - w.detach()) * sum of the non-zero rows of theta, zero forward, the straight-through
    gradient backward."""
    t = layer.channel_theta(theta)
    w = layer.weight.reshape(len(layer.weight), -1)
    bias = layer.bias if _scales_bias(layer) else None
    got = _weight_forward(w.detach(), layer.bits, t, *(() if bias is None else (bias,)), zero_row=layer.zero_row)
    weight = got[0] + (w - w.detach()) * nonzero_rows(t, layer.zero_row).sum(0).unsqueeze(1)
    # a clone: an output that is a view would be rebuilt from its base at every call
    return weight.view(layer.weight.shape).clone(), (layer.bias if bias is None else got[2])


class _Plan:
    """Who reads which choice, from the graph: groups, activation quantizers with the groups of
    their masks, search layers with their group; the tensors the choice side reads (module,
    attribute); where the given values go."""

    def __init__(self, model: torch.fx.GraphModule):
        self.groups: dict[str, GroupChoice] = {}
        self.acts: dict[str, tuple[ActSearch, tuple[str, ...]]] = {}
        self.layers: dict[str, tuple[WeightSearchMixin, str]] = {}
        for node in model.graph.nodes:
            if node.op != "call_module":
                continue
            module = model.get_submodule(node.target)
            if isinstance(module, GroupChoice):
                self.groups[node.target] = module
            elif isinstance(module, (ActSearch, WeightSearchMixin)):
                reads = tuple(a.target for a in node.args[1:] if isinstance(a, torch.fx.Node))
                if len(reads) != len(node.args) - 1:
                    raise ValueError(f"{node.name} takes a theta that is not a graph value")
                if not isinstance(module, ActSearch) and len(reads) != 1:
                    raise ValueError(f"{node.name} takes {len(reads)} thetas")
                entry = (module, reads) if isinstance(module, ActSearch) else (module, reads[0])
                table = self.acts if isinstance(module, ActSearch) else self.layers
                if table.setdefault(node.target, entry) != entry:
                    raise ValueError(f"{node.target} is called with different choices")
        missing = {g for _, reads in self.acts.values() for g in reads} | {g for _, g in self.layers.values()}
        if missing - set(self.groups):
            raise ValueError(f"thetas from outside the choice modules: {sorted(map(str, missing - set(self.groups)))}")
        self.choices = [*self.groups.values(), *(act for act, _ in self.acts.values())]
        self.sources = [(f"{name}.{attr}", layer, attr) for name, (layer, _) in self.layers.items()
                        for attr in ("weight", "bias") if getattr(layer, attr) is not None]
        # choices with logits of one shape, whose thetas one softmax over their logits stacked
        # along a new first dim gives (the softmax computes each of them as it would alone, so
        # they equal the modules' thetas bit for bit; checked once, see stacking_is_exact)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, choice in enumerate(self.choices):
            if len(choice.precisions) > 1:
                by_shape.setdefault(tuple(_choice_tensors(choice)[0].shape), []).append(i)
        self.stacks = [rows for rows in by_shape.values() if len(rows) > 1]
        # where the given values go, in the order of outputs(): the modules' __dict__, written
        # without nn.Module.__setattr__'s look into its parameter, buffer and module tables (a
        # hundred of these per step)
        self.theta_tables = [c.__dict__ for c in self.choices]
        self.mask_tables = [act.__dict__ for act, reads in self.acts.values() if reads]
        self.layer_tables = [(layer.__dict__, layer, _scales_bias(layer)) for layer, _ in self.layers.values()]

    def tensors(self, stacked: bool = True) -> list[torch.Tensor]:
        """What the compiled graph reads: every choice's theta (the modules' own softmax, so
        that they equal the per-module values bit for bit; where `stacked`, the choices of one
        logits shape from one softmax, see stacked_thetas), then the layers' weights and biases."""
        thetas = self.stacked_thetas() if stacked else {}
        return ([thetas[i] if i in thetas else c.theta() for i, c in enumerate(self.choices)]
                + [module._parameters[attr] for _, module, attr in self.sources])

    def stacked_thetas(self) -> dict[int, torch.Tensor]:
        """The thetas of each stack of choices in training mode and one sampling, from one
        softmax over their stacked logits: {choice index: theta} (views of it)."""
        thetas = {}
        for rows in self.stacks:
            choices = [self.choices[i] for i in rows]
            sampling = choices[0].sampling
            if any(c.sampling != sampling or not c.training for c in choices):
                continue
            logits = torch.stack([c.logits() for c in choices])
            temperatures = torch.stack([_choice_tensors(c)[1] for c in choices])
            theta = sample_choice(logits, temperatures.view(-1, *[1] * (logits.dim() - 1)), sampling, True, dim=1)
            thetas.update(zip(rows, theta.unbind(0)))
        return thetas

    def stacking_is_exact(self) -> bool:
        """Whether the stacked thetas equal the modules' (values and gradients) bit for bit."""
        got = self.stacked_thetas()
        want = {i: self.choices[i].theta() for i in got}
        if not all(torch.equal(got[i], want[i]) for i in got):
            return False
        rows = [i for i in got if got[i].requires_grad]
        alphas = [_choice_tensors(self.choices[i])[0] for i in rows]
        cotangents = [torch.linspace(-1, 1, got[i].numel()).view_as(got[i]) for i in rows]
        grads = [torch.autograd.grad([thetas[i] for i in rows], alphas, cotangents, allow_unused=True)
                 for thetas in (got, want)] if rows else [(), ()]
        return all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*grads))

    def stamp(self) -> tuple:
        """What the thetas (so the costs) depend on: each choice's sampling and the versions
        of its tensors (bumped by every in-place change: optimiser steps, loads, fill_) and
        whether they need gradients."""
        stamp = []
        for c in self.choices:
            stamp.append(c.sampling)
            for t in _choice_tensors(c):
                if t is not None:
                    stamp += (id(t), t._version, t.requires_grad)
        return tuple(stamp)

    def applies(self, model: nn.Module) -> bool:
        """Train mode with gradients, outside autocast, choices and weights float32 CPU
        tensors, no Gumbel sampling."""
        if not (model.training and torch.is_grad_enabled()) or torch.is_autocast_enabled("cpu"):
            return False
        tensors = [_choice_tensors(c)[0] for c in self.choices if c.sampling != "gumbel"]
        if len(tensors) < len(self.choices):
            return False
        tensors += [layer._parameters["weight"] for layer, _ in self.layers.values()]
        return all(t.is_cpu and t.dtype is torch.float32 for t in tensors)

    def give_thetas(self, thetas: list[torch.Tensor] | None) -> None:
        """Gives the choices their thetas (None: takes them back)."""
        for table, theta in zip(self.theta_tables, thetas or [None] * len(self.theta_tables)):
            table["given"] = theta

    def outputs(self, model: nn.Module, costs: tuple[str, ...], traced: bool = True) -> list[torch.Tensor]:
        """The values, flat: per masked activation its mask, per layer its weight (and its
        bias where theta scales it), the costs; the modules' own code on the tensors they hold
        (the thetas given), the weights' written for tracing (or the modules' own: not traced)."""
        from .cost_models import _price
        out = [act.mask(tuple(self.groups[g].given for g in reads)).clone()  # (a view otherwise)
               for act, reads in self.acts.values() if reads]
        for layer, group in self.layers.values():
            theta = self.groups[group].given
            weight, bias = traceable_params(layer, theta) if traced else layer.effective_params(theta)
            out += [weight, *([bias] if _scales_bias(layer) else [])]
        return out + list(_price(model, costs).values())

    def hand_out(self, thetas: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gives the modules their values (the thetas, then outputs()); returns the costs."""
        self.give_thetas(thetas)
        it = iter(values)
        for table in self.mask_tables:
            table["given_mask"] = next(it)
        for table, layer, bias_scaled in self.layer_tables:
            table["given"] = (next(it), next(it) if bias_scaled else layer.bias)
        return list(it)

    def clear(self) -> None:
        """Takes the given values back."""
        self.give_thetas(None)
        for table in self.mask_tables:
            table["given_mask"] = None
        for table, _, _ in self.layer_tables:
            table["given"] = None


def _choice_tensors(choice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """alpha, temperature and `allowed` (None where it has none), read from the module's tables
    (nn.Module.__getattr__ costs a few microseconds each inside a step)."""
    return choice._parameters["alpha"], choice._buffers["temperature"], choice._buffers.get("allowed")


class _Traced(nn.Module):
    """The search model under a module whose forward is the choice side (functional_call calls
    a module's forward with the tensors swapped in)."""

    def __init__(self, model: nn.Module, plan: _Plan, costs: tuple[str, ...]):
        super().__init__()
        self.model, self.costs = model, costs
        self.__dict__["plan"] = plan

    def forward(self, *thetas: torch.Tensor, traced: bool = True) -> list[torch.Tensor]:
        self.plan.give_thetas(list(thetas))
        try:
            return self.plan.outputs(self.model, self.costs, traced)
        finally:
            self.plan.give_thetas(None)


class _Side:
    """A model's plan and compiled functions (one per train flags of the choices and
    requires_grad flags and strides of the inputs: hard sampling's thetas are transposed);
    `costs` the last step's costs with the stamp of the choices they came from."""

    def __init__(self, plan: _Plan | None, failed: str | None = None):
        self.plan, self.failed = plan, failed
        self.stacked: bool | None = None  # whether stacking thetas is exact (None: not checked)
        self.compiled: dict[tuple, Any] = {}
        self.costs: tuple[tuple, dict[str, torch.Tensor]] | None = None


_SIDES: "weakref.WeakKeyDictionary[nn.Module, _Side]" = weakref.WeakKeyDictionary()


def _side(model: torch.fx.GraphModule) -> _Side:
    side = _SIDES.get(model)
    if side is None:
        try:
            side = _Side(_Plan(model))
        except ValueError as err:  # a graph this module does not know how to read: eager values
            side = _Side(None, str(err))
        _SIDES[model] = side
    return side


def begin_step(model: torch.fx.GraphModule, args: Any = None) -> None:
    """Before a forward of a fused search model (a forward pre-hook): the choice side computed
    and handed to the modules where it applies, their given values cleared elsewhere."""
    side = _side(model)
    plan = side.plan
    if plan is None:
        return
    if side.failed or not plan.applies(model):  # (nothing is given: end_step cleared it)
        side.costs = None
        return
    if side.stacked is None:
        side.stacked = plan.stacking_is_exact()
    tensors = plan.tensors(side.stacked)
    key = (tuple(c.training for c in plan.choices), tuple((t.requires_grad, t.stride()) for t in tensors))
    costs = tuple(model.meta.get(meta.COST_MODELS) or ())
    try:
        fn = side.compiled.get(key)
        if fn is None:
            fn = side.compiled[key] = _compile(model, plan, costs, tensors)
        values = fn(*tensors)
    except Exception as err:  # tracing or compiling failed: the modules' own values from now on
        side.failed = f"{type(err).__name__}: {err}"
        warnings.warn(f"fxsearch: the choice side of the step could not be compiled, computing it "
                      f"per module ({side.failed[:200]})")
        return
    thetas = tensors[:len(plan.choices)]
    step = dict(zip(costs, plan.hand_out(thetas, list(values))))
    side.costs = (plan.stamp(), step)
    node = next((c.grad_fn for c in step.values() if c.grad_fn is not None), None)
    if node is not None:  # served until a backward runs through them (it frees what they saved)
        node.register_prehook(functools.partial(_spent, weakref.ref(side), step))


def _spent(side_ref: "weakref.ref[_Side]", step: dict, grads: Any) -> None:
    side = side_ref()
    if side is not None and side.costs is not None and side.costs[1] is step:
        side.costs = None


def end_step(model: torch.fx.GraphModule, args: Any = None, out: Any = None) -> None:
    """After a forward, also one that raised (a forward hook): the modules' given values
    cleared (the costs stay for SearchModel.cost)."""
    side = _SIDES.get(model)
    if side is not None and side.plan is not None:
        side.plan.clear()


def forget(model: nn.Module) -> None:
    """Drops the model's choice side (compiled code, last costs): SearchModel.fuse_quantizers
    turning it off."""
    _SIDES.pop(model, None)


def step_costs(model: torch.fx.GraphModule, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """The costs the last forward's choice side computed, if no backward has run through them
    yet, the choices they came from are unchanged since (no optimiser step, load, temperature,
    sampling or requires_grad change) and the caller is in the same regime (train mode,
    gradients on); else None."""
    side = _SIDES.get(model)
    if side is None or side.costs is None or not (model.training and torch.is_grad_enabled()):
        return None
    stamp, costs = side.costs
    if stamp != side.plan.stamp() or any(n not in costs for n in names):
        return None
    return {n: costs[n] for n in names}


def _compile(model: torch.fx.GraphModule, plan: _Plan, costs: tuple[str, ...], tensors: list[torch.Tensor]):
    """The choice side traced, compiled and checked once against the modules' own code."""
    from .cost_models import _price
    with torch.no_grad():  # fills the cost's index caches, which tracing must find filled
        _price(model, costs)
    traced = _Traced(model, plan, costs)
    names = [f"model.{name}" for name, _, _ in plan.sources]
    count = len(plan.choices)

    def side(*inputs, traced_weights=True):
        return torch.func.functional_call(traced, dict(zip(names, inputs[count:])), tuple(inputs[:count]),
                                          {"traced": traced_weights})

    # leaves like the inputs (tracing reads .grad, which torch warns about on a non-leaf theta);
    # pre_dispatch keeps detach() (the straight-through estimators) in the graph
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    gm = make_fx(side, tracing_mode="fake", _allow_non_fake_inputs=True, pre_dispatch=True)(*leaves)
    wrapped, graphs = compile_capturing(gm, leaves)
    reference = functools.partial(side, traced_weights=False)
    direct = _Joint.of(gm, leaves, graphs)
    if direct is not None:
        try:
            _check(direct, reference, leaves)
            return direct
        except Exception:  # the wrapped code is checked alone: it says whether the trace is wrong
            pass
    _check(wrapped, reference, leaves)
    return wrapped


class _Joint:
    """The choice side's generated forward and backward code, called without AOT autograd's
    runtime wrappers around them (0.15 ms of a DS-CNN step each way, more than the forward's
    code itself): a custom autograd.Function that hands the forward's saved tensors and the
    gradients of the outputs, laid out as the backward's code expects, to the backward's code.
    Used where the two graphs have the shape this needs (every output differentiable, no
    saved sizes); checked against the modules like the wrapped code."""

    def __init__(self, forward, backward, constants: list[torch.Tensor], outputs: int,
                 tangents: list[torch.Tensor], reads: list[list[bool]]):
        self.forward, self.backward, self.constants = forward, backward, constants
        self.outputs, self.reads = outputs, reads
        self.tangent_layouts = [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in tangents]

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, inputs: list[torch.Tensor], graphs: list) -> "_Joint | None":
        if len(graphs) != 2 or any(getattr(code, "current_callable", None) is None for _, code in graphs):
            return None
        (forward, forward_code), (backward, backward_code) = graphs
        constants, outputs = constants_of(gm), len(gm.graph.output_node().args[0])
        saved = [n for n in placeholders_of(backward) if not n.name.startswith("tangents")]
        tangents = [n.meta.get("val") for n in placeholders_of(backward) if n.name.startswith("tangents")]
        if (len(placeholders_of(forward)) != len(constants) + len(inputs) or len(tangents) != outputs
                or len(forward.graph.output_node().args[0]) != outputs + len(saved)
                or len(backward.graph.output_node().args[0]) != len(constants) + len(inputs)
                or not all(isinstance(n.meta.get("val"), torch.Tensor) for n in saved)
                or not all(isinstance(t, torch.Tensor) for t in tangents)):
            return None
        inputs_of_gm = placeholders_of(gm)
        reads = []  # per output, whether it is computed from each input
        for node in gm.graph.output_node().args[0]:
            ancestors = _ancestors([node])
            reads.append([p in ancestors for p in inputs_of_gm])
        return cls(forward_code.current_callable, backward_code.current_callable, constants, outputs,
                   tangents, reads)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _JointCall.apply(self, *inputs)


def _ancestors(nodes) -> set[torch.fx.Node]:
    """The nodes `nodes` are computed from, themselves included."""
    seen: set[torch.fx.Node] = set()
    stack = [n for n in nodes if isinstance(n, torch.fx.Node)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


class _JointCall(torch.autograd.Function):
    """apply(joint, *inputs): joint's outputs; their gradients from its backward code. An
    output no backward reads gets zeros, and inputs that only such outputs are computed from
    get None, as they would from the modules' code (a backward through the costs alone)."""

    @staticmethod
    def forward(ctx, joint: _Joint, *inputs):
        values = joint.forward([*joint.constants, *inputs])
        ctx.joint = joint
        ctx.save_for_backward(*values[joint.outputs:])
        ctx.set_materialize_grads(False)
        return tuple(values[:joint.outputs])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        joint = ctx.joint
        tangents = [torch.empty_strided(shape, stride, dtype=dtype).zero_() if g is None
                    else g if g.stride() == stride else torch.empty_strided(shape, stride, dtype=dtype).copy_(g)
                    for g, (shape, stride, dtype) in zip(grads, joint.tangent_layouts)]
        got = joint.backward([*ctx.saved_tensors, *tangents])[len(joint.constants):]
        if any(g is None for g in grads):
            used = [any(r) for r in zip(*(reads for g, reads in zip(grads, joint.reads) if g is not None))]
            got = [g if u else None for g, u in zip(got, used or [False] * len(got))]
        return (None, *got)


def _check(fn, reference, tensors: list[torch.Tensor]) -> None:
    """Raises where fn's values or gradients (for a random cotangent) differ from reference's
    beyond float rounding: tracing records operations, so a cost function that reads a number
    off a tensor or has an autograd.Function of its own would be traced wrong."""
    inputs = [t.detach().requires_grad_(t.requires_grad) for t in tensors]  # (its own leaves)
    wanted = [t for t in inputs if t.requires_grad]
    generator = torch.Generator().manual_seed(0)
    results = []
    for f in (fn, reference):
        outs = f(*inputs)
        cotangents = [torch.randn(o.shape, generator=generator, dtype=o.dtype) for o in outs]
        differentiable = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
        grads = [None] * len(wanted)  # (nothing needs a gradient: a frozen model's first step)
        if wanted and differentiable:
            used, used_cotangents = zip(*differentiable)
            grads = torch.autograd.grad(used, wanted, used_cotangents, allow_unused=True)
        results.append(([o.detach() for o in outs], [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)]))
        generator.manual_seed(0)
    (outs, grads), (ref_outs, ref_grads) = results
    for kind, got, want in (("value", outs, ref_outs), ("gradient", grads, ref_grads)):
        for k, (a, b) in enumerate(zip(got, want)):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-6 * (1 + float(b.abs().max()))):
                raise RuntimeError(f"the compiled choice side's {kind} {k} differs from the modules' "
                                   f"(max difference {float((a - b).abs().max()) if a.shape == b.shape else 'shape'})")

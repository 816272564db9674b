"""The mixed-precision quantizers of fxsearch.quantizers as single fused loops (inductor).

Eager PyTorch runs each quantizer as a dozen passes over a (precisions x tensor) stack; here
the same arithmetic in the same order (divide by the scale, round half to even, clamp to the
code range, multiply by scale and theta, sum the precisions from 0 upwards) is compiled into
one loop per forward and one per backward, with no stack in memory; a weight kernel also
takes the layer's bias and 0-bit row of theta (the pruned share), an activation forward its
saturation test. Forward values equal the eager ones; gradients agree to float rounding (sums
run in another order). Opt-in (``SearchModel.fuse_quantizers()``): the first step compiles
(a few kernels, each shared by layers of every shape; cached on disk by torch). Where
compiling fails, the eager quantizers take over (for weights, the same functions
uncompiled). CPU only (fxsearch.quantizers._fused): GPU code may divide with a non-IEEE
instruction.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch._functorch.config as functorch_config
import torch._inductor
import torch.fx.experimental._config as fx_config
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch.fx.experimental.proxy_tensor import make_fx

from .quantizers import MixedActQuant, _cannot_saturate, _grid_escapes, act_grid, nonzero_rows, weight_scale

_FAILED: list[str] = []  # the first compile error, once compiling has failed


def _in_order(term, count: int) -> torch.Tensor:
    """term(0) + term(1) + ... in this order, as the eager quantizers sum (a reduction may
    reorder); unrolled when compiled into one loop, with no (P, ...) stack in memory."""
    out = term(0)
    for p in range(1, count):
        out = out + term(p)
    return out


# The kernels take activations viewed (A, C, R), C the dims a mask spans (a mask is (C,)), and
# weights viewed (C_out, K), so that layers of every kind share compiled code. Each returns what
# autograd wants, the few per-precision numbers included: the small ops around a compiled call
# would cost more than the loop (a dozen dispatches of a few microseconds each).
def _act_forward(x, lo, hi, bits, theta, mask=None, *, may_saturate: bool):
    """The quantized tensor, the grid (scale, zero point, top code) for the backward and
    whether a code can saturate (_grid_escapes, a bool tensor; False without may_saturate).
    may_saturate=False leaves out the code range clamp (half the loop's time), for callers
    that know no code can leave its grid (_cannot_saturate)."""
    scale, zp, levels = act_grid(lo, hi, bits)
    escapes = _grid_escapes(lo, hi, scale, zp, levels) if may_saturate else torch.zeros((), dtype=torch.bool)
    scaled_theta = scale * theta
    y = torch.clamp(x, lo, hi)

    def code(p):
        t = torch.round(y / scale[p])
        return torch.clamp(t, -zp[p], levels[p] - zp[p]) if may_saturate else t

    out = _in_order(lambda p: code(p) * scaled_theta[p], len(bits))
    return (out if mask is None else out * mask.reshape(1, -1, 1)), scale, zp, levels, escapes


def _channel_sum(v: torch.Tensor) -> torch.Tensor:
    """(A, C, R) -> (C,): the rows of R first (contiguous, one loop per (A, C) row, parallel
    over them), then over A; 15-30 % faster than one reduction over (0, 2)."""
    return v.sum(2).sum(0)


def _act_grads(x, grad, lo, hi, scale, levels, theta, mask, live, q, ys, his, los):
    """grad_x and the gradients of lo, hi, theta and the mask from the per-precision and
    per-channel sums against grad (each (P, C), C the mask's dim of (A, C, R)) of the codes
    and, where the code is inside its grid, of y, [x > hi], [x < lo]; `live` the factor of
    grad_x where lo <= x <= hi."""
    if mask is not None:
        c = mask.reshape(1, -1, 1)
        live = live * c
        q_m, ys_m, his_m, los_m = ((v * c.reshape(1, -1)).sum(1) for v in (q, ys, his, los))
    else:
        q_m, ys_m, his_m, los_m = (v.sum(1) for v in (q, ys, his, los))
    grad_x = torch.where((x >= lo) & (x <= hi), grad * live, 0)
    d_scale = (q_m - ys_m / scale) * theta
    grad_lo = -(d_scale / levels).sum() + (theta * los_m).sum()
    grad_hi = (d_scale / levels).sum() + (theta * his_m).sum()
    grad_mask = (q * (theta * scale).unsqueeze(1)).sum(0)
    return grad_x, grad_lo, grad_hi, q_m * scale, grad_mask


def _act_backward(x, grad, lo, hi, scale, zp, levels, theta, mask=None):
    """All gradients (_act_grads) where codes may saturate: every sum per precision, over
    the codes inside their grid. One term per precision, unrolled: no (P, ...) stack in memory."""
    y = torch.clamp(x, lo, hi)
    above, below = (x > hi).to(x.dtype), (x < lo).to(x.dtype)
    sums, live = [[], [], [], []], 0
    for p in range(len(scale)):
        t = torch.round(y / scale[p])
        inside = ((t >= -zp[p]) & (t <= levels[p] - zp[p])).to(x.dtype)
        gi = grad * inside
        live = live + inside * theta[p]
        for k, v in enumerate((torch.clamp(t, -zp[p], levels[p] - zp[p]) * grad, gi * y, gi * above, gi * below)):
            sums[k].append(_channel_sum(v))
    return _act_grads(x, grad, lo, hi, scale, levels, theta, mask, live, *[torch.stack(v) for v in sums])


def _act_backward_inside(x, grad, lo, hi, scale, levels, theta, mask=None):
    """_act_backward where no code can saturate (every code is inside its grid, as for clip
    ranges with lo = 0): y, [x > hi], [x < lo] are summed once, not once per precision."""
    y = torch.clamp(x, lo, hi)
    q = torch.stack([_channel_sum(torch.round(y / scale[p]) * grad) for p in range(len(scale))])
    ys, his, los = (_channel_sum(v * grad).expand_as(q)
                    for v in (y, (x > hi).to(x.dtype), (x < lo).to(x.dtype)))
    return _act_grads(x, grad, lo, hi, scale, levels, theta, mask, theta.sum(), q, ys, his, los)


# The weight kernels take theta with every precision's row and the bias, so that a search
# layer's rows, bias factor and their gradients are part of the compiled call (a handful of
# small autograd ops per layer and step otherwise).
def _weight_forward(w, bits, theta, bias=None, *, zero_row):
    """The quantized weight (w (C, K); theta (P, C), the 0-bit row zero_row or None) with its
    scales ((P', C), non-zero precisions), and the bias times 1 - theta[zero_row] if given."""
    scale = weight_scale(w, bits)
    s, t = scale.unsqueeze(2), nonzero_rows(theta, zero_row).unsqueeze(2)
    out = _in_order(lambda p: torch.round(w / s[p]) * s[p] * t[p], len(bits))
    return (out, scale) if bias is None else (out, scale, bias * (1 - theta[zero_row]))


def _weight_backward(w, grad, scale, theta, grad_bias=None, bias=None, *, zero_row):
    """grad_w (straight through, times the sum of the non-zero rows of theta), grad_theta
    (<grad_c, Q_p(W_c)> per non-zero precision; -<grad_bias_c, bias_c> in the 0-bit row)
    and, with a bias, its gradient."""
    rows = nonzero_rows(theta, zero_row)
    grad_rows = (torch.round(w.unsqueeze(0) / scale.unsqueeze(2)) * grad.unsqueeze(0)).sum(2) * scale
    grad_w = grad * rows.sum(0).unsqueeze(1)
    if zero_row is None:
        return grad_w, grad_rows
    zero = torch.zeros_like(theta[zero_row]) if bias is None else -grad_bias * bias
    grad_theta = torch.cat([grad_rows[:zero_row], zero.unsqueeze(0), grad_rows[zero_row:]])
    return (grad_w, grad_theta) if bias is None else (grad_w, grad_theta, grad_bias * (1 - theta[zero_row]))


def _view_3d(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int, int] | None:
    """(A, C, R) to view x in, C the dims the mask spans (the mask is then (C,)), so that
    layers of every kind share compiled code; (numel, 1, 1) without a mask. None where the
    mask's dims are not adjacent. (Found once per layout: _act_call.)"""
    if mask is None:
        return x.numel(), 1, 1
    m = (1,) * (x.dim() - mask.dim()) + tuple(mask.shape)
    full = [i for i in range(x.dim()) if m[i] != 1] or [0]
    a, b = full[0], full[-1] + 1
    if any(m[i] != x.shape[i] for i in range(a, b)):
        return None
    return math.prod(x.shape[:a]), math.prod(x.shape[a:b]), math.prod(x.shape[b:])


# Compiled code is called directly, without torch.compile's frame evaluation and guards (about
# 20 us per call, more than the loop itself for small tensors). Traced with symbolic sizes
# (make_fx) and compiled by inductor once per family (kernel, static arguments, dtype, device
# and rank of each tensor); a call with new sizes or strides takes the first of its family's
# functions whose guards (the size assumptions of tracing and code generation: sizes 0 and 1
# are specialised, some loop choices depend on size ranges) the new sizes meet, or compiles
# one more.
_FAMILIES: dict[tuple, list[tuple[list, object]]] = {}  # family -> [(traced placeholders, function)]
_BY_LAYOUT: dict[tuple, object] = {}  # family, sizes and strides -> function
# The per-layout lookups (_BY_LAYOUT, _ACT_CALLS) start afresh when they reach this many
# entries (inputs of ever new sizes, such as variable sequence lengths): rebuilding an entry
# finds its family's compiled code again, it compiles nothing.
MAX_LAYOUTS = 1024
# no size relations assumed from sizes that happen to be equal at tracing
_NO_DUCK_SHAPES = fx_config.patch(use_duck_shape=False)


def _compile(family: tuple, fn, tensors: list[torch.Tensor]):
    """The family's compiled function whose guards these tensors meet, compiled now if none."""
    compiled = _FAMILIES.setdefault(family, [])
    for placeholders, function in compiled:
        if placeholders[0].fake_mode.shape_env.evaluate_guards_for_args(placeholders, tensors, ignore_static=False):
            return function
    with _NO_DUCK_SHAPES:
        gm = make_fx(fn, tracing_mode="symbolic")(*tensors)
    placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    function = _inductor(gm, placeholders)
    compiled.append((placeholders, function))
    return function


def compile_capturing(gm: torch.fx.GraphModule, inputs: list) -> tuple[object, list]:
    """gm compiled by inductor, as AOT autograd wraps it, with the graphs inductor compiled on
    the way and their generated code: [(graph, code)], the forward, then the backward where
    inputs need gradients (compiled now, not at the first backward). The forward's inputs are
    gm's parameters and buffers (constants_of), then `inputs`. AOT autograd's cache is off for
    it (a hit would hand back the wrapped code without compiling the inner graphs); inductor's
    own cache still serves."""
    inner = []

    def compile_inner(graph, example_inputs, **kwargs):
        code = compile_fx_inner(graph, example_inputs, **kwargs)
        inner.append((graph, code))
        return code

    # donated_buffer off: a backward that reuses its saved tensors' memory cannot run twice
    # (retain_graph), which AOT's wrapper refuses but a caller of the code directly would not see
    with functorch_config.patch(enable_autograd_cache=False, force_non_lazy_backward_lowering=True,
                                donated_buffer=False):
        wrapped = compile_fx(gm, inputs, inner_compile=compile_inner)
    return wrapped, inner


def constants_of(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The tensors AOT autograd passes to gm's forward code ahead of the inputs."""
    return [*dict(gm.named_parameters(remove_duplicate=False)).values(),
            *dict(gm.named_buffers(remove_duplicate=False)).values()]


def placeholders_of(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph.graph.nodes if n.op == "placeholder"]


def _inductor(gm: torch.fx.GraphModule, placeholders: list):
    """gm compiled by inductor, called straight into its generated code where that takes and
    returns exactly gm's tensors: AOT autograd's runtime wrappers around it (a dozen Python
    calls, for input mutations, aliased outputs and the like, none of which these kernels
    have) cost more than a small kernel inside a training step (0.5 ms of a DS-CNN step). The
    first call compares the two ways' results; the wrapped one stays where they differ."""
    wrapped, inner = compile_capturing(gm, placeholders)
    if len(inner) != 1 or getattr(inner[0][1], "current_callable", None) is None:
        return wrapped
    graph, code = inner[0]
    inputs = [n.meta.get("val") for n in placeholders_of(graph)]
    outputs = graph.graph.output_node().args[0]
    if (len(inputs) != len(placeholders) or not all(isinstance(v, torch.Tensor) for v in inputs)
            or len(outputs) != len(gm.graph.output_node().args[0])):
        return wrapped
    return _Direct(code, wrapped)


class _Direct:
    """Calls inductor's generated code (boxed: it takes a list); at the first call checked
    against `wrapped`, which it calls from then on where the two differ."""

    def __init__(self, code, wrapped):
        self.code, self.wrapped = code, wrapped
        self.direct: bool | None = None  # unchecked

    def __call__(self, *tensors):
        if self.direct:
            return self.code.current_callable(list(tensors))
        want = self.wrapped(*tensors)
        if self.direct is None:
            try:
                got = self.code.current_callable(list(tensors))
            except Exception:  # the wrapped function serves (not the process-wide eager fallback)
                got = ()
            self.direct = len(got) == len(want) and all(
                a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
                for a, b in zip(got, want))
        return want


def _run(name: str, fn, *tensors: torch.Tensor, **static):
    """fn(*tensors, **static) compiled and run (static: Python values and None, part of the
    code); None once compiling has failed in this process, or for empty tensors (callers go
    eager)."""
    if _FAILED:
        return None
    if torch.is_grad_enabled():  # (autograd.Function's forward and backward run without)
        tensors = [t.detach() for t in tensors]
    try:
        return _function(name, fn, tensors, static)(*tensors)
    except Exception as err:
        return _give_up(err)


def _function(name: str, fn, tensors: list[torch.Tensor], static: dict):
    """The compiled fn for the layout (dtype, device, sizes, strides) of these tensors; for
    empty tensors, which inductor's code fails on, one that returns None (callers go eager)."""
    layout = (name, *static.items(), *[(t.dtype, t.device, t.shape, t.stride()) for t in tensors])
    function = _BY_LAYOUT.get(layout)
    if function is None:
        _make_room(_BY_LAYOUT)
        if any(t.numel() == 0 for t in tensors):
            function = _BY_LAYOUT[layout] = _nothing
        else:
            family = (name, *static.items(), *[(t.dtype, t.device, t.dim()) for t in tensors])
            function = _BY_LAYOUT[layout] = _compile(family, functools.partial(fn, **static),
                                                     [t.detach() for t in tensors])
    return function


def _nothing(*tensors: torch.Tensor) -> None:
    return None


def _make_room(lookup: dict) -> None:
    if len(lookup) >= MAX_LAYOUTS:
        lookup.clear()


def _give_up(err: Exception) -> None:
    """No C++ compiler, an unsupported backend, ...: the eager quantizers from now on (None)."""
    _FAILED.append(f"{type(err).__name__}: {err}")
    warnings.warn(f"fxsearch: fused quantizers could not be compiled, using the eager ones ({_FAILED[0][:200]})")


def compiled_kernels() -> set[str]:
    """The kernels compiled so far in this process (act_forward, weight_backward, ...)."""
    return {family[0] for family, functions in _FAMILIES.items() if functions}


def available() -> bool:
    """False once compiling has failed in this process."""
    return not _FAILED


class _ActCall:
    """One layout of FusedActQuant's arguments: the (A, C, R) view of x and the compiled
    forward, and the backward for either saturation case once it has run."""

    __slots__ = ("shape", "forward", "backward")

    def __init__(self, shape: tuple[int, int, int], forward):
        self.shape, self.forward = shape, forward
        self.backward: dict[bool, object] = {}


# The calls of each layout (None: the mask's dims are not adjacent, eager), keyed by what can
# differ between a search model's quantizer calls. Inside a training step, _run's layout key
# (dtype, device, sizes and strides of every tensor, forward and backward) and the view took
# longer than the smaller kernels (0.5 ms of a DS-CNN step with the rest of the Python here).
_ACT_CALLS: dict[tuple, _ActCall | None] = {}


def _act_call(x, lo, hi, theta, bits, mask, may_saturate: bool) -> _ActCall | None:
    """The compiled call for these arguments (as fake_quant_act hands them: one dtype, x on
    the CPU); None where the eager quantizer runs (see _view_3d, or compiling failed)."""
    if _FAILED or not (lo.is_cpu and hi.is_cpu and theta.is_cpu and bits.is_cpu and (mask is None or mask.is_cpu)):
        return None  # (eager raises for tensors on two devices)
    key = (x.shape, x.stride(), lo.shape, hi.shape, bits.shape, theta.stride(),
           None if mask is None else (mask.shape, mask.stride()), may_saturate)
    try:
        return _ACT_CALLS[key]
    except KeyError:
        pass
    shape = _view_3d(x, mask)
    call = None
    if shape is not None:
        tensors = [x.reshape(shape), lo, hi, bits, theta, *_flat(mask)]
        try:
            call = _ActCall(shape, _function("act_forward", _act_forward, tensors, {"may_saturate": may_saturate}))
        except Exception as err:
            return _give_up(err)
    _make_room(_ACT_CALLS)
    _ACT_CALLS[key] = call
    return call


def _flat(mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return () if mask is None else (mask.reshape(-1),)


class FusedActQuant(torch.autograd.Function):
    """MixedActQuant (fxsearch.quantizers) as fused loops; same arguments and results."""

    @staticmethod
    def forward(ctx, x, lo, hi, theta, bits, mask=None):
        may_saturate = not _cannot_saturate(lo, hi)
        call = _act_call(x, lo, hi, theta, bits, mask, may_saturate)
        try:
            got = call and call.forward(x.reshape(call.shape), lo, hi, bits, theta, *_flat(mask))
        except Exception as err:
            got = _give_up(err)
        if not got:
            return MixedActQuant.forward(ctx, x, lo, hi, theta, bits, mask)
        out, scale, zp, levels, escapes = got
        ctx.save_for_backward(x, lo, hi, theta, bits, mask)
        ctx.call = call
        ctx.grid = scale, zp, levels  # three numbers per precision; backward reuses them
        ctx.saturates = may_saturate and bool(escapes)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        call = getattr(ctx, "call", None)
        if call is None:  # the forward ran eagerly
            return MixedActQuant.backward(ctx, grad)
        x, lo, hi, theta, bits, mask = ctx.saved_tensors
        scale, zp, levels = ctx.grid
        # every tensor's layout follows from the forward's (grad made contiguous)
        tensors = [x.reshape(call.shape), grad.contiguous().view(call.shape), lo, hi, scale,
                   *((zp,) if ctx.saturates else ()), levels, theta, *_flat(mask)]
        got = None
        try:
            function = call.backward.get(ctx.saturates)
            if function is None:
                function = call.backward[ctx.saturates] = (
                    _function("act_backward", _act_backward, tensors, {}) if ctx.saturates
                    else _function("act_backward_inside", _act_backward_inside, tensors, {}))
            got = function(*tensors)
        except Exception as err:
            _give_up(err)
        if got is None:
            ctx.saturates = True  # the general path: right whether or not a code saturates
            return MixedActQuant.backward(ctx, grad)
        grad_x, grad_lo, grad_hi, grad_theta, grad_mask = got
        need_x, need_lo, need_hi, need_theta, _, need_mask = ctx.needs_input_grad
        return (grad_x.view(x.shape) if need_x else None, grad_lo if need_lo else None,
                grad_hi if need_hi else None, grad_theta if need_theta else None, None,
                grad_mask.reshape(mask.shape) if need_mask else None)


class FusedWeightQuant(torch.autograd.Function):
    """A search layer's weight and bias (fxsearch.quantizers.quantized_params) as fused loops.

    forward(w, theta, bits, bias, zero_row): theta (P, C_out) with every precision's row, the
    0-bit one at zero_row (None: none); returns the weight and, where a bias is given, the bias
    times 1 - theta[zero_row]. Where compiling fails the same functions run uncompiled.
    """

    @staticmethod
    def forward(ctx, w, theta, bits, bias, zero_row):
        biases = () if bias is None else (bias,)
        w2 = w.reshape(len(w), -1)
        got = (_run("weight_forward", _weight_forward, w2, bits, theta, *biases, zero_row=zero_row)
               or _weight_forward(w2, bits, theta, *biases, zero_row=zero_row))
        ctx.save_for_backward(w, theta, got[1], bias)
        ctx.zero_row = zero_row
        return got[0].view(w.shape), (got[2] if biases else None)

    @staticmethod
    def backward(ctx, grad, grad_bias):
        w, theta, scale, bias = ctx.saved_tensors
        tensors = (w.reshape(len(w), -1), grad.contiguous().view(len(w), -1), scale, theta)
        tensors += () if bias is None else (grad_bias, bias)
        got = (_run("weight_backward", _weight_backward, *tensors, zero_row=ctx.zero_row)
               or _weight_backward(*tensors, zero_row=ctx.zero_row))
        need_w, need_theta, _, need_bias, _ = ctx.needs_input_grad
        return (got[0].view(w.shape) if need_w else None, got[1] if need_theta else None, None,
                got[2] if need_bias else None, None)

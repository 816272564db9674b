"""The mixed-precision quantizers of fxsearch.quantizers as single fused loops (torch.compile).

Eager PyTorch runs each quantizer as a dozen passes over a (precisions x tensor) stack; here
the same arithmetic in the same order (divide by the scale, round half to even, clamp to the
code range, multiply by scale and theta, sum the precisions from 0 upwards) is compiled into
one loop per forward and one per backward, with no stack in memory. Forward values equal the
eager ones; gradients agree to float rounding (sums run in another order). Opt-in
(``SearchModel.fuse_quantizers()``): the first step compiles, tens of seconds per layer shape
family, cached on disk by torch. Where compiling fails, the eager quantizers take over.
CPU only (fxsearch.quantizers._fused): GPU code may divide with a non-IEEE instruction.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.fx.experimental._config as fx_config

from .quantizers import _saturates, act_grid

_FAILED: list[str] = []  # the first compile error, once compiling has failed


def _view(v: torch.Tensor, d: int) -> torch.Tensor:
    """(P,) -> (P, 1, ..., 1) against a stacked (P, *shape) of rank-d tensors."""
    return v.reshape(-1, *([1] * d))


def _act_codes(x, lo, hi, scale, zp, levels):
    """y = clip(x, lo, hi); codes (P, *x.shape) clamped to each grid; where they were inside."""
    d = x.dim()
    y = torch.clamp(x, lo, hi)
    t = torch.round(y.unsqueeze(0) / _view(scale, d))
    cmin, cmax = _view(-zp, d), _view(levels - zp, d)
    inside = ((t >= cmin) & (t <= cmax)).to(x.dtype)
    return y, torch.clamp(t, cmin, cmax), inside


def _in_order(term, count: int) -> torch.Tensor:
    """term(0) + term(1) + ... in this order, as the eager quantizers sum (a reduction may
    reorder); unrolled when compiled into one loop, with no (P, ...) stack in memory."""
    out = term(0)
    for p in range(1, count):
        out = out + term(p)
    return out


# The kernels take tensors as the caller holds them plus the shape to view them in: views made
# outside would add guards on their bases, and a recompilation per layer.
def _act_forward(x, shape, lo, hi, scale, zp, levels, scaled_theta, mask):
    x = x.reshape(shape)
    mask = None if mask is None else mask.reshape(1, shape[1], 1)
    y = torch.clamp(x, lo, hi)
    out = _in_order(lambda p: torch.clamp(torch.round(y / scale[p]), -zp[p], levels[p] - zp[p]) * scaled_theta[p],
                    len(scale))
    return out if mask is None else out * mask


def _act_backward(x, grad, shape, lo, hi, scale, zp, levels, theta, mask):
    """grad_x, and per precision and channel (mask's dim C of (A, C, R)) the sums against grad
    of the codes, and of y, [x > hi], [x < lo] where the code is inside its grid: 4 x (P, C).
    One term per precision, unrolled: no (P, ...) stack for the compiler to keep in memory."""
    x, grad = x.reshape(shape), grad.reshape(shape)
    y = torch.clamp(x, lo, hi)
    above, below = (x > hi).to(x.dtype), (x < lo).to(x.dtype)
    sums, live = [[], [], [], []], 0
    for p in range(len(scale)):
        t = torch.round(y / scale[p])
        inside = ((t >= -zp[p]) & (t <= levels[p] - zp[p])).to(x.dtype)
        gi = grad * inside
        live = live + inside * theta[p]
        for k, v in enumerate((torch.clamp(t, -zp[p], levels[p] - zp[p]) * grad, gi * y, gi * above, gi * below)):
            sums[k].append(v.sum((0, 2)))
    if mask is not None:
        live = live * mask.reshape(1, shape[1], 1)
    grad_x = torch.where((x >= lo) & (x <= hi), grad * live, 0)
    return grad_x, *[torch.stack(v) for v in sums]


def _act_backward_inside(x, grad, shape, lo, hi, scale, live, need_hi: bool, need_lo: bool):
    """_act_backward where no code can saturate (every code is inside its grid, as for clip
    ranges whose bounds are grid points): per channel, the sums against grad of the P codes,
    then of y, [x > hi] (if need_hi), [x < lo] (if need_lo), a third of the general kernel's
    work. live: the per-channel gradient factor sum_p theta[p] * mask, (C,)."""
    x, grad = x.reshape(shape), grad.reshape(shape)
    y = torch.clamp(x, lo, hi)
    terms = [torch.round(y / scale[p]) * grad for p in range(len(scale))] + [y * grad]
    if need_hi:
        terms.append((x > hi).to(x.dtype) * grad)
    if need_lo:
        terms.append((x < lo).to(x.dtype) * grad)
    grad_x = torch.where((x >= lo) & (x <= hi), grad * live.reshape(1, shape[1], 1), 0)
    return grad_x, torch.stack([t.sum((0, 2)) for t in terms])


def _weight_forward(w, k, scale, theta):  # w viewed (C, K), scale and theta (P, C)
    w = w.reshape(-1, k)
    s, t = scale.unsqueeze(2), theta.unsqueeze(2)
    return _in_order(lambda p: torch.round(w / s[p]) * s[p] * t[p], len(scale))


def _weight_grad_theta(w, grad, k, scale):
    w, grad = w.reshape(-1, k), grad.reshape(-1, k)
    return (torch.round(w.unsqueeze(0) / scale.unsqueeze(2)) * grad.unsqueeze(0)).sum(2) * scale


def _shape_3d(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int, int] | None:
    """(A, C, R) to view x in, C the dims the mask spans (the mask is then (1, C, 1)), so that
    layers of every kind share compiled graphs. None where the mask's dims are not adjacent."""
    if mask is None:
        return 1, x.numel(), 1
    m = (1,) * (x.dim() - mask.dim()) + tuple(mask.shape)
    full = [i for i in range(x.dim()) if m[i] != 1] or [0]
    a, b = full[0], full[-1] + 1
    if any(m[i] != x.shape[i] for i in range(a, b)):
        return None
    return math.prod(x.shape[:a]), math.prod(x.shape[a:b]), math.prod(x.shape[b:])


_KERNELS: dict[str, object] = {}
# no guards on sizes that happen to be equal (one patch object: building one per call costs 3x)
_NO_DUCK_SHAPES = fx_config.patch(use_duck_shape=False)


def _run(name: str, fn, *args):
    """fn compiled (once per name) and run; None once compiling has failed (callers go eager)."""
    if _FAILED:
        return None
    if name not in _KERNELS:
        _KERNELS[name] = torch.compile(fn, dynamic=True)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]  # no requires_grad guards
    try:
        with _NO_DUCK_SHAPES:
            return _KERNELS[name](*args)
    except Exception as err:  # no C++ compiler, an unsupported backend, ...: eager from now on
        _FAILED.append(f"{type(err).__name__}: {err}")
        warnings.warn(f"fxsearch: fused quantizers could not be compiled, using the eager ones ({_FAILED[0][:200]})")
        return None


def available() -> bool:
    """False once compiling has failed in this process."""
    return not _FAILED


class FusedActQuant(torch.autograd.Function):
    """MixedActQuant (fxsearch.quantizers) as fused loops; same arguments and results."""

    @staticmethod
    def forward(ctx, x, lo, hi, theta, bits, mask=None):
        from .quantizers import MixedActQuant
        scale, zp, levels = act_grid(lo, hi, bits)
        shape = _shape_3d(x, mask)
        out = None if shape is None else _run("act_forward", _act_forward, x, shape, lo, hi, scale, zp, levels,
                                              scale * theta, mask)
        if out is None:
            return MixedActQuant.forward(ctx, x, lo, hi, theta, bits, mask)
        ctx.save_for_backward(x, lo, hi, theta, bits, mask)
        ctx.fused = True
        ctx.grid = scale, zp, levels  # three numbers per precision; backward reuses them
        ctx.saturates = _saturates(lo, hi, scale, zp, levels)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        from .quantizers import MixedActQuant
        if not getattr(ctx, "fused", False):  # the forward ran eagerly
            return MixedActQuant.backward(ctx, grad)
        x, lo, hi, theta, bits, mask = ctx.saved_tensors
        need_x, need_lo, need_hi, need_theta, _, need_mask = ctx.needs_input_grad
        scale, zp, levels = ctx.grid
        shape = _shape_3d(x, mask) if mask is not None else (x.numel(), 1, 1)
        if ctx.saturates:
            got = _run("act_backward", _act_backward, x, grad.contiguous(), shape, lo, hi, scale, zp, levels, theta,
                       mask)
        else:
            live = theta.sum().expand(shape[1]) if mask is None else theta.sum() * mask.reshape(-1)
            got = _run("act_backward_inside", _act_backward_inside, x, grad.contiguous(), shape, lo, hi, scale, live,
                       need_hi, need_lo)
        if got is None:
            ctx.saturates = True  # the general path: right whether or not a code saturates
            return MixedActQuant.backward(ctx, grad)
        if ctx.saturates:
            grad_x, per_channel = got[0], torch.stack(got[1:])  # (4, P, C)
        else:  # rows P codes, y, [x > hi], [x < lo]: the last three the same for every precision
            grad_x, rows = got
            P = len(scale)
            zeros = rows.new_zeros(rows.shape[1:])
            extra = [rows[P], rows[P + 1] if need_hi else zeros, rows[-1] if need_lo else zeros]
            per_channel = torch.stack([rows[:P]] + [e.expand(P, -1) for e in extra])
        q, ys, his, los = per_channel.sum(2) if mask is None else (per_channel * mask.reshape(1, 1, -1)).sum(2)
        d_scale = (q - ys / scale) * theta
        return (grad_x.view(x.shape) if need_x else None,
                -(d_scale / levels).sum() + (theta * los).sum() if need_lo else None,
                (d_scale / levels).sum() + (theta * his).sum() if need_hi else None,
                q * scale if need_theta else None, None,
                (per_channel[0] * (theta * scale).unsqueeze(1)).sum(0).reshape(mask.shape) if need_mask else None)


class FusedWeightQuant(torch.autograd.Function):
    """MixedWeightQuant (fxsearch.quantizers) as fused loops; same arguments and results."""

    @staticmethod
    def forward(ctx, w, theta, bits):
        from .quantizers import MixedWeightQuant, weight_absmax
        scale = weight_absmax(w) / (2.0 ** (bits - 1) - 1).unsqueeze(1)
        out = _run("weight_forward", _weight_forward, w, w[0].numel(), scale, theta)
        if out is None:
            return MixedWeightQuant.forward(ctx, w, theta, bits)
        ctx.save_for_backward(w, theta, scale)
        return out.view(w.shape)

    @staticmethod
    def backward(ctx, grad):
        from .quantizers import MixedWeightQuant
        w, theta, scale = ctx.saved_tensors
        grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_theta = _run("weight_grad_theta", _weight_grad_theta, w, grad.contiguous(), w[0].numel(), scale)
            if grad_theta is None:
                return MixedWeightQuant.backward(ctx, grad)
        grad_w = grad * theta.sum(0).reshape(-1, *([1] * (w.dim() - 1))) if ctx.needs_input_grad[0] else None
        return grad_w, grad_theta, None

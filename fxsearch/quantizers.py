"""Fake quantizers and choice sampling: the arithmetic every search and final module shares."""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def weight_absmax(w: torch.Tensor) -> torch.Tensor:
    """max|W_c| per output channel (dim 0), the range of symmetric per-channel quantization."""
    return w.detach().abs().flatten(1).amax(1).clamp_min(EPS)


def weight_scale(w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """(P, C_out) scales of symmetric per-channel quantization at each bit-width in `bits`:
    max|W_c| / (2^(b - 1) - 1)."""
    return weight_absmax(w) / (2.0 ** (bits - 1) - 1).unsqueeze(1)


def _stacked(v: torch.Tensor, dim: int) -> torch.Tensor:
    """(P, ...) per-precision values shaped to broadcast against a stacked (P, *shape) tensor."""
    return v.reshape(*v.shape, *([1] * (dim + 1 - v.dim())))


def _bounds(lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor) -> tuple:
    """Clip bounds as Python floats on CPU (scalar kernels are several times faster than
    tensor-bound ones), as tensors elsewhere (no host sync)."""
    return (float(lo), float(hi)) if x.device.type == "cpu" else (lo, hi)


class MixedWeightQuant(torch.autograd.Function):
    """W_hat_c = sum_p theta[p, c] * Q_p(W_c), all precisions in one stacked pass.

    Q_p(W_c) = round(W_c / s_pc) * s_pc with s_pc = max|W_c| / (2^(b_p - 1) - 1). The signed range
    clamp of the definition never acts: |W / s| <= max|W| / s rounds to at most 2^(b-1) - 1
    (division and rounding are monotonic and max|W| / s is within 2 ulp of it), so it is left out.
    Straight-through rounding: dW_hat/dW = sum_p theta[p, c] (the scale is max|W_c|, which
    symmetric quantization never clips); dW_hat/dtheta[p, c] = Q_p(W_c), recomputed in backward.
    """

    @staticmethod
    def forward(ctx, w, theta, bits):  # theta (P, C_out) for the non-zero precisions in `bits`
        scale = weight_scale(w, bits)
        s = _stacked(scale, w.dim())
        out = torch.div(w, s).round_().mul_(s).mul_(_stacked(theta, w.dim())).sum(0)
        ctx.save_for_backward(w, theta, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        w, theta, scale = ctx.saved_tensors
        grad_w = grad * _stacked(theta.sum(0), w.dim() - 1) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:  # <grad_c, Q_p(W_c)> = s_pc * <grad_c, round(W_c / s_pc)>
            codes = torch.div(w, _stacked(scale, w.dim())).round_().mul_(grad)
            grad_theta = codes.flatten(2).sum(2) * scale
        return grad_w, grad_theta, None


def _fused(fused: bool, t: torch.Tensor) -> bool:
    """Whether to take the compiled quantizers (fxsearch.fused_quantizers): asked for, a
    gradient wanted (without one the eager path skips idle precisions), on the CPU (where the
    compiled division is IEEE's; GPU code generation was not checked for it), in float32 (the
    tracer turns float64 clip bounds into Python numbers, which inductor cannot take)."""
    return fused and torch.is_grad_enabled() and t.device.type == "cpu" and t.dtype == torch.float32


def nonzero_rows(theta: torch.Tensor, zero_row: int | None) -> torch.Tensor:
    """theta without its 0-bit row (zero_row; None: it has none), a view where it can be."""
    if zero_row is None:
        return theta
    return theta[1:] if zero_row == 0 else torch.cat([theta[:zero_row], theta[zero_row + 1:]])


def quantized_params(w: torch.Tensor, bias: torch.Tensor | None, bits: torch.Tensor, theta: torch.Tensor,
                     zero_row: int | None, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A search layer's weight and bias under its precision choice theta ((P, C_out), a row
    per precision, the 0-bit one at zero_row, None if there is none): sum over the non-zero
    precisions `bits` of theta[p, c] * Q_p(W_c), and the bias times 1 - theta[zero_row] (the
    share of the channel kept). fused: compiled loops (fxsearch.fused_quantizers), same values."""
    if _fused(fused, w):
        from .fused_quantizers import FusedWeightQuant
        weight, kept = FusedWeightQuant.apply(w, theta, bits, None if zero_row is None else bias, zero_row)
        return weight, bias if zero_row is None else kept
    weight = MixedWeightQuant.apply(w, nonzero_rows(theta, zero_row), bits)
    if bias is not None and zero_row is not None:
        bias = bias * (1 - theta[zero_row])
    return weight, bias


def act_grid(lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform grid of 2^b levels over [lo, hi] with an integer zero point (0 is exact):
    (scale, zero point, top code 2^b - 1), one entry per bit-width in `bits`."""
    levels = 2 ** bits - 1
    scale = (hi - lo).clamp_min(EPS) / levels
    zero_point = torch.round(-lo.detach() / scale.detach())
    return scale, zero_point, levels


def act_scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of act_grid."""
    return act_grid(lo, hi, bits)[:2]


def _cannot_saturate(lo: torch.Tensor, hi: torch.Tensor) -> bool:
    """True where no code of clip(x, lo, hi) can leave [0, 2^p - 1] at any precision, decided
    from the two numbers alone (on the CPU, without the dozen small ops of _saturates): with
    lo = 0 < hi (unsigned quantizers) zp = 0 and hi / s is within a few ulp of 2^p - 1 (or
    below it where hi - lo < EPS), which rounds to 2^p - 1. False means "maybe"."""
    return lo.device.type == "cpu" and float(lo) == 0.0 and float(hi) > 0.0


def _saturates(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, levels: torch.Tensor) -> bool:
    """Whether a code of clip(x, lo, hi) can leave [0, 2^p - 1], or the clip range is empty.

    round(y / s) is monotonic in y, so the codes of the clip bounds decide for every y in
    [lo, hi]; they leave the range only at rounding ties or float error near the bounds.
    """
    return not _cannot_saturate(lo, hi) and bool(_grid_escapes(lo, hi, scale, zp, levels))


def _grid_escapes(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                  levels: torch.Tensor) -> torch.Tensor:
    """_saturates without its shortcut, as a bool tensor (the fused forward computes it in its loop)."""
    ends = torch.round(torch.stack([lo, hi]).unsqueeze(1) / scale) + zp  # (2, P)
    return ((ends < 0) | (ends > levels)).any() | (lo > hi)


class MixedActQuant(torch.autograd.Function):
    """x_hat = mask * sum_p theta[p] * Q_p(clip(x, lo, hi)), all precisions in one stacked pass (PACT, STE).

    Q_p(y) = (clamp(round(y / s_p) + zp_p, 0, 2^p - 1) - zp_p) * s_p with s_p = (hi - lo) / (2^p - 1),
    computed as clamp(round(y / s_p), -zp_p, 2^p - 1 - zp_p) * s_p (the same integers); the
    clamp is skipped when no code can saturate (see _saturates). `mask` (optional, broadcast
    against x) zeroes pruned channels; multiplying it here saves a pass and a saved tensor.
    Gradients: x passes where lo <= x <= hi and the code is not saturated; theta[p] gets
    <g, Q_p(y)>; the clip bounds get the PACT gradient (inputs beyond the bound) plus the
    rounding error through the scale; the mask gets sum_p theta[p] Q_p(y) summed over the
    dims it broadcasts along. Backward recomputes the codes instead of saving them.
    """

    @staticmethod
    def forward(ctx, x, lo, hi, theta, bits, mask=None):
        scale, zp, levels = act_grid(lo, hi, bits)
        if not any(ctx.needs_input_grad) and bool((theta == 0).any()):  # inference: skip idle precisions
            keep = theta != 0
            scale, zp, levels, theta = scale[keep], zp[keep], levels[keep], theta[keep]
        # off the CPU, the general path (range clamp, per-precision saturation) saves a host sync
        saturates = _saturates(lo, hi, scale, zp, levels) if x.device.type == "cpu" else True
        codes = torch.div(torch.clamp(x, *_bounds(lo, hi, x)), _stacked(scale, x.dim())).round_()
        if saturates:
            codes.clamp_(_stacked(-zp, x.dim()), _stacked(levels - zp, x.dim()))
        out = codes.mul_(_stacked(scale * theta, x.dim())).sum(0)
        if mask is not None:
            out.mul_(mask)
        ctx.saturates = saturates
        ctx.grid = scale, zp, levels  # three numbers per precision; backward reuses them
        ctx.save_for_backward(x, lo, hi, theta, bits, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lo, hi, theta, bits, mask = ctx.saved_tensors
        need_x, need_lo, need_hi, need_theta, _, need_mask = ctx.needs_input_grad
        scale, zp, levels = ctx.grid
        d, P = x.dim(), len(bits)
        # Rows of one stacked buffer, each summed against grad in one pass: the codes Q_p / s_p,
        # then y, [x > hi], [x < lo] restricted to unsaturated codes (one row each when no code
        # saturates, else one per precision).
        per = P if ctx.saturates else 1
        blocks = 1 + need_hi + need_lo
        rows = x.new_empty((P + per * blocks, *x.shape))
        lo_, hi_ = _bounds(lo, hi, x)
        y = torch.clamp(x, lo_, hi_, out=rows[P])
        codes = torch.div(y, _stacked(scale, d), out=rows[:P]).round_()
        starts = [P + per * b for b in range(blocks)]
        if need_hi:  # comparisons written as 0/1 floats: much faster than bool tensors on CPU
            torch.gt(x, hi_, out=rows[starts[1]])
        if need_lo:
            torch.lt(x, lo_, out=rows[starts[-1]])
        grad_x = None
        if ctx.saturates:
            inside = (codes >= _stacked(-zp, d)) & (codes <= _stacked(levels - zp, d))
            codes.clamp_(_stacked(-zp, d), _stacked(levels - zp, d))
            if need_x:
                weight = (inside * _stacked(theta, d)).sum(0) * (1 if mask is None else mask)
                grad_x = torch.where((x >= lo) & (x <= hi), grad * weight, 0)
            for start in starts:
                torch.mul(rows[start].clone(), inside, out=rows[start:start + P])
        elif need_x:  # x == y: lo <= x <= hi (lo <= hi here)
            weight = theta.sum() if mask is None else mask * theta.sum()
            grad_x = torch.eq(x, y, out=torch.empty_like(x)).mul_(grad).mul_(weight)
        if mask is None:
            sums, per_mask = torch.mv(rows.view(len(rows), -1), grad.reshape(-1)), None
        else:
            m = mask.reshape((1,) * (d - mask.dim()) + tuple(mask.shape))
            dims = [i + 1 for i in range(d) if m.shape[i] == 1 and x.shape[i] != 1]
            per_mask = rows.mul_(grad).sum(dims, keepdim=True) if dims else rows.mul_(grad)
            sums = (per_mask * m).flatten(1).sum(1)
        q_sums, rest = sums[:P], sums[P:].view(blocks, per)
        grad_theta = q_sums * scale if need_theta else None
        d_scale = (q_sums - rest[0] / scale) * theta
        grad_hi = (d_scale / levels).sum() + (theta * rest[1]).sum() if need_hi else None
        grad_lo = -(d_scale / levels).sum() + (theta * rest[-1]).sum() if need_lo else None
        grad_mask = None
        if need_mask:
            grad_mask = (per_mask[:P] * _stacked(theta * scale, d)).sum(0).reshape(mask.shape)
        return grad_x, grad_lo, grad_hi, grad_theta, None, grad_mask


def fake_quant_act(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor,
                   theta: torch.Tensor, mask: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """Mixed PACT activation quantization: sum_p theta[p] * Q_p(clip(x, lo, hi)), times `mask`
    (broadcast against x) if given. Computed in float32 whatever x's dtype (autocast hands
    bf16/fp16 here; their rounding would move the grid); the result is float32 then.
    fused: compiled loops (fxsearch.fused_quantizers), same values."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    lo, hi, theta, bits, mask = (t if t is None or t.dtype == x.dtype else t.to(x.dtype)
                                 for t in (lo, hi, theta, bits, mask))
    fn = MixedActQuant
    if _fused(fused, x):
        from .fused_quantizers import FusedActQuant as fn
    return fn.apply(x, lo, hi, theta, bits, mask)


def sample_choice(logits: torch.Tensor, temperature: float | torch.Tensor, mode: str, training: bool,
                  dim: int = 0) -> torch.Tensor:
    """Choice probabilities theta over `dim` (the precisions). ``temperature``: a number or a
    tensor (the modules' buffer: no host read, which a compiled cost could not trace).

    Eval mode returns the one-hot argmax; training returns softmax(logits / T), its
    straight-through hard version, or a Gumbel-softmax sample.
    """
    n = logits.shape[dim]
    if not training:
        return F.one_hot(logits.argmax(dim), n).movedim(-1, dim).to(logits.dtype)
    if mode == "gumbel":
        return F.gumbel_softmax(logits, tau=temperature, hard=False, dim=dim)
    soft = torch.softmax(logits / temperature, dim=dim)
    if mode == "hard":
        hard = F.one_hot(soft.argmax(dim), n).movedim(-1, dim).to(soft.dtype)
        return hard + soft - soft.detach()
    return soft

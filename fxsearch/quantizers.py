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


def _weight_grid(w: torch.Tensor, scale: torch.Tensor, qmax: float) -> torch.Tensor:
    """round(W / s) clamped to the signed range, times s (one precision, channel scales `scale`)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.round(w / scale.view(shape)).clamp_(-qmax - 1, qmax).mul_(scale.view(shape))


class MixedWeightQuant(torch.autograd.Function):
    """W_hat_c = sum_p theta[p, c] * Q_p(W_c) without materialising one weight copy per precision.

    Straight-through rounding: dW_hat/dW = sum_p theta[p, c] (the scale is max|W_c|, which
    symmetric quantization never clips); dW_hat/dtheta[p, c] = Q_p(W_c), recomputed in backward.
    """

    @staticmethod
    def forward(ctx, w, theta, bits):  # theta (P, C_out) for the non-zero precisions in `bits`
        absmax = weight_absmax(w)
        out = torch.zeros_like(w)
        shape = (-1,) + (1,) * (w.dim() - 1)
        for p, b in enumerate(bits.tolist()):
            qmax = 2.0 ** (b - 1) - 1
            out.add_(_weight_grid(w, absmax / qmax, qmax).mul_(theta[p].view(shape)))
        ctx.save_for_backward(w, theta, bits)
        return out

    @staticmethod
    def backward(ctx, grad):
        w, theta, bits = ctx.saved_tensors
        shape = (-1,) + (1,) * (w.dim() - 1)
        grad_w = grad * theta.sum(0).view(shape) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            absmax = weight_absmax(w)
            rows = []
            for b in bits.tolist():
                qmax = 2.0 ** (b - 1) - 1
                rows.append((grad * _weight_grid(w, absmax / qmax, qmax)).flatten(1).sum(1))
            grad_theta = torch.stack(rows)
        return grad_w, grad_theta, None


def fake_quant_weight(w: torch.Tensor, bits: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Mixed quantized weight: sum over precisions `bits` (all > 0) of theta[p, c] * Q_p(W_c)."""
    return MixedWeightQuant.apply(w, theta, bits)


def act_scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform grid of 2^b levels over [lo, hi] with an integer zero point (0 is exact)."""
    scale = (hi - lo).clamp_min(EPS) / (2 ** bits - 1)
    zero_point = torch.round(-lo.detach() / scale.detach())
    return scale, zero_point


def _act_codes(y: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """round(y / s) + zp, before clamping to the levels."""
    return torch.round(y / scale).add_(zero_point)


class MixedActQuant(torch.autograd.Function):
    """x_hat = sum_p theta[p] * Q_p(clip(x, lo, hi)) in one pass per precision (PACT, STE).

    Q_p(y) = (clamp(round(y / s_p) + zp_p, 0, 2^p - 1) - zp_p) * s_p with s_p = (hi - lo) / (2^p - 1).
    Gradients: x passes where lo <= x <= hi and the code is not saturated; theta[p] gets
    <g, Q_p(y)>; the clip bounds get the PACT gradient (inputs beyond the bound) plus the
    rounding error through the scale. Backward recomputes Q_p instead of saving P copies.
    """

    @staticmethod
    def forward(ctx, x, lo, hi, theta, bits):
        scale, zp = act_scale_zero_point(lo, hi, bits)
        levels = 2 ** bits - 1
        y = torch.clamp(x, lo, hi)
        out = torch.zeros_like(x)
        skip_idle = not any(ctx.needs_input_grad)
        for p in range(len(bits)):
            if skip_idle and float(theta[p]) == 0.0:
                continue
            q = _act_codes(y, scale[p], zp[p]).clamp_(0, float(levels[p]))
            out.add_(q.sub_(zp[p]).mul_(scale[p] * theta[p]))
        ctx.save_for_backward(x, lo, hi, theta, bits)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, lo, hi, theta, bits = ctx.saved_tensors
        need_x, need_lo, need_hi, need_theta, _ = ctx.needs_input_grad
        scale, zp = act_scale_zero_point(lo, hi, bits)
        levels = 2 ** bits - 1
        grad_x = torch.zeros_like(x) if need_x else None
        grad_theta = torch.zeros_like(theta) if need_theta else None
        grad_lo = torch.zeros_like(lo) if need_lo else None
        grad_hi = torch.zeros_like(hi) if need_hi else None
        y = torch.clamp(x, lo, hi)
        clipped = ((x >= lo) & (x <= hi)).to(grad.dtype)
        above, below = (x > hi).to(grad.dtype), (x < lo).to(grad.dtype)
        for p in range(len(bits)):
            v = _act_codes(y, scale[p], zp[p])
            inside = ((v >= 0) & (v <= levels[p])).to(grad.dtype)  # code not saturated
            pass_y = grad * inside
            if need_x:
                grad_x.add_(pass_y * clipped, alpha=float(theta[p]))
            q = v.clamp_(0, float(levels[p])).sub_(zp[p])
            if need_theta:
                grad_theta[p] = (grad * q).sum() * scale[p]
            if need_lo or need_hi:
                d_scale = (grad * q - pass_y * y / scale[p]).sum() * theta[p]
                if need_hi:
                    grad_hi += d_scale / levels[p] + theta[p] * (pass_y * above).sum()
                if need_lo:
                    grad_lo += -d_scale / levels[p] + theta[p] * (pass_y * below).sum()
        return grad_x, grad_lo, grad_hi, grad_theta, None


def fake_quant_act(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor,
                   theta: torch.Tensor) -> torch.Tensor:
    """Mixed PACT activation quantization: sum_p theta[p] * Q_p(clip(x, lo, hi))."""
    return MixedActQuant.apply(x, lo.to(x.dtype), hi.to(x.dtype), theta.to(x.dtype), bits.to(x.dtype))


def sample_choice(logits: torch.Tensor, temperature: float, mode: str, training: bool) -> torch.Tensor:
    """Choice probabilities theta over dim 0 (the precisions).

    Eval mode returns the one-hot argmax; training returns softmax(logits / T), its
    straight-through hard version, or a Gumbel-softmax sample.
    """
    if not training:
        return F.one_hot(logits.argmax(0), logits.shape[0]).movedim(-1, 0).to(logits.dtype)
    if mode == "gumbel":
        return F.gumbel_softmax(logits, tau=temperature, hard=False, dim=0)
    soft = torch.softmax(logits / temperature, dim=0)
    if mode == "hard":
        hard = F.one_hot(soft.argmax(0), logits.shape[0]).movedim(-1, 0).to(soft.dtype)
        return hard + soft - soft.detach()
    return soft

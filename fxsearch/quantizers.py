"""Fake quantizers and choice sampling: the arithmetic every search and final module shares."""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def _per_precision(bits: torch.Tensor, ndim: int) -> torch.Tensor:
    return bits.view(-1, *([1] * ndim))


def weight_absmax(w: torch.Tensor) -> torch.Tensor:
    """max|W_c| per output channel (dim 0), the range of symmetric per-channel quantization."""
    return w.detach().abs().flatten(1).amax(1).clamp_min(EPS)


def weight_scales(w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel scales, shape (len(bits), C_out): max|W_c| / (2^(b-1) - 1)."""
    return weight_absmax(w).unsqueeze(0) / (2 ** (bits - 1) - 1).unsqueeze(1)


def fake_quant_weight(w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """All precisions at once: (len(bits), *w.shape), channel c of precision b on its b-bit grid."""
    qmax = _per_precision(2 ** (bits - 1) - 1, w.dim())
    scale = weight_scales(w, bits).view(len(bits), w.shape[0], *([1] * (w.dim() - 1)))
    q = torch.minimum(torch.maximum(round_ste(w.unsqueeze(0) / scale), -qmax - 1), qmax)
    return q * scale


def act_scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform grid of 2^b levels over [lo, hi] with an integer zero point (0 is exact)."""
    scale = (hi - lo).clamp_min(EPS) / (2 ** bits - 1)
    zero_point = torch.round(-lo.detach() / scale.detach())
    return scale, zero_point


def fake_quant_act(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """PACT-style activation quantization for all precisions at once: (len(bits), *x.shape).

    x is clipped to the learned [lo, hi] (lo fixed at 0 for non-negative tensors); rounding
    has a straight-through gradient; the clip bounds learn through the clip and the scale.
    """
    scale, zp = act_scale_zero_point(lo, hi, bits)
    scale, zp = _per_precision(scale, x.dim()), _per_precision(zp, x.dim())
    levels = _per_precision(2 ** bits - 1, x.dim())
    y = torch.minimum(torch.maximum(x, lo), hi).unsqueeze(0)
    q = torch.minimum(torch.maximum(round_ste(y / scale) + zp, torch.zeros_like(levels)), levels)
    return (q - zp) * scale


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

"""Modules of a finalized model: frozen precisions, still fine-tunable (QAT, STE rounding).

QuantConv*/QuantLinear  per-output-channel weight bit-widths in buffer `w_bits`; `a_bits` is
                        the bit-width of the layer's input activation (None: float input)
FakeQuantAct            per-tensor activation quantizer with learned clip [lo, hi]
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv_input_grad import conv_forward
from .quantizers import act_scale_zero_point, fake_quant_act, round_ste, weight_absmax


class FakeQuantAct(nn.Module):
    def __init__(self, bits: int, lo: torch.Tensor, hi: torch.Tensor, signed: bool):
        super().__init__()
        self.bits = int(bits)
        self.signed = signed
        self.hi = nn.Parameter(hi.detach().clone().reshape(()))
        if signed:
            self.lo = nn.Parameter(lo.detach().clone().reshape(()))
        else:
            self.register_buffer("lo", self.hi.detach().new_zeros(()))

    def scale(self) -> torch.Tensor:
        return act_scale_zero_point(self.lo, self.hi, self.hi.new_tensor(float(self.bits)))[0]

    def scale_zero_point(self) -> tuple[float, int]:
        scale, zp = act_scale_zero_point(self.lo, self.hi, self.hi.new_tensor(float(self.bits)))
        return float(scale.detach()), int(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = torch.ones(1, device=x.device, dtype=x.dtype)
        return fake_quant_act(x, self.lo, self.hi, one * self.bits, one)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class QuantWeightMixin:
    """Weight fake-quantized per output channel at its frozen bit-width `w_bits[c]`, bias on
    the int32 grid s_x * s_w[c] of integer accumulators.

    `w_range` (optional, per channel) is a floor under max|W_c|: the search model's range of a
    channel whose input columns finalize removed (their weights set the search's scale; without
    the floor the grid would get finer and the integers would change)."""

    def _init_quant(self, w_bits: torch.Tensor, input_quant: FakeQuantAct | None,
                    w_range: torch.Tensor | None = None) -> None:
        self.register_buffer("w_bits", w_bits.to(torch.long))
        self.register_buffer("w_range", None if w_range is None else w_range.detach().clone())
        # the input's quantizer, not a submodule: the graph calls it; the layer reads its scale
        object.__setattr__(self, "input_quant", input_quant)

    @property
    def a_bits(self) -> int | None:
        return None if self.input_quant is None else self.input_quant.bits

    def quant_bias(self) -> torch.Tensor | None:
        """Bias on the int32 grid of scale s_x * s_w[c] when the input is quantized (weight_scale
        keeps it inside the int32 range for the exported formats)."""
        if self.bias is None or self.input_quant is None:
            return self.bias
        step = self.input_quant.scale() * self.weight_scale()
        return round_ste(self.bias / step) * step

    def weight_scale(self) -> torch.Tensor:
        """Per-channel scale, shape (C_out,). A channel whose bias would not fit the int32 grid
        s_x * s_w (input and weight ranges tiny next to the bias) gets a coarser weight grid
        instead, so that the bias stays what it is (with room to spare: |bias| <= 2^30 steps),
        for weights and inputs of at most 8 bits."""
        absmax = weight_absmax(self.weight)
        if getattr(self, "w_range", None) is not None:
            absmax = torch.maximum(absmax, self.w_range.to(absmax.dtype))
        qmax = (2 ** (self.w_bits - 1) - 1).to(self.weight.dtype)
        if self.bias is not None and self.input_quant is not None and self.input_quant.bits <= 8:
            # the integer formats the exporters write (wider grids are a simulation only)
            bias_floor = self.bias.detach().abs() * qmax / (self.input_quant.scale().detach() * 2.0 ** 30)
            absmax = torch.maximum(absmax, bias_floor.to(absmax.dtype) * (self.w_bits <= 8))
        return absmax / qmax

    def weight_int(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The integer weights (as float tensor) inside each channel's signed range (`scale`:
        weight_scale(), when the caller has it already)."""
        qmax = (2 ** (self.w_bits - 1) - 1).to(self.weight.dtype).view(-1, *([1] * (self.weight.dim() - 1)))
        s = (self.weight_scale() if scale is None else scale).view_as(qmax)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return torch.minimum(torch.maximum(round_ste(self.weight / s), -qmax - 1), qmax)
        # the same floats in place (round_ste turns -0.0 into 0.0, so does adding 0.0), no autograd
        return torch.div(self.weight, s).round_().clamp_(-qmax - 1, qmax).add_(0.0)

    def quant_weight(self) -> torch.Tensor:
        scale = self.weight_scale()
        return self.weight_int(scale) * scale.view(-1, *([1] * (self.weight.dim() - 1)))

    @classmethod
    def from_float(cls, module: nn.Module, w_bits: torch.Tensor, input_quant: FakeQuantAct | None,
                   w_range: torch.Tensor | None = None):
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        for attr in ("precisions", "zero_row"):
            new.__dict__.pop(attr, None)
        for buf in ("bits", "nonzero_rows", "unit_index"):
            new._buffers.pop(buf, None)
        new._init_quant(w_bits, input_quant, w_range)
        return new

    def extra_repr(self) -> str:
        counts = {int(b): int((self.w_bits == b).sum()) for b in torch.unique(self.w_bits)}
        return f"{super().extra_repr()}, w_bits={counts}, a_bits={self.a_bits}"


class QuantConv1d(QuantWeightMixin, nn.Conv1d):
    def forward(self, x):
        return conv_forward(self, x, self.quant_weight(), self.quant_bias())


class QuantConv2d(QuantWeightMixin, nn.Conv2d):
    def forward(self, x):
        return conv_forward(self, x, self.quant_weight(), self.quant_bias())


class QuantConv3d(QuantWeightMixin, nn.Conv3d):
    def forward(self, x):
        return conv_forward(self, x, self.quant_weight(), self.quant_bias())


class QuantLinear(QuantWeightMixin, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.quant_weight(), self.quant_bias())


QUANT_CLASS = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d, nn.Linear: QuantLinear}


def quant_class_for(module: nn.Module) -> type:
    return next(cls for base, cls in QUANT_CLASS.items() if isinstance(module, base))

"""Convolutions of one-channel inputs, with a faster input gradient on the CPU.

The search and the fine-tune learn the clip bounds of the network input's quantizer, so the
first layer computes an input gradient that float training never asks for. Where that input
has one channel (audio features, grey images), oneDNN's backward-data kernel is 2.5-6x slower
than a matrix product followed by col2im (aten's slow_conv_transpose2d): DS-CNN's first layer
(1x49x10 input, 10x4 kernel, stride 2, batch 32) takes 1.56 ms against 0.25 ms on the 2-core
CPU of bench/; a Conv1d on raw audio (1x16000, kernel 80, stride 16) 17-24 against 7-13 ms
forward and backward (three runs). With three channels neither is faster on every shape
(ResNet stems: 7x7 stride 2 slower, 3x3 stride 2 faster), so those keep the default.
The backward is not itself differentiable: a double backward (create_graph=True) through such
a layer raises.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _OneChannelConv2d(torch.autograd.Function):
    """F.conv2d; the backward takes grad_input from slow_conv_transpose2d and the weight and
    bias gradients from the default kernel (asked for those alone)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = stride, padding, dilation
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation,
                False, [0, 0], 1, [False, need_w, need_b])
        if need_x:  # output_padding: the rows and columns that the stride left out of the output
            kernel = weight.shape[2:]
            output_padding = [x.shape[2 + i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                                + dilation[i] * (kernel[i] - 1) + 1) for i in range(2)]
            grad_x = torch.ops.aten.slow_conv_transpose2d(grad, weight, list(kernel), None, stride, padding,
                                                          output_padding, dilation)
        return grad_x, grad_w, grad_b, None, None, None


# Below this many input elements the default is as fast or faster (64x1x8x8: 0.20 against
# 0.26 ms forward and backward; 64x1x16x16: 0.21 against 0.17 ms).
MIN_NUMEL = 2 ** 13


def _one_channel(module: nn.Module, x: torch.Tensor) -> bool:
    """A batched CPU input with one channel and MIN_NUMEL elements that needs a gradient, into
    a Conv1d/2d whose padding is zeros given as numbers, outside autocast (whose casts the
    backward would have to repeat). Not a tensor (an fx Proxy while tracing): the default."""
    return (module.in_channels == 1 and isinstance(x, torch.Tensor)
            and len(module.kernel_size) in (1, 2) and x.dim() == len(module.kernel_size) + 2
            and x.numel() >= MIN_NUMEL
            and x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def conv_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """module._conv_forward(x, weight, bias), with _OneChannelConv2d's backward where it applies
    (a Conv1d as a Conv2d of height 1)."""
    if not _one_channel(module, x):
        return module._conv_forward(x, weight, bias)
    if len(module.kernel_size) == 1:
        out = _OneChannelConv2d.apply(x.unsqueeze(2), weight.unsqueeze(2), bias, [1, module.stride[0]],
                                      [0, module.padding[0]], [1, module.dilation[0]])
        return out.squeeze(2)
    return _OneChannelConv2d.apply(x, weight, bias, list(module.stride), list(module.padding), list(module.dilation))

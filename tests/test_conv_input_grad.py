"""fxsearch.conv_input_grad: one-channel convolutions keep the default forward and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxsearch
from fxsearch import conv_input_grad
from fxsearch.conv_input_grad import conv_forward
from fxsearch.search_modules import ActSearch
from fxsearch.zoo import dscnn


def _took_one_channel_path(out: torch.Tensor) -> bool:
    fn = out.grad_fn
    while fn is not None:
        if "OneChannelConv2d" in type(fn).__name__:
            return True
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return False


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(1, 8, (10, 4), stride=2, padding=(5, 1)), (32, 1, 49, 10)),  # DS-CNN's first layer
    (nn.Conv2d(1, 6, 3, stride=(2, 3), padding=(0, 2), dilation=(2, 1), bias=False), (8, 1, 37, 29)),
    (nn.Conv2d(1, 4, 5, stride=3), (4, 1, 64, 65)),  # the stride leaves rows out: output_padding
    (nn.Conv1d(1, 8, 80, stride=16, padding=3), (4, 1, 4000)),
])
def test_one_channel_conv_matches_the_default(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    expected = conv(x)
    out = conv_forward(conv, x, conv.weight, conv.bias)
    assert _took_one_channel_path(out)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    params = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_other_convolutions_keep_the_default():
    torch.manual_seed(0)
    cases = [(nn.Conv2d(3, 8, 3), torch.randn(8, 3, 32, 32, requires_grad=True)),     # three channels
             (nn.Conv2d(1, 8, 3), torch.randn(4, 1, 8, 8, requires_grad=True)),       # small input
             (nn.Conv2d(1, 8, 3, padding="same"), torch.randn(8, 1, 32, 32, requires_grad=True)),
             (nn.Conv2d(1, 8, 3), torch.randn(8, 1, 32, 32))]                          # no input gradient
    for conv, x in cases:
        out = conv_forward(conv, x, conv.weight, conv.bias)
        assert not _took_one_channel_path(out)
        assert torch.equal(out, conv(x))
    conv, x = nn.Conv2d(1, 8, 3), torch.randn(8, 1, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 casts: autograd records them
        out = conv_forward(conv, x, conv.weight, conv.bias)
        assert out.dtype == torch.bfloat16 and not _took_one_channel_path(out)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_dscnn_search_gradients_agree_with_the_default_path(monkeypatch):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 49, 10), torch.randint(0, 12, (32,))
    model = fxsearch.convert(dscnn(), (x[:4],))
    input_quant = next(m for m in model.modules() if isinstance(m, ActSearch) and m.signed)

    def grads():
        torch.manual_seed(1)  # the same dropout masks
        model.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y) + 0.1 * model.cost
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    taken = []
    apply = conv_input_grad._OneChannelConv2d.apply
    monkeypatch.setattr(conv_input_grad._OneChannelConv2d, "apply", lambda *args: taken.append(1) or apply(*args))
    fast = grads()
    assert taken == [1]  # the first layer only
    monkeypatch.setattr(conv_input_grad, "MIN_NUMEL", float("inf"))
    default = grads()
    assert fast.keys() == default.keys()
    assert input_quant.hi.grad is not None and input_quant.hi.grad.abs() > 0
    for name, want in default.items():
        torch.testing.assert_close(fast[name], want, rtol=1e-4, atol=1e-6 * max(want.abs().max().item(), 1.0),
                                   msg=lambda m: f"{name}: {m}")

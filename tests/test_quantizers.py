"""The fused quantizers against a plain autograd formulation of the same STE arithmetic."""
from __future__ import annotations

import torch

from fxsearch import fused_quantizers, quantizers
from fxsearch.quantizers import act_scale_zero_point, fake_quant_act, quantized_params, round_ste, weight_absmax


def _reference_weight(w, bits, theta):
    out = 0
    for p, b in enumerate(bits.tolist()):
        qmax = 2 ** (b - 1) - 1
        s = (weight_absmax(w) / qmax).view(-1, *([1] * (w.dim() - 1)))
        # |W / s| <= qmax by construction, so the range clamp never acts (float error aside)
        out = out + theta[p].view(-1, *([1] * (w.dim() - 1))) * round_ste(w / s) * s
    return out


def _reference_act(x, lo, hi, bits, theta):
    scale, zp = act_scale_zero_point(lo, hi, bits)
    y = torch.minimum(torch.maximum(x, lo), hi)
    out = 0
    for p in range(len(bits)):
        t = y / scale[p]
        codes = (torch.round(t) + zp[p]).detach()  # exact codes decide saturation
        live = ((codes >= 0) & (codes <= 2 ** bits[p] - 1)).to(t.dtype)
        q = codes.clamp(0, float(2 ** bits[p] - 1)) + (t - t.detach()) * live  # straight-through
        out = out + theta[p] * (q - zp[p]) * scale[p]
    return out


def test_weight_quant_matches_reference_values_and_gradients():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    theta = torch.softmax(torch.randn(3, 6), 0).requires_grad_()
    bits = torch.tensor([2.0, 4.0, 8.0])
    g = torch.randn(6, 4, 3, 3)
    out, _ = quantized_params(w, None, bits, theta, None)
    ref = _reference_weight(w, bits, theta)
    assert torch.allclose(out, ref, atol=1e-6)
    got = torch.autograd.grad((out * g).sum(), (w, theta))
    want = torch.autograd.grad((ref * g).sum(), (w, theta))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_act_quant_matches_reference_values_and_gradients():
    torch.manual_seed(1)
    x = (3 * torch.randn(4, 5, 6, 6)).requires_grad_()
    lo = torch.tensor(-1.5, requires_grad=True)
    hi = torch.tensor(2.5, requires_grad=True)
    theta = torch.softmax(torch.randn(3), 0).requires_grad_()
    bits = torch.tensor([2.0, 4.0, 8.0])
    g = torch.randn(4, 5, 6, 6)
    out = fake_quant_act(x, lo, hi, bits, theta)
    ref = _reference_act(x, lo, hi, bits, theta)
    assert torch.allclose(out, ref, atol=1e-6)
    got = torch.autograd.grad((out * g).sum(), (x, lo, hi, theta))
    want = torch.autograd.grad((ref * g).sum(), (x, lo, hi, theta))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a, b)
    assert float(got[2]) != 0.0 and float(got[1]) != 0.0  # both clip bounds learn


def test_act_quant_with_mask_and_saturating_codes_matches_reference():
    """A clip range whose top code saturates at 2 bits (zero point on a rounding tie) takes the
    general path; the pruning mask is multiplied inside the quantizer and gets its gradient."""
    torch.manual_seed(2)
    x = (torch.linspace(-1, 1, 41) + 0.013).repeat(2, 3, 1).requires_grad_()  # none on a clip bound
    lo = torch.tensor(-0.75, requires_grad=True)
    hi = torch.tensor(0.75, requires_grad=True)
    theta = torch.softmax(torch.randn(2), 0).requires_grad_()
    bits = torch.tensor([2.0, 4.0])
    mask = torch.tensor([[[1.0], [0.0], [0.4]]], requires_grad=True)
    g = torch.randn(2, 3, 41)
    out = fake_quant_act(x, lo, hi, bits, theta, mask)
    ref = _reference_act(x, lo, hi, bits, theta) * mask
    assert torch.allclose(out, ref, atol=1e-6)
    assert not bool(torch.signbit(out[(out == 0) & (mask != 0)]).any())  # as accumulating into zeros
    got = torch.autograd.grad((out * g).sum(), (x, lo, hi, theta, mask))
    want = torch.autograd.grad((ref * g).sum(), (x, lo, hi, theta, mask))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a, b)


def test_fused_quantizers_match_the_eager_ones():
    """The compiled quantizers (SearchModel.fuse_quantizers) give the eager values exactly and
    their gradients to float rounding; where compiling fails they fall back to the eager ones."""
    torch.manual_seed(3)
    bits = torch.tensor([2.0, 4.0, 8.0])
    cases = [  # unsigned with a per-channel mask; signed, no mask; a saturating 2-bit grid with a mask
        (3 * torch.randn(4, 8, 6, 6), 0.0, 2.5, bits, torch.rand(1, 8, 1, 1)),
        (torch.randn(2, 4, 5, 5), -1.5, 2.5, bits, None),
        ((torch.linspace(-1, 1, 41) + 0.013).repeat(2, 3, 1).unsqueeze(3), -0.75, 0.75, bits[:2],
         torch.tensor([1.0, 0.0, 0.4]).view(1, 3, 1, 1)),
    ]
    for x, lo, hi, b, mask in cases:
        theta = torch.softmax(torch.randn(len(b)), 0)
        g = torch.randn_like(x)
        results = []
        for fused in (False, True):
            leaves = [x.clone().requires_grad_(), torch.tensor(lo, requires_grad=lo != 0.0), torch.tensor(hi, requires_grad=True),
                      theta.clone().requires_grad_()] + ([] if mask is None else [mask.clone().requires_grad_()])
            out = fake_quant_act(leaves[0], leaves[1], leaves[2], b, leaves[3], leaves[4] if mask is not None else None, fused=fused)
            results.append((out, torch.autograd.grad((out * g).sum(), [t for t in leaves if t.requires_grad])))
        (out, grads), (fused_out, fused_grads) = results
        assert torch.equal(out, fused_out)
        for a, c in zip(grads, fused_grads):
            assert torch.allclose(a, c, rtol=1e-4, atol=1e-4), (a, c)
    # the compiled loops ran (no silent eager fallback), both backward kernels among them
    assert fused_quantizers.available(), fused_quantizers._FAILED
    assert {"act_forward", "act_backward", "act_backward_inside"} <= fused_quantizers.compiled_kernels()
    w = torch.randn(6, 4, 3, 3)
    theta = torch.softmax(torch.randn(3, 6), 0)
    g = torch.randn(6, 4, 3, 3)
    results = []
    for fused in (False, True):
        leaves = (w.clone().requires_grad_(), theta.clone().requires_grad_())
        out, _ = quantized_params(leaves[0], None, bits, leaves[1], None, fused)
        results.append((out, torch.autograd.grad((out * g).sum(), leaves)))
    assert torch.equal(results[0][0], results[1][0])
    for a, c in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-5)
    assert {"weight_forward", "weight_backward"} <= fused_quantizers.compiled_kernels()


def test_unsigned_ranges_are_decided_not_to_saturate_as_the_general_test_finds():
    """_saturates answers lo = 0 < hi from the two numbers (no code can leave its grid there);
    the general test, on the grid the quantizers compute, agrees over hi spanning tiny
    (below EPS, subnormal) to large, for 2..16 bits."""
    torch.manual_seed(4)
    bits = torch.arange(2.0, 17.0)
    his = torch.cat([10 ** torch.empty(20000).uniform_(-12, 6), torch.tensor([1e-45, 1e-8, 1e-7, 0.5, 1.0, 255.0])])
    lo = torch.tensor(0.0)
    for hi in his:
        scale, zp, levels = quantizers.act_grid(lo, hi, bits)
        ends = torch.round(torch.stack([lo, hi]).unsqueeze(1) / scale) + zp
        assert not bool(((ends < 0) | (ends > levels)).any()), float(hi)
        assert not quantizers._saturates(lo, hi, scale, zp, levels)
    assert quantizers._saturates(lo, torch.tensor(-1.0), *quantizers.act_grid(lo, torch.tensor(-1.0), bits))


def test_fused_code_is_shared_by_the_sizes_its_guards_admit(monkeypatch):
    """One compiled forward serves sizes it was not traced with; a size its code specialised
    (a dimension of 1) gets code of its own, and every size gets the eager values."""
    monkeypatch.setattr(fused_quantizers, "_FAMILIES", {})  # none compiled yet (the disk cache stays)
    monkeypatch.setattr(fused_quantizers, "_BY_LAYOUT", {})
    monkeypatch.setattr(fused_quantizers, "_ACT_CALLS", {})
    torch.manual_seed(5)
    bits = torch.tensor([2.0, 4.0, 8.0])
    lo, hi = torch.tensor(0.0), torch.tensor(2.0)
    theta = torch.softmax(torch.randn(3), 0)
    counts = []
    for shape in [(4, 8, 6, 6), (3, 5, 7, 2), (2, 8, 1, 1)]:
        x = 3 * torch.randn(shape)
        mask = torch.rand(1, shape[1], 1, 1)
        with torch.enable_grad():
            fused = fake_quant_act(x, lo, hi, bits, theta, mask, fused=True)
        assert torch.equal(fused, fake_quant_act(x, lo, hi, bits, theta, mask))
        counts.append(sum(len(fs) for family, fs in fused_quantizers._FAMILIES.items() if family[0] == "act_forward"))
    assert counts == [1, 1, 2]
    assert len(fused_quantizers._BY_LAYOUT) == 3


def test_layout_lookups_start_afresh_when_full(monkeypatch):
    """Inputs of ever new sizes do not grow the per-layout lookups past MAX_LAYOUTS; after a
    restart the same code serves (nothing recompiled) and values and gradients stay eager's."""
    monkeypatch.setattr(fused_quantizers, "_FAMILIES", {})
    monkeypatch.setattr(fused_quantizers, "_BY_LAYOUT", {})
    monkeypatch.setattr(fused_quantizers, "_ACT_CALLS", {})
    monkeypatch.setattr(fused_quantizers, "MAX_LAYOUTS", 3)
    torch.manual_seed(6)
    bits = torch.tensor([2.0, 4.0, 8.0])
    lo, hi = torch.tensor(0.0), torch.tensor(2.0)
    theta = torch.softmax(torch.randn(3), 0)
    sizes = []
    for length in range(2, 9):  # a sequence model's varying lengths
        x = (3 * torch.randn(4, 8, length)).requires_grad_()
        x_eager = x.detach().clone().requires_grad_()
        with torch.enable_grad():
            fused = fake_quant_act(x, lo, hi, bits, theta, fused=True)
            eager = fake_quant_act(x_eager, lo, hi, bits, theta)
            g = torch.randn_like(fused)
            fused.backward(g)
            eager.backward(g)
        assert torch.equal(fused, eager)
        torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-6, atol=1e-7)  # (sums of theta may round apart)
        sizes.append((len(fused_quantizers._BY_LAYOUT), len(fused_quantizers._ACT_CALLS)))
    assert max(max(s) for s in sizes) <= 3
    assert min(s[1] for s in sizes[3:]) == 1  # it did start afresh
    families = {family[0]: len(fs) for family, fs in fused_quantizers._FAMILIES.items()}
    assert families["act_forward"] == 1, families


def test_an_empty_batch_runs_eagerly_and_keeps_the_fused_quantizers(monkeypatch):
    """Inductor's code fails on a 0-size dimension: such a call goes eager, and the compiled
    quantizers stay available for the next batch (not the process-wide fallback)."""
    monkeypatch.setattr(fused_quantizers, "_FAILED", [])  # (a regression here stays in this test)
    monkeypatch.setattr(fused_quantizers, "_FAMILIES", {})
    monkeypatch.setattr(fused_quantizers, "_BY_LAYOUT", {})
    monkeypatch.setattr(fused_quantizers, "_ACT_CALLS", {})
    bits = torch.tensor([2.0, 4.0, 8.0])
    lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    theta = torch.softmax(torch.randn(3), 0).requires_grad_()
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    w_theta = torch.softmax(torch.randn(3, 4), 0)
    mask = torch.rand(4, 1, 1)
    for batch in (2, 0, 3):
        x = torch.randn(batch, 4, 5, 5, requires_grad=True)
        with torch.enable_grad():
            out = fake_quant_act(x, lo, hi, bits, theta, mask, fused=True)
            out.sum().backward()
            weight, _ = quantizers.quantized_params(w, None, bits, w_theta, None, fused=True)
            weight.sum().backward()
        assert torch.equal(out, fake_quant_act(x.detach(), lo, hi, bits, theta, mask)) and x.grad.shape == x.shape
    assert fused_quantizers.available()


def test_float64_quantizers_stay_eager():
    """The tracer turns float64 clip bounds into Python numbers inductor cannot compile: a
    float64 model keeps the eager quantizers, and compiling stays available for float32."""
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    lo, hi = torch.tensor(0.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    theta = torch.full((3,), 1 / 3, dtype=torch.float64)
    bits = torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64)
    out = fake_quant_act(x, lo, hi, bits, theta, fused=True)
    assert out.grad_fn.name() == "MixedActQuantBackward"
    assert torch.equal(out, fake_quant_act(x, lo, hi, bits, theta))
    assert fused_quantizers.available()


def test_fused_layer_params_match_the_eager_ones():
    """A search layer's weight and bias (quantized_params): the compiled kernels take every
    precision's row of theta and the bias; values equal eager, gradients (the 0-bit row's from
    the bias included) to float rounding, wherever the 0-bit row is and with or without a bias."""
    torch.manual_seed(5)
    for bits, zero_row, with_bias in (((2.0, 4.0, 8.0), 0, True), ((2.0, 4.0, 8.0), 0, False),
                                      ((4.0, 8.0), 1, True), ((2.0, 4.0, 8.0), None, True)):
        bits = torch.tensor(bits)
        rows = len(bits) + (zero_row is not None)
        w, bias = torch.randn(6, 4, 3), torch.randn(6)
        theta = torch.softmax(torch.randn(rows, 6), 0)
        g, g_bias = torch.randn(6, 4, 3), torch.randn(6)
        results = []
        for fused in (False, True):
            leaves = [w.clone().requires_grad_(), theta.clone().requires_grad_()]
            leaves += [bias.clone().requires_grad_()] if with_bias else []
            weight, b = quantized_params(leaves[0], leaves[2] if with_bias else None, bits, leaves[1], zero_row, fused)
            loss = (weight * g).sum() + ((b * g_bias).sum() if with_bias else 0)
            results.append(((weight, b), torch.autograd.grad(loss, leaves)))
        (eager, eager_grads), (fused, fused_grads) = results
        assert torch.equal(eager[0], fused[0])
        assert (eager[1] is None) == (fused[1] is None) == (not with_bias)
        if with_bias:
            assert torch.equal(eager[1], fused[1])
        for a, c in zip(eager_grads, fused_grads):
            assert torch.allclose(a, c, rtol=1e-4, atol=1e-5), (a, c)
        if zero_row is not None:  # the 0-bit row's gradient comes from the bias alone
            want = -(g_bias * bias) if with_bias else torch.zeros(6)
            assert torch.allclose(fused_grads[1][zero_row], want, atol=1e-6)
    assert fused_quantizers.available(), fused_quantizers._FAILED


def test_fused_kernels_are_called_without_aot_wrappers(monkeypatch):
    """Each compiled kernel is called straight into inductor's generated code once its first
    call gave the same tensors as the AOT-wrapped function; where they differ the wrapped one
    is called from then on."""
    monkeypatch.setattr(fused_quantizers, "_FAMILIES", {})
    monkeypatch.setattr(fused_quantizers, "_BY_LAYOUT", {})
    monkeypatch.setattr(fused_quantizers, "_ACT_CALLS", {})
    torch.manual_seed(6)
    bits = torch.tensor([2.0, 4.0, 8.0])
    x = 3 * torch.randn(4, 8, 6, 6)
    lo, hi, theta, mask = torch.tensor(0.0), torch.tensor(2.0), torch.softmax(torch.randn(3), 0), torch.rand(1, 8, 1, 1)
    results = []
    for fused in (False, True, True):  # the second fused call goes straight to the generated code
        leaves = [t.clone().requires_grad_() for t in (x, hi, theta, mask)]
        out = fake_quant_act(leaves[0], lo, leaves[1], bits, leaves[2], leaves[3], fused=fused)
        results.append((out, torch.autograd.grad(out.pow(2).sum(), leaves)))
    functions = list(fused_quantizers._BY_LAYOUT.values())
    assert len(functions) == 2 and all(f.direct for f in functions)  # forward and backward
    # both found once for the layout, its backward (no code can saturate: lo = 0) with it
    (call,) = fused_quantizers._ACT_CALLS.values()
    assert call.forward is functions[0] and call.backward == {False: functions[1]}
    for out, grads in results[1:]:
        assert torch.equal(out, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)

    class Code:  # generated code that disagrees with its wrapper
        @staticmethod
        def current_callable(tensors):
            return [t + 1 for t in tensors]

    calls = []
    direct = fused_quantizers._Direct(Code(), lambda *t: calls.append(1) or list(t))
    one = torch.ones(3)
    assert torch.equal(direct(one)[0], one) and torch.equal(direct(one)[0], one)
    assert direct.direct is False and len(calls) == 2

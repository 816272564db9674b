"""The choice side of a fused training step (fxsearch.fused_choices) against the modules' own code."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fxsearch
from fxsearch import fused_choices

import models as M

COSTS = ["size", "macs", "bitops", "mpic", "ne16"]  # ne16 and mpic take ceil_ste and detach


def _pair(factory, x, cost=True):
    """A search model with random choices, its quantizers fused (the choice side with cost=True)
    or eager (cost=None), and a fused copy with the choice side on."""
    torch.manual_seed(0)
    sm = fxsearch.convert(factory(), (x,), cost=COSTS).train()
    with torch.no_grad():
        for p in sm.arch_parameters():
            p.normal_()
    return sm.fuse_quantizers(cost=cost) if cost is not None else sm, copy.deepcopy(sm).fuse_quantizers()


def _step(sm, x):
    """Output, costs and every parameter's gradient of loss = output^2 + the costs."""
    for p in sm.parameters():
        p.grad = None
    out = sm(x)
    costs = {k: v for k, v in sm.costs.items()}
    (out.square().sum() + sum(c / c.detach() for c in costs.values())).backward()
    return out.detach(), {k: float(v.detach()) for k, v in costs.items()}, {
        k: p.grad.clone() for k, p in sm.named_parameters() if p.grad is not None}


def _given(sm):
    return [m for m in sm.modules() if getattr(m, "given", None) is not None or getattr(m, "given_mask", None) is not None]


@pytest.mark.parametrize("factory", [M.Residual, M.Concat, M.Depthwise])
def test_choice_side_matches_the_modules(factory):
    """Against the same fused model without it: forward values bit for bit (the thetas are the
    modules' own), costs and every gradient to float rounding, in softmax and hard sampling;
    the costs of the step are the ones the choice side computed; nothing stays given after
    the forward."""
    x = torch.randn(4, 3, 8, 8)
    eager, fused = _pair(factory, x, cost=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed compile or check warns, as would tracing: none here
        for sampling in ("softmax", "hard"):
            eager.sampling = fused.sampling = sampling
            out, costs, grads = _step(eager, x)
            got_out, got_costs, got_grads = _step(fused, x)
            assert torch.equal(got_out, out)
            assert got_costs == pytest.approx(costs, rel=1e-5)
            assert got_grads.keys() == grads.keys()
            for k, g in grads.items():
                torch.testing.assert_close(got_grads[k], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=k)
            assert not _given(fused)
    side = fused_choices._SIDES[fused]
    assert side.failed is None and side.compiled
    assert side.stacked and side.plan.stacks  # the activation choices' thetas from one softmax
    # the generated code called without AOT autograd's runtime wrappers
    assert all(isinstance(f, fused_choices._Joint) for f in side.compiled.values())
    assert side.costs is None  # the step's backward ran through them: not handed out again
    fused(x)
    stamp, step_costs = side.costs
    assert fused.costs["size"] is step_costs["size"]  # handed out, not recomputed


def test_costs_of_the_step_are_not_handed_out_once_the_choices_change():
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(M.Residual, x, cost=None)
    fused(x)
    served = fused.cost
    assert fused.cost is served
    def optimiser_step(sm):
        with torch.no_grad():
            sm.arch_parameters()[0][0].add_(1.0)  # the 0-bit row of the first group

    for changed in (optimiser_step, lambda sm: setattr(sm, "temperature", 0.5)):
        for sm in (eager, fused):
            changed(sm)
        now = fused.cost
        assert now is not served and float(now.detach()) == pytest.approx(float(eager.cost.detach()), rel=1e-5)
        assert float(now.detach()) != pytest.approx(float(served.detach()), rel=1e-3)
        served = now
    fused.eval()
    assert float(fused.cost) == fused.discrete_cost()


def test_choice_side_stays_out_of_eval_no_grad_and_gumbel():
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(M.Concat, x, cost=None)
    calls = []
    for regime in ("eval", "no_grad", "gumbel"):
        for sm in (eager, fused):
            sm.train(regime != "eval")
            sm.sampling = "gumbel" if regime == "gumbel" else "softmax"
        with torch.no_grad() if regime == "no_grad" else torch.enable_grad():
            if regime == "gumbel":
                torch.manual_seed(3)
                want = eager(x)
                torch.manual_seed(3)
            else:
                want = eager(x)
            got = fused(x)
        assert torch.equal(got, want), regime
        calls.append(fused_choices._SIDES[fused].costs)
    assert calls == [None, None, None] and not fused_choices._SIDES[fused].compiled


def test_choice_side_traced_wrong_is_caught_by_its_check():
    """A cost with an autograd.Function of its own is traced through (its backward lost): the
    check against the modules' code catches it at the first step, one warning, and the step
    runs on the modules' values from then on, with the right gradients."""
    class Doubled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t.sum()

        @staticmethod
        def backward(ctx, grad):
            (t,) = ctx.saved_tensors
            return 2 * grad * torch.ones_like(t)

    def doubled_bits(layer):
        return Doubled.apply(layer.bits)

    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    eager = fxsearch.convert(M.Residual(), (x,), cost=doubled_bits).train()
    fused = copy.deepcopy(eager).fuse_quantizers()
    fused.fused_cost = False  # not the compiled cost of SearchModel.cost (dynamo), tested elsewhere
    want = _step(eager, x)
    with pytest.warns(UserWarning, match="choice side .* could not be compiled.*differs"):
        got = _step(fused, x)
    assert fused_choices._SIDES[fused].failed and not _given(fused)
    for a, b in zip((want[0], *want[2].values()), (got[0], *got[2].values())):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fxsearch")
        _step(fused, x)  # no second warning


def test_given_values_are_cleared_when_the_forward_raises():
    x = torch.randn(2, 3, 8, 8)
    _, fused = _pair(M.Residual, x, cost=None)
    with pytest.raises(RuntimeError):
        fused(torch.randn(2, 5, 8, 8))  # wrong channel count: the stem convolution raises
    assert not _given(fused)


def test_activation_thetas_are_stacked_only_where_that_is_exact(monkeypatch):
    """A stacked softmax that would differ from the modules' in a bit is found at the first
    step: the modules' thetas are used, and the forward equals theirs."""
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(M.Residual, x, cost=False)
    stacked = fused_choices.sample_choice
    monkeypatch.setattr(fused_choices, "sample_choice", lambda *a, **k: stacked(*a, **k) * (1 + 2 ** -20))
    out, _, _ = _step(eager, x)
    got_out, _, _ = _step(fused, x)
    assert torch.equal(got_out, out)
    assert fused_choices._SIDES[fused].stacked is False


def test_choice_side_keeps_the_wrapped_code_where_its_own_call_disagrees(monkeypatch):
    """A _Joint whose values differ from the modules' fails the first step's check: the
    AOT-wrapped code, which passes it, serves instead, without a warning."""
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(M.Residual, x, cost=False)
    call = fused_choices._Joint.__call__
    monkeypatch.setattr(fused_choices._Joint, "__call__", lambda self, *t: tuple(v * 1.01 for v in call(self, *t)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out, _, grads = _step(eager, x)
        got_out, _, got_grads = _step(fused, x)
    assert torch.equal(got_out, out)
    for k, g in grads.items():
        torch.testing.assert_close(got_grads[k], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=k)
    side = fused_choices._SIDES[fused]
    assert side.failed is None and side.compiled
    assert not any(isinstance(f, fused_choices._Joint) for f in side.compiled.values())


def _grads(sm):
    return {k: p.grad.clone() for k, p in sm.named_parameters() if p.grad is not None}


def _close(got, want):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for k, g in want.items():
        torch.testing.assert_close(got[k], g, rtol=1e-4, atol=1e-6 * (1 + float(g.abs().max())), msg=k)


BACKWARD_PATTERNS = {
    # the loss's backward twice (retain_graph): twice the gradient, as the modules' code gives
    "retain-graph": lambda sm, x: [loss := sm(x).square().sum() + sm.cost, loss.backward(retain_graph=True),
                                   loss.backward()],
    # task and cost each with a backward of their own (the step's cost shares the forward's
    # thetas: a backward through it first must keep the graph, as retain_graph does)
    "task-then-cost": lambda sm, x: [sm(x).square().sum().backward(), sm.cost.backward()],
    "cost-then-task": lambda sm, x: [out := sm(x), sm.cost.backward(retain_graph=True), out.square().sum().backward()],
    # the cost read before the forward, two steps without an optimiser step between them
    "cost-first-twice": lambda sm, x: [(sm.cost + sm(x).square().sum()).backward() for _ in range(2)],
    # a backward through the cost alone: no gradient (None) for what it does not read
    "cost-alone": lambda sm, x: [sm(x), sm.cost.backward()],
}


@pytest.mark.parametrize("pattern", list(BACKWARD_PATTERNS))
def test_backward_patterns_give_the_modules_gradients(pattern):
    """Patterns beyond one loss and one backward per forward: the fused model's gradients
    (None included) equal the modules' to float rounding, and the compiled side served."""
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(M.Residual, x, cost=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for sm in (eager, fused):
            BACKWARD_PATTERNS[pattern](sm, x)
    _close(_grads(fused), _grads(eager))
    side = fused_choices._SIDES[fused]
    assert side.failed is None and all(isinstance(f, fused_choices._Joint) for f in side.compiled.values())


def test_costs_follow_requires_grad_and_unfusing():
    """Unfreezing the choices after a frozen first step (no input needs a gradient then) gives
    costs with gradients, and the side stays on; unfused, the model computes its own costs."""
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(M.Residual, x, cost=False)
    for sm in (eager, fused):
        sm.requires_grad_(False)
        sm(x)
        assert not sm.cost.requires_grad
        sm.requires_grad_(True)
        sm(x)
        sm.cost.backward()
    _close(_grads(fused), _grads(eager))
    assert fused_choices._SIDES[fused].failed is None
    fused(x)
    fused.fuse_quantizers(cost=False)
    assert fused not in fused_choices._SIDES
    cost = fused.cost
    assert cost.grad_fn is not None and float(cost.detach()) == pytest.approx(float(eager.cost.detach()), rel=1e-5)

"""The absorb-ReLU pass: which ReLUs the search graph leaves out, that the search model still
computes what the ReLU did (values and gradients), and that finalize puts every ReLU back."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsearch
from fxsearch import meta
from fxsearch.passes.absorb_relu import restore_relu
from fxsearch.passes.op_kinds import is_relu
from fxsearch.search import float_model
from fxsearch.zoo import dscnn, resnet8

import models as M


def _absorbed(sm) -> set[str]:
    return {n.meta[meta.ABSORBED_RELU]["name"] for n in sm.graph.nodes if meta.ABSORBED_RELU in n.meta}


def _relus(gm) -> list[str]:
    modules = dict(gm.named_modules())
    return [n.name for n in gm.graph.nodes
            if is_relu(n, modules.get(n.target) if n.op == "call_module" else None)]


def _seeded(model, x):
    torch.manual_seed(1)
    return model(x)


def _restored(sm):
    """The search model with every absorbed ReLU put back (what convert built before the pass)."""
    ref = copy.deepcopy(sm)
    for q in list(ref.graph.nodes):
        restore_relu(ref, q)
    ref.graph.lint()
    ref.recompile()
    return ref


class ReluForms(nn.Module):
    """ReLU as a module (in place), a function, a method, an in-place method, and an in-place
    method whose input another op (the add) also reads: not absorbed, it changes that input."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Conv2d(c, 6, 3, padding=1) for c in (3, 6, 6, 6, 6))
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.act(self.bn(self.a(x)))
        x = F.relu(self.b(x))
        x = self.c(x).relu()
        y = self.d(x)
        x = self.e((self.d(y.relu_()) + y).relu_())
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


CASES = [
    (resnet8, (3, 32, 32), {"relu_1", "relu_2", "relu_3", "relu_4", "relu_5"}),
    (dscnn, (1, 49, 10), {f"blocks_{k}" for k in (2, 5, 8, 11, 14, 17, 20)}),
    (ReluForms, (3, 8, 8), {"act", "relu", "relu_1", "relu__1"}),
]


@pytest.mark.parametrize("factory, shape, expected", CASES, ids=["resnet8", "dscnn", "forms"])
def test_relus_read_only_by_unsigned_quantizers_are_absorbed(factory, shape, expected):
    # resnet8: the stem's ReLU has two readers (the shortcut), the last one feeds the pool;
    # dscnn: the stem's ReLU feeds dropout, the last one the pool; forms: relu_ on y, which the add reads
    model = factory()
    sm = fxsearch.convert(model, (torch.randn(2, *shape),))
    assert _absorbed(sm) == expected
    assert set(_relus(sm)) == set(_relus(torch.fx.symbolic_trace(model))) - expected


@pytest.mark.parametrize("factory, shape, expected", CASES, ids=["resnet8", "dscnn", "forms"])
def test_search_model_computes_what_the_absorbed_relus_did(factory, shape, expected):
    sm = fxsearch.convert(factory(), (torch.randn(4, *shape),)).train()
    ref = _restored(sm)
    assert set(_relus(ref)) >= expected
    x = torch.randn(6, *shape)
    out, ref_out = (_seeded(m, x) for m in (sm, ref))  # the same dropout masks
    assert torch.equal(out, ref_out)
    (out.square().sum() + sm.cost).backward()
    (ref_out.square().sum() + ref.cost).backward()
    grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == {k for k, p in sm.named_parameters() if p.grad is not None}
    for k, p in sm.named_parameters():
        if k in grads:  # inputs are never exactly 0 here, where the gradients would differ
            torch.testing.assert_close(p.grad, grads[k], rtol=0, atol=0, msg=k)


def test_fused_quantizers_take_negative_inputs_of_absorbed_relus():
    # batch 8 at 16x32x32: every absorbed ReLU of the first stack reaches the compiled loops
    sm = fxsearch.convert(resnet8(), (torch.randn(2, 3, 32, 32),)).fuse_quantizers().train()
    ref = _restored(sm)
    x = torch.randn(8, 3, 32, 32)
    out, ref_out = sm(x), ref(x)
    assert torch.equal(out, ref_out)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    grads = dict(ref.named_parameters())
    for k, p in sm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[k].grad, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("factory, shape", [(resnet8, (3, 32, 32)), (ReluForms, (3, 8, 8)),
                                            (M.Residual, (3, 8, 8))])
def test_finalize_puts_every_relu_back(factory, shape):
    model = factory()
    sm = fxsearch.convert(model, (torch.randn(2, *shape),)).eval()
    final = fxsearch.finalize(sm)
    assert len(_relus(final)) == len(_relus(torch.fx.symbolic_trace(model)))
    assert not any(meta.ABSORBED_RELU in n.meta for n in final.graph.nodes)
    assert _absorbed(sm)  # the search model is left as it was
    x = torch.randn(3, *shape)
    torch.testing.assert_close(final(x), sm(x), rtol=1e-4, atol=1e-4)
    # the float twin (quantizers removed) still has its ReLUs: no negative value reaches fc
    plain = float_model(final)
    assert len(_relus(plain)) == len(_relus(final))

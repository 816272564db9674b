"""Finalization: exactness against the search model, real channel removal, folding, QAT."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils._pytree import tree_flatten

import fxsearch
from fxsearch.cost_models import count_cost
from fxsearch.final_modules import FakeQuantAct, QuantWeightMixin
from fxsearch.search_modules import ActSearch, GroupChoice

from models import MICRO_MODELS, DeadBranch, InplaceStatement, example_input

HIGH = dict(w_precisions=(0, 16), a_precisions=(16,), input_bits=16)  # quantization noise << float eps


def force_choices(sm: fxsearch.SearchModel, prune_fraction: float, seed: int = 0) -> None:
    """Random argmax choices with about `prune_fraction` of the prunable units at 0 bits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, GroupChoice):
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=g))
                if 0 in m.precisions:
                    pruned = torch.rand(m.alpha.shape[1], generator=g) < prune_fraction
                    m.alpha[m.precisions.index(0)] = torch.where(pruned, 10.0, -10.0)
            elif isinstance(m, ActSearch) and m.alpha.requires_grad:
                m.alpha.copy_(torch.randn(m.alpha.shape, generator=g))


def calibrate(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    """A few train-mode passes so BatchNorm statistics are those of real activations."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    model.eval()


def finalize_without_revival(sm, tries):
    """Finalize with the first (fraction, seed) of ``tries`` whose random choices (force_choices)
    leave no tensor without channels: finalize would revive one there and differ from ``sm``."""
    for fraction, seed in tries:
        force_choices(sm, fraction, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            try:
                return fxsearch.finalize(sm)
            except UserWarning:
                continue
    raise AssertionError(f"every choice of {list(tries)} emptied a tensor")


def _check_exact(sm, x, fraction, rtol=1e-4):
    final = finalize_without_revival(sm, [(fraction, seed) for seed in range(20)])
    with torch.no_grad():
        want, got = tree_flatten(sm.eval()(x))[0], tree_flatten(final(x))[0]
    assert len(got) == len(want)
    for w, g in zip(want, got):
        scale = w.abs().max().item()
        assert scale > 0
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= rtol * scale + 1e-6
    return final


@pytest.mark.parametrize("model_cls", MICRO_MODELS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_micro_models_finalize_exactly(model_cls, fraction):
    model = model_cls()
    x = example_input(4)
    sm = fxsearch.convert(model, (x,), **HIGH)
    calibrate(sm, x)
    _check_exact(sm, x, fraction)


TORCHVISION = ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x1_0",
               "efficientnet_b0", "regnet_x_400mf", "googlenet", "convnext_tiny", "mobilenet_v2"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_finalize_exactly(name):
    model = torchvision.models.get_model(name)
    x = torch.randn(2, 3, 64, 64)
    sm = fxsearch.convert(model, (x,), **HIGH)
    calibrate(sm, x)
    final = _check_exact(sm, x, 0.3, rtol=1e-3)
    assert sum(p.numel() for p in final.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_cls", [DeadBranch, InplaceStatement], ids=lambda c: c.__name__)
def test_unused_results(model_cls):
    """A layer whose output nobody reads is neither searched nor priced; an in-place op whose
    result is unused still runs in the finalized model."""
    x = example_input(4)
    sm = fxsearch.convert(model_cls(), (x,), cost="params", **HIGH)
    assert sorted(sm.analysis.layers) == ["a", "fc"]
    final = _check_exact(sm, x, 0.5)
    assert count_cost(final, (x,), "params") == sm.discrete_cost()


def _expected_weight_numel(sm: fxsearch.SearchModel, layer: str) -> int:
    """Weights left in a layer, counted from the argmax choices and the input labels alone."""
    analysis = sm.analysis
    info = analysis.layers[layer]
    bits = {g.id: sm.get_submodule(f"fxs_choices.g{g.id}").argmax_bits() for g in analysis.groups}
    out_kept = int((bits[info.group][info.unit_index] > 0).sum())
    gids, uids = analysis.units_of(info.in_labels)
    in_kept = sum(1 for g, u in zip(gids.tolist(), uids.tolist()) if g < 0 or bits[g][u] > 0)
    module = sm.get_submodule(layer)
    kernel = module.weight[0, 0].numel()
    groups = getattr(module, "groups", 1)
    if groups > 1 and info.in_features // groups == 1:  # depthwise: groups shrink with channels
        return out_kept * kernel
    return out_kept * (in_kept // groups) * kernel


def test_channels_removed_for_real():
    model = MICRO_MODELS[1]()  # residual
    x = example_input(4)
    sm = fxsearch.convert(model, (x,))
    force_choices(sm, 0.5, seed=3)
    final = fxsearch.finalize(sm)
    layers = dict(final.named_modules())
    removed = 0
    for name in sm.analysis.layers:
        expected = _expected_weight_numel(sm, name)
        assert layers[name].weight.numel() == expected
        removed += sm.get_submodule(name).weight.numel() - expected
    assert removed > 0


def test_batchnorm_folded_and_integers_in_range():
    model = MICRO_MODELS[0]()
    x = example_input(4)
    sm = fxsearch.convert(model, (x,))
    calibrate(sm, x)
    force_choices(sm, 0.3)
    final = fxsearch.finalize(sm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in final.modules())
    quant = [m for m in final.modules() if isinstance(m, QuantWeightMixin)]
    assert quant
    for m in quant:
        ints = m.weight_int()
        limit = (2 ** (m.w_bits - 1)).view(-1, *([1] * (ints.dim() - 1))).to(ints.dtype)
        assert torch.equal(ints, ints.round())
        assert bool((ints >= -limit).all()) and bool((ints <= limit - 1).all())
        assert set(m.w_bits.tolist()) <= {2, 4, 8}


def test_eight_bit_finalize_close():
    """Default precisions: finalized output within a few activation LSBs of the search model."""
    model = MICRO_MODELS[0]()
    x = example_input(4)
    sm = fxsearch.convert(model, (x,))
    calibrate(sm, x)
    force_choices(sm, 0.3, seed=2)
    final = fxsearch.finalize(sm)
    with torch.no_grad():
        want, got = sm.eval()(x), final(x)
    lsb = max(m.scale_zero_point()[0] for m in final.modules() if isinstance(m, FakeQuantAct))
    assert (got - want).abs().max().item() <= 4 * lsb * want.abs().max().item() + 1e-5


def test_search_model_untouched_and_final_trainable():
    model = MICRO_MODELS[1]()
    x = example_input(4)
    sm = fxsearch.convert(model, (x,))
    force_choices(sm, 0.5)
    before = {k: v.clone() for k, v in sm.state_dict().items()}
    final = fxsearch.finalize(sm)
    for k, v in sm.state_dict().items():
        assert torch.equal(v, before[k]), k
    final.train()
    final(x).sum().backward()
    assert all(p.grad is not None for p in final.parameters() if p.requires_grad)


def test_all_channels_at_zero_keeps_one():
    model = MICRO_MODELS[0]()
    x = example_input(4)
    sm = fxsearch.convert(model, (x,))
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, GroupChoice) and 0 in m.precisions:
                m.alpha[m.precisions.index(0)] = 100.0
    with pytest.warns(UserWarning, match="kept one channel"):
        final = fxsearch.finalize(sm)
    assert all(m.weight.shape[0] >= 1 for m in final.modules() if isinstance(m, QuantWeightMixin))
    final(x)


def test_removed_input_columns_keep_the_search_scale():
    """A channel's weight scale is max|W_c| over all its input columns in the search model;
    removing the column that held the max must not make the finalized grid finer."""
    class TwoConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 5, 3, padding=1)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x)))

    model = TwoConvs()
    with torch.no_grad():
        model.c2.weight[:, 0] *= 5  # input channel 0 holds every output channel's max
    x = example_input(2)
    sm = fxsearch.convert(model, (x,), w_precisions=(0, 4), a_precisions=(16,), input_bits=16)
    with torch.no_grad():
        for m in sm.modules():
            if isinstance(m, GroupChoice):
                m.alpha.copy_(torch.tensor([[-5.0], [5.0]]).expand_as(m.alpha))
        sm.fxs_choices.g0.alpha[0, 0] = 10.0  # prune c1's channel 0
    final = fxsearch.finalize(sm)
    assert final.c2.weight.shape[1] == 3
    with torch.no_grad():
        want, got = sm.eval()(x), final(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()

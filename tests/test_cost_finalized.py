"""Invariant 4 on every test model: the expected cost at one-hot choices equals the cost
counted from the finalized model's real modules, for every registered cost model."""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import fxsearch
from fxsearch.cost_models import COST_MODELS, count_cost
from fxsearch.zoo import resnet8

import models as M
from test_finalize import force_choices

NAMES = sorted(COST_MODELS)
MODELS = {c.__name__: (c, M.example_input(2)) for c in M.MICRO_MODELS}
MODELS["resnet8"] = (resnet8, torch.randn(2, 3, 32, 32))
MODELS["mobilenet_v3_small"] = (torchvision.models.mobilenet_v3_small, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", list(MODELS))
def test_discrete_cost_equals_count_from_finalized(name):
    factory, x = MODELS[name]
    sm = fxsearch.convert(factory(), (x,), cost=NAMES)
    checked = 0
    for seed in range(10):
        force_choices(sm, 0.4, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a revived channel changes the model
            try:
                final = fxsearch.finalize(sm)
            except UserWarning:
                continue
        counted = count_cost(final, (x,), NAMES)
        for cost in NAMES:
            assert counted[cost] == pytest.approx(sm.discrete_cost(cost), rel=1e-9, abs=1e-9), cost
        checked += 1
        if checked == 2:
            break
    assert checked, "every seed emptied a tensor"

"""The pipeline: trace -> channel groups -> search nodes -> ReLUs absorbed -> cost description, in one
visible order."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from fxsearch.passes.absorb_relu import AbsorbReluPass
from fxsearch.passes.channel_groups import ChannelGroupPass
from fxsearch.passes.cost import CostPass
from fxsearch.passes.insert_search_nodes import SEARCH_HOLDERS, InsertSearchNodesPass
from fxsearch.passes.trace import trace

from .checks import check_example_inputs, check_finite, model_device
from .config import SearchConfig
from .errors import ConfigError, did_you_mean
from .model import SearchModel


def convert(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    *,
    config: SearchConfig | None = None,
    cost: Any = "size",
    **options: Any,
) -> SearchModel:
    """Rewrite ``model`` into a SearchModel (the model itself is left untouched).

    example_inputs: a tuple with one example tensor per positional input (shapes matter,
    values set the initial activation clip ranges).
    options: the fields of SearchConfig (w_precisions, a_precisions, input_bits, sampling,
    temperature, exclude, leaf_modules, concrete_args, integer_adds), or pass ``config=``
    directly.
    cost: what SearchModel.cost prices: a registered name ("size", "size_bytes", "params",
    "macs", "bitops", "mpic", "ne16"), a function of one CostLayer, a CostModel, or a dict
    name -> any of these (the first is the main cost); see fxsearch.cost_models.
    """
    fields = [f.name for f in dataclasses.fields(SearchConfig)]
    for name in options:
        if name not in fields:
            raise ConfigError(f"convert has no option {name!r}"
                              + (did_you_mean(name, fields, repr) or f"; the options are {', '.join(fields)}"))
    cfg = config if config is not None else SearchConfig(**options)
    if isinstance(model, torch.nn.Module) and isinstance(example_inputs, (tuple, list)):
        check_example_inputs(model, example_inputs)  # one device, finite inputs (else trace says why)
        check_finite(model)
        _check_module_names(model, cfg)
    leaves = tuple(cfg.leaf_modules) + tuple(e for e in cfg.exclude)
    gm = trace(model, example_inputs, leaf_modules=leaves, concrete_args=cfg.concrete_args)
    for p in (ChannelGroupPass(example_inputs, cfg.exclude), InsertSearchNodesPass(cfg), AbsorbReluPass(),
              CostPass(cost)):
        gm = p(gm).graph_module
    return _like(SearchModel.wrap(gm, cfg), model)


def _check_module_names(model: torch.nn.Module, cfg: SearchConfig) -> None:
    """Every module name in exclude and leaf_modules names a submodule (a misspelt one would
    silently leave that layer searched or traced through)."""
    names = [n for n, _ in model.named_modules() if n]
    for option in ("exclude", "leaf_modules"):
        for name in getattr(cfg, option):
            if isinstance(name, str) and name not in names:
                raise ConfigError(f"{option} names {name!r}, which is no submodule of {type(model).__name__}"
                                  + (did_you_mean(name, names, repr) or " (names as model.named_modules() "
                                                                        "gives them, e.g. 'layer1.0.conv1')"))


def _like(sm: SearchModel, model: torch.nn.Module) -> SearchModel:
    """The search state (choices, clip bounds, index buffers; built on the CPU in float32) on the
    model's device, and in float64 for a float64 model."""
    device = model_device(model)
    if device is not None:
        sm.to(device)
    if {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float64}:
        for name in SEARCH_HOLDERS:
            if hasattr(sm, name):
                sm.get_submodule(name).to(torch.float64)
    return sm

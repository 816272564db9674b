"""Shared helpers and fixtures of the test suite.

Helpers are plain functions (``from conftest import analyze, groups_of, frozen_of``); the
micro-models live in ``tests/models.py``.
"""
from __future__ import annotations

from typing import Any, Sequence

import pytest
import torch

from fxsearch import meta
from fxsearch.passes.channel_groups import ChannelAnalysis, ChannelGroupPass
from fxsearch.passes.trace import trace

torch.set_num_threads(1)  # xdist runs one worker per core; oversubscription only slows tests


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state, whatever ran before it."""
    torch.manual_seed(0)


def analyze(model: torch.nn.Module, example_inputs: Sequence[Any], exclude: Sequence[Any] = ()) -> ChannelAnalysis:
    """Trace ``model`` and run the channel-group pass alone; returns its ChannelAnalysis."""
    gm = trace(model, example_inputs, leaf_modules=tuple(exclude))
    gm = ChannelGroupPass(example_inputs, exclude)(gm).graph_module
    return gm.meta[meta.ANALYSIS]


def _analysis(obj: Any) -> ChannelAnalysis:
    return obj if isinstance(obj, ChannelAnalysis) else obj.analysis


def groups_of(obj: Any) -> list[list[str]]:
    """The grouping as sorted lists of layer names, sorted (SearchModel or ChannelAnalysis)."""
    return sorted(sorted(g.layers) for g in _analysis(obj).groups)


def frozen_of(obj: Any) -> dict[str, tuple[int, list[str]]]:
    """Layers with frozen output channels: name -> (frozen channels, sorted distinct reasons)."""
    analysis = _analysis(obj)
    out = {}
    for name, info in analysis.layers.items():
        group = analysis.groups[info.group]
        units = info.unit_index[group.frozen[info.unit_index]].tolist()
        if units:
            reasons = sorted({r for u in set(units) for r in group.reasons[u]})
            out[name] = (len(units), reasons)
    return out


def units_of_inputs(analysis: ChannelAnalysis, layer: str) -> tuple[list[str | None], list[int]]:
    """For each input channel of ``layer``: the layers of the group it belongs to (None for
    unlabelled data) as a '+'-joined name, and its unit id (-1 for unlabelled)."""
    gids, uids = analysis.units_of(analysis.layers[layer].in_labels)
    names = ["+".join(analysis.groups[g].layers) if g >= 0 else None for g in gids.tolist()]
    return names, uids.tolist()

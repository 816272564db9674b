"""The torchvision classification zoo end to end, shared by tests/test_zoo.py and
bench/zoo_report.py: build, convert, one search step, random pruning, finalize (exactness at
16 bits), ONNX "qdq" export at the default precision sets (activations chosen at 8 bits) and
onnxruntime verification.

``run_case(name)`` returns a ZooResult with the analysis figures and stage times, and raises
(AssertionError or an fxsearch error) at the first stage that fails; ``result.stage`` then
says which stage was running.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision

import fxsearch
from fxsearch.exporters import export_onnx, verify_onnx
from fxsearch.final_modules import FakeQuantAct, QuantWeightMixin
from fxsearch.search_modules import ActSearch

from test_finalize import HIGH, force_choices

MODELS = torchvision.models.list_models(module=torchvision.models)

# Square inputs: 32x32 (CIFAR size) unless the architecture needs more: AlexNet's pooling
# needs 63, Inception v3's stem 75; ViT and MaxViT are built for one image size (224).
INPUT_SIZE = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 224}
INPUT_SIZE.update({n: 224 for n in MODELS if n.startswith("vit_")})
# The slowest cases, left to `make test-heavy`: 30 s and more for the whole pipeline on one
# core (bench/zoo_report.py measures them; docs/zoo.md lists the times).
HEAVY = {
    "vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "efficientnet_v2_l", "convnext_large",
    "efficientnet_b7", "convnext_base", "resnext101_64x4d", "resnext101_32x8d", "alexnet",
    "efficientnet_v2_m", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg16", "vgg11", "vgg13",
    "vgg19", "regnet_x_32gf", "regnet_y_32gf", "wide_resnet101_2",
}
# Models of 250M parameters and more: bench/zoo_report.py runs them one at a time (memory).
ALONE = {"vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf"}
# Transformers hold most of their weights in attention blocks that are frozen or not
# searchable; every other model must have prunable channels.
TRANSFORMERS = tuple(n for n in MODELS if n.startswith(("vit_", "swin_", "maxvit_")))
PRUNE_FRACTION = 0.3
# What the export check asserts: verify_onnx's checks, i.e. weight integers exact and, with
# every quantizer fed onnxruntime's upstream tensors (teacher forcing), every activation within
# one LSB and the outputs within float noise. Its further bound on the free-running outputs
# (within 25% of the output scale) is recorded but not asserted: onnxruntime breaks a few
# rounding ties the other way (more at its default optimisation level, where QDQ becomes
# QLinearConv with its own requantization), one LSB each, and an untrained deep network carries
# such a flip on, growing, to the order of its output (Inception v3, ResNet-152, ResNeXt-101).
# Activations are chosen at 8 bits (weights at 0/2/4/8) for the same reason: at 2 or 4 bits one
# LSB is a large step; tests/test_export_onnx.py covers the narrow activation formats.
MIN_ACT_BITS = 8


def zoo_params(shard: int, shards: int = 2) -> list:
    """pytest params of one shard of the zoo, heavy ones marked. `make test` runs test files
    whole on each worker (--dist loadfile), so the zoo is split over files, one per worker;
    every other model of the alphabetical list balances the measured times within 10%."""
    light = [n for n in MODELS if n not in HEAVY]
    heavy = [n for n in MODELS if n in HEAVY]
    return light[shard::shards] + [pytest.param(n, marks=pytest.mark.heavy) for n in heavy[shard::shards]]
EXACT_RTOL = 1e-3


def build(name: str) -> torch.nn.Module:
    # GoogLeNet and Inception v3 with their input transform (select, scale, concat) on
    kwargs = {"init_weights": True, "transform_input": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


CALIBRATION_BATCH = 16


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = INPUT_SIZE.get(name, 32)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reason_kind(reason: str) -> str:
    """A freeze reason without module and node names, so equal causes count together."""
    reason = re.sub(r"\s*\(node [^)]*\)", "", reason)
    reason = re.sub(r"'[^']*'", "", reason)
    reason = re.sub(r"node \S+", "node", reason)
    return re.sub(r"\s+", " ", reason).strip()


@dataclasses.dataclass
class ZooResult:
    name: str
    input_size: int
    stage: str = "build"
    params: int = 0
    channels: int = 0                 # output channels of all searchable layers
    prunable: int = 0                 # of those, in units that may go to 0 bits
    layers: int = 0
    groups: int = 0
    frozen_groups: int = 0            # groups with at least one frozen unit
    reasons: Counter = dataclasses.field(default_factory=Counter)  # frozen units per reason kind
    weights: int = 0                  # conv/linear weights of the searchable layers
    final_weights: int = 0            # of those, left in the finalized model (16-bit case)
    exact_error: float = float("nan")  # finalized vs search model, relative to the output scale
    onnx: str = ""                    # verify_onnx summary
    onnx_ok: bool = False             # verify_onnx's ok, free-running bound included
    times: dict = dataclasses.field(default_factory=dict)

    @property
    def prunable_fraction(self) -> float:
        return self.prunable / max(self.channels, 1)


class _Timer:
    def __init__(self, result: ZooResult, stage: str):
        self.result, self.stage = result, stage

    def __enter__(self):
        self.result.stage = self.stage
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.result.times[self.stage] = time.perf_counter() - self.start
        return False


def _analysis_figures(sm: fxsearch.SearchModel, result: ZooResult) -> None:
    analysis = sm.analysis
    result.layers, result.groups = len(analysis.layers), len(analysis.groups)
    for info in analysis.layers.values():
        frozen = analysis.groups[info.group].frozen[info.unit_index]
        result.channels += info.out_features
        result.prunable += int((~frozen).sum())
    for g in analysis.groups:
        result.frozen_groups += bool(g.frozen.any())
        for why in g.reasons.values():
            result.reasons[reason_kind(why[0])] += 1


def _search_step(sm: fxsearch.SearchModel, x: torch.Tensor) -> None:
    sm.train()
    opt_w = torch.optim.Adam(sm.weight_parameters(), lr=1e-3, weight_decay=1e-4)
    opt_a = torch.optim.SGD(sm.arch_parameters(), lr=1e-2, momentum=0.9)
    y = sm(x)
    assert torch.isfinite(y).all(), "search model output is not finite"
    loss = torch.nn.functional.cross_entropy(y, torch.arange(len(x)) % y.shape[1]) + 1e-9 * sm.cost
    loss.backward()
    arch = sm.arch_parameters()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in arch), "arch gradients missing"
    opt_w.step()
    opt_a.step()


BN_OUTPUT_STD = 0.25


def calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Give every BatchNorm statistics from its input in the eval-mode model on ``x``, in one
    forward pass (each BN is set just before it runs, so later ones see the result): per-channel
    means, and one variance for the whole layer, so that its output has standard deviation
    BN_OUTPUT_STD. Without this a random network's activations are far from unit scale (the
    quantizers' ranges then mean little). Per-channel variances would amplify near-constant
    channels by up to 1/sqrt(eps); outputs at unit scale would make residual branches as large
    as the trunk, and the network chaotic: one rounding tie broken the other way by onnxruntime
    would grow to the order of the output. Smaller branches, as in trained networks, damp that."""

    def set_stats(bn, args):
        dims = [d for d in range(args[0].dim()) if d != 1]
        bn.running_mean.copy_(args[0].mean(dims))
        bn.running_var.fill_(float(args[0].var(dims, unbiased=False).mean()) / BN_OUTPUT_STD ** 2)

    model.eval()
    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not hooks:
        return
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def activations_unrounded():
    """Activation quantizers of search and finalized models clip to their range but do not
    round. Both models round the same way, but float sums in another order (BN folding, the
    bias on its integer grid) flip a rounding tie now and then, and a deep random network
    carries each flip on, growing, to its output: at 16 bits that noise reaches the 1e-3
    tolerance in 50-layer networks. Structural errors (a wrong channel removed, a wrong
    literal size, a wrong fold) still show as O(1) differences."""
    def clip(self, x, mask=None):
        y = torch.clamp(x, self.lo.to(x.dtype), self.hi.to(x.dtype))
        return y if mask is None else y * mask

    with mock.patch.object(ActSearch, "quantize", clip), mock.patch.object(FakeQuantAct, "forward", clip):
        yield


def _finalize_pruned(sm: fxsearch.SearchModel, x_cal: torch.Tensor, min_act_bits: int = 0) -> torch.nn.Module:
    """Random choices with about 30% of the prunable units at 0 bits (activations at
    ``min_act_bits`` or more), BN calibrated, finalized; tries a few seeds for choices that
    leave no tensor empty (the finalized model would then keep a channel the search model prunes)."""
    for seed in range(10):
        force_choices(sm, PRUNE_FRACTION, seed)
        with torch.no_grad():
            for m in sm.modules():
                if isinstance(m, ActSearch):
                    m.alpha[[i for i, b in enumerate(m.precisions) if b < min_act_bits]] = -1e4
        calibrate_batchnorm(sm, x_cal)
        with warnings.catch_warnings():
            warnings.simplefilter("error" if seed < 9 else "ignore", UserWarning)
            try:
                return fxsearch.finalize(sm)
            except UserWarning as w:
                if "kept one channel" not in str(w):
                    raise
    raise AssertionError("unreachable")


def _built(name: str, x_cal: torch.Tensor) -> torch.nn.Module:
    """The model with seeded random weights and BN statistics calibrated on ``x_cal``; built
    afresh for each stage, so only one copy of the largest models is held at a time."""
    torch.manual_seed(0)
    model = build(name).eval()
    calibrate_batchnorm(model, x_cal)
    return model


def run_case(name: str, result: ZooResult | None = None, batch: int = 2) -> ZooResult:
    """The whole pipeline on one torchvision model; fills ``result`` as it goes."""
    result = result or ZooResult(name, INPUT_SIZE.get(name, 32))
    x = example_input(name, batch)
    x_cal = example_input(name, CALIBRATION_BATCH if result.input_size < 224 else 4, seed=1)
    with _Timer(result, "build"):
        model = _built(name, x_cal)
        result.params = sum(p.numel() for p in model.parameters())

    # search model at 16 bits, in float64: the finalized model must compute what it computes
    # (in float32, BN folding alone moves a deep random network's output by ~1e-3)
    with _Timer(result, "convert"):
        sm = fxsearch.convert(model.double(), (x.double(),), **HIGH)
    del model  # convert works on its own copy
    _analysis_figures(sm, result)
    assert result.prunable > 0, "no prunable channel"
    if name not in TRANSFORMERS:
        assert result.prunable_fraction >= 0.5, f"only {result.prunable_fraction:.0%} of the channels prunable"
    result.weights = sum(sm.get_submodule(n).weight.numel() for n in sm.analysis.layers)
    with _Timer(result, "finalize"):
        final = _finalize_pruned(sm, x_cal.double())
    with _Timer(result, "exactness"):
        with torch.no_grad(), activations_unrounded():
            want, got = sm.eval()(x.double()), final(x.double())
        assert got.shape == want.shape, f"output shape {tuple(got.shape)} != {tuple(want.shape)}"
        result.exact_error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        assert result.exact_error <= EXACT_RTOL, f"finalized model differs by {result.exact_error:.3g} of the output scale"
        result.final_weights = sum(m.weight.numel() for m in final.modules() if isinstance(m, QuantWeightMixin))
        assert result.final_weights < result.weights, "no weight was removed"
    del sm, final

    # default precisions (weights {0,2,4,8}, activations {2,4,8}; chosen: activations at 8 bits,
    # see MIN_ACT_BITS): one search step, export and verify
    with _Timer(result, "convert_default"):
        sm = fxsearch.convert(_built(name, x_cal), (x,))
    with _Timer(result, "search_step"):
        _search_step(sm, x)
    sm.zero_grad(set_to_none=True)  # finalize copies the model, gradients included
    with _Timer(result, "finalize_default"):
        final = _finalize_pruned(sm, x_cal, MIN_ACT_BITS)
    del sm
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        with _Timer(result, "export"):
            export_onnx(final, path, (x[:1],))
        with _Timer(result, "verify"):
            report = verify_onnx(final, path, (x[:1],))
            result.onnx, result.onnx_ok = report.summary(), report.ok
            # verify_onnx's checks, but for its bound on the free-running outputs (see MIN_ACT_BITS)
            assert dataclasses.replace(report, output_rtol=float("inf")).ok, report.summary()
    result.stage = "done"
    return result

"""ONNX "qdq" export: checker, onnxruntime agreement, exact integers, annotations, atomic writes."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import fxsearch
from fxsearch.exporters import export_onnx, verify_onnx
from fxsearch.final_modules import QuantWeightMixin

import models as M
from test_finalize import calibrate, force_choices

class FlattenBlocks(torch.nn.Module):
    """Flatten of a 4x4 map: each conv channel is a block of 16 Linear inputs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.max_pool2d(torch.relu(self.conv(x)), 2), 1))


# (M.FlattenLinear uses an adaptive max pool that torch.onnx cannot export.)
EXPORT_MODELS = [M.PlainChain, M.Residual, M.SubMulDiv, M.SEGate, M.Depthwise, M.Concat, M.SplitSlice,
                 FlattenBlocks, M.ConvNeXtLike, M.ChannelShuffle, M.GroupedConv, M.TwoOutputs]


def _final(model_cls, fraction=0.3, seed=0):
    x = M.example_input(4)
    sm = fxsearch.convert(model_cls(), (x,))
    calibrate(sm, x)
    force_choices(sm, fraction, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxsearch.finalize(sm), x


@pytest.mark.parametrize("model_cls", EXPORT_MODELS, ids=lambda c: c.__name__)
def test_qdq_export_agrees_with_onnxruntime(model_cls, tmp_path):
    final, x = _final(model_cls)
    path = tmp_path / "m.onnx"
    export_onnx(final, path, (x,))
    onnx.checker.check_model(onnx.load(path), full_check=True)
    report = verify_onnx(final, path, (x,))
    assert report.weights_exact
    assert report.worst_lsb <= 1.0 + 1e-3, report.summary()
    assert report.over_one_lsb == 0.0, report.summary()
    for level, err in report.max_abs_error.items():
        assert err <= 1e-4 * report.output_scale + 1e-6, (level, report.summary())
    assert report.ok


def test_one_tensor_feeding_two_quantizers(tmp_path):
    """torch.onnx merges the two equal pools of TwoGates: one ONNX tensor, two 8-bit quantizers."""
    x = M.example_input(4)
    final = fxsearch.finalize(fxsearch.convert(M.TwoGates(), (x,)))
    export_onnx(final, tmp_path / "m.onnx", (x,))
    report = verify_onnx(final, tmp_path / "m.onnx", (x,))
    assert report.ok, report.summary()


def test_annotations_and_narrow_ranges(tmp_path):
    final, x = _final(M.PlainChain, seed=4)
    path = tmp_path / "m.onnx"
    model = export_onnx(final, path, (x,))
    layers = {n: m for n, m in final.named_modules() if isinstance(m, QuantWeightMixin)}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    annotated = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if "ai.fxsearch.layer" in props:
            annotated[props["ai.fxsearch.layer"]] = props
    assert set(annotated) == set(layers)
    for name, layer in layers.items():
        bits = json.loads(annotated[name]["ai.fxsearch.w_bits"])
        assert bits == layer.w_bits.tolist()
        ints = inits[f"{name}.weight_quantized"].astype(np.int64)
        assert ints.dtype == np.int64 and inits[f"{name}.weight_quantized"].dtype == np.int8
        top = 2 ** (np.array(bits) - 1)
        per_channel = np.abs(ints.reshape(len(bits), -1)).max(1)
        assert (per_channel <= top).all()  # inside each channel's 2/4/8-bit range
        assert int(annotated[name]["ai.fxsearch.a_bits"]) == layer.a_bits
        if layer.bias is not None:
            assert inits[f"{name}.bias_quantized"].dtype == np.int32
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    low_bits = [m.a_bits for m in layers.values() if m.a_bits < 8]
    assert len(clips) == len(low_bits)
    for clip in clips:
        assert int(inits[clip.input[2]]) in {2 ** b - 1 for b in low_bits}
    assert len(model.graph.quantization_annotation) >= 2 * len(layers)
    summary = json.loads({p.key: p.value for p in model.metadata_props}["ai.fxsearch.summary"])
    assert [r["layer"] for r in summary["layers"]] == list(layers)


def test_unwritable_path_leaves_nothing(tmp_path):
    final, x = _final(M.PlainChain)
    with pytest.raises(fxsearch.ExportError, match="cannot write"):
        export_onnx(final, tmp_path / "missing-dir" / "m.onnx", (x,))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    export_onnx(final, path, (x,))
    assert path.read_bytes() != b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_rejects_search_model(tmp_path):
    x = M.example_input(2)
    sm = fxsearch.convert(M.PlainChain(), (x,))
    with pytest.raises(fxsearch.ExportError, match="finalize"):
        export_onnx(sm, tmp_path / "m.onnx", (x,))


def test_bias_integers_round_as_the_model_does():
    """The int32 bias is round(b / (s_x s_w)) computed as QuantWeightMixin.quant_bias does, in
    float32: near-ties rounded in float64 would land one step off."""
    from fxsearch.exporters.onnx_qdq import _bias_int32

    g = torch.Generator().manual_seed(0)
    step = torch.rand(4096, generator=g) * 0.3 + 1e-3
    bias = (step * (torch.randint(-50, 50, (4096,), generator=g) + 0.5)).float()  # near-ties
    want = torch.round(bias / step).to(torch.int64).numpy()
    got = _bias_int32(bias.numpy(), step.double().numpy())
    assert (got == want).all()


def test_bias_too_large_for_the_int32_grid_coarsens_the_weight_grid(tmp_path):
    """A layer whose input range is tiny (here ~1e-6) and whose weights are small next to its
    bias: round(b / (s_x s_w)) would pass 2^31. The weight grid of that channel gets coarser
    instead, so the bias is kept (no saturation), and PyTorch and onnxruntime agree."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(6, 10)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-5)
        model[0].bias.mul_(1e-5)
        model[2].weight.mul_(1e-3)
        model[2].bias.fill_(0.8)
    x = M.example_input()
    sm = fxsearch.convert(model, (x,), w_precisions=(8,), a_precisions=(8,))
    final = fxsearch.finalize(sm.eval())
    conv2 = final.get_submodule("2")
    step = conv2.input_quant.scale() * conv2.weight_scale()
    assert (conv2.bias.abs() / step).max() <= 1.001 * 2 ** 30  # far inside int32
    assert torch.allclose(conv2.quant_bias(), conv2.bias, rtol=1e-6, atol=0)  # not saturated
    with torch.no_grad():
        want = sm(x)
        got = final(x)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    export_onnx(final, tmp_path / "m.onnx", (x,))
    report = verify_onnx(final, tmp_path / "m.onnx", (x,))
    assert report.weights_exact and report.over_one_lsb == 0.0 and report.ok, report.summary()


def test_unexportable_op_raises_export_error_naming_it(tmp_path):
    final, x = _final(M.FlattenLinear)  # adaptive max pool to a size that does not divide the input
    with pytest.raises(fxsearch.ExportError, match="adaptive_max_pool2d"):
        export_onnx(final, tmp_path / "m.onnx", (x,))
    assert not (tmp_path / "m.onnx").exists()

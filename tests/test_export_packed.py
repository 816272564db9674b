"""ONNX "packed" export: channels sorted by bit-width across the model, one sub-layer per
precision with true INT8 / INT4 / INT2 weights joined by Concat (no reorder op), the file's
weight payload equal to the searched size; and the channel-sort pass behind it."""
from __future__ import annotations

import copy
import json
import math
import warnings

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto

import fxsearch
from fxsearch import meta
from fxsearch.exporters import export_onnx, verify_onnx
from fxsearch.final_modules import QuantWeightMixin
from fxsearch.passes.sort_channels import sort_channels
from fxsearch.zoo import resnet8

import models as M
from test_export_onnx import EXPORT_MODELS, _final
from test_finalize import calibrate, force_choices

CONTAINER_BITS = {TensorProto.INT8: 8, TensorProto.INT4: 4, TensorProto.INT2: 2}
# layers whose channels the sort may have to leave in place, and the reason it gives
KEPT = {
    "SplitSlice": {"a": "slices"},
    "FlattenBlocks": {"conv": "changed the outputs"},  # torch.max_pool2d is not a modelled op
    "ConvNeXtLike": {n: "changed the outputs" for n in ("stem", "block.dwconv", "block.pwconv2")},
    "ChannelShuffle": {"a": "repeat units"},
    "GroupedConv": {"a": "repeat units", "g": "repeat units"},
    "TwoOutputs": {"b": "model output"},
}


class PerChannel(nn.Module):
    """conv -> relu -> BatchNorm (after a relu: not folded) -> * per-channel constant -> PReLU(C)
    -> conv: everything per channel that the sort must permute along with the conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.prelu = nn.PReLU(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.prelu.weight.uniform_(-0.5, 0.5)
            self.bn.weight.uniform_(0.5, 2.0)
            self.bn.bias.uniform_(-1.0, 1.0)

    def forward(self, x):
        y = self.prelu(self.bn(F.relu(self.a(x))) * self.scale)
        return self.fc(F.relu(self.b(y)).mean((2, 3)))


def _narrowest(bits: int, opset: int, layer: QuantWeightMixin) -> int:
    """The container the format promises: the narrowest signed type the opset can dequantize
    (no INT2 for a Linear with a quantized input: onnxruntime would fuse it into QGemm)."""
    int2 = not (isinstance(layer, nn.Linear) and layer.a_bits is not None)
    return next(c for c, since in ((2, 25), (4, 21), (8, 13)) if bits <= c and opset >= since and (c > 2 or int2))


def _summary(model: onnx.ModelProto) -> dict:
    return json.loads({p.key: p.value for p in model.metadata_props}["ai.fxsearch.summary"])


class HiddenLinear(nn.Module):
    """conv -> pool -> flatten -> Linear (hidden: split into Gemm sub-layers) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.flatten(F.avg_pool2d(F.relu(self.conv(x)), 2), 1)
        return self.fc2(F.relu(self.fc1(x)))


def _quant_layers(final) -> dict[str, QuantWeightMixin]:
    return {n: m for n, m in final.named_modules() if isinstance(m, QuantWeightMixin)}


def _size_bits(final) -> int:
    """The size cost counted directly: sum over layers of weights per output channel x bits."""
    return sum(m.weight[0].numel() * int(m.w_bits.sum()) for m in _quant_layers(final).values())


def _export_and_check(final, x, tmp_path, opset=None) -> dict:
    """Export packed, then check everything the format promises; returns the JSON summary."""
    path = tmp_path / "m.onnx"
    export_onnx(final, path, (x,), format="packed", opset=opset)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert not [n for n in model.graph.node if n.op_type.startswith("Gather")]
    report = verify_onnx(final, path, (x,))
    assert report.weights_exact and report.over_one_lsb == 0.0 and report.ok, report.summary()
    for level, err in report.max_abs_error.items():
        assert err <= 1e-4 * report.output_scale + 1e-6, (level, report.summary())

    summary = _summary(model)
    assert summary["format"] == "packed" and summary["opset"] == model.opset_import[0].version
    layers = _quant_layers(final)
    assert [r["layer"] for r in summary["layers"]] == list(layers)
    inits = {i.name: i for i in model.graph.initializer}
    annotated = {a.tensor_name for a in model.graph.quantization_annotation}
    nodes: dict[str, list[dict]] = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if "ai.fxsearch.layer" in props:
            nodes.setdefault(props["ai.fxsearch.layer"], []).append(props)
    payload = 0
    for row in summary["layers"]:
        layer, bits = layers[row["layer"]], row["w_bits"]
        order = row["channel_order"]
        assert sorted(order) == list(range(len(order))) and bits == layer.w_bits[order].tolist()
        subs = row["sub_layers"]
        assert [s["channels"] for s in subs] == [[a, b] for a, b in zip(
            [0] + [s["channels"][1] for s in subs[:-1]], [s["channels"][1] for s in subs])]
        assert subs[-1]["channels"][1] == len(bits)
        assert row["packed"] == (len(subs) == len(set(bits))), row
        if not row["packed"]:
            assert len(subs) == 1 and row["reason"]
        for sub in subs:
            init = inits[sub["initializer"]]
            first, end = sub["channels"]
            container = CONTAINER_BITS[init.data_type]
            if row["packed"]:
                assert set(bits[first:end]) == {sub["bits"]}
            assert container == _narrowest(max(bits[first:end]), summary["opset"], layer)
            assert len(init.raw_data) == math.ceil(math.prod(init.dims) * container / 8) == sub["payload_bytes"]
            assert sub["initializer"] in annotated
            payload += len(init.raw_data)
        ann = nodes[row["layer"]]
        assert len(ann) == len(subs)
        assert sum((json.loads(a["ai.fxsearch.w_bits"]) for a in ann), []) == bits
        assert all(json.loads(a["ai.fxsearch.packed"]) == row["packed"] for a in ann)
        assert all(a.get("ai.fxsearch.a_bits") == (None if layer.a_bits is None else str(layer.a_bits)) for a in ann)
    assert payload == summary["payload_bytes"] == sum(r["payload_bytes"] for r in summary["layers"])
    return summary


def _resnet8(seed: int, output_bits: int | None = None):
    """ResNet-8 with about half its prunable units at 0 bits and the others random among 2/4/8;
    `output_bits` gives the output layer (frozen, never pruned) one bit-width."""
    x = torch.randn(8, 3, 32, 32)
    sm = fxsearch.convert(resnet8(), (x,))
    calibrate(sm, x)
    force_choices(sm, 0.5, seed)
    if output_bits is not None:
        choice = sm.get_submodule(f"fxs_choices.g{sm.analysis.layers['fc'].group}")
        with torch.no_grad():
            choice.alpha.fill_(-10.0)
            choice.alpha[choice.precisions.index(output_bits)] = 10.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        final = fxsearch.finalize(sm)
    kept = sum(final.get_submodule(n).out_channels for n in sm.analysis.layers if n != "fc")
    total = sum(sm.get_submodule(n).out_channels for n in sm.analysis.layers if n != "fc")
    assert 0.3 < 1 - kept / total < 0.7
    return final, x


def test_resnet8_payload_is_the_size_cost(tmp_path):
    final, x = _resnet8(seed=1, output_bits=8)
    summary = _export_and_check(final, x, tmp_path)
    assert summary["opset"] == 25 and all(r["packed"] for r in summary["layers"])
    types = {s["type"] for r in summary["layers"] for s in r["sub_layers"]}
    assert types == {"INT2", "INT4", "INT8"}
    size = _size_bits(final)
    initializers = sum(len(r["sub_layers"]) for r in summary["layers"])
    assert 0 <= 8 * summary["payload_bytes"] - size < 8 * initializers  # byte padding per initializer
    try:
        from fxsearch.cost_models import count_cost
    except ImportError:  # the cost models are optional here
        return
    assert count_cost(final, (x,), "size") == size


def test_resnet8_mixed_output_layer_stays_whole(tmp_path):
    """The output layer's channel order is the model's: with mixed bits it cannot be split
    without a reorder op, so it stays one initializer of its widest type."""
    final, x = _resnet8(seed=0)
    summary = _export_and_check(final, x, tmp_path)
    rows = {r["layer"]: r for r in summary["layers"]}
    fc = rows.pop("fc")
    assert not fc["packed"] and "model output" in fc["reason"]
    assert all(r["packed"] for r in rows.values())
    layers = _quant_layers(final)
    packed_size = sum(layers[n].weight[0].numel() * int(layers[n].w_bits.sum()) for n in rows)
    packed_payload = sum(r["payload_bytes"] for r in rows.values())
    assert 0 <= 8 * packed_payload - packed_size < 8 * sum(len(r["sub_layers"]) for r in rows.values())
    assert fc["payload_bytes"] == layers["fc"].weight.numel() * max(fc["w_bits"]) // 8


@pytest.mark.parametrize("model_cls", EXPORT_MODELS, ids=lambda c: c.__name__)
def test_micro_models_export_packed(model_cls, tmp_path):
    final, x = _final(model_cls)
    summary = _export_and_check(final, x, tmp_path)
    outputs = {"fc", "b"} if model_cls is M.TwoOutputs else {"fc"}
    kept = KEPT.get(model_cls.__name__, {})
    for row in summary["layers"]:
        if row["layer"] in kept and not row["packed"]:
            assert kept[row["layer"]] in row["reason"], row
        elif row["layer"] in outputs and not row["packed"]:
            assert "model output" in row["reason"]
        else:
            assert row["packed"], row


def test_hidden_linear_splits_into_gemms(tmp_path):
    final, x = _final(HiddenLinear, fraction=0.3, seed=0)
    summary = _export_and_check(final, x, tmp_path)
    fc1 = next(r for r in summary["layers"] if r["layer"] == "fc1")
    conv = next(r for r in summary["layers"] if r["layer"] == "conv")
    assert fc1["packed"] and len(fc1["sub_layers"]) == 3 and conv["packed"]
    assert {s["bits"]: s["type"] for s in fc1["sub_layers"]} == {8: "INT8", 4: "INT4", 2: "INT4"}
    model = onnx.load(tmp_path / "m.onnx")
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and
             any(p.key == "ai.fxsearch.layer" and p.value == "fc1" for p in n.metadata_props)]
    assert len(gemms) == 3 and all(g.input[2].startswith("fc1.bias_w") for g in gemms)


def test_depthwise_splits_by_groups(tmp_path):
    final, x = _final(M.Depthwise, fraction=0.3, seed=0)
    path = tmp_path / "m.onnx"
    model = export_onnx(final, path, (x,), format="packed")
    dw = next(r for r in _summary(model)["layers"] if r["layer"] == "dw")
    assert dw["packed"] and len(dw["sub_layers"]) > 1
    convs = [n for n in model.graph.node if n.op_type == "Conv" and
             any(p.key == "ai.fxsearch.layer" and p.value == "dw" for p in n.metadata_props)]
    groups = [next(a.i for a in n.attribute if a.name == "group") for n in convs]
    assert groups == [e - s for s, e in (sub["channels"] for sub in dw["sub_layers"])]
    assert len([n for n in model.graph.node if n.op_type == "Slice"]) == len(convs)


@pytest.mark.parametrize("opset,types", [(21, {"INT4", "INT8"}), (20, {"INT8"})])
def test_lower_opsets_use_wider_containers(tmp_path, opset, types):
    final, x = _final(M.Residual, fraction=0.3, seed=2)
    assert 2 in torch.cat([m.w_bits for m in _quant_layers(final).values()]).tolist()
    summary = _export_and_check(final, x, tmp_path, opset=opset)
    assert summary["opset"] == opset
    assert {s["type"] for r in summary["layers"] for s in r["sub_layers"]} == types


def test_sort_keeps_outputs_and_moves_every_per_channel_tensor():
    x = M.example_input(4)
    for seed in range(10):
        sm = fxsearch.convert(PerChannel(), (x,))
        with torch.no_grad():
            sm.bn.running_mean.uniform_(-1, 1)
            sm.bn.running_var.uniform_(0.5, 2)
        force_choices(sm, 0.3, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            final = fxsearch.finalize(sm)
        before = copy.deepcopy(final.state_dict())
        s = sort_channels(final, (x,))
        order = s.meta[meta.SORT_RESULT].order["a"]
        if not torch.equal(order, torch.arange(order.numel())):
            break
    else:
        pytest.fail("no seed permuted layer 'a'")
    assert all(torch.equal(v, final.state_dict()[k]) for k, v in before.items())  # the input model is untouched
    assert isinstance(s.get_submodule("bn"), nn.BatchNorm2d)  # not folded: permuted
    assert torch.equal(s.bn.running_mean, final.bn.running_mean[order])
    assert torch.equal(s.scale.view(-1), final.scale.view(-1)[order])
    assert torch.equal(s.prelu.weight, final.prelu.weight[order])
    bits = s.a.w_bits.tolist()
    assert bits == sorted(bits, reverse=True)
    with torch.no_grad():
        want, got = final(x), s(x)
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("model_cls", [M.Residual, M.SplitSlice, M.GroupedConv, M.SEGate], ids=lambda c: c.__name__)
def test_sorted_labels_agree_with_bits(model_cls):
    """After the sort, node labels still say which unit each channel holds: every unit has one
    bit-width in every layer that produces it."""
    final, x = _final(model_cls, fraction=0.4, seed=3)
    s = sort_channels(final, (x,))
    analysis = s.meta[meta.ANALYSIS]
    seen: dict[tuple[int, int], int] = {}
    modules = dict(s.named_modules())
    for node in s.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(layer, QuantWeightMixin):
            g, u = analysis.units_of(node.meta[meta.LABELS].reshape(-1))
            for key, b in zip(zip(g.tolist(), u.tolist()), layer.w_bits.tolist()):
                assert seen.setdefault(key, b) == b
    with torch.no_grad():
        want, got = final(x), s(x)
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()


def test_errors(tmp_path):
    x = M.example_input(2)
    sm = fxsearch.convert(M.PlainChain(), (x,), w_precisions=(0, 16))
    with pytest.raises(fxsearch.ExportError, match="finalize"):
        export_onnx(sm, tmp_path / "m.onnx", (x,), format="packed")
    final = fxsearch.finalize(sm)
    with pytest.raises(fxsearch.ExportError, match="at most 8 bits"):
        export_onnx(final, tmp_path / "m.onnx", (x,), format="packed")
    with pytest.raises(fxsearch.ExportError, match="'qdq' or 'packed'"):
        export_onnx(final, tmp_path / "m.onnx", (x,), format="int4")
    assert not list(tmp_path.iterdir())

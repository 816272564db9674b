"""The "qdq" ONNX format: standard QuantizeLinear / DequantizeLinear around a float graph.

torch.onnx rejects fake-quant ranges other than 8 bits, so the finalized model is exported
as its float twin (dequantized weights, activation quantizers as identities) and the ONNX
graph is then rewritten with the onnx package:
- weights: int8 initializer (values inside each channel's 2/4/8-bit range), per-channel fp32
  scale, zero point 0, DequantizeLinear(axis=0) producing the tensor the layer reads;
- bias: int32 initializer with scale s_x * s_w[c];
- activations: QuantizeLinear -> Clip (below 8 bits) -> DequantizeLinear on the layer input;
- annotations: node metadata_props (ai.fxsearch.*), GraphProto.quantization_annotation and a
  JSON summary in the model's metadata_props.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from fxsearch.errors import ExportError
from fxsearch.final_modules import FakeQuantAct, QuantWeightMixin

from .files import write_atomically

DEFAULT_OPSET = 20
_PLAIN = {"QuantConv1d": nn.Conv1d, "QuantConv2d": nn.Conv2d, "QuantConv3d": nn.Conv3d, "QuantLinear": nn.Linear}


def quant_layers(final: torch.fx.GraphModule) -> dict[str, tuple[QuantWeightMixin, FakeQuantAct | None]]:
    """Every quantized layer of a finalized model with the activation quantizer of its input."""
    modules = dict(final.named_modules())
    layers = {}
    for node in final.graph.nodes:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(layer, QuantWeightMixin):
            x = node.args[0]
            act = modules.get(x.target) if isinstance(x, torch.fx.Node) and x.op == "call_module" else None
            layers[node.target] = (layer, act if isinstance(act, FakeQuantAct) else None)
    if not layers:
        raise ExportError("the model has no quantized layer: pass the result of fxsearch.finalize(search_model)")
    return layers


def _float_twin(final: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The finalized model with dequantized float weights and identity activation quantizers."""
    twin = copy.deepcopy(final).eval()
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantWeightMixin):
            plain = _PLAIN[type(module).__name__].__new__(_PLAIN[type(module).__name__])
            plain.__dict__.update(module.__dict__)
            plain._buffers = {k: v for k, v in module._buffers.items() if k != "w_bits"}
            plain.weight = nn.Parameter(module.quant_weight().detach())
            _replace(twin, name, plain)
        elif isinstance(module, FakeQuantAct):
            _replace(twin, name, nn.Identity())
    return twin


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _torch_onnx(twin: nn.Module, example_inputs: Sequence[Any], opset: int) -> onnx.ModelProto:
    """Float export; weights stay initializers named after their parameters.

    The TorchScript exporter is fast and keeps weights unfolded; where it lacks an op the
    torch.export-based exporter takes over.
    """
    names = [f"input_{i}" for i in range(len(example_inputs))]
    errors = []
    for dynamo in (False, True):
        buffer = io.BytesIO()
        options = dict(opset_version=opset, optimize=False) if dynamo else \
            dict(opset_version=min(opset, 20), do_constant_folding=False)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                program = torch.onnx.export(twin, tuple(example_inputs), None if dynamo else buffer,
                                            dynamo=dynamo, input_names=names, **options)
            model = program.model_proto if dynamo else onnx.load_from_string(buffer.getvalue())
            break
        except Exception as err:
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    else:
        raise ExportError(f"torch.onnx could not export the float graph: {' / '.join(errors)}")
    if opset > model.opset_import[0].version:
        model = onnx.version_converter.convert_version(model, opset)
    return model


class _Rewriter:
    """Edits one ONNX graph in place, keeping nodes in topological order."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.head: list[onnx.NodeProto] = []          # nodes reading only initializers
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.annotations: list[onnx.TensorAnnotation] = []
        self.quantized_inputs: dict[tuple[str, int], str] = {}

    def add_init(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def annotate(self, tensor: str, scale: str, zero_point: str) -> None:
        self.annotations.append(onnx.TensorAnnotation(
            tensor_name=tensor,
            quant_parameter_tensor_names=[onnx.StringStringEntryProto(key="SCALE_TENSOR", value=scale),
                                          onnx.StringStringEntryProto(key="ZERO_POINT_TENSOR", value=zero_point)]))

    def dequantize_initializer(self, name: str, ints: np.ndarray, scale: np.ndarray) -> None:
        """Replace float initializer `name` by integers + per-channel DequantizeLinear (axis 0)."""
        old = self.inits.pop(name)
        self.graph.initializer.remove(old)
        q = self.add_init(f"{name}_quantized", ints)
        s = self.add_init(f"{name}_scale", scale.astype(np.float32))
        z = self.add_init(f"{name}_zero_point", np.zeros(scale.shape, dtype=ints.dtype))
        self.head.append(helper.make_node("DequantizeLinear", [q, s, z], [name], name=f"{name}_dequantize", axis=0))
        self.annotate(q, s, z)

    def op_reading(self, weight: str) -> onnx.NodeProto:
        """The Conv/Gemm/MatMul that reads a weight, possibly through a Transpose."""
        for n in self.consumers.get(weight, []):
            if n.op_type in ("Conv", "Gemm", "MatMul"):
                return n
            if n.op_type == "Transpose":
                for m in self.consumers.get(n.output[0], []):
                    if m.op_type == "MatMul":
                        return m
        raise ExportError(f"no Conv/Gemm/MatMul reads '{weight}' in the exported graph")

    def quantize_input(self, op: onnx.NodeProto, act: FakeQuantAct) -> tuple[float, str]:
        """Q -> (Clip) -> DQ on the data input of `op`; shared by layers reading one quantizer."""
        scale, zero_point = act.scale_zero_point()
        src = op.input[0]
        key = (src, id(act))
        if key not in self.quantized_inputs:
            base = f"{src}_a{act.bits}"
            s = self.add_init(f"{base}_scale", np.array(scale, dtype=np.float32))
            z = self.add_init(f"{base}_zero_point", np.array(zero_point, dtype=np.uint8))
            nodes = [helper.make_node("QuantizeLinear", [src, s, z], [f"{base}_q"], name=f"{base}_quantize")]
            q = f"{base}_q"
            if act.bits < 8:
                lo = self.add_init(f"{base}_min", np.array(0, dtype=np.uint8))
                hi = self.add_init(f"{base}_max", np.array(2 ** act.bits - 1, dtype=np.uint8))
                nodes.append(helper.make_node("Clip", [q, lo, hi], [f"{base}_clip"], name=f"{base}_clip"))
                q = f"{base}_clip"
            nodes.append(helper.make_node("DequantizeLinear", [q, s, z], [f"{base}_dq"], name=f"{base}_dequantize"))
            self.before[id(op)].extend(nodes)
            self.annotate(q, s, z)
            self.quantized_inputs[key] = f"{base}_dq"
        op.input[0] = self.quantized_inputs[key]
        return scale, src

    def finish(self) -> None:
        nodes = list(self.head)
        for n in self.graph.node:
            nodes.extend(self.before.get(id(n), []))
            nodes.append(n)
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.graph.quantization_annotation.extend(self.annotations)


def _set_props(proto: Any, props: dict[str, str]) -> None:
    for k, v in props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def layer_summary(final: torch.fx.GraphModule) -> list[dict]:
    """Per quantized layer: shape, per-channel weight bits, input activation bits."""
    rows = []
    for name, (layer, act) in quant_layers(final).items():
        rows.append({"layer": name, "type": type(layer).__name__, "out_channels": int(layer.weight.shape[0]),
                     "w_bits": layer.w_bits.tolist(), "a_bits": act.bits if act is not None else None})
    return rows


def export_qdq(final: torch.fx.GraphModule, example_inputs: Sequence[Any], opset: int | None = None) -> onnx.ModelProto:
    """Build the QDQ ONNX model of a finalized GraphModule (not written anywhere)."""
    opset = opset or DEFAULT_OPSET
    if opset < 13:
        raise ExportError(f"opset {opset} has no per-channel DequantizeLinear; use opset >= 13")
    layers = quant_layers(final)
    example_inputs = tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in example_inputs)
    twin = _float_twin(final).cpu()
    model = _torch_onnx(twin, example_inputs, opset)
    rw = _Rewriter(model)
    for name, (layer, act) in layers.items():
        if act is not None and act.bits > 8:
            raise ExportError(f"layer '{name}': {act.bits}-bit activations do not fit the uint8 QDQ format")
        weight = f"{name}.weight"
        if weight not in rw.inits:
            raise ExportError(f"layer '{name}': its weight is not an initializer of the exported graph")
        op = rw.op_reading(weight)
        w_scale = layer.weight_scale().detach().cpu().double().numpy()
        rw.dequantize_initializer(weight, layer.weight_int().detach().cpu().numpy().astype(np.int8), w_scale)
        props = {"ai.fxsearch.layer": name, "ai.fxsearch.w_bits": json.dumps(layer.w_bits.tolist())}
        if act is not None:
            a_scale, _ = rw.quantize_input(op, act)
            props["ai.fxsearch.a_bits"] = str(act.bits)
            bias = f"{name}.bias"
            if bias in rw.inits:
                b_scale = a_scale * w_scale
                b = numpy_helper.to_array(rw.inits[bias]).astype(np.float64)
                ints = np.clip(np.round(b / b_scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
                rw.dequantize_initializer(bias, ints, b_scale)
        _set_props(op, props)
    rw.finish()
    summary = {"producer": "fxsearch", "format": "qdq", "layers": layer_summary(final)}
    _set_props(model, {"ai.fxsearch.summary": json.dumps(summary)})
    model.producer_name = "fxsearch"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ExportError(f"the rewritten ONNX graph does not pass onnx.checker: {err}") from err
    return model


def export_onnx(final: torch.fx.GraphModule, path: str, example_inputs: Sequence[Any], *,
                format: str = "qdq", opset: int | None = None) -> onnx.ModelProto:
    """Write a finalized model to `path` as ONNX (atomically) and return the ModelProto."""
    if format != "qdq":
        raise ExportError(f"format {format!r} is not available; use format='qdq'")
    model = export_qdq(final, example_inputs, opset)
    write_atomically(path, model.SerializeToString())
    return model

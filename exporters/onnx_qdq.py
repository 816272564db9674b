"""The ONNX formats: "qdq" (standard QuantizeLinear / DequantizeLinear around a float graph)
and "packed" (each layer split by bit-width into sub-layers with true INT8 / INT4 / INT2 weights).

torch.onnx rejects fake-quant ranges other than 8 bits, so the finalized model is exported
as its float twin (dequantized weights, activation quantizers as identities) and the ONNX
graph is then rewritten with the onnx package:
- weights: int8 initializer (values inside each channel's 2/4/8-bit range), per-channel fp32
  scale, zero point 0, DequantizeLinear(axis=0) producing the tensor the layer reads;
- bias: int32 initializer with scale s_x * s_w[c];
- activations: QuantizeLinear -> Clip (below 8 bits) -> DequantizeLinear on the layer input,
  the DequantizeLinear tagged with the quantizer's module name (ai.fxsearch.quantizer);
  quantizers that something other than a layer reads (the operands of integer adds) go
  through the float export as 8-bit fake quantization, whose QuantizeLinear/DequantizeLinear
  pairs are then replaced by ours;
- annotations: node metadata_props (ai.fxsearch.*), GraphProto.quantization_annotation and a
  JSON summary in the model's metadata_props.
"packed" first sorts the channels of the whole model by bit-width (passes/sort_channels.py),
then replaces each layer by one sub-layer per run of equal bits, each reading its own
INT8 / INT4 / INT2 initializer (the narrowest the opset has) through DequantizeLinear, joined
by a Concat on the channel axis: no reorder op, and the file size is the searched size. A
layer whose bit-widths stay interleaved keeps one initializer of the widest type it needs
("packed": false in the summary, with the reason).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import warnings
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from fxsearch import meta
from fxsearch.checks import check_finite
from fxsearch.errors import ExportError, FxSearchError, first_line
from fxsearch.final_modules import FakeQuantAct, QuantWeightMixin
from fxsearch.passes.sort_channels import sort_channels

from fxsearch.files import write_atomically

DEFAULT_OPSET = 20
# packed weights: (most bits, TensorProto type, first opset whose DequantizeLinear reads it)
_INT_TYPES = ((2, "INT2", 25), (4, "INT4", 21), (8, "INT8", 13))
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


def marked_quantizers(final: torch.fx.GraphModule) -> list[tuple[str, FakeQuantAct]]:
    """(module name, quantizer) of every activation quantizer with a reader other than a
    quantized layer (the operands of integer adds), in graph order: the float twin marks them."""
    modules = dict(final.named_modules())
    return [(n.target, modules[n.target]) for n in final.graph.nodes if n.op == "call_module"
            and isinstance(modules.get(n.target), FakeQuantAct)
            and any(not isinstance(modules.get(u.target), QuantWeightMixin) for u in n.users)]


class _QuantizerMark(nn.Module):
    """A marked quantizer in the float twin: torch.onnx writes this 8-bit fake quantization as a
    QuantizeLinear/DequantizeLinear pair, which the rewriter replaces by the quantizer's own."""

    def __init__(self, act: FakeQuantAct):
        super().__init__()
        scale, zero_point = act.scale_zero_point()  # only a placeholder: any valid grid will do
        self.scale, self.zero_point = scale, min(max(zero_point, 0), 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


def _float_twin(final: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The finalized model with dequantized float weights, activation quantizers as identities
    (the rewriter quantizes layer inputs), marked ones as _QuantizerMark."""
    marked = {name for name, _ in marked_quantizers(final)}
    # the quantized layers' weights are replaced below: copying them first would only cost time
    shared = [m.weight for m in final.modules() if isinstance(m, QuantWeightMixin)]
    twin = copy.deepcopy(final, {id(t): t for t in shared}).eval()
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantWeightMixin):
            plain = _PLAIN[type(module).__name__].__new__(_PLAIN[type(module).__name__])
            plain.__dict__.update(module.__dict__)
            plain._parameters = dict(module._parameters)
            plain._buffers = {k: v for k, v in module._buffers.items() if k not in ("w_bits", "w_range")}
            with torch.no_grad():
                plain.weight = nn.Parameter(module.quant_weight())
            _replace(twin, name, plain)
        elif isinstance(module, FakeQuantAct):
            _replace(twin, name, _QuantizerMark(module) if name in marked else nn.Identity())
    return twin


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _check_runs(twin: nn.Module, example_inputs: Sequence[Any]) -> None:
    """Raise where the model itself fails on the example inputs (a wrong shape or dtype)."""
    try:
        twin(*example_inputs)
    except Exception as err:
        given = ", ".join(f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                          for t in example_inputs)
        raise ExportError(
            f"the model fails on the example inputs ({given}): {type(err).__name__}: {first_line(err)[:300]}. "
            "Pass inputs of the shape and dtype it was converted with (python -m fxsearch.export: "
            "--input-shape)") from err


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
            errors.append(f"{type(err).__name__}: {first_line(err)[:300]}")
            if not dynamo:  # before the second exporter tries (and logs its own failure)
                _check_runs(twin, example_inputs)
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
        for n in list(self.graph.node):  # torch.onnx shares equal parameters through Identity: undo it
            if n.op_type == "Identity" and n.input[0] in self.inits:
                self.graph.initializer.append(self.inits[n.input[0]])
                self.graph.initializer[-1].name = n.output[0]
                self.inits[n.output[0]] = self.graph.initializer[-1]
                self.graph.node.remove(n)
        self.head: list[onnx.NodeProto] = []          # nodes reading only initializers
        self.before: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.annotations: list[onnx.TensorAnnotation] = []
        self.quantized_inputs: dict[tuple[str, int], str] = {}  # (tensor, quantizer) -> its DQ output
        self.dequantized: dict[str, str] = {}  # DQ output -> the tensor it quantizes
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # node -> the nodes taking its place
        self.removed: list[onnx.NodeProto] = []  # dropped nodes, held so that their ids stay theirs

    def add_init(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def annotate(self, tensor: str, scale: str, zero_point: str) -> None:
        self.annotations.append(onnx.TensorAnnotation(
            tensor_name=tensor,
            quant_parameter_tensor_names=[onnx.StringStringEntryProto(key="SCALE_TENSOR", value=scale),
                                          onnx.StringStringEntryProto(key="ZERO_POINT_TENSOR", value=zero_point)]))

    def remove_init(self, name: str) -> None:
        self.graph.initializer.remove(self.inits.pop(name))

    def dequantize_initializer(self, name: str, ints: np.ndarray, scale: np.ndarray) -> onnx.TensorProto:
        """Tensor `name` (replacing the float initializer of that name, if any) as integers +
        per-channel DequantizeLinear (axis 0); returns the integer initializer."""
        if name in self.inits:
            self.remove_init(name)
        proto = numpy_helper.from_array(ints, f"{name}_quantized")
        self.graph.initializer.append(proto)
        q = proto.name
        s = self.add_init(f"{name}_scale", scale.astype(np.float32))
        z = self.add_init(f"{name}_zero_point", np.zeros(scale.shape, dtype=ints.dtype))
        self.head.append(helper.make_node("DequantizeLinear", [q, s, z], [name], name=f"{name}_dequantize", axis=0))
        self.annotate(q, s, z)
        return proto

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

    def quantize_input(self, op: onnx.NodeProto, act: FakeQuantAct, act_name: str, index: int = 0) -> tuple[float, str]:
        """Q -> (Clip) -> DQ on input `index` of `op`; shared by the ops reading one quantizer."""
        scale, zero_point = act.scale_zero_point()
        src = op.input[index]
        if src in self.dequantized:  # quantized already, by quantize_marked
            return scale, self.dequantized[src]
        key = (src, id(act))
        if key not in self.quantized_inputs:
            # torch.onnx merges equal ops (two pools of one tensor), so one tensor can feed
            # several quantizers: number the later ones
            twins = sum(1 for s, _ in self.quantized_inputs if s == src)
            base = f"{src}_a{act.bits}" + (f"_{twins}" if twins else "")
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
            _set_props(nodes[-1], {"ai.fxsearch.quantizer": act_name, "ai.fxsearch.a_bits": str(act.bits)})
            self.before[id(op)].extend(nodes)
            self.annotate(q, s, z)
            self.quantized_inputs[key] = f"{base}_dq"
            self.dequantized[f"{base}_dq"] = src
        op.input[index] = self.quantized_inputs[key]
        return scale, src

    def quantize_marked(self, acts: list[tuple[str, FakeQuantAct]]) -> None:
        """Replace the float export's QuantizeLinear/DequantizeLinear pairs (one per marked
        quantizer, in graph order) by ours, and drop the constants that fed them."""
        pairs = [(q, self.consumers[q.output[0]]) for q in self.graph.node if q.op_type == "QuantizeLinear"]
        if len(pairs) != len(acts) or any(len(d) != 1 or d[0].op_type != "DequantizeLinear" for _, d in pairs):
            raise ExportError(f"the float export holds {len(pairs)} quantize/dequantize pairs where the model "
                              f"has {len(acts)} marked quantizers ({', '.join(n for n, _ in acts)}); "
                              "export with integer_adds=False, or report the model")
        gone = []
        for (q, (dq,)), (name, act) in zip(pairs, acts):
            gone += [q, dq]
            for op in self.consumers[dq.output[0]]:
                for index, tensor in enumerate(op.input):
                    if tensor == dq.output[0]:
                        op.input[index] = q.input[0]
                        self.consumers[q.input[0]].append(op)
                        self.quantize_input(op, act, name, index)
        producers = {o: n for n in self.graph.node for o in n.output}
        while gone:
            node = gone.pop()
            self.replaced[id(node)] = []
            self.removed.append(node)
            for tensor in node.input:
                p = producers.get(tensor)
                if p is not None and id(p) not in self.replaced and all(
                        id(c) in self.replaced for o in p.output for c in self.consumers[o]):
                    gone.append(p)

    def finish(self) -> None:
        nodes = list(self.head)
        for n in self.graph.node:
            nodes.extend(self.before.get(id(n), []))
            nodes.extend(self.replaced.get(id(n), [n]))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.graph.quantization_annotation.extend(self.annotations)


def _set_props(proto: Any, props: dict[str, str]) -> None:
    for k, v in props.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def _layer_row(name: str, layer: QuantWeightMixin, act: FakeQuantAct | None) -> dict:
    return {"layer": name, "type": type(layer).__name__, "out_channels": int(layer.weight.shape[0]),
            "w_bits": layer.w_bits.tolist(), "a_bits": act.bits if act is not None else None}


def layer_summary(final: torch.fx.GraphModule) -> list[dict]:
    """Per quantized layer: shape, per-channel weight bits, input activation bits."""
    return [_layer_row(name, layer, act) for name, (layer, act) in quant_layers(final).items()]


def _bias_int32(bias: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round(bias / scale) in float32, as the finalized model computes it (QuantWeightMixin.quant_bias):
    in float64 a quotient on a rounding tie in float32 may fall on the other side."""
    q = np.round(bias.astype(np.float32) / np.asarray(scale).astype(np.float32))
    return np.clip(q.astype(np.float64), -2 ** 31, 2 ** 31 - 1).astype(np.int32)


def _dequantize_bias(rw: _Rewriter, bias: str, a_scale: float | None, w_scale: np.ndarray) -> None:
    """Float initializer `bias`, if still there, as int32 on the grid a_scale * w_scale."""
    if a_scale is not None and bias in rw.inits:
        b_scale = a_scale * w_scale
        rw.dequantize_initializer(bias, _bias_int32(numpy_helper.to_array(rw.inits[bias]), b_scale), b_scale)


@torch.no_grad()  # integer weights and scales without autograd (the same floats, fewer passes)
def _build(final: torch.fx.GraphModule, example_inputs: Sequence[Any], opset: int, fmt: str,
           write_layer: Callable[..., dict]) -> onnx.ModelProto:
    """Export the float twin of `final`, quantize every layer's input, let `write_layer` store
    its weights and annotations (returning its summary row), check the result."""
    if opset < 13:
        raise ExportError(f"opset {opset} has no per-channel DequantizeLinear; use opset >= 13")
    layers = quant_layers(final)
    check_finite(final, ExportError, "fine-tuning diverged: export an earlier state")
    marked = marked_quantizers(final)
    for name, act in marked:
        if act.bits > 8:
            raise ExportError(f"quantizer '{name}': {act.bits}-bit activations do not fit the uint8 QDQ format")
    twin = _float_twin(final).cpu().float()  # a float32 graph whatever the model's dtype (scales are fp32)
    model = _torch_onnx(twin, example_inputs, opset)
    rw = _Rewriter(model)
    rw.quantize_marked(marked)
    act_names = {id(m): n for n, m in final.named_modules()}
    rows = []
    for name, (layer, act) in layers.items():
        if act is not None and act.bits > 8:
            raise ExportError(f"layer '{name}': {act.bits}-bit activations do not fit the uint8 QDQ format")
        if f"{name}.weight" not in rw.inits:
            raise ExportError(f"layer '{name}': its weight is not an initializer of the exported graph")
        op = rw.op_reading(f"{name}.weight")
        props = {"ai.fxsearch.layer": name, "ai.fxsearch.w_bits": json.dumps(layer.w_bits.tolist())}
        a_scale = None
        if act is not None:
            a_scale, _ = rw.quantize_input(op, act, act_names[id(act)])
            props["ai.fxsearch.a_bits"] = str(act.bits)
        w_scale = layer.weight_scale().detach().cpu().double().numpy()
        rows.append(write_layer(rw, name, layer, act, op, w_scale, a_scale, props))
    rw.finish()
    summary = {"producer": "fxsearch", "format": fmt, "opset": opset, "layers": rows}
    if fmt == "packed":
        summary["payload_bytes"] = sum(r["payload_bytes"] for r in rows)
        model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    _set_props(model, {"ai.fxsearch.summary": json.dumps(summary)})
    model.producer_name = "fxsearch"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:
        raise ExportError(f"the rewritten ONNX graph does not pass onnx.checker: {err}") from err
    return model


def _cpu(example_inputs: Sequence[Any]) -> tuple:
    """The example inputs on the CPU, floating ones in float32 like the exported graph."""
    return tuple((t.float() if t.is_floating_point() else t).detach().cpu() if isinstance(t, torch.Tensor) else t
                 for t in example_inputs)


def _qdq_layer(rw: _Rewriter, name: str, layer, act, op, w_scale, a_scale, props) -> dict:
    rw.dequantize_initializer(f"{name}.weight", layer.weight_int().detach().cpu().numpy().astype(np.int8), w_scale)
    _dequantize_bias(rw, f"{name}.bias", a_scale, w_scale)
    _set_props(op, props)
    return _layer_row(name, layer, act)


def export_qdq(final: torch.fx.GraphModule, example_inputs: Sequence[Any], opset: int | None = None) -> onnx.ModelProto:
    """Build the QDQ ONNX model of a finalized GraphModule (not written anywhere)."""
    return _build(final, _cpu(example_inputs), opset or DEFAULT_OPSET, "qdq", _qdq_layer)


# ---- packed ------------------------------------------------------------------------------
def _int_type(bits: int, opset: int, int2: bool = True) -> str:
    """The narrowest signed ONNX integer type that holds `bits` bits at `opset`."""
    for top, name, since in _INT_TYPES:
        if bits <= top and opset >= since and hasattr(TensorProto, name) and (int2 or name != "INT2"):
            return name
    raise ExportError(f"{bits}-bit weights do not fit the packed format (at most 8 bits)")


def _allows_int2(layer: QuantWeightMixin, act: FakeQuantAct | None) -> bool:
    """onnxruntime (1.32 at least) fuses DequantizeLinear(INT2) into the Gemm (or MatMul + Add)
    of a layer with a quantized input as a QGemm that rejects INT2: such layers keep 2-bit
    channels in INT4."""
    return not (isinstance(layer, nn.Linear) and act is not None)


def _runs(layer: QuantWeightMixin, note: str) -> tuple[list[tuple[int, int, int]], str | None]:
    """Sub-layers as (bits, first channel, end channel): one per maximal run of equal bits when
    each bit-width is one run (aligned with the groups of a grouped conv); otherwise the whole
    layer at its widest bit-width, with the reason."""
    bits = layer.w_bits.tolist()
    cuts = [0] + [c for c in range(1, len(bits)) if bits[c] != bits[c - 1]] + [len(bits)]
    runs = [(bits[a], a, b) for a, b in zip(cuts, cuts[1:])]
    groups = getattr(layer, "groups", 1)
    if len(runs) > len(set(bits)):
        reason = f"its bit-widths stay interleaved after the channel sort: {note}"
    elif groups > 1 and any(a % (len(bits) // groups) or b % (len(bits) // groups) for _, a, b in runs):
        reason = f"its bit-width runs cut through its {layer.groups} conv groups"
    else:
        return runs, None
    return [(max(bits), 0, len(bits))], reason


def _packed_layer(rw: _Rewriter, name: str, layer, act, op, w_scale, a_scale, props, *,
                  opset: int, plans: dict, order: dict) -> dict:
    runs, reason = plans[name]
    ints = layer.weight_int().detach().cpu().numpy()
    weight, bias = f"{name}.weight", f"{name}.bias"
    props = {**props, "ai.fxsearch.packed": json.dumps(reason is None)}
    subs = []

    def store(tensor: str, b: int, first: int, end: int) -> None:
        kind = _int_type(b, opset, _allows_int2(layer, act))
        dtype = helper.tensor_dtype_to_np_dtype(getattr(TensorProto, kind))
        q = rw.dequantize_initializer(tensor, ints[first:end].astype(np.int8).astype(dtype), w_scale[first:end])
        subs.append({"bits": b, "channels": [first, end], "initializer": q.name, "type": kind,
                     "payload_bytes": len(q.raw_data)})

    if len(runs) == 1:  # the layer's own node reads the narrow weight
        store(weight, *runs[0])
        _set_props(op, props)
    else:
        _split(rw, name, layer, op, runs, store, w_scale, a_scale, props)
    _dequantize_bias(rw, bias, a_scale, w_scale)  # a bias read whole (by the op, or added after a MatMul)
    row = _layer_row(name, layer, act)
    row.update(packed=reason is None, channel_order=order[name].tolist(), sub_layers=subs,
               payload_bytes=sum(s["payload_bytes"] for s in subs))
    if reason is not None:
        row["reason"] = reason
    return row


def _split(rw: _Rewriter, name: str, layer, op, runs, store, w_scale, a_scale, props) -> None:
    """Replace `op` by one copy per run of channels, each reading its own weight (and bias
    slice, and input slice for a grouped conv), joined by a Concat on the channel axis."""
    weight, bias = f"{name}.weight", f"{name}.bias"
    transpose = next((n for n in rw.consumers[weight] if n.op_type == "Transpose"), None)
    b_values = numpy_helper.to_array(rw.inits[bias]) if len(op.input) > 2 and op.input[2] == bias else None
    groups = getattr(layer, "groups", 1)
    per_group, c_in_g = layer.weight.shape[0] // groups, layer.weight.shape[1]
    nodes, outputs = [], []
    for b, first, end in runs:
        sub = onnx.NodeProto()
        sub.CopyFrom(op)
        sub.name, sub.output[0] = f"{op.name}_w{b}", f"{op.output[0]}_w{b}"
        store(f"{weight}_w{b}", b, first, end)
        sub.input[1] = f"{weight}_w{b}"
        if transpose is not None:
            t = onnx.NodeProto()
            t.CopyFrom(transpose)
            t.name, t.input[0], t.output[0] = f"{transpose.name}_w{b}", f"{weight}_w{b}", f"{transpose.output[0]}_w{b}"
            nodes.append(t)
            sub.input[1] = t.output[0]
        if b_values is not None:
            sub.input[2] = f"{bias}_w{b}"
            if a_scale is None:
                rw.add_init(sub.input[2], b_values[first:end])
            else:
                b_scale = a_scale * w_scale[first:end]
                rw.dequantize_initializer(sub.input[2], _bias_int32(b_values[first:end], b_scale), b_scale)
        if groups > 1:  # whole conv groups: read their input channels only
            bounds = [rw.add_init(f"{name}_w{b}_slice_{k}", np.array([v], dtype=np.int64)) for k, v in
                      (("starts", first // per_group * c_in_g), ("ends", end // per_group * c_in_g), ("axes", 1))]
            nodes.append(helper.make_node("Slice", [op.input[0], *bounds], [f"{sub.output[0]}_input"],
                                          name=f"{sub.name}_input"))
            sub.input[0] = f"{sub.output[0]}_input"
            next(a for a in sub.attribute if a.name == "group").i = (end - first) // per_group
        _set_props(sub, {**props, "ai.fxsearch.w_bits": json.dumps([b] * (end - first)),
                         "ai.fxsearch.channels": json.dumps([first, end])})
        nodes.append(sub)
        outputs.append(sub.output[0])
    concat = helper.make_node("Concat", outputs, [op.output[0]], name=f"{op.name}_concat",
                              axis=-1 if op.op_type == "MatMul" else 1)
    _set_props(concat, {"ai.fxsearch.joins": name})
    rw.replaced[id(op)] = nodes + [concat]
    if transpose is not None:
        rw.replaced[id(transpose)] = []
    rw.remove_init(weight)
    if b_values is not None:
        rw.remove_init(bias)


def export_packed(final: torch.fx.GraphModule, example_inputs: Sequence[Any], opset: int | None = None) -> onnx.ModelProto:
    """Build the packed ONNX model of a finalized GraphModule (not written anywhere).

    Default opset: 25 when a sub-layer needs INT2, else 21; a lower opset stores such
    sub-layers in the narrowest type it has (INT4 from 21, INT8 below).
    """
    quant_layers(final)  # a clear error for anything but a finalized model
    if meta.ANALYSIS not in final.meta:
        raise ExportError("the packed format reads the channel analysis that fxsearch.finalize leaves in "
                          "the model's meta; pass the GraphModule returned by fxsearch.finalize")
    sorted_gm = sort_channels(final, example_inputs)
    result = sorted_gm.meta[meta.SORT_RESULT]
    layers = quant_layers(sorted_gm)
    plans = {name: _runs(layer, result.notes[name]) for name, (layer, _) in layers.items()}
    if opset is None:
        opset = 25 if any(b <= 2 and _allows_int2(*layers[name]) for name, (runs, _) in plans.items()
                          for b, _, _ in runs) else 21
    write = functools.partial(_packed_layer, opset=opset, plans=plans, order=result.order)
    return _build(sorted_gm, _cpu(example_inputs), opset, "packed", write)


def export_onnx(final: torch.fx.GraphModule, path: str, example_inputs: Sequence[Any], *,
                format: str = "qdq", opset: int | None = None) -> onnx.ModelProto:
    """Write a finalized model to `path` as ONNX (atomically) and return the ModelProto."""
    builders = {"qdq": export_qdq, "packed": export_packed}
    if format not in builders:
        raise ExportError(f"format {format!r} is not available; use format='qdq' or 'packed'")
    try:
        model = builders[format](final, example_inputs, opset)
    except FxSearchError:
        raise
    except Exception:  # the packed format's channel sort runs the model first
        with torch.no_grad():
            _check_runs(final, example_inputs)
        raise
    write_atomically(path, model.SerializeToString(), error=ExportError, what="ONNX file")
    return model

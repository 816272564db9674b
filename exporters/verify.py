"""Check an exported ONNX file against the finalized model with onnxruntime.

- weight integers in the file equal the model's integers exactly (for the packed format, the
  concatenated sub-layer integers equal those of the model after the same channel sort);
- every quantized activation (layer inputs, operands of integer adds) agrees within 1 LSB of
  its scale (graph optimisation disabled, the quantized tensors exposed as extra outputs,
  found by the quantizer name on their DequantizeLinear), each PyTorch quantizer fed from
  onnxruntime's upstream tensors (teacher forcing) so that a rounding tie flipped by a
  different float summation order is counted where it happens instead of cascading;
- the model outputs agree at disabled and at default graph optimisation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper
from torch.utils._pytree import tree_flatten

from fxsearch.errors import ExportError
from fxsearch.passes.sort_channels import sort_channels

from .onnx_qdq import quant_layers

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@dataclasses.dataclass
class VerifyReport:
    weights_exact: bool
    max_abs_error: dict[str, float]   # per optimisation level, on the model outputs
    output_scale: float               # max |output| of the PyTorch model
    worst_lsb: float                  # largest quantized-activation difference, in LSBs (teacher-forced)
    over_one_lsb: float               # fraction of quantized elements off by more than 1 LSB (teacher-forced)
    forced_error: float               # output difference with teacher forcing (float noise only)
    # free-running outputs may differ by more: a rounding tie flipped early propagates, the
    # more so through deep, untrained networks; this bound only catches gross errors
    output_rtol: float = 0.25
    forced_rtol: float = 1e-4

    @property
    def ok(self) -> bool:
        scale = self.output_scale + 1e-6
        close = all(e <= self.output_rtol * scale for e in self.max_abs_error.values())
        return (self.weights_exact and close and self.over_one_lsb == 0.0
                and self.forced_error <= self.forced_rtol * scale)

    def summary(self) -> str:
        errs = ", ".join(f"{k} {v:.3g}" for k, v in self.max_abs_error.items())
        return (f"{'OK' if self.ok else 'MISMATCH'}: weights exact={self.weights_exact}; activations: worst "
                f"{self.worst_lsb:.2f} LSB, {100 * self.over_one_lsb:.3f}% of elements beyond 1 LSB; outputs "
                f"up to {self.output_scale:.3g}: teacher-forced error {self.forced_error:.3g}, free-running "
                f"error ({errs})")


def optimized_ops(path: str) -> list[str]:
    """The op types onnxruntime runs for the file at `path` after its graph optimisations
    (ORT_ENABLE_ALL, CPU): where it fused Q/DQ pairs into QLinearConv, QLinearAdd and the like."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # not its warning that the saved graph is tuned to this CPU
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _session(model: onnx.ModelProto, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def verify_onnx(final: torch.fx.GraphModule, path: str, example_inputs: Sequence[Any]) -> VerifyReport:
    try:
        model = onnx.load(path)
    except (OSError, DecodeError) as err:
        raise ExportError(f"cannot read ONNX file {str(path)!r} ({type(err).__name__}: {err}); pass the "
                          "path export_onnx wrote") from err
    summary = json.loads({p.key: p.value for p in model.metadata_props}.get("ai.fxsearch.summary", "{}"))
    weight_inits = {}  # layer -> its integer initializers, in channel order
    if summary.get("format") == "packed":  # the file holds the channels sorted by bit-width
        final = sort_channels(final, example_inputs)
        weight_inits = {r["layer"]: [s["initializer"] for s in r["sub_layers"]] for r in summary["layers"]}
    layers = quant_layers(final)
    inits = {i.name: i for i in model.graph.initializer}
    weights_exact = all(
        all(i in inits for i in weight_inits.get(name, [f"{name}.weight_quantized"])) and np.array_equal(
            np.concatenate([numpy_helper.to_array(inits[i]).astype(np.int64)
                            for i in weight_inits.get(name, [f"{name}.weight_quantized"])]),
            layer.weight_int().detach().cpu().numpy().astype(np.int64))
        for name, (layer, _) in layers.items())

    # the tensor every quantizer makes in ONNX: the output of the DequantizeLinear tagged with its name
    modules = dict(final.named_modules())
    tensor_of: dict[int, tuple[torch.nn.Module, str]] = {}
    for node in model.graph.node:
        tag = {p.key: p.value for p in node.metadata_props}.get("ai.fxsearch.quantizer")
        if node.op_type == "DequantizeLinear" and tag in modules:
            tensor_of[id(modules[tag])] = (modules[tag], node.output[0])
    feeds = {i.name: (t.float() if t.is_floating_point() else t).detach().cpu().numpy()  # float32 graph
             for i, t in zip(model.graph.input, example_inputs)}
    final.eval()
    with torch.no_grad():
        want = [t.cpu().numpy() for t in tree_flatten(final(*example_inputs))[0]]
    errors = {}
    for level in LEVELS:
        got = _session(model, level).run(None, feeds)
        errors[level] = max(float(np.abs(g - w).max()) for g, w in zip(got, want))

    # teacher forcing: each PyTorch quantizer continues from onnxruntime's upstream tensors,
    # so a rounding tie flipped once is counted once instead of cascading downstream
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = sorted({t for _, t in tensor_of.values()})
    probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    ort_values = dict(zip(names, _session(probe, "disabled").run(names, feeds)))
    stats = {"worst": 0.0, "over": 0, "total": 0}

    def force(module, inputs, output, tensor):
        reference = torch.from_numpy(ort_values[tensor]).to(output)
        scale = float(numpy_helper.to_array(inits[tensor.removesuffix("_dq") + "_scale"]))
        diff = (output - reference).abs() / scale
        stats["worst"] = max(stats["worst"], float(diff.max()))
        stats["over"] += int((diff > 1.001).sum())
        stats["total"] += diff.numel()
        return reference

    hooks = [act.register_forward_hook(lambda m, i, o, t=tensor: force(m, i, o, t)) for act, tensor in tensor_of.values()]
    try:
        with torch.no_grad():
            forced = [t.cpu().numpy() for t in tree_flatten(final(*example_inputs))[0]]
    finally:
        for h in hooks:
            h.remove()
    ort_outputs = _session(model, "disabled").run(None, feeds)
    forced_error = max(float(np.abs(g - w).max()) for g, w in zip(ort_outputs, forced))
    return VerifyReport(weights_exact, errors, max(float(np.abs(w).max()) for w in want), stats["worst"],
                        stats["over"] / max(stats["total"], 1), forced_error)

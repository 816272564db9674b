"""How each fx node treats channels: the one table the channel-group pass reads.

Kinds:
  searchable   Conv1d/2d/3d and Linear modules: new output channels, input channels consumed
  local        element-wise in its input (activations, BatchNorm, dropout, casts): channels pass
  spatial      works per channel over trailing spatial dims (pooling, upsampling, padding)
  elementwise  several tensors combined element by element (add, mul, ...): channels tie
  reduce       reduction over the `dim` argument (mean, sum, amax, ...)
  along_dim    per slice along `dim` (softmax, cumsum, normalize): cross-channel if dim is one
  layer_norm   normalizes over the trailing dims (LayerNorm, F.layer_norm)
  group_norm   normalizes over groups of channels (GroupNorm)
  structural   moves elements without arithmetic (view, cat, split, permute, getitem, ...):
               applied to the label tensors themselves
  shape        returns no tensor (size, dim, shape)
Anything else is unknown: the channels it reads are frozen, its output carries none.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

SEARCHABLE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_LOCAL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
_SPATIAL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2,
    nn.AvgPool3d: 3, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1, nn.LPPool2d: 2, nn.Upsample: -1, nn.UpsamplingNearest2d: 2,
    nn.UpsamplingBilinear2d: 2, nn.ZeroPad2d: 2, nn.ConstantPad2d: 2, nn.ReflectionPad2d: 2,
    nn.ReplicationPad2d: 2,
}
_STRUCTURAL_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)

_LOCAL_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh, torch.exp,
    torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip,
    torch.erf, torch.log, F.sigmoid, F.tanh, operator.neg, operator.pos, torch.nn.functional.relu_,
    torch.relu_, torch.sigmoid_, torch.selu, torch.celu, torch.clamp_min, torch.clamp_max,
    torch.dropout, torch.feature_dropout, torch.alpha_dropout,
}
_LOCAL_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt",
    "square", "clamp", "clamp_", "clip", "float", "double", "half", "bfloat16", "to", "type_as",
    "detach", "clone", "contiguous", "erf", "log", "hardtanh_", "nan_to_num", "clamp_min",
    "clamp_min_", "clamp_max", "clamp_max_",
}
_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, torch.where, torch.true_divide, torch.multiply, torch.subtract,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
    "true_divide", "multiply",
}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var"}
_ALONG_DIM_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
                        torch.cumsum, F.normalize}
_ALONG_DIM_METHODS = {"softmax", "log_softmax", "cumsum"}
_SPATIAL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2,
    F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3,
    F.interpolate: -1, F.upsample: -1, F.pad: 0,
    # the same kernels under their torch.* names (adaptive max pooling there returns indices too)
    torch.max_pool1d: 1, torch.max_pool2d: 2, torch.max_pool3d: 3, torch.avg_pool1d: 1,
    torch.adaptive_avg_pool1d: 1,
}
_STRUCTURAL_FUNCTIONS = {
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.split, torch.chunk,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.squeeze,
    torch.unsqueeze, torch.narrow, torch.select, torch.roll, torch.flip, torch.unbind,
    torch.movedim, torch.t, torch.tensor_split, operator.getitem, F.channel_shuffle,
    torch.channel_shuffle, torch.unflatten,
}
_STRUCTURAL_METHODS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "squeeze",
    "unsqueeze", "expand", "repeat", "split", "chunk", "narrow", "select", "unbind", "flip",
    "roll", "movedim", "t", "view_as", "reshape_as", "expand_as", "tensor_split",
}
_SHAPE_METHODS = {"size", "dim", "numel"}

LOCAL_NONNEG = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_NONNEG_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.relu_, torch.sigmoid, torch.sigmoid_,
                     F.hardsigmoid, F.sigmoid, F.softmax, torch.softmax, torch.abs, torch.exp, torch.square}
_NONNEG_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "softmax", "abs", "exp", "square"}


def node_kind(node: torch.fx.Node, module: nn.Module | None) -> str:
    """The kind of ``node`` (see the module docstring); 'unknown' when not listed."""
    if node.op == "call_module":
        if isinstance(module, SEARCHABLE_MODULES):
            return "searchable"
        if isinstance(module, _LOCAL_MODULES) or type(module).__name__ == "StochasticDepth":
            return "local"
        if type(module) in _SPATIAL_MODULES:
            return "spatial"
        if isinstance(module, _STRUCTURAL_MODULES):
            return "structural"
        if isinstance(module, nn.LayerNorm):
            return "layer_norm"
        if isinstance(module, nn.GroupNorm):
            return "group_norm"
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return "along_dim"
        return "unknown"
    table = {
        "call_function": (
            (_LOCAL_FUNCTIONS, "local"), (_ELEMENTWISE_FUNCTIONS, "elementwise"),
            (_REDUCE_FUNCTIONS, "reduce"), (_ALONG_DIM_FUNCTIONS, "along_dim"),
            (_SPATIAL_FUNCTIONS, "spatial"), (_STRUCTURAL_FUNCTIONS, "structural"),
            ({F.layer_norm}, "layer_norm"), ({getattr}, "shape"),
        ),
        "call_method": (
            (_LOCAL_METHODS, "local"), (_ELEMENTWISE_METHODS, "elementwise"),
            (_REDUCE_METHODS, "reduce"), (_ALONG_DIM_METHODS, "along_dim"),
            (_STRUCTURAL_METHODS, "structural"), (_SHAPE_METHODS, "shape"),
        ),
    }.get(node.op, ())
    for members, kind in table:
        if _contains(members, node.target):
            return kind
    return "unknown"


def _contains(members: Any, target: Any) -> bool:
    try:
        return target in members
    except TypeError:  # unhashable target
        return False


def spatial_dims(node: torch.fx.Node, module: nn.Module | None, value: torch.Tensor) -> list[int]:
    """The trailing dims a 'spatial' op works over (all dims after the channel dim when -1)."""
    count = _SPATIAL_MODULES[type(module)] if node.op == "call_module" else _SPATIAL_FUNCTIONS[node.target]
    if count == 0:  # F.pad: the padded dims
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        count = len(pad) // 2
    if count < 0:
        count = value.dim() - 2
    return list(range(value.dim() - count, value.dim()))


def is_nonneg_producer(node: torch.fx.Node, module: nn.Module | None) -> bool:
    """True when the op's output is >= 0 whatever its input."""
    if node.op == "call_module":
        return isinstance(module, LOCAL_NONNEG)
    if node.op == "call_function":
        return _contains(_NONNEG_FUNCTIONS, node.target)
    return node.op == "call_method" and node.target in _NONNEG_METHODS


_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}


def is_relu(node: torch.fx.Node, module: nn.Module | None) -> bool:
    """A plain ReLU of one computed tensor (module, function or method, in place or not)."""
    if node.op == "call_module":
        kind = isinstance(module, nn.ReLU)
    elif node.op == "call_function":
        kind = _contains(_RELU_FUNCTIONS, node.target)
    else:
        kind = node.op == "call_method" and node.target in ("relu", "relu_")
    return kind and len(node.args) == 1 and isinstance(node.args[0], torch.fx.Node) and set(node.kwargs) <= {"inplace"}


def mutates_input(node: torch.fx.Node, module: nn.Module | None) -> bool:
    """In-place ops (x.relu_(), F.relu(x, inplace=True), x += y, nn.ReLU(inplace=True)): kept
    even when their result is unused, since they change a tensor that others read."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False))
    name = getattr(node.target, "__name__", "")
    return bool(node.kwargs.get("inplace")) or (name.endswith("_") and not name.endswith("__")) or \
        node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def remove_dead_code(gm: torch.fx.GraphModule) -> None:
    """Erase nodes whose results nobody reads, unless they have side effects (fx's own
    eliminate_dead_code drops in-place method calls such as a bare ``y.relu_()``)."""
    modules = dict(gm.named_modules())
    for node in reversed(list(gm.graph.nodes)):
        module = modules.get(node.target) if node.op == "call_module" else None
        if not node.users and not node.is_impure() and not mutates_input(node, module):
            gm.graph.erase_node(node)

"""Configuration of a conversion, validated once at the front door."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

from .errors import ConfigError

SAMPLING_MODES = ("softmax", "hard", "gumbel")
MAX_BITS = 16


def _precision_set(name: str, values: Any, allow_zero: bool) -> tuple[int, ...]:
    """Validate a precision set and return it sorted ascending."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ConfigError(f"{name} must be a sequence of integers, got {values!r}")
    values = list(values)
    if not values:
        raise ConfigError(f"{name} is empty; give at least one bit-width, e.g. (2, 4, 8)")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # numpy integers count too
            raise ConfigError(f"{name} holds {v!r}, which is not an integer bit-width")
        v = values[i] = int(v)
        low = 0 if allow_zero else 1
        if not low <= v <= MAX_BITS:
            what = "0 (pruned) to" if allow_zero else "1 to"
            raise ConfigError(f"{name} holds {v}; bit-widths run from {what} {MAX_BITS}")
    if allow_zero and 1 in values:
        raise ConfigError(f"{name} holds 1: a symmetric 1-bit weight grid has no non-zero level; use 2 or more")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} holds duplicates: {values}; list each bit-width once")
    if allow_zero and values == [0]:
        raise ConfigError(f"{name} = (0,) would prune everything; add a non-zero bit-width")
    return tuple(sorted(values))


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """What to search and how.

    w_precisions: per-output-channel weight bit-widths; 0 means the channel is pruned.
    a_precisions: per-tensor activation bit-widths of every tensor that feeds a searchable layer.
    input_bits: fixed bit-width of the network input (None leaves it in float).
    sampling: "softmax" (with temperature), "hard" (argmax forward, softmax gradient) or "gumbel".
    exclude: module names or types kept in float and out of the search.
    leaf_modules: extra module types that the tracer keeps whole.
    integer_adds: the operands of every element-wise add/sub of two computed tensors
        (residual adds) are quantized too: through the tensor's own (searched) quantizer
        where layers read it, else at a fixed 8 bits (not searched, not priced). Every
        tensor then has one integer precision, and onnxruntime runs every convolution as
        int8 QLinearConv instead of float (see README, Deployment).
    """

    w_precisions: Sequence[int] = (0, 2, 4, 8)
    a_precisions: Sequence[int] = (2, 4, 8)
    input_bits: int | None = 8
    sampling: str = "softmax"
    temperature: float = 1.0
    exclude: Sequence[Any] = ()
    leaf_modules: Sequence[type] = ()
    concrete_args: dict[str, Any] | None = None
    integer_adds: bool = False

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("w_precisions", _precision_set("w_precisions", self.w_precisions, allow_zero=True))
        set_("a_precisions", _precision_set("a_precisions", self.a_precisions, allow_zero=False))
        if self.input_bits is not None:
            set_("input_bits", _precision_set("input_bits", [self.input_bits], allow_zero=False)[0])
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"sampling={self.sampling!r}; choose one of {SAMPLING_MODES}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature!r}")
        if not isinstance(self.integer_adds, bool):
            raise ConfigError(f"integer_adds must be True or False, got {self.integer_adds!r}")
        set_("exclude", tuple(self.exclude))
        set_("leaf_modules", tuple(self.leaf_modules))

    @property
    def can_prune(self) -> bool:
        return 0 in self.w_precisions

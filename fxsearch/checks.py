"""Checks at the front doors (convert, finalize, export, the CLIs): where the model's tensors
live, whether they hold numbers, whether an output path can be written. Each names the module,
tensor or path at fault and the way out."""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError, FxSearchError, TraceError, UnsupportedModelError


def _tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(qualified tensor name, owning module description, tensor) of every parameter and buffer."""
    for mod_name, module in model.named_modules():
        owner = f"{type(module).__name__} '{mod_name}'" if mod_name else f"the model ({type(module).__name__})"
        for kind in (module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            for name, t in kind:
                if t is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), owner, t


def model_device(model: nn.Module) -> torch.device | None:
    """The one device of every parameter and buffer (None for a model without any); raises
    UnsupportedModelError naming a module on another device, or one on the meta device."""
    by_device: dict[torch.device, tuple[str, str]] = {}
    for name, owner, t in _tensors(model):
        by_device.setdefault(t.device, (name, owner))
    if len(by_device) > 1:
        (d0, (n0, o0)), (d1, (n1, o1)) = list(by_device.items())[:2]
        raise UnsupportedModelError(
            f"the model's tensors are on several devices: '{n0}' of {o0} on {d0}, '{n1}' of {o1} on "
            f"{d1}; move the whole model to one device first, e.g. model.to('{d0}')")
    device = next(iter(by_device), None)
    if device is not None and device.type == "meta":
        name, owner = by_device[device]
        raise UnsupportedModelError(
            f"'{name}' of {owner} is on the meta device and holds no values, but the channel analysis "
            "runs the model on the example inputs; materialise the weights first "
            "(model.to_empty(device='cpu') and load a state_dict)")
    return device


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: its sum is finite (one read, no mask written; on ResNet-50 many
    times faster than isfinite().all()), else the exact check (a sum of finite values can
    overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(model: nn.Module, error: type[FxSearchError] = UnsupportedModelError,
                 way_out: str = "load finite weights (a diverged training?)") -> None:
    """Refuse a floating parameter or buffer holding NaN or Inf, naming it and its module."""
    for name, owner, t in _tensors(model):
        if t.is_floating_point() and t.device.type != "meta" and not all_finite(t):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise error(f"'{name}' of {owner} holds {nan} NaN and {inf} Inf values; {way_out}")


def check_example_inputs(model: nn.Module, example_inputs: Sequence[Any]) -> None:
    """Example inputs on the model's device, holding finite values (they set the activation ranges)."""
    device = model_device(model)
    for k, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            continue
        if device is not None and x.device != device:
            raise TraceError(
                f"example_inputs[{k}] is on {x.device} but the model's parameters are on {device}; "
                f"move the inputs there, e.g. x.to('{device}')")
        if x.device.type == "meta":
            raise TraceError(f"example_inputs[{k}] is on the meta device and holds no values; "
                             "pass real tensors (the channel analysis runs the model on them)")
        if x.is_floating_point() and not all_finite(x):
            raise TraceError(f"example_inputs[{k}] holds NaN or Inf values; they would set NaN "
                             "activation ranges: pass finite example inputs")


def check_output_file(path: str | os.PathLike, error: type[FxSearchError], what: str) -> None:
    """Refuse, before any work, a file path that cannot be written: an existing directory, or a
    folder that does not exist or is not a folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        reason = "it is a directory"
    elif not os.path.isdir(folder):
        reason = f"{folder!r} is not a folder" if os.path.exists(folder) else f"folder {folder!r} does not exist"
    elif not os.access(folder, os.W_OK | os.X_OK):
        reason = f"folder {folder!r} is not writable"
    else:
        return
    raise error(f"cannot write {what} {path!r}: {reason}; choose a writable path (create the folder first)")


def make_run_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Create a run directory (and its parents) or raise ConfigError saying why not."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create run directory {os.fspath(path)!r}: {err.strerror or err}; "
                          f"choose another {option}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {os.fspath(path)!r} is not writable; choose another {option}")

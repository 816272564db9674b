"""Model references: a string that names how to build a model, so no model is ever unpickled.

Three forms, used by checkpoints (``fxsearch.save``/``load``) and the CLIs:
  package.module:factory   any importable callable (a function or a class) returning an nn.Module
  torchvision:NAME         ``torchvision.models.get_model(NAME, **kwargs)``
  NAME                     a built-in model of ``fxsearch.zoo`` (``resnet8``, ``dscnn``, ...)
Names are resolved lazily: nothing is imported until a reference is used.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from typing import Any, Callable, Mapping

import torch.nn as nn

from .errors import ConfigError, did_you_mean

TORCHVISION = "torchvision"
TORCHVISION_INPUT_SHAPE = (1, 3, 224, 224)
_QUALNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FORMS = ("package.module:factory, torchvision:NAME, or a built-in name of fxsearch.zoo")


def import_ref(ref: str) -> Any:
    """The object named by 'package.module:qual.name' (imported on demand)."""
    module_name, sep, qualname = ref.partition(":")
    if not sep or not _QUALNAME.match(module_name) or not _QUALNAME.match(qualname):
        raise ConfigError(f"reference {ref!r} is not of the form 'package.module:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reference {ref!r}: cannot import module {module_name!r} ({err}); "
                          "install it or put its folder on PYTHONPATH") from err
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reference {ref!r}: {module_name!r} has no attribute {qualname!r}")
        obj = getattr(obj, part)
    return obj


def object_ref(obj: Any) -> str | None:
    """'package.module:qual.name' of a module-level function or class, or None when the object
    cannot be imported by that name in another process (lambdas, locals, ``__main__``)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    try:
        return f"{module}:{qualname}" if import_ref(f"{module}:{qualname}") is obj else None
    except ConfigError:
        return None


def _zoo_factories() -> dict[str, Callable[..., Any]]:
    """Built-in models: ``fxsearch.zoo.MODELS`` if it exists, else its public functions."""
    zoo = importlib.import_module("fxsearch.zoo")
    registry = getattr(zoo, "MODELS", None)
    if isinstance(registry, Mapping):
        return dict(registry)
    names = getattr(zoo, "__all__", None) or [n for n in vars(zoo) if not n.startswith("_")]
    return {n: getattr(zoo, n) for n in names
            if inspect.isfunction(getattr(zoo, n, None)) and getattr(zoo, n).__module__ == zoo.__name__}


def _unknown(kind: str, name: str, known: list[str], listing: str) -> ConfigError:
    names = ", ".join(sorted(known)) if len(known) <= 12 else f"see {listing}"
    return ConfigError(f"unknown {kind} {name!r}{did_you_mean(name, known)} (known: {names})")


def _torchvision_models():
    try:
        import torchvision.models as tvm
    except ImportError as err:
        raise ConfigError(f"torchvision is not installed ({err}); pip install torchvision") from err
    return tvm


def resolve_factory(ref: str) -> Callable[..., Any]:
    """The callable a model reference names, without calling it (cheap validation)."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"model reference must be a non-empty string ({_FORMS}), got {ref!r}")
    prefix, sep, name = ref.partition(":")
    if sep and prefix == TORCHVISION:
        tvm = _torchvision_models()
        known = list(tvm.list_models())
        if name not in known:
            raise _unknown("torchvision model", name, known, "torchvision.models.list_models()")
        return lambda **kw: tvm.get_model(name, **kw)
    if sep:
        factory = import_ref(ref)
    else:
        zoo = _zoo_factories()
        if ref not in zoo:
            raise _unknown("built-in model (fxsearch.zoo)", ref, list(zoo), "fxsearch.zoo")
        factory = zoo[ref]
    if not callable(factory):
        raise ConfigError(f"model reference {ref!r} names a {type(factory).__name__}, not a factory; "
                          "point it at a function or class that returns an nn.Module")
    return factory


def check_kwargs(kwargs: Any, what: str = "model kwargs") -> dict[str, Any]:
    """Factory kwargs must be a JSON object (so checkpoints store them as plain data)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"{what} must be a dict with string keys, got {kwargs!r}")
    try:
        return json.loads(json.dumps(dict(kwargs), allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} {kwargs!r} are not plain JSON data ({err}); pass numbers, "
                          "strings, booleans, lists and dicts only") from err


def resolve_model_ref(ref: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the model a reference names, calling its factory with ``kwargs``."""
    factory = resolve_factory(ref)
    kwargs = check_kwargs(kwargs)
    try:
        model = factory(**kwargs)
    except TypeError as err:
        raise ConfigError(f"model {ref!r} does not accept kwargs {kwargs}: {err}") from err
    except Exception as err:  # a factory may raise anything; say which reference failed
        raise ConfigError(f"building model {ref!r} with kwargs {kwargs} failed: "
                          f"{type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model reference {ref!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def default_input_shape(ref: str) -> tuple[int, ...] | None:
    """A full example input shape (batch first) for a reference, when one is known:
    (1, 3, 224, 224) for torchvision classification models; for other factories an
    ``input_shape`` attribute (e.g. set by fxsearch.zoo); else None."""
    factory = resolve_factory(ref)
    prefix, sep, name = ref.partition(":")
    if sep and prefix == TORCHVISION:
        tvm = _torchvision_models()
        return TORCHVISION_INPUT_SHAPE if name in tvm.list_models(module=tvm) else None
    shape = getattr(factory, "input_shape", None)
    if shape is None and not sep:
        shape = (getattr(importlib.import_module("fxsearch.zoo"), "INPUT_SHAPES", None) or {}).get(ref)
    if shape is None:
        return None
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return None
    return shape if shape and all(s > 0 for s in shape) else None

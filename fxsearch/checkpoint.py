"""Checkpoints of a search model that load without unpickling any Python object.

A checkpoint stores how to rebuild the search model, not the model itself: a model reference
(see fxsearch/model_refs.py) with its factory kwargs, the conversion options, the example
input shapes, and the search model's state_dict (weights, choice logits, activation clip
bounds, temperature). ``load`` builds the seed model again, converts it on inputs of the
stored shapes and loads the state_dict. The file holds plain containers and tensors only,
written with ``torch.save`` and read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import collections
import os
import pickle
from typing import Any, Mapping, Sequence

import torch

from . import meta
from .config import SearchConfig
from .errors import CheckpointError, ConfigError, FxSearchError, first_line
from .files import torch_save_atomically
from .model import SearchModel
from .model_refs import check_kwargs, import_ref, object_ref, resolve_factory, resolve_model_ref

FORMAT = "fxsearch.search_checkpoint"
VERSION = 1


# ---- encoding the pieces as plain data ---------------------------------------------------
def _encode_modules(field: str, items: Sequence[Any]) -> list[dict[str, str]]:
    """exclude / leaf_modules entries: qualified module names as {"name"}, types as {"type"}."""
    out = []
    for item in items:
        if isinstance(item, str):
            out.append({"name": item})
            continue
        ref = object_ref(item) if isinstance(item, type) else None
        if ref is None:
            raise CheckpointError(
                f"cannot save {field} entry {item!r}: only qualified module names (strings) and "
                "module types importable as 'package.module:Class' can be stored; define the "
                f"type in an importable module (not __main__ or a function) or list the module "
                f"names instead, e.g. {field}=['layer1.0.conv1']")
        out.append({"type": ref})
    return out


def _decode_modules(entries: list[dict[str, str]]) -> tuple[Any, ...]:
    return tuple(e["name"] if "name" in e else import_ref(e["type"]) for e in entries)


def _encode_costs(model: SearchModel) -> list[dict[str, Any]] | None:
    from . import cost_models
    models = model.meta.get(meta.COST_MODELS)
    if models is None:
        return None
    out = []
    for name, cm in models.items():
        ref = object_ref(cm.fn)
        if ref is None:
            ref = next((r for r, reg in cost_models.COST_MODELS.items() if reg.fn is cm.fn), None)
        if ref is None:
            raise CheckpointError(
                f"cannot save cost model {name!r} ({cm.fn!r}): it is a lambda or a local function; "
                "define it at module level in an importable module, or register it with "
                "fxsearch.cost_models.register_cost_model (and register it again before load)")
        out.append({"name": name, "fn": ref, "detach_c_in": bool(cm.detach_c_in)})
    return out


def _decode_costs(entries: list[dict[str, Any]] | None) -> Any:
    if entries is None:
        return None
    from . import cost_models
    costs = {}
    for e in entries:
        fn = import_ref(e["fn"]) if ":" in e["fn"] else cost_models.get_cost_model(e["fn"]).fn
        costs[e["name"]] = cost_models.CostModel(fn, e["name"], e["detach_c_in"])
    return costs


def _encode_config(model: SearchModel) -> dict[str, Any]:
    cfg = model.config
    concrete = None
    if cfg.concrete_args is not None:
        try:
            concrete = check_kwargs(cfg.concrete_args, "concrete_args")
        except ConfigError as err:
            raise CheckpointError(f"cannot save concrete_args: {err}") from None
    return {
        "w_precisions": list(cfg.w_precisions), "a_precisions": list(cfg.a_precisions),
        "input_bits": cfg.input_bits, "sampling": model.sampling, "temperature": float(cfg.temperature),
        "exclude": _encode_modules("exclude", cfg.exclude),
        "leaf_modules": _encode_modules("leaf_modules", cfg.leaf_modules),
        "concrete_args": concrete, "integer_adds": cfg.integer_adds,
    }


def _decode_config(d: dict[str, Any]) -> SearchConfig:
    return SearchConfig(
        w_precisions=tuple(d["w_precisions"]), a_precisions=tuple(d["a_precisions"]),
        input_bits=d["input_bits"], sampling=d["sampling"], temperature=d["temperature"],
        exclude=_decode_modules(d["exclude"]), leaf_modules=_decode_modules(d["leaf_modules"]),
        concrete_args=d["concrete_args"], integer_adds=d.get("integer_adds", False))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode_inputs(model: SearchModel, example_shapes: Sequence[Any] | None) -> list[dict[str, Any]]:
    """[{"shape": [...], "dtype": "float32"}] per positional input."""
    metas = [n.meta.get("tensor_meta") for n in model.graph.nodes if n.op == "placeholder"]
    if example_shapes is None:
        if not metas or any(m is None or not hasattr(m, "shape") for m in metas):
            raise CheckpointError("cannot tell the example input shapes of this model; pass "
                                  "example_shapes=[(1, 3, 32, 32)] (one shape per input) to fxsearch.save")
        return [{"shape": list(m.shape), "dtype": _dtype_name(m.dtype)} for m in metas]
    if isinstance(example_shapes, torch.Tensor) or (example_shapes and isinstance(example_shapes[0], int)):
        example_shapes = [example_shapes]  # a single shape or tensor
    out = []
    for k, s in enumerate(example_shapes):
        if isinstance(s, torch.Tensor):
            shape, dtype = list(s.shape), s.dtype
        else:
            try:
                shape = [int(v) for v in s]
            except (TypeError, ValueError):
                raise CheckpointError(f"example_shapes[{k}] = {s!r} is not a shape; give a tuple of "
                                      "ints per input, e.g. [(1, 3, 32, 32)]") from None
            m = metas[k] if k < len(metas) else None
            dtype = m.dtype if m is not None and hasattr(m, "dtype") else torch.float32
        out.append({"shape": shape, "dtype": _dtype_name(dtype)})
    return out


def example_inputs_from(specs: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs of the stored shapes: randn for float types, zeros otherwise."""
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for spec in specs:
        dtype = getattr(torch, str(spec["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"unknown input dtype {spec['dtype']!r} in the checkpoint")
        shape = [int(s) for s in spec["shape"]]
        inputs.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                      else torch.zeros(shape, dtype=dtype))
    return tuple(inputs)


def _check_plain(value: Any, where: str) -> None:
    """Only what torch.load(weights_only=True) reads back: plain containers, scalars, tensors
    (exact types: a str or int subclass would be pickled as its class)."""
    if value is None or type(value) in (bool, int, float, str) or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple, torch.Size):
        for k, v in enumerate(value):
            _check_plain(v, f"{where}[{k}]")
        return
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise CheckpointError(f"{where} has key {k!r}; use string keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise CheckpointError(f"{where} holds a {type(value).__name__}, which a checkpoint cannot store "
                          "safely; use numbers, strings, lists, dicts and tensors (e.g. "
                          "optimizer.state_dict() is fine)")


# ---- rebuilding ------------------------------------------------------------------------------
def _model_dtype(model: torch.nn.Module) -> str:
    """The floating dtype of the model's parameters (float32 when it has none)."""
    return next((_dtype_name(p.dtype) for p in model.parameters() if p.is_floating_point()), "float32")


def _param_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"unknown parameter dtype {name!r} in the checkpoint")
    return dtype


def _rebuild(record: Mapping[str, Any]) -> tuple[SearchModel, tuple[torch.Tensor, ...]]:
    """A freshly converted search model with the checkpoint's structure (weights not loaded).
    The global RNG is left as it was (model factories draw initial weights from it)."""
    from .convert import convert
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = resolve_model_ref(record["model_ref"], record["model_kwargs"])
        model = model.to(_param_dtype(record.get("dtype", "float32")))
        config = _decode_config(record["config"])
        inputs = example_inputs_from(record["inputs"])
        costs = _decode_costs(record["costs"])
        sm = convert(model, inputs, config=config, cost=costs)
    return sm, inputs


def _state_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any],
                    stored: str = "the checkpoint", target: str = "the rebuilt model") -> str | None:
    """The first difference between two state layouts (missing key, unexpected key, shape), or None."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing:
        return f"key {missing[0]!r} of {target} is missing from {stored} ({len(missing)} missing in all)"
    if unexpected:
        return f"key {unexpected[0]!r} of {stored} is unexpected in {target} ({len(unexpected)} unexpected in all)"
    for k, t in expected.items():
        v = found[k]
        if not isinstance(v, torch.Tensor) or v.shape != t.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            return f"key {k!r} has shape {shape} in {stored} but {tuple(t.shape)} in {target}"
    return None


def _non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first floating tensor of a state holding NaN or Inf, described, or None."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"key {k!r} holds NaN or Inf values"
    return None


def save(
    search_model: SearchModel,
    path: str | os.PathLike,
    *,
    model_ref: str,
    model_kwargs: Mapping[str, Any] | None = None,
    example_shapes: Sequence[Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> None:
    """Save a search model so that ``fxsearch.load`` can rebuild it in another process.

    model_ref: how to build the seed model again: 'package.module:factory', 'torchvision:NAME'
    or a name of fxsearch.zoo; model_kwargs: its factory's kwargs (plain JSON data).
    example_shapes: one shape (or example tensor) per input; default: the shapes convert saw.
    extra: anything else to keep (epoch, lambda, optimizer state): plain containers and tensors.
    verify: rebuild the model from the reference now and check that it has the same state
    layout, so that a wrong reference fails at save time rather than at load time.
    The file is written atomically (temporary file + rename): on any error no partial file is
    left and an existing file at ``path`` keeps its old content.
    """
    if not isinstance(search_model, SearchModel):
        raise CheckpointError(f"fxsearch.save expects the SearchModel returned by fxsearch.convert, "
                              f"got {type(search_model).__name__}")
    path = os.fspath(path)
    try:
        resolve_factory(model_ref)
        model_kwargs = check_kwargs(model_kwargs)
    except ConfigError as err:
        raise CheckpointError(f"cannot save {path!r}: {err}") from err
    if extra is not None and not isinstance(extra, Mapping):
        raise CheckpointError(f"extra must be a dict, got {type(extra).__name__}")
    _check_plain(dict(extra or {}), "extra")
    state = {k: v.detach().cpu() for k, v in search_model.state_dict().items()}
    record = {
        "format": FORMAT, "version": VERSION, "torch_version": str(torch.__version__),
        "model_ref": model_ref, "model_kwargs": model_kwargs,
        "config": _encode_config(search_model), "costs": _encode_costs(search_model),
        "inputs": _encode_inputs(search_model, example_shapes),
        "training": bool(search_model.training), "dtype": _model_dtype(search_model),
        "state_dict": state, "extra": dict(extra) if extra is not None else {},
    }
    _check_plain(record, "the checkpoint")
    if _non_finite(state):
        raise CheckpointError(f"cannot save {path!r}: {_non_finite(state)} (the search diverged?); "
                              "save an earlier state")
    if verify:
        try:
            rebuilt, _ = _rebuild(record)
        except FxSearchError as err:
            raise CheckpointError(f"cannot save {path!r}: model {model_ref!r} cannot be rebuilt: "
                                  f"{type(err).__name__}: {err}") from err
        problem = _state_mismatch(rebuilt.state_dict(), state, "this search model", "the rebuilt one")
        if problem:
            raise CheckpointError(f"cannot save {path!r}: model {model_ref!r} with kwargs {model_kwargs} "
                                  f"does not rebuild this search model: {problem}; check model_ref and "
                                  "model_kwargs (or the example shapes)")
    torch_save_atomically(record, path, error=CheckpointError, what="checkpoint")


def _torch_load(path: str, map_location: Any, what: str) -> Any:
    """torch.load(weights_only=True) with every failure as a CheckpointError naming the path."""
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path!r} is a directory, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            raise CheckpointError(f"{what} {path!r} holds Python objects that are not loaded for safety "
                                  "(only tensors and plain containers are read): it is neither an fxsearch "
                                  "checkpoint nor a plain state_dict") from err
        raise CheckpointError(f"{what} {path!r} is corrupt or not a torch file ({err})") from err
    except Exception as err:  # a damaged file can make the unpickler raise almost anything
        raise CheckpointError(f"{what} {path!r} is truncated or corrupt ({type(err).__name__}: {first_line(err)})") from err


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state_dict file (``torch.save(model.state_dict(), path)``), read safely; a dict
    that wraps it under "state_dict" (common training checkpoints) is unwrapped."""
    path = os.fspath(path)
    state = _torch_load(path, "cpu", "weights file")
    if isinstance(state, dict) and state.get("format") == FORMAT:
        raise CheckpointError(f"{path!r} is an fxsearch checkpoint, not a state_dict; load it with "
                              "fxsearch.load (CLI: --checkpoint)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path!r} does not hold a state_dict (a dict name -> tensor)")
    return state


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load a state_dict file into ``model``; a mismatch names its first missing/unexpected key."""
    state = read_state_dict(path)
    problem = _state_mismatch(model.state_dict(), state, "the file", "the model")
    if problem:
        raise CheckpointError(f"weights file {os.fspath(path)!r} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state)


def _read(path: str, map_location: Any) -> dict[str, Any]:
    record = _torch_load(path, map_location, "checkpoint")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        what = "a dict of tensors (a plain state_dict?)" if isinstance(record, dict) else f"a {type(record).__name__}"
        raise CheckpointError(f"{path!r} is a torch file but not an fxsearch checkpoint: it holds {what} "
                              f"without the format tag {FORMAT!r}. Write checkpoints with fxsearch.save; "
                              "load a plain state_dict with model.load_state_dict")
    if record.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {record.get('version')!r}; this "
                              f"fxsearch reads version {VERSION}. Use the fxsearch version that wrote it")
    needed = ("model_ref", "model_kwargs", "config", "costs", "inputs", "state_dict")
    missing = [k for k in needed if k not in record]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing[0]!r}; the file is damaged")
    return record


def load(path: str | os.PathLike, *, map_location: Any = "cpu") -> SearchModel:
    """Rebuild a search model saved by ``fxsearch.save``: weights, choices, clip ranges,
    temperature, sampling mode and train/eval mode. ``map_location`` as in torch.load; a
    device moves the model there. What the file stored besides the model (model_ref,
    model_kwargs, input shapes, extra) is in ``model.meta[fxsearch.meta.CHECKPOINT]``."""
    path = os.fspath(path)
    record = _read(path, map_location)
    try:
        sm, _ = _rebuild(record)
    except CheckpointError:
        raise
    except Exception as err:  # a damaged record or a failing factory: either way, no model
        what = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"cannot rebuild the model of checkpoint {path!r} "
                              f"(model {record['model_ref']!r}): {what}") from err
    state = record["state_dict"]
    problem = _state_mismatch(sm.state_dict(), state) if isinstance(state, dict) else "the state is not a dict"
    if problem:
        raise CheckpointError(f"checkpoint {path!r} does not match the model it names "
                              f"({record['model_ref']!r}): {problem}")
    if _non_finite(state):
        raise CheckpointError(f"checkpoint {path!r}: {_non_finite(state)} (the search diverged?); "
                              "load an earlier checkpoint")
    sm.load_state_dict(state)
    sm.train(bool(record.get("training", False)))
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type != "cpu":
        sm.to(map_location)
    sm.meta[meta.CHECKPOINT] = {k: record.get(k) for k in ("model_ref", "model_kwargs", "inputs", "extra")}
    return sm

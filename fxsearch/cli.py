"""Pieces the command-line tools share (python -m fxsearch.export, .search, .inspect): argument
types, reading a model reference into a model and example inputs, and the main() wrapper that
turns errors into exit codes (0 ok, 1 failure with one `error: Type: message` line, 2 bad usage).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError, FxSearchError
from .files import json_text  # noqa: F401 (the CLIs' JSON format)

# ---- argument types ------------------------------------------------------------------------
def shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') -> (1, 3, 224, 224)."""
    try:
        sizes = tuple(int(v) for v in text.strip().split("," if "," in text else "x"))
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape; write positive sizes separated "
                                         "by commas, batch first, e.g. 1,3,224,224")
    return sizes


def positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def json_object(text: str) -> dict[str, Any]:
    """Factory kwargs given on the command line as a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"num_classes\": 10}}', got {text!r}")
    return value


def shape_str(sizes: Sequence[int]) -> str:
    return "x".join(str(s) for s in sizes)


# ---- models and inputs --------------------------------------------------------------------
def model_ref(text: str) -> str:
    """Bare torchvision names become torchvision:NAME; everything else as model_refs reads it
    (an unknown name raises ConfigError with close matches)."""
    from .model_refs import resolve_factory
    if ":" in text:
        return text
    try:
        resolve_factory(text)
        return text
    except ConfigError as err:
        import torchvision.models as tvm
        if text in tvm.list_models():
            return f"torchvision:{text}"
        raise ConfigError(f"{err}; name a built-in model, a torchvision model (resnet18 or "
                          "torchvision:resnet18) or package.module:factory") from None


def input_shapes(ref: str, given: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]] | None:
    """The --input-shape values, else the model's known shape, else None (the caller asks for
    --input-shape). An unknown reference raises ConfigError."""
    from .model_refs import default_input_shape
    if given:
        return [tuple(s) for s in given]
    known = default_input_shape(ref)
    return None if known is None else [known]


def example_inputs(shapes: Sequence[Sequence[int]], dtypes: Sequence[str] = ()) -> tuple[torch.Tensor, ...]:
    """Deterministic example inputs of these shapes (as checkpoints rebuild theirs)."""
    from .checkpoint import example_inputs_from
    return example_inputs_from([{"shape": list(s), "dtype": dtypes[k] if k < len(dtypes) else "float32"}
                                for k, s in enumerate(shapes)])


def build_model(ref: str, kwargs: dict[str, Any] | None = None, weights: str | None = None,
                seed: int = 0) -> torch.nn.Module:
    """The model a reference names, with initial weights drawn from ``seed`` or read from a
    state_dict file (weights_only)."""
    from .checkpoint import load_weights
    from .model_refs import resolve_model_ref
    torch.manual_seed(seed)
    model = resolve_model_ref(ref, kwargs)
    if weights:
        load_weights(model, weights)
    return model


# ---- main ------------------------------------------------------------------------------------
def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and call ``run``; usage errors exit 2, typed errors and OS errors print one
    `error: Type: message` line on stderr and return 1."""
    try:
        return run(parser.parse_args(argv))
    except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else 1
    except (FxSearchError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"error: {type(err).__name__}: {message}", file=sys.stderr)
        return 1

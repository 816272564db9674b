"""Trace pass: nn.Module -> GraphModule with shapes, through torch.fx symbolic tracing.

torch.nn modules (and torchvision's StochasticDepth) stay whole as leaves; the graph is
traced with the model in eval mode, i.e. the inference graph (train-only branches such as
auxiliary heads are not part of it); the mode the model had is restored on the result.
Code whose result nothing reads (a layer computed and never used) is dropped, so that the
search neither prices nor searches it: finalize would remove it anyway.
"""
from __future__ import annotations

import contextlib
import copy
import io
import sys
import traceback
from typing import Any, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from fxsearch.errors import TraceError, first_line

from .op_kinds import remove_dead_code


def _default_leaf_types() -> tuple[type, ...]:
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # torchvision is a dependency, but keep tracing usable without it
        return ()
    return (StochasticDepth,)


class _Tracer(torch.fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def _user_frame(err: BaseException) -> str:
    """The innermost stack frame of the traceback outside torch itself, as 'file:line: code'."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


def trace(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    leaf_modules: Sequence[Any] = (),
    concrete_args: dict[str, Any] | None = None,
) -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` (the user's model is never modified) and record shapes.

    leaf_modules holds module types or qualified names the tracer keeps whole.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        raise TraceError(
            "example_inputs must be a tuple of the model's positional inputs, "
            f"e.g. (torch.randn(1, 3, 32, 32),); got {type(example_inputs).__name__}"
        )
    model = copy.deepcopy(model)
    was_training = model.training
    model.eval()
    leaf_types = _default_leaf_types() + tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
    tracer = _Tracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:  # fx raises many types; all of them mean "cannot trace"
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}{_user_frame(err)}: "
            f"{type(err).__name__}: {err}. Way out: keep the module holding that code whole "
            "with leaf_modules=[ThatModule], fix the input that drives control flow with "
            "concrete_args={...}, or exclude that module."
        ) from err
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    remove_dead_code(gm)
    gm.recompile()
    propagate_shapes(gm, example_inputs)
    gm.train(was_training)
    return gm


class _NamedShapeProp(ShapeProp):
    """ShapeProp that says which node failed."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # our message already names the node

    def run_node(self, n: torch.fx.Node) -> Any:
        # ShapeProp prints the op's traceback to stderr before it re-raises: held back here
        # (the TraceError below says what failed), replayed where the node ran
        printed = io.StringIO()
        try:
            with contextlib.redirect_stderr(printed):
                result = super().run_node(n)
        except TraceError:
            raise
        except Exception as err:
            root = err
            while root.__cause__ is not None:  # ShapeProp wraps the op's own error
                root = root.__cause__
            raise TraceError(
                f"the traced graph fails at node {n.format_node()} on the example inputs: "
                f"{type(root).__name__}: {first_line(root)}. Check that example_inputs have the shape and "
                "dtype the model expects (a tuple with one tensor per positional input)."
            ) from err
        if printed.getvalue():
            sys.stderr.write(printed.getvalue())
        return result


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run the graph once on ``example_inputs`` and record ``node.meta['tensor_meta']``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [p.name for p in placeholders if not p.args]  # a placeholder's args hold its default
    if len(example_inputs) < len(required):
        raise TraceError(
            f"{len(example_inputs)} example inputs for a model with {len(required)} required inputs "
            f"({', '.join(required)}); pass one example per input, an input fixed by concrete_args "
            "included (with its fixed value)"
        )
    if len(example_inputs) > len(placeholders):
        raise TraceError(
            f"{len(example_inputs)} example inputs for a model with {len(placeholders)} inputs "
            f"({', '.join(p.name for p in placeholders)}); pass one tensor per input"
        )
    with torch.no_grad():
        _NamedShapeProp(gm).propagate(*example_inputs)

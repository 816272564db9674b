"""Absorb-ReLU pass: an unsigned activation quantizer clips at 0 itself, so the ReLU before it
is left out of the search graph.

clip(x, 0, a) = clip(relu(x), 0, a), so a ReLU whose only reader is an unsigned `q_` node
(ActSearch, lower bound fixed at 0) computes nothing the quantizer does not: each training
step saves a pass over the tensor each way (the memory stays: the quantizer keeps its input
for the backward where the ReLU kept its output).
Gradients are the same except at inputs exactly 0, where the ReLU's subgradient is taken as 1
instead of 0 (the quantizer passes gradients on [0, a]).

The `q_` node records the ReLU node in its meta (meta.ABSORBED_RELU); the finalize pass puts
it back (restore_relu), so finalized models, their exports and float twins keep every ReLU
(an nn.ReLU module comes back as F.relu: the search model keeps only the modules it calls).
An in-place ReLU is absorbed only where nobody else reads its input (it changes that input).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxsearch import meta

from .op_kinds import is_relu, mutates_input


class AbsorbReluPass(PassBase):
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        modules = dict(gm.named_modules())
        absorbed = 0
        for q in list(gm.graph.nodes):
            if q.meta.get(meta.ROLE) != "act_search" or modules[q.target].signed:
                continue
            relu = q.args[0]
            module = modules.get(relu.target) if relu.op == "call_module" else None
            if not is_relu(relu, module) or len(relu.users) != 1 or \
                    (mutates_input(relu, module) and len(relu.args[0].users) != 1):
                continue
            op, target, kwargs = relu.op, relu.target, dict(relu.kwargs)
            if module is not None:  # the search model keeps only the modules its graph calls
                op, target, kwargs = "call_function", F.relu, {"inplace": True} if module.inplace else {}
            q.meta[meta.ABSORBED_RELU] = {"op": op, "target": target, "kwargs": kwargs, "name": relu.name,
                                          "meta": dict(relu.meta)}
            q.replace_input_with(relu, relu.args[0])
            gm.graph.erase_node(relu)
            absorbed += 1
        if absorbed:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, absorbed > 0)


def restore_relu(gm: torch.fx.GraphModule, q: torch.fx.Node) -> None:
    """Put the ReLU a `q_` node absorbed back between it and its input (no-op if none);
    the caller recompiles."""
    relu = q.meta.pop(meta.ABSORBED_RELU, None)
    if relu is None:
        return
    x = q.args[0]
    with gm.graph.inserting_before(q):
        node = gm.graph.create_node(relu["op"], relu["target"], (x,), relu["kwargs"], name=relu["name"])
    node.meta.update(relu["meta"])
    q.replace_input_with(x, node)

"""integer_adds: the operands of residual adds quantized (search model, finalize, export),
and what it is for: onnxruntime runs every convolution of a ResNet in int8."""
from __future__ import annotations

import json
import operator
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import fxsearch
from fxsearch.errors import ConfigError
from fxsearch.exporters import export_onnx, verify_onnx
from fxsearch.exporters.verify import optimized_ops
from fxsearch.final_modules import FakeQuantAct
from fxsearch.search_modules import ActSearch
from fxsearch.zoo import resnet8

import models as M
from test_finalize import HIGH, calibrate, finalize_without_revival, force_choices
from test_search import TINY_RUN, cli

ADD_MODELS = [M.Residual, M.SubMulDiv, M.ConvNeXtLike]


def _add_quantizers(sm) -> list[str]:
    return [n for n, _ in sm.named_modules() if n.startswith("fxs_add.")]


def _operands(sm: torch.fx.GraphModule, targets=(operator.add, operator.sub, operator.iadd)):
    return [a for n in sm.graph.nodes if n.op == "call_function" and n.target in targets for a in n.args]


def test_residual_adds_read_their_operands_quantized():
    """An operand that layers read too goes through their (searched) quantizer; one that only
    the add reads gets a fixed 8-bit quantizer of its own."""
    x = M.example_input(4)
    sm = fxsearch.convert(M.Residual(), (x,), integer_adds=True)
    operands = _operands(sm)
    assert len(operands) == 4 and all(a.op == "call_module" for a in operands)
    quantizers = {a.target: sm.get_submodule(a.target) for a in operands}
    assert all(isinstance(q, ActSearch) for q in quantizers.values())
    # (precisions, signed): the identity shortcut is the stem's ReLU output, which b1_conv1 reads
    assert {n: (q.precisions, q.signed) for n, q in quantizers.items()} == {
        "fxs_add.b1_bn2": ((8,), True), "fxs_act.relu": ((2, 4, 8), False),
        "fxs_add.b2_bn2": ((8,), True), "fxs_add.b2_short": ((8,), True)}
    assert _add_quantizers(sm) == ["fxs_add.b1_bn2", "fxs_add.b2_bn2", "fxs_add.b2_short"]
    assert not any(sm.get_submodule(n).alpha.requires_grad for n in _add_quantizers(sm))
    assert not _add_quantizers(fxsearch.convert(M.Residual(), (x,)))


def test_add_quantizers_are_not_priced_and_change_no_choice():
    x = M.example_input(4)
    costs = {"size": "size", "bitops": "bitops", "mpic": "mpic"}
    plain = fxsearch.convert(M.Residual(), (x,), cost=costs)
    integer = fxsearch.convert(M.Residual(), (x,), cost=costs, integer_adds=True)
    for name, value in plain.costs.items():
        assert torch.equal(value, integer.costs[name]), name
    searched = lambda sm: sorted(n for n, p in sm.named_parameters() if "alpha" in n and p.requires_grad)
    assert searched(plain) == searched(integer)


def test_an_in_place_add_whose_tensor_is_read_elsewhere_stays_float():
    class SharedInplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1)
            self.fc = nn.Linear(12, 10)

        def forward(self, x):
            a = self.a(x)
            c = self.c(a)
            a.add_(self.b(x))
            return self.fc(torch.cat([a, c], 1).mean((2, 3)))

    x = M.example_input(4)
    model = SharedInplace().eval()
    sm = fxsearch.convert(model, (x,), integer_adds=True)
    assert not _add_quantizers(sm)
    reference = fxsearch.convert(model, (x,))
    with torch.no_grad():
        assert torch.equal(sm.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("model_cls", ADD_MODELS, ids=lambda c: c.__name__)
def test_finalize_is_exact_with_integer_adds(model_cls):
    """float64, 16-bit search precisions, 8-bit add operands: the finalized model (BatchNorm
    folded, channels removed) equals the search model; ties on the 8-bit grids are improbable
    in float64."""
    x = M.example_input(4).double()
    sm = fxsearch.convert(model_cls().double(), (x,), integer_adds=True, **HIGH)
    calibrate(sm, x)
    final = finalize_without_revival(sm, [(0.3, seed) for seed in range(20)])
    adds = [m for n, m in final.named_modules() if n.startswith("fxs_add.")]
    assert adds and all(isinstance(m, FakeQuantAct) and m.bits == 8 for m in adds)
    with torch.no_grad():
        want, got = tree_flatten(sm.eval()(x))[0], tree_flatten(final(x))[0]
        plain = fxsearch.convert(model_cls().double(), (x,), **HIGH)
        plain.load_state_dict(sm.state_dict(), strict=False)
        unquantized = tree_flatten(plain.eval()(x))[0]
    for g, w, u in zip(got, want, unquantized, strict=True):
        scale = float(w.abs().max())
        assert float((g - w).abs().max()) <= 1e-9 * scale
        assert float((w - u).abs().max()) > 1e-6 * scale  # the 8-bit operands did change the values


def _final(model, x, fraction=0.3):
    sm = fxsearch.convert(model, (x,), integer_adds=True)
    calibrate(sm, x)
    force_choices(sm, fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxsearch.finalize(sm)


@pytest.mark.parametrize("fmt", ["qdq", "packed"])
@pytest.mark.parametrize("model_cls", ADD_MODELS, ids=lambda c: c.__name__)
def test_export_quantizes_the_add_operands_and_agrees_with_onnxruntime(model_cls, fmt, tmp_path):
    x = M.example_input(4)
    final = _final(model_cls(), x)
    path = tmp_path / "m.onnx"
    model = export_onnx(final, path, (x,), format=fmt)
    report = verify_onnx(final, path, (x,))
    assert report.ok and report.over_one_lsb == 0.0, report.summary()
    graph = model.graph
    tags = {p.value for n in graph.node for p in n.metadata_props if p.key == "ai.fxsearch.quantizer"}
    adds = {n for n, m in final.named_modules() if n.startswith("fxs_add.")}
    assert adds and adds <= tags  # each add quantizer is in the file, found by name
    dq = {n.output[0]: p.value for n in graph.node for p in n.metadata_props if p.key == "ai.fxsearch.quantizer"}
    integer_adds = [n for n in graph.node if any(dq.get(i, "").startswith("fxs_add.") for i in n.input)]
    assert integer_adds
    for node in integer_adds:  # each reads both operands dequantized
        assert node.op_type in ("Add", "Sub") and set(node.input) <= set(dq), node.name
    assert not [n for n in graph.node if n.op_type == "Cast"]  # torch.onnx's placeholders are gone
    summary = json.loads({p.key: p.value for p in model.metadata_props}["ai.fxsearch.summary"])
    assert summary["format"] == fmt


def test_onnxruntime_runs_the_convolutions_feeding_residual_adds_in_int8(tmp_path):
    """ResNet-8 has 9 convolutions: without integer adds the stem, the 3 second convolutions
    of the blocks and the 2 projection shortcuts run in float; with them none does."""
    x = torch.randn(1, 3, 32, 32)
    ops = {}
    for integer in (False, True):
        sm = fxsearch.convert(resnet8(), (x,), integer_adds=integer)
        calibrate(sm, torch.randn(8, 3, 32, 32))
        force_choices(sm, 0.0)
        final = fxsearch.finalize(sm.eval())
        export_onnx(final, tmp_path / f"{integer}.onnx", (x,))
        assert verify_onnx(final, tmp_path / f"{integer}.onnx", (x,)).ok
        names = optimized_ops(tmp_path / f"{integer}.onnx")
        ops[integer] = (names.count("QLinearConv"), sum(n in ("Conv", "FusedConv") for n in names))
    assert ops[False] == (3, 6)
    assert ops[True] == (9, 0)


def test_option_is_checked_saved_and_reaches_the_cli(tmp_path):
    with pytest.raises(ConfigError, match="integer_adds must be True or False"):
        fxsearch.convert(M.Residual(), (M.example_input(),), integer_adds="yes")
    sm = fxsearch.convert(M.Residual(), (M.example_input(),), integer_adds=True)
    fxsearch.save(sm, tmp_path / "c.pt", model_ref="models:Residual")
    loaded = fxsearch.load(tmp_path / "c.pt")
    assert loaded.config.integer_adds and len(_add_quantizers(loaded)) == 3
    out = tmp_path / "run"
    done = cli(*TINY_RUN, "--baselines", "none", "--integer-adds", "--out", str(out))
    assert done.returncode == 0, done.stderr
    searched = fxsearch.load(out / "joint/lambda_2/search.pt")
    assert searched.config.integer_adds and _add_quantizers(searched)
    assert json.loads((out / "settings.json").read_text())["integer_adds"] is True

"""Bad inputs at every front door (convert, finalize, export, checkpoints, output paths): each
raises a typed fxsearch error whose message names the module, node, input or file at fault and
the way out, and leaves no file behind. Cases tested elsewhere (tests/test_convert.py: most
precision sets, a model with no searchable layer; tests/test_checkpoint.py: truncated, garbage
and foreign checkpoints) are not repeated here."""
from __future__ import annotations

import copy
import operator
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsearch
from fxsearch import (CheckpointError, ConfigError, ExportError, FinalizeError, TraceError,
                      UnsupportedModelError)
from fxsearch.search_modules import GroupChoice

import models as M


class Gate(nn.Module):
    """Control flow on a tensor value, inside a submodule: leaf_modules=[Gate] is the way out."""

    def forward(self, x):
        return x if x.mean() > 0 else -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean((2, 3)))


class FunctionalConv(nn.Module):
    """A convolution with a parameter, but no Conv2d module: nothing the search can rewrite."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight)


class Opaque(nn.Module):
    """A user module kept whole by the tracer: an op the channel analysis does not model."""

    def forward(self, x):
        return torch.cumprod(x, dim=1)


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 1)
        self.opaque = Opaque()

    def forward(self, x):
        return self.b(self.opaque(torch.sigmoid(self.a(x))))


def x_() -> torch.Tensor:
    return M.example_input(2)


def with_nan_weight():
    m = M.PlainChain()
    with torch.no_grad():
        m.conv2.weight[0, 0, 0, 0] = float("nan")
    return m


def with_inf_buffer():
    m = M.PlainChain()
    m.bn1.running_var[3] = float("inf")
    return m


def with_meta_param():
    m = M.PlainChain()
    m.conv2.to("meta")
    return m


def with_meta_buffer():
    m = M.PlainChain()
    m.bn2.register_buffer("calibration", torch.zeros(16, device="meta"))
    return m


# id, model factory, example inputs factory, convert options, error, fragments of the message
CONVERT_CASES = [
    ("control-flow", Gated, lambda: (x_(),), {}, TraceError,
     ["Gated", "x.mean() > 0", "leaf_modules", "concrete_args"]),
    ("too-few-inputs", M.PlainChain, lambda: (), {}, TraceError, ["0 example inputs", "(x)"]),
    ("integer-input", M.PlainChain, lambda: (x_().long(),), {}, TraceError,
     ["node %conv1", "long", "dtype"]),
    ("float64-input-float32-model", M.PlainChain, lambda: (x_().double(),), {}, TraceError,
     ["node %conv1", "double", "dtype"]),
    ("wrong-rank", M.PlainChain, lambda: (torch.randn(3, 8),), {}, TraceError, ["node %conv1", "shape"]),
    ("non-tensor-input", M.PlainChain, lambda: ("image",), {}, TraceError, ["node %conv1"]),
    ("nan-weight", with_nan_weight, lambda: (x_(),), {}, UnsupportedModelError,
     ["'conv2.weight'", "Conv2d 'conv2'", "1 NaN", "finite weights"]),
    ("inf-buffer", with_inf_buffer, lambda: (x_(),), {}, UnsupportedModelError,
     ["'bn1.running_var'", "BatchNorm2d 'bn1'", "1 Inf"]),
    ("nan-input", M.PlainChain, lambda: (torch.full((2, 3, 8, 8), float("nan")),), {}, TraceError,
     ["example_inputs[0]", "NaN", "finite"]),
    ("param-on-meta", with_meta_param, lambda: (x_(),), {}, UnsupportedModelError,
     ["Conv2d 'conv2' on meta", "Conv2d 'conv1' on cpu", "model.to('cpu')"]),
    ("buffer-on-meta", with_meta_buffer, lambda: (x_(),), {}, UnsupportedModelError,
     ["'bn2.calibration' of BatchNorm2d 'bn2' on meta", "one device"]),
    ("model-on-meta", lambda: M.PlainChain().to("meta"), lambda: (x_(),), {}, UnsupportedModelError,
     ["Conv2d 'conv1'", "meta device", "to_empty"]),
    ("model-and-input-on-meta", lambda: M.PlainChain().to("meta"), lambda: (x_().to("meta"),), {},
     UnsupportedModelError, ["Conv2d 'conv1'", "meta device"]),
    ("input-on-meta", M.PlainChain, lambda: (x_().to("meta"),), {}, TraceError,
     ["example_inputs[0] is on meta", "on cpu", "x.to('cpu')"]),
    ("functional-conv-only", FunctionalConv, lambda: (x_(),), {}, UnsupportedModelError,
     ["no searchable layer", "called as a module"]),
    ("w-precisions-none", M.PlainChain, lambda: (x_(),), {"w_precisions": None}, ConfigError,
     ["w_precisions", "sequence of integers"]),
    ("w-precisions-integral-float", M.PlainChain, lambda: (x_(),), {"w_precisions": (0, 8.0)}, ConfigError,
     ["8.0", "not an integer"]),
    ("w-precisions-nan", M.PlainChain, lambda: (x_(),), {"w_precisions": (0, float("nan"))}, ConfigError,
     ["nan", "not an integer"]),
    ("a-precisions-duplicate", M.PlainChain, lambda: (x_(),), {"a_precisions": (8, 4, 8)}, ConfigError,
     ["a_precisions", "duplicates"]),
    ("a-precisions-negative", M.PlainChain, lambda: (x_(),), {"a_precisions": (-4,)}, ConfigError,
     ["a_precisions holds -4"]),
    ("input-bits-non-integer", M.PlainChain, lambda: (x_(),), {"input_bits": 2.5}, ConfigError,
     ["input_bits", "2.5"]),
    ("option-misspelt", M.PlainChain, lambda: (x_(),), {"w_precision": (0, 8)}, ConfigError,
     ["no option 'w_precision'", "did you mean 'w_precisions'"]),
    ("exclude-misspelt", M.PlainChain, lambda: (x_(),), {"exclude": ("cnv1",)}, ConfigError,
     ["exclude names 'cnv1'", "no submodule of PlainChain", "did you mean 'conv1'"]),
    ("leaf-module-unknown", M.PlainChain, lambda: (x_(),), {"leaf_modules": ("backbone",)}, ConfigError,
     ["leaf_modules names 'backbone'", "named_modules()"]),
]


@pytest.mark.parametrize("model_fn, inputs_fn, options, error, fragments",
                         [c[1:] for c in CONVERT_CASES], ids=[c[0] for c in CONVERT_CASES])
def test_convert_refuses_with_a_typed_error_naming_the_culprit(model_fn, inputs_fn, options, error, fragments, capsys):
    model = model_fn()
    with pytest.raises(error) as info:
        fxsearch.convert(model, inputs_fn(), **options)
    assert isinstance(info.value, fxsearch.FxSearchError)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert "Traceback" not in capsys.readouterr().err  # the error alone, no traceback printed ahead of it


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, negate):
        return -self.conv(x) if negate else self.conv(x)


def test_numpy_integer_bit_widths_are_accepted_as_ints():
    import numpy as np
    sm = fxsearch.convert(M.PlainChain(), (x_(),), w_precisions=np.array([0, 4, 8]),
                          a_precisions=[np.int64(8)])
    assert sm.config.w_precisions == (0, 4, 8) and sm.config.a_precisions == (8,)
    assert all(type(b) is int for b in sm.config.w_precisions + sm.config.a_precisions)


def test_control_flow_ways_out_convert():
    sm = fxsearch.convert(Gated(), (x_(),), leaf_modules=[Gate])
    assert any(n.target == "gate" for n in sm.graph.nodes)  # kept whole, run as a module
    with pytest.raises(TraceError, match=r"1 example inputs .* \(x, negate_1\).*concrete_args included"):
        fxsearch.convert(Flagged(), (x_(),), concrete_args={"negate": True})
    sm = fxsearch.convert(Flagged(), (x_(), True), concrete_args={"negate": True})
    assert any(n.target is operator.neg for n in sm.graph.nodes)  # the branch taken, traced
    assert sm(x_(), True).shape == (2, 4, 6, 6)


@pytest.mark.parametrize("model_cls, layer, reason", [
    (M.UnknownOp, "a", "matmul (node matmul) is not modelled"),
    (WithOpaque, "a", "Opaque 'opaque' (node opaque) is not modelled"),
])
def test_unsupported_op_freezes_its_channels_with_the_reason(model_cls, layer, reason):
    x = x_()
    options = {"leaf_modules": [Opaque]} if model_cls is WithOpaque else {}
    sm = fxsearch.convert(model_cls(), (x,), **options)
    row = next(r for r in sm.layer_table() if r["layer"] == layer)
    assert row["frozen"] == row["out"] and row["reasons"] == [reason]
    assert reason in sm.summary()
    with torch.no_grad():  # frozen units never pick 0 bits, whatever the logits say
        for m in sm.modules():
            if isinstance(m, GroupChoice):
                m.alpha[0] = 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        final = fxsearch.finalize(sm)
    assert final.get_submodule(layer).weight.shape[0] == row["out"]
    final(x)


# ---- finalize ---------------------------------------------------------------------------------
def test_every_channel_of_a_group_at_zero_bits_keeps_one_and_warns(tmp_path):
    """Concat: conv a's 4 channels all at 0 bits would leave relu(a) empty; one survives, the
    warning names it, and the finalized model runs and exports."""
    x = x_()
    sm = fxsearch.convert(M.Concat(), (x,))
    with torch.no_grad():
        sm.fxs_choices.g0.alpha.copy_(torch.tensor([[100.0], [0.0], [0.0], [0.0]]).expand(4, 4))
        sm.fxs_choices.g0.alpha[2, 1] = 50.0  # below 0 bits, but the likeliest non-zero choice
    with pytest.warns(UserWarning, match="kept one channel .*group 0 unit 1"):
        final = fxsearch.finalize(sm)
    assert final.a.weight.shape[0] == 1 and final.a.w_bits.tolist() == [4]
    assert final.b.weight.shape[0] == 6 and final.c.weight.shape[1] == 7
    assert final(x).shape == (2, 10)
    fxsearch.export_onnx(final, tmp_path / "m.onnx", (x,))


def test_finalize_refuses_non_finite_search_state():
    sm = fxsearch.convert(M.PlainChain(), (x_(),))
    with torch.no_grad():
        sm.fxs_act.relu1.hi.fill_(float("nan"))
    with pytest.raises(FinalizeError, match="'fxs_act.relu1.hi' of ActSearch 'fxs_act.relu1' holds 1 NaN.*diverged"):
        fxsearch.finalize(sm)


def test_finalize_refuses_a_plain_module():
    with pytest.raises(FinalizeError, match="expects the SearchModel.*got PlainChain"):
        fxsearch.finalize(M.PlainChain())


def test_a_cost_model_giving_a_vector_is_a_config_error():
    sm = fxsearch.convert(M.PlainChain(), (x_(),), cost=lambda layer: layer.w_theta[0])
    with pytest.raises(ConfigError, match=r"cost model '<lambda>' gave layer 'conv1' a tensor of shape \(\d+,\).*\.sum\(\)"):
        sm.cost


# ---- export -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def final_and_x():
    torch.manual_seed(0)
    x = x_()
    return fxsearch.finalize(fxsearch.convert(M.PlainChain(), (x,))), x


def test_export_refuses_non_finite_weights(final_and_x, tmp_path):
    final, x = final_and_x
    final = copy.deepcopy(final)
    with torch.no_grad():
        final.fc.bias[3] = float("inf")
    with pytest.raises(ExportError, match="'fc.bias' of QuantLinear 'fc' holds 0 NaN and 1 Inf"):
        fxsearch.export_onnx(final, tmp_path / "m.onnx", (x,))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["qdq", "packed"])
def test_export_names_example_inputs_the_model_refuses(final_and_x, tmp_path, fmt, capfd):
    """A wrong input shape is named with the inputs and the CLI option, before torch.onnx's
    second exporter tries (and logs its own failure); nothing is written."""
    final, x = final_and_x
    with pytest.raises(ExportError, match=r"fails on the example inputs \(\(1, 3, 8\) torch.float32\).*--input-shape"):
        fxsearch.export_onnx(final, tmp_path / "m.onnx", (torch.randn(1, 3, 8),), format=fmt)
    assert os.listdir(tmp_path) == []
    assert capfd.readouterr().err == ""


def test_verify_names_a_missing_or_unreadable_file(final_and_x, tmp_path):
    final, x = final_and_x
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    for name, cause in (("missing.onnx", "FileNotFoundError"), ("junk.onnx", "DecodeError")):
        with pytest.raises(ExportError, match=f"cannot read ONNX file .*{name}.*{cause}"):
            fxsearch.verify_onnx(final, tmp_path / name, (x,))


# ---- unwritable output paths: nothing half-written ------------------------------------------
def _unwritable(tmp_path, kind: str):
    """A path that cannot be written, even by root: in a missing folder, under a regular file,
    or an existing directory."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    return {"missing-dir": tmp_path / "missing" / "out", "under-a-file": tmp_path / "file" / "out",
            "a-directory": tmp_path / "folder"}[kind]


def _listing(root) -> dict[str, bytes | None]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files} | \
        {os.path.relpath(os.path.join(d, s), root): None for d, subs, _ in os.walk(root) for s in subs}


KINDS = ["missing-dir", "under-a-file", "a-directory"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["qdq", "packed"])
def test_onnx_export_to_an_unwritable_path(final_and_x, tmp_path, kind, fmt):
    final, x = final_and_x
    path = _unwritable(tmp_path, kind)
    before = _listing(tmp_path)
    with pytest.raises(ExportError, match="cannot write ONNX file '.*(out|folder)"):
        fxsearch.export_onnx(final, path, (x,), format=fmt)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_save_to_an_unwritable_path(tmp_path, kind):
    sm = fxsearch.convert(M.PlainChain(), (x_(),))
    path = _unwritable(tmp_path, kind)
    before = _listing(tmp_path)
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        fxsearch.save(sm, path, model_ref="models:PlainChain", verify=False)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["under-a-file", "a-file"])
def test_search_run_dir_unwritable(tmp_path, kind, capsys):
    """(A missing run directory is created, parents too.)"""
    from fxsearch.search_cli import main
    out = _unwritable(tmp_path, "under-a-file")  # tmp_path/file/out
    out = out if kind == "under-a-file" else out.parent
    before = _listing(tmp_path)
    code = main(["--model", "dscnn", "--lambdas", "1", "--epochs", "1", "--warmup-epochs", "0",
                 "--finetune-epochs", "0", "--baselines", "", "--limit-train", "8", "--limit-eval", "8",
                 "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: ConfigError: ") and "--out" in err[0], err
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing-dir", "under-a-file"])
def test_export_cli_unwritable_output_or_report(tmp_path, kind, capsys):
    from fxsearch.export import main
    bad = _unwritable(tmp_path, kind)
    before = _listing(tmp_path)
    for args in (["-o", str(bad)], ["-o", str(tmp_path / "m.onnx"), "--report", str(bad)]):
        code = main(["--model", "models:PlainChain", "--input-shape", "1,3,8,8", "-q", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and err[0].startswith("error: ExportError: "), err
        assert str(bad) in err[0]
        assert _listing(tmp_path) == before


# ---- checkpoints: what tests/test_checkpoint.py does not cover --------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    sm = fxsearch.convert(M.PlainChain(), (x_(),))
    path = tmp_path_factory.mktemp("ck") / "c.pt"
    fxsearch.save(sm, path, model_ref="models:PlainChain")
    return sm, path


def _edited(path, tmp_path, edit):
    record = torch.load(path, weights_only=True)
    edit(record)
    torch.save(record, tmp_path / "edited.pt")
    return tmp_path / "edited.pt"


def _set(key, value):
    return lambda r: r.__setitem__(key, value)


def _nan_weight(r):
    r["state_dict"]["conv1.weight"][0] = float("nan")


def _negative_shape(r):
    r["inputs"][0]["shape"] = [-1, 3, 8, 8]


def _wrong_channels(r):
    r["inputs"][0]["shape"] = [2, 4, 8, 8]


@pytest.mark.parametrize("edit, fragments", [
    (_set("inputs", None), ["cannot rebuild", "models:PlainChain", "TypeError"]),
    (_negative_shape, ["cannot rebuild", "negative dimension"]),
    (_wrong_channels, ["cannot rebuild", "node %conv1"]),
    (_set("config", [0, 8]), ["cannot rebuild", "TypeError"]),
    (lambda r: r["config"].__setitem__("w_precisions", [0, -2]), ["cannot rebuild", "w_precisions holds -2"]),
    (_set("model_kwargs", [1]), ["cannot rebuild", "must be a dict"]),
    (_nan_weight, ["'conv1.weight' holds NaN or Inf", "earlier checkpoint"]),
], ids=["inputs-none", "negative-shape", "wrong-channels", "config-not-a-dict", "bad-precisions",
        "kwargs-not-a-dict", "nan-weight"])
def test_damaged_checkpoint_record(checkpoint, tmp_path, edit, fragments):
    _, path = checkpoint
    with pytest.raises(CheckpointError) as info:
        fxsearch.load(_edited(path, tmp_path, edit))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("content", ["empty", "onnx", "zip", "npy"])
def test_foreign_files_as_checkpoint(final_and_x, tmp_path, content):
    path = tmp_path / "c.pt"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "onnx":
        final, x = final_and_x
        fxsearch.export_onnx(final, path, (x,))
    elif content == "zip":
        import zipfile
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not a torch archive")
    else:
        import numpy as np
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    with pytest.raises(CheckpointError, match=f"checkpoint '{path}'"):
        fxsearch.load(path)


def test_save_refuses_non_finite_state(tmp_path):
    sm = fxsearch.convert(M.PlainChain(), (x_(),))
    with torch.no_grad():
        sm.fc.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="'fc.weight' holds NaN or Inf"):
        fxsearch.save(sm, tmp_path / "c.pt", model_ref="models:PlainChain", verify=False)
    assert os.listdir(tmp_path) == []

"""Property-based tests on random DAG models built from blocks (hypothesis).

A model is a *program*: a list of blocks, each reading earlier tensors (t0 is the input) and
writing new ones, then a head that feeds the tensors no block reads, flattened (torch.flatten,
or reshape with literal sizes) or pooled, to a Linear, or leaves some unused (dead code).
Blocks: conv + BatchNorm + activation (plain, strided, grouped), depthwise conv, element-wise
residual (add / sub / mul, with a 1x1 projection when shapes differ), concat, split / chunk /
slice, squeeze-excitation gate (torchvision's and MobileNetV3's), max / average pooling and
upsampling, channel shuffle, layer scale, channels-last Linear. ``repr(program)`` is the
program as text, so a failing example reads like code.

For every example: convert; random argmax choices with some channels at 0 bits; finalize
exact against the search model (16-bit trick of test_finalize.py) with the expected weight
shapes; at default precisions, the one-hot cost equals the cost counted on the finalized
model for three cost models, and the exported ONNX agrees with it in onnxruntime
(verify_onnx). CI runs 300 derandomized examples (under a minute on one core);
FXSEARCH_GENERATED_EXAMPLES=2000 runs more.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from torch.utils._pytree import tree_flatten

import fxsearch
from fxsearch.cost_models import count_cost
from fxsearch.exporters import export_onnx, verify_onnx

from test_finalize import HIGH, _expected_weight_numel, finalize_without_revival

settings.register_profile("generated-graphs", max_examples=int(os.environ.get("FXSEARCH_GENERATED_EXAMPLES", 300)),
                          deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile("generated-graphs")

ACTS = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish,
        "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
COSTS = ["size", "bitops", "mpic"]
SIZE = 8  # input height and width
BATCH = 2


# ---- blocks: a spec (what hypothesis draws and prints) and the module it builds -----------
@dataclasses.dataclass(frozen=True)
class Conv:
    src: int
    out: int
    k: int = 3
    stride: int = 1
    groups: int = 1
    bn: bool = True
    act: str = "relu"
    bias: bool = False

    def text(self) -> str:
        opts = [f"k{self.k}"] + [f"s{self.stride}"] * (self.stride > 1) + [f"g{self.groups}"] * (self.groups > 1)
        opts += ["bias"] * self.bias + ["bn"] * self.bn + [self.act] * (self.act != "none")
        return f"conv(t{self.src}, {self.out}, {', '.join(opts)})"

    def shapes(self, shapes):
        c, h = shapes[self.src]
        return [(self.out, (h - 1) // self.stride + 1)]

    def build(self, shapes):
        c = shapes[self.src][0]
        return _Seq(nn.Conv2d(c, self.out, self.k, self.stride, self.k // 2, groups=self.groups, bias=self.bias),
                    nn.BatchNorm2d(self.out) if self.bn else nn.Identity(), ACTS[self.act]())


@dataclasses.dataclass(frozen=True)
class Depthwise:
    src: int
    mult: int = 1
    bn: bool = True
    act: str = "relu6"

    def text(self) -> str:
        return f"depthwise(t{self.src}, x{self.mult}{', bn' * self.bn}, {self.act})"

    def shapes(self, shapes):
        c, h = shapes[self.src]
        return [(c * self.mult, h)]

    def build(self, shapes):
        c = shapes[self.src][0]
        return _Seq(nn.Conv2d(c, c * self.mult, 3, 1, 1, groups=c, bias=not self.bn),
                    nn.BatchNorm2d(c * self.mult) if self.bn else nn.Identity(), ACTS[self.act]())


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """a OP b, b through a 1x1 conv (strided if needed) when the shapes differ."""
    a: int
    b: int
    op: str = "add"
    project: bool = False

    def text(self) -> str:
        b = f"proj(t{self.b})" if self.project else f"t{self.b}"
        return f"{self.op}(t{self.a}, {b})"

    def shapes(self, shapes):
        return [shapes[self.a]]

    def build(self, shapes):
        (ca, ha), (cb, hb) = shapes[self.a], shapes[self.b]
        return _Elementwise(self.op, nn.Conv2d(cb, ca, 1, hb // ha, bias=False) if self.project else None)


@dataclasses.dataclass(frozen=True)
class Concat:
    srcs: tuple[int, ...]

    def text(self) -> str:
        return f"cat({', '.join(f't{s}' for s in self.srcs)})"

    def shapes(self, shapes):
        return [(sum(shapes[s][0] for s in self.srcs), shapes[self.srcs[0]][1])]

    def build(self, shapes):
        return _Concat()


@dataclasses.dataclass(frozen=True)
class Split:
    """torch.split by sizes, Tensor.chunk into n, or a channel slice [start:stop]."""
    src: int
    how: str
    sizes: tuple[int, ...] = ()   # split
    n: int = 2                    # chunk
    start: int = 0                # slice
    stop: int = 1

    def text(self) -> str:
        arg = {"split": list(self.sizes), "chunk": self.n, "slice": f"{self.start}:{self.stop}"}[self.how]
        return f"{self.how}(t{self.src}, {arg})"

    def shapes(self, shapes):
        c, h = shapes[self.src]
        if self.how == "split":
            return [(s, h) for s in self.sizes]
        if self.how == "chunk":
            return [(t.shape[1], h) for t in torch.empty(1, c).chunk(self.n, 1)]
        return [(self.stop - self.start, h)]

    def build(self, shapes):
        return _Split(self.how, self.sizes, self.n, self.start, self.stop, len(self.shapes(shapes)))


@dataclasses.dataclass(frozen=True)
class SqueezeExcite:
    """x * gate(fc2(relu(fc1(pool(x))))): torchvision's (adaptive pool, sigmoid) or
    MobileNetV3's (mean keepdim, hardsigmoid)."""
    src: int
    squeeze: int
    mobilenet: bool = False

    def text(self) -> str:
        return f"se{'_v3' * self.mobilenet}(t{self.src}, {self.squeeze})"

    def shapes(self, shapes):
        return [shapes[self.src]]

    def build(self, shapes):
        c = shapes[self.src][0]
        return _SE(c, self.squeeze, self.mobilenet)


@dataclasses.dataclass(frozen=True)
class Pool:
    """2x2 max or average pooling, or nearest upsampling by 2 ("up")."""
    src: int
    kind: str = "max"

    def text(self) -> str:
        return f"{self.kind}{'sample' if self.kind == 'up' else 'pool'}(t{self.src})"

    def shapes(self, shapes):
        c, h = shapes[self.src]
        return [(c, h * 2 if self.kind == "up" else h // 2)]

    def build(self, shapes):
        return _Seq({"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "up": nn.Upsample(scale_factor=2)}[self.kind])


@dataclasses.dataclass(frozen=True)
class ChannelsLast:
    """A pointwise Linear on channels-last data, as in ConvNeXt: permute, Linear, permute back."""
    src: int
    out: int
    act: str = "none"

    def text(self) -> str:
        return f"linear_nhwc(t{self.src}, {self.out}{', ' + self.act if self.act != 'none' else ''})"

    def shapes(self, shapes):
        return [(self.out, shapes[self.src][1])]

    def build(self, shapes):
        return _ChannelsLast(nn.Linear(shapes[self.src][0], self.out), ACTS[self.act]())


@dataclasses.dataclass(frozen=True)
class Shuffle:
    """Channel shuffle (view, transpose, view), or a learned per-channel scale (ConvNeXt's
    layer scale: a constant operand that finalize slices)."""
    src: int
    groups: int = 2

    def text(self) -> str:
        return f"shuffle(t{self.src}, {self.groups})" if self.groups else f"layer_scale(t{self.src})"

    def shapes(self, shapes):
        return [shapes[self.src]]

    def build(self, shapes):
        return _Shuffle(self.groups, shapes[self.src][0])


@dataclasses.dataclass(frozen=True)
class Program:
    blocks: tuple
    head: tuple[str, ...]    # per unread tensor: "flatten", "reshape" (literal sizes), "pool" or "unused"
    hidden: int              # hidden Linear width, 0 for none
    classes: int = 5

    def shapes(self):
        shapes = [(3, SIZE)]
        for b in self.blocks:
            shapes += b.shapes(shapes)
        return shapes

    def sources(self):
        return [s for b in self.blocks for s in _srcs(b)]

    def features(self):
        """(tensor, "flatten", "reshape" or "pool") for each tensor the head reads."""
        return [(i, how) for i, how in zip(self.leaves(), self.head) if how != "unused"]

    def leaves(self):
        read = set(self.sources())
        return [i for i in range(len(self.shapes())) if i not in read]

    def _repr_pretty_(self, printer, cycle) -> None:  # how hypothesis prints a failing example
        printer.text(repr(self))

    def __repr__(self) -> str:
        lines, t = [], 1
        for b in self.blocks:
            n = len(b.shapes(self.shapes()))
            lines.append(f"{', '.join(f't{t + i}' for i in range(n))} = {b.text()}")
            t += n
        feats = [f"{how}(t{i})" for i, how in self.features()]
        feats = feats[0] if len(feats) == 1 else f"cat({', '.join(feats)})"
        fc = f"linear(relu(linear({feats}, {self.hidden})), {self.classes})" if self.hidden \
            else f"linear({feats}, {self.classes})"
        unused = [f"t{i}" for i, how in zip(self.leaves(), self.head) if how == "unused"]
        lines += [f"(unused: {', '.join(unused)})"] * bool(unused)
        return "\n".join(["Program:", *(f"  {line}" for line in lines), f"  out = {fc}"])


def _srcs(b) -> tuple[int, ...]:
    if isinstance(b, Elementwise):
        return (b.a, b.b)
    return b.srcs if isinstance(b, Concat) else (b.src,)


# ---- modules ----------------------------------------------------------------------------
class _Seq(nn.Sequential):
    def forward(self, x):
        return (super().forward(x),)


class _Elementwise(nn.Module):
    def __init__(self, op: str, proj: nn.Module | None):
        super().__init__()
        self.op, self.proj = op, proj

    def forward(self, a, b):
        if self.proj is not None:
            b = self.proj(b)
        return ({"add": torch.add, "sub": torch.sub, "mul": torch.mul}[self.op](a, b),)


class _Concat(nn.Module):
    def forward(self, *xs):
        return (torch.cat(xs, 1),)


class _Split(nn.Module):
    def __init__(self, how, sizes, n, start, stop, pieces):
        super().__init__()
        self.how, self.sizes, self.n, self.start, self.stop = how, list(sizes), n, start, stop
        self.pieces = pieces  # fx cannot iterate the tuple split returns: index it

    def forward(self, x):
        if self.how == "slice":
            return (x[:, self.start:self.stop],)
        out = torch.split(x, self.sizes, 1) if self.how == "split" else x.chunk(self.n, 1)
        return tuple(out[i] for i in range(self.pieces))


class _SE(nn.Module):
    def __init__(self, c: int, squeeze: int, mobilenet: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.mobilenet = mobilenet

    def forward(self, x):
        if self.mobilenet:
            return (x * F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))),)
        return (x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))),)


class _ChannelsLast(nn.Module):
    def __init__(self, fc: nn.Linear, act: nn.Module):
        super().__init__()
        self.fc, self.act = fc, act

    def forward(self, x):
        return (self.act(self.fc(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2),)


class _Shuffle(nn.Module):
    def __init__(self, groups: int, c: int):
        super().__init__()
        self.groups = groups
        self.scale = None if groups else nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        if self.scale is not None:
            return (x * self.scale,)
        b, c, h, w = x.shape
        return (x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w),)


class Net(nn.Module):
    """Runs a Program: blocks in order over a list of tensors, then the head."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        shapes = [(3, SIZE)]
        blocks = []
        for b in program.blocks:
            blocks.append(b.build(shapes))
            shapes += b.shapes(shapes)
        self.blocks = nn.ModuleList(blocks)
        self.numel = [c * h * h for c, h in shapes]  # literal sizes for "reshape"
        feats = sum(shapes[i][0] * (shapes[i][1] ** 2 if how != "pool" else 1)
                    for i, how in program.features())
        width = program.hidden or program.classes
        self.fc = nn.Linear(feats, width)
        self.out = nn.Linear(width, program.classes) if program.hidden else None
        with torch.no_grad():  # BatchNorm as after training, negative factors too
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.normal_(1, 0.5)
                    m.bias.normal_(0, 0.3)
                    m.momentum = None  # calibrate() gives the statistics of its batch

    def calibrate(self, x: torch.Tensor) -> "Net":
        """BatchNorm statistics of real activations (on the float model: cheap)."""
        with torch.no_grad():
            self.train()(x)
        return self.eval()

    def forward(self, x):
        ts = [x]
        for spec, block in zip(self.program.blocks, self.blocks):
            ts.extend(block(*[ts[s] for s in _srcs(spec)]))
        feats = [ts[i].reshape(BATCH, self.numel[i]) if how == "reshape" else
                 torch.flatten(ts[i] if how == "flatten" else F.adaptive_avg_pool2d(ts[i], 1), 1)
                 for i, how in self.program.features()]
        y = self.fc(torch.cat(feats, 1) if len(feats) > 1 else feats[0])
        return self.out(F.relu(y)) if self.out is not None else y


# ---- the strategy -----------------------------------------------------------------------
@st.composite
def programs(draw, max_blocks: int = 8) -> Program:
    stem = Conv(0, draw(st.integers(2, 6)), 3, 1, 1, draw(st.booleans()), draw(st.sampled_from(list(ACTS))))
    shapes = [(3, SIZE), (stem.out, SIZE)]
    blocks = [stem]
    for _ in range(draw(st.integers(1, max_blocks - 1))):
        kind = draw(st.sampled_from(["conv", "depthwise", "elementwise", "concat", "split", "se", "pool",
                                     "shuffle", "linear"]))
        src = len(shapes) - 1 - draw(st.integers(0, len(shapes) - 1))  # the latest first
        c, h = shapes[src]
        if kind == "conv" or (kind == "pool" and h < 2) or (kind == "split" and c < 2):
            out = draw(st.integers(1, 6))
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0 and out % g == 0]))
            b = Conv(src, out, draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 1, 1, 2])) if h > 1 else 1,
                     groups, draw(st.booleans()), draw(st.sampled_from(list(ACTS))), draw(st.booleans()))
        elif kind == "depthwise":
            b = Depthwise(src, draw(st.sampled_from([1, 1, 2])), draw(st.booleans()),
                          draw(st.sampled_from(list(ACTS))))
        elif kind == "elementwise":
            same = [i for i, s in enumerate(shapes) if s == (c, h)]
            larger = [i for i, s in enumerate(shapes) if s[1] >= h]
            project = draw(st.booleans())
            other = draw(st.sampled_from(larger if project else same))
            b = Elementwise(src, other, draw(st.sampled_from(["add", "add", "sub", "mul"])), project)
        elif kind == "concat":
            same_h = [i for i, s in enumerate(shapes) if s[1] == h]
            b = Concat((src, *draw(st.lists(st.sampled_from(same_h), min_size=1, max_size=2))))
        elif kind == "split":
            how = draw(st.sampled_from(["split", "chunk", "slice"]))
            if how == "split":
                cuts = sorted(draw(st.sets(st.integers(1, c - 1), min_size=1, max_size=2)))
                b = Split(src, how, sizes=tuple(e - s for s, e in zip([0, *cuts], [*cuts, c])))
            elif how == "chunk":
                b = Split(src, how, n=draw(st.integers(2, min(c, 3))))
            else:
                start = draw(st.integers(0, c - 1))
                b = Split(src, how, start=start, stop=draw(st.integers(start + 1, c)))
        elif kind == "shuffle":
            b = Shuffle(src, draw(st.sampled_from([0] + [g for g in (2, 3) if c % g == 0 and c > g])))
        elif kind == "se":
            b = SqueezeExcite(src, draw(st.integers(1, 3)), draw(st.booleans()))
        elif kind == "linear":
            b = ChannelsLast(src, draw(st.integers(1, 6)), draw(st.sampled_from(list(ACTS))))
        else:
            b = Pool(src, draw(st.sampled_from(["max", "avg"] + ["up"] * (h < SIZE))))
        blocks.append(b)
        shapes += b.shapes(shapes)
    program = Program(tuple(blocks), (), 0)
    head = [draw(st.sampled_from(["flatten", "pool", "reshape", "pool", "unused"])) for _ in program.leaves()]
    if all(how == "unused" for how in head):
        head[-1] = "pool"
    return Program(tuple(blocks), tuple(head), draw(st.sampled_from([0, 0, 6])))


# ---- checks -----------------------------------------------------------------------------
def _finalize_quietly(sm: fxsearch.SearchModel, fraction: float, seed: int):
    """About ``fraction`` of the prunable units at 0 bits, halved on each retry, none at last."""
    return finalize_without_revival(sm, [(fraction / 2 ** a if a < 5 else 0.0, seed + a) for a in range(6)])


def _event(text: str) -> None:
    if currently_in_test_context():  # check_program also runs outside hypothesis
        event(text)


def _pruned(sm: fxsearch.SearchModel, final) -> int:
    """Weights removed from the searchable layers."""
    return sum(sm.get_submodule(n).weight.numel() - final.get_submodule(n).weight.numel() for n in sm.analysis.layers)


@given(program=programs(), fraction=st.sampled_from([0.2, 0.4, 0.6]), seed=st.integers(0, 2 ** 16))
@settings(PROFILE)
def test_generated_graph(program, fraction, seed, tmp_path_factory):
    check_program(program, fraction, seed, tmp_path_factory.mktemp("onnx"))


def check_program(program: Program, fraction: float, seed: int, directory) -> None:
    torch.manual_seed(seed)
    x = torch.randn(BATCH, 3, SIZE, SIZE)
    model = Net(program).calibrate(x)

    # structure: finalize exact against the search model, weights removed where expected
    sm = fxsearch.convert(model, (x,), **HIGH)
    final = _finalize_quietly(sm, fraction, seed)
    with torch.no_grad():
        want, got = tree_flatten(sm.eval()(x))[0], tree_flatten(final(x))[0]
    for w, g in zip(want, got):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= 1e-4 * w.abs().max().item() + 1e-6
    _event("16 bits: channels removed" if _pruned(sm, final) > 0 else "16 bits: nothing removed")
    modules = dict(final.named_modules())
    for name in sm.analysis.layers:
        assert modules[name].weight.numel() == _expected_weight_numel(sm, name), name

    # default precisions: one-hot cost == cost counted on the finalized model; ONNX agrees
    sm = fxsearch.convert(model, (x,), cost=COSTS)
    final = _finalize_quietly(sm, fraction, seed)
    _event("default: channels removed" if _pruned(sm, final) > 0 else "default: nothing removed")
    counted = count_cost(final, (x,), COSTS)
    for name in COSTS:
        assert abs(counted[name] - sm.discrete_cost(name)) <= 1e-9 * max(1.0, abs(counted[name])), name
    path = directory / "m.onnx"
    export_onnx(final, path, (x,))
    report = verify_onnx(final, path, (x,))
    assert report.weights_exact, report.summary()
    assert report.over_one_lsb == 0.0, report.summary()
    assert report.forced_error <= 1e-4 * report.output_scale + 1e-5, report.summary()
    assert report.ok, report.summary()  # and the free-running outputs within its loose bound

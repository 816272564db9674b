"""Cost models: hardware costs of a network as differentiable expectations over theta.

A cost model is a plain function of one ``CostLayer`` (one call of a searchable layer, with
expected quantities as tensors) returning that layer's share as a scalar; the network's cost
is the sum over its layers. The same functions price
  - a search model from its current thetas (``SearchModel.cost``, ``.costs``, ``cost_of``,
    ``discrete_cost``; the per-layer indices come from passes/cost.py), and
  - a finalized model from its real modules (``count_cost``),
so the cost at a one-hot theta equals the count of the finalized network exactly.

Built-in models (registry ``COST_MODELS``), with K = product of kernel sizes, g = groups,
C_in_eff = expected alive input channels, bits_c = sum_p theta[p, c] p, alive_c = 1 - theta[0, c],
HW_out = product of output spatial sizes (per sample):
  size        weight memory in bits, sum_l (C_in_eff / g) K sum_c bits_c (depthwise: K sum_c bits_c)
  size_bytes  the same in bytes
  params      expected number of weights, (C_in_eff / g) K sum_c alive_c (biases not counted)
  macs        (C_in_eff / g) K HW_out sum_c alive_c
  bitops      sum_a theta_a[a] a (C_in_eff / g) K HW_out sum_c bits_c
  mpic        cycles on the MPIC RISC-V core (METHOD.md table), see ``mpic``
  ne16        cycles on the GAP9 NE16 accelerator (analytical tile model), see ``ne16``
A module called several times counts its weights once (size, size_bytes, params) and its
operations at every call. Layers left out of the search (excluded, in float) are not priced.

Adding a model: write ``def my_cost(layer: CostLayer) -> Tensor`` from the fields below and
pass it to ``fxsearch.convert(..., cost=my_cost)`` (or ``cost={"mine": my_cost, "size": "size"}``),
or register a name with ``register_cost_model("mine", my_cost)`` (also usable as a decorator).
``CostModel(fn, detach_c_in=True)`` (or ``detached("size")``) prices with C_in_eff detached:
no gradient reaches a producer's pruning choice through its consumers (the reference's choice).

Thetas of the search model's cost: in eval mode (and for ``discrete_cost``) the one-hot argmax;
in train mode exactly what the forward pass uses for "softmax" (softmax(alpha / tau)) and
"hard" (one-hot forward, softmax gradient) sampling; for "gumbel" the expectation
softmax(alpha / tau), because a Gumbel sample is drawn anew at every forward. After
``SearchModel.fuse_quantizers()`` the train-mode cost runs compiled (values and gradients to
float rounding): within a forward as part of its choice side (fxsearch.fused_choices, whose
costs ``cost`` hands out while the choices are unchanged), elsewhere as one graph of its own; a
cost function that cannot be traced whole falls back to eager.
"""
from __future__ import annotations

import dataclasses
import math
import types
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import meta
from .errors import ConfigError, UnsupportedModelError
from .passes.op_kinds import SEARCHABLE_MODULES

FLOAT_BITS = 32  # activation bit-width assumed for inputs left in float (bitops)


# ---- the per-layer description every cost model reads ---------------------------------
_PRECISION_VECTORS: dict[tuple, torch.Tensor] = {}


def _expect(precisions: Sequence[int], theta: torch.Tensor) -> torch.Tensor:
    """sum_p theta[p] * p over dim 0, one product with the precisions as a vector (made once
    per device and dtype: no host-to-device copy per call)."""
    key = (tuple(precisions), theta.device, theta.dtype)
    if key not in _PRECISION_VECTORS:
        _PRECISION_VECTORS[key] = torch.tensor(precisions, dtype=theta.dtype, device=theta.device)
    return _PRECISION_VECTORS[key] @ theta


class LayerGeometry:
    """Sizes derived from a layer's ``kernel`` and ``out_spatial`` (for CostLayer and the cost
    pass's LayerSpec)."""
    kernel: tuple[int, ...]
    out_spatial: tuple[int, ...]

    @property
    def K(self) -> int:
        """Weights per output channel per input channel (1 for Linear)."""
        return math.prod(self.kernel)

    @property
    def hw_out(self) -> int:
        """Output positions per output channel (1 for Linear)."""
        return math.prod(self.out_spatial)


@dataclasses.dataclass(frozen=True)
class CostLayer(LayerGeometry):
    """One call of a searchable layer with its expected quantities."""

    name: str
    kind: str                            # "conv" or "linear"
    kernel: tuple[int, ...]              # kernel sizes, () for Linear
    groups: int
    depthwise: bool                      # one input channel per group: pruning drops whole groups
    in_channels: int                     # declared input channels of the module
    out_channels: int
    out_spatial: tuple[int, ...]         # sizes after channels (conv) / between batch and features (linear)
    w_precisions: tuple[int, ...]        # weight bit-widths, 0 = pruned
    w_theta: torch.Tensor                # (len(w_precisions), out_channels) probabilities
    c_in_eff: torch.Tensor               # () expected alive input channels
    a_precisions: tuple[int, ...] | None  # input activation bit-widths; None: input in float
    a_theta: torch.Tensor | None         # (len(a_precisions),) probabilities
    count_weights: bool = True           # False for later calls of a module called several times

    @property
    def bits(self) -> torch.Tensor:
        """(out_channels,) expected weight bits per output channel."""
        return _expect(self.w_precisions, self.w_theta)

    @property
    def alive(self) -> torch.Tensor:
        """(out_channels,) probability that each output channel is kept."""
        if 0 not in self.w_precisions:
            return torch.ones_like(self.w_theta[0])
        return 1 - self.w_theta[self.w_precisions.index(0)]

    def channels_at(self, bits: int) -> torch.Tensor:
        """Expected number of output channels at weight bit-width ``bits``."""
        return self.w_theta[self.w_precisions.index(bits)].sum()

    @property
    def in_per_group(self) -> torch.Tensor:
        """Expected input channels each output channel reads: C_in_eff / g (depthwise: 1)."""
        if self.depthwise:
            return torch.ones_like(self.c_in_eff)
        return self.c_in_eff if self.groups == 1 else self.c_in_eff / self.groups

    @property
    def act_choices(self) -> tuple[tuple[int, ...], torch.Tensor]:
        """(activation bit-widths, their probabilities); FLOAT_BITS for a float input."""
        if self.a_precisions is None:
            return (FLOAT_BITS,), torch.ones(1, dtype=self.w_theta.dtype, device=self.w_theta.device)
        return self.a_precisions, self.a_theta.to(self.w_theta.dtype)

    @property
    def act_bits(self) -> torch.Tensor:
        """Expected input activation bits."""
        return _expect(*self.act_choices)

    @property
    def macs_per_channel(self) -> torch.Tensor:
        return self.in_per_group * self.K * self.hw_out


# ---- built-in models ---------------------------------------------------------------------
def size(layer: CostLayer) -> torch.Tensor:
    """Weight memory in bits."""
    if not layer.count_weights:
        return layer.w_theta.new_zeros(())
    return layer.in_per_group * layer.K * layer.bits.sum()


def size_bytes(layer: CostLayer) -> torch.Tensor:
    """Weight memory in bytes."""
    return size(layer) / 8


def params(layer: CostLayer) -> torch.Tensor:
    """Expected number of weights (alive output channels times their fan-in)."""
    if not layer.count_weights:
        return layer.w_theta.new_zeros(())
    return layer.in_per_group * layer.K * layer.alive.sum()


def macs(layer: CostLayer) -> torch.Tensor:
    """Multiply-accumulates of one sample."""
    return layer.macs_per_channel * layer.alive.sum()


def bitops(layer: CostLayer) -> torch.Tensor:
    """MACs weighted by (activation bits x weight bits)."""
    return layer.act_bits * layer.macs_per_channel * layer.bits.sum()


# MACs per cycle of the MPIC core by (activation bits, weight bits), Ottavi et al. 2020.
MPIC_MACS_PER_CYCLE = {
    2: {2: 6.5, 4: 4.0, 8: 2.2},
    4: {2: 3.9, 4: 3.5, 8: 2.1},
    8: {2: 2.5, 4: 2.3, 8: 2.1},
}


def mpic_entry(bits: int) -> int:
    """The table entry a bit-width runs at: the next one up, 8 for anything above 8 (float too)."""
    return next((b for b in sorted(MPIC_MACS_PER_CYCLE) if bits <= b), max(MPIC_MACS_PER_CYCLE))


def mpic_throughput(a_bits: int, w_bits: int) -> float:
    """MACs per cycle of the MPIC core at activation bits ``a_bits`` and weight bits ``w_bits``."""
    return MPIC_MACS_PER_CYCLE[mpic_entry(a_bits)][mpic_entry(w_bits)]


def mpic(layer: CostLayer) -> torch.Tensor:
    """Cycles on MPIC: sum over (a, w) of theta_a[a] theta_w[w]-weighted MACs / throughput(a, w).

    0-bit channels cost nothing. Energy in the reference: cycles / 250 MHz x about 5.4 mW.
    """
    a_precisions, a_theta = layer.act_choices
    cycles_per_mac = layer.w_theta.new_zeros(())
    for w in layer.w_precisions:
        if w > 0:
            inv = sum(a_theta[j] / mpic_throughput(a, w) for j, a in enumerate(a_precisions))
            cycles_per_mac = cycles_per_mac + layer.channels_at(w) * inv
    return layer.macs_per_channel * cycles_per_mac


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """ceil in the forward pass, identity gradient (straight-through)."""
    return x + (torch.ceil(x) - x).detach()


# NE16 (GAP9) tile model constants, see ne16().
NE16_KO = 32          # output channels per job in 3x3 and 1x1 mode
NE16_KI = 16          # input channels per job
NE16_KD = 16          # channels per job in depthwise mode
NE16_TILE = 3         # output pixels per job along each of the two spatial dims
NE16_FIFO = 6         # cycles to fill the streamer / engine pipeline, per phase
NE16_PORT_BITS = 256  # memory port width, bits per cycle
NE16_INDEX = 2        # cycles to update the loop indices after each job
NE16_NQ = 9           # fixed cycles of the normalization-quantization phase (plus 1 per channel)
NE16_ACT_BITS = 8     # NE16 streams 8-bit activations


def _ne16_load(kernel: int) -> int:
    """Cycles to stream one input tile of NE16_KI channels: one port word per pixel."""
    pixels = (NE16_TILE + kernel - 1) ** 2
    return NE16_FIFO + pixels * math.ceil(NE16_KI * NE16_ACT_BITS / NE16_PORT_BITS)


def _ne16_streamout(channels: int) -> int:
    return 4 + NE16_TILE ** 2 * math.ceil(channels * NE16_ACT_BITS / NE16_PORT_BITS)


def _ne16_dense(c_in: torch.Tensor, c_out: torch.Tensor, bits: int, kernel: int) -> torch.Tensor:
    """Cycles of one 3x3 (kernel=3, weight-bit-serial) or 1x1 (kernel=1) pass over one output tile."""
    n_in, n_out = ceil_ste(c_in / NE16_KI), ceil_ste(c_out / NE16_KO)
    per_job = _ne16_load(kernel) + 2 * NE16_FIFO + NE16_INDEX   # load, weight offsets, matvec fill
    per_out_block = NE16_NQ + _ne16_streamout(NE16_KO)
    per_channel_bit = bits if kernel == 3 else 1                 # 1x1 mode: weight bits in parallel
    return n_out * (n_in * per_job + per_out_block) + c_out * (n_in * per_channel_bit + 1)


def _ne16_depthwise(channels: torch.Tensor, bits: int) -> torch.Tensor:
    """Cycles of one depthwise 3x3 pass over one output tile (NE16_KD channels per job)."""
    n_blocks = ceil_ste(channels / NE16_KD)
    per_block = _ne16_load(3) + 2 * NE16_FIFO + NE16_INDEX + NE16_NQ + _ne16_streamout(NE16_KD)
    return n_blocks * per_block + channels * (bits + 2)  # weight offsets + bit-serial matvec + scale


def _as_2d(sizes: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of a kernel or output: 1-d as (1, L), 3-d with the leading dims merged."""
    if not sizes:
        return 1, 1
    if len(sizes) == 1:
        return 1, sizes[0]
    return math.prod(sizes[:-1]), sizes[-1]


def ne16(layer: CostLayer) -> torch.Tensor:
    """Cycles on the GAP9 NE16 accelerator: an analytical tile model.

    NE16 computes one 3x3 tile of output pixels per job. Modes and blocking:
      3x3 mode   dense 3x3 convs, NE16_KO = 32 output x NE16_KI = 16 input channels per job,
                 weights bit-serial (the matrix-vector phase takes k * w_bits cycles for k
                 output channels);
      1x1 mode   dense 1x1 convs and Linear, same blocking, k cycles (weight bits in parallel);
      depthwise  depthwise 3x3, NE16_KD = 16 channels per job, bit-serial.
    Cycles of one output tile, with b = w_bits (3x3, depthwise) or 1 (1x1),
    n_in = ceil(C_in / 16), n_out = ceil(C_out / 32), n_dw = ceil(C / 16):
      dense      n_out * (n_in * (load + 2 * FIFO + 2) + 9 + stream) + C_out * (n_in * b + 1)
      depthwise  n_dw * (load + 2 * FIFO + 2 + 9 + stream) + C * (b + 2)
    where load = FIFO + one 256-bit port word per input pixel (25 in 3x3 mode, 9 in 1x1),
    FIFO = 6 (pipeline fill of the weight-offset and matrix-vector phases), 2 the index
    update, 9 + 1 per channel the normalization-quantization (32-bit scales on 4 multipliers),
    stream = 4 + 9 port words the stream-out of the 3x3 output pixels, and depthwise jobs pay
    1 cycle per channel for weight offsets. The layer: tiles = ceil(H / 3) ceil(W / 3) times
    the per-tile cycles; other kernels are split into floor(kh/3) floor(kw/3) 3x3 passes plus
    one 1x1 pass per leftover tap (depthwise: ceil(kh kw / 9) passes); Linear runs as a 1x1
    conv on a 1 x tokens map, 1-d convs on 1 x L, 3-d convs with depth merged into H; grouped
    convs as ``groups`` convs. NE16 streams 8-bit activations, so activation choices do not
    change the cycles. Channels with different weight bit-widths run as separate sub-layers
    (one per precision, as the packed export lays them out: a job has one weight bit-width);
    0-bit channels cost nothing. The block counts use straight-through ceil, so gradients
    reach C_in_eff and the channel counts; the cycles grow with channels and with weight bits
    (3x3 and depthwise modes; flat in 1x1 mode). In the soft phase each precision with a
    non-zero expected channel count pays at least one block, so the soft cost lies above the
    argmax one until theta sharpens. Not modelled: DMA, L1/L2 tiling, cluster overheads.
    """
    kh, kw = _as_2d(layer.kernel)
    h, w = _as_2d(layer.out_spatial) if layer.kind == "conv" else (1, layer.hw_out)
    tiles = math.ceil(h / NE16_TILE) * math.ceil(w / NE16_TILE)
    total = layer.w_theta.new_zeros(())
    for bits in layer.w_precisions:
        if bits == 0:
            continue
        channels = layer.channels_at(bits)
        if layer.depthwise:
            total = total + math.ceil(kh * kw / 9) * _ne16_depthwise(channels, bits)
        else:
            n3 = (kh // 3) * (kw // 3)
            n1 = kh * kw - 9 * n3
            c_in, c_out = layer.c_in_eff / layer.groups, channels / layer.groups
            per_group = (n3 * _ne16_dense(c_in, c_out, bits, 3) if n3 else 0) + \
                (n1 * _ne16_dense(c_in, c_out, bits, 1) if n1 else 0)
            total = total + layer.groups * per_group
    return tiles * total


# ---- registry ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CostModel:
    """A per-layer cost function, summed over layers; optionally with C_in_eff detached."""

    fn: Callable[[CostLayer], Any]
    name: str = ""
    detach_c_in: bool = False

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"a cost model must be a function of one CostLayer, got {self.fn!r}")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", type(self.fn).__name__))

    def __call__(self, layers: Iterable[CostLayer]) -> torch.Tensor:
        total = None
        for layer in layers:
            if self.detach_c_in:
                layer = dataclasses.replace(layer, c_in_eff=layer.c_in_eff.detach())
            value = torch.as_tensor(self.fn(layer), dtype=layer.w_theta.dtype, device=layer.w_theta.device)
            if value.numel() != 1:
                raise ConfigError(f"cost model {self.name!r} gave layer {layer.name!r} a tensor of shape "
                                  f"{tuple(value.shape)}; a cost model gives one number per layer (sum "
                                  "over its channels, e.g. .sum())")
            value = value.reshape(()) if value.dim() else value
            total = value if total is None else total + value
        return total if total is not None else torch.zeros(())


COST_MODELS: dict[str, CostModel] = {}


def register_cost_model(name: str, fn: Callable[[CostLayer], Any] | None = None, *,
                        detach_c_in: bool = False):
    """Register ``fn`` under ``name`` (``register_cost_model("x", f)`` or ``@register_cost_model("x")``)."""
    def add(f: Callable[[CostLayer], Any]) -> Callable[[CostLayer], Any]:
        COST_MODELS[name] = CostModel(f, name, detach_c_in)
        return f
    return add if fn is None else add(fn)


for _fn in (size, size_bytes, params, macs, bitops, mpic, ne16):
    register_cost_model(_fn.__name__, _fn)


def get_cost_model(name: str) -> CostModel:
    if name not in COST_MODELS:
        raise ConfigError(f"unknown cost model {name!r}; registered: {', '.join(COST_MODELS)} "
                          "(or pass a function of one CostLayer)")
    return COST_MODELS[name]


def detached(model: Any) -> CostModel:
    """The same cost model with C_in_eff detached (the reference's size cost)."""
    (name, cm), = resolve_costs(model).items()
    return dataclasses.replace(cm, name=f"{name}_detached", detach_c_in=True)


def _one(spec: Any, name: str | None = None) -> CostModel:
    if isinstance(spec, str):
        cm = get_cost_model(spec)
    elif isinstance(spec, CostModel):
        cm = spec
    elif callable(spec):
        cm = CostModel(spec)
    else:
        raise ConfigError(f"cost={spec!r}: give a cost model name ({', '.join(COST_MODELS)}), "
                          "a function of one CostLayer, a CostModel, or a dict name -> one of these")
    return cm if name is None else dataclasses.replace(cm, name=name)


def resolve_costs(spec: Any) -> dict[str, CostModel]:
    """Normalize a cost specification to an ordered dict name -> CostModel (first = main)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return {str(k): _one(v, str(k)) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        out: dict[str, CostModel] = {}
        for s in spec:
            out.update(resolve_costs(s))
        return out
    cm = _one(spec)
    return {cm.name: cm}


# ---- pricing a search model ---------------------------------------------------------------
def _choice_theta(choice: nn.Module, discrete: bool, dtype: torch.dtype | None) -> torch.Tensor:
    """Theta of a GroupChoice/ActSearch as the cost sees it (see the module docstring)."""
    logits = choice.logits()
    if discrete or not choice.training:
        theta = F.one_hot(logits.detach().argmax(0), logits.shape[0]).movedim(-1, 0)
    elif choice.sampling == "gumbel":
        theta = torch.softmax(logits / choice.temperature, dim=0)
    else:
        theta = choice.theta()
    return theta if dtype in (None, theta.dtype) else theta.to(dtype)


def take_units(t: torch.Tensor, units: torch.Tensor | int) -> torch.Tensor:
    """t[..., units] for units as LayerSpec.indices gives them (a count n: the first n, a view)."""
    if not isinstance(units, int):
        return t[..., units]
    return t if t.shape[-1] == units else t[..., :units]


def search_layers(model: torch.fx.GraphModule, discrete: bool = False) -> list[CostLayer]:
    """The CostLayers of a search model under its current thetas (float64 when discrete)."""
    specs = model.meta.get(meta.COST_LAYERS)
    if specs is None:
        raise ConfigError("this model has no cost description; build it with fxsearch.convert")
    dtype = torch.float64 if discrete else None
    thetas: dict[str, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}

    def module(name: str) -> nn.Module:  # each looked up once per call (a path walk each time)
        if name not in modules:
            modules[name] = model.get_submodule(name)
        return modules[name]

    def theta(name: str) -> torch.Tensor:
        if name not in thetas:
            thetas[name] = _choice_theta(module(name), discrete, dtype)
        return thetas[name]

    pruned: dict[tuple[str, Any], torch.Tensor] = {}

    def expected_pruned(name: str, units) -> torch.Tensor:
        """Expected number of 0-bit units among `units` of choice `name` (shared by the layers
        that read the same channels)."""
        key = (name, units if isinstance(units, int) else id(units))
        if key not in pruned:
            t = theta(name)
            pruned[key] = take_units(t[module(name).precisions.index(0)], units).sum()
        return pruned[key]

    layers = []
    for spec in specs:
        choice = module(spec.choice)
        w_theta = theta(spec.choice)
        unit_index, in_fixed, in_terms = spec.indices(w_theta.device)
        # C_in_eff = always-alive channels + the prunable ones less their expected pruned count
        c_in = float(in_fixed + sum(u if isinstance(u, int) else len(u) for _, u in in_terms))
        dead = [expected_pruned(name, units) for name, units in in_terms]
        c_in = c_in - sum(dead[1:], dead[0]) if dead else w_theta.new_full((), c_in)
        act = module(spec.act) if spec.act is not None else None
        layers.append(CostLayer(
            name=spec.name, kind=spec.kind, kernel=spec.kernel, groups=spec.groups,
            depthwise=spec.depthwise, in_channels=spec.in_channels, out_channels=spec.out_channels,
            out_spatial=spec.out_spatial, w_precisions=tuple(choice.precisions),
            w_theta=take_units(w_theta, unit_index), c_in_eff=c_in,
            a_precisions=tuple(act.precisions) if act is not None else None,
            a_theta=theta(spec.act) if act is not None else None,
            count_weights=spec.count_weights,
        ))
    return layers


def search_costs(model: torch.fx.GraphModule, names: Sequence[str | None] | None = None,
                 discrete: bool = False) -> dict[str, torch.Tensor]:
    """Named costs of a search model (None in ``names`` means the main one; default: all)."""
    models: dict[str, CostModel] = model.meta.get(meta.COST_MODELS) or {}
    if not models:
        raise ConfigError("no cost model was given; pass cost='size' (or a function, or a dict) "
                          "to fxsearch.convert")
    names = list(models) if names is None else [next(iter(models)) if n is None else n for n in names]
    for n in names:
        if n not in models:
            raise ConfigError(f"no cost model named {n!r} in this model; it has {', '.join(models)}")
    if not discrete:  # a fused training step's costs, else the compiled cost
        from .fused_choices import step_costs
        got = step_costs(model, tuple(names))
        if got is None and getattr(model, "fused_cost", False):
            got = _compiled_costs(model, tuple(names))
        if got is not None:
            return got
    return _price(model, tuple(names), discrete)


def _price(model: torch.fx.GraphModule, names: tuple[str, ...], discrete: bool = False) -> dict[str, torch.Tensor]:
    models = model.meta[meta.COST_MODELS]
    layers = search_layers(model, discrete)
    return {n: models[n](layers) for n in names}


# per model: torch.compile of a copy of _price's code. Dynamo keeps its compiled graphs on the
# code object, at most recompile_limit (8) of them, and each model needs its own (its guards
# name the model's modules), so one shared code object would go eager from the ninth model of
# a process on (a lambda sweep); None: the model's index caches are not filled yet.
_COMPILED_PRICE: "weakref.WeakKeyDictionary[torch.fx.GraphModule, Any]" = weakref.WeakKeyDictionary()


def _compiled_price() -> Callable:
    own = types.FunctionType(_price.__code__.replace(), _price.__globals__, _price.__name__, _price.__defaults__)
    return torch.compile(own, fullgraph=True)


def _compiled_costs(model: torch.fx.GraphModule, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    """search_costs in train mode as one compiled graph each way (SearchModel.fuse_quantizers):
    the few hundred small operations of the thetas and the per-layer sums become one loop
    forward and one backward. None where it does not apply (eval mode, no gradient, off the
    CPU, the model's first evaluation, which fills the caches the graph reads) or compiling
    failed (warned once; the model's cost stays eager from then on)."""
    if not (model.training and torch.is_grad_enabled()):
        return None
    if model not in _COMPILED_PRICE:
        _COMPILED_PRICE[model] = None
        return None
    specs = model.meta[meta.COST_LAYERS]
    if not specs or model.get_submodule(specs[0].choice).alpha.device.type != "cpu":
        return None
    if _COMPILED_PRICE[model] is None:
        _COMPILED_PRICE[model] = _compiled_price()
    try:
        return _COMPILED_PRICE[model](model, names)
    except Exception as err:  # no C++ compiler, a cost function dynamo cannot trace, ...
        model.fused_cost = False
        warnings.warn(f"fxsearch: the cost could not be compiled, computing it eagerly from now on "
                      f"({type(err).__name__}: {str(err)[:200]})")
        return None


# ---- counting a finalized model -----------------------------------------------------------
def _counted_layer(name: str, module: nn.Module, out_shape: tuple[int, ...], first: bool) -> CostLayer:
    conv = not isinstance(module, nn.Linear)
    c_out = module.out_channels if conv else module.out_features
    c_in = module.in_channels if conv else module.in_features
    w_bits = module.w_bits.detach().cpu().long().reshape(-1)
    if w_bits.numel() != c_out:
        raise UnsupportedModelError(
            f"layer '{name}' has {w_bits.numel()} entries in w_bits for {c_out} output channels; "
            "a finalized layer needs one weight bit-width per output channel")
    precisions = tuple(sorted(set(w_bits.tolist())))
    w_theta = (w_bits.unsqueeze(0) == torch.tensor(precisions).unsqueeze(1)).double()
    a_bits = getattr(module, "a_bits", None)
    a_bits = None if a_bits is None else int(a_bits)
    groups = module.groups if conv else 1
    return CostLayer(
        name=name, kind="conv" if conv else "linear",
        kernel=tuple(module.kernel_size) if conv else (), groups=groups,
        depthwise=groups > 1 and c_in == groups, in_channels=c_in, out_channels=c_out,
        out_spatial=tuple(out_shape[2:]) if conv else tuple(out_shape[1:-1]),
        w_precisions=precisions, w_theta=w_theta, c_in_eff=torch.tensor(float(c_in), dtype=torch.float64),
        a_precisions=None if a_bits is None else (a_bits,),
        a_theta=None if a_bits is None else torch.ones(1, dtype=torch.float64),
        count_weights=first,
    )


def final_layers(model: nn.Module, example_inputs: Sequence[Any]) -> list[CostLayer]:
    """CostLayers of a finalized model, one per call of each Conv/Linear that carries ``w_bits``.

    The contract (what finalize produces): every searched layer is an nn.Conv1d/2d/3d or
    nn.Linear with a LongTensor buffer ``w_bits`` (bits per output channel) and an attribute
    ``a_bits`` (int, or None for a float input). Output sizes come from one forward pass on
    ``example_inputs`` in eval mode (the model's mode is restored).
    """
    calls: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, SEARCHABLE_MODULES) and hasattr(module, "w_bits"):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: calls.append((name, m, tuple(out.shape)))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    seen: set[str] = set()
    layers = []
    for name, module, shape in calls:
        layers.append(_counted_layer(name, module, shape, name not in seen))
        seen.add(name)
    return layers


def count_cost(final_model: nn.Module, example_inputs: Sequence[Any],
               cost: Any = "size") -> float | dict[str, float]:
    """The cost of a finalized model counted from its real modules (weight shapes, groups,
    kernels, output sizes, ``w_bits``, ``a_bits``). ``cost`` as in ``fxsearch.convert``; a
    dict or list gives a dict name -> value, a single model a float."""
    models = resolve_costs(cost)
    if not models:
        raise ConfigError("count_cost needs a cost model, e.g. cost='size'")
    layers = final_layers(final_model, example_inputs)
    values = {n: float(m(layers)) for n, m in models.items()}
    return values if isinstance(cost, (dict, list, tuple)) else next(iter(values.values()))

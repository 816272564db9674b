"""Cost pass and cost models: hand-computed numbers, gradients, minimization, MPIC, NE16,
the ResNet-8 acceptance numbers, and counting from finalized modules (DESIGN invariant 4).

Notation in the derivations: size = sum_l (C_in_eff / g) * K * sum_c bits_c (depthwise:
K * sum_c bits_c). "Uniform" means every alpha is 0 in train mode (softmax, tau = 1), so a
prunable channel has theta = 1/4 on (0, 2, 4, 8): expected bits 3.5, alive 0.75; a frozen one
(model output) 1/3 on (2, 4, 8): 14/3 bits; a searched activation 1/3 on (2, 4, 8): 14/3 bits.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxsearch
from fxsearch import meta
from fxsearch.cost_models import (COST_MODELS, CostLayer, CostModel, count_cost, detached, mpic_entry,
                                  mpic_throughput, ne16, register_cost_model, search_layers, size)
from fxsearch.errors import ConfigError
from fxsearch.zoo import dscnn, resnet8

ALL = ["size", "size_bytes", "params", "macs", "bitops", "mpic", "ne16"]
# METHOD.md, MACs per cycle of MPIC by (activation bits, weight bits)
TABLE = {2: {2: 6.5, 4: 4.0, 8: 2.2}, 4: {2: 3.9, 4: 3.5, 8: 2.1}, 8: {2: 2.5, 4: 2.3, 8: 2.1}}


# ---- helpers ------------------------------------------------------------------------------
def convert(model, x, **kw):
    kw.setdefault("cost", ALL)
    return fxsearch.convert(model, (x,), **kw)


def uniform(sm):
    with torch.no_grad():
        for p in sm.arch_parameters():
            p.zero_()
    sm.train()
    return sm


def force(sm, layer, channel, bits):
    """Make the argmax of ``layer``'s output channel (its unit, so tied layers too) ``bits``."""
    info = sm.analysis.layers[layer]
    choice = sm.get_submodule(f"fxs_choices.g{info.group}")
    unit = int(info.unit_index[channel])
    with torch.no_grad():
        choice.alpha[:, unit] = -10.0
        choice.alpha[choice.precisions.index(bits), unit] = 10.0


def force_layer(sm, layer, bits):
    for c in range(sm.analysis.layers[layer].out_features):
        force(sm, layer, c, bits)


def cost_layer(name, sm_layers):
    return next(layer for layer in sm_layers if layer.name == name)


def with_bits(module, w_bits, a_bits=8):
    """Follow the finalized-model contract: a w_bits buffer and an a_bits attribute."""
    module.register_buffer("w_bits", torch.as_tensor(w_bits, dtype=torch.long))
    module.a_bits = a_bits
    return module


# ---- micro models ---------------------------------------------------------------------------
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        a = F.relu(self.conv0(x))
        y = F.relu(self.conv2(F.relu(self.conv1(a))) + a)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 2, 1)
        self.conv_b = nn.Conv2d(3, 3, 1)
        self.conv_c = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(torch.cat([self.conv_a(x), self.conv_b(x)], 1))
        y = F.relu(self.conv_c(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class FlattenLinear(nn.Module):
    def __init__(self, c=2):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, 3)

    def forward(self, x):  # x: 1x3x4x4
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


class Depthwise(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.dw(F.relu(self.conv0(x))))
        x = F.relu(self.pw(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.gconv(F.relu(self.conv0(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TwoPath(nn.Module):
    """conv1 -> conv2 -> head (output), plus skip(pool(x)) added to the output: head and skip
    are tied and frozen; skip reads the network input, so their bits keep a gradient even
    once everything prunable is gone."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.skip = nn.Linear(3, 4)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        pooled = lambda t: torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)  # noqa: E731
        return self.head(pooled(h)) + self.skip(pooled(x))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


# ---- hand-computed numbers --------------------------------------------------------------------
def test_chain_uniform_and_discrete():
    x = torch.randn(1, 3, 8, 8)
    sm = uniform(convert(Chain(), x))
    c = {k: v.item() for k, v in sm.costs.items()}
    # conv1: C_in 3 (network input), K 9, 4 ch x 3.5 = 14 bits -> 3*9*14 = 378
    # conv2: C_in_eff 4*0.75 = 3, K 1, 6 ch x 3.5 = 21 -> 63
    # fc (frozen): C_in_eff 6*0.75 = 4.5, 5 ch x 14/3 -> 105
    assert c["size"] == pytest.approx(378 + 63 + 105)
    assert c["size_bytes"] == pytest.approx(546 / 8)
    # params: 3*9*(4*.75) + 3*1*(6*.75) + 4.5*5*1 = 81 + 13.5 + 22.5
    assert c["params"] == pytest.approx(117)
    # macs: HW_out 64, 64, 1: 81*64 + 13.5*64 + 22.5
    assert c["macs"] == pytest.approx(5184 + 864 + 22.5)
    # bitops: 8*(3*9*64)*14 + 14/3*(3*64)*21 + 14/3*4.5*(5*14/3)
    assert c["bitops"] == pytest.approx(193536 + 18816 + 490)
    inv8 = sum(1 / TABLE[8][w] for w in (2, 4, 8))
    inv_u = sum(1 / 3 / TABLE[a][w] for a in (2, 4, 8) for w in (2, 4, 8))
    # mpic: per layer MACs/channel x expected channels at w (1, 1.5, 5/3) x 1/throughput
    assert c["mpic"] == pytest.approx(1728 * 1 * inv8 + 192 * 1.5 * inv_u + 4.5 * 5 / 3 * inv_u)

    sm = convert(Chain(), x).eval()  # argmax: the initialisation favours 8 bits everywhere
    # 8 * (3*9*4 + 4*1*6 + 6*5) = 8 * 162
    assert float(sm.cost) == sm.discrete_cost() == 1296
    # macs: 3*9*64*4 + 4*64*6 + 6*5
    assert sm.discrete_cost("macs") == 6912 + 1536 + 30


def test_residual_add():
    sm = convert(Residual(), torch.randn(1, 3, 8, 8))
    assert sorted(sm.analysis.layers["conv0"].unit_index.tolist()) == [0, 1, 2, 3]
    force(sm, "conv0", 0, 0)          # prunes conv0[0] and the tied conv2 channel
    force_layer(sm, "conv1", 4)
    # conv0: 3*9*(3*8) = 648; conv1: C_in_eff 3, 3*9*(4*4) = 432;
    # conv2: C_in_eff 4, 4*9*(3*8) = 864; fc: C_in_eff 3, 3*(2*8) = 48
    assert sm.discrete_cost() == 648 + 432 + 864 + 48
    layers = {layer.name: layer for layer in search_layers(sm, discrete=True)}
    assert float(layers["fc"].c_in_eff) == 3 and float(layers["conv2"].c_in_eff) == 4


def test_concat_offsets():
    sm = convert(Concat(), torch.randn(1, 3, 8, 8))
    spec = next(s for s in sm.meta[meta.COST_LAYERS] if s.name == "conv_c")
    ga, gb = (sm.analysis.layers[n].group for n in ("conv_a", "conv_b"))
    assert spec.in_group.tolist() == [ga, ga, gb, gb, gb]
    soft = search_layers(uniform(convert(Concat(), torch.randn(1, 3, 8, 8))))
    assert cost_layer("conv_c", soft).c_in_eff.item() == pytest.approx(5 * 0.75)
    force(sm, "conv_a", 0, 0)
    force(sm, "conv_b", 1, 0)
    # conv_a 3*1*8 = 24; conv_b 3*(2*8) = 48; conv_c C_in_eff 5-2 = 3: 3*(4*8) = 96; fc 4*(2*8) = 64
    assert sm.discrete_cost() == 24 + 48 + 96 + 64


def test_flatten_to_linear_and_count():
    x = torch.randn(1, 3, 4, 4)
    sm = convert(FlattenLinear(), x)
    # the Linear sees 2 channels x 16 positions: one flatten block per channel
    soft = search_layers(uniform(convert(FlattenLinear(), x)))
    assert cost_layer("fc", soft).c_in_eff.item() == pytest.approx(32 * 0.75)
    force(sm, "conv", 1, 0)
    # conv: 3*9*(1*8) = 216; fc: C_in_eff 16 -> 16*(3*8) = 384
    assert sm.discrete_cost() == 216 + 384
    # macs: conv 3*9*16*1 = 432; fc 16*3 = 48
    assert sm.discrete_cost("macs") == 432 + 48
    # the same network with channel 1 removed for real, following the finalize contract
    final = FlattenLinear(c=1)
    with_bits(final.conv, [8], a_bits=8)
    with_bits(final.fc, [8, 8, 8], a_bits=8)
    for name in ALL:
        assert count_cost(final, (x,), name) == pytest.approx(sm.discrete_cost(name), rel=1e-12)


def test_depthwise_and_count():
    x = torch.randn(1, 3, 8, 8)
    sm = convert(Depthwise(), x)
    # depthwise: K * sum_c bits_c, no input-channel factor: 9 * 4 * 3.5 = 126
    soft = search_layers(uniform(convert(Depthwise(), x)))
    assert size(cost_layer("dw", soft)).item() == pytest.approx(126)
    force(sm, "conv0", 2, 0)  # the depthwise channel 2 goes with it
    # conv0 3*(3*8) = 72; dw 9*(3*8) = 216; pw C_in_eff 3: 3*(5*8) = 120; fc 5*(2*8) = 80
    assert sm.discrete_cost() == 72 + 216 + 120 + 80
    final = Depthwise(c=3)
    for m, bits in ((final.conv0, 3), (final.dw, 3), (final.pw, 5), (final.fc, 2)):
        with_bits(m, [8] * bits, a_bits=8)
    for name in ALL:
        assert count_cost(final, (x,), name) == pytest.approx(sm.discrete_cost(name), rel=1e-12)


def test_grouped_conv():
    sm = convert(Grouped(), torch.randn(1, 3, 8, 8))
    force(sm, "conv0", 0, 0)  # the same in-group position goes in both groups: channels 0 and 4
    assert sm.analysis.layers["conv0"].unit_index[0] == sm.analysis.layers["conv0"].unit_index[4]
    # conv0 3*(6*8) = 144; gconv (6/2)*9*(8*8) = 1728; fc 8*(2*8) = 128
    assert sm.discrete_cost() == 144 + 1728 + 128


def test_shared_module_weights_once_operations_per_call():
    x = torch.randn(1, 4, 5, 5)
    sm = convert(Shared(), x)
    assert [s.count_weights for s in sm.meta[meta.COST_LAYERS]] == [True, False]
    assert sm.discrete_cost() == 4 * 9 * 4 * 8        # the weights exist once
    assert sm.discrete_cost("macs") == 2 * 4 * 9 * 25 * 4


# ---- gradients -------------------------------------------------------------------------------
def consumer_size(layer: CostLayer) -> torch.Tensor:
    """Size of conv2 alone: it depends on conv1's choice only through C_in_eff."""
    return size(layer) if layer.name == "conv2" else layer.w_theta.new_zeros(())


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_through_c_in_eff(detach):
    cost = CostModel(consumer_size, detach_c_in=detach)
    sm = convert(Chain(), torch.randn(1, 3, 8, 8), cost=cost)
    sm.train()
    sm.cost.backward()
    producer = sm.get_submodule(f"fxs_choices.g{sm.analysis.layers['conv1'].group}").alpha.grad
    own = sm.get_submodule(f"fxs_choices.g{sm.analysis.layers['conv2'].group}").alpha.grad
    assert torch.isfinite(own).all() and own.abs().sum() > 0
    if detach:
        assert producer is None or float(producer.abs().sum()) == 0
    else:
        assert torch.isfinite(producer).all() and float(producer.abs().sum()) > 0
        # more pruning of conv1 (row 0) makes conv2 smaller: the gradient on alpha[0] is negative
        assert (producer[0] < 0).all()


def test_detached_helper_and_all_gradients_finite():
    costs = {"size": "size", "ref": detached("size"), **{n: n for n in ALL}}
    sm = convert(Residual(), torch.randn(1, 3, 8, 8), cost=costs)
    assert list(sm.costs)[:2] == ["size", "ref"]
    sm.train()
    for name in ALL:
        sm.zero_grad()
        sm.cost_of(name).backward()
        grads = [p.grad for p in sm.arch_parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name


def test_theta_policy_per_sampling_mode():
    x = torch.randn(1, 3, 8, 8)
    sm = convert(Residual(), x)
    sm.train()
    with torch.no_grad():
        for p in sm.arch_parameters():
            p.normal_()
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
             for n, m in sm.fxs_choices.named_children()]
    sm(x)
    for h in hooks:
        h.remove()
    layers = search_layers(sm)
    for layer in layers:  # softmax: the cost sees the very thetas of the forward pass
        info = sm.analysis.layers[layer.name]
        assert torch.equal(layer.w_theta, seen[f"g{info.group}"][:, info.unit_index])
    soft = sm.cost.item()
    sm.sampling = "gumbel"  # the expectation, not a fresh sample: deterministic
    assert sm.cost.item() == pytest.approx(soft) and sm.cost.item() == pytest.approx(soft)
    sm.sampling = "hard"    # one-hot forward value, softmax gradient
    cost = sm.cost
    assert cost.item() == sm.discrete_cost()
    cost.backward()
    assert sum(float(p.grad.abs().sum()) for p in sm.arch_parameters() if p.grad is not None) > 0
    sm.eval()
    assert float(sm.cost) == sm.discrete_cost()


# ---- minimizing the cost alone ------------------------------------------------------------------
def minimize(sm, steps=300, lr=0.5):
    sm.train()
    opt = torch.optim.SGD(sm.arch_parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        torch.log(sm.cost).backward()  # log: every layer's share stays visible as others vanish
        opt.step()
    return {r["layer"]: {b: n for b, n in r["bits"].items() if n} for r in sm.layer_table()}


@pytest.mark.parametrize("cost", ["size", "bitops", "mpic", "ne16"])
def test_minimizing_cost_reaches_cheapest(cost):
    sm = convert(TwoPath(), torch.randn(2, 3, 8, 8), cost=cost)
    bits = minimize(sm)
    assert bits["conv1"] == {0: 8} and bits["conv2"] == {0: 8}
    if cost != "ne16":  # NE16 runs Linear in 1x1 mode, whose cycles do not depend on the bits
        assert bits["head"] == {2: 4} and bits["skip"] == {2: 4}
    if cost in ("bitops", "mpic"):
        acts = {n: int(m.argmax_bits()) for n, m in sm.fxs_act.named_children()}
        assert acts.pop("x") == 8 and set(acts.values()) == {2}
    # left: skip at 2 bits, 3 inputs x 4 outputs x 2 bits (head reads only pruned channels)
    assert cost != "size" or sm.discrete_cost() == 24


# ---- MPIC and NE16 -------------------------------------------------------------------------------
def test_mpic_table_and_mapping():
    assert {a: {w: mpic_throughput(a, w) for w in (2, 4, 8)} for a in (2, 4, 8)} == TABLE
    assert [mpic_entry(b) for b in (1, 2, 3, 4, 5, 8, 16, 32)] == [2, 2, 4, 4, 8, 8, 8, 8]
    x = torch.randn(1, 10)
    for a_bits, entry in ((2, 2), (4, 4), (8, 8), (3, 4), (1, 2), (16, 8), (None, 8)):
        fc = with_bits(nn.Linear(10, 4), [2, 4, 8, 8], a_bits=a_bits)
        # 10 MACs per output channel: 1 at w2, 1 at w4, 2 at w8
        expected = 10 * (1 / TABLE[entry][2] + 1 / TABLE[entry][4] + 2 / TABLE[entry][8])
        assert count_cost(fc, (x,), "mpic") == pytest.approx(expected, rel=1e-12)


def one_hot_layer(kernel, c_in, c_out, bits, out_spatial, groups=1, depthwise=False, kind="conv"):
    w_theta = torch.zeros(2, c_out, dtype=torch.float64)
    w_theta[1] = 1
    return CostLayer("l", kind, kernel, groups, depthwise, c_in, c_out, out_spatial, (0, bits), w_theta,
                     torch.tensor(float(c_in), dtype=torch.float64), (8,), torch.ones(1, dtype=torch.float64))


def test_ne16_hand_values():
    # 3x3, 16 -> 32, 8 bits, 3x3 output: one tile, one input and one output block:
    # job = load (6 + 25 pixels) + 2 * FIFO 6 + index 2 = 45; output block = NQ 9 + stream-out (4 + 9) = 22;
    # per channel n_in * 8 bits + 1 (scale) = 9 -> 45 + 22 + 32 * 9 = 355
    assert float(ne16(one_hot_layer((3, 3), 16, 32, 8, (3, 3)))) == 355
    # 1x1, 32 -> 64, 2 bits, 6x6 output: 4 tiles; n_in 2, n_out 2; job = (6 + 9) + 12 + 2 = 29
    # tile: 2 * (2 * 29 + 22) + 64 * (2 * 1 + 1) = 352 -> 4 * 352
    assert float(ne16(one_hot_layer((1, 1), 32, 64, 2, (6, 6)))) == 4 * 352
    # depthwise 3x3, 16 channels, 4 bits, 3x3 output: block 31 + 12 + 2 + 9 + 13 = 67; 16 * (4 + 2)
    assert float(ne16(one_hot_layer((3, 3), 16, 16, 4, (3, 3), groups=16, depthwise=True))) == 67 + 96


@pytest.mark.parametrize("kind,kernel,depthwise", [
    ("conv", (3, 3), False), ("conv", (1, 1), False), ("conv", (5, 5), False),
    ("conv", (3, 3), True), ("linear", (), False)])
def test_ne16_monotone_in_channels_and_bits(kind, kernel, depthwise):
    spatial = (7, 5) if kind == "conv" else ()

    def cycles(c_in, c_out, bits):
        c_in = c_out if depthwise else c_in
        return float(ne16(one_hot_layer(kernel, c_in, c_out, bits, spatial, groups=c_in if depthwise else 1,
                                        depthwise=depthwise, kind=kind)))

    for bits in (2, 4, 8):
        by_out = [cycles(24, c, bits) for c in range(1, 80)]
        assert all(b > a for a, b in zip(by_out, by_out[1:]))
        if not depthwise:  # (depthwise: input channel = output channel)
            by_in = [cycles(c, 40, bits) for c in range(1, 80)]
            assert all(b >= a for a, b in zip(by_in, by_in[1:])) and by_in[-1] > by_in[0]
    by_bits = [cycles(40, 40, b) for b in (2, 4, 8)]
    if kernel == (1, 1) or kind == "linear":
        assert by_bits[0] == by_bits[1] == by_bits[2]  # 1x1 mode: weight bits in parallel
    else:
        assert by_bits[0] < by_bits[1] < by_bits[2]    # weight-bit-serial modes


def test_ne16_gradient_is_finite_and_nonzero():
    sm = uniform(convert(Depthwise(), torch.randn(1, 3, 8, 8), cost="ne16"))
    sm.cost.backward()
    grads = [p.grad for p in sm.arch_parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


# ---- API ---------------------------------------------------------------------------------------
def test_cost_specs():
    x = torch.randn(1, 3, 8, 8)
    assert list(convert(Chain(), x, cost="macs").costs) == ["macs"]
    assert list(convert(Chain(), x, cost=consumer_size).costs) == ["consumer_size"]
    sm = convert(Chain(), x, cost={"mem": "size", "mine": lambda layer: layer.K})
    assert list(sm.costs) == ["mem", "mine"]
    assert sm.cost_of("mine").item() == 9 + 1 + 1   # kernel products of conv1, conv2, fc
    assert sm.discrete_cost() == sm.discrete_cost("mem") == 1296
    with pytest.raises(ConfigError):
        convert(Chain(), x, cost="nope")
    with pytest.raises(ConfigError):
        sm.cost_of("nope")
    with pytest.raises(ConfigError):
        convert(Chain(), x, cost=None).cost
    try:
        @register_cost_model("weights_x2")
        def weights_x2(layer):
            return 2 * size(layer)
        assert convert(Chain(), x, cost="weights_x2").discrete_cost() == 2 * 1296
    finally:
        COST_MODELS.pop("weights_x2", None)


# ---- acceptance: MLPerf Tiny ResNet-8 ---------------------------------------------------------------
def resnet8_pruned_final(channel: int) -> nn.Module:
    """ResNet-8 with stack2.conv1's output ``channel`` removed for real, every layer at 8 bits."""
    final = copy.deepcopy(resnet8())
    s = final.stack2
    keep = [c for c in range(32) if c != channel]
    conv1 = nn.Conv2d(16, 31, 3, stride=2, padding=1, bias=False)
    conv1.weight.data = s.conv1.weight.data[keep]
    conv2 = nn.Conv2d(31, 32, 3, padding=1, bias=False)
    conv2.weight.data = s.conv2.weight.data[:, keep]
    s.conv1, s.bn1, s.conv2 = conv1, nn.BatchNorm2d(31), conv2
    for m in final.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with_bits(m, [8] * m.weight.shape[0], a_bits=8)
    return final


def test_resnet8_acceptance():
    model = resnet8()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    # 432 + 2*2304 + (4608 + 9216 + 512) + (18432 + 36864 + 2048) + 640
    assert weights == 77_360
    x = torch.randn(2, 3, 32, 32)
    sm = convert(model, x)
    sm.eval()
    assert float(sm.cost) == sm.discrete_cost() == 8 * 77_360
    assert sm.discrete_cost("params") == 77_360
    assert sm.discrete_cost("size_bytes") == 77_360
    assert sm.analysis.groups[sm.analysis.layers["stack2.conv1"].group].layers == ["stack2.conv1"]
    force(sm, "stack2.conv1", 5, 0)
    # its own 16*9 weights and the 32 output channels x 9 taps of stack2.conv2 that read it
    assert sm.discrete_cost() == 8 * 77_360 - 8 * (16 * 9 + 32 * 9)
    # the same network with the channel physically removed, counted from its modules
    final = resnet8_pruned_final(5)
    for name in ALL:
        assert count_cost(final, (x,), name) == pytest.approx(sm.discrete_cost(name), rel=1e-12), name


def test_dscnn_eight_bits():
    model = dscnn()
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights == 64 * 40 + 4 * (64 * 9 + 64 * 64) + 64 * 12
    sm = convert(model, torch.randn(2, 1, 49, 10))
    assert sm.discrete_cost() == 8 * weights
    assert {s.out_spatial for s in sm.meta[meta.COST_LAYERS] if s.kind == "conv"} == {(25, 5)}


# ---- invariant 4 against the real finalize pass --------------------------------------------------
@pytest.mark.parametrize("make,shape", [(resnet8, (2, 3, 32, 32)), (dscnn, (2, 1, 49, 10)),
                                        (Concat, (1, 3, 8, 8)), (Grouped, (1, 3, 8, 8))])
def test_discrete_cost_equals_count_of_finalized(make, shape):
    x = torch.randn(*shape)
    sm = convert(make(), x)
    with torch.no_grad():
        for p in sm.arch_parameters():
            p.normal_()
            if p.dim() == 2:
                p[0] -= 1.0  # fewer 0-bit channels: no tensor loses all of its channels
    sm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finalize warns where it must deviate from the search model
        final = fxsearch.finalize(sm)
    counted = count_cost(final, (x,), ALL)
    for name in ALL:
        assert counted[name] == pytest.approx(sm.discrete_cost(name), rel=1e-12), name
    assert math.isfinite(counted["ne16"])


# ---- the compiled cost (SearchModel.fuse_quantizers) ---------------------------------------------
def _costs_and_grads(sm):
    for p in sm.arch_parameters():
        p.grad = None
    costs = sm.costs
    sum(c / c.detach() for c in costs.values()).backward()  # every model's gradient, each scaled to 1
    return ({k: float(v.detach()) for k, v in costs.items()},
            [p.grad.clone() for p in sm.arch_parameters() if p.grad is not None])


def test_compiled_cost_matches_the_eager_one():
    """fuse_quantizers compiles the train-mode cost: every built-in model's value and every
    choice's gradient as the eager cost gives them (to float rounding), at any temperature and
    in softmax and hard sampling; eval mode stays the eager argmax cost."""
    from torch._dynamo.utils import counters

    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, 8)
    eager = uniform(convert(Residual(), x))
    fused = copy.deepcopy(eager).fuse_quantizers()
    with torch.no_grad():
        for p, q in zip(eager.arch_parameters(), fused.arch_parameters()):
            p.normal_()
            q.copy_(p)
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed compile warns: none here
        for temperature, sampling in [(1.0, "softmax"), (0.37, "softmax"), (2.5, "hard"), (0.37, "softmax")]:
            for sm in (eager, fused):
                sm.temperature, sm.sampling = temperature, sampling
            want, want_grads = _costs_and_grads(eager)
            for _ in range(2):  # the first evaluation is eager (it fills the caches), then compiled
                got, got_grads = _costs_and_grads(fused)
                assert got == pytest.approx(want, rel=1e-5)
                assert len(got_grads) == len(want_grads)
                for a, b in zip(got_grads, want_grads):
                    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    assert fused.fused_cost and counters["stats"]["unique_graphs"] > graphs  # it did compile
    fused.eval()
    assert float(fused.cost) == fused.discrete_cost()


def test_cost_that_cannot_be_compiled_falls_back_to_eager():
    """A cost function dynamo cannot trace whole (here a call it is told not to trace): one
    warning, then the eager cost, the same value."""
    @torch.compiler.disable
    def untraceable(t):
        return t.sum()

    def host_read(layer):
        return untraceable(layer.bits) * layer.c_in_eff

    x = torch.randn(2, 3, 8, 8)
    sm = uniform(convert(Residual(), x, cost=host_read)).fuse_quantizers()
    first = float(sm.cost.detach())  # eager, fills the caches
    with pytest.warns(UserWarning, match="could not be compiled"):
        assert float(sm.cost.detach()) == first
    assert not sm.fused_cost
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(sm.cost.detach()) == first

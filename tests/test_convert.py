"""fxsearch.convert end to end on the micro-models: trace fidelity, the 8-bit invariant,
gradients, pruning masks, typed errors and the SearchModel surface."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import fxsearch
import models as M
from conftest import groups_of
from fxsearch.passes.trace import trace
from fxsearch.search_modules import ActSearch, GroupChoice, SearchConv2d, WeightSearchMixin

IDS = [c.__name__ for c in M.MICRO_MODELS]


def outputs(y) -> list[torch.Tensor]:
    return tree_flatten(y)[0]


def perturb_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so eval-mode BN is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.2, 0.5)
    return model


def choices(sm) -> list[nn.Module]:
    return [m for m in sm.modules() if isinstance(m, (GroupChoice, ActSearch))]


def pick(sm, w_bits: int, a_bits: int = 8) -> None:
    """Make every weight choice pick ``w_bits`` and every activation choice ``a_bits`` (argmax)."""
    with torch.no_grad():
        for c in choices(sm):
            bits = w_bits if isinstance(c, GroupChoice) else a_bits
            c.alpha.zero_()
            c.alpha[c.precisions.index(bits)] = 1.0


def layer_inputs(sm) -> dict[str, ActSearch | None]:
    """Searchable layer -> the ActSearch quantizing its input (None when the input is float)."""
    out = {}
    for n in sm.graph.nodes:
        if n.op == "call_module" and n.target in sm.analysis.layers:
            q = n.args[0]
            is_q = q.op == "call_module" and q.target.startswith("fxs_act.")
            out[n.target] = sm.get_submodule(q.target) if is_q else None
    return out


# ---- trace -------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_cls", M.MICRO_MODELS, ids=IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_trace_is_faithful(model_cls, train):
    model = perturb_norms(model_cls()).train(train)
    x = M.example_input()
    gm = trace(model, (x,))
    assert gm.training == train  # the user's mode comes back on the traced module
    with torch.no_grad():
        for got, want in zip(outputs(gm(x)), outputs(model(x)), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(n.meta.get("tensor_meta") is not None for n in gm.graph.nodes if n.op == "call_module")


# ---- the 8-bit invariant -----------------------------------------------------------------------

def reference_8bit(model: nn.Module, sm, x: torch.Tensor):
    """The user's model with 8-bit weights and inputs of every searchable layer, computed with
    torch's own fake quantizers, the activation clip read from the search model's ActSearch.

    Returns the outputs and, per layer, the fake-quantized input and weight it used."""
    ref = copy.deepcopy(model).eval()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, act in layer_inputs(sm).items():
        mod = ref.get_submodule(name)
        w = mod.weight.detach()
        scale = w.abs().flatten(1).amax(1) / 127
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        mod.weight.data = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -128, 127)
        qparams = None
        if act is not None:
            lo, hi = act.lo.detach(), act.hi.detach()
            s = (hi - lo) / 255
            qparams = (float(s), int(torch.round(-lo / s)))

        def hook(m, args, name=name, qparams=qparams):
            x = args[0] if qparams is None else torch.fake_quantize_per_tensor_affine(args[0], *qparams, 0, 255)
            seen[name] = (x, m.weight.detach().clone())
            return (x,)

        mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        return ref(x), seen


def search_layer_io(sm, x: torch.Tensor):
    """Run the search model; per layer, the input it received and its effective weight."""
    seen = {}
    handles = []
    for name in sm.analysis.layers:
        mod = sm.get_submodule(name)

        def hook(m, args, name=name):
            seen[name] = (args[0], m.effective_params(args[1])[0].detach())

        handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        y = sm(x)
    for h in handles:
        h.remove()
    return y, seen


def assert_within_one_lsb(got: torch.Tensor, want: torch.Tensor, lsb: torch.Tensor | float, what: str):
    """Equal up to rounding ties: no element off by more than one step, almost all exact."""
    diff = (got - want).abs()
    assert bool((diff <= lsb * 1.001 + 1e-7).all()), f"{what}: off by {float(diff.max())} > 1 LSB"
    off = int((diff > 1e-6).sum())
    assert off <= max(1, got.numel() // 1000), f"{what}: {off} of {got.numel()} elements differ"


@pytest.mark.parametrize("model_cls", M.MICRO_MODELS, ids=IDS)
def test_eval_one_hot_8bit_is_the_8bit_fake_quantized_model(model_cls):
    model = perturb_norms(model_cls())
    x = M.example_input()
    sm = fxsearch.convert(model, (x,)).eval()
    pick(sm, 8)
    y, sm_io = search_layer_io(sm, x)
    want, ref_io = reference_8bit(model, sm, x)
    assert set(sm_io) == set(ref_io) == set(sm.analysis.layers)
    for name, act in layer_inputs(sm).items():
        (x_s, w_s), (x_r, w_r) = sm_io[name], ref_io[name]
        w_lsb = w_r.abs().flatten(1).amax(1).view(-1, *[1] * (w_r.dim() - 1)) / 127
        assert_within_one_lsb(w_s, w_r, w_lsb, f"{name} weight")
        a_lsb = 0.0 if act is None else float((act.hi - act.lo).detach() / 255)
        assert_within_one_lsb(x_s, x_r, a_lsb, f"{name} input")
    with torch.no_grad():
        floats = outputs(model.eval()(x))
    for got, ref, flt in zip(outputs(y), outputs(want), floats, strict=True):
        scale = float(ref.abs().max())
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-3 * scale)
        assert float((got - flt).abs().max()) > 1e-6  # quantization really happened


def test_eval_one_hot_4bit_weights_use_4bit_grid():
    """Argmax on 4 bits: every weight channel holds at most 16 distinct values on max|W|/7."""
    model = M.PlainChain()
    sm = fxsearch.convert(model, (M.example_input(),)).eval()
    pick(sm, 4)
    _, io = search_layer_io(sm, M.example_input())
    for name, (_, w) in io.items():
        flat = w.flatten(1)
        step = model.get_submodule(name).weight.detach().abs().flatten(1).amax(1, keepdim=True) / 7
        ints = flat / step
        torch.testing.assert_close(ints, ints.round(), rtol=0, atol=1e-4)
        assert int(ints.round().abs().max()) == 7 and int(ints.round().min()) >= -8


# ---- gradients ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model_cls", M.MICRO_MODELS, ids=IDS)
def test_softmax_search_gradients_reach_every_parameter(model_cls):
    x = M.example_input()
    sm = fxsearch.convert(model_cls(), (x,), sampling="softmax").train()
    loss = sum(o.square().mean() for o in outputs(sm(x)))
    loss.backward()
    names = {id(p): n for n, p in sm.named_parameters()}
    arch, weights = sm.arch_parameters(), sm.weight_parameters()
    assert arch and weights
    no_grad = [names[id(p)] for p in arch + weights if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert no_grad == []
    assert all(bool(torch.isfinite(p.grad).all()) for p in arch + weights)


@pytest.mark.parametrize("sampling", ["hard", "gumbel"])
@pytest.mark.parametrize("model_cls", [M.Residual, M.SEGate, M.Concat], ids=lambda c: c.__name__)
def test_hard_and_gumbel_sampling_train(model_cls, sampling):
    x = M.example_input()
    sm = fxsearch.convert(model_cls(), (x,), sampling=sampling).train()
    assert sm.sampling == sampling
    out = outputs(sm(x))
    assert all(bool(torch.isfinite(o).all()) for o in out)
    sum(o.square().mean() for o in out).backward()
    arch = sm.arch_parameters()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in arch)
    assert sum(int((p.grad != 0).any()) for p in arch) >= len(arch) // 2
    if sampling == "hard":  # straight-through: the forward pass used one precision per channel
        theta = sm.get_submodule("fxs_choices.g0")()
        assert torch.equal(theta.detach().sum(0), torch.ones(theta.shape[1]))
        assert set(theta.detach().unique().tolist()) <= {0.0, 1.0}


# ---- pruning -----------------------------------------------------------------------------------

# (model, a layer of the group to prune, unit, {layer: output channels that must be zero},
#  {layer: input channels that must be zero})
PRUNE_CASES = [
    (M.PlainChain, "conv1", 3, {"conv1": [3]}, {"conv2": [3]}),
    (M.Residual, "stem", 2, {"stem": [2], "b1_conv2": [2]},
     {"b1_conv1": [2], "b2_conv1": [2], "b2_short": [2]}),
    (M.SEGate, "stem", 5, {"stem": [5], "se.fc2": [5]}, {"se.fc1": [5], "conv": [5]}),
    (M.Depthwise, "pw1", 1, {"pw1": [1], "dw": [1]}, {"dw": [1], "pw2": [1]}),
    (M.Concat, "b", 1, {"b": [1]}, {"c": [5]}),
    (M.SplitSlice, "a", 5, {"a": [5]}, {"q": [1], "s": [3]}),
    (M.FlattenLinear, "conv", 2, {"conv": [2]}, {"fc1": list(range(12, 18))}),
    (M.ChannelShuffle, "a", 1, {"a": [1, 5]}, {"b": [2, 3]}),
    (M.GroupedConv, "g", 1, {"g": [1, 5]}, {"c": [1, 5]}),
    (M.ConvNeXtLike, "block.pwconv1", 7, {"block.pwconv1": [7]}, {"block.pwconv2": [7]}),
]


@pytest.mark.parametrize("model_cls, layer, unit, zero_out, zero_in", PRUNE_CASES,
                         ids=[c[0].__name__ for c in PRUNE_CASES])
def test_pruned_unit_is_exactly_zero(model_cls, layer, unit, zero_out, zero_in):
    model = perturb_norms(model_cls())
    x = M.example_input()
    sm = fxsearch.convert(model, (x,)).eval()
    pick(sm, 8)
    gid = sm.analysis.layers[layer].group
    with torch.no_grad():
        sm.get_submodule(f"fxs_choices.g{gid}").alpha[0, unit] = 5.0  # 0 bits wins the argmax
    got_out, got_in = {}, {}
    for name in sm.analysis.layers:
        sm.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: got_out.__setitem__(name, out))
        sm.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: got_in.__setitem__(name, args[0]))
    with torch.no_grad():
        sm(x)

    def channels(t, layer_name):  # the channel axis: dim 1 for conv, last dim for linear
        return t.movedim(1, -1) if isinstance(sm.get_submodule(layer_name), SearchConv2d) else t

    for name, dead in zero_out.items():
        out = channels(got_out[name], name)
        assert bool((out[..., dead] == 0).all()), f"{name} output channels {dead} are not zero"
        alive = [c for c in range(out.shape[-1]) if c not in dead]
        assert bool((out[..., alive].flatten(0, -2).abs().amax(0) > 0).all())
    for name, dead in zero_in.items():
        inp = channels(got_in[name], name)
        assert bool((inp[..., dead] == 0).all()), f"{name} input channels {dead} are not zero"
        assert float(inp.abs().sum()) > 0
    assert sm.get_submodule(f"fxs_choices.g{gid}").argmax_bits()[unit] == 0


def test_pruning_mask_is_needed_after_batchnorm_shift():
    """The BN shift of a pruned conv1 channel survives the ReLU (absorbed by the quantizer);
    only the mask zeroes it."""
    model = perturb_norms(M.PlainChain())
    x = M.example_input()
    sm = fxsearch.convert(model, (x,)).eval()
    with torch.no_grad():
        sm.get_submodule("fxs_choices.g0").alpha[0, 3] = 5.0
    seen = {}
    sm.get_submodule("bn1").register_forward_hook(lambda m, a, out: seen.__setitem__("bn", out))
    sm.get_submodule("conv2").register_forward_pre_hook(lambda m, a: seen.__setitem__("conv2", a[0]))
    with torch.no_grad():
        sm(x)
    assert bool((seen["bn"][:, 3] > 0.1).all())  # bn1(0) = shift > 0, so relu(shift) > 0
    assert bool((seen["conv2"][:, 3] == 0).all())


def test_soft_pruning_scales_bias_by_alive_probability():
    """In the soft search the bias of channel c is scaled by 1 - theta[0, c]."""
    sm = fxsearch.convert(M.PlainChain(), (M.example_input(),)).train()
    conv1 = sm.get_submodule("conv1")
    theta = sm.get_submodule("fxs_choices.g0")()
    weight, bias = conv1.effective_params(theta)
    torch.testing.assert_close(bias, conv1.bias * (1 - theta[0]))
    assert 0 < float(theta[0].detach().min()) < 1


# ---- typed errors ------------------------------------------------------------------------------

def test_untraceable_model_raises_trace_error_naming_the_line():
    with pytest.raises(fxsearch.TraceError) as err:
        fxsearch.convert(M.DataDependent(), (M.example_input(),))
    msg = str(err.value)
    assert "DataDependent" in msg and "models.py:" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg


def test_wrong_input_shape_raises_trace_error_naming_the_node():
    with pytest.raises(fxsearch.TraceError) as err:
        fxsearch.convert(M.PlainChain(), (torch.randn(2, 4, 8, 8),))
    msg = str(err.value)
    assert "node %conv1" in msg and "call_module[target=conv1]" in msg and "example_inputs" in msg


@pytest.mark.parametrize("bad", [[1, 2, 3], torch.randn(2, 3, 8, 8)], ids=["list-of-ints", "bare-tensor"])
def test_example_inputs_must_be_a_tuple(bad):
    with pytest.raises(fxsearch.TraceError):
        fxsearch.convert(M.PlainChain(), bad)


def test_model_without_searchable_layer_raises():
    with pytest.raises(fxsearch.UnsupportedModelError, match="no searchable layer"):
        fxsearch.convert(M.NoSearchable(), (M.example_input(),))


def test_all_layers_excluded_raises():
    with pytest.raises(fxsearch.UnsupportedModelError):
        fxsearch.convert(M.PlainChain(), (M.example_input(),), exclude=(nn.Conv2d, nn.Linear))


@pytest.mark.parametrize("options, match", [
    ({"w_precisions": ()}, "empty"),
    ({"w_precisions": (2, 2, 8)}, "duplicates"),
    ({"w_precisions": (-1, 8)}, "holds -1"),
    ({"w_precisions": (2.5, 8)}, "not an integer"),
    ({"w_precisions": (True, 8)}, "not an integer"),
    ({"w_precisions": "248"}, "sequence of integers"),
    ({"w_precisions": (0,)}, "prune everything"),
    ({"w_precisions": (0, 17)}, "holds 17"),
    ({"w_precisions": (0, 1, 8)}, "holds 1"),  # symmetric 1-bit grid: qmax = 0, scale = inf
    ({"a_precisions": (0, 8)}, "holds 0"),
    ({"a_precisions": ()}, "empty"),
    ({"input_bits": 0}, "holds 0"),
    ({"sampling": "argmax"}, "sampling"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_invalid_config_raises_config_error(options, match):
    with pytest.raises(fxsearch.ConfigError, match=match):
        fxsearch.convert(M.PlainChain(), (M.example_input(),), **options)
    assert issubclass(fxsearch.ConfigError, ValueError)


def test_valid_config_is_normalised():
    cfg = fxsearch.SearchConfig(w_precisions=[8, 0, 4], a_precisions=(8, 2), input_bits=None)
    assert cfg.w_precisions == (0, 4, 8) and cfg.a_precisions == (2, 8) and cfg.can_prune
    assert not fxsearch.SearchConfig(w_precisions=(4, 8)).can_prune
    sm = fxsearch.convert(M.PlainChain(), (M.example_input(),), config=cfg)
    assert sm.get_submodule("fxs_choices.g0").alpha.shape == (3, 8)
    assert not any(n.name == "q_x" for n in sm.graph.nodes)  # float network input


# ---- SearchModel surface -----------------------------------------------------------------------

def test_exclude_keeps_layer_out():
    x = M.example_input()
    sm = fxsearch.convert(M.PlainChain(), (x,), exclude=("conv2",))
    assert type(sm.conv2) is nn.Conv2d and not isinstance(sm.conv2, WeightSearchMixin)
    assert isinstance(sm.conv1, SearchConv2d)
    assert groups_of(sm) == [["conv1"], ["fc"]]
    assert [line.split()[0] for line in sm.summary().splitlines()[2:-1]] == ["conv1", "fc"]
    assert sm(x).shape == (2, 10)
    # conv1's channels reach the excluded layer unmasked: they cannot be pruned
    assert sm.get_submodule("fxs_choices.g0").allowed[0].tolist() == [False] * 8


def test_group_choice_logits_exclude_frozen_units_from_zero_bits():
    """Frozen units get -inf at 0 bits; a group with none frozen hands its alpha over as it is,
    and a state with frozen units loaded into it takes effect."""
    some = GroupChoice((0, 2, 4, 8), torch.tensor([False, True, False]), "softmax", 1.0)
    logits = some.logits()
    assert logits[0, 1] == float("-inf") and torch.equal(logits[:, [0, 2]], some.alpha[:, [0, 2]])
    assert float(some.theta()[0, 1]) == 0.0
    free = GroupChoice((0, 2, 4, 8), torch.zeros(3, dtype=torch.bool), "softmax", 1.0)
    assert free.logits() is free.alpha
    free.load_state_dict(some.state_dict())
    assert free.logits()[0, 1] == float("-inf") and float(free.theta()[0, 1]) == 0.0


def test_exclude_by_type_keeps_every_such_layer_out():
    sm = fxsearch.convert(M.Residual(), (M.example_input(),), exclude=(nn.Linear,))
    assert type(sm.fc) is nn.Linear
    assert sorted(sm.analysis.layers) == ["b1_conv1", "b1_conv2", "b2_conv1", "b2_conv2", "b2_short", "stem"]


def test_summary_mentions_every_layer():
    sm = fxsearch.convert(M.Residual(), (M.example_input(),))
    text = sm.summary()
    lines = text.splitlines()
    for name in ("stem", "b1_conv1", "b1_conv2", "b2_conv1", "b2_conv2", "b2_short", "fc"):
        assert any(line.split()[0] == name for line in lines), name
    assert lines[-1] == "7 searchable layers in 5 groups; 40 of 50 channel units prunable"
    fc = next(line for line in lines if line.startswith("fc "))
    assert fc.split()[:4] == ["fc", "4", "12", "10"] and "model output" in fc
    rows = {r["layer"]: r for r in sm.layer_table()}
    assert rows["b2_short"]["group"] == rows["b2_conv2"]["group"] == 3
    assert rows["stem"]["bits"] == {0: 0, 2: 0, 4: 0, 8: 8}


def test_print_readable_shows_search_nodes():
    sm = fxsearch.convert(M.Residual(), (M.example_input(),))
    text = sm.print_readable(print_output=False)
    assert "theta_g0" in text and "q_x" in text and "q_relu" in text
    nodes = list(sm.graph.nodes)
    assert sum(n.name.startswith("theta_g") for n in nodes) == len(sm.analysis.groups) == 5
    # one q_ node per tensor feeding searchable layers (x, relu, relu_1, relu_2, relu_3, flatten)
    assert sum(n.name.startswith("q_") for n in nodes) == 6
    stem = next(n for n in nodes if n.name == "stem")
    assert [a.name for a in stem.args] == ["q_x", "theta_g0"]


def test_parameter_partition():
    sm = fxsearch.convert(M.Residual(), (M.example_input(),))
    arch = {id(p) for p in sm.arch_parameters()}
    weights = {id(p) for p in sm.weight_parameters()}
    assert not arch & weights
    assert arch | weights == {id(p) for p in sm.parameters() if p.requires_grad}
    # 5 group choices + 5 activation choices (the network input is fixed at 8 bits)
    assert len(arch) == 10
    assert len(sm.quantizer_parameters()) == 2 + 5  # signed input: lo and hi; ReLU outputs: hi
    assert {id(p) for p in sm.quantizer_parameters()} <= weights


def test_temperature_setter_and_annealing():
    sm = fxsearch.convert(M.PlainChain(), (M.example_input(),), temperature=2.0).train()
    assert sm.temperature == 2.0
    sm.temperature = 0.5
    assert all(float(c.temperature) == 0.5 for c in choices(sm))
    choice = sm.get_submodule("fxs_choices.g0")
    torch.testing.assert_close(choice(), torch.softmax(choice.alpha / 0.5, 0))
    tau = sm.anneal_temperature()
    assert tau == pytest.approx(0.5 * math.exp(-0.045))
    assert sm.temperature == pytest.approx(tau)
    assert sm.anneal_temperature(rate=1.0) == pytest.approx(tau * math.exp(-1.0))
    with pytest.raises(ValueError):
        sm.temperature = 0.0
    sm.sampling = "gumbel"
    assert all(c.sampling == "gumbel" for c in choices(sm))
    with pytest.raises(fxsearch.ConfigError):
        sm.sampling = "argmax"


def test_eval_mode_uses_argmax():
    sm = fxsearch.convert(M.PlainChain(), (M.example_input(),)).eval()
    choice = sm.get_submodule("fxs_choices.g1")
    with torch.no_grad():
        choice.alpha[:, :4] = torch.tensor([0.0, 3.0, 1.0, 2.0]).view(4, 1)  # 2 bits wins
    theta = choice()
    assert theta[:, :4].tolist() == [[0.0] * 4, [1.0] * 4, [0.0] * 4, [0.0] * 4]
    assert theta[3, 4:].tolist() == [1.0] * 12
    assert choice.argmax_bits().tolist() == [2] * 4 + [8] * 12


def test_frozen_units_never_pick_zero_bits():
    sm = fxsearch.convert(M.PlainChain(), (M.example_input(),)).train()
    fc_choice = sm.get_submodule(f"fxs_choices.g{sm.analysis.layers['fc'].group}")
    with torch.no_grad():
        fc_choice.alpha[0] = 100.0
    assert float(fc_choice()[0].detach().abs().max()) == 0.0
    assert fc_choice.argmax_bits().tolist() == [8] * 10


def test_convert_does_not_modify_the_users_model():
    model = perturb_norms(M.Residual())
    x = M.example_input()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y_before = model.eval()(x)
    model.train()
    sm = fxsearch.convert(model, (x,)).train()
    assert model.training and sm.training
    assert not {id(p) for p in model.parameters()} & {id(p) for p in sm.parameters()}
    opt = torch.optim.SGD(sm.parameters(), lr=0.1)
    sum(o.square().mean() for o in outputs(sm(x))).backward()
    opt.step()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert not torch.equal(sm.stem.weight, model.stem.weight)  # the step changed the copy
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), y_before, rtol=0, atol=0)


def test_convert_leaves_batchnorm_statistics_alone():
    """The analysis runs the graph once; in train mode that must not update running stats."""
    model = perturb_norms(M.PlainChain()).train()
    sm = fxsearch.convert(model, (M.example_input(),))
    for name in ("bn1", "bn2"):
        torch.testing.assert_close(sm.get_submodule(name).running_mean, model.get_submodule(name).running_mean)
        torch.testing.assert_close(sm.get_submodule(name).running_var, model.get_submodule(name).running_var)
        assert int(sm.get_submodule(name).num_batches_tracked) == 0

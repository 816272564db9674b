"""Golden tests of the channel-group pass: groups, frozen units and their reasons, input labels."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import models as M
from conftest import analyze, frozen_of, groups_of, units_of_inputs

OUTPUT = "reaches the model output (node output)"


def run(model_cls, **kw):
    return analyze(model_cls(), (M.example_input(),), **kw)


# (model, golden groups, golden frozen layers: name -> (frozen channels, reasons))
GOLDEN = [
    (M.PlainChain, [["conv1"], ["conv2"], ["fc"]], {"fc": (10, [OUTPUT])}),
    (M.Residual,
     [["b1_conv1"], ["b1_conv2", "stem"], ["b2_conv1"], ["b2_conv2", "b2_short"], ["fc"]],
     {"fc": (10, [OUTPUT])}),
    (M.SubMulDiv, [["a", "b", "c", "d"], ["e"], ["fc"]], {"fc": (10, [OUTPUT])}),
    (M.SEGate, [["conv"], ["fc"], ["se.fc1"], ["se.fc2", "stem"]], {"fc": (10, [OUTPUT])}),
    (M.Depthwise, [["dw", "pw1"], ["fc"], ["pw2"]], {"fc": (10, [OUTPUT])}),
    (M.Concat, [["a"], ["b"], ["c"], ["fc"]], {"fc": (10, [OUTPUT])}),
    (M.SplitSlice, [["a"], ["fc"], ["p"], ["q"], ["r"], ["s"]], {"fc": (10, [OUTPUT])}),
    (M.FlattenLinear, [["conv"], ["fc1"], ["fc2"]], {"fc2": (10, [OUTPUT])}),
    (M.ConvNeXtLike,
     [["block.dwconv", "block.pwconv2", "stem"], ["block.pwconv1"], ["fc"]],
     {"stem": (8, ["LayerNorm 'block.norm' (node block_norm) normalizes over channels"]),
      "block.dwconv": (8, ["LayerNorm 'block.norm' (node block_norm) normalizes over channels"]),
      "block.pwconv2": (8, ["LayerNorm 'block.norm' (node block_norm) normalizes over channels"]),
      "fc": (10, [OUTPUT])}),
    (M.ChannelShuffle, [["a"], ["b"], ["fc"]], {"fc": (10, [OUTPUT])}),
    (M.GroupedConv, [["a"], ["c"], ["fc"], ["g"]], {"fc": (10, [OUTPUT])}),
    (M.UnknownOp, [["a"], ["b"], ["fc"]],
     {"a": (8, ["matmul (node matmul) is not modelled"]), "fc": (10, [OUTPUT])}),
    (M.TwoOutputs, [["a"], ["b"], ["fc"]], {"b": (6, [OUTPUT]), "fc": (10, [OUTPUT])}),
    (M.UnusedSplitPiece, [["a"], ["fc"]], {"a": (1, ["holds every channel of node split"]), "fc": (10, [OUTPUT])}),
    (M.DoubleShuffle, [["a"], ["b"], ["fc"]],
     {"a": (4, ["channels pruned by whole outer blocks of the channel dim split by .view() (node view_2)"]),
      "fc": (10, [OUTPUT])}),
]


@pytest.mark.parametrize("model_cls, groups, frozen", GOLDEN, ids=[g[0].__name__ for g in GOLDEN])
def test_golden_groups_and_frozen(model_cls, groups, frozen):
    analysis = run(model_cls)
    assert groups_of(analysis) == groups
    assert frozen_of(analysis) == frozen


@pytest.mark.parametrize("model_cls", M.MICRO_MODELS, ids=lambda c: c.__name__)
def test_analysis_is_consistent(model_cls):
    """Every layer's units index its group; group sizes and slot table agree."""
    analysis = run(model_cls)
    for name, info in analysis.layers.items():
        group = analysis.groups[info.group]
        assert name in group.layers
        assert info.unit_index.shape == (info.out_features,)
        assert int(info.unit_index.min()) == 0
        assert int(info.unit_index.max()) < group.num_units
        assert info.in_labels.shape == (info.in_features,)
        gids, uids = analysis.units_of(info.out_slots)
        assert (gids == info.group).all() and torch.equal(uids, info.unit_index)
    for group in analysis.groups:  # every unit is used by some layer of the group
        used = torch.cat([analysis.layers[n].unit_index for n in group.layers]).unique()
        assert torch.equal(used, torch.arange(group.num_units))
        assert set(group.reasons) == set(torch.nonzero(group.frozen).flatten().tolist())


def test_plain_chain_labels():
    a = run(M.PlainChain)
    assert a.layers["conv1"].in_labels.tolist() == [-1, -1, -1]  # the network input
    assert units_of_inputs(a, "conv2") == (["conv1"] * 8, list(range(8)))
    assert units_of_inputs(a, "fc") == (["conv2"] * 16, list(range(16)))
    assert [a.layers[n].kind for n in ("conv1", "conv2", "fc")] == ["conv", "conv", "linear"]


def test_residual_tied_units_are_channel_aligned():
    a = run(M.Residual)
    assert a.layers["stem"].unit_index.tolist() == list(range(8))
    assert a.layers["b1_conv2"].unit_index.tolist() == list(range(8))
    assert a.layers["b2_short"].unit_index.tolist() == list(range(12))
    # the second block reads the sum stem + b1_conv2: the shared group, channel by channel
    assert units_of_inputs(a, "b2_conv1") == (["stem+b1_conv2"] * 8, list(range(8)))
    assert units_of_inputs(a, "b2_short") == (["stem+b1_conv2"] * 8, list(range(8)))
    assert units_of_inputs(a, "fc") == (["b2_conv2+b2_short"] * 12, list(range(12)))


def test_se_gate_ties_expand_conv_with_gated_tensor():
    a = run(M.SEGate)
    assert units_of_inputs(a, "se.fc1") == (["stem+se.fc2"] * 8, list(range(8)))
    assert units_of_inputs(a, "se.fc2") == (["se.fc1"] * 4, list(range(4)))
    assert units_of_inputs(a, "conv") == (["stem+se.fc2"] * 8, list(range(8)))
    assert a.groups[a.layers["stem"].group].num_units == 8


def test_depthwise_joins_producer():
    a = run(M.Depthwise)
    assert a.layers["dw"].groups == 8
    assert a.layers["dw"].unit_index.tolist() == list(range(8))
    assert units_of_inputs(a, "pw2") == (["pw1+dw"] * 8, list(range(8)))


def test_concat_offsets_without_tying():
    a = run(M.Concat)
    info = a.layers["c"]
    assert torch.equal(info.in_labels, torch.cat([a.layers["a"].out_slots, a.layers["b"].out_slots]))
    assert units_of_inputs(a, "c") == (["a"] * 4 + ["b"] * 6, [0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
    assert a.groups[a.layers["a"].group].num_units == 4
    assert a.groups[a.layers["b"].group].num_units == 6


def test_split_chunk_slice_select_ranges():
    a = run(M.SplitSlice)
    slots = a.layers["a"].out_slots
    for layer, lo in (("p", 0), ("q", 4), ("r", 8), ("s", 2)):
        assert torch.equal(a.layers[layer].in_labels, slots[lo:lo + 4]), layer
    assert units_of_inputs(a, "s") == (["a"] * 4, [2, 3, 4, 5])
    assert not a.groups[a.layers["a"].group].frozen.any()
    # the consumer of the final cat sees p, q, r, s at offsets 0, 5, 10, 15
    names, _ = units_of_inputs(a, "fc")
    assert names == ["p"] * 5 + ["q"] * 5 + ["r"] * 5 + ["s"] * 5


def test_flatten_maps_each_channel_to_a_block():
    a = run(M.FlattenLinear)
    conv_slots = a.layers["conv"].out_slots
    assert torch.equal(a.layers["fc1"].in_labels, conv_slots.repeat_interleave(6))
    assert units_of_inputs(a, "fc1")[1] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6
    assert a.layers["fc1"].in_features == 24


def test_convnext_layernorm_freezes_stem_group_but_not_mlp():
    a = run(M.ConvNeXtLike)
    stem_group = a.groups[a.layers["stem"].group]
    assert stem_group.frozen.tolist() == [True] * 8
    assert all("LayerNorm" in why[0] for why in stem_group.reasons.values())
    mlp = a.groups[a.layers["block.pwconv1"].group]
    assert mlp.layers == ["block.pwconv1"] and mlp.num_units == 32 and not mlp.frozen.any()
    assert units_of_inputs(a, "block.pwconv2") == (["block.pwconv1"] * 32, list(range(32)))
    # the LayerNorm's output holds no prunable channel any more
    assert a.layers["block.pwconv1"].in_labels.tolist() == [-1] * 8


def test_channel_shuffle_ties_across_shuffle_groups():
    a = run(M.ChannelShuffle)
    assert a.layers["a"].unit_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    # after the shuffle b reads channels 0, 4, 1, 5, 2, 6, 3, 7 of a: units 0, 0, 1, 1, ...
    assert units_of_inputs(a, "b") == (["a"] * 8, [0, 0, 1, 1, 2, 2, 3, 3])
    assert a.layers["b"].unit_index.tolist() == list(range(8))


def test_grouped_conv_ties_same_in_group_index():
    a = run(M.GroupedConv)
    assert a.layers["g"].groups == 2
    assert a.layers["a"].unit_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert a.layers["g"].unit_index.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert a.groups[a.layers["g"].group].num_units == 4
    assert units_of_inputs(a, "c") == (["g"] * 8, [0, 1, 2, 3, 0, 1, 2, 3])


def test_unknown_op_freezes_its_inputs_and_outputs_nothing():
    a = run(M.UnknownOp)
    assert a.layers["b"].in_labels.tolist() == [-1] * 8
    assert not a.groups[a.layers["b"].group].frozen.any()


def test_depthwise_on_network_input_is_frozen():
    """A depthwise conv over unprunable data: its channels cannot go without its input's."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(144, 5))
    a = analyze(model, (M.example_input(),))
    assert groups_of(a) == [["0"], ["2"], ["4"]]
    assert frozen_of(a) == {"0": (6, ["depthwise Conv2d '0' (node _0) over unprunable input"]),
                            "4": (5, [OUTPUT])}


def test_depthwise_multiplier_ties_outputs_to_their_input_channel():
    """Depthwise with 2 outputs per input channel: both outputs join their input's unit."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, groups=4), nn.ReLU(),
                          nn.Conv2d(8, 2, 1), nn.Flatten(), nn.Linear(72, 5))
    a = analyze(model, (M.example_input(),))
    assert groups_of(a) == [["0", "2"], ["4"], ["6"]]
    assert a.layers["0"].unit_index.tolist() == [0, 1, 2, 3]
    assert a.layers["2"].unit_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert frozen_of(a) == {"6": (5, [OUTPUT])}


def test_exclude_by_name_freezes_producer_and_drops_layer():
    a = run(M.PlainChain, exclude=("conv2",))
    assert groups_of(a) == [["conv1"], ["fc"]]
    assert frozen_of(a) == {
        "conv1": (8, ["layer 'conv2' excluded from the search (node conv2) is not modelled"]),
        "fc": (10, [OUTPUT]),
    }
    assert a.layers["fc"].in_labels.tolist() == [-1] * 16


def test_exclude_by_type():
    a = run(M.PlainChain, exclude=(nn.Linear,))
    assert groups_of(a) == [["conv1"], ["conv2"]]
    assert frozen_of(a) == {"conv2": (16, ["layer 'fc' excluded from the search (node fc) is not modelled"])}


def test_shared_module_called_twice_unites_its_units():
    """One conv applied to two tensors: its weights are shared, so its input producers tie."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.shared = nn.Conv2d(4, 6, 1)
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            y = self.shared(self.a(x)) * self.shared(self.b(x))
            return self.fc(y.mean((2, 3)))

    a = analyze(Twice(), (M.example_input(),))
    assert groups_of(a) == [["a", "b"], ["fc"], ["shared"]]
    assert a.layers["a"].unit_index.tolist() == a.layers["b"].unit_index.tolist() == [0, 1, 2, 3]


def test_torch_namespace_aliases_pass_channels():
    """torch.max_pool2d, torch.selu, clamp_min and the like are the F.* kernels under other
    names: channels pass through them, nothing is frozen but the model output."""

    class Aliases(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            y = torch.max_pool2d(torch.selu(self.conv1(x)), 2)
            y = torch.dropout(self.conv2(y).clamp_min(0.0), 0.1, False)
            y = torch.avg_pool1d(y.flatten(2), 2)
            return self.fc(torch.clamp_max(y, 6.0).mean(2))

    a = analyze(Aliases(), (M.example_input(),))
    assert frozen_of(a) == {"fc": (10, [OUTPUT])}
    assert groups_of(a) == [["conv1"], ["conv2"], ["fc"]]

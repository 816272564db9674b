"""Acceptance on 9 torchvision architectures (random weights, 64x64 input): convert, one
train-mode forward/backward reaching every architecture parameter, and the couplings each
architecture is known for."""
from __future__ import annotations

import pytest
import torch
import torchvision

import fxsearch
from conftest import frozen_of, groups_of

OUTPUT = "reaches the model output (node output)"
ZOO = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x1_0",
       "efficientnet_b0", "regnet_x_400mf", "googlenet", "convnext_tiny"]
CLASSIFIER = {"resnet18": "fc", "mobilenet_v2": "classifier.1", "mobilenet_v3_small": "classifier.3",
              "densenet121": "classifier", "shufflenet_v2_x1_0": "fc", "efficientnet_b0": "classifier.1",
              "regnet_x_400mf": "fc", "googlenet": "fc", "convnext_tiny": "classifier.2"}


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


def group_with(sm, layer: str) -> list[str]:
    """The layers sharing ``layer``'s group, sorted by name."""
    return sorted(sm.analysis.groups[sm.analysis.layers[layer].group].layers)


@pytest.fixture(scope="module")
def converted():
    """One search model per architecture, built once for the whole file."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            x = torch.randn(2, 3, 64, 64)
            cache[name] = (fxsearch.convert(build(name), (x,)), x)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ZOO)
def test_convert_train_step_reaches_every_arch_parameter(name, converted):
    sm, x = converted(name)
    sm.train()
    for p in sm.parameters():
        p.grad = None
    y = sm(x)
    assert y.shape == (2, 1000) and bool(torch.isfinite(y).all())
    y.logsumexp(1).mean().backward()
    arch = sm.arch_parameters()
    names = {id(p): n for n, p in sm.named_parameters()}
    assert len(arch) >= len(sm.analysis.groups) > 0
    missing = [names[id(p)] for p in arch if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []
    assert all(bool(torch.isfinite(p.grad).all()) for p in arch)
    # the classifier's channels are the classes: never prunable
    assert frozen_of(sm)[CLASSIFIER[name]] == (1000, [OUTPUT])
    assert CLASSIFIER[name] in sm.summary()


def test_resnet18_residual_adds_share_groups(converted):
    sm, _ = converted("resnet18")
    assert [g for g in groups_of(sm) if len(g) > 1] == [
        ["conv1", "layer1.0.conv2", "layer1.1.conv2"],
        ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"],
        ["layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2"],
        ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"],
    ]
    assert len(sm.analysis.groups) == 13  # 8 block-internal conv1s, 4 residual groups, fc
    assert set(frozen_of(sm)) == {"fc"}
    # tied layers use one choice per channel, channel by channel
    a = sm.analysis
    assert a.layers["layer2.0.downsample.0"].unit_index.tolist() == list(range(128))
    assert a.layers["layer2.1.conv2"].unit_index.tolist() == list(range(128))


def test_mobilenet_v2_depthwise_and_inverted_residuals(converted):
    sm, _ = converted("mobilenet_v2")
    assert group_with(sm, "features.2.conv.1.0") == ["features.2.conv.0.0", "features.2.conv.1.0"]
    assert group_with(sm, "features.3.conv.2") == ["features.2.conv.2", "features.3.conv.2"]
    assert group_with(sm, "features.6.conv.2") == ["features.4.conv.2", "features.5.conv.2", "features.6.conv.2"]
    assert set(frozen_of(sm)) == {"classifier.1"}


@pytest.mark.parametrize("name, stem_group", [
    ("mobilenet_v3_small", ["features.0.0", "features.1.block.0.0", "features.1.block.1.fc2"]),
    ("efficientnet_b0", ["features.0.0", "features.1.0.block.0.0", "features.1.0.block.1.fc2"]),
])
def test_squeeze_excitation_gate_joins_the_gated_group(name, stem_group, converted):
    sm, _ = converted(name)
    assert group_with(sm, stem_group[0]) == stem_group
    se_squeeze = stem_group[-1].replace("fc2", "fc1")
    assert group_with(sm, se_squeeze) == [se_squeeze]


@pytest.mark.parametrize("name", ["densenet121", "googlenet"])
def test_concatenating_models_do_not_tie(name, converted):
    sm, _ = converted(name)
    assert all(len(g) == 1 for g in groups_of(sm))
    assert set(frozen_of(sm)) == {CLASSIFIER[name]}
    if name == "densenet121":  # a dense layer reads the stem's 64 channels then 32 per earlier layer
        a = sm.analysis
        names = ["+".join(a.groups[g].layers) for g in a.units_of(a.layers["features.denseblock1.denselayer3.conv1"].in_labels)[0].tolist()]
        assert names == ["features.conv0"] * 64 + ["features.denseblock1.denselayer1.conv2"] * 32 + \
            ["features.denseblock1.denselayer2.conv2"] * 32


def test_shufflenet_channel_shuffle_ties_branches(converted):
    sm, _ = converted("shufflenet_v2_x1_0")
    assert group_with(sm, "stage2.0.branch2.5") == [
        "stage2.0.branch1.2", "stage2.0.branch2.5", "stage2.1.branch2.5", "stage2.2.branch2.5",
        "stage2.3.branch2.5", "stage3.0.branch1.0"]
    assert group_with(sm, "stage2.0.branch2.3") == ["stage2.0.branch2.0", "stage2.0.branch2.3"]
    a = sm.analysis
    stage2 = a.groups[a.layers["stage2.0.branch2.5"].group]
    assert stage2.num_units == 58 and not stage2.frozen.any()
    # each shuffle ties a pass-through channel with a branch channel: the next block's branch
    # output pairs up (58 channels, 29 units), the one after in fours
    assert a.layers["stage2.1.branch2.5"].unit_index.tolist() == torch.arange(29).repeat_interleave(2).tolist()
    assert a.layers["stage2.2.branch2.5"].unit_index.unique().numel() == 15


def test_regnet_grouped_convs_and_projection(converted):
    sm, _ = converted("regnet_x_400mf")
    assert group_with(sm, "trunk_output.block1.block1-0.proj.0") == [
        "trunk_output.block1.block1-0.f.c.0", "trunk_output.block1.block1-0.proj.0"]
    a = sm.analysis
    b = a.layers["trunk_output.block1.block1-0.f.b.0"]  # 32 channels in 2 groups of 16
    assert b.groups == 2 and b.unit_index.tolist() == list(range(16)) * 2


def test_convnext_layernorm_freezes_trunk_mlp_stays_prunable(converted):
    sm, _ = converted("convnext_tiny")
    a = sm.analysis
    mlp = [n for n in a.layers if n.endswith("block.3")]
    assert len(mlp) == 18
    for n in mlp:
        g = a.groups[a.layers[n].group]
        assert g.layers == [n] and not g.frozen.any(), n
    frozen = frozen_of(sm)
    dw = [n for n in a.layers if n.endswith("block.0")]
    assert len(dw) == 18 and all(n in frozen for n in dw)
    assert all(any("LayerNorm" in r or "layer_norm" in r for r in frozen[n][1]) for n in dw)

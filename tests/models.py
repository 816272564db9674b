"""Micro-models, one per channel-coupling pattern, shared by the test files.

Each model takes ``example_input()`` (a 2x3x8x8 tensor unless its class says otherwise) and
is small enough that a test can state its channel groups by hand.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def example_input(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


class PlainChain(nn.Module):
    """conv-bn-relu-conv-bn-relu-pool-flatten-linear: three independent groups."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


class Residual(nn.Module):
    """Two residual blocks: identity shortcut (stem + block1.conv2 tied) and a 1x1 projection
    shortcut (block2.conv2 + block2.short tied)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.b1_conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1_bn1 = nn.BatchNorm2d(8)
        self.b1_conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b1_bn2 = nn.BatchNorm2d(8)
        self.b2_conv1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b2_bn1 = nn.BatchNorm2d(12)
        self.b2_conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.b2_bn2 = nn.BatchNorm2d(12)
        self.b2_short = nn.Conv2d(8, 12, 1, bias=False)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.b1_bn1(self.b1_conv1(x)))
        x = F.relu(self.b1_bn2(self.b1_conv2(y)) + x)
        y = F.relu(self.b2_bn1(self.b2_conv1(x)))
        x = F.relu(self.b2_bn2(self.b2_conv2(y)) + self.b2_short(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SubMulDiv(nn.Module):
    """(a - b) * c / (|d| + 1): sub, mul and div tie a, b, c and d into one group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.d = nn.Conv2d(3, 6, 1)
        self.e = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = (self.a(x) - self.b(x)) * self.c(x) / (self.d(x).abs() + 1)
        y = F.relu(self.e(y))
        return self.fc(y.mean((2, 3)))


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: x * sigmoid(fc2(relu(fc1(pool(x))))) with 1x1 convs."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class SEGate(nn.Module):
    """stem -> SE gate -> conv -> linear: the gate's expand conv (se.fc2) ties with the stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.se = SqueezeExcitation(8, 4)
        self.conv = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.se(F.relu(self.bn(self.stem(x))))
        x = F.relu(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Depthwise(nn.Module):
    """pointwise -> depthwise 3x3 (joins the pointwise group) -> pointwise -> linear."""

    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu6(self.bn1(self.pw1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        x = F.relu(self.pw2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Concat(nn.Module):
    """cat([a (4 ch), b (6 ch)], dim=1) -> c: no tying, c's inputs are a's then b's channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.relu(self.c(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class SplitSlice(nn.Module):
    """a (12 ch) split [4, 8] -> chunk(2) -> slice [2:6]: each consumer reads one channel range."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.p = nn.Conv2d(4, 5, 1)   # reads a[0:4]   (torch.split)
        self.q = nn.Conv2d(4, 5, 1)   # reads a[4:8]   (split then chunk)
        self.r = nn.Conv2d(4, 5, 1)   # reads a[8:12]  (split then chunk)
        self.s = nn.Conv2d(4, 5, 1)   # reads a[2:6]   (getitem slice)
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        a = F.relu(self.a(x))
        s1, s2 = torch.split(a, [4, 8], dim=1)
        c1, c2 = s2.chunk(2, dim=1)
        y = torch.cat([self.p(s1), self.q(c1), self.r(c2), self.s(a[:, 2:6])], 1)
        return self.fc(y.mean((2, 3)))


class FlattenLinear(nn.Module):
    """conv (4 ch, 3x2 map) -> flatten -> linear: each channel is a block of 6 input features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d((3, 2))
        self.fc1 = nn.Linear(24, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class ConvNeXtBlock(nn.Module):
    """The torchvision ConvNeXt block: dw 7x7, permute, LayerNorm(C), Linear-GELU-Linear, permute,
    residual add (layer scale omitted)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """stem (patchify) -> ConvNeXt block -> pool -> linear. The stem group holds stem, dwconv
    and pwconv2 (residual) and is frozen by the LayerNorm; the MLP hidden dim is prunable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.block = ConvNeXtBlock(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision.models.shufflenetv2.channel_shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ChannelShuffle(nn.Module):
    """a (8 ch) -> shuffle(2 groups) -> b: a's channels c and c+4 tie (4 units)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = channel_shuffle(F.relu(self.a(x)), 2)
        x = F.relu(self.b(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class GroupedConv(nn.Module):
    """a (8 ch) -> grouped conv g (groups=2, 4 channels per group) -> c: in a and in g the
    same in-group index is tied across the two groups (4 units each)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.g(F.relu(self.a(x))))
        x = F.relu(self.c(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UnknownOp(nn.Module):
    """a -> torch.matmul(a, a^T) (not modelled) -> b: a's channels are frozen, b's are not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a = self.a(x)
        x = F.relu(self.b(torch.matmul(a, a.transpose(-1, -2))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TwoOutputs(nn.Module):
    """Returns (features, logits): the conv producing the features reaches the output too."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        feats = self.b(F.relu(self.a(x)))
        return feats, self.fc(feats.mean((2, 3)))


class TwoGates(nn.Module):
    """Two SE gates on one tensor: torch.onnx merges their equal global pools, so one ONNX
    tensor feeds two activation quantizers (their QDQ names must not clash)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.se1, self.se2 = SqueezeExcitation(4, 2), SqueezeExcitation(4, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.se1(x), self.se2(x)], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class UnusedSplitPiece(nn.Module):
    """a (3 ch) split [1, 2], only the second piece read: a's channel 0 alone fills the first
    piece and stays (pruning it would leave that piece empty, and the split sizes stale)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(2, 10)

    def forward(self, x):
        first, second = torch.split(F.relu(self.a(x)), [1, 2], 1)
        return self.fc(second.mean((2, 3)))


class DoubleShuffle(nn.Module):
    """a (4 ch) -> shuffle(2) -> shuffle(2) -> b: after the first shuffle a unit fills adjacent
    channels, so the second one's view would prune whole groups, which its computed size
    (c // 2) cannot follow: a's channels are frozen."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = channel_shuffle(channel_shuffle(F.relu(self.a(x)), 2), 2)
        x = F.relu(self.b(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DeadBranch(nn.Module):
    """A conv whose output nothing reads: not searched, not priced, gone after finalize."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.unused = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        y = F.relu(self.a(x))
        self.unused(y)
        return self.fc(y.mean((2, 3)))


class InplaceStatement(nn.Module):
    """``y.relu_()`` as a statement: its result is unused, yet it changes what fc reads."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        y = self.a(x)
        y.relu_()
        return self.fc(y.mean((2, 3)))


class DataDependent(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class NoSearchable(nn.Module):
    """Only parameter-free ops: nothing to search."""

    def forward(self, x):
        return F.relu(F.max_pool2d(x, 2)) * 2


MICRO_MODELS = [PlainChain, Residual, SubMulDiv, SEGate, Depthwise, Concat, SplitSlice, FlattenLinear,
                ConvNeXtLike, ChannelShuffle, GroupedConv, UnknownOp, TwoOutputs, UnusedSplitPiece, DoubleShuffle]

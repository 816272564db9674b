"""Modules the insert-search-nodes pass puts into the graph.

GroupChoice  one per channel group: the choice parameter alpha (|P_W|, units) -> theta
ActSearch    one per tensor feeding searchable layers: activation precision choice, PACT
             clip, and the mask that zeroes pruned channels where they are consumed
SearchConv*/SearchLinear  the original layer, computing its weight from theta
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv_input_grad import conv_forward
from .quantizers import fake_quant_act, quantized_params, sample_choice


def is_arange(index: torch.Tensor, n: int | None = None) -> bool:
    """Whether ``index`` is 0, 1, ..., n - 1 (n: its length unless given): an index that
    selects everything in order, where a view or slice can stand for the gather."""
    n = len(index) if n is None else n
    return len(index) == n and torch.equal(index, torch.arange(n, dtype=index.dtype, device=index.device))


class _Choice(nn.Module):
    """Holds logits over precisions (dim 0) and turns them into theta."""

    given = None  # its theta during a fused training forward (fxsearch.fused_choices)

    def _init_choice(self, precisions: tuple[int, ...], units: int | None, sampling: str, temperature: float):
        self.precisions = tuple(precisions)
        self.sampling = sampling
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        init = torch.tensor(self.precisions, dtype=torch.float) / max(self.precisions)
        shape = (len(self.precisions),) if units is None else (len(self.precisions), units)
        self.alpha = nn.Parameter(init.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone())

    def logits(self) -> torch.Tensor:
        return self.alpha

    def theta(self) -> torch.Tensor:
        if self.given is not None:
            return self.given
        return sample_choice(self.logits(), self.temperature, self.sampling, self.training)

    def argmax_bits(self) -> torch.Tensor:
        return torch.tensor(self.precisions)[self.logits().detach().argmax(0).cpu()]


class GroupChoice(_Choice):
    """Per-unit weight precision choice shared by every layer of one channel group."""

    def __init__(self, precisions, frozen: torch.Tensor, sampling: str, temperature: float):
        super().__init__()
        self._init_choice(precisions, int(frozen.numel()), sampling, temperature)
        allowed = torch.ones(len(precisions), frozen.numel(), dtype=torch.bool)
        if 0 in precisions:
            allowed[precisions.index(0), frozen] = False
        self.register_buffer("allowed", allowed)
        self._note_frozen()

    def _note_frozen(self) -> None:
        self.any_frozen = not bool(self.allowed.all())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._note_frozen()  # `allowed` may have come with the state

    def logits(self) -> torch.Tensor:
        # where() only if a unit is frozen: one op forward and two backward less per group per step
        return torch.where(self.allowed, self.alpha, float("-inf")) if self.any_frozen else self.alpha

    def forward(self) -> torch.Tensor:
        return self.theta()

    def extra_repr(self) -> str:
        return f"bits={self.precisions}, units={self.alpha.shape[1]}, frozen={int((~self.allowed).any(0).sum())}"


class ActSearch(_Choice):
    """Activation quantizer with a precision choice, plus the pruning mask of its tensor.

    forward(x, *thetas): sum_p theta_a[p] * Q_p(x), times the alive mask (1 - theta[0]) of
    every prunable channel the tensor holds (thetas: those groups' choices, in plan order).
    """

    fused = False  # SearchModel.fuse_quantizers() sets it per module
    given_mask = None  # its mask during a fused training forward (fxsearch.fused_choices)

    def __init__(self, precisions, signed: bool, lo: float, hi: float, sampling: str, temperature: float,
                 mask_shape: tuple[int, ...] = (), mask_plan: list[tuple[torch.Tensor, torch.Tensor]] = (),
                 mask_units: tuple[int, ...] = ()):
        super().__init__()
        self._init_choice(precisions, None, sampling, temperature)
        if len(self.precisions) == 1:
            self.alpha.requires_grad_(False)
        self.register_buffer("bits", torch.tensor(self.precisions, dtype=torch.float))
        self.signed = signed
        self.hi = nn.Parameter(torch.tensor(float(max(hi, 1e-3))))
        if signed:
            self.lo = nn.Parameter(torch.tensor(float(min(lo, -1e-3))))
        else:
            self.register_buffer("lo", torch.tensor(0.0))
        self.mask_shape = tuple(mask_shape)
        for k, (pos, units) in enumerate(mask_plan):
            self.register_buffer(f"mask_pos{k}", pos)
            self.register_buffer(f"mask_unit{k}", units)
        self.num_masked_groups = len(mask_plan)  # mask_pos/unit: the plan, as saved in checkpoints
        # one gather builds the mask: each position's entry in cat(theta_k[0] for k) + [0]
        offsets = [sum(mask_units[:k]) for k in range(len(mask_plan) + 1)]
        index = torch.full((math.prod(self.mask_shape),), offsets[-1], dtype=torch.long)
        for k, (pos, units) in enumerate(mask_plan):
            index[pos] = offsets[k] + units
        self.register_buffer("mask_index", index.view(self.mask_shape), persistent=False)
        # the common case, position k holds unit k of one group: the mask is a view of 1 - theta[0]
        self.mask_is_view = len(mask_plan) == 1 and is_arange(index, mask_units[0])

    def quantize(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """sum_p theta_a[p] * Q_p(x), times `mask` (in the same pass) if given."""
        return fake_quant_act(x, self.lo, self.hi, self.bits, self.theta(), mask, self.fused)

    def mask(self, thetas: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """1 - theta[0] of the unit each position holds, 1 where it holds no prunable channel."""
        if self.mask_is_view:
            return (1 - thetas[0][0]).view(self.mask_shape)
        dead = torch.cat([theta[0] for theta in thetas] + [thetas[0].new_zeros(1)])
        return (1 - dead)[self.mask_index]

    def forward(self, x: torch.Tensor, *thetas: torch.Tensor) -> torch.Tensor:
        if self.given is not None:  # a fused training step: the mask was computed with the rest
            return self.quantize(x, self.given_mask)
        return self.quantize(x, self.mask(thetas)) if thetas else self.quantize(x)

    def extra_repr(self) -> str:
        return f"bits={self.precisions}, signed={self.signed}, masked_groups={self.num_masked_groups}"


class WeightSearchMixin:
    """Effective weight of a searchable layer: W_hat_c = sum_p theta[p, c] Q_p(W_c), Q_0 = 0."""

    fused = False  # SearchModel.fuse_quantizers() sets it per module
    given = None  # (weight, bias) during a fused training forward (fxsearch.fused_choices)

    def _init_search(self, precisions: tuple[int, ...], unit_index: torch.Tensor | None) -> None:
        self.precisions = tuple(precisions)
        nonzero = [i for i, p in enumerate(precisions) if p > 0]
        self.register_buffer("bits", torch.tensor([precisions[i] for i in nonzero], dtype=torch.float))
        # not read any more (quantized_params slices theta); kept for the checkpoints that hold it
        self.register_buffer("nonzero_rows", torch.tensor(nonzero, dtype=torch.long))
        self.zero_row = precisions.index(0) if 0 in precisions else None
        self.register_buffer("unit_index", unit_index)

    def channel_theta(self, theta: torch.Tensor) -> torch.Tensor:
        """The group's theta for this layer's output channels, in the weight's dtype."""
        return (theta if self.unit_index is None else theta[:, self.unit_index]).to(self.weight.dtype)

    def effective_params(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.given is not None:
            return self.given
        t = self.channel_theta(theta)
        return quantized_params(self.weight, self.bias, self.bits, t, self.zero_row, self.fused)

    @classmethod
    def from_float(cls, module: nn.Module, precisions, unit_index: torch.Tensor | None):
        """The same module object's state under the search class (parameters are shared)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._init_search(tuple(precisions), unit_index)
        return new


class SearchConv1d(WeightSearchMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x, *self.effective_params(theta))


class SearchConv2d(WeightSearchMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x, *self.effective_params(theta))


class SearchConv3d(WeightSearchMixin, nn.Conv3d):
    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x, *self.effective_params(theta))


class SearchLinear(WeightSearchMixin, nn.Linear):
    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.effective_params(theta))


SEARCH_CLASS = {nn.Conv1d: SearchConv1d, nn.Conv2d: SearchConv2d, nn.Conv3d: SearchConv3d, nn.Linear: SearchLinear}


def search_class_for(module: nn.Module) -> type:
    for base, cls in SEARCH_CLASS.items():
        if isinstance(module, base):
            return cls
    raise TypeError(f"no search class for {type(module).__name__}")

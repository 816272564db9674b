"""SearchModel: the rewritten GraphModule users train with task loss + lambda * cost."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.fx
import torch.nn as nn

from . import cost_models, meta
from .config import SearchConfig
from .errors import ConfigError
from .search_modules import ActSearch, GroupChoice, WeightSearchMixin


class SearchModel(torch.fx.GraphModule):
    """A GraphModule with search nodes; see ``fxsearch.convert``."""

    config: SearchConfig

    @classmethod
    def wrap(cls, gm: torch.fx.GraphModule, config: SearchConfig) -> "SearchModel":
        sm = cls(gm, gm.graph, gm.__class__.__name__)
        sm.meta.update(gm.meta)
        sm.config = config
        sm.train(gm.training)
        return sm

    @property
    def analysis(self):
        return self.meta[meta.ANALYSIS]

    # ---- parameters --------------------------------------------------------------------
    def _choices(self) -> Iterator[nn.Module]:
        return (m for m in self.modules() if isinstance(m, (GroupChoice, ActSearch)))

    def arch_parameters(self) -> list[nn.Parameter]:
        """Choice parameters (alphas): optimise them with their own optimiser."""
        return [m.alpha for m in self._choices() if m.alpha.requires_grad]

    def quantizer_parameters(self) -> list[nn.Parameter]:
        """Learned activation clip bounds (no weight decay on these)."""
        return [p for m in self.modules() if isinstance(m, ActSearch)
                for name, p in m.named_parameters(recurse=False) if name in ("lo", "hi")]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter that is not a choice parameter (clip bounds included)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch and p.requires_grad]

    # ---- temperature and sampling ------------------------------------------------------
    @property
    def temperature(self) -> float:
        return float(next(self._choices()).temperature)

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"temperature must be positive, got {value}")
        for m in self._choices():
            m.temperature.fill_(value)

    def anneal_temperature(self, rate: float = 0.045) -> float:
        """tau <- tau * exp(-rate), once per epoch in the reference protocol; returns tau."""
        self.temperature = self.temperature * math.exp(-rate)
        return self.temperature

    @property
    def sampling(self) -> str:
        return next(self._choices()).sampling

    @sampling.setter
    def sampling(self, mode: str) -> None:
        from .config import SAMPLING_MODES
        if mode not in SAMPLING_MODES:
            raise ConfigError(f"sampling={mode!r}; choose one of {SAMPLING_MODES}")
        for m in self._choices():
            m.sampling = mode

    fused_cost = False  # fuse_quantizers() sets it
    _choice_side_hooks = None  # fuse_quantizers(): fxsearch.fused_choices around each forward

    def fuse_quantizers(self, enabled: bool = True, cost: bool = True) -> "SearchModel":
        """Run the quantizers of training steps as compiled loops (inductor, called without
        torch.compile's per-call guards; see fxsearch.fused_quantizers): same values, after a
        first step that compiles (seconds to tens of seconds, cached on disk). With ``cost``
        also the choice side of each train-mode forward -- masks, quantized weights and the
        costs -- as one compiled graph each way (fxsearch.fused_choices; ``cost`` then hands
        out that step's costs until a backward runs through them; they share the forward's
        thetas, so a backward through the cost alone before the task's needs retain_graph=True),
        and the train-mode cost read outside a forward as one compiled graph
        (fxsearch.cost_models); costs and gradients to float rounding. A training step
        takes about 25 % less time (bench/step_overhead.py). Float32 on the CPU only; eval,
        no-grad passes, other dtypes and devices stay eager."""
        for m in self.modules():
            if isinstance(m, (ActSearch, WeightSearchMixin)):
                m.fused = enabled
        self.fused_cost = enabled and cost
        if self.fused_cost != (self._choice_side_hooks is not None):  # turned on or off
            from . import fused_choices
            if self.fused_cost:
                self._choice_side_hooks = (
                    self.register_forward_pre_hook(fused_choices.begin_step),
                    self.register_forward_hook(fused_choices.end_step, always_call=True))
            else:
                for hook in self._choice_side_hooks:
                    hook.remove()
                self._choice_side_hooks = None
                fused_choices.forget(self)
        return self

    # ---- cost (fxsearch.cost_models) ---------------------------------------------------
    @property
    def cost(self) -> torch.Tensor:
        """The main cost (the first given to convert) under the current thetas: differentiable
        in train mode (the thetas the forward pass uses; Gumbel: their expectation), the
        argmax architecture in eval mode."""
        return self.cost_of(None)

    @property
    def costs(self) -> dict[str, torch.Tensor]:
        """Every named cost, as ``cost``."""
        return cost_models.search_costs(self)

    def cost_of(self, name: str | None = None) -> torch.Tensor:
        """One named cost, as ``cost`` (None: the main one)."""
        return next(iter(cost_models.search_costs(self, [name]).values()))

    def discrete_cost(self, name: str | None = None) -> float:
        """Cost of the current argmax architecture, in either mode (float64 arithmetic)."""
        with torch.no_grad():
            return float(next(iter(cost_models.search_costs(self, [name], discrete=True).values())))

    # ---- inspection --------------------------------------------------------------------
    def layer_table(self) -> list[dict]:
        """Per searchable layer: group, channels, argmax precision counts, frozen units and why."""
        rows = []
        for name, info in self.analysis.layers.items():
            group = self.analysis.groups[info.group]
            choice = self.get_submodule(f"fxs_choices.g{info.group}")
            bits = choice.argmax_bits()[info.unit_index]
            counts = {int(b): int((bits == b).sum()) for b in choice.precisions}
            frozen = group.frozen[info.unit_index]
            rows.append({
                "layer": name, "kind": info.kind, "group": info.group,
                "in": info.in_features, "out": info.out_features,
                "bits": counts, "frozen": int(frozen.sum()),
                "reasons": sorted({r for u in info.unit_index[frozen].tolist() for r in group.reasons[u][:1]}),
            })
        return rows

    def summary(self) -> str:
        """A readable table of the searchable layers."""
        rows = self.layer_table()
        precisions = self.config.w_precisions
        head = f"{'layer':<34} {'grp':>4} {'in':>5} {'out':>5} " + " ".join(f"{f'w{p}':>5}" for p in precisions) + "  frozen"
        lines = [head, "-" * len(head)]
        for r in rows:
            counts = " ".join(f"{r['bits'][p]:>5}" for p in precisions)
            why = f" ({'; '.join(r['reasons'])})" if r["reasons"] else ""
            lines.append(f"{r['layer'][:34]:<34} {r['group']:>4} {r['in']:>5} {r['out']:>5} {counts}  {r['frozen']}{why}")
        groups = self.analysis.groups
        units = sum(g.num_units for g in groups)
        frozen = sum(int(g.frozen.sum()) for g in groups)
        lines.append(f"{len(rows)} searchable layers in {len(groups)} groups; "
                     f"{units - frozen} of {units} channel units prunable")
        return "\n".join(lines)

    def search_layers(self) -> dict[str, WeightSearchMixin]:
        return {name: self.get_submodule(name) for name in self.analysis.layers}

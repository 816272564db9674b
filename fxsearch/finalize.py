"""Public entry point of finalization."""
from __future__ import annotations

import torch.fx

from fxsearch.passes.finalize import finalize_graph

from .checks import check_finite
from .errors import FinalizeError
from .model import SearchModel


def finalize(search_model: SearchModel) -> torch.fx.GraphModule:
    """Argmax precisions, remove 0-bit channels for real, fold BatchNorm, freeze precisions.

    Returns a plain GraphModule in eval mode, on the search model's device, whose
    QuantConv*/QuantLinear and FakeQuantAct modules can be fine-tuned (QAT). The search model
    is not modified. A NaN or Inf weight, choice or clip bound raises FinalizeError naming it.
    """
    if not isinstance(search_model, SearchModel):
        raise FinalizeError(f"finalize expects the SearchModel returned by fxsearch.convert, "
                            f"got {type(search_model).__name__}")
    check_finite(search_model, FinalizeError, "the search diverged: resume from an earlier checkpoint "
                 "or lower the learning rates")
    return finalize_graph(search_model)

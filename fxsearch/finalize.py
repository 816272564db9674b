"""Public entry point of finalization."""
from __future__ import annotations

import torch.fx

from fxsearch.passes.finalize import finalize_graph

from .model import SearchModel


def finalize(search_model: SearchModel) -> torch.fx.GraphModule:
    """Argmax precisions, remove 0-bit channels for real, fold BatchNorm, freeze precisions.

    Returns a plain GraphModule in eval mode whose QuantConv*/QuantLinear and FakeQuantAct
    modules can be fine-tuned (QAT). The search model is not modified.
    """
    if not isinstance(search_model, SearchModel):
        from .errors import FinalizeError
        raise FinalizeError(f"finalize expects the SearchModel returned by fxsearch.convert, "
                            f"got {type(search_model).__name__}")
    return finalize_graph(search_model)

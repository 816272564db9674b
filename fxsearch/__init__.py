"""fxsearch: joint channel pruning and channel-wise mixed-precision search on torch.fx graphs."""
from .config import SearchConfig
from .convert import convert
from .errors import (CheckpointError, ConfigError, ExportError, FinalizeError, FxSearchError,
                     TraceError, UnsupportedModelError)
from .finalize import finalize
from .model import SearchModel

__all__ = [
    "convert", "finalize", "SearchConfig", "SearchModel", "FxSearchError", "ConfigError", "TraceError",
    "UnsupportedModelError", "FinalizeError", "ExportError", "CheckpointError",
]

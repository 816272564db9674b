"""fxsearch: joint channel pruning and channel-wise mixed-precision search on torch.fx graphs."""
from .checkpoint import load, save
from .config import SearchConfig
from .convert import convert
from .errors import (CheckpointError, ConfigError, ExportError, FinalizeError, FxSearchError,
                     TraceError, UnsupportedModelError)
from .exporters import export_onnx, verify_onnx
from .finalize import finalize
from .graph_view import GraphReport, inspect_graph
from .model import SearchModel

__all__ = [
    "convert", "finalize", "export_onnx", "verify_onnx", "SearchConfig", "SearchModel", "FxSearchError", "ConfigError", "TraceError",
    "UnsupportedModelError", "FinalizeError", "ExportError", "CheckpointError",
    "save", "load", "inspect_graph", "GraphReport",
]

"""Typed errors. Every message names the node or module and the way out."""


class FxSearchError(Exception):
    """Base class of every error fxsearch raises on purpose."""


class ConfigError(FxSearchError, ValueError):
    """An option passed to fxsearch is invalid (precision sets, sampling mode, ...)."""


class TraceError(FxSearchError):
    """torch.fx could not trace the model, or the traced graph does not run."""


class UnsupportedModelError(FxSearchError):
    """The model traces but cannot be searched (for example: no searchable layer)."""


class FinalizeError(FxSearchError):
    """A search model could not be turned into a pruned, quantized model."""


class ExportError(FxSearchError):
    """An ONNX file could not be written or does not verify."""


class CheckpointError(FxSearchError):
    """A checkpoint is corrupt, truncated, foreign or does not match the model."""

"""Typed errors. Every message names the node or module and the way out."""
from __future__ import annotations

import difflib
from typing import Callable, Sequence


def did_you_mean(name: str, known: Sequence[str], show: Callable[[str], str] = str) -> str:
    """'; did you mean A, B?' with the known names closest to a misspelt one, or ''."""
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(map(show, close))}?" if close else ""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's run on for dozens)."""
    return (str(err).splitlines() or [""])[0]


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

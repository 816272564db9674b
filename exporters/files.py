"""Atomic file writes: a file is either the old one or the complete new one, never half."""
from __future__ import annotations

import os
import tempfile

from fxsearch.errors import ExportError


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fxsearch-", dir=directory)
    except OSError as err:
        raise ExportError(f"cannot write '{path}': {err.strerror}; choose a writable output path") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        if isinstance(err, OSError):
            raise ExportError(f"cannot write '{path}': {err.strerror}") from err
        raise

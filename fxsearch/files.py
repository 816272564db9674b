"""Atomic file writes, the one place every output of fxsearch goes through: a file is either
the old one or the complete new one, never half, and gets the mode a plain open() would give."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from typing import Any

import torch

from .errors import FxSearchError


def _file_mode(path: str) -> int:
    """The existing file's mode, else 0o666 minus the umask."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, data: bytes, error: type[FxSearchError] = FxSearchError,
                     what: str = "file") -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk and rename it over
    ``path``. An OSError becomes ``error`` naming the path; nothing is left behind."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise error(f"cannot write {what} '{path}': {err.strerror or err}; choose a writable output path") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise error(f"cannot write {what} '{path}': {err.strerror or err}") from err
        raise


NUMBER_LIST = re.compile(r"\[(?:\s*-?[0-9.eE+]+\s*,?)*\s*\]")


def json_text(data: Any) -> str:
    """JSON indented by one space, with every list of numbers on one line (shapes, bits)."""
    def one_line(m: re.Match) -> str:  # never text inside a string: that would not parse alone
        return json.dumps(json.loads(m.group(0))) if "\n" in m.group(0) else m.group(0)
    return NUMBER_LIST.sub(one_line, json.dumps(data, indent=1))


def write_json(path: str | os.PathLike, data: Any, **kwargs: Any) -> None:
    write_atomically(path, (json_text(data) + "\n").encode(), **kwargs)


def torch_save_atomically(obj: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue(), **kwargs)

"""fxsearch.files: the one atomic writer behind ONNX files, checkpoints, reports and run dirs."""
from __future__ import annotations

import os

import pytest

from fxsearch.errors import CheckpointError, ExportError
from fxsearch.files import json_text, write_atomically, write_json


def test_new_file_gets_the_umask_mode_and_an_existing_file_keeps_its_mode(tmp_path):
    old = os.umask(0o027)
    try:
        path = tmp_path / "a.bin"
        write_atomically(path, b"one")
        assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o640
        path.chmod(0o604)
        write_atomically(path, b"two")
        assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["a.bin"]   # no temporary file left


def test_failure_raises_the_callers_error_naming_the_path_and_leaves_nothing(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "x.onnx"
    with pytest.raises(ExportError, match="cannot write ONNX file .*x.onnx"):
        write_atomically(missing, b"x", error=ExportError, what="ONNX file")
    target = tmp_path / "is_a_dir"
    target.mkdir()
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        write_atomically(target, b"x", error=CheckpointError, what="checkpoint")
    assert sorted(os.listdir(tmp_path)) == ["is_a_dir"] and os.listdir(target) == []


def test_json_lists_of_numbers_on_one_line(tmp_path):
    data = {"shape": [1, 3, 8, 8], "name": "[1,\n 2]", "nested": {"bits": [8, 4, 0.5]}}
    assert '"shape": [1, 3, 8, 8]' in json_text(data) and '"bits": [8, 4, 0.5]' in json_text(data)
    write_json(tmp_path / "r.json", data)
    import json
    assert json.loads((tmp_path / "r.json").read_text()) == data

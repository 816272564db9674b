"""The torchvision zoo end to end, second half: the same cases as tests/test_zoo.py (a file
of its own so that `--dist loadfile` runs the halves on two workers)."""
from __future__ import annotations

import pytest

from zoo_cases import run_case, zoo_params


@pytest.mark.parametrize("name", zoo_params(1))
def test_zoo_end_to_end(name):
    assert run_case(name).stage == "done"

"""The torchvision classification zoo end to end, first half (tests/zoo_cases.py): convert,
one search step, about 30% of the prunable channel units at 0 bits, finalize exactly (16
bits), "qdq" ONNX export at the default precisions verified in onnxruntime. Slow models are
marked heavy (`make test-heavy`); bench/zoo_report.py writes the same as docs/zoo.md."""
from __future__ import annotations

import pytest

from zoo_cases import run_case, zoo_params


@pytest.mark.parametrize("name", zoo_params(0))
def test_zoo_end_to_end(name):
    assert run_case(name).stage == "done"

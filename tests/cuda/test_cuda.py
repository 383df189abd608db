"""CUDA tests (issue 10, item 4): the checks of ``cuda_checks.py`` with ``device = "cuda"``.

Marked ``cuda`` and skipped, with the reason, where CUDA is absent, so CI stays green; run them on
a GPU machine with ``python -m pytest tests/cuda -q`` (``benchmarks/gpu_check.sh`` does). The same
test functions run on the CPU in ``test_cuda_checks_on_cpu.py``, which proves their bodies everywhere.
"""

from __future__ import annotations

import pytest
import torch

from cuda_checks import *  # noqa: F401,F403 - the shared, device-parametrised test functions and fixtures

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"),
]


@pytest.fixture(scope="module")
def device() -> str:
    return "cuda"
